"""Attention over key ranges merged exactly by log-sum-exp (floor 2): what the PyTorch paths of SelfExtend and of the
per-pair position maps share. Each query block attends to a few key ranges in separate calls (unmasked where every
row sees every key) and the partial outputs are merged through their log-sum-exps — causal attention's work, no
score map on CPU."""

from __future__ import annotations

import torch

__all__ = ["native_lse", "attend", "merge", "masked_softmax", "records_grad"]

# CPU's flash attention returns its log-sum-exp (the public SDPA does not)
FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def native_lse(query: torch.Tensor) -> bool:
    """A fused attention op returning its log-sum-exp exists for ``query``'s device (CPU)."""
    return query.device.type == "cpu" and FLASH_CPU is not None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scaling: float
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q·kᵀ·scaling + mask)·v`` and its log-sum-exp (fp32) for GQA-folded rows ``q [B, Hkv, rows, D]``;
    ``mask``: additive ``[1, 1, rows, keys]`` in ``q.dtype`` (0 / −inf). On CPU one flash-attention call (no score
    map); elsewhere, and under autograd, explicit fp32 scores."""
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if native_lse(q) and q.dtype == k.dtype == v.dtype and not grad:  # its log-sum-exp output has no gradient
        out, lse = FLASH_CPU(q, k, v, 0.0, False, attn_mask=mask, scale=scaling)
        return out.float(), lse.float()
    scores = (q.float() @ k.float().transpose(-1, -2)) * scaling
    if mask is not None:
        # under autograd a finite floor: a row with no allowed key gets a log-sum-exp near -1e30 (no weight in the
        # merge) instead of -inf, whose backward is NaN
        scores = scores + (mask.float().clamp(min=-1e30) if grad else mask.float())
    lse = torch.logsumexp(scores, -1)
    return torch.exp(scores - lse[..., None]).nan_to_num(0.0) @ v.float(), lse


def records_grad(*tensors: torch.Tensor) -> bool:
    """Autograd records an op on these tensors."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where ``allowed`` (broadcastable); rows with no allowed entry give zeros, and under
    autograd zero gradients (a softmax over a row of -inf has a NaN backward)."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    if not records_grad(scores):
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)
    some = allowed.any(-1, keepdim=True)
    return torch.softmax(scores.masked_fill(~some, 0.0), dim=-1) * some


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The exact softmax over the union of the parts' keys, from each part's ``(output, log-sum-exp)`` (fp32)."""
    if len(parts) == 1:
        return parts[0][0]
    lses = torch.stack([lse for _, lse in parts])
    weights = torch.exp(lses - lses.max(0).values)
    return sum(o * w[..., None] for (o, _), w in zip(parts, weights)) / weights.sum(0)[..., None]
