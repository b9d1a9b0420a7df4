"""Decode-step time of an attention method (SelfExtend, DCA, ReRoPE …) versus vanilla on SmolLM2-135M-Instruct,
interleaved in one process.

Two copies of the model (one patched) each prefill the same tokens into their own KV cache; then decoding steps
alternate between them and the ratio of the medians is reported. Interleaving cancels what separate processes do
not: the DynamicCache's per-step ``torch.cat`` of the whole cache costs page faults that vary by tens of percent
from process to process (bench/selfextend.py measures prefill and peak memory, each variant in its own process).

    python bench/selfextend_decode.py --lengths 4096,8192,16384 --steps 12
    python bench/selfextend_decode.py --lengths 8192,16384 --method dca
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import longctx
from longctx.loading import load_causal_lm
from longctx.models import cache_kwarg, returned_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,8192,16384")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--method", default="selfextend")
    args = parser.parse_args()
    vanilla, _ = load_causal_lm("smollm2")
    patched, _ = load_causal_lm("smollm2")
    trained = longctx.inspect(vanilla).trained_length
    print(f"variant: {args.method} (longctx defaults for target n + 64) vs vanilla sdpa; decode ms = median of steps")
    print(f"{'tokens':>8}{'vanilla ms':>12}{args.method + ' ms':>15}{'x':>7}")
    for n in [int(x) for x in args.lengths.split(",")]:
        longctx.unpatch(patched)
        longctx.patch(patched, args.method, target_length=max(n + 64, trained + 1))
        ids = torch.randint(10, 40000, (1, n), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            caches = []
            for model in (vanilla, patched):
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                caches.append(returned_cache(out))
            token = out.logits[:, -1:].argmax(-1)
            times: list[list[float]] = [[], []]
            for _ in range(args.steps):
                for i, model in enumerate((vanilla, patched)):
                    start = time.perf_counter()
                    model(input_ids=token, **{cache_kwarg(model): caches[i]}, use_cache=True, logits_to_keep=1)
                    times[i].append(time.perf_counter() - start)
        v, s = statistics.median(times[0]), statistics.median(times[1])
        print(f"{n:>8}{1e3 * v:>12.1f}{1e3 * s:>15.1f}{s / v:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
