"""Does llama.cpp run longctx's GGUF exports as the patched model? Logits over real text, per method and tensor type.

For each model (stories260K from its Hugging Face directory; SmolLM2-135M from its Q4_1 ``.gguf``) and each method
(pi, ntk, yarn, longrope) this exports ``OUT.gguf`` with ``longctx.export`` at each ``--gguf-type`` (SmolLM2 also
with its source's own tensor types), runs ``--tokens`` tokens of real text through llama.cpp (llama-cpp-python,
f32 KV cache) and through the patched model in memory (transformers, fp32), and reports the largest and the mean
|logit difference|, the top-1 agreement and both perplexities.

    pip install llama-cpp-python        # builds llama.cpp from source (minutes, 2 cores); cache the wheel
    python bench/gguf_llamacpp.py --out bench/gguf_llamacpp.json

The tests check the same with fewer tokens (``tests/engines/test_llamacpp.py``, slow-marked).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LONGCTX_SHARED", ROOT.parent / "shared"))
MODELS = {
    "stories260K": (str(SHARED / "models" / "stories260K"), SHARED / "data" / "tinystories" / "tinystories_a.txt"),
    "smollm2": ("smollm2", SHARED / "data" / "gutenberg" / "austen-emma.txt"),
}


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    x = torch.from_numpy(logits[:-1]).double()
    target = torch.tensor(ids[1:])
    return float(torch.exp(torch.nn.functional.cross_entropy(x, target)))


def run(model_name: str, methods: list[str], types: list[str | None], tokens: int, factor: float) -> list[dict]:
    import longctx
    from longctx.export.gguf import llama_cpp_logits
    from longctx.loading import load_causal_lm

    src, text = MODELS[model_name]
    model, tokenizer = load_causal_lm(src)
    ids = tokenizer(text.read_text(), add_special_tokens=False)["input_ids"][:tokens]
    trained = longctx.inspect(model).trained_length
    target = int(trained * factor)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            with longctx.patched(model, method, target_length=target):
                with torch.no_grad():
                    expected = model(torch.tensor([ids])).logits[0].float().numpy()
            for gguf_type in types:
                out = Path(tmp) / f"{method}-{gguf_type}.gguf"
                start = time.time()
                result = longctx.export(src, out, method, target_length=target, gguf_type=gguf_type, progress=False)
                # llama.cpp picks longrope's factor set by its context size, transformers by the input's length: a
                # context of the input's own size when it is within the trained length, as a user running it sees
                n_ctx = target if len(ids) > trained else len(ids)
                got = llama_cpp_logits(out, ids, n_ctx=n_ctx)
                diff = np.abs(expected - got)
                row = {"model": model_name, "method": method, "gguf_type": result.config["gguf_type"],
                       "trained": trained, "target": target, "tokens": len(ids), "n_ctx": n_ctx,
                       "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                       "max_abs_logit": float(np.abs(expected).max()),
                       "top1_agreement": float((expected.argmax(-1) == got.argmax(-1)).mean()),
                       "ppl_transformers": perplexity(expected, ids), "ppl_llamacpp": perplexity(got, ids),
                       "rope_keys": {k: v for k, v in result.config.items() if "rope" in k},
                       "file_mb": round(out.stat().st_size / 2**20, 2), "seconds": round(time.time() - start, 1)}
                rows.append(row)
                print(f"{model_name:12s} {method:9s} {row['gguf_type']:12s} max|Δ| {row['max_abs_diff']:.3g} "
                      f"mean|Δ| {row['mean_abs_diff']:.3g} top-1 {row['top1_agreement']:.1%} ppl "
                      f"{row['ppl_transformers']:.3f} / {row['ppl_llamacpp']:.3f}", flush=True)
                out.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="stories260K,smollm2")
    parser.add_argument("--methods", default="pi,ntk,yarn,longrope")
    parser.add_argument("--types", default="f32,f16,q8_0")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--factor", type=float, default=2.0, help="target = trained length × factor (stories260K: "
                                                                   "at least tokens / 512)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--merge", action="store_true", help="replace the rows of --out that this run measures "
                                                              "(same model, method, type and tokens), keep the rest")
    args = parser.parse_args()
    import llama_cpp

    rows = []
    start = time.time()
    for name in args.models.split(","):
        types: list[str | None] = list(args.types.split(","))
        if MODELS[name][0].endswith(".gguf") or name == "smollm2":
            types.append(None)  # the source's own tensor types (Q4_1 / Q8_0)
        factor = max(args.factor, args.tokens / 512) if name == "stories260K" else args.factor
        rows += run(name, args.methods.split(","), types, args.tokens, factor)
    report = {"command": " ".join(["python", "bench/gguf_llamacpp.py"] + sys.argv[1:]),
              "llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "seconds": round(time.time() - start),
              "rows": rows}
    if args.out and args.merge and args.out.exists():
        old = json.loads(args.out.read_text())
        key = lambda r: (r["model"], r["method"], r["gguf_type"], r["tokens"])  # noqa: E731
        new = {key(r) for r in rows}
        report["rows"] = [r for r in old["rows"] if key(r) not in new] + rows
        report["command"] = old["command"] + " ; " + report["command"]
        report["seconds"] += old.get("seconds", 0)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
