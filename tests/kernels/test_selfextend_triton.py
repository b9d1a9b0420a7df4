"""The Triton SelfExtend kernel against the fp32 reference, by flash-attention's rule: its max error is at most twice
that of the PyTorch path computing in the same precision. On CPU it runs in Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``) on small shapes; on a CUDA machine the same grid runs compiled, bf16 included (the 3.x
interpreter's bf16 ``tl.dot`` is wrong, so bf16 is checked on GPUs only)."""

from __future__ import annotations

import pytest
import torch

from longctx.core.rope import default_inv_freq, rotate_by_angles
from longctx.kernels import selfextend_triton as kernel
from longctx.kernels.selfextend_torch import selfextend_attention, selfextend_attention_naive

pytest.importorskip("triton")  # an optional extra; the test extra installs it, so CI runs these

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _inputs(B, Hq, Hkv, Q, KV, D, dtype, *, pad=0, causal=True, seed=0, rot_dim=None):
    g = torch.Generator().manual_seed(seed)
    inv = default_inv_freq(rot_dim or D, 10000.0)
    k_pos = torch.arange(KV)[None].repeat(B, 1)
    valid = None
    if pad:
        valid = torch.ones(B, KV, dtype=torch.bool)
        if causal:  # decoders: row 1 left-padded, positions counted from its first real token
            valid[1, :pad] = False
            k_pos[1] = (torch.arange(KV) - pad).clamp(min=0)
        else:  # encoders: row 1 right-padded
            valid[1, KV - pad:] = False
    q_pos = k_pos[:, KV - Q:]
    q = rotate_by_angles(torch.randn(B, Hq, Q, D, generator=g), q_pos[:, None, :, None].float() * inv)
    k = rotate_by_angles(torch.randn(B, Hkv, KV, D, generator=g), k_pos[:, None, :, None].float() * inv)
    v = torch.randn(B, Hkv, KV, D, generator=g)
    to = lambda x: x.to(DEVICE, dtype)  # noqa: E731
    return to(q), to(k), to(v), q_pos.to(DEVICE), k_pos.to(DEVICE), inv.to(DEVICE), (
        valid.to(DEVICE) if valid is not None else None)


def _seen(out, valid, Q, causal):
    """Zero the rows of padded queries (their output is not used; paths differ there)."""
    if valid is None:
        return out
    rows = valid[:, valid.shape[1] - Q:] if causal else valid
    return out * rows[:, None, :, None]


def check(B=2, Hq=4, Hkv=2, Q=37, KV=37, D=32, G=3, W=8, dtype=torch.float32, causal=True, pad=0, shift="int",
          scale_base=None, splits=None, seed=0):
    q, k, v, q_pos, k_pos, inv, valid = _inputs(B, Hq, Hkv, Q, KV, D, dtype, pad=pad, causal=causal, seed=seed)
    args = (q_pos, k_pos, inv, G, W, D**-0.5)
    opts = dict(causal=causal, key_valid=valid, shift=shift, scale_base=scale_base)
    ref = selfextend_attention_naive(q.float(), k.float(), v.float(), *args, **opts)
    same_precision = selfextend_attention(q, k, v, *args, **opts).float()
    got = kernel.selfextend_attention_triton(q, k, v, *args, splits=splits, **opts)
    assert got.shape == (B, Hq, Q, D) and got.dtype == dtype
    err = (_seen(got.float(), valid, Q, causal) - _seen(ref, valid, Q, causal)).abs().max().item()
    torch_err = (_seen(same_precision, valid, Q, causal) - _seen(ref, valid, Q, causal)).abs().max().item()
    assert err <= 2 * torch_err + 1e-5, (err, torch_err)
    return err


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Q,KV,D,G,W", [
    (37, 37, 32, 3, 8),  # odd length, prefill
    (50, 50, 64, 4, 16),
    (33, 33, 80, 2, 5),  # head dim 80 (padded halves)
    (20, 20, 128, 3, 7),
    (17, 61, 32, 3, 8),  # chunked prefill: queries at an offset against a longer cache
    (1, 70, 64, 4, 8),  # decode, one query
    (5, 70, 32, 3, 8),  # decode, speculative-style short query
    (150, 150, 64, 4, 40),  # several whole (unmasked) tiles in the grouped and the neighbour ranges, then tails
])
def test_causal_grid(dtype, Q, KV, D, G, W):
    check(Q=Q, KV=KV, D=D, G=G, W=W, dtype=dtype)


@pytest.mark.parametrize("D", [96, 256])
def test_head_dims_96_and_256(D):
    check(Q=21, KV=21, D=D, G=2, W=6)
    check(Q=1, KV=40, D=D, G=2, W=6)


@pytest.mark.parametrize("Q,KV", [(37, 37), (1, 60), (4, 60)])
def test_left_padding(Q, KV):
    check(Q=Q, KV=KV, pad=6)


@pytest.mark.parametrize("pad", [0, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_bidirectional(pad, dtype):
    check(Q=40, KV=40, causal=False, pad=pad, dtype=dtype, W=6)
    check(Q=120, KV=120, causal=False, pad=pad, dtype=dtype, W=37)  # whole tiles on both sides of the window


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (6, 2), (4, 1), (9, 3)])
def test_gqa_and_mqa(Hq, Hkv):
    check(Hq=Hq, Hkv=Hkv, Q=29, KV=29)
    check(Hq=Hq, Hkv=Hkv, Q=1, KV=45)


def test_split_kv_decode_merges_exactly():
    one = check(Q=2, KV=90, splits=1, seed=3)
    assert check(Q=2, KV=90, splits=4, seed=3) <= 2 * one + 1e-5
    check(Q=3, KV=90, splits=3, pad=10)  # a split of only padding carries no weight


def test_options_float_shift_and_log_scale():
    check(shift="float")
    check(scale_base=16.0, Q=30, KV=30)


def test_group_size_one_is_plain_attention():
    q, k, v, q_pos, k_pos, inv, _ = _inputs(1, 4, 2, 33, 33, 32, torch.float32)
    got = kernel.selfextend_attention_triton(q, k, v, q_pos, k_pos, inv, 1, 8, 32**-0.5)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


def test_unsupported_calls_are_named():
    q, k, v, q_pos, k_pos, inv, _ = _inputs(1, 2, 2, 8, 8, 32, torch.float32)
    assert "partial rotary" in kernel.supports(q, k, v, inv[:8])
    assert "softcap" in kernel.supports(q, k, v, inv, softcap=30.0)
    assert "head dim" in kernel.supports(q[..., :24], k[..., :24], v, inv[:12])
    assert "forward-only" in kernel.supports(q.requires_grad_(), k, v, inv)
    with torch.no_grad():
        assert kernel.supports(q, k, v, inv) is None
    q = q.detach()
    holes = torch.ones(1, 8, dtype=torch.bool, device=DEVICE)
    holes[0, 3] = False  # valid keys not one range
    with pytest.raises(kernel.Unsupported, match="one slot range"):
        kernel.selfextend_attention_triton(q, k, v, q_pos, k_pos, inv, 2, 3, 0.2, key_valid=holes)
    with pytest.raises(kernel.Unsupported, match="contiguous"):
        kernel.selfextend_attention_triton(q, k, v, q_pos * 2, k_pos * 2, inv, 2, 3, 0.2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [64, 80])
def test_grouped_keys_kernel_matches_torch(dtype, D):
    """The one-pass key rotation (prefill) equals the torch path's grouped keys: to fp32 rounding in fp32, to one
    rounding step of the dtype otherwise; left-padded rows (positions from their first real key) included."""
    from longctx.kernels.selfextend_torch import grouped_keys

    _, k, _, _, k_pos, inv, valid = _inputs(2, 2, 3, 1, 75, D, dtype, pad=9)
    offset, _, _ = kernel.row_layout(k_pos[:, -1:], k_pos, valid, 1, 75)
    buffer = torch.zeros(2, 3, 90, D, device=DEVICE, dtype=dtype)  # a longer cache buffer: a strided view
    got = kernel.grouped_keys_triton(k, offset, inv, 4, out=buffer[:, :, :75])
    assert got.data_ptr() == buffer.data_ptr() and buffer[:, :, 75:].abs().sum() == 0
    expected = grouped_keys(k, k_pos, inv, 4)
    seen = valid[:, None, :, None]
    tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps * 8
    torch.testing.assert_close((got * seen).float(), (expected * seen).float(), atol=tol, rtol=tol)
