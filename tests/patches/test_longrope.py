"""``longrope``: per-dimension factors as transformers' own ``longrope`` rope type — equal to a model built with that
config (long and short inputs), NTK's factors by default, refusals naming the expected length."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import TRAINED, build

import longctx
from longctx.core.rope import ntk_factors

LONG = [1.0, 1.7, 3.1, 5.0]
SHORT = [1.0, 1.0, 1.1, 1.3]


def _logits(model, n: int) -> torch.Tensor:
    ids = torch.randint(4, 100, (1, n), generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["llama", "phi3", "qwen2"])
def test_equals_a_model_built_with_the_longrope_config(family):
    """The patch against transformers' own longrope (Phi-3's form): the same config built from scratch with the same
    weights; short factors within the trained length, long ones past it; the attention factor from s and L."""
    model = build(family)
    reference = build(family, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0,
                                               "long_factor": LONG, "short_factor": SHORT,
                                               "original_max_position_embeddings": TRAINED},
                      state_dict=model.state_dict(), max_position_embeddings=4 * TRAINED,
                      original_max_position_embeddings=TRAINED)
    info = longctx.patch(model, "longrope", factor=4.0, long_factor=LONG, short_factor=SHORT)
    assert info.form == "config" and model.config.rope_parameters["rope_type"] == "longrope"
    for n in (TRAINED // 2, 3 * TRAINED):
        torch.testing.assert_close(_logits(model, n), _logits(reference, n), atol=1e-5, rtol=0)
    rotary = model.model.rotary_emb
    assert rotary.attention_scaling == pytest.approx(math.sqrt(1 + math.log(4.0) / math.log(TRAINED)))


def test_default_factors_are_static_ntk_per_dimension():
    assert ntk_factors(8, 4.0) == pytest.approx([1.0, 4 ** (1 / 3), 4 ** (2 / 3), 4.0])
    model = build("llama")
    ntk = copy.deepcopy(model)
    longctx.patch(ntk, "ntk", factor=4.0)
    before_short = _logits(model, TRAINED // 2)
    longctx.patch(model, "longrope", factor=4.0, attention_factor=1.0)
    torch.testing.assert_close(_logits(model, 3 * TRAINED), _logits(ntk, 3 * TRAINED), atol=2e-5, rtol=0)
    torch.testing.assert_close(_logits(model, TRAINED // 2), before_short, atol=1e-6, rtol=0)  # short: as trained
    longctx.unpatch(model)
    assert torch.equal(_logits(model, TRAINED // 2), before_short)


def test_factor_lists_are_checked():
    model = build("llama")
    with pytest.raises(ValueError, match=r"long_factor needs one factor per rotary dimension pair \(4 for a rotary "
                                         r"dim of 8\), got 3"):
        longctx.patch(model, "longrope", factor=4.0, long_factor=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="longrope: short_factor must be a non-empty list of finite numbers each > 0"):
        longctx.patch(model, "longrope", factor=4.0, short_factor=[1.0, 0.0, 1.0, 1.0])
    assert not longctx.is_patched(model)
    # a partial-rotary model counts its rotary dims: GPT-NeoX with rotary_pct 0.5 has 2 pairs
    neox = build("gpt_neox")
    info = longctx.patch(neox, "longrope", factor=4.0, long_factor=[1.0, 4.0])
    assert neox.config.rope_parameters["long_factor"] == [1.0, 4.0] and info.params["long_factor"] == [1.0, 4.0]
