"""Absolute-position methods (grouped, recurrent, pi on a learned table) on BERT-style encoders."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertModel

import longctx
from longctx.patches.absolute import interpolate_table, pcw_chunks

L = 32


def _bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=L)
    return BertModel(cfg).eval()


def _ids(n, batch=1, seed=0):
    return torch.randint(5, 100, (batch, n), generator=torch.Generator().manual_seed(seed))


def _hidden(model, ids, **kw):
    if "position_ids" in kw and "attention_mask" not in kw:
        # the oracle attends fully: transformers >= 5.25 reads non-consecutive position_ids without a mask as packed
        # sequences (attention cut where positions do not step by one)
        kw["attention_mask"] = torch.ones_like(ids)
    with torch.no_grad():
        return model(input_ids=ids, **kw).last_hidden_state


@pytest.mark.parametrize("method", ["grouped", "recurrent", "pi", "pcw"])
def test_inputs_within_the_table_are_untouched(method):
    model = _bert()
    ids = _ids(L)
    before = _hidden(model, ids)
    info = longctx.patch(model, method, target_length=4 * L)
    assert info.method == ("pi_absolute" if method == "pi" else method) and info.target_length == 4 * L
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


@pytest.mark.parametrize("method", ["grouped", "recurrent", "pi", "pcw"])
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


@pytest.mark.parametrize("method", ["grouped", "recurrent", "pi", "pcw"])
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
    assert not emb._forward_pre_hooks and "forward" not in model.__dict__
    assert torch.equal(_hidden(model, ids), before)


def test_pcw_chunks_follow_longembed():
    """Body cut every L - 2 tokens, the last chunk being the body's last L - 2 tokens; each wrapped in the specials."""
    body = torch.arange(10, 80)  # 70 body tokens, L - 2 = 30: [0:30], [30:60], [40:70]
    chunks = pcw_chunks(torch.cat((torch.tensor([1]), body, torch.tensor([2]))), L)
    assert [c.tolist() for c in chunks] == [[1, *body[s:e].tolist(), 2] for s, e in ((0, 30), (30, 60), (40, 70))]
    exact = pcw_chunks(torch.cat((torch.tensor([1]), body[:60], torch.tensor([2]))), L)  # a multiple: no overlap
    assert [c[1:-1].tolist() for c in exact] == [body[:30].tolist(), body[30:60].tolist()]
    short = torch.arange(20)
    assert pcw_chunks(short, L)[0] is short


def test_pcw_pools_to_the_chunk_average():
    model, ref = _bert(), _bert()
    ids = _ids(100, seed=6)
    longctx.patch(model, "pcw", target_length=4 * L)
    out = model(input_ids=ids)
    chunks = torch.stack(pcw_chunks(ids[0], L))
    ref_out = ref(input_ids=chunks)
    # mean pooling -> mean of the chunks' mean-pooled states; first token -> mean of the chunks' first tokens
    torch.testing.assert_close(out.last_hidden_state[0].mean(0), ref_out.last_hidden_state.mean(1).mean(0))
    torch.testing.assert_close(out.last_hidden_state[0, 0], ref_out.last_hidden_state[:, 0].mean(0))
    torch.testing.assert_close(out.pooler_output[0], ref_out.pooler_output.mean(0))
    with pytest.raises(NotImplementedError, match="pcw"):
        model(input_ids=ids, output_hidden_states=True)


def test_log_scale_scales_queries_by_log_length():
    """log_scale=True == the query projection multiplied by ln n / ln L, per row (padding excluded)."""
    n = 3 * L
    model = _bert()
    info = longctx.patch(model, "grouped", target_length=4 * L, log_scale=True)
    assert f"queries scaled by max(1, ln n / ln {L})" in info.notes
    positions = torch.arange(n)[None] // 3

    def reference(length):
        ref = _bert()
        factor = max(1.0, math.log(length) / math.log(L))
        for layer in ref.encoder.layer:
            layer.attention.self.query.weight.data *= factor
            layer.attention.self.query.bias.data *= factor
        return ref

    ids = _ids(n, seed=7)
    torch.testing.assert_close(_hidden(model, ids), _hidden(reference(n), ids, position_ids=positions))
    # a padded batch: each row scaled by its own length
    padded = torch.cat((ids, torch.cat((ids[:, :50], torch.zeros(1, n - 50, dtype=torch.long)), 1)))
    mask = (padded != 0).long()
    out = _hidden(model, padded, attention_mask=mask)
    torch.testing.assert_close(out[1, :50], _hidden(reference(50), ids[:, :50],
                                                     position_ids=torch.arange(50)[None] // 2)[0], atol=1e-5, rtol=1e-5)
    short = ids[:, :L]  # n <= L: factor 1
    torch.testing.assert_close(_hidden(model, short), _hidden(_bert(), short))
    longctx.unpatch(model)
    assert model.config._attn_implementation == "sdpa"


def test_errors():
    model = _bert()
    with pytest.raises(ValueError, match="not longer than the trained length"):
        longctx.patch(model, "grouped", target_length=L)
    with pytest.raises(ValueError, match="target_length"):
        longctx.patch(model, "recurrent")
    with pytest.raises(ValueError, match="chunk_batch_size"):
        longctx.patch(model, "pcw", target_length=4 * L, chunk_batch_size=0)
    with pytest.raises(TypeError, match="log_scale"):  # pcw's chunks are never longer than L: no temperature
        longctx.patch(model, "pcw", target_length=4 * L, log_scale=True)
    with pytest.raises(longctx.models.NotARopeModelError):
        longctx.patch(model, "yarn", target_length=4 * L)
    from conftest import build

    with pytest.raises(ValueError, match="no learned absolute position table.*use a RoPE method"):
        longctx.patch(build("llama"), "grouped", target_length=256)
    from transformers import T5Config, T5EncoderModel  # relative attention bias: no table, no rotary

    t5 = T5EncoderModel(T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2))
    for method in ("grouped", "pcw"):
        with pytest.raises(ValueError, match="neither a position table nor rotary embeddings"):
            longctx.patch(t5, method, target_length=1024)
    with pytest.raises(longctx.models.NotARopeModelError, match="absolute-position methods"):
        longctx.patch(t5, "yarn", target_length=1024)
    assert not longctx.is_patched(t5)


def _family(kind):
    """Tiny RoBERTa / XLM-R (positions offset by padding_idx + 1 = 2) and DistilBERT encoders with L positions."""
    from transformers import (DistilBertConfig, DistilBertModel, RobertaConfig, RobertaModel, XLMRobertaConfig,
                              XLMRobertaModel)

    torch.manual_seed(0)
    common = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if kind == "distilbert":
        return DistilBertModel(DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                                max_position_embeddings=L)).eval()
    cls, cfg = (RobertaModel, RobertaConfig) if kind == "roberta" else (XLMRobertaModel, XLMRobertaConfig)
    return cls(cfg(**common, max_position_embeddings=L + 2, pad_token_id=1)).eval()


@pytest.mark.parametrize("kind", ["roberta", "xlm-roberta", "distilbert"])
@pytest.mark.parametrize("method", ["grouped", "recurrent", "pi", "pcw"])
def test_other_encoder_families(kind, method):
    model = _family(kind)
    offset = 2 if kind != "distilbert" else 0
    assert longctx.inspect(model).trained_length == L  # RoBERTa's table has L + 2 rows
    pad = model.config.pad_token_id
    ids = _ids(L, batch=2, seed=8)
    ids[1, 20:] = pad
    mask = (ids != pad).long()
    before = _hidden(model, ids, attention_mask=mask)
    info = longctx.patch(model, method, target_length=4 * L)
    assert info.trained_length == L
    assert torch.equal(_hidden(model, ids, attention_mask=mask), before)  # padding included: bit for bit
    long = _ids(3 * L + 3, seed=9)
    out = _hidden(model, long)
    if method == "grouped":
        ref = _family(kind)
        positions = offset + torch.arange(long.shape[1])[None] // 4
        torch.testing.assert_close(out, _hidden(ref, long, position_ids=positions), rtol=0, atol=0)
    if method == "pi":
        assert model.config.max_position_embeddings == offset + 4 * L
    assert out.shape == (1, 3 * L + 3, 32) and torch.isfinite(out).all()
    longctx.unpatch(model)
    assert torch.equal(_hidden(model, ids, attention_mask=mask), before)
