"""Pure position maps and parameter solvers (no transformers import): SelfExtend's two maps and its G/W solver,
V2PE's fractional position ids.

SelfExtend (Jin et al., ICML 2024): for query i and key j with trained length L, group size G and neighbour window W,
neighbour pairs (|i − j| < W, or i − j < W when causal) keep their positions; grouped pairs rotate the query at
``i // G + W − W // G`` and the key at ``j // G`` (LongLM's released code uses ``W − W / G``: ``shift="float"``).
The largest relative position a grouped pair then reaches is ``(n − 1) // G + W − W // G`` for n tokens, so a length
is reachable while that stays below L: ``n ≤ (L − W) · G + W`` (up to rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "selfextend_shift",
    "selfextend_query_positions",
    "selfextend_key_positions",
    "selfextend_max_length",
    "SelfExtendPlan",
    "solve_selfextend",
    "v2pe_position_ids",
    "v2pe_length",
    "v2pe_auto_delta",
    "V2PE_DELTAS",
]


def selfextend_shift(group_size: int, window: int, shift: str = "int") -> float:
    """``W − W // G`` (default) or ``W − W / G`` (``shift="float"``, LongLM's released Llama/Gemma files)."""
    if shift == "int":
        return float(window - window // group_size)
    if shift == "float":
        return float(window - window / group_size)
    raise ValueError(f"shift must be 'int' or 'float', got {shift!r}")


def selfextend_query_positions(
    positions: torch.Tensor, group_size: int, window: int, shift: str = "int"
) -> torch.Tensor:
    """Grouped query positions ``i // G + shift`` (fp32; fractional with ``shift="float"``)."""
    return torch.div(positions, group_size, rounding_mode="floor").float() + selfextend_shift(group_size, window, shift)


def selfextend_key_positions(positions: torch.Tensor, group_size: int) -> torch.Tensor:
    """Grouped key positions ``j // G`` (fp32)."""
    return torch.div(positions, group_size, rounding_mode="floor").float()


def selfextend_max_length(trained_length: int, group_size: int, window: int) -> int:
    """The longest input whose grouped relative positions stay inside the trained length: ``(L − W)·G + W``."""
    return (trained_length - window) * group_size + window


@dataclass(frozen=True)
class SelfExtendPlan:
    group_size: int
    window: int
    max_length: int
    effective_length: float
    """``W + (N − W)/G``: the largest relative position used at the target length N."""


def solve_selfextend(
    trained_length: int,
    target_length: int | None = None,
    group_size: int | None = None,
    window: int | None = None,
    max_ratio: float = 2 / 3,
) -> SelfExtendPlan:
    """Choose (or check) G and W for a target length.

    Defaults follow the paper's guidance: W = L/4, and the smallest G with ``W + (N − W)/G ≤ max_ratio · L``
    (the paper recommends 1/2 … 2/3 of L). Errors name the constraint that failed.
    """
    L = int(trained_length)
    if window is None:
        window = max(1, L // 4)
    window = int(window)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if window >= L:
        raise ValueError(f"window={window} must be smaller than the trained length {L}")
    if group_size is None:
        if target_length is None:
            raise ValueError("selfextend needs group_size=… or target_length=…")
        budget = max_ratio * L - window
        if budget <= 0:
            raise ValueError(f"window={window} leaves no room under {max_ratio:.2f}·L = {max_ratio * L:g}")
        group_size = max(1, math.ceil((int(target_length) - window) / budget))
    group_size = int(group_size)
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    max_length = selfextend_max_length(L, group_size, window)
    if target_length is not None and int(target_length) > max_length:
        raise ValueError(
            f"group_size={group_size}, window={window} reach at most (L − W)·G + W = {max_length} tokens "
            f"(trained length {L}), less than target_length={target_length}; raise group_size or lower window"
        )
    n = int(target_length) if target_length is not None else max_length
    return SelfExtendPlan(group_size, window, max_length, window + (n - window) / group_size)


# ---------------------------------------------------------------------------------------------------------------
# V2PE (Ge et al. 2024): variable visual position increments
# ---------------------------------------------------------------------------------------------------------------
V2PE_DELTAS = tuple(1 / 2**k for k in range(9))  # 1, 1/2, … 1/256: the strides V2PE trains with


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0 < delta <= 1:
        raise ValueError(f"V2PE's delta must be in (0, 1], got {delta}")
    return delta


def _v2pe_parts(span_mask: torch.Tensor, attention_mask: torch.Tensor | None, delta: float):
    """(image, real, within-span index k (1-based), inclusive and exclusive cumulative integer advance)."""
    image = span_mask.bool()
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(image)
    image = image & real
    n = image.shape[-1]
    index = torch.arange(n, device=image.device).expand_as(image)
    start = image & ~torch.nn.functional.pad(image[..., :-1], (1, 0), value=False)
    end = image & ~torch.nn.functional.pad(image[..., 1:], (0, 1), value=False)
    k = index - torch.where(start, index, torch.zeros_like(index)).cummax(-1).values + 1
    # an image span of m tokens advances the next text token by ceil(m·δ) (V2PE's v2pe_fix rule); the relative
    # tolerance keeps an exact multiple exact whatever δ's binary expansion
    span_advance = torch.ceil(k.double() * delta * (1 - 1e-12)).long()
    advance = (real & ~image).long() + torch.where(end, span_advance, torch.zeros_like(span_advance))
    inclusive = advance.cumsum(-1)
    return image, real, k, inclusive, inclusive - advance


def v2pe_position_ids(
    input_ids: torch.Tensor | None = None,
    *,
    delta: float,
    image_token_id: int | None = None,
    span_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """V2PE position ids ``[B, n]`` (fp64): text tokens advance by 1, each image token (``input_ids ==
    image_token_id``, or ``span_mask``) by ``delta``, and the first token after an image span continues at
    ``ceil(last image position) + 1`` (the official ``v2pe_fix`` rule). Image token k of a span that follows
    position ``p`` sits at ``p + k·δ`` — one product from an integer count, never a float sum — and fp64 keeps every
    position exact (fp32 cannot tell steps of 1/256 apart beyond 2^16). Padding (``attention_mask`` 0, left or right)
    is skipped and gets position 1, as transformers gives it."""
    delta = _check_delta(delta)
    if span_mask is None:
        if input_ids is None or image_token_id is None:
            raise ValueError("give input_ids and image_token_id, or a boolean span_mask of the image tokens")
        span_mask = input_ids == image_token_id
    image, real, k, inclusive, exclusive = _v2pe_parts(span_mask, attention_mask, delta)
    text_pos = (inclusive - 1).double()
    image_pos = (exclusive - 1).double() + k.double() * delta
    positions = torch.where(image, image_pos, text_pos)
    return torch.where(real, positions, torch.ones_like(positions))


def v2pe_length(span_mask: torch.Tensor, attention_mask: torch.Tensor | None, delta: float) -> torch.Tensor:
    """Per row, the positions the input spans with ``delta`` (largest position + 1)."""
    return _v2pe_parts(span_mask, attention_mask, _check_delta(delta))[3][..., -1]


def v2pe_auto_delta(span_mask: torch.Tensor, attention_mask: torch.Tensor | None, trained_length: int) -> float:
    """The largest δ in 1, 1/2, …, 1/256 for which every row fits ``trained_length`` positions (1/256 if none)."""
    for delta in V2PE_DELTAS:
        if int(v2pe_length(span_mask, attention_mask, delta).max()) <= trained_length:
            return delta
    return V2PE_DELTAS[-1]

