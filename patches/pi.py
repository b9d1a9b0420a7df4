"""Position interpolation (Chen et al. 2023, "Extending Context Window of LLMs via Positional Interpolation").

Expressed with transformers' own ``linear`` rope type: every frequency divided by the factor. On an absolute-position
encoder ``pi`` means ``pi_absolute`` (the learned table interpolated, ``patches/absolute/pi.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from .base import Applied, LengthConfig, Undo
from .registry import Method, register
from .rope_common import RopeContext, apply_rope_method, rope_applied

NAME = "pi"
DESCRIPTION = "Position interpolation: positions squeezed by the factor (transformers rope_type 'linear')."


@dataclass(frozen=True)
class PIConfig(LengthConfig):
    """Position interpolation: only ``factor`` / ``target_length`` (and ``trained_length``)."""

    method: ClassVar[str] = NAME


def rope_parameters(cfg: PIConfig, params: dict, ctx: RopeContext) -> dict:
    """transformers' ``linear``; ``max_position_embeddings`` stays the trained length, from which vLLM and SGLang
    count the served length (× factor)."""
    return {**params, "rope_type": "linear", "factor": ctx.factor, "__max_position_embeddings__": ctx.trained_length}


def apply(model: nn.Module, cfg: PIConfig, undo: Undo) -> Applied:
    return rope_applied(apply_rope_method(model, NAME, cfg, rope_parameters, undo), cfg)


METHOD = register(Method(NAME, "rope", DESCRIPTION, PIConfig, apply, export_form="config", aliases=("linear",),
                         on_absolute="pi_absolute"))
