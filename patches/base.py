"""What every method's ``apply`` returns, and the small reversible-edit helper they share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Applied", "Undo"]


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
