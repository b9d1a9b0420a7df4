"""The attention methods with their defaults against the same methods tuned by ``longctx.search``, per length.

For each length N and method: the method patched with its defaults at N, then ``longctx.search`` on the tuning text
(``--tune-text``, ``--tune-windows`` windows of N, bounded by ``--budget`` seconds and ``--max-trials`` candidates per
method and length), and both measured on every window of N of the evaluation text (``--text``; also on the
held-out file ``--heldout`` where it holds a window of N). A method that cannot reach N (STRING past 2L) is listed
with its reason. Writes JSON (every figure, the tuned parameters, each search's cost) and prints a markdown table.

    python bench/tuned_sweep.py --out bench/tuned_sweep.stories260k.json      # stories260K, 1.5x ... 64x
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "stories260K"))
    ap.add_argument("--text", default=str(SHARED / "data" / "tinystories"))
    ap.add_argument("--heldout", default=str(SHARED / "data" / "tinystories" / "tinystories_valid_subset.txt"))
    ap.add_argument("--tune-text", default=str(SHARED / "data" / "tinystories" / "tinystories_a.txt"))
    ap.add_argument("--lengths", default="768,4096,8192,16384,32768")
    ap.add_argument("--methods", default="selfextend,dca,rerope,string")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds per method and length")
    ap.add_argument("--max-trials", type=int, default=24, help="candidates per method and length (seeds included)")
    ap.add_argument("--tune-windows", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import torch

    import longctx
    from longctx.cli.common import read_text
    from longctx.eval.perplexity import perplexity, token_ids
    from longctx.loading import load_model

    warnings.simplefilter("ignore")  # the target-length warning is not what this measures
    torch.manual_seed(0)
    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    L = longctx.inspect(model).trained_length
    ids = token_ids(tok, read_text(args.text))
    heldout = token_ids(tok, read_text(args.heldout))
    tune_ids = token_ids(tok, read_text(args.tune_text))
    lengths = [int(x) for x in args.lengths.split(",")]
    methods = args.methods.split(",")
    t_all = time.perf_counter()
    print(f"{Path(args.model).name}: trained {L}; evaluation text {ids.numel()} tokens, held-out {heldout.numel()}, "
          f"tuning text {tune_ids.numel()}", flush=True)

    def measure(n: int) -> dict:
        out = {"ppl": perplexity(model, ids, n, progress=False).ppl}
        if heldout.numel() >= n:
            out["heldout"] = perplexity(model, heldout, n, progress=False).ppl
        return out

    rows = [{"length": L, "method": "vanilla", "variant": "1x", **measure(L)}]
    print(f"vanilla @{L}: {rows[-1]['ppl']:.3f}", flush=True)
    for n in lengths:
        rows.append({"length": n, "method": "vanilla", "variant": "-", **measure(n)})
        print(f"vanilla @{n}: {rows[-1]['ppl']:.3f}", flush=True)
        for method in methods:
            try:
                with longctx.patched(model, method, target_length=n) as info:
                    row = {"length": n, "method": method, "variant": "default", "params": info.params, **measure(n)}
            except ValueError as e:
                rows.append({"length": n, "method": method, "variant": "refused", "why": " ".join(str(e).split())})
                print(f"{method} @{n}: refused ({rows[-1]['why'][:100]})", flush=True)
                continue
            rows.append(row)
            print(f"{method} @{n} default {row['params']}: {row['ppl']:.3f}", flush=True)
            found = longctx.search(model, method, target_length=n, ids=tune_ids, windows=args.tune_windows,
                                   budget_s=args.budget, max_trials=args.max_trials, seed=0)
            cost = {"candidates": len(found.rows), "refused": sum(r["ppl"] is None for r in found.rows),
                    "seconds": round(found.seconds, 1), "stopped": found.stopped,
                    "tune_default": found.rows[0]["ppl"], "tune_best": found.best["ppl"]}
            with longctx.patched(model, method, **found.params) as info:
                tuned = {"length": n, "method": method, "variant": "tuned", "params": found.params,
                         "resolved": {k: v for k, v in info.params.items() if k != "attn_backend"}, "search": cost,
                         **measure(n)}
            rows.append(tuned)
            print(f"{method} @{n} tuned {tuned['resolved']}: {tuned['ppl']:.3f} ({cost['candidates']} candidates, "
                  f"{cost['seconds']:.0f} s)", flush=True)
        args.out.write_text(json.dumps({"model": args.model, "trained_length": L, "rows": rows,
                                        "seconds": time.perf_counter() - t_all, "argv": sys.argv[1:]}, indent=1))
    print(table(rows, L, lengths, methods))
    print(f"total {time.perf_counter() - t_all:.0f} s", flush=True)


def table(rows: list[dict], L: int, lengths: list[int], methods: list[str]) -> str:
    one = next(r["ppl"] for r in rows if r["variant"] == "1x")
    head = "| length (×trained) | vanilla | " + " | ".join(f"{m} default | {m} tuned" for m in methods) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(methods))]
    for n in lengths:
        cells = [f"{n} ({n / L:g}×)", f"{_get(rows, n, 'vanilla', '-'):.2f}"]
        for m in methods:
            for variant in ("default", "tuned"):
                value = _get(rows, n, m, variant)
                cells.append("refused (reach)" if value is None else f"{value:.2f} ({value / one:.2f}×)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n(1× perplexity at {L}: {one:.3f}; (r×) = ppl / 1× ppl)"


def _get(rows: list[dict], n: int, method: str, variant: str) -> float | None:
    row = next((r for r in rows if r["length"] == n and r["method"] == method and r["variant"] == variant), None)
    return None if row is None else row["ppl"]


if __name__ == "__main__":
    main()
