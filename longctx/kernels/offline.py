"""Compile the Triton kernels for an NVIDIA GPU on a machine without one, and say what the compiler made of them.

A kernel's speed cannot be measured without its GPU, but much of what decides it can be read from the compiled code:
registers and spills, shared memory (and whether it fits), whether the key / value loads are software-pipelined
(``cp.async``), whether the products run on Hopper's tensor-core instructions (``wgmma``), and how many instructions
each iteration of each key loop issues per thread (from the SASS). Triton compiles for any NVIDIA target without a
device (its wheel ships ``ptxas`` and ``cuobjdump``).

The launches are the ones :func:`~longctx.kernels.selfextend_triton.selfextend_attention_triton` really makes: the
wrapper runs on small CPU tensors with its launches recorded instead of run (``_CAPTURED``), and each recorded launch
is compiled with the signature Triton's JIT would specialise for it (integers divisible by 16 and pointers aligned to
16 bytes marked so, integers equal to 1 made constants).

    python -m longctx.kernels.offline               # the prefill and decode launches of a 32-head, 8-KV-head model
    python -m longctx.kernels.offline --arch 100    # another target (Blackwell)

Run it without ``TRITON_INTERPRET=1`` (the interpreter replaces compiled kernels).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from . import selfextend_triton as kernels

__all__ = ["Compiled", "captured", "compile_launch", "compile_call", "loop_sizes", "SMEM_LIMIT"]

SMEM_LIMIT = {90: 232448, 100: 232448, 80: 166912, 89: 101376}  # bytes of shared memory one block may use


@dataclass
class Compiled:
    """What the compiler made of one launch configuration."""

    kernel: str
    config: dict
    registers: int | None
    stack: int | None  # bytes of stack frame per thread (spilled registers land here)
    shared: int
    fits: bool  # shared memory within the target's per-block limit
    pipelined_loads: int  # loads turned into cp.async copies by the software pipeliner
    tensor_core_dots: int  # wgmma (Hopper) dot operations
    loops: list[int] = field(default_factory=list)  # SASS instructions per iteration of each loop (≥ 40 long)
    dot_waits: list[int] = field(default_factory=list)  # waits for tensor-core results per iteration, per loop
    seconds: float = 0.0
    asm: dict = field(default_factory=dict, repr=False)

    def line(self) -> str:
        cfg = " ".join(f"{k}={v}" for k, v in self.config.items())
        return (f"{self.kernel:<18} {cfg:<52} regs {self.registers} stack {self.stack} smem {self.shared // 1024} KiB"
                f"{'' if self.fits else ' (too much)'} cp.async {self.pipelined_loads} wgmma {self.tensor_core_dots}"
                f" loops {self.loops} waits {self.dot_waits}")


@contextlib.contextmanager
def captured() -> Iterator[list]:
    """Record the kernels' launches (kernel, grid, args, meta, configs) instead of running them."""
    if kernels.interpreted():
        raise RuntimeError("longctx.kernels.offline compiles kernels: unset TRITON_INTERPRET")
    kernels._CAPTURED = []
    try:
        yield kernels._CAPTURED
    finally:
        kernels._CAPTURED = None


_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
           torch.int64: "i64"}


def _signature(kernel, args: tuple, meta: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as Triton's JIT specialises a launch with these arguments."""
    params = list(kernel.params)
    runtime = [p for p in params if not p.is_constexpr]
    if len(runtime) != len(args):
        raise ValueError(f"{kernel.__name__}: {len(args)} arguments for {len(runtime)} runtime parameters")
    signature, constexprs, attrs = {}, {}, {}
    values = dict(zip((p.name for p in runtime), args))
    for i, p in enumerate(params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = meta[p.name]
            continue
        v = values[p.name]
        if isinstance(v, torch.Tensor):
            signature[p.name] = "*" + _DTYPES[v.dtype]
            aligned = v.data_ptr() % 16 == 0
        elif isinstance(v, bool):
            signature[p.name] = "i1"
            aligned = False
        elif isinstance(v, int):
            if v == 1:  # Triton makes an integer argument equal to 1 a constant
                signature[p.name] = "constexpr"
                constexprs[p.name] = 1
                continue
            signature[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            aligned = v % 16 == 0
        elif isinstance(v, float):
            signature[p.name] = "fp32"
            aligned = False
        else:
            raise TypeError(f"{kernel.__name__}.{p.name}: cannot type {type(v).__name__}")
        if aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _tool(name: str) -> str | None:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


def loop_sizes(cubin: bytes, minimum: int = 40) -> list[int]:
    """SASS instructions per iteration of each loop (a backward branch closes one), longest loops only."""
    tool = _tool("cuobjdump")
    if tool is None:
        return []
    insts = []
    with _temp_file(cubin) as path:
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);", line)
        if m:
            insts.append((int(m.group(1), 16), m.group(2), m.group(3)))
    index = {addr: i for i, (addr, _, _) in enumerate(insts)}
    sizes = []
    for i, (addr, op, rest) in enumerate(insts):
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr and int(target.group(1), 16) in index:
            size = i - index[int(target.group(1), 16)] + 1
            if size >= minimum:
                sizes.append(size)
    return sizes


def _resources(cubin: bytes) -> tuple[int | None, int | None]:
    tool = _tool("cuobjdump")
    if tool is None:
        return None, None
    with _temp_file(cubin) as path:
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


@contextlib.contextmanager
def _temp_file(data: bytes) -> Iterator[str]:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(data)
    try:
        yield f.name
    finally:
        os.unlink(f.name)


def compile_launch(kernel, args: tuple, meta: dict, config: dict, arch: int = 90) -> Compiled:
    """Compile one recorded launch with one configuration for ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {k: v for k, v in (meta | config).items() if not k.isupper()}
    constants = {k: v for k, v in (meta | config).items() if k.isupper()}
    signature, constexprs, attrs = _signature(kernel, args, constants)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    seconds = time.perf_counter() - start
    ttgir = compiled.asm.get("ttgir", "")
    cubin = compiled.asm.get("cubin", b"")
    registers, stack = _resources(cubin) if cubin else (None, None)
    shared = int(compiled.metadata.shared)
    return Compiled(
        kernel=kernel.__name__, config=config, registers=registers, stack=stack, shared=shared,
        fits=shared <= SMEM_LIMIT.get(arch, SMEM_LIMIT[90]),
        pipelined_loads=ttgir.count("async_copy_global_to_local"), tensor_core_dots=ttgir.count("warp_group_dot "),
        loops=loop_sizes(cubin) if cubin else [], seconds=round(seconds, 2), asm=dict(compiled.asm),
        dot_waits=[body.split("scf.yield")[0].count("warp_group_dot_wait") for body in ttgir.split("scf.for")[1:]],
    )


def compile_call(fn, *args, arch: int = 90, all_configs: bool = True, **kwargs) -> list[Compiled]:
    """Run ``fn(*args, **kwargs)`` (a kernel wrapper, on CPU tensors) with its launches recorded, and compile each
    launch for ``sm_<arch>``: every configuration of an autotuned launch when ``all_configs``, else its first."""
    with captured() as launches:
        fn(*args, **kwargs)
    results = []
    for kernel, _grid, launch_args, meta, configs in launches:
        for config in configs if all_configs else configs[:1]:
            results.append(compile_launch(kernel, launch_args, meta, config, arch))
    return results


def example_call(q_len: int, kv_len: int, *, heads: int = 32, kv_heads: int = 8, dim: int = 128,
                 dtype: torch.dtype = torch.bfloat16, group_size: int = 8, window: int = 1024, causal: bool = True):
    """(function, args, kwargs) of a SelfExtend call with these shapes on CPU tensors (the values do not matter)."""
    from longctx.core.rope import default_inv_freq

    q = torch.zeros(1, heads, q_len, dim, dtype=dtype)
    k = torch.zeros(1, kv_heads, kv_len, dim, dtype=dtype)
    pos = torch.arange(kv_len)[None]
    layout = kernels.row_layout(pos[:, kv_len - q_len:], pos, None, q_len, kv_len)
    return kernels.selfextend_attention_triton, (q, k, k.clone(), None, None, default_inv_freq(dim, 10000.0),
                                                 group_size, window, dim**-0.5), dict(causal=causal, layout=layout)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability ×10 (90: H100 / H200)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    for name, q_len, kv_len, causal in (("prefill", 4096, 4096, True), ("prefill, bidirectional", 4096, 4096, False),
                                        ("decode", 1, 32768, True)):
        print(f"# {name}: q {q_len}, kv {kv_len}, 32 / 8 heads, head dim {args.dim}, {args.dtype}, sm_{args.arch}",
              flush=True)
        fn, call_args, kwargs = example_call(q_len, kv_len, dim=args.dim, dtype=dtype, causal=causal)
        for result in compile_call(fn, *call_args, arch=args.arch, **kwargs):
            print(result.line(), flush=True)


if __name__ == "__main__":
    main()
