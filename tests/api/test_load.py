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
    """yarn is a transformers rope type: the saved config carries it and plain loading is enough; the longctx block
    only records the form and the target (for the length limits)."""
    import json

    from transformers import AutoModelForCausalLM

    model = build("llama")
    longctx.patch(model, "yarn", factor=4)
    model.save_pretrained(tmp_path)
    block = json.loads((tmp_path / "config.json").read_text())[longctx.api.CONFIG_KEY]
    assert block["form"] == "config" and block["params"]["target_length"] == 256
    ids = torch.randint(5, 100, (1, 100))
    assert torch.equal(_out(longctx.load(tmp_path), ids), _out(model, ids))
    assert torch.equal(_out(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), ids), _out(model, ids))


@pytest.mark.parametrize("rope_type, cache_consistent", [("longctx_dynamic", False), ("longctx_ntk_by_length", True)])
def test_saves_of_longctx_0_1_with_its_own_rope_types_still_load(tmp_path, rope_type, cache_consistent):
    """longctx 0.1 saved dynamic NTK with its own rope types (plain transformers cannot read them): longctx.load
    converts them and re-applies the method."""
    import json

    model = build("llama")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {**config["rope_parameters"], "rope_type": rope_type, "factor": 4.0,
                                 "original_max_position_embeddings": 64}
    config["max_position_embeddings"] = 256
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = longctx.load(tmp_path)
    info = longctx.patch_info(loaded)
    assert info.method == "dynamic_ntk" and info.params["cache_consistent"] is cache_consistent
    longctx.patch(model, "dynamic_ntk", factor=4, cache_consistent=cache_consistent)
    ids = torch.randint(5, 100, (1, 150))
    torch.testing.assert_close(_out(loaded, ids), _out(model, ids), atol=1e-5, rtol=0)


def test_patched_context_manager_leaves_the_model_as_found():
    model = build("llama")
    ids = torch.randint(5, 100, (1, 150))
    original = _out(model, ids)
    with longctx.patched(model, "yarn", factor=4) as info:
        assert info.method == "yarn" and not torch.equal(_out(model, ids), original)
    assert not longctx.is_patched(model) and torch.equal(_out(model, ids), original)
    longctx.patch(model, "pi", factor=2)
    earlier = _out(model, ids)
    with pytest.raises(RuntimeError, match="inside"):
        with longctx.patched(model, "selfextend", group_size=4, window=16):
            raise RuntimeError("inside the block")
    assert longctx.patch_info(model).method == "pi" and torch.equal(_out(model, ids), earlier)


@pytest.mark.parametrize("block, message", [({"params": {}}, "needs a method name"), ("yarn", "must be an object"),
                                            ({"method": "bogus", "params": {}}, "unknown method 'bogus'"),
                                            ({"method": "selfextend", "params": [1]}, "'params' must be an object"),
                                            ({"method": "selfextend", "params": {}, "form": "x"}, "'form' must be")])
def test_a_malformed_longctx_block_is_a_clear_error(tmp_path, block, message):
    import json

    from conftest import build

    model = build("llama")
    longctx.patch(model, "selfextend", group_size=4, window=16)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["longctx"] = block
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as caught:
        longctx.load(tmp_path)
    assert "config.json: the 'longctx' block" in str(caught.value)


@pytest.mark.parametrize("method, params", [("yarn", {"factor": 4.0}), ("selfextend", {"group_size": 4, "window": 16})])
def test_load_in_bfloat16_keeps_fp32_rotary_frequencies(tmp_path, method, params):
    """As transformers loads a model in a dtype: the rotary frequencies stay fp32 (they were cast to bf16, 3 digits),
    so longctx.load gives what plain transformers gives for a standard form."""
    from transformers import AutoModelForCausalLM

    model = build("llama")
    info = longctx.patch(model, method, **params)
    model.save_pretrained(tmp_path)
    loaded = longctx.load(tmp_path, dtype=torch.bfloat16)
    frequencies = {n: b.dtype for n, b in loaded.named_buffers() if n.endswith("inv_freq")}
    assert frequencies and set(frequencies.values()) == {torch.float32}, frequencies
    assert next(loaded.parameters()).dtype == torch.bfloat16
    if info.form == "config":
        plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
        ids = torch.randint(4, 100, (1, 200), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, plain(input_ids=ids).logits)
