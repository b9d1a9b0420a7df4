"""Attention under per-pair position maps (Dual Chunk Attention, ReRoPE, Leaky ReRoPE) in PyTorch: the interval
path (log-sum-exp merge) and the blocked path against the oracle that rotates raw q / k to each branch's absolute
positions; the maps' relative positions against the papers' definitions."""

from __future__ import annotations

import pytest
import torch

from longctx.core.pairmaps import DCAMap, ReRoPEMap, dca_geometry, dca_mscale, rerope_log_scale
from longctx.core.rope import default_inv_freq, rotate_by_angles
from longctx.kernels.pairmap_torch import (
    pairmap_attention,
    pairmap_attention_blocked,
    pairmap_attention_naive,
    uniform_offset,
    variant_keys,
)

MAPS = {
    "dca": DCAMap(chunk_size=24, local_window=4),  # c = 20
    "rerope": ReRoPEMap(window=8),
    "leaky": ReRoPEMap(window=8, leaky=4.0),
}


def test_relative_positions_follow_the_definitions():
    i = torch.arange(70)[:, None]
    j = torch.arange(70)[None, :]
    causal = j <= i
    rerope = MAPS["rerope"].relative(i, j)
    assert torch.equal(rerope[causal], (i - j).clamp(max=8).double().expand_as(rerope)[causal])
    leaky = MAPS["leaky"].relative(i, j)
    d = (i - j).double().expand_as(leaky)
    assert torch.allclose(leaky[causal], torch.where(d < 8, d, 8 + (d - 8) / 4)[causal])
    dca = MAPS["dca"].relative(i, j)
    c, s = 20, 24
    ci, cj = (i // c).expand_as(dca), (j // c).expand_as(dca)
    qi = (i % c).expand_as(dca)
    kj = (j % c).expand_as(dca)
    expected = torch.where(ci == cj, qi - kj, torch.where(cj == ci - 1, (qi + c).clamp(max=s) - kj,
                                                          min(2 * c - 1, s) - kj)).double()
    assert torch.equal(dca[causal], expected[causal])
    assert dca[causal].max() <= s  # no relative distance past the chunk size


def test_dca_geometry_and_scales():
    assert dca_geometry(4096) == (3072, 512, 2560)  # ChunkLlama's defaults: s = 3L/4, w = L/8
    assert dca_geometry(64, 48, 8) == (48, 8, 40)
    for bad in ((64, 8, 8), (64, 100, 8), (64, 48, 0)):
        with pytest.raises(ValueError):
            dca_geometry(*bad)
    assert torch.allclose(dca_mscale(torch.tensor([64, 100, 128]), 64),
                          torch.tensor([1.0, 0.05 * torch.log(torch.tensor(100 / 64)).item() + 1,
                                        0.05 * torch.log(torch.tensor(2.0)).item() + 1]))
    scale = rerope_log_scale(torch.tensor([0, 63, 64, 4095]), 64)
    assert torch.allclose(scale, torch.tensor([1.0, 1.0, torch.log(torch.tensor(65.0)).item() / torch.log(
        torch.tensor(64.0)).item(), torch.log(torch.tensor(4096.0)).item() / torch.log(torch.tensor(64.0)).item()]))


def _inputs(B, Hq, Hkv, Q, KV, D, dtype, *, pad=0, seed=0, start=0):
    g = torch.Generator().manual_seed(seed)
    inv = default_inv_freq(D, 10000.0)
    valid = torch.ones(B, KV, dtype=torch.bool)
    if pad:
        valid[0, :pad] = False  # row 0 left-padded
    k_pos = (valid.long().cumsum(-1) - 1).clamp(min=0) + start
    q_pos = k_pos[:, KV - Q:]
    q = rotate_by_angles(torch.randn(B, Hq, Q, D, generator=g), q_pos[:, None, :, None].float() * inv)
    k = rotate_by_angles(torch.randn(B, Hkv, KV, D, generator=g), k_pos[:, None, :, None].float() * inv)
    v = torch.randn(B, Hkv, KV, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype), q_pos, k_pos, inv, (valid if pad else None)


@pytest.mark.parametrize("name", sorted(MAPS))
@pytest.mark.parametrize("Q, KV, start", [(70, 70, 0), (1, 67, 0), (13, 90, 0), (30, 45, 17), (1, 41, 0)])
def test_interval_path_equals_the_oracle(name, Q, KV, start):
    q, k, v, q_pos, k_pos, inv, _ = _inputs(2, 6, 2, Q, KV, 16, torch.float32, start=start)
    scale = torch.rand(2, Q, generator=torch.Generator().manual_seed(3)) + 0.5
    assert uniform_offset(q_pos, k_pos, None) == start
    got = pairmap_attention(q, k, v, q_pos, k_pos, inv, MAPS[name], 0.25, q_scale=scale, block_size=16)
    ref = pairmap_attention_naive(q, k, v, q_pos, k_pos, inv, MAPS[name], 0.25, q_scale=scale)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(MAPS))
@pytest.mark.parametrize("Q, KV", [(50, 50), (1, 61), (5, 61)])
def test_blocked_path_with_left_padding_equals_the_oracle(name, Q, KV):
    q, k, v, q_pos, k_pos, inv, valid = _inputs(2, 4, 2, Q, KV, 16, torch.float32, pad=9)
    assert uniform_offset(q_pos, k_pos, valid) is None
    got = pairmap_attention(q, k, v, q_pos, k_pos, inv, MAPS[name], 0.25, key_valid=valid, block_size=8)
    ref = pairmap_attention_naive(q, k, v, q_pos, k_pos, inv, MAPS[name], 0.25, key_valid=valid)
    seen = valid[:, KV - Q:][:, None, :, None]  # padding queries: no meaning
    torch.testing.assert_close(got * seen, ref * seen, atol=2e-5, rtol=0)
    alone = pairmap_attention(q[1:], k[1:], v[1:], q_pos[1:], k_pos[1:], inv, MAPS[name], 0.25)
    torch.testing.assert_close(got[1:], alone, atol=2e-5, rtol=0)  # an unpadded row equals itself alone


@pytest.mark.parametrize("name", sorted(MAPS))
def test_kept_variant_keys_are_used_and_low_precision_stays_close(name):
    q, k, v, q_pos, k_pos, inv, _ = _inputs(1, 4, 2, 40, 40, 16, torch.float32, seed=5)
    pmap = MAPS[name]
    keys = {var: variant_keys(k, k_pos, inv, pmap, var) for var in set(pmap.variants)}
    torch.testing.assert_close(pairmap_attention(q, k, v, q_pos, k_pos, inv, pmap, 0.25, keys=keys),
                               pairmap_attention(q, k, v, q_pos, k_pos, inv, pmap, 0.25), atol=0, rtol=0)
    ref = pairmap_attention_naive(q, k, v, q_pos, k_pos, inv, pmap, 0.25)
    half = pairmap_attention(q.half(), k.half(), v.half(), q_pos, k_pos, inv, pmap, 0.25)
    blocked = pairmap_attention_blocked(q.half(), v.half(), q_pos, k_pos, inv, pmap, 0.25,
                                        {var: variant_keys(k.half(), k_pos, inv, pmap, var) for var in set(
                                            pmap.variants)})
    for got in (half, blocked):
        assert (got.float() - ref).abs().max() < 1e-2


def test_plan_cache_never_serves_a_freed_models_frequencies():
    """The interval path's plan is cached per forward, keyed by the frequencies' identity: a tensor freed with its
    model leaves its address (and Python id) to the next model's, whose plan must not be the freed one's (a deepcopy
    of a patched Gemma 3 once got another layer type's rotation tables this way, when plans were keyed by address)."""
    from longctx.kernels.pairmap_torch import _PLANS

    inv = default_inv_freq(16, 10000.0)
    args = (MAPS["rerope"], 0, 70, 70, 3, 16)
    plan = _PLANS.get(*args, inv, torch.float32, torch.device("cpu"))
    assert _PLANS.get(*args, inv, torch.float32, torch.device("cpu")) is plan  # reused within a forward
    same_address = inv.view_as(inv)  # another tensor object at the same address and version
    assert same_address.data_ptr() == inv.data_ptr() and same_address._version == inv._version
    assert _PLANS.get(*args, same_address, torch.float32, torch.device("cpu")) is not plan
    for base in (10000.0, 50.0, 10000.0, 7.0, 300.0, 50.0):  # freed and reallocated frequencies, each one right
        q, k, v, q_pos, k_pos, _, _ = _inputs(1, 4, 2, 70, 70, 16, torch.float32)
        inv = default_inv_freq(16, base)
        got = pairmap_attention(q, k, v, q_pos, k_pos, inv, MAPS["rerope"], 0.25, block_size=16)
        ref = pairmap_attention_naive(q, k, v, q_pos, k_pos, inv, MAPS["rerope"], 0.25)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
        del inv
