"""What every method's ``apply`` returns, and the small reversible-edit helper they share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Applied", "Undo", "real_key_lengths"]


@dataclass
class Applied:
    """The resolved result of applying one method: what was done and how to take it back."""

    method: str
    params: dict[str, Any]
    trained_length: int | None
    target_length: int | None
    factor: float | None
    layer_types: list[str] | None
    revert: Callable[[], None]
    notes: list[str] = field(default_factory=list)
    reload: dict[str, Any] | None = None  # parameters that re-apply the method to a saved copy (default: params)


class Undo:
    """A stack of undo actions, run last-in first-out (so nested edits unwind in the right order)."""

    def __init__(self) -> None:
        self._actions: list[Callable[[], None]] = []

    def push(self, action: Callable[[], None]) -> None:
        self._actions.append(action)

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        """``setattr`` that remembers the old value (or its absence) for the undo."""
        had = hasattr(obj, name)
        old = getattr(obj, name, None)
        setattr(obj, name, value)

        def restore() -> None:
            if had:
                setattr(obj, name, old)
            elif hasattr(obj, name):
                delattr(obj, name)

        self.push(restore)

    def __call__(self) -> None:
        while self._actions:
            self._actions.pop()()


def real_key_lengths(attention_mask: torch.Tensor | None, batch: int, kv_len: int) -> torch.Tensor:
    """Keys each row attends to (its real tokens), ``[batch]``: from a 4-D bool (True = attend) or additive float
    mask (a key any query of the row may see), a 2-D ``[B, kv]`` padding mask (flash attention's; 1 = real), or
    ``kv_len`` for every row without a mask."""
    if attention_mask is None:
        return torch.full((batch,), kv_len)
    if attention_mask.dim() == 2:
        return attention_mask.bool().sum(-1)
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    return allowed.any(dim=-2).any(dim=1).sum(-1).expand(batch)

