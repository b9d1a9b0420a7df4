"""SelfExtend through transformers' attention interface: the official LongLM logits, exactness properties on every
family, batching with padding, chunked prefill, cached decoding, errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ENCODERS, FAMILIES, SHARED, TRAINED, build, kernel_llama
from transformers import DynamicCache

from longctx.models import cache_kwarg
import longctx
from longctx.models import NotARopeModelError

CACHE = cache_kwarg()  # the KV-cache keyword of this transformers release

FIXTURE = SHARED / "fixtures" / "selfextend_official"
DECODERS = sorted(k for k in FAMILIES if k not in ENCODERS)
# our fp32 attention vs sdpa's kernels on these deliberately large-logit tiny models: ~1e-5 apart by rounding alone
TOL = dict(atol=1e-4, rtol=1e-4)


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def _ids(n, batch=1, seed=0):
    return torch.randint(3, 120, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def official():
    if not (FIXTURE / "reference.safetensors").exists():
        pytest.skip(f"{FIXTURE} missing")
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    case = json.loads((FIXTURE / "case.json").read_text())
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in case.items() if k != "cases"})).eval()
    model.load_state_dict(load_file(FIXTURE / "model.safetensors"))
    return model, case["cases"], load_file(FIXTURE / "reference.safetensors")


def test_reproduces_official_longlm_logits(official):
    model, cases, ref = official
    for case in cases:
        G, W, n = case["group_size"], case["window"], case["length"]
        ids = ref[f"input_ids_G{G}_W{W}_L{n}"]
        torch.testing.assert_close(_logits(model, ids), ref[f"vanilla_logits_L{n}"], atol=1e-5, rtol=0)
        longctx.patch(model, "selfextend", group_size=G, window=W, shift="float")
        torch.testing.assert_close(_logits(model, ids), ref[f"logits_G{G}_W{W}_L{n}"], atol=1e-5, rtol=0)
        longctx.patch(model, "selfextend", group_size=G, window=W)  # integer shift
        diff = (_logits(model, ids) - ref[f"logits_G{G}_W{W}_L{n}"]).abs().max()
        assert (diff < 1e-5) == (W % G == 0)  # the two shifts only differ when G does not divide W
        longctx.unpatch(model)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_group_one_and_short_inputs_equal_unpatched(model_type):
    model = build(model_type)
    ids = _ids(3 * TRAINED, batch=2)
    short = ids[:, :12]
    original, original_short = _logits(model, ids), _logits(model, short)
    longctx.patch(model, "selfextend", group_size=1, window=16)
    torch.testing.assert_close(_logits(model, ids), original, **TOL)
    longctx.patch(model, "selfextend", group_size=4, window=16)
    torch.testing.assert_close(_logits(model, short), original_short, **TOL)
    assert (_logits(model, ids) - original).abs().max() > 1e-3
    longctx.unpatch(model)
    assert torch.equal(_logits(model, ids), original)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_left_padded_batch_equals_rows_alone(model_type):
    model = build(model_type)
    longctx.patch(model, "selfextend", group_size=4, window=16)
    lengths = [150, 97]
    n = max(lengths)
    rows = [_ids(k, seed=k) for k in lengths]
    causal = model_type not in ENCODERS
    ids = torch.zeros(2, n, dtype=torch.long)
    mask = torch.zeros(2, n, dtype=torch.long)
    for b, (row, k) in enumerate(zip(rows, lengths)):
        sl = slice(n - k, n) if causal else slice(0, k)  # decoders left-pad, encoders right-pad
        ids[b, sl], mask[b, sl] = row[0], 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    kw = {"position_ids": position_ids} if causal else {}
    batched = _logits(model, ids, attention_mask=mask, **kw)
    for b, (row, k) in enumerate(zip(rows, lengths)):
        alone = _logits(model, row)[0]
        got = batched[b, n - k :] if causal else batched[b, :k]
        torch.testing.assert_close(got, alone, **TOL)


@pytest.mark.parametrize("model_type", DECODERS)
def test_chunked_prefill_and_cached_decode_equal_one_shot(model_type):
    model = build(model_type)
    longctx.patch(model, "selfextend", group_size=4, window=16)
    ids = _ids(200)
    full = _logits(model, ids)
    cache = DynamicCache(config=model.config)
    pieces = []
    with torch.no_grad():
        for start, end in [(0, 70), (70, 130), (130, 190)] + [(t, t + 1) for t in range(190, 200)]:
            pieces.append(model(input_ids=ids[:, start:end], **{CACHE: cache}, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, **TOL)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt_neox"])
def test_greedy_generate_with_cache_equals_recompute(model_type):
    model = build(model_type)
    longctx.patch(model, "selfextend", target_length=4 * TRAINED)
    prompt = _ids(TRAINED + 40)
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, use_cache=True, **kw), model.generate(prompt, use_cache=False, **kw))


def test_generate_batch_with_left_padding_equals_rows_alone():
    model = build("qwen2")
    longctx.patch(model, "selfextend", group_size=4, window=16)
    rows = [_ids(120, seed=1), _ids(90, seed=2)]
    ids = torch.zeros(2, 120, dtype=torch.long)
    mask = torch.zeros(2, 120, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, 120 - row.shape[1]:], mask[b, 120 - row.shape[1]:] = row[0], 1
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **kw)
        for b, row in enumerate(rows):
            alone = model.generate(row, **kw)
            assert torch.equal(batched[b, 120:], alone[0, row.shape[1]:])


def test_gemma3_sliding_layers_use_plain_attention():
    model = build("gemma3_text")
    info = longctx.patch(model, "selfextend", group_size=4, window=16)
    assert info.layer_types == ["full_attention"]
    assert model.config._attn_implementation == "longctx_eager"  # the shared dispatcher over the model's own base
    longctx.unpatch(model)
    assert model.config._attn_implementation == "eager"


def test_target_length_solves_group_and_window():
    model = build("llama")
    info = longctx.patch(model, "selfextend", target_length=8 * TRAINED)
    G, W = info.params["group_size"], info.params["window"]
    assert W == TRAINED // 4 and (TRAINED - W) * G + W >= 8 * TRAINED
    assert W + (8 * TRAINED - W) / G <= 2 / 3 * TRAINED
    assert info.target_length == 8 * TRAINED and model.config.max_position_embeddings == 8 * TRAINED


@pytest.mark.parametrize("params,match", [
    ({"group_size": 0, "window": 8}, "group_size must be an integer >= 1"),
    ({"group_size": 4, "window": 0}, "window must be an integer >= 1"),
    ({"group_size": 4, "window": TRAINED}, "must be smaller than the trained length"),
    ({"group_size": 2, "window": 16, "target_length": 1000}, "reach at most"),
    ({"group_size": 4, "window": 16, "shift": "round"}, "shift must be one of 'int', 'float'"),
    ({"group_size": 4, "window": 16, "attn_backend": "cuda"}, "attn_backend must be one of"),
])
def test_errors(params, match):
    model = build("llama")
    with pytest.raises(ValueError, match=match):
        longctx.patch(model, "selfextend", **params)
    assert not longctx.is_patched(model) and model.config._attn_implementation == "sdpa"


def test_non_rope_model_error():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(NotARopeModelError, match="absolute-position"):
        longctx.patch(bert, "selfextend", group_size=4, window=16)


def test_beam_search_with_cache_equals_recompute():
    """Beam search reorders the cache every step: the grouped keys kept on the cache layers must notice and
    recompute (a new key tensor), never reuse another beam's keys."""
    model = build("llama")
    longctx.patch(model, "selfextend", group_size=4, window=16)
    prompt = _ids(TRAINED + 30, seed=5)
    kw = dict(max_new_tokens=8, do_sample=False, num_beams=3, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, use_cache=True, **kw), model.generate(prompt, use_cache=False, **kw))


def test_decode_rotates_only_the_new_keys(monkeypatch):
    """The grouped keys live on the cache layer: prefill rotates all keys once, each decoding step only its own."""
    import longctx.patches.selfextend as se

    model = build("llama")
    longctx.patch(model, "selfextend", group_size=4, window=16)
    rotated = []
    real = se.grouped_keys
    monkeypatch.setattr(se, "grouped_keys", lambda key, *a: rotated.append(key.shape[2]) or real(key, *a))
    ids = _ids(140)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        pieces = [model(input_ids=ids[:, :130], **{CACHE: cache}, use_cache=True).logits]
        for t in range(130, 140):
            pieces.append(model(input_ids=ids[:, t : t + 1], **{CACHE: cache}, use_cache=True).logits)
    layers = model.config.num_hidden_layers
    assert rotated == [130] * layers + [1] * (10 * layers)
    assert getattr(cache.layers[0], "_longctx_kept_keys").length == 140
    torch.testing.assert_close(torch.cat(pieces, 1), _logits(model, ids), **TOL)


def test_cache_edits_recompute_the_grouped_keys():
    """Cropping the cache (as assisted decoding does) or reordering rows replaces its key tensors: the kept grouped
    keys are then stale and must be rebuilt, giving the same logits as a fresh computation."""
    model = build("llama")
    longctx.patch(model, "selfextend", group_size=4, window=16)
    ids = _ids(150, batch=2, seed=3)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :140], **{CACHE: cache}, use_cache=True)
        cache.crop(-20)  # keep the first 120 tokens
        cropped = model(input_ids=ids[:, 120:125], **{CACHE: cache}, use_cache=True).logits
        cache.reorder_cache(torch.tensor([1, 0]))
        swapped = model(input_ids=ids.flip(0)[:, 125:130], **{CACHE: cache}, use_cache=True).logits
    torch.testing.assert_close(cropped, _logits(model, ids[:, :125])[:, 120:], **TOL)
    torch.testing.assert_close(swapped, _logits(model, ids.flip(0)[:, :130])[:, 125:], **TOL)


def _gqa_llama():
    return kernel_llama(DEVICE)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU the kernel runs in Triton's interpreter


def test_triton_backend_generates_what_the_torch_backend_does():
    pytest.importorskip("triton")
    import warnings

    model = _gqa_llama()
    rows = [_ids(100, seed=1), _ids(70, seed=2)]
    ids = torch.zeros(2, 100, dtype=torch.long)
    mask = torch.zeros(2, 100, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, 100 - row.shape[1]:], mask[b, 100 - row.shape[1]:] = row[0], 1
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    vanilla = _logits(model, ids, attention_mask=mask)
    out = {}
    for backend in ("torch", "triton"):
        info = longctx.patch(model, "selfextend", group_size=4, window=16, attn_backend=backend)
        assert info.params["attn_backend"] == backend and f"backend={backend}" in info.notes[0]
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")  # no call of this model may fall back to the torch path
            out[backend] = (model.generate(ids, attention_mask=mask, **kw), _logits(model, ids, attention_mask=mask))
        longctx.unpatch(model)
    assert torch.equal(out["triton"][0], out["torch"][0])  # left-padded prefill, then q_len = 1 decode with a cache
    assert torch.equal(_logits(model, ids, attention_mask=mask), vanilla)  # unpatch restored the model
    real = mask.bool()[:, :, None].expand_as(out["torch"][1])
    torch.testing.assert_close(out["triton"][1][real], out["torch"][1][real], **TOL)



def test_triton_chunked_prefill_extends_the_kept_grouped_keys():
    """Prefill in two chunks (q_len > 16 each) against a cache, a left-padded row with positions counted from its
    first real token (as ``generate`` does): the second chunk's grouped keys are rotated by the kernel's one-pass
    rotation at the layout's row offsets and appended to those kept on the cache layer (padded slots' positions do
    not force a recompute); the logits equal one-shot prefill on the torch path."""
    pytest.importorskip("triton")
    from transformers import DynamicCache

    model = _gqa_llama()
    ids = _ids(90, batch=2, seed=5).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    longctx.patch(model, "selfextend", group_size=4, window=16, attn_backend="torch")
    whole = _logits(model, ids, attention_mask=mask, position_ids=pos)
    longctx.unpatch(model)
    longctx.patch(model, "selfextend", group_size=4, window=16, attn_backend="triton")
    cache = DynamicCache(config=model.config)
    first = _logits(model, ids[:, :50], attention_mask=mask[:, :50], position_ids=pos[:, :50], **{CACHE: cache},
                    use_cache=True)
    kept = cache.layers[0]._longctx_kept_keys
    second = _logits(model, ids[:, 50:], attention_mask=mask, position_ids=pos[:, 50:], **{CACHE: cache},
                     use_cache=True)
    assert cache.layers[0]._longctx_kept_keys is kept and kept.length == 90  # extended, not recomputed
    longctx.unpatch(model)
    real = mask.bool()[:, :, None].expand_as(whole)
    torch.testing.assert_close(torch.cat([first, second], 1)[real], whole[real], **TOL)


def test_torch_decode_of_a_left_padded_batch_extends_the_kept_grouped_keys():
    """A decoding step appends one grouped key per row to those kept on the cache layer even when a row is
    left-padded (its padded slots get another arbitrary position at every step); its logits equal recomputation."""
    from transformers import DynamicCache

    model = _gqa_llama()
    ids = _ids(41, batch=2, seed=6).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    longctx.patch(model, "selfextend", group_size=4, window=8)
    try:
        whole = _logits(model, ids, attention_mask=mask, position_ids=pos)
        cache = DynamicCache(config=model.config)
        _logits(model, ids[:, :40], attention_mask=mask[:, :40], position_ids=pos[:, :40], **{CACHE: cache},
                use_cache=True)
        kept = cache.layers[1]._longctx_kept_keys
        step = _logits(model, ids[:, 40:], attention_mask=mask, position_ids=pos[:, 40:], **{CACHE: cache},
                       use_cache=True)
        assert cache.layers[1]._longctx_kept_keys is kept and kept.length == 41
        torch.testing.assert_close(step[:, -1], whole[:, -1], **TOL)
    finally:
        longctx.unpatch(model)

def test_triton_backend_falls_back_with_a_warning_and_auto_stays_torch_on_cpu():
    pytest.importorskip("triton")
    model = build("llama").to(DEVICE)  # head dim 8: not a kernel shape
    ids = _ids(80).to(DEVICE)
    longctx.patch(model, "selfextend", group_size=4, window=16, attn_backend="triton")
    with pytest.warns(UserWarning, match="torch path, not Triton: head dim 8"):
        patched = _logits(model, ids)
    longctx.unpatch(model)
    torch_path = longctx.patch(model, "selfextend", group_size=4, window=16, attn_backend="torch")
    torch.testing.assert_close(_logits(model, ids), patched)
    longctx.unpatch(model)
    info = longctx.patch(model.cpu(), "selfextend", group_size=4, window=16)  # "auto" is the default
    assert info.params["attn_backend"] == "torch" and info.notes[0] == "backend=torch"
    assert torch_path.params["attn_backend"] == "torch"


def test_backend_without_triton_installed(monkeypatch):
    from longctx.kernels import selfextend_triton

    monkeypatch.setattr(selfextend_triton, "triton", None)
    model = build("llama")
    with pytest.raises(ImportError, match="needs the triton package.*attn_backend='torch' or 'auto'"):
        longctx.patch(model, "selfextend", group_size=4, window=16, attn_backend="triton")
    assert not longctx.is_patched(model)
    info = longctx.patch(model, "selfextend", group_size=4, window=16, attn_backend="auto")
    assert info.params["attn_backend"] == "torch" and "triton is not installed" in info.notes[0]
