"""The pure formulas of longctx.core.rope, against their definitions and against transformers' ROPE_INIT_FUNCTIONS."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from longctx.core import rope


def _config(rope_parameters, head_dim=64, max_pos=4096):
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=max_pos)
    cfg.rope_parameters = {"rope_theta": 10000.0, **rope_parameters}
    return cfg


def test_default_inv_freq_formula():
    inv = rope.default_inv_freq(8, 10000.0)
    expected = torch.tensor([10000.0 ** (-i / 8) for i in (0, 2, 4, 6)])
    torch.testing.assert_close(inv, expected)
    assert inv.dtype == torch.float32


def test_pi_equals_transformers_linear():
    ours = rope.pi_inv_freq(64, 10000.0, 4.0)
    theirs, scale = ROPE_INIT_FUNCTIONS["linear"](_config({"rope_type": "linear", "factor": 4.0}))
    assert torch.equal(ours, theirs) and scale == 1.0


def test_ntk_base_formula():
    assert rope.ntk_base(10000.0, 8.0, 64) == pytest.approx(10000.0 * 8.0 ** (64 / 62))


@pytest.mark.parametrize("seq_len", [100, 4096, 5000, 16384])
def test_dynamic_ntk_equals_transformers_dynamic(seq_len):
    theirs, _ = ROPE_INIT_FUNCTIONS["dynamic"](_config({"rope_type": "dynamic", "factor": 4.0}), seq_len=seq_len)
    ours = rope.dynamic_ntk_inv_freq(64, 10000.0, 4.0, seq_len, 4096)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_dynamic_ntk_alpha_formula():
    # n = 2L, s = 4: alpha = 4*2 - 3 = 5
    assert rope.dynamic_ntk_base(10000.0, 4.0, 64, 8192, 4096) == pytest.approx(10000.0 * 5 ** (64 / 62))
    assert rope.dynamic_ntk_base(10000.0, 4.0, 64, 100, 4096) == pytest.approx(10000.0)


@pytest.mark.parametrize("factor", [2.0, 4.0, 16.0])
@pytest.mark.parametrize("beta_fast,beta_slow", [(32, 1), (16, 2)])
@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_equals_transformers(factor, beta_fast, beta_slow, truncate):
    params = {
        "rope_type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": 4096,
        "beta_fast": beta_fast,
        "beta_slow": beta_slow,
        "truncate": truncate,
    }
    theirs, attention = ROPE_INIT_FUNCTIONS["yarn"](_config(params))
    ours = rope.yarn_inv_freq(64, 10000.0, factor, 4096, beta_fast, beta_slow, truncate)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert rope.yarn_attention_factor(factor) == pytest.approx(attention)


def test_yarn_limits_and_ramp():
    inv = rope.yarn_inv_freq(64, 10000.0, 8.0, 4096)
    base = rope.default_inv_freq(64, 10000.0)
    assert torch.equal(inv[0], base[0])  # fastest dim rotates >> beta_fast times: kept
    torch.testing.assert_close(inv[-1], base[-1] / 8.0)  # slowest dim: interpolated
    ratio = base / inv
    assert torch.all(ratio[1:] >= ratio[:-1] - 1e-6)  # monotone ramp between 1 and s
    assert rope.yarn_attention_factor(8.0) == pytest.approx(0.1 * math.log(8.0) + 1)
    assert rope.yarn_attention_factor(1.0) == 1.0
    assert rope.yarn_attention_factor(4.0, mscale=1.0, mscale_all_dim=1.0) == 1.0


def test_resolve_factor():
    assert rope.resolve_factor(4096, target_length=32768) == 8.0
    assert rope.resolve_factor(4096, factor=2) == 2.0
    assert rope.resolve_factor(4096, factor=8, target_length=32768) == 8.0
    with pytest.raises(ValueError, match="not longer than the model's trained length 4096"):
        rope.resolve_factor(4096, target_length=4096)
    with pytest.raises(ValueError, match="factor must be >= 1"):
        rope.resolve_factor(4096, factor=0.5)
    with pytest.raises(ValueError, match="disagree"):
        rope.resolve_factor(4096, factor=2, target_length=32768)
    with pytest.raises(ValueError, match="either factor"):
        rope.resolve_factor(4096)


def test_rotate_by_angles_composes_rotations():
    """R(a+b) x = R(b) R(a) x, and it matches transformers' apply_rotary_pos_emb convention."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 10)  # rotary dim 8, 2 pass-through dims
    a, b = torch.rand(5, 4) * 10, torch.rand(5, 4) * 10
    torch.testing.assert_close(rope.rotate_by_angles(rope.rotate_by_angles(x, a), b), rope.rotate_by_angles(x, a + b))
    emb = torch.cat((a, a), -1)
    q_ref, _ = apply_rotary_pos_emb(x[..., :8], x[..., :8], emb.cos()[None], emb.sin()[None])
    out = rope.rotate_by_angles(x, a)
    torch.testing.assert_close(out[..., :8], q_ref)
    assert torch.equal(out[..., 8:], x[..., 8:])


def test_bad_rotary_dim():
    with pytest.raises(ValueError, match="even"):
        rope.default_inv_freq(7, 10000.0)
