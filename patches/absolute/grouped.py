"""Grouped absolute positions (LongEmbed): position ``p`` → ``p // g`` with ``g = ceil(n / L)`` for the row's length
``n``, so inputs ≤ L keep their positions exactly (``g = 1``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..base import Applied, Undo
from ..registry import Method, register
from .common import AbsoluteConfig, install_positions

NAME = "grouped"
DESCRIPTION = "absolute positions grouped: p -> p // ceil(n / L) for an n-token input (LongEmbed); exact for n <= L"


@dataclass(frozen=True)
class GroupedConfig(AbsoluteConfig):
    """Grouped positions ``p // ceil(n / L)`` per input of ``n`` tokens (see :class:`AbsoluteConfig`)."""

    method: ClassVar[str] = NAME


def apply(model: nn.Module, cfg: GroupedConfig, undo: Undo) -> Applied:
    return install_positions(model, cfg, undo, "grouped", False, [])


METHOD = register(Method(NAME, "absolute", DESCRIPTION, GroupedConfig, apply, export_form="longctx", bounded=False,
                         compare_by_default=True, unchanged_within=True,
                         examples=lambda L: [{"target_length": 4 * L}, {"target_length": 4 * L, "log_scale": True}]))
