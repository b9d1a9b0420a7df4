"""SelfExtend's Triton kernel against the fastest vanilla attention torch has, on one CUDA GPU, in one run.

Prints ``n, dtype, backend, ms, ratio`` (ratio to the fastest torch SDPA backend measured in the same run at the same
shape) and writes JSON. Sections (``--sections``):

- ``prefill``: batch 1, 32 heads × 128, causal, W = 1024, G = 8 (G and W do not change the work), bf16 and fp16 at
  8k / 32k / 64k: SDPA's flash, efficient and cuDNN backends (the fastest is the reference), the kernel at G = 1
  (plain flash attention: the fair baseline), the SelfExtend kernel as a model layer calls it (the grouped-key
  rotation included; the row layout kept from the forward's first layer) and as one whole call (``+layout``: the
  layout check and its device sync too), and longctx's torch path for SelfExtend where it fits. The kernel's output
  is compared with the torch path's at 8k (max abs difference, same dtype).
- ``decode``: one query against a 32k and a 128k cache, GQA 32 / 8, bf16: SDPA (enable_gqa) vs the kernel
  (split over the KV length, keys rotated in the kernel), each call timed alone (host overhead included), then
  ``decode-graph``: the GPU time alone, each call captured in a CUDA graph (as serving engines run decode steps),
  for SDPA, the kernel at G = 1 and the SelfExtend kernel under each of ``DECODE_CONFIGS`` (``default=True``
  marks the one the kernel uses).
- ``e2e``: a model with SmolLM2-135M's architecture (head dim 64, GQA 9 / 3, 30 layers, from its config with seeded
  weights), bf16: 32k-token prefill (``logits_to_keep=1``, as ``generate`` prefills) vanilla SDPA vs SelfExtend
  Triton vs SelfExtend torch; last-token logits and greedy generation of 16 tokens from a 32k prompt with the
  torch and Triton backends (``generate-fp32``: the same in fp32).
- ``pairmap``: the pair-map kernel (Dual Chunk Attention with ChunkLlama's defaults for an 8k model, s = 6144,
  w = 1024; ReRoPE and Leaky ReRoPE with w = 1024, k = 16) as a model layer calls it (keys of each variant kept
  rotated, the row layout kept), bf16, 32 heads × 128: prefill at 8k / 32k against SDPA's backends, and one decoding
  step against a 32k and a 128k cache (GQA 32 / 8) eager and under CUDA graphs; at 8k the output is compared with
  the PyTorch path's.

    python bench/attention_gpu.py --out results/attention_gpu.json   # about 4-6 minutes on an H100 / H200
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from longctx.core.rope import default_inv_freq
from longctx.core.pairmaps import DCAMap, ReRoPEMap
from longctx.kernels import pairmap_triton
from longctx.kernels import selfextend_triton as kernel
from longctx.kernels.pairmap_torch import pairmap_attention, variant_keys
from longctx.kernels.selfextend_torch import selfextend_attention

ROWS: list[dict] = []


def bench(fn, reps: int = 10) -> float:
    """Median ms of ``reps`` timed calls after two warm-ups (CUDA events)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_graph(fn, reps: int = 50) -> float:
    """GPU time per call, host overhead excluded: ``fn`` captured once in a CUDA graph (as serving engines run decode
    steps), ``reps`` replays queued back to back between two events, mean ms per replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def report(section: str, n: int, dtype: str, backend: str, ms: float, ref: float | None, **extra) -> None:
    row = {"section": section, "n": n, "dtype": dtype, "backend": backend, "ms": round(ms, 4),
           "ratio": round(ms / ref, 3) if ref else None, **extra}
    ROWS.append(row)
    ratio = f"{row['ratio']:.3f}" if row["ratio"] is not None else "-"
    print(f"{section:<8}{n:>8}  {dtype:<6}{backend:<26}{ms:>10.3f} ms  {ratio:>7}  "
          + " ".join(f"{k}={v}" for k, v in extra.items()), flush=True)


SDPA = (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
        ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION))


def sdpa_backends(q, k, v, causal: bool, gqa: bool, timer=bench) -> dict[str, float]:
    out = {}
    for name, backend in SDPA:
        try:
            with sdpa_kernel(backend):
                fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)  # noqa: E731
                out[name] = timer(fn)
        except RuntimeError as e:  # a backend that does not take this shape / dtype (or a CUDA graph)
            print(f"  ({name} unavailable: {str(e).splitlines()[0][:100]})")
    return out


def prefill(lengths, dtypes, heads=32, dim=128, window=1024, group=8):
    inv = default_inv_freq(dim, 10000.0).cuda()
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        for n in lengths:
            g = torch.Generator(device="cuda").manual_seed(n)
            q, k, v = (torch.randn(1, heads, n, dim, device="cuda", dtype=dtype, generator=g) for _ in range(3))
            pos = torch.arange(n, device="cuda")[None]
            found = sdpa_backends(q, k, v, True, False)
            ref = min(found.values())
            for backend, ms in found.items():
                report("prefill", n, name, backend, ms, ref)
            layout = kernel.row_layout(pos, pos, None, n, n)  # a model computes it once per forward, not per layer
            se = lambda G, **kw: kernel.selfextend_attention_triton(q, k, v, pos, pos, inv, G, window,  # noqa: E731
                                                                     dim**-0.5, **kw)
            report("prefill", n, name, "triton G=1 (plain)", bench(lambda: se(1, layout=layout)), ref)
            report("prefill", n, name, f"triton selfextend G={group}", bench(lambda: se(group, layout=layout)), ref)
            report("prefill", n, name, f"triton selfextend G={group} +layout", bench(lambda: se(group)), ref)
            if n <= 32768:
                torch_se = lambda: selfextend_attention(q, k, v, pos, pos, inv, group, window, dim**-0.5)  # noqa
                report("prefill", n, name, "torch selfextend", bench(torch_se, reps=3), ref)
            if n == min(lengths):
                diff = (se(group).float() - selfextend_attention(q, k, v, pos, pos, inv, group, window,
                                                                 dim**-0.5).float()).abs().max().item()
                plain = (se(1).float() - F.scaled_dot_product_attention(q, k, v, is_causal=True).float()
                         ).abs().max().item()
                report("check", n, name, "max|triton - torch|", 0.0, None, selfextend=diff, plain=plain)
            torch.cuda.empty_cache()


# (BLOCK_N, warps, stages) tried for decode; each fits in shared memory without spilling on sm_90
DECODE_CONFIGS = [(64, 4, 3), (64, 4, 2), (32, 4, 3), (64, 8, 2), (128, 8, 2)]


def decode(caches, dtype=torch.bfloat16, hq=32, hkv=8, dim=128, window=1024, group=8):
    inv = default_inv_freq(dim, 10000.0).cuda()
    name = str(dtype).replace("torch.", "")
    for n in caches:
        g = torch.Generator(device="cuda").manual_seed(n)
        q = torch.randn(1, hq, 1, dim, device="cuda", dtype=dtype, generator=g)
        k, v = (torch.randn(1, hkv, n, dim, device="cuda", dtype=dtype, generator=g) for _ in range(2))
        k_pos = torch.arange(n, device="cuda")[None]
        q_pos = k_pos[:, -1:]
        found = sdpa_backends(q, k, v, False, True)
        rk, rv = (x.repeat_interleave(hq // hkv, 1) for x in (k, v))  # K/V repeated per query head, untimed
        found |= {f"{name} (K/V repeated)": ms for name, ms in sdpa_backends(q, rk, rv, False, False).items()}
        del rk, rv
        ref = min(found.values())
        for backend, ms in found.items():
            report("decode", n, name, backend, ms, ref)
        layout = kernel.row_layout(q_pos, k_pos, None, 1, n)  # what a model computes once per step
        se = lambda G: kernel.selfextend_attention_triton(q, k, v, q_pos, k_pos, inv, G, window, dim**-0.5,  # noqa
                                                         layout=layout)
        report("decode", n, name, "triton G=1 (plain)", bench(lambda: se(1), reps=50), ref)
        report("decode", n, name, f"triton selfextend G={group}", bench(lambda: se(group), reps=50), ref)
        report("decode", n, name, "triton selfextend +layout", bench(
            lambda: kernel.selfextend_attention_triton(q, k, v, q_pos, k_pos, inv, group, window, dim**-0.5),
            reps=50), ref)
        torch_se = lambda: selfextend_attention(q, k, v, q_pos, k_pos, inv, group, window, dim**-0.5)  # noqa
        report("decode", n, name, "torch selfextend", bench(torch_se, reps=20), ref)
        diff = (se(group).float() - torch_se().float()).abs().max().item()
        report("check", n, name, "decode max|triton - torch|", 0.0, None, selfextend=diff)
        # GPU time alone (CUDA graphs, as serving engines run decode steps): the same kernels, no host overhead
        graphed = sdpa_backends(q, k, v, False, True, timer=bench_graph)
        ref = min(graphed.values()) if graphed else None
        for backend, ms in graphed.items():
            report("decode-graph", n, name, backend, ms, ref)
        report("decode-graph", n, name, "triton G=1 (plain)", bench_graph(lambda: se(1)), ref)
        default = kernel._DECODE[""]  # bf16 / fp16, head dim <= 128
        for config in DECODE_CONFIGS:  # the one decode configuration is picked from these
            kernel._DECODE[""] = config
            report("decode-graph", n, name, f"triton selfextend G={group} N{config[0]} w{config[1]} s{config[2]}",
                   bench_graph(lambda: se(group)), ref, default=config == default)
        kernel._DECODE[""] = default


PAIRMAPS = {"dca": DCAMap(6144, 1024), "rerope": ReRoPEMap(1024), "leaky rerope": ReRoPEMap(1024, 16.0)}


def pairmap(lengths=(8192, 32768), caches=(32768, 131072), dtype=torch.bfloat16, hq=32, hkv=8, dim=128):
    inv = default_inv_freq(dim, 10000.0).cuda()
    name = str(dtype).replace("torch.", "")
    for n, q_len, heads_kv in [(n, n, hq) for n in lengths] + [(n, 1, hkv) for n in caches]:
        section = "pm-prefill" if q_len > 1 else "pm-decode"
        g = torch.Generator(device="cuda").manual_seed(n)
        q = torch.randn(1, hq, q_len, dim, device="cuda", dtype=dtype, generator=g)
        k, v = (torch.randn(1, heads_kv, n, dim, device="cuda", dtype=dtype, generator=g) for _ in range(2))
        k_pos = torch.arange(n, device="cuda")[None]
        q_pos = k_pos[:, n - q_len:]
        found = sdpa_backends(q, k, v, q_len > 1, heads_kv != hq)
        ref = min(found.values())
        for backend, ms in found.items():
            report(section, n, name, backend, ms, ref)
        layout = kernel.row_layout(q_pos, k_pos, None, q_len, n)
        for method, pmap in PAIRMAPS.items():
            keys = {var: variant_keys(k, k_pos, inv, pmap, var) for var in set(pmap.variants)}  # kept on the cache
            fn = lambda pmap=pmap, keys=keys: pairmap_triton.pairmap_attention_triton(  # noqa: E731
                q, v, pmap, inv, dim**-0.5, keys, layout)
            report(section, n, name, f"triton {method}", bench(fn, reps=10 if q_len > 1 else 50), ref)
            if q_len == 1:
                graphed = bench_graph(fn)
                report("pm-decode-graph", n, name, f"triton {method}", graphed, None)
            if n == min(lengths) or (q_len == 1 and n == min(caches)):
                diff = (fn().float() - pairmap_attention(q, k, v, q_pos, k_pos, inv, pmap, dim**-0.5,
                                                         keys=keys).float()).abs().max().item()
                report("check", n, name, f"{method} max|triton - torch|", 0.0, None, diff=diff)
        if q_len == 1:
            graphed = sdpa_backends(q, k, v, False, True, timer=bench_graph)
            for backend, ms in graphed.items():
                report("pm-decode-graph", n, name, backend, ms, None)
        torch.cuda.empty_cache()


def smollm2_architecture(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         initializer_range=0.08)  # wide enough that greedy decoding does not repeat one token
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to("cuda", dtype).eval()


def e2e(n=32768, new_tokens=16):
    """32k-token prefill of the SmolLM2-shaped model, bf16: vanilla SDPA vs SelfExtend Triton vs SelfExtend torch."""
    import longctx

    model = smollm2_architecture(torch.bfloat16)
    ids = torch.randint(10, 40000, (1, n), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        run = lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1)  # noqa: E731
        ref = bench(run, reps=3)
        report("e2e", n, "bf16", "vanilla sdpa prefill", ref, ref)
        for backend in ("triton", "torch"):
            info = longctx.patch(model, "selfextend", target_length=n + new_tokens, attn_backend=backend)
            report("e2e", n, "bf16", f"selfextend {backend} prefill", bench(run, reps=3), ref,
                   G=info.params["group_size"], W=info.params["window"])
            longctx.unpatch(model)
    generation(model, ids, n, new_tokens, "bf16")


def generation(model, ids, n, new_tokens, name):
    """Last-token logits and greedy tokens from an ``n``-token prompt, SelfExtend with the torch vs Triton backend."""
    import longctx

    with torch.no_grad():
        base = model(input_ids=ids, logits_to_keep=1).logits.float()
        logits, tokens = {}, {}
        for backend in ("torch", "triton"):
            longctx.patch(model, "selfextend", target_length=n + new_tokens, attn_backend=backend)
            start = time.time()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
            torch.cuda.synchronize()
            report("e2e", n, name, f"generate {new_tokens} ({backend})", (time.time() - start) * 1000, None)
            logits[backend] = out.scores[0].float()  # the prefill's last-token logits
            tokens[backend] = out.sequences[0, n:].tolist()
            longctx.unpatch(model)
    diff = (logits["triton"] - logits["torch"]).abs().max().item()
    moved = (logits["torch"] - base).abs().max().item()
    report("check", n, name, "last-token logits triton vs torch", 0.0, None, max_diff=round(diff, 5),
           selfextend_vs_vanilla=round(moved, 4))
    same = tokens["torch"] == tokens["triton"]
    report("check", n, name, "greedy tokens torch == triton", 0.0, None, same=same, triton=tokens["triton"],
           torch=tokens["torch"])


def generation_fp32(n=32768, new_tokens=16):
    """The generation check in fp32, where the two backends differ by fp32 rounding only."""
    model = smollm2_architecture(torch.float32)
    ids = torch.randint(10, 40000, (1, n), generator=torch.Generator().manual_seed(0)).cuda()
    generation(model, ids, n, new_tokens, "fp32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="prefill,decode,e2e,generate-fp32,pairmap")
    parser.add_argument("--lengths", default="8192,32768,65536")
    parser.add_argument("--caches", default="32768,131072")
    parser.add_argument("--out", type=Path, default=Path("results/attention_gpu.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/attention_gpu.py needs a CUDA GPU")
    device = torch.cuda.get_device_name()
    print(f"device: {device}; torch {torch.__version__}; triton {kernel.triton.__version__}", flush=True)
    run = {
        "prefill": lambda: prefill([int(x) for x in args.lengths.split(",")], [torch.bfloat16, torch.float16]),
        "decode": lambda: decode([int(x) for x in args.caches.split(",")]),
        "e2e": e2e,
        "generate-fp32": generation_fp32,
        "pairmap": pairmap,
    }
    started = time.time()
    failed = []
    for section in args.sections.split(","):
        try:  # a section that fails is reported; the others still run (device time is scarce)
            run[section]()
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            failed.append(section)
            report("failed", 0, "-", section, 0.0, None)
        finally:  # written after every section: a run cut short keeps what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"device": device, "torch": torch.__version__,
                                            "triton": kernel.triton.__version__, "rows": ROWS,
                                            "seconds": round(time.time() - started, 1)}, indent=1))
            torch.cuda.empty_cache()
    print(f"wrote {args.out}" + (f"; failed sections: {failed}" if failed else ""))
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
