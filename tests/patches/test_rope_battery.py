"""The shared battery: every frequency method × every rotary family, against transformers' own built-in rope types.

A row per method in ``BUILTIN``: how the same extension is written with transformers' own ``rope_parameters``.
The patched model must give the reference's logits (fp32, atol 1e-5), differ visibly from the unpatched model,
generate the same greedy tokens, and ``unpatch`` must restore the original logits bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ENCODERS, FAMILIES, TRAINED, build

import longctx
from longctx.core.rope import ntk_factors
from longctx.registry import registry

FACTOR = 4.0
SEQ = 3 * TRAINED  # well past the trained length, inside the target


def _rotary_dim(model) -> int:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    params = config.rope_parameters
    if "full_attention" in params:
        params = params["full_attention"]
    return int(head_dim * params.get("partial_rotary_factor", 1.0))


def _ntk(p, model):
    d = _rotary_dim(model)
    return {**p, "rope_theta": p["rope_theta"] * FACTOR ** (d / (d - 2))}


BUILTIN = {
    "pi": lambda p, m: {**p, "rope_type": "linear", "factor": FACTOR},
    "ntk": _ntk,
    "dynamic_ntk": lambda p, m: {**p, "rope_type": "dynamic", "factor": FACTOR},
    "yarn": lambda p, m: {
        **p,
        "rope_type": "yarn",
        "factor": FACTOR,
        "original_max_position_embeddings": TRAINED,
    },
    "longrope": lambda p, m: {  # its default: NTK's factors per dimension past L, the model's own within
        **p,
        "rope_type": "longrope",
        "factor": FACTOR,
        "long_factor": ntk_factors(_rotary(m, p), FACTOR),
        "short_factor": [1.0] * (_rotary(m, p) // 2),
        "original_max_position_embeddings": TRAINED,
    },
}


def _rotary(model, params) -> int:
    from longctx.models import find_rotary_modules, rotary_dim

    return rotary_dim(find_rotary_modules(model)[0].config, params)


# frequency methods whose built-in equivalent depends on the sequence length, with their own battery
LENGTH_DEPENDENT = {"clex": "tests/patches/test_clex.py (equals ntk with alpha = 2t - 1 at each t, every family)"}


def test_battery_covers_every_rope_method():
    rope_methods = {name for name, spec in registry.items() if spec.kind == "rope"}
    assert rope_methods == set(BUILTIN) | set(LENGTH_DEPENDENT), "add a BUILTIN row for every new frequency method"


def reference(model_type: str, model, method: str):
    """The same weights loaded with transformers' built-in rope_parameters for ``method``."""
    params = copy.deepcopy(build(model_type).config.rope_parameters)  # the unpatched family config
    if "full_attention" in params:  # nested: only the global layers are extended
        params["full_attention"] = BUILTIN[method](params["full_attention"], model)
    else:
        params = BUILTIN[method](params, model)
    return build(model_type, rope_parameters=params, state_dict=model.state_dict())


def _inputs(seq: int = SEQ, batch: int = 2):
    torch.manual_seed(1)
    return torch.randint(3, 120, (batch, seq))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", sorted(BUILTIN))
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_patch_equals_builtin_and_unpatch_is_exact(model_type, method):
    model = build(model_type)
    ids = _inputs()
    original = _logits(model, ids)

    info = longctx.patch(model, method, factor=FACTOR)
    assert info.method == method and info.factor == FACTOR
    assert info.trained_length == TRAINED and info.target_length == int(FACTOR * TRAINED)
    # the config in memory is the one every transformers release reads the same (patches/portable.py): linear,
    # dynamic and yarn keep max_position_embeddings at the trained length (readers count from it); a θ change: target
    kept = TRAINED if method in ("pi", "dynamic_ntk", "yarn") else int(FACTOR * TRAINED)
    assert model.config.max_position_embeddings == kept
    patched = _logits(model, ids)

    ref = reference(model_type, model, method)
    expected = _logits(ref, ids)
    torch.testing.assert_close(patched, expected, atol=1e-5, rtol=0)
    assert (patched - original).abs().max() > 1e-3, "the patch did not change the model"

    assert longctx.unpatch(model)
    assert torch.equal(_logits(model, ids), original)
    assert not longctx.is_patched(model)


DECODERS = sorted(k for k in FAMILIES if k not in ENCODERS)


@pytest.mark.parametrize("method", sorted(BUILTIN))
@pytest.mark.parametrize("model_type", DECODERS)
def test_greedy_generate_equals_reference(model_type, method):
    model = build(model_type)
    prompt = _inputs(seq=TRAINED + 20, batch=1)
    longctx.patch(model, method, target_length=int(FACTOR * TRAINED))
    ref = reference(model_type, model, method)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ours = model.generate(prompt, **kwargs)
        theirs = ref.generate(prompt, **kwargs)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("model_type", ["gemma3_text", "modernbert"])
def test_sliding_layers_are_left_alone(model_type):
    model = build(model_type)
    before = copy.deepcopy(model.config.rope_parameters)
    info = longctx.patch(model, "yarn", factor=FACTOR)
    assert info.layer_types == ["full_attention"]
    assert model.config.rope_parameters["sliding_attention"] == before["sliding_attention"]
    assert model.config.rope_parameters["full_attention"]["rope_type"] == "yarn"
    rotary = model.model.rotary_emb
    assert torch.equal(rotary.sliding_attention_inv_freq.cpu(), rotary.sliding_attention_original_inv_freq.cpu())
    longctx.unpatch(model)
    assert model.config.rope_parameters == before


def test_partial_rotary_only_scales_rotary_dims():
    model = build("gpt_neox")  # rotary_pct 0.5: head_dim 8, rotary dim 4
    before = model.gpt_neox.rotary_emb.inv_freq.clone()
    longctx.patch(model, "pi", factor=FACTOR)
    after = model.gpt_neox.rotary_emb.inv_freq
    assert after.shape == before.shape == (2,)
    torch.testing.assert_close(after, before / FACTOR)


def test_repatch_replaces_cleanly():
    model = build("llama")
    ids = _inputs()
    original = _logits(model, ids)
    longctx.patch(model, "pi", factor=2)
    info = longctx.patch(model, "yarn", factor=FACTOR)
    assert info.method == "yarn" and info.trained_length == TRAINED  # not 2× the trained length
    expected = _logits(reference("llama", model, "yarn"), ids)
    torch.testing.assert_close(_logits(model, ids), expected, atol=1e-5, rtol=0)
    longctx.unpatch(model)
    assert torch.equal(_logits(model, ids), original)
    assert model.config.max_position_embeddings == TRAINED


def test_tokenizer_limit_raised_and_restored():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, "[UNK]")))
    tok.model_max_length = TRAINED
    model = build("llama")
    longctx.patch(model, "yarn", target_length=1000, tokenizer=tok)
    assert tok.model_max_length == 1000 and model.config.max_position_embeddings == TRAINED  # yarn counts from L
    longctx.unpatch(model)
    assert tok.model_max_length == TRAINED


def test_bf16_patched_model_runs_and_keeps_fp32_frequencies():
    model = build("llama").to(torch.bfloat16)
    longctx.patch(model, "yarn", factor=FACTOR)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    with torch.no_grad():
        out = model(input_ids=_inputs()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
