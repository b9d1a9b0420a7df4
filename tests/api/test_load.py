"""``longctx.load``: a model saved while patched comes back with its extension (tiny models, no tokenizer)."""

from __future__ import annotations

import pytest
import torch
from conftest import build

import longctx


def _out(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=32)).eval()


@pytest.mark.parametrize("make, method, params", [
    (lambda: build("llama"), "selfextend", {"group_size": 4, "window": 16}),
    (lambda: build("modernbert"), "selfextend", {"target_length": 200}),
    (_bert, "grouped", {"target_length": 128}),
    (_bert, "pcw", {"target_length": 128}),
    (_bert, "pi", {"target_length": 128, "mode": "cubic"}),
])
def test_saved_patched_model_loads_with_its_extension(tmp_path, make, method, params):
    model = make()
    ids = torch.randint(5, 100, (1, 120), generator=torch.Generator().manual_seed(0))
    info = longctx.patch(model, method, **params)
    expected = _out(model, ids)
    model.save_pretrained(tmp_path)
    assert longctx.api.CONFIG_KEY in (tmp_path / "config.json").read_text()
    longctx.unpatch(model)
    assert not hasattr(model.config, longctx.api.CONFIG_KEY)
    loaded = longctx.load(tmp_path)
    assert type(loaded) is type(model) and longctx.patch_info(loaded) == info
    assert torch.equal(_out(loaded, ids), expected)


def test_standard_methods_need_no_record(tmp_path):
    """yarn is a transformers rope type: the saved config carries it, plain loading is enough, no longctx block."""
    model = build("llama")
    longctx.patch(model, "yarn", factor=4)
    model.save_pretrained(tmp_path)
    assert longctx.api.CONFIG_KEY not in (tmp_path / "config.json").read_text()
    ids = torch.randint(5, 100, (1, 100))
    assert torch.equal(_out(longctx.load(tmp_path), ids), _out(model, ids))
