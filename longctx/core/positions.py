"""Pure position maps and parameter solvers (no transformers import).

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
