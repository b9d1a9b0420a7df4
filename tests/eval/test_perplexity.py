"""Perplexity windows and token weighting, against a direct computation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build

from longctx.eval.perplexity import perplexity


def _direct(model, ids, length, starts, first_scored):
    nll, count = 0.0, 0
    for i, s in enumerate(starts):
        w = ids[s : s + length][None]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=w).logits[0, :-1].float(), -1)
        token_nll = -logp.gather(1, w[0, 1:, None])[:, 0]
        part = token_nll[first_scored(i):]
        nll += part.sum().item()
        count += part.numel()
    return math.exp(nll / count), count


@pytest.fixture(scope="module")
def model_and_ids():
    torch.manual_seed(0)
    return build("llama"), torch.randint(3, 120, (300,))


def test_non_overlapping_windows(model_and_ids):
    model, ids = model_and_ids
    result = perplexity(model, ids, 64, progress=False)
    ppl, count = _direct(model, ids, 64, [0, 64, 128, 192], lambda i: 0)
    assert result.windows == 4 and result.tokens == count == 4 * 63
    assert result.ppl == pytest.approx(ppl, rel=1e-6)


def test_sliding_window_scores_each_token_once(model_and_ids):
    model, ids = model_and_ids
    result = perplexity(model, ids, 64, stride=16, progress=False)
    starts = list(range(0, 300 - 64 + 1, 16))
    ppl, count = _direct(model, ids, 64, starts, lambda i: 0 if i == 0 else 64 - 16 - 1)
    assert result.tokens == count == 63 + 16 * (len(starts) - 1)
    assert result.ppl == pytest.approx(ppl, rel=1e-6)


def test_split_reports_tokens_past_the_trained_length(model_and_ids):
    model, ids = model_and_ids
    result = perplexity(model, ids, 128, split_at=64, progress=False)
    ppl, count = _direct(model, ids, 128, [0, 128], lambda i: 63)
    assert result.tokens_past_split == count == 2 * 64
    assert result.ppl_past_split == pytest.approx(ppl, rel=1e-6)


def test_bad_arguments(model_and_ids):
    model, ids = model_and_ids
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, ids, 1000, progress=False)
    with pytest.raises(ValueError, match="stride must be"):
        perplexity(model, ids, 64, stride=65, progress=False)
