"""Static NTK-aware scaling (bloc97): a larger RoPE base, ``θ' = θ · s^(d/(d−2))`` with d the rotary dim.

Expressed as a plain ``default`` rope with a new ``rope_theta``, so a saved model loads anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from longctx.core.rope import ntk_base

from .base import Applied, LengthConfig, Undo, param
from .registry import Method, register
from .rope_common import RopeContext, apply_rope_method, rope_applied

NAME = "ntk"
DESCRIPTION = "Static NTK-aware scaling: rope_theta raised to base·s^(d/(d-2)) (d = rotary dim)."


@dataclass(frozen=True)
class NTKConfig(LengthConfig):
    """Static NTK. ``alpha`` overrides the scale used in the base formula (default: the factor itself)."""

    method: ClassVar[str] = NAME
    alpha: float | None = param(kind=float, ge=1, doc="the scale in the base formula (default: the factor)")


def rope_parameters(cfg: NTKConfig, params: dict, ctx: RopeContext) -> dict:
    scale = cfg.alpha if cfg.alpha is not None else ctx.factor
    return {**params, "rope_type": "default", "rope_theta": ntk_base(params["rope_theta"], scale, ctx.rotary_dim)}


def apply(model: nn.Module, cfg: NTKConfig, undo: Undo) -> Applied:
    return rope_applied(apply_rope_method(model, NAME, cfg, rope_parameters, undo), cfg)


METHOD = register(Method(NAME, "rope", DESCRIPTION, NTKConfig, apply, export_form="config", aliases=("ntk_aware",)))
