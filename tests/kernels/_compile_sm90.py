"""Compiles the Triton kernels' launches for sm_90 (no GPU needed) and prints one JSON line per compiled launch; run
by test_offline_compile.py in a process without TRITON_INTERPRET. ``--all`` compiles every autotuned configuration
(else the first, the untuned default). A plain flash-attention kernel, compiled alike, is the yardstick for the
instructions of the kernels' interior loops. ``--pairmap`` compiles the pair-map kernel's launches (DCA,
ReRoPE, Leaky ReRoPE, STRING) instead (with ``--yardstick``, the yardstick too)."""

from __future__ import annotations

import json
import sys

import torch
import triton
import triton.language as tl

from longctx.kernels import offline


@triton.jit
def plain_flash_attention(Q, K, V, O, stride, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """The yardstick: causal-free flash attention's inner loop, nothing else (whole tiles, no masks)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D)
    keys = tl.arange(0, BLOCK_N)
    q = tl.load(Q + rows[:, None] * stride + cols[None, :])
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, n, BLOCK_N):
        j = start + keys
        k = tl.load(K + j[:, None] * stride + cols[None, :])
        s = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(s, 1) * 0.125)
        p = tl.exp2(s * 0.125 - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + j[:, None] * stride + cols[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    tl.store(O + rows[:, None] * stride + cols[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty))


CALLS = {  # name -> (q_len, kv_len, heads, kv heads, head dim, dtype, causal)
    "prefill": (4096, 4096, 32, 8, 128, torch.bfloat16, True),
    "prefill-gqa3-d64": (4096, 4096, 9, 3, 64, torch.bfloat16, True),
    "bidirectional": (512, 512, 12, 12, 128, torch.float16, False),
    "wide": (4096, 4096, 8, 8, 256, torch.bfloat16, True),
    "fp32": (4096, 4096, 8, 8, 128, torch.float32, True),
    "fp32-wide": (4096, 4096, 8, 8, 256, torch.float32, True),
    "decode": (1, 32768, 32, 8, 128, torch.bfloat16, True),
    "decode-wide": (1, 32768, 16, 8, 256, torch.bfloat16, True),
    "decode-fp32": (1, 32768, 32, 8, 128, torch.float32, True),
    "decode-fp32-wide": (1, 32768, 16, 8, 256, torch.float32, True),
}
# the pair-map kernel (``--pairmap``): name -> (map, q_len, kv_len, heads, kv heads, head dim, dtype)
PAIRMAP = {
    "pairmap-dca-prefill": ("dca", 4096, 4096, 32, 8, 128, torch.bfloat16),
    "pairmap-leaky-prefill": ("leaky", 4096, 4096, 32, 8, 128, torch.bfloat16),
    "pairmap-rerope-prefill-gqa3-d64": ("rerope", 4096, 4096, 9, 3, 64, torch.bfloat16),
    "pairmap-dca-prefill-wide": ("dca", 4096, 4096, 8, 8, 256, torch.bfloat16),
    "pairmap-dca-prefill-fp32-d64": ("dca", 4096, 4096, 9, 3, 64, torch.float32),
    "pairmap-leaky-prefill-fp32": ("leaky", 4096, 4096, 8, 8, 128, torch.float32),
    "pairmap-dca-prefill-fp32-wide": ("dca", 4096, 4096, 8, 8, 256, torch.float32),
    "pairmap-dca-decode": ("dca", 1, 32768, 32, 8, 128, torch.bfloat16),
    "pairmap-leaky-decode-wide": ("leaky", 1, 32768, 16, 8, 256, torch.bfloat16),
    "pairmap-dca-decode-fp32-wide": ("dca", 1, 32768, 16, 8, 256, torch.float32),
    "pairmap-string-prefill": ("string", 4096, 4096, 32, 8, 128, torch.bfloat16),
    "pairmap-string-decode": ("string", 1, 32768, 32, 8, 128, torch.bfloat16),
}


def _pairmap_call(name: str):
    from longctx.core.pairmaps import DCAMap, ReRoPEMap, STRINGMap
    from longctx.kernels import pairmap_triton

    which, q_len, kv_len, heads, kv_heads, dim, dtype = PAIRMAP[name]
    pmap = {"dca": DCAMap(3072, 512), "rerope": ReRoPEMap(512), "leaky": ReRoPEMap(512, 16.0),
            "string": STRINGMap(1351, 128)}[which]
    return pairmap_triton.example_call(q_len, kv_len, pmap, heads=heads, kv_heads=kv_heads, dim=dim, dtype=dtype)


def main() -> None:
    every = "--all" in sys.argv
    names = [a for a in sys.argv[1:] if not a.startswith("--")] or (
        list(PAIRMAP) if "--pairmap" in sys.argv else list(CALLS))
    for name in names:
        if name in PAIRMAP:
            fn, args, kwargs = _pairmap_call(name)
        else:
            q_len, kv_len, heads, kv_heads, dim, dtype, causal = CALLS[name]
            fn, args, kwargs = offline.example_call(q_len, kv_len, heads=heads, kv_heads=kv_heads, dim=dim,
                                                    dtype=dtype, causal=causal)
        for r in offline.compile_call(fn, *args, all_configs=every, **kwargs):
            print(json.dumps({"call": name, "kernel": r.kernel, "config": r.config, "registers": r.registers,
                              "stack": r.stack, "shared": r.shared, "fits": r.fits, "cp_async": r.pipelined_loads,
                              "wgmma": r.tensor_core_dots, "loops": r.loops,
                              "dot_waits": r.dot_waits}), flush=True)
    if "--yardstick" in sys.argv:
        x = torch.zeros(4096, 128, dtype=torch.bfloat16)
        r = offline.compile_launch(plain_flash_attention, (x, x, x, x, 128, 4096), {"D": 128},
                                   {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3})
        print(json.dumps({"call": "yardstick", "kernel": r.kernel, "loops": r.loops, "cp_async": r.pipelined_loads}))


if __name__ == "__main__":
    main()
