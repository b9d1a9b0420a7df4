"""The Triton pair-map kernel (Dual Chunk Attention, ReRoPE, Leaky ReRoPE) against the fp32 oracle, by
flash-attention's rule: its max error is at most twice that of the PyTorch path computing in the same precision (plus
a floor at the precision's rounding). On CPU it runs in Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``) on
small shapes; on a CUDA machine the same grid runs compiled, bf16 included."""

from __future__ import annotations

import pytest
import torch

from longctx.core.pairmaps import DCAMap, ReRoPEMap, STRINGMap, rerope_log_scale
from longctx.core.rope import default_inv_freq, rotate_by_angles
from longctx.kernels import pairmap_triton as kernel
from longctx.kernels.pairmap_torch import pairmap_attention, pairmap_attention_naive, variant_keys

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
MAPS = {
    "dca": DCAMap(chunk_size=24, local_window=4),  # c = 20: several chunks within the shapes below
    "rerope": ReRoPEMap(window=8),
    "leaky": ReRoPEMap(window=8, leaky=4.0),
    "string": STRINGMap(shifted_offset=12, local_window=3),
}


def _inputs(B, Hq, Hkv, Q, KV, D, dtype, *, pad=0, start=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    inv = default_inv_freq(D, 10000.0)
    valid = torch.ones(B, KV, dtype=torch.bool)
    if pad:
        valid[B - 1, :pad] = False  # the last row left-padded, positions counted from its first real token
    k_pos = (valid.long().cumsum(-1) - 1).clamp(min=0) + start
    q_pos = k_pos[:, KV - Q:]
    q = rotate_by_angles(torch.randn(B, Hq, Q, D, generator=g), q_pos[:, None, :, None].float() * inv)
    k = rotate_by_angles(torch.randn(B, Hkv, KV, D, generator=g), k_pos[:, None, :, None].float() * inv)
    v = torch.randn(B, Hkv, KV, D, generator=g)
    to = lambda x: x.to(DEVICE, dtype)  # noqa: E731
    return (to(q), to(k), to(v), q_pos.to(DEVICE), k_pos.to(DEVICE), inv.to(DEVICE),
            valid.to(DEVICE) if pad else None)


def run(q, k, v, q_pos, k_pos, inv, pmap, valid, q_scale=None, splits=None):
    keys = {var: variant_keys(k, k_pos, inv, pmap, var) for var in set(pmap.variants)}
    layout = kernel.row_layout(q_pos, k_pos, valid, q.shape[2], k.shape[2])
    assert kernel.supports(q, k, v, inv, pmap) is None
    return kernel.pairmap_attention_triton(q, v, pmap, inv, q.shape[-1] ** -0.5, keys, layout, q_scale=q_scale,
                                           splits=splits)


def check(name, B=2, Hq=4, Hkv=2, Q=45, KV=45, D=32, dtype=torch.float32, pad=0, start=0, scaled=False,
          splits=None, seed=0):
    pmap = MAPS[name]
    q, k, v, q_pos, k_pos, inv, valid = _inputs(B, Hq, Hkv, Q, KV, D, dtype, pad=pad, start=start, seed=seed)
    q_scale = rerope_log_scale(q_pos, 16) if scaled else None
    ref = pairmap_attention_naive(q.float(), k.float(), v.float(), q_pos, k_pos, inv, pmap, D**-0.5,
                                  key_valid=valid, q_scale=q_scale)
    same = pairmap_attention(q, k, v, q_pos, k_pos, inv, pmap, D**-0.5, key_valid=valid, q_scale=q_scale).float()
    got = run(q, k, v, q_pos, k_pos, inv, pmap, valid, q_scale, splits)
    assert got.shape == (B, Hq, Q, D) and got.dtype == dtype
    seen = valid[:, KV - Q:][:, None, :, None] if valid is not None else 1  # padded queries: no meaning
    err = ((got.float() - ref) * seen).abs().max().item()
    torch_err = ((same - ref) * seen).abs().max().item()
    floor = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert err <= max(2 * torch_err, floor), (err, torch_err)
    return got


@pytest.mark.parametrize("name", sorted(MAPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_equals_the_oracle(name, dtype):
    check(name, dtype=dtype)


@pytest.mark.parametrize("name", sorted(MAPS))
def test_left_padding_chunks_against_a_cache_and_query_scale(name):
    check(name, pad=11, scaled=True)  # per-row offsets, one padded row
    check(name, Q=13, KV=70, start=5, scaled=True)  # a chunk of queries after cached keys, positions from 5


@pytest.mark.parametrize("name", sorted(MAPS))
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_step_split_kv(name, splits):
    got = check(name, Q=1, KV=300, Hq=8, Hkv=2, splits=splits, scaled=True)
    if splits == 3:  # the split merge gives what one program over every key gives
        again = check(name, Q=1, KV=300, Hq=8, Hkv=2, splits=1, scaled=True)
        torch.testing.assert_close(got, again, atol=2e-6, rtol=0)


@pytest.mark.parametrize("D", [16, 80, 128])
def test_head_dims(D):
    check("dca", D=D, Q=30, KV=30)
    check("leaky", D=D, Q=1, KV=60)


def test_maps_without_a_triton_form_are_refused():
    class Other(ReRoPEMap):
        pass

    q, k, v, *_ = _inputs(1, 2, 1, 4, 4, 16, torch.float32)
    assert "no Triton form" in kernel.supports(q, k, v, default_inv_freq(16, 10000.0), object.__new__(
        type("Plain", (), {"variants": (0,)})))
    assert kernel.supports(q, k, v, default_inv_freq(16, 10000.0), Other(8)) is None  # a subclass keeps the form
    assert "partial rotary" in kernel.supports(q, k, v, default_inv_freq(8, 10000.0), MAPS["dca"])
