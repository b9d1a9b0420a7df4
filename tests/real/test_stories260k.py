"""stories260K (real llama2.c weights, trained at 512) on held-out TinyStories text: perplexity versus length.

Fast enough for every CI run (15.5k tokens, four lengths, five variants). The table it produces is the one in README and docs/results.md
(regenerate it with ``longctx eval ppl --model ../shared/models/stories260K --text
../shared/data/tinystories/tinystories_valid_subset.txt --lengths 512,1024,2048,4096
--compare vanilla,pi,ntk,dynamic_ntk,yarn,selfextend,clex --max-windows 0 --param selfextend.group_size=16
--param selfextend.window=128``).
"""

from __future__ import annotations

import pytest
import torch

import longctx
from longctx.eval.perplexity import ppl_table, token_ids

METHODS = ["vanilla", "pi", "ntk", "dynamic_ntk", "yarn", "selfextend", "clex"]
SELFEXTEND = {"selfextend": {"group_size": 16, "window": 128}}


@pytest.fixture(scope="module")
def stories(stories_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    return model, tokenizer


@pytest.fixture(scope="module")
def valid_ids(stories, stories_path):
    text = (stories_path.parents[1] / "data" / "tinystories" / "tinystories_valid_subset.txt")
    if not text.exists():
        pytest.skip(f"{text} missing")
    return token_ids(stories[1], text.read_text())


def test_ppl_versus_length(stories, valid_ids):
    model, _ = stories
    torch.set_num_threads(2)
    rows = ppl_table(model, valid_ids, METHODS, [512, 1024, 2048, 4096], method_params=SELFEXTEND, progress=False)
    table = {(r["method"], r["length"]): r["ppl"] for r in rows}
    print("\n".join(f"{m:>12} {n:>5} {p:8.2f}" for (m, n), p in table.items()))

    # 1x: the value documented for this model and text in ../shared/README.md
    assert table[("vanilla", 512)] == pytest.approx(5.56, abs=0.02)
    # 8x (4096 tokens): vanilla blows up; the best extension is clearly below it
    vanilla_8x = table[("vanilla", 4096)]
    best_8x = min(table[(m, 4096)] for m in METHODS[1:])
    assert vanilla_8x > 4 * table[("vanilla", 512)]
    assert best_8x < 0.5 * vanilla_8x
    # SelfExtend (G=16, W=128) at 4x and 8x stays within 10% of the 1x perplexity
    for n in (2048, 4096):
        assert table[("selfextend", n)] < 1.10 * table[("vanilla", 512)]
    # training-free CLEX (NTK with alpha = 2t - 1: over-scaled next to ntk's alpha = s) still stays below vanilla at 8x
    assert table[("clex", 4096)] < 0.7 * vanilla_8x
    # and the model is left unpatched
    assert not longctx.is_patched(model)


def test_real_model_unpatch_is_bit_exact(stories, valid_ids):
    model, _ = stories
    ids = valid_ids[:1500][None]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    for method, params in [("pi", {}), ("ntk", {}), ("dynamic_ntk", {}), ("yarn", {}),
                           ("selfextend", {"group_size": 4, "window": 128})]:
        longctx.patch(model, method, factor=4, **params) if method != "selfextend" else longctx.patch(
            model, method, **params)
        with torch.no_grad():
            patched = model(input_ids=ids).logits
        assert (patched - before).abs().max() > 1e-2
        longctx.unpatch(model)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, before)
