"""Recurrent absolute positions (LongEmbed): position ``p`` → ``p mod L`` (identity for inputs ≤ L)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..base import Applied, Undo
from ..registry import Method, register
from .common import AbsoluteConfig, install_positions

NAME = "recurrent"
DESCRIPTION = "absolute positions recurring: p -> p mod L (LongEmbed); exact for n <= L"


@dataclass(frozen=True)
class RecurrentConfig(AbsoluteConfig):
    """Recurrent positions ``p mod L`` (see :class:`AbsoluteConfig`)."""

    method: ClassVar[str] = NAME


def apply(model: nn.Module, cfg: RecurrentConfig, undo: Undo) -> Applied:
    return install_positions(model, cfg, undo, "recurrent", False, [])


METHOD = register(Method(NAME, "absolute", DESCRIPTION, RecurrentConfig, apply, export_form="longctx", bounded=False,
                         unchanged_within=True))
