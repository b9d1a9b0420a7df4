"""The contract's integration axis, tested once over the whole registry: where a patched model meets the rest of the
user's stack, the patch works — or refuses loudly, naming the method and the cause. Never silently unextended or
wrongly extended outputs.

Every registered method × each of its examples × the model families its kind applies to (as in
``test_contract.py``; a new method gets these checks by registering):

* **static caches** — ``StaticCache`` (and ``generate(cache_implementation="static")``, which compiled generation
  uses): prefill and cached decoding give the dynamic cache's logits; on a hybrid model (Gemma 3's sliding + full
  layers) its static sliding layers too;
* **sliding windows** — one-layer models whose only layer attends within a window (a Mistral-style config window, a
  Qwen2 sliding layer, kept by a capped cache): the patch is refused at patch time, or the window holds (tokens
  outside it do not move the output) and cached decoding equals recomputing the sequence past the trained length;
* **autograd** — forward + backward (training, LoRA): the gradient is the derivative (a central difference along it
  in float64), on every path the method takes;
* **peft** — LoRA wrapped after or before the patch, a training step, ``merge_and_unload``: still patched, and
  ``unpatch`` gives the merged base model bit for bit;
* **vision-language models** — image forwards run and the vision tower's features are those of the unpatched model;
* **logit softcapping** (Gemma 2): refused at patch time, or honoured (the cap changes the patched outputs);
* **attention-implementation switches** after the patch: the patch still holds, or the next forward raises naming
  the method; a transformers release that stops calling the attention interface raises too;
* **torch.compile** (dynamo) and **device_map** loading (accelerate's hooks): the patched outputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import IMAGE, TRAINED, build, build_vlm

import longctx
from longctx.models import cache_kwarg
from longctx.patches import registry

CACHE = cache_kwarg()
DECODERS = ["llama", "gemma3_text", "gpt_neox"]
KINDS_ON_DECODERS = ("rope", "rope_attention")
CASES = [pytest.param(name, i, family, id=f"{name}[{i}]-{family}")
         for name, spec in registry.items() if spec.kind in KINDS_ON_DECODERS
         for i, _ in enumerate(spec.examples(TRAINED)) for family in DECODERS]
METHOD_CASES = [pytest.param(name, i, id=f"{name}[{i}]") for name, spec in registry.items()
                if spec.kind in KINDS_ON_DECODERS for i, _ in enumerate(spec.examples(TRAINED))]
ATTENTION_RUNTIME = "_longctx_attention"


def _example(name: str, index: int) -> dict:
    return dict(registry[name].examples(TRAINED)[index])


def _ids(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(4, 100, (batch, n), generator=torch.Generator().manual_seed(seed))


def _patch_or_refusal(model, name: str, index: int, **extra):
    """The patch's info, or the ValueError with which it refused (loud, before any change)."""
    try:
        return longctx.patch(model, name, **_example(name, index), **extra)
    except ValueError as e:
        assert not longctx.is_patched(model)
        return e


# --- static caches ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, index, family", CASES)
def test_static_cache_equals_the_dynamic_cache(name, index, family):
    from transformers import DynamicCache, StaticCache

    model = build(family)
    longctx.patch(model, name, **_example(name, index))
    ids = _ids(2 * TRAINED + 8)
    prompt, steps = 2 * TRAINED, 8
    results = []
    with torch.no_grad():  # a copy each: transformers' dynamic rope type keeps its frequencies grown between calls
        for cache in (DynamicCache(config=model.config), StaticCache(config=model.config, max_cache_len=3 * TRAINED)):
            run = copy.deepcopy(model)
            logits = [run(input_ids=ids[:, :prompt], **{CACHE: cache}, use_cache=True).logits[:, -1]]
            for t in range(prompt, prompt + steps):
                logits.append(run(input_ids=ids[:, t:t + 1], **{CACHE: cache}, use_cache=True).logits[:, -1])
            results.append(torch.stack(logits, 1))
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, index", METHOD_CASES)
def test_generate_with_a_static_cache(name, index):
    model = build("llama")
    longctx.patch(model, name, **_example(name, index))
    ids = _ids(2 * TRAINED)
    with torch.no_grad():
        dynamic = copy.deepcopy(model).generate(ids, max_new_tokens=6, do_sample=False)
        static = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(static, dynamic)


# --- sliding windows -------------------------------------------------------------------------------------------------
WINDOWED = {  # one layer, attending within 16 tokens; the cache keeps the window only
    "mistral-window": ("mistral", {"sliding_window": 16, "num_hidden_layers": 1}),
    "qwen2-sliding": ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0,
                                "num_hidden_layers": 1}),
}


@pytest.mark.parametrize("windowed", sorted(WINDOWED))
@pytest.mark.parametrize("name, index", METHOD_CASES)
def test_a_sliding_window_is_kept_or_refused(name, index, windowed):
    family, extra = WINDOWED[windowed]
    model = build(family, **extra)
    patched = _patch_or_refusal(model, name, index)
    if isinstance(patched, ValueError):
        assert "sliding window" in str(patched) and name in str(patched)
        return
    ids = _ids(2 * TRAINED + 10)
    n = ids.shape[1]
    with torch.no_grad():
        full = model(input_ids=ids).logits
        moved = ids.clone()
        moved[:, : n - 16] = (moved[:, : n - 16] + 7) % 100 + 4  # every token outside the last query's window
        assert torch.equal(model(input_ids=moved).logits[:, -1], full[:, -1]), "the window was dropped"
        if not registry[name].exact_cache(patched.params):
            return
        out = model(input_ids=ids[:, :TRAINED], use_cache=True)
        cache, steps = out.past_key_values if CACHE == "past_key_values" else out.cache, []
        for t in range(TRAINED, n):
            step = model(input_ids=ids[:, t:t + 1], **{CACHE: cache}, use_cache=True)
            steps.append(step.logits[:, -1])
        # recomputing: each step's sequence from scratch (methods whose frequencies follow the length included)
        recomputed = [model(input_ids=ids[:, :t + 1]).logits[:, -1] for t in range(TRAINED, n)]
    torch.testing.assert_close(torch.stack(steps, 1), torch.stack(recomputed, 1), atol=2e-5, rtol=0)


# --- autograd ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, index, family", CASES)
def test_backward_gives_the_derivative(name, index, family):
    """Training through a patched model: the gradient along its own direction equals a central difference (float64
    weights; the methods keep cos/sin and merges in fp32, so the difference step is 1e-3)."""
    model = build(family).double()
    longctx.patch(model, name, **_example(name, index))
    model.train()
    ids = _ids(2 * TRAINED + 5, batch=2)
    mask = torch.ones_like(ids)
    if family != "gemma3_text":  # (Gemma 3's own eager attention has NaN gradients on padded rows, patched or not)
        mask[0, :5] = 0  # a left-padded row: the padded paths too
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    labels = ids.masked_fill(mask == 0, -100)
    params = [p for n, p in model.named_parameters() if "embed" not in n and p.requires_grad]

    def loss() -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels).loss

    value = loss()
    value.backward()
    grads = [p.grad.detach().clone() for p in params]
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    assert torch.isfinite(norm) and norm > 0
    h = 1e-3
    with torch.no_grad():
        def shifted(sign: float) -> float:
            for p, g in zip(params, grads):
                p.add_(sign * h * g / norm)
            out = loss().item()
            for p, g in zip(params, grads):
                p.sub_(sign * h * g / norm)
            return out

        slope = (shifted(1.0) - shifted(-1.0)) / (2 * h)
    assert slope == pytest.approx(norm.item(), rel=2e-3)


# --- peft -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["patch-then-wrap", "wrap-then-patch"])
@pytest.mark.parametrize("name, index", METHOD_CASES)
def test_peft_lora_train_step_and_merge(name, index, order):
    import peft  # a test dependency (pyproject's [test])

    model = build("llama")
    original = copy.deepcopy(model)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    ids = _ids(2 * TRAINED)
    if order == "patch-then-wrap":
        longctx.patch(model, name, **_example(name, index))
        with torch.no_grad():
            patched = model(input_ids=ids).logits
        wrapped = peft.get_peft_model(model, lora)
    else:
        wrapped = peft.get_peft_model(model, lora)
        longctx.patch(wrapped, name, **_example(name, index))
        with torch.no_grad():
            patched = wrapped(input_ids=ids).logits
    assert longctx.is_patched(wrapped) and longctx.is_patched(model)
    with torch.no_grad():  # LoRA starts as the identity
        torch.testing.assert_close(wrapped(input_ids=ids).logits, patched, atol=1e-6, rtol=0)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    wrapped.train()
    wrapped(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    wrapped.eval()
    merged = wrapped.merge_and_unload()
    assert longctx.is_patched(merged)
    with torch.no_grad():
        trained_logits = merged(input_ids=ids).logits
    assert not torch.equal(trained_logits, patched)
    assert longctx.unpatch(merged) and not longctx.is_patched(merged)
    reference = original
    reference.load_state_dict(merged.state_dict())
    with torch.no_grad():
        assert torch.equal(merged(input_ids=ids).logits, reference(input_ids=ids).logits)


# --- vision-language models -------------------------------------------------------------------------------------------
VLM_TOKENS = {"llava": 16, "internvl": 4, "gemma3": 4}


@pytest.mark.parametrize("vlm", sorted(VLM_TOKENS))
@pytest.mark.parametrize("name, index", METHOD_CASES)
def test_vision_tower_keeps_its_attention(name, index, vlm):
    model = build_vlm(vlm)
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([[5] * 10 + [IMAGE] * VLM_TOKENS[vlm] + [20 + i % 70 for i in range(2 * TRAINED)]])
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels)
        features = features.pooler_output if hasattr(features, "pooler_output") else features
        before = model(input_ids=ids, pixel_values=pixels).logits
    patched = _patch_or_refusal(model, name, index)
    if isinstance(patched, ValueError):
        return
    tower = [m for n, m in model.named_modules() if "vision" in n and ATTENTION_RUNTIME in vars(m)]
    assert not tower, "the vision tower was switched to longctx's attention"
    with torch.no_grad():
        after = model.get_image_features(pixel_values=pixels)
        after = after.pooler_output if hasattr(after, "pooler_output") else after
        logits = model(input_ids=ids, pixel_values=pixels).logits
    for a, b in zip(after if isinstance(after, (list, tuple)) else [after],
                    features if isinstance(features, (list, tuple)) else [features]):
        assert torch.equal(a, b)
    assert torch.isfinite(logits).all() and not torch.equal(logits, before)


# --- logit softcapping ------------------------------------------------------------------------------------------------
def _gemma2(softcap: float | None):
    from transformers import AutoModelForCausalLM, Gemma2Config

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=TRAINED,
                          sliding_window=16, attn_logit_softcapping=softcap, initializer_range=0.3)
    # eager, as Gemma 2 is served: SDPA has no softcap (transformers 5.17 gives a model built from its config SDPA)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("name, index", METHOD_CASES)
def test_softcapping_is_honoured_or_refused(name, index):
    capped, free = _gemma2(0.5), _gemma2(None)
    patched = _patch_or_refusal(capped, name, index)
    if isinstance(patched, ValueError):
        assert "softcap" in str(patched) and name in str(patched)
        return
    longctx.patch(free, name, **_example(name, index))
    ids = _ids(2 * TRAINED)
    with torch.no_grad():
        out = capped(input_ids=ids).logits
        assert torch.isfinite(out).all()
        assert (out - free(input_ids=ids).logits).abs().max() > 1e-3, "the softcap was dropped"


# --- attention-implementation switches --------------------------------------------------------------------------------
@pytest.mark.parametrize("name, index", METHOD_CASES)
def test_switching_the_attention_implementation_is_loud(name, index):
    model = build("llama")
    longctx.patch(model, name, **_example(name, index))
    ids = _ids(2 * TRAINED)
    with torch.no_grad():
        patched = model(input_ids=ids).logits
        model.set_attn_implementation("eager")
        try:
            out = model(input_ids=ids).logits
        except RuntimeError as e:
            assert name in str(e) and "eager" in str(e)
            assert ATTENTION_RUNTIME in vars(model.model.layers[0].self_attn)
        else:  # the method does not live in the attention function: still applied
            assert ATTENTION_RUNTIME not in vars(model.model.layers[0].self_attn)
            torch.testing.assert_close(out, patched, atol=5e-5, rtol=0)  # eager against sdpa: fp32 rounding
    assert longctx.unpatch(model)


@pytest.mark.parametrize("name, index", [c for c in METHOD_CASES if c.values[0] in ("selfextend", "dca", "clex")])
def test_a_release_that_bypasses_the_attention_interface_is_caught(name, index, monkeypatch):
    """As if a transformers release computed attention without the interface: the forward raises."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = build("llama")
    longctx.patch(model, name, **_example(name, index))
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "longctx_sdpa", sdpa_attention_forward)
    with torch.no_grad(), pytest.raises(RuntimeError, match=rf"{name}: this forward never entered"):
        model(input_ids=_ids(2 * TRAINED))


# --- torch.compile, device_map -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, index", METHOD_CASES)
def test_torch_compile_gives_the_patched_outputs(name, index):
    torch._dynamo.reset()
    model = build("llama")
    longctx.patch(model, name, **_example(name, index))
    ids = _ids(2 * TRAINED)
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, backend="eager")(input_ids=ids).logits
    torch.testing.assert_close(compiled, eager, atol=5e-5, rtol=0)  # traced ops, fp32 rounding


@pytest.mark.parametrize("name, index", METHOD_CASES)
def test_device_map_loading(name, index, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build("llama")
    model.save_pretrained(tmp_path / "base")
    mapped = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map="cpu").eval()
    ids = _ids(2 * TRAINED)
    longctx.patch(model, name, **_example(name, index))
    longctx.patch(mapped, name, **_example(name, index))
    with torch.no_grad():
        torch.testing.assert_close(mapped(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert longctx.unpatch(mapped)


# --- a config class that refuses the rope type ------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n, spec in registry.items() if spec.standard_config])
def test_phi3_saves_what_its_config_class_refuses_as_a_longctx_block(name, tmp_path):
    """Phi-3's config class accepts only 'default' and 'longrope': save_pretrained of a pi / yarn / dynamic patch wrote
    nothing and raised. Now the base config with a longctx block (longctx.load re-applies it), or the standard form
    where the class reads it (ntk: a new theta)."""
    from transformers import AutoModelForCausalLM

    model = build("phi3")
    original = copy.deepcopy(model)
    info = longctx.patch(model, name, **_example(name, 0))
    ids = _ids(2 * TRAINED)
    with torch.no_grad():
        patched = model(input_ids=ids).logits
        expected_plain = patched if info.form == "config" else original(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(longctx.load(tmp_path)(input_ids=ids).logits, patched, atol=1e-5, rtol=0)
        plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(plain(input_ids=ids).logits, expected_plain, atol=1e-5, rtol=0)
    assert info.form in ("config", "longctx")
    assert longctx.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, original(input_ids=ids).logits)


@pytest.mark.parametrize("name, index", METHOD_CASES)
def test_unpatch_through_a_peft_wrapper(name, index):
    """``longctx.unpatch(peft_model)`` reaches the patched base model (it raised) and restores its outputs."""
    import peft

    wrapped = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = _ids(2 * TRAINED)
    with torch.no_grad():
        before = wrapped(input_ids=ids).logits
        longctx.patch(wrapped, name, **_example(name, index))
        assert not torch.equal(wrapped(input_ids=ids).logits, before)
        assert longctx.unpatch(wrapped) and not longctx.is_patched(wrapped)
        assert torch.equal(wrapped(input_ids=ids).logits, before)


@pytest.mark.parametrize("name, index", METHOD_CASES)
def test_a_dropped_kv_cache_is_freed(name, index):
    """The runtime keeps nothing of a call: a KV cache the user drops after a forward is freed (it was held by the
    layers whose runtime never asked for it)."""
    import gc
    import weakref

    from transformers import DynamicCache

    model = build("gemma3_text")  # sliding layers too (not extended: their calls never ask for the cache)
    longctx.patch(model, name, **_example(name, index))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=_ids(2 * TRAINED), **{CACHE: cache}, use_cache=True)
    refs = [weakref.ref(cache), *(weakref.ref(layer) for layer in cache.layers)]  # the layers hold the keys
    del cache
    gc.collect()
    assert all(ref() is None for ref in refs)
