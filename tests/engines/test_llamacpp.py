"""llama.cpp runs longctx's GGUF exports as the patched model: logits over real text (slow-marked).

Needs llama-cpp-python, which builds llama.cpp from source (minutes on 2 cores): ``pip install llama-cpp-python``
(or the wheel cached by ``bench/gguf_llamacpp.py``'s instructions). Under ``--runslow`` a missing llama-cpp-python
fails here, it is not skipped. Tolerances, from ``bench/gguf_llamacpp.json`` (4096 tokens; docs/results.md): f32
≤ 0.01 largest |logit difference| and the same perplexity to 0.1 % (llama.cpp sums in another order and computes its
angles in fp32); f16 the same top-1 token at ≥ 99 % of positions and perplexity within 0.5 %; q8_0 ≥ 94 % and 2 %.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import longctx

pytestmark = pytest.mark.slow


def _llama_cpp():
    import importlib.util

    from longctx.export.gguf import llama_cpp_logits

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python is not installed: pip install llama-cpp-python (it builds llama.cpp)")
    return llama_cpp_logits


def _ppl(logits: np.ndarray, ids: list[int]) -> float:
    return float(torch.exp(torch.nn.functional.cross_entropy(torch.from_numpy(logits[:-1]).double(),
                                                             torch.tensor(ids[1:]))))


LIMITS = {"f32": (1.0, 0.001), "f16": (0.99, 0.005), "q8_0": (0.94, 0.02)}  # top-1 agreement, perplexity rel.


@pytest.mark.parametrize("method", ["pi", "ntk", "yarn", "longrope"])
@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
def test_stories260k_gguf_matches_patched_model(stories_path, tinystories_text, tmp_path, method, gguf_type):
    run = _llama_cpp()
    model = longctx.load(stories_path)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(stories_path)(tinystories_text, add_special_tokens=False)["input_ids"][:4096]
    out = tmp_path / "m.gguf"
    longctx.export(stories_path, out, method, target_length=4096, gguf_type=gguf_type, progress=False)
    with longctx.patched(model, method, target_length=4096), torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    got = run(out, ids, n_ctx=4096)
    top1 = float((expected.argmax(-1) == got.argmax(-1)).mean())
    agree, ppl_tol = LIMITS[gguf_type]
    if gguf_type == "f32":
        assert float(np.abs(expected - got).max()) <= 0.01
    assert top1 >= agree
    assert _ppl(got, ids) == pytest.approx(_ppl(expected, ids), rel=ppl_tol)


def test_verify_runs_llama_cpp(stories_path, tmp_path):
    _llama_cpp()
    result = longctx.export(stories_path, tmp_path / "y.gguf", "yarn", target_length=2048, gguf_type="f32",
                            verify=True, progress=False)
    assert result.verify["top1_agreement"] == 1.0 and result.verify["max_abs_diff"] < 0.01
    assert result.verify["text"] == "the bundled text (Emma)"  # the tokenizer came with the directory
    assert "llama.cpp (llama-cpp-python)" in (tmp_path / "y.gguf.md").read_text()


def test_unserved_rope_would_be_caught(stories_path, tmp_path, monkeypatch):
    """--verify fails, and writes nothing, when the file's rope is not the patched model's (a wrong factor)."""
    _llama_cpp()
    from longctx.export import ExportError
    from longctx.patches import portable

    real = portable.gguf_rope

    def wrong(*args, **kwargs):
        rope = real(*args, **kwargs)
        rope.kv["rope.scaling.factor"] = 2.0
        return rope

    monkeypatch.setattr(portable, "gguf_rope", wrong)
    with pytest.raises(ExportError, match="differ"):
        longctx.export(stories_path, tmp_path / "bad.gguf", "pi", target_length=4096, gguf_type="f32", verify=True,
                       progress=False)
    assert list(tmp_path.iterdir()) == []
