"""The Triton kernels compiled for sm_90 (H100 / H200) on this CPU machine: every launch the wrapper makes compiles,
fits in shared memory without spilling, pipelines its key / value loads and (bf16 / fp16) runs its products on
Hopper's wgmma; the SelfExtend kernel's interior key loop issues about as many instructions as plain flash
attention's. These are what the interpreter tests cannot see (they run no compiler) and what decided the kernel's
speed on the GPU (see docs/gpu.md). The compile runs in a subprocess without TRITON_INTERPRET."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("_compile_sm90.py")


def _compile(*args: str) -> list[dict]:
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.fail("this triton install has no NVIDIA backend tools (ptxas); the test extra's triton wheel ships them")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def defaults() -> list[dict]:
    return _compile("--yardstick")


def test_every_default_launch_compiles_fits_and_does_not_spill(defaults):
    launches = [r for r in defaults if r["call"] != "yardstick"]
    calls = {r["call"] for r in launches}
    assert calls == {"prefill", "prefill-gqa3-d64", "bidirectional", "wide", "fp32", "fp32-wide", "decode",
                     "decode-wide", "decode-fp32", "decode-fp32-wide"}
    kernels = {(r["call"], r["kernel"]) for r in launches}
    assert ("prefill", "_grouped_keys_fwd") in kernels and ("decode", "_merge_splits") in kernels
    for r in launches:
        assert r["fits"], r  # a launch needing more shared memory than the GPU has fails on the device
        # spilled registers land on the stack (32 bytes is its floor; triton 3.6 puts 8 more there in the measured
        # fastest bf16 decode tile)
        assert r["stack"] is not None and r["stack"] <= 40, r


def test_loads_are_pipelined_and_products_use_wgmma(defaults):
    attention = {r["call"]: r for r in defaults if r["kernel"] == "_selfextend_fwd"}
    for call in ("prefill", "prefill-gqa3-d64", "bidirectional", "wide", "fp32", "fp32-wide", "decode", "decode-wide",
                 "decode-fp32", "decode-fp32-wide"):
        assert attention[call]["cp_async"] > 0, call
    for call in ("prefill", "prefill-gqa3-d64", "bidirectional"):  # 64-row tiles and more: Hopper's tensor cores
        assert attention[call]["wgmma"] > 0, call


def test_interior_key_loop_is_as_lean_as_plain_flash_attention(defaults):
    """Whole key tiles (the bulk of a long prefill: grouped keys far back, neighbours below the diagonal) run
    without per-score predicates: the kernel's shortest loops stay within 10 % of plain flash attention's."""
    (yardstick,) = [r["loops"][0] for r in defaults if r["call"] == "yardstick"]
    prefill = next(r for r in defaults if r["call"] == "prefill" and r["kernel"] == "_selfextend_fwd")
    interior = sorted(prefill["loops"])[:2]  # grouped and neighbour interiors; the masked loops are longer
    assert all(n <= 1.1 * yardstick for n in interior), (interior, yardstick)
    assert max(prefill["loops"]) > 1.4 * yardstick  # the band, which computes both score kinds, is the long one


def test_causal_prefill_scores_are_one_tensor_core_chain(defaults):
    """Causal fp16 / bf16 prefill scores a key tile with one product over the whole head dim: each iteration of the
    interior loops waits once for the tensor cores (products over the two halves chained through the accumulator
    wait in between). Decode and the bidirectional kernel keep the halves (decode rotates keys by halves; three
    whole query tiles would spill)."""
    for call in ("prefill", "prefill-gqa3-d64"):
        attention = next(r for r in defaults if r["call"] == call and r["kernel"] == "_selfextend_fwd")
        assert len(attention["dot_waits"]) == 5, attention  # grouped, its tail, the band, neighbours, their tail
        assert min(attention["dot_waits"]) == 1, attention
        assert attention["dot_waits"][0] == attention["dot_waits"][3] == 1, attention  # the two interiors


@pytest.mark.slow  # a cold Triton cache compiles its 12 launches for minutes: in --runslow, not CI's 20
def test_pairmap_launches_compile_fit_do_not_spill_and_use_tensor_cores():
    """The pair-map kernel (DCA, ReRoPE, Leaky ReRoPE, STRING): every shape class's default launch, prefill and
    decode. Each branch's interior (keys inside every row's interval) runs without predicates: its loop stays within
    20 % of plain flash attention's (the pair map scores over the two halves of the head dim, two product chains),
    while the masked band is the long one."""
    launches = _compile("--pairmap", "--yardstick")
    (yardstick,) = [r["loops"][0] for r in launches if r["call"] == "yardstick"]
    launches = [r for r in launches if r["call"] != "yardstick"]
    calls = {r["call"] for r in launches}
    assert len(calls) == 12 and all(c.startswith("pairmap-") for c in calls)
    assert {r["kernel"] for r in launches} == {"_pairmap_fwd", "_merge_splits"}
    for r in launches:
        assert r["fits"], r
        assert r["stack"] is not None and r["stack"] <= 40, r
        if r["kernel"] == "_pairmap_fwd":
            assert r["cp_async"] > 0, r  # K / V loads software-pipelined
    for call in ("pairmap-dca-prefill", "pairmap-leaky-prefill", "pairmap-rerope-prefill-gqa3-d64",
                 "pairmap-string-prefill"):
        attention = next(r for r in launches if r["call"] == call and r["kernel"] == "_pairmap_fwd")
        assert attention["wgmma"] > 0, attention  # bf16 products on Hopper's tensor cores
        branches = 3 if "dca" in call else 2
        interior = sorted(attention["loops"])[:branches]  # one unmasked loop per branch
        assert len(attention["loops"]) > 2 * branches - 1, attention  # masked band / tail loops beside them
        assert all(n <= 1.2 * yardstick for n in interior), (call, interior, yardstick)
        assert max(attention["loops"]) > 1.5 * yardstick, (call, attention["loops"], yardstick)


def test_capturing_under_the_interpreter_is_refused(monkeypatch):
    """The interpreter replaces compiled kernels: the tool says so instead of compiling nothing."""
    from longctx.kernels import offline, selfextend_triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        with offline.captured():
            pass
    assert selfextend_triton._CAPTURED is None


@pytest.mark.slow
def test_every_autotuned_configuration_fits():
    for r in _compile("--all", "prefill", "bidirectional", "wide", "fp32", "fp32-wide"):
        assert r["fits"], r
