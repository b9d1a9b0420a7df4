"""Passkey retrieval by generation on SmolLM2-135M-Instruct (trained 8192): vanilla vs SelfExtend vs a core method.

Each (method, length, depth) is one trial with its own seeded 5-digit key; results are appended to a JSONL file as
they finish (a long CPU run can be stopped and still reported) and summarised as accuracy per method × length.

    python bench/passkey_smollm2.py --out results/passkey_smollm2.jsonl \\
        --runs selfextend:16384 vanilla:16384 selfextend:12288 vanilla:12288 vanilla:8192 yarn:16384
    # a second round of fresh keys at other depths, appended to the same file
    python bench/passkey_smollm2.py --round 1 --depths 0.0,0.2,0.4,0.6,0.8 --runs ...
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import longctx
from longctx.eval.passkey import passkey_grid
from longctx.loading import load_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--runs", nargs="+", default=["selfextend:16384", "vanilla:16384"],
                        help="METHOD:LENGTH pairs, run in this order")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--round", type=int, default=0,
                        help="trial round: round K seeds its keys with 1000*length + 100*K + depth index, so a new round "
                             "adds fresh trials to the same --out file")
    parser.add_argument("--out", type=Path, default=Path("results/passkey_smollm2.jsonl"))
    parser.add_argument("--summary", action="store_true", help="only summarise an existing --out file")
    args = parser.parse_args()

    if not args.summary:
        model, tokenizer = load_causal_lm(args.model)
        trained = longctx.inspect(model).trained_length
        depths = [float(d) for d in args.depths.split(",")]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for run in args.runs:
            method, _, length = run.partition(":")
            length = int(length)
            longctx.unpatch(model)
            info = None
            if method != "vanilla":
                info = longctx.patch(model, method, target_length=max(length, trained + 1))
            for i, depth in enumerate(depths):
                start = time.time()
                trial = passkey_grid(model, tokenizer, [length], [depth], seed=1000 * length + 100 * args.round + i, progress=False)[0]
                row = {"method": method, "params": info.params if info else {}, **trial.to_dict(),
                       "seconds": round(time.time() - start, 1)}
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
        longctx.unpatch(model)

    cells = defaultdict(list)
    for line in args.out.read_text().splitlines():
        row = json.loads(line)
        cells[(row["method"], row["length"])].append(row["correct"])
    print(f"{'method':<12}{'length':>8}{'accuracy':>10}{'trials':>8}")
    for (method, length), hits in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{method:<12}{length:>8}{sum(hits) / len(hits):>10.0%}{len(hits):>8}")


if __name__ == "__main__":
    main()
