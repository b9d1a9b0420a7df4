"""Dual Chunk Attention and ReRoPE / Leaky ReRoPE: against the official code's outputs (``../shared/fixtures``:
ChunkLlama under transformers 4.37.2, bojone/rerope under 4.31), and the properties the attention function promises
on every decoder family — below one chunk / one window the model is unchanged, left-padded batches equal their rows,
chunked prefill and cached decoding equal one shot, the export carries vLLM's DCA config."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ENCODERS, FAMILIES, SHARED, TRAINED, build, kernel_llama
from transformers import DynamicCache

from longctx.models import cache_kwarg
import longctx

CACHE = cache_kwarg()  # the KV-cache keyword of this transformers release

DCA = SHARED / "fixtures" / "dca_official"
REROPE = SHARED / "fixtures" / "rerope_official"
DECODERS = sorted(set(FAMILIES) - set(ENCODERS))


def _fixture_model(folder, attn="sdpa"):
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (folder / "model.safetensors").exists():
        pytest.skip(f"{folder} missing (shared/ is laid out beside the repo in CI)")
    cfg = json.loads((folder / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version", "model_type")}
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)  # 4.31 saved no inv_freq
    model.set_attn_implementation(attn)
    return model


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


# --- the official code's outputs -------------------------------------------------------------------------------
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("case", ["p2_below_chunk_size_len45", "p4_len100_3chunks"])
def test_dca_prefill_equals_the_official_code(case, attn):
    """ChunkLlama's defaults (s = 3L/4, w = L/8) and mscale; the fp32 merge matches the official run without its
    bf16 cast of the merge weights, and the as-is run to the size of that cast."""
    model = _fixture_model(DCA, attn)
    t = _tensors(DCA / f"{case}.safetensors")
    info = longctx.patch(model, "dca", target_length=128)
    assert info.params == {"chunk_size": 48, "local_window": 8, "mscale": True, "attn_backend": "torch"}
    got = _logits(model, t["input_ids"])
    torch.testing.assert_close(got, t["logits_nocast"], atol=1e-4, rtol=0)
    assert (got - t["logits"]).abs().max() < 5e-2


def test_dca_decode_equals_the_official_code():
    """Prefill 35 tokens, then 10 one-token steps crossing the chunk start at 40, with transformers' cache."""
    model = _fixture_model(DCA)
    t = _tensors(DCA / "d1_N35_cross_chunk.safetensors")
    longctx.patch(model, "dca", target_length=128)
    cache = DynamicCache(config=model.config)
    torch.testing.assert_close(_logits(model, t["input_ids"], **{CACHE: cache}, use_cache=True),
                               t["prefill_logits_nocast"], atol=1e-4, rtol=0)
    steps = [_logits(model, tok.view(1, 1), **{CACHE: cache}, use_cache=True)[0, -1]
             for tok in t["decode_input_tokens"]]
    torch.testing.assert_close(torch.stack(steps), t["decode_logits_nocast"], atol=1e-4, rtol=0)
    ids = t["input_ids"]
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=11, do_sample=False,
                                   pad_token_id=0)
    assert generated[0, ids.shape[1]:].tolist() == t["generated_tokens_nocast"].tolist()


@pytest.mark.parametrize("case, params", [("rerope_len100", {"window": 16}),
                                          ("leaky_len100", {"window": 16, "leaky_factor": 4})])
def test_rerope_prefill_equals_the_official_patches(case, params):
    model = _fixture_model(REROPE, "eager")
    t = _tensors(REROPE / f"{case}.safetensors")
    longctx.patch(model, "rerope", target_length=128, **params)  # log_scale on: the official default
    torch.testing.assert_close(_logits(model, t["input_ids"]), t["logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case, params", [("rerope_len100", {"window": 16}),
                                          ("leaky_len100", {"window": 16, "leaky_factor": 4})])
def test_rerope_cached_decoding_equals_the_official_prefill(case, params):
    """The official decode equals its prefill formula; ours keeps transformers' cache (rotated keys) and gives the
    official prefill logits one token at a time."""
    model = _fixture_model(REROPE)
    t = _tensors(REROPE / f"{case}.safetensors")
    longctx.patch(model, "rerope", **params)
    ids, cache = t["input_ids"], DynamicCache(config=model.config)
    first = _logits(model, ids[:, :60], **{CACHE: cache}, use_cache=True)
    steps = [_logits(model, ids[:, p:p + 1], **{CACHE: cache}, use_cache=True)[0, -1] for p in range(60, 100)]
    got = torch.cat((first[0], torch.stack(steps)))
    torch.testing.assert_close(got, t["logits"][0], atol=1e-4, rtol=0)


# --- properties on every decoder family ---------------------------------------------------------------------
METHODS = {
    "dca": {"chunk_size": 48, "local_window": 8},  # chunks of 40
    "dca-nomscale": {"chunk_size": 48, "local_window": 8, "mscale": False},
    "rerope": {"window": 8},
    "leaky": {"window": 8, "leaky_factor": 4.0},
}


def _patch(model, variant, **extra):
    name = "dca" if variant.startswith("dca") else "rerope"
    return longctx.patch(model, name, **METHODS[variant], **extra)


def _ids(n, batch=1, seed=0):
    return torch.randint(3, 120, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", DECODERS)
def test_short_inputs_are_the_unpatched_model(model_type):
    """Within one DCA chunk (40 tokens) every pair is intra-chunk at its true distance; within the ReRoPE window
    (log scale off) every pair is near: the patched model is the model itself."""
    model = build(model_type)
    for variant, n, extra in (("dca", 40, {}), ("rerope", 8, {"log_scale": False})):
        ids = _ids(n, batch=2)
        before = _logits(model, ids)
        _patch(model, variant, **extra)
        torch.testing.assert_close(_logits(model, ids), before, atol=2e-5, rtol=0)
        longctx.unpatch(model)


@pytest.mark.parametrize("variant", sorted(METHODS))
@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text", "gpt_neox", "phi3"])
def test_left_padded_batch_equals_rows_alone(model_type, variant):
    model = build(model_type)
    _patch(model, variant)
    long, short = _ids(110, seed=1), _ids(70, seed=2)
    batch = torch.zeros(2, 110, dtype=torch.long)
    batch[0], batch[1, 40:] = long[0], short[0]
    mask = torch.ones_like(batch)
    mask[1, :40] = 0
    # positions are the caller's, as for the model itself: a left-padded row counts from its first real token
    # (generate passes these; a plain forward would pass slot numbers)
    out = _logits(model, batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    torch.testing.assert_close(out[0], _logits(model, long)[0], atol=2e-4, rtol=0)
    torch.testing.assert_close(out[1, 40:], _logits(model, short)[0], atol=2e-4, rtol=0)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batched = model.generate(batch, attention_mask=mask, **kw)
        alone = model.generate(short, attention_mask=torch.ones_like(short), **kw)
    assert torch.equal(batched[1, 110:], alone[0, 70:])


@pytest.mark.parametrize("variant", sorted(METHODS))
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma", "mistral"])
def test_chunked_prefill_and_cached_decode_equal_one_shot(model_type, variant):
    """Without mscale every forward is the same function of the positions: chunked prefill (crossing DCA chunks)
    and token-by-token decoding with the cache give the one-shot logits. With DCA's mscale a cached key keeps the
    mscale of the step that wrote it, as the official cache does: only the first chunk of the cache is checked."""
    model = build(model_type)
    _patch(model, variant)
    ids = _ids(120, seed=3)
    full = _logits(model, ids)
    cache = DynamicCache(config=model.config)
    parts = [_logits(model, ids[:, :30], **{CACHE: cache}, use_cache=True)]  # below L: mscale 1
    parts.append(_logits(model, ids[:, 30:57], **{CACHE: cache}, use_cache=True))
    parts += [_logits(model, ids[:, p:p + 1], **{CACHE: cache}, use_cache=True) for p in range(57, 120)]
    chunked = torch.cat(parts, 1)
    if variant == "dca":  # the mscale of 120 tokens scales every pair of the one-shot run; the cached keys carry
        # the mscale of the step that wrote them (1 up to 64 tokens): only the 30-token prefill is the same function
        torch.testing.assert_close(chunked[:, :30], _logits(model, ids[:, :30]), atol=2e-4, rtol=0)
        assert (chunked[:, 65:] - full[:, 65:]).abs().max() > 1e-4
    else:
        torch.testing.assert_close(chunked, full, atol=2e-4, rtol=0)


def test_mscale_of_cached_keys_follows_the_official_state():
    """Each cached key carries m(length when it was written), the query m(current length): one decoding step equals
    attention with those per-key factors (computed here from the one-shot pieces)."""
    from longctx.core.pairmaps import DCAMap, dca_mscale
    from longctx.kernels.pairmap_torch import pairmap_attention_naive

    torch.manual_seed(0)
    q = torch.randn(1, 2, 1, 16)
    k = torch.randn(1, 2, 91, 16)
    v = torch.randn(1, 2, 91, 16)
    # keys 0..89 written by a prefill of 90 tokens (m(90)), key 90 by the step (m(91)); query m(91)
    m = torch.cat((dca_mscale(torch.full((90,), 90), 64), dca_mscale(torch.tensor([91]), 64)))
    pmap = DCAMap(48, 8)
    from longctx.core.rope import default_inv_freq

    inv = default_inv_freq(16, 10000.0)
    pos = torch.arange(91)[None]
    got = pairmap_attention_naive(q * dca_mscale(91, 64), k * m[None, None, :, None], v, pos[:, -1:], pos, inv, pmap,
                                  0.25)
    from longctx.kernels.pairmap_torch import pairmap_attention, variant_keys

    kept = variant_keys(k, pos, inv, pmap, 0) * m[None, None, :, None]
    ours = pairmap_attention(q, k, v, pos[:, -1:], pos, inv, pmap, 0.25, q_scale=dca_mscale(91, 64).view(1, 1),
                             keys={0: kept})
    torch.testing.assert_close(ours, got, atol=1e-5, rtol=0)


def test_encoders_and_bad_geometry_are_refused():
    for name in ("dca", "rerope"):
        with pytest.raises(ValueError, match="causal attention"):
            longctx.patch(build("modernbert"), name, target_length=256)
        assert not longctx.inspect(build("modernbert")).methods.count(name)
    model = build("llama")
    for params, match in (({"chunk_size": 100}, "longer than the trained length"),
                          ({"chunk_size": 16, "local_window": 16}, "local_window < chunk_size"),
                          ({"target_length": 64}, "not longer")):
        with pytest.raises(ValueError, match=match):
            longctx.patch(model, "dca", **params)
    with pytest.raises(ValueError, match="smaller than the trained length"):
        longctx.patch(model, "rerope", window=TRAINED)
    with pytest.raises(ValueError, match=r"rerope: leaky_factor must be a finite number > 1, got 1"):
        longctx.patch(model, "rerope", leaky_factor=1)
    assert not longctx.is_patched(model)


def test_dca_export_writes_vllms_config_and_loads_back(tmp_path):
    model = build("qwen2")
    model.save_pretrained(tmp_path / "src")
    result = longctx.export(tmp_path / "src", tmp_path / "out", "dca", target_length=512, progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert result.form == "longctx" and config["longctx"]["method"] == "dca"
    assert config["dual_chunk_attention_config"] == {"chunk_size": 48, "local_size": 8,
                                                     "original_max_position_embeddings": TRAINED}
    assert config["max_position_embeddings"] == 512 and config["rope_parameters"]["rope_type"] == "default"
    _patch(model, "dca", target_length=512)
    ids = _ids(150)
    torch.testing.assert_close(_logits(longctx.load(tmp_path / "out"), ids), _logits(model, ids), atol=0, rtol=0)
    leaky = longctx.export(tmp_path / "src", tmp_path / "leaky", "rerope", window=8, leaky_factor=4.0,
                           progress=False)
    assert leaky.params["leaky_factor"] == 4.0
    longctx.unpatch(model)
    _patch(model, "leaky")
    torch.testing.assert_close(_logits(longctx.load(tmp_path / "leaky"), ids), _logits(model, ids), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# the Triton backend (on CPU the kernel runs in Triton's interpreter; on a CUDA machine compiled)
# ---------------------------------------------------------------------------------------------------------------
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("variant", sorted(METHODS))
def test_triton_backend_generates_what_the_torch_backend_does(variant):
    """Left-padded prefill (per-row offsets), then q_len = 1 decoding with the cache and the kept rotated keys: the
    same greedy tokens and logits as the PyTorch path, no call falling back."""
    pytest.importorskip("triton")
    import warnings

    model = kernel_llama(DEVICE)
    rows = [_ids(100, seed=1), _ids(70, seed=2)]  # beyond DCA's chunks (40) and the window (8), beyond L = 64
    ids = torch.zeros(2, 100, dtype=torch.long)
    mask = torch.zeros(2, 100, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, 100 - row.shape[1]:], mask[b, 100 - row.shape[1]:] = row[0], 1
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    out = {}
    for backend in ("torch", "triton"):
        info = _patch(model, variant, attn_backend=backend)
        assert info.params["attn_backend"] == backend and f"backend={backend}" in info.notes[0]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")  # no call of this model may fall back to the torch path
            out[backend] = (model.generate(ids, attention_mask=mask, **kw),
                            _logits(model, ids, attention_mask=mask, position_ids=positions))
        longctx.unpatch(model)
    assert torch.equal(out["triton"][0], out["torch"][0])
    real = mask.bool()[:, :, None].expand_as(out["torch"][1])
    torch.testing.assert_close(out["triton"][1][real], out["torch"][1][real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["dca-nomscale", "leaky"])
def test_triton_chunked_prefill_and_cached_decode_equal_one_shot(variant):
    """Chunks crossing DCA's chunk starts, then token-by-token decoding, on the kernel: the one-shot logits."""
    pytest.importorskip("triton")
    model = kernel_llama(DEVICE)
    _patch(model, variant, attn_backend="triton")
    ids = _ids(95, seed=3).to(DEVICE)
    full = _logits(model, ids)
    cache = DynamicCache(config=model.config)
    parts = [_logits(model, ids[:, :30], **{CACHE: cache}, use_cache=True),
             _logits(model, ids[:, 30:87], **{CACHE: cache}, use_cache=True)]
    parts += [_logits(model, ids[:, p:p + 1], **{CACHE: cache}, use_cache=True) for p in range(87, 95)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)


def test_triton_backend_falls_back_with_a_warning_and_auto_stays_torch_on_cpu():
    pytest.importorskip("triton")
    model = build("llama").to(DEVICE)  # head dim 8: not a kernel shape
    ids = _ids(80).to(DEVICE)
    _patch(model, "dca", attn_backend="triton")
    with pytest.warns(UserWarning, match="DCA: this call runs on the torch path, not Triton: head dim 8"):
        patched = _logits(model, ids)
    longctx.unpatch(model)
    _patch(model, "dca", attn_backend="torch")
    torch.testing.assert_close(_logits(model, ids), patched)
    longctx.unpatch(model)
    info = _patch(model.cpu(), "rerope")  # "auto" is the default
    assert info.params["attn_backend"] == "torch" and info.notes[0] == "backend=torch"
