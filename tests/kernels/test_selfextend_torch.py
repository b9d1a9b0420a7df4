"""The blocked SelfExtend path against (1) an independent oracle that rotates raw q/k at each pair's positions from
the paper's definition, and (2) the naive two-full-maps formulation, over a grid of shapes, masks and options."""

from __future__ import annotations

import pytest
import torch

from longctx.core.rope import default_inv_freq, rotate_by_angles
from longctx.kernels.selfextend_torch import (
    selfextend_attention,
    selfextend_attention_blocked,
    selfextend_attention_fused,
    selfextend_attention_naive,
)


def oracle(q_raw, k_raw, v, q_pos, k_pos, inv_freq, G, W, scaling, causal, key_valid, shift):
    """Per pair from the definition: neighbours at (i, j), grouped at (i//G + s, j//G) (or i//G − s right of i)."""
    B, H, Q, D = q_raw.shape
    rep = H // k_raw.shape[1]
    k_raw, v = k_raw.repeat_interleave(rep, 1).double(), v.repeat_interleave(rep, 1).double()
    q_raw = q_raw.double()
    s = W - W // G if shift == "int" else W - W / G
    out = torch.zeros(B, H, Q, v.shape[-1], dtype=torch.float64)
    f = inv_freq.double()
    kv = k_raw.shape[2]
    for b in range(B):
        for i in range(Q):
            pi = int(q_pos[b, i])
            scores = torch.full((H, kv), float("-inf"), dtype=torch.float64)
            for j in range(kv):
                if causal and j > kv - Q + i:
                    continue
                if key_valid is not None and not key_valid[b, j]:
                    continue
                pj = int(k_pos[b, j])
                rel = pi - pj
                if (rel < W) if causal else (abs(rel) < W):
                    a, c = float(pi), float(pj)
                elif rel > 0:
                    a, c = pi // G + s, float(pj // G)
                else:
                    a, c = pi // G - s, float(pj // G)
                qa = rotate_by_angles(q_raw[b, :, i], a * f)
                kc = rotate_by_angles(k_raw[b, :, j], c * f)
                scores[:, j] = (qa * kc).sum(-1) * scaling
            out[b, :, i] = torch.einsum("hk,hkd->hd", torch.softmax(scores, -1).nan_to_num(0), v[b])
    return out


def _case(B=2, Hq=4, Hkv=2, Q=40, KV=40, D=8, rot=8, seed=0, padding=0):
    g = torch.Generator().manual_seed(seed)
    q_raw = torch.randn(B, Hq, Q, D, generator=g)
    k_raw = torch.randn(B, Hkv, KV, D, generator=g)
    v = torch.randn(B, Hkv, KV, D, generator=g)
    inv_freq = default_inv_freq(rot, 10000.0)
    key_valid = torch.ones(B, KV, dtype=torch.bool)
    k_pos = torch.arange(KV)[None].repeat(B, 1)
    if padding:
        key_valid[1, :padding] = False  # row 1 left-padded
        k_pos[1] = (torch.arange(KV) - padding).clamp(min=0)
    q_pos = k_pos[:, KV - Q:]
    rot_q = rotate_by_angles(q_raw, q_pos[:, None, :, None].float() * inv_freq)
    rot_k = rotate_by_angles(k_raw, k_pos[:, None, :, None].float() * inv_freq)
    return q_raw, k_raw, v, rot_q, rot_k, q_pos, k_pos, inv_freq, (key_valid if padding else None)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shift", ["int", "float"])
@pytest.mark.parametrize("G,W", [(3, 5), (4, 8), (2, 3)])
def test_blocked_equals_definition(causal, shift, G, W):
    q_raw, k_raw, v, q, k, q_pos, k_pos, inv, valid = _case(Q=24, KV=24, padding=5 if causal else 0, seed=G)
    expected = oracle(q_raw, k_raw, v, q_pos, k_pos, inv, G, W, 0.35, causal, valid, shift)
    got = selfextend_attention(q, k, v, q_pos, k_pos, inv, G, W, 0.35, causal=causal, key_valid=valid, shift=shift,
                               block_size=7)
    # padded query rows see nothing in the oracle either
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("Q", [1, 5, 31])
def test_query_offset_against_longer_cache(Q):
    """Decode (Q = 1) and chunked prefill (Q < KV): queries are the last Q slots."""
    q_raw, k_raw, v, q, k, q_pos, k_pos, inv, valid = _case(Q=Q, KV=31, padding=4, seed=Q)
    expected = oracle(q_raw, k_raw, v, q_pos, k_pos, inv, 4, 6, 0.35, True, valid, "int")
    got = selfextend_attention(q, k, v, q_pos, k_pos, inv, 4, 6, 0.35, key_valid=valid, block_size=4)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("rot", [8, 4])  # full and partial rotary
@pytest.mark.parametrize("block", [None, 1, 13])
def test_blocked_equals_naive(Hq, Hkv, rot, block):
    _, _, v, q, k, q_pos, k_pos, inv, valid = _case(Hq=Hq, Hkv=Hkv, Q=50, KV=50, rot=rot, padding=9)
    naive = selfextend_attention_naive(q, k, v, q_pos, k_pos, inv, 4, 8, 0.3, key_valid=valid, scale_base=16,
                                       softcap=5.0)
    blocked = selfextend_attention(q, k, v, q_pos, k_pos, inv, 4, 8, 0.3, key_valid=valid, scale_base=16,
                                   softcap=5.0, block_size=block)
    torch.testing.assert_close(blocked, naive, atol=1e-5, rtol=1e-5)


def test_group_size_one_is_plain_attention():
    _, _, v, q, k, q_pos, k_pos, inv, _ = _case(Q=30, KV=30)
    got = selfextend_attention(q, k, v, q_pos, k_pos, inv, 1, 4, 0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           is_causal=True, scale=0.3)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_the_sdpa_error(dtype):
    """flash-attention's criterion: error vs an fp32 reference at most 2× that of the same-precision computation."""
    _, _, v, q, k, q_pos, k_pos, inv, _ = _case(Q=64, KV=64)
    ref = selfextend_attention(q, k, v, q_pos, k_pos, inv, 4, 8, 0.3)
    ours = selfextend_attention(q.to(dtype), k.to(dtype), v.to(dtype), q_pos, k_pos, inv, 4, 8, 0.3)
    assert ours.dtype == dtype
    # same-precision baseline: the naive formulation with its matmuls run in the low precision
    plain = torch.nn.functional.scaled_dot_product_attention(
        q.to(dtype), k.repeat_interleave(2, 1).to(dtype), v.repeat_interleave(2, 1).to(dtype), is_causal=True,
        scale=0.3)
    plain_ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=0.3)
    baseline = (plain.float() - plain_ref).abs().max()
    assert (ours.float() - ref).abs().max() <= 2 * baseline + 1e-6


@pytest.mark.parametrize("Q", [1, 7, 50])
@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (4, 4)])
@pytest.mark.parametrize("block", [None, 3])
def test_fused_equals_blocked(Q, Hq, Hkv, block):
    _, _, v, q, k, q_pos, k_pos, inv, valid = _case(Hq=Hq, Hkv=Hkv, Q=Q, KV=50, padding=9, seed=Q)
    for G, W, shift in [(4, 8, "int"), (3, 10, "float"), (1, 4, "int")]:
        blocked = selfextend_attention_blocked(q, k, v, q_pos, k_pos, inv, G, W, 0.3, key_valid=valid, shift=shift,
                                               scale_base=16)
        fused = selfextend_attention_fused(q, k, v, q_pos, k_pos, inv, G, W, 0.3, key_valid=valid, shift=shift,
                                           scale_base=16, block_size=block)
        torch.testing.assert_close(fused, blocked, atol=1e-5, rtol=1e-5)


def test_dispatch_falls_back_for_non_contiguous_positions():
    _, _, v, q, k, q_pos, k_pos, inv, _ = _case(Q=20, KV=20)
    k_pos = k_pos * 2  # packed / strided positions: distances are not slot distances
    q_pos = k_pos
    got = selfextend_attention(q, k, v, q_pos, k_pos, inv, 4, 8, 0.3)
    ref = selfextend_attention_naive(q, k, v, q_pos, k_pos, inv, 4, 8, 0.3)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("Q", [1, 4, 40])
@pytest.mark.parametrize("block", [None, 3])
def test_blocked_restricted_ranges_equal_naive(Q, block):
    """The contiguous fast path of the blocked kernel (grouped / neighbour scores only where needed)."""
    _, _, v, q, k, q_pos, k_pos, inv, valid = _case(Q=Q, KV=40, padding=6, seed=Q + 1)
    for G, W in [(4, 8), (2, 3), (5, 39)]:
        naive = selfextend_attention_naive(q, k, v, q_pos, k_pos, inv, G, W, 0.3, key_valid=valid)
        blocked = selfextend_attention_blocked(q, k, v, q_pos, k_pos, inv, G, W, 0.3, key_valid=valid,
                                               block_size=block, contiguous=True)
        torch.testing.assert_close(blocked, naive, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("Q", [1, 3, 16, 45])
@pytest.mark.parametrize("Hq,Hkv,rot", [(4, 2, 8), (4, 4, 4), (8, 1, 8)])
@pytest.mark.parametrize("block", [None, 4, 7])
def test_lse_path_equals_naive(native, Q, Hq, Hkv, rot, block, monkeypatch):
    """The log-sum-exp path (three key ranges per query block) on the flash op (CPU) and on explicit scores."""
    import longctx.kernels.lse as lse
    import longctx.kernels.selfextend_torch as kernels

    if not native:
        monkeypatch.setattr(lse, "FLASH_CPU", None)
    _, _, v, q, k, q_pos, k_pos, inv, _ = _case(Hq=Hq, Hkv=Hkv, Q=Q, KV=45, rot=rot, seed=Q)
    for G, W, shift, base in [(4, 8, "int", None), (3, 10, "float", 16), (2, 3, "int", None), (5, 44, "int", None),
                              (4, 50, "int", None), (1, 4, "int", None)]:
        naive = selfextend_attention_naive(q, k, v, q_pos, k_pos, inv, G, W, 0.3, shift=shift, scale_base=base)
        lse = kernels.selfextend_attention_lse(q, k, v, q_pos, k_pos, inv, G, W, 0.3, shift=shift, scale_base=base,
                                               block_size=block)
        torch.testing.assert_close(lse, naive, atol=1e-5, rtol=1e-5)


def test_dispatch_takes_the_lse_path_without_padding_and_uses_given_grouped_keys(monkeypatch):
    import longctx.kernels.selfextend_torch as kernels

    _, _, v, q, k, q_pos, k_pos, inv, _ = _case(Q=1, KV=40)
    calls = []
    real = kernels.selfextend_attention_lse
    monkeypatch.setattr(kernels, "selfextend_attention_lse", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    all_valid = torch.ones(2, 40, dtype=torch.bool)
    k_g = kernels.grouped_keys(k, k_pos, inv, 4)
    got = kernels.selfextend_attention(q, k, v, q_pos, k_pos, inv, 4, 8, 0.3, key_valid=all_valid, grouped_key=k_g)
    assert len(calls) == 1 and calls[0]["grouped_key"] is k_g
    torch.testing.assert_close(got, selfextend_attention_naive(q, k, v, q_pos, k_pos, inv, 4, 8, 0.3))
    # a wrong grouped key changes the result: it really is used
    bad = kernels.selfextend_attention(q, k, v, q_pos, k_pos, inv, 4, 8, 0.3, grouped_key=torch.zeros_like(k_g))
    assert (bad - got).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lse_path_low_precision_within_twice_the_sdpa_error(dtype):
    import longctx.kernels.selfextend_torch as kernels

    _, _, v, q, k, q_pos, k_pos, inv, _ = _case(Q=64, KV=64)
    ref = kernels.selfextend_attention_lse(q, k, v, q_pos, k_pos, inv, 4, 8, 0.3, block_size=16)
    ours = kernels.selfextend_attention_lse(q.to(dtype), k.to(dtype), v.to(dtype), q_pos, k_pos, inv, 4, 8, 0.3,
                                            block_size=16)
    assert ours.dtype == dtype
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    plain = torch.nn.functional.scaled_dot_product_attention(q.to(dtype), kr.to(dtype), vr.to(dtype), is_causal=True,
                                                             scale=0.3)
    plain_ref = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True, scale=0.3)
    assert (ours.float() - ref).abs().max() <= 2 * (plain.float() - plain_ref).abs().max() + 1e-6
