"""Absolute-position methods (grouped, recurrent, pi on a learned table) on BERT-style encoders."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

import longctx
from longctx.patches.absolute import interpolate_table

L = 32


def _bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=L)
    return BertModel(cfg).eval()


def _ids(n, batch=1, seed=0):
    return torch.randint(5, 100, (batch, n), generator=torch.Generator().manual_seed(seed))


def _hidden(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).last_hidden_state


@pytest.mark.parametrize("method", ["grouped", "recurrent", "pi"])
def test_inputs_within_the_table_are_untouched(method):
    model = _bert()
    ids = _ids(L)
    before = _hidden(model, ids)
    info = longctx.patch(model, method, target_length=4 * L)
    assert info.method == ("pi_absolute" if method == "pi" else method)
    assert torch.equal(_hidden(model, ids), before)
    assert torch.equal(_hidden(model, ids[:, :10]), _hidden(_bert(), ids[:, :10]))


@pytest.mark.parametrize("method, positions", [
    ("grouped", lambda n: torch.arange(n) // -(-n // L)),
    ("recurrent", lambda n: torch.arange(n) % L),
])
def test_long_inputs_use_the_position_map(method, positions):
    model, ref = _bert(), _bert()
    n = 3 * L + 5
    ids = _ids(n, seed=1)
    longctx.patch(model, method, target_length=4 * L)
    expected = _hidden(ref, ids, position_ids=positions(n)[None])
    torch.testing.assert_close(_hidden(model, ids), expected, rtol=0, atol=0)


def test_pi_reads_interpolated_rows():
    model, ref = _bert(), _bert()
    n = 4 * L
    ids = _ids(n, seed=2)
    info = longctx.patch(model, "pi", target_length=n)
    assert info.params["scale"] == 4 and model.embeddings.position_embeddings.num_embeddings == 4 * L
    ref.embeddings.position_embeddings = torch.nn.Embedding.from_pretrained(
        interpolate_table(ref.embeddings.position_embeddings.weight.data, 4))
    ref.embeddings.register_buffer("token_type_ids", torch.zeros(1, 4 * L, dtype=torch.long), persistent=False)
    torch.testing.assert_close(_hidden(model, ids), _hidden(ref, ids, position_ids=torch.arange(n)[None]))
    # half the longest length: every second interpolated row
    half = ids[:, : 2 * L]
    torch.testing.assert_close(_hidden(model, half), _hidden(ref, half, position_ids=2 * torch.arange(2 * L)[None]))


def test_interpolated_table_keeps_anchors():
    table = torch.randn(5, 3)
    for mode in ("linear", "cubic"):
        out = interpolate_table(table, 4, mode)
        assert out.shape == (20, 3) and torch.equal(out[::4], table)
    lin = interpolate_table(table, 4)
    torch.testing.assert_close(lin[2], (table[0] + table[1]) / 2)
    assert torch.equal(lin[-1], table[-1])  # past the last anchor: the last row


@pytest.mark.parametrize("method", ["grouped", "recurrent", "pi"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_rows_alone(method, side):
    model = _bert()
    longctx.patch(model, method, target_length=4 * L)
    rows = [_ids(100, seed=3), _ids(70, seed=4)]  # ids >= 5: never the pad id 0
    ids = torch.zeros(2, 100, dtype=torch.long)
    mask = torch.zeros(2, 100, dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(100 - row.shape[1], 100) if side == "left" else slice(0, row.shape[1])
        ids[b, span], mask[b, span] = row[0], 1
    batched = _hidden(model, ids, attention_mask=mask)
    for b, row in enumerate(rows):
        span = slice(100 - row.shape[1], 100) if side == "left" else slice(0, row.shape[1])
        torch.testing.assert_close(batched[b, span], _hidden(model, row)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["grouped", "recurrent", "pi"])
def test_unpatch_restores_everything(method):
    model = _bert()
    emb = model.embeddings
    table, types = emb.position_embeddings, emb.token_type_ids
    ids = _ids(L, seed=5)
    before = _hidden(model, ids)
    longctx.patch(model, method, target_length=3 * L)
    longctx.unpatch(model)
    assert emb.position_embeddings is table and torch.equal(emb.token_type_ids, types)
    assert model.config.max_position_embeddings == L
    assert not emb._forward_pre_hooks
    assert torch.equal(_hidden(model, ids), before)


def test_errors():
    model = _bert()
    with pytest.raises(ValueError, match="not longer than the trained length"):
        longctx.patch(model, "grouped", target_length=L)
    with pytest.raises(ValueError, match="target_length"):
        longctx.patch(model, "recurrent")
    with pytest.raises(longctx.models.NotARopeModelError):
        longctx.patch(model, "yarn", target_length=4 * L)
    from conftest import build

    with pytest.raises(ValueError, match="no learned absolute position table"):
        longctx.patch(build("llama"), "grouped", target_length=256)
