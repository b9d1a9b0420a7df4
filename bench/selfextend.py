"""Attention methods (SelfExtend, DCA, ReRoPE …) versus vanilla SDPA on SmolLM2-135M-Instruct: prefill time, peak
memory, decode-step time.

Each (variant, length) runs in its own subprocess so that peak memory is that run's alone (CPU: the child's max
RSS from wait4; CUDA: torch.cuda.max_memory_allocated). Ratios are to vanilla SDPA at the same length, same run.
Variants: ``vanilla`` (sdpa), each of ``--methods`` (longctx, default parameters for the target n + steps), and for
SelfExtend ``naive`` (two full q×kv maps: LongLM's formulation, kept as the test oracle; skipped above --naive-max
tokens, where its maps alone outgrow memory).

    python bench/selfextend.py --lengths 4096,8192,16384
    python bench/selfextend.py --lengths 8192,16384 --methods dca,rerope --naive-max 0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, statistics, sys, time, torch
import longctx
from longctx.loading import load_causal_lm
from longctx.models import cache_kwarg, returned_cache
variant, n, steps, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
model, _ = load_causal_lm("smollm2", device=None if device == "cpu" else device)
trained = longctx.inspect(model).trained_length
if variant != "vanilla":
    longctx.patch(model, "selfextend" if variant == "naive" else variant, target_length=max(n + steps, trained + 1))
if variant == "naive":
    import longctx.kernels.selfextend_torch as k
    import longctx.patches.selfextend as p
    p.selfextend_attention = lambda *a, block_size=None, grouped_key=None, **kw: k.selfextend_attention_naive(*a, **kw)
ids = torch.randint(10, 40000, (1, n), generator=torch.Generator().manual_seed(0)).to(model.device)
sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
if device != "cpu":
    torch.cuda.reset_peak_memory_stats()
with torch.no_grad():
    sync(); t = time.perf_counter()
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # as generate() prefills
    sync(); prefill = time.perf_counter() - t
    cache, token, times = returned_cache(out), out.logits[:, -1:].argmax(-1), []
    for _ in range(steps):
        sync(); t = time.perf_counter()
        out = model(input_ids=token, **{cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1)
        sync(); times.append(time.perf_counter() - t)
        token = out.logits[:, -1:].argmax(-1)
peak = torch.cuda.max_memory_allocated() if device != "cpu" else None
print(json.dumps({"prefill_s": prefill, "decode_s": statistics.median(times), "peak_cuda": peak}))
"""


def run(variant: str, n: int, steps: int, device: str) -> dict:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, variant, str(n), str(steps), device],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        return {"error": f"exit status {status}"}
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_bytes"] = result.pop("peak_cuda") or usage.ru_maxrss * 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,8192,16384")
    parser.add_argument("--steps", type=int, default=20, help="decode steps timed (median) after the prefill")
    parser.add_argument("--naive-max", type=int, default=8192)
    parser.add_argument("--methods", default="selfextend", help="comma-separated attention methods to time")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    args = parser.parse_args()
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        base = run("vanilla", n, args.steps, args.device)
        rows.append(("vanilla", n, base, base))
        variants = args.methods.split(",") + (["naive"] if "selfextend" in args.methods.split(",") else [])
        for variant in variants:
            if variant == "naive" and n > args.naive_max:
                continue
            rows.append((variant, n, run(variant, n, args.steps, args.device), base))
    print(f"device {args.device} | SmolLM2-135M-Instruct fp32 | decode: median of {args.steps} steps after prefill")
    print(f"{'variant':<12}{'tokens':>8}{'prefill s':>11}{'x':>7}{'peak MB':>10}{'x':>7}{'decode ms':>11}{'x':>7}")
    for variant, n, r, b in rows:
        if "error" in r:
            print(f"{variant:<12}{n:>8}  {r['error']}")
            continue
        print(f"{variant:<12}{n:>8}{r['prefill_s']:>11.2f}{r['prefill_s'] / b['prefill_s']:>7.2f}"
              f"{r['peak_bytes'] / 2**20:>10.0f}{r['peak_bytes'] / b['peak_bytes']:>7.2f}"
              f"{1e3 * r['decode_s']:>11.1f}{r['decode_s'] / b['decode_s']:>7.2f}")


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
