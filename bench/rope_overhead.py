"""Forward-time overhead of the frequency methods: patched ÷ vanilla at 4× the trained length.

Median of ``--runs`` timed forwards per variant, interleaved (vanilla, method, vanilla, method, …) in one process so
that drift hits both alike. Goal: ratio ≤ 1.02 (the methods only change the rotary frequencies).

    python bench/rope_overhead.py --model ../shared/models/stories260K --runs 7
    python bench/rope_overhead.py --model smollm2 --multiple 1 --runs 5      # 8k on the embedded default model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import longctx
from longctx.loading import load_causal_lm

METHODS = ["pi", "ntk", "dynamic_ntk", "dynamic_ntk+consistent", "yarn"]


def _forward_time(model, ids) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "models",
                                                         "stories260K"))
    parser.add_argument("--multiple", type=float, default=4.0, help="sequence length = multiple × trained length")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    model, _ = load_causal_lm(args.model)
    trained = longctx.inspect(model).trained_length
    n = int(args.multiple * trained)
    ids = torch.randint(10, model.config.vocab_size - 1, (1, n), generator=torch.Generator().manual_seed(0))
    results = {}
    for name in METHODS:
        method, _, variant = name.partition("+")
        params = {"cache_consistent": True} if variant == "consistent" else {}
        target = max(n, int(trained * 1.01) + 1)
        vanilla, patched = [], []
        _forward_time(model, ids)  # warm-up
        for _ in range(args.runs):
            longctx.unpatch(model)
            vanilla.append(_forward_time(model, ids))
            longctx.patch(model, method, target_length=target, **params)
            patched.append(_forward_time(model, ids))
        longctx.unpatch(model)
        v, p = statistics.median(vanilla), statistics.median(patched)
        results[name] = {"vanilla_ms": 1e3 * v, "patched_ms": 1e3 * p, "ratio": p / v}
    header = f"model {args.model} | tokens {n} ({args.multiple:g}x trained {trained}) | runs {args.runs} | " \
             f"threads {torch.get_num_threads()} | torch {torch.__version__}"
    if args.json:
        print(json.dumps({"header": header, "results": results}, indent=2))
        return
    print(header)
    print(f"{'method':<24}{'vanilla ms':>12}{'patched ms':>12}{'ratio':>8}")
    for name, r in results.items():
        print(f"{name:<24}{r['vanilla_ms']:>12.1f}{r['patched_ms']:>12.1f}{r['ratio']:>8.3f}")


if __name__ == "__main__":
    main()
