"""Dynamic NTK and the KV cache (transformers issue 25104).

Standard behaviour: keys cached before the sequence grew keep their old frequencies, so in one attention call the
query and the older keys are rotated with different bases. ``cache_consistent=True`` re-rotates the cached keys to
the current frequencies. In a one-layer model that makes cached decoding exactly equal to recomputing the whole
sequence; in deeper models the cached states of layers ≥ 2 still come from hidden states computed at the earlier
length (no cache can avoid that), and the test checks the property the mode guarantees: every attention call sees
exactly the keys a full recomputation would give it at that layer's input.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TRAINED, build
from transformers import DynamicCache

from longctx.models import cache_kwarg
import longctx

CACHE = cache_kwarg()  # the KV-cache keyword of this transformers release

# cached decoding and a full forward take different fp32 kernel paths: unpatched, they already differ by ~1e-5
TOL = 1e-4
PROMPT = TRAINED - 8  # the prompt fits the trained length; decoding crosses it
STEPS = 40


def _tokens():
    torch.manual_seed(3)
    return torch.randint(3, 120, (1, PROMPT + STEPS))


def _cached_logits(model, ids):
    cache = DynamicCache(config=model.config)
    out = []
    with torch.no_grad():
        logits = model(input_ids=ids[:, :PROMPT], **{CACHE: cache}, use_cache=True).logits
        out.append(logits[:, -1])
        for t in range(PROMPT, ids.shape[1]):
            logits = model(input_ids=ids[:, t : t + 1], **{CACHE: cache}, use_cache=True).logits
            out.append(logits[:, -1])
    return torch.stack(out, 1)


def _recomputed_logits(model, ids):
    out = []
    with torch.no_grad():
        for t in range(PROMPT, ids.shape[1] + 1):
            out.append(model(input_ids=ids[:, :t], use_cache=False).logits[:, -1])
    return torch.stack(out, 1)


ONE_LAYER = {"num_hidden_layers": 1}


def _one_layer(model_type):
    extra = dict(ONE_LAYER, layer_types=["full_attention"]) if model_type == "gemma3_text" else ONE_LAYER
    return build(model_type, **extra)


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox", "gemma3_text"])
def test_standard_dynamic_cache_is_inconsistent_and_consistent_mode_is_exact(model_type):
    ids = _tokens()
    model = _one_layer(model_type)

    longctx.patch(model, "dynamic_ntk", factor=4)
    cached, recomputed = _cached_logits(model, ids), _recomputed_logits(model, ids)
    inside = PROMPT + 8 - PROMPT  # steps whose sequence still fits the trained length
    torch.testing.assert_close(cached[:, :inside], recomputed[:, :inside], atol=TOL, rtol=0)
    standard_gap = (cached - recomputed).abs().max().item()
    assert standard_gap > 1e-2, "standard dynamic NTK should show the stale-cache effect past the trained length"

    info = longctx.patch(model, "dynamic_ntk", factor=4, cache_consistent=True)
    assert info.params["cache_consistent"] is True
    assert model.config._attn_implementation == "longctx_" + ("eager" if model_type == "gemma3_text" else "sdpa")
    cached, recomputed = _cached_logits(model, ids), _recomputed_logits(model, ids)
    torch.testing.assert_close(cached, recomputed, atol=TOL, rtol=0)

    longctx.unpatch(model)
    assert not model.config._attn_implementation.startswith("longctx")


def test_consistent_mode_matches_standard_on_a_single_forward():
    """Without a cache both modes are the same function of the current length."""
    ids = _tokens()
    model = build("llama")
    longctx.patch(model, "dynamic_ntk", factor=4)
    with torch.no_grad():
        standard = model(input_ids=ids).logits
    longctx.patch(model, "dynamic_ntk", factor=4, cache_consistent=True)
    with torch.no_grad():
        consistent = model(input_ids=ids).logits
    torch.testing.assert_close(consistent, standard, atol=1e-5, rtol=0)


def test_consistent_mode_has_no_grow_only_memory():
    """Standard dynamic NTK keeps the long frequencies for a shorter input that follows a long one."""
    long_ids = torch.randint(3, 120, (1, 4 * TRAINED))
    short_ids = long_ids[:, : 2 * TRAINED]
    fresh = build("llama")
    longctx.patch(fresh, "dynamic_ntk", factor=4, cache_consistent=True)
    with torch.no_grad():
        alone = fresh(input_ids=short_ids).logits

    model = build("llama")
    longctx.patch(model, "dynamic_ntk", factor=4)
    with torch.no_grad():
        model(input_ids=long_ids)
        standard_after_long = model(input_ids=short_ids).logits
    assert (standard_after_long - alone).abs().max() > 1e-3

    longctx.patch(model, "dynamic_ntk", factor=4, cache_consistent=True)
    with torch.no_grad():
        model(input_ids=long_ids)
        consistent_after_long = model(input_ids=short_ids).logits
    torch.testing.assert_close(consistent_after_long, alone, atol=1e-5, rtol=0)


def test_consistent_mode_layer0_keys_equal_recomputation_in_deep_models():
    import longctx.patches.dynamic_ntk as dn

    ids = _tokens()[:, : TRAINED + 2]
    model = build("llama")  # two layers
    longctx.patch(model, "dynamic_ntk", factor=4, cache_consistent=True)
    seen = []
    original = dn.ConsistentCacheRuntime._rerotate

    def spy(self, module, key, *args):
        out = original(self, module, key, *args)
        if module.layer_idx == 0:
            seen.append(out.clone())
        return out

    dn.ConsistentCacheRuntime._rerotate = spy
    try:
        with torch.no_grad():
            model(input_ids=ids)
            full = seen[-1]
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[:, :PROMPT], **{CACHE: cache}, use_cache=True)
            for t in range(PROMPT, ids.shape[1]):
                model(input_ids=ids[:, t : t + 1], **{CACHE: cache}, use_cache=True)
            incremental = seen[-1]
    finally:
        dn.ConsistentCacheRuntime._rerotate = original
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=0)


def test_consistent_generate_equals_generate_without_cache():
    model = _one_layer("qwen3")
    longctx.patch(model, "dynamic_ntk", factor=4, cache_consistent=True)
    prompt = _tokens()[:, :PROMPT]
    kwargs = dict(max_new_tokens=30, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kwargs)
        recomputed = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, recomputed)
