"""STRING: the official code's outputs (each-key-once rule), the map against its definition, prefill / cached decoding
agreement, defaults solved from the trained and target length, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHARED, TRAINED, build
from safetensors.torch import load_file

import longctx
from longctx.core.pairmaps import STRING_ATTENTION_FACTOR, STRINGMap, string_geometry
from longctx.models import cache_kwarg

FIXTURE = SHARED / "fixtures" / "string_official"
CACHE = cache_kwarg()


@pytest.fixture(scope="module")
def cases():
    if not (FIXTURE / "cases.json").exists():
        pytest.skip(f"{FIXTURE} missing (shared/ is laid out beside the repo in CI)")
    return json.loads((FIXTURE / "cases.json").read_text())


def _official_model(model_dir: str):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(FIXTURE / model_dir, dtype=torch.float32,
                                            attn_implementation="sdpa").eval()


def _patch(model, case):
    return longctx.patch(model, "string", shifted_offset=case["shifted_offset"],
                         local_window=case["small_local_value"], attn_backend="torch")


def test_prefill_equals_the_official_each_key_once_logits(cases):
    """Both prefill cases (MHA and GQA): the each-key-once tensors within 2e-4 in fp32; the official prefill's
    duplicated key at d = S is what sets it apart (more than 1 away)."""
    for case in cases["prefill"]:
        ref = load_file(str(FIXTURE / case["file"]))
        model = _official_model(case["model_dir"])
        _patch(model, case)
        with torch.no_grad():
            logits = model(input_ids=ref["input_ids"]).logits
        assert (logits - ref["logits_nodup"]).abs().max() < 2e-4, case["name"]
        assert (logits - ref["logits"]).abs().max() > 1.0, case["name"]  # the duplicate is not reproduced


def test_cached_decoding_equals_the_official_decode(cases):
    """The official decode rule (each key once), fed through transformers' standard cache: its logits within 2e-4 and
    its greedy tokens exactly."""
    case = cases["decode"][0]
    ref = load_file(str(FIXTURE / case["file"]))
    model = _official_model(case["model_dir"])
    _patch(model, case)
    n = ref["input_ids"].shape[1]
    with torch.no_grad():
        out = model(input_ids=ref["input_ids"], use_cache=True)
        assert (out.logits - ref["prefill_logits_nodup"]).abs().max() < 2e-4
        cache, steps = out.past_key_values if CACHE == "past_key_values" else out.cache, []
        for k, token in enumerate(ref["decode_input_tokens_nodup"]):
            step = model(input_ids=token.view(1, 1), position_ids=torch.tensor([[n + k]]), **{CACHE: cache},
                         use_cache=True)
            steps.append(step.logits[0, -1])
        generated = model.generate(ref["input_ids"], attention_mask=torch.ones_like(ref["input_ids"]),
                                   max_new_tokens=9, do_sample=False)
    assert (torch.stack(steps) - ref["decode_logits_nodup"]).abs().max() < 2e-4
    assert generated[0, n:].tolist() == ref["generated_tokens_nodup"].tolist()


def test_the_map_is_its_definition():
    pmap = STRINGMap(shifted_offset=21, local_window=4)
    i = torch.arange(64)[:, None]
    j = torch.arange(64)[None]
    rel = pmap.relative(i, j)
    d = (i - j).double()
    expected = torch.where(d < 21, d, d - 21 + 4)
    causal = j <= i
    assert torch.equal(rel[causal], expected[causal])
    for b in (0, 1):  # each branch's keys are one interval per query
        lo, hi = pmap.intervals(b, torch.arange(64))
        for q in range(64):
            keys = [k for k in range(q + 1) if pmap.branch(torch.tensor(q), torch.tensor(k)) == b]
            assert keys == list(range(int(lo[q]), int(hi[q])))


def test_defaults_follow_the_trained_and_target_length():
    assert string_geometry(4096) == (1351, 128)  # S = int(0.33 L), W = 128
    assert string_geometry(64) == (21, 5)  # W capped at S // 4 for a small L
    S, W = string_geometry(4096, target_length=6000)  # past the reach L + S - W: S solved
    assert S == 6000 - 4096 + W and 4096 + S - W == 6000
    with pytest.raises(ValueError, match="smaller than the trained length"):
        string_geometry(4096, target_length=9000)  # STRING reaches less than 2L
    with pytest.raises(ValueError, match="local_window < shifted_offset"):
        string_geometry(64, 8, 8)
    with pytest.raises(ValueError, match="reach 76 tokens"):
        string_geometry(64, 16, 4, target_length=100)


def test_within_the_near_window_the_model_is_unchanged_but_for_the_factor():
    """Inputs shorter than S: plain attention; with attention_factor=1 the unpatched model itself."""
    model = build("llama")
    ids = torch.randint(4, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        longctx.patch(model, "string", shifted_offset=21, local_window=4, attention_factor=1.0)
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=2e-5, rtol=0)
        info = longctx.patch(model, "string", shifted_offset=21, local_window=4)
        assert (model(input_ids=ids).logits - before).abs().max() > 1e-3  # scores x af^2
    assert info.params["attention_factor"] == pytest.approx(STRING_ATTENTION_FACTOR)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "gpt_neox", "phi3"])
def test_padding_chunked_prefill_and_cached_decoding(family):
    """A left-padded batch equals its rows alone; chunked prefill and cached decoding equal one shot."""
    model = build(family)
    longctx.patch(model, "string", shifted_offset=TRAINED // 4, local_window=TRAINED // 16)
    ids = torch.randint(4, 100, (2, 90), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(input_ids=ids).logits
        mask = torch.ones_like(ids)
        mask[0, :7] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        padded = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        alone = model(input_ids=ids[:1, 7:]).logits
        torch.testing.assert_close(padded[0, 7:], alone[0], atol=2e-5, rtol=0)
        out = model(input_ids=ids[:, :40], use_cache=True)
        cache = out.past_key_values if CACHE == "past_key_values" else out.cache
        parts = [out.logits, model(input_ids=ids[:, 40:70], **{CACHE: cache}, use_cache=True).logits]
        parts += [model(input_ids=ids[:, t:t + 1], **{CACHE: cache}, use_cache=True).logits for t in range(70, 90)]
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=2e-5, rtol=0)


def test_bad_geometry_and_encoders_are_refused():
    model = build("llama")
    for params, message in (({"shifted_offset": 64}, "smaller than the trained length"),
                            ({"shifted_offset": 8, "local_window": 8}, "local_window < shifted_offset"),
                            ({"target_length": 500}, "smaller than the trained length")):
        with pytest.raises(ValueError, match=message):
            longctx.patch(model, "string", **params)
        assert not longctx.is_patched(model)
    with pytest.raises(ValueError, match="causal attention"):
        longctx.patch(build("modernbert"), "string")
