"""Position interpolation (Chen et al. 2023, "Extending Context Window of LLMs via Positional Interpolation").

Expressed with transformers' own ``linear`` rope type: every frequency divided by the factor.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import Applied
from .rope_common import RopeConfig, RopeContext, apply_rope_method

NAME = "pi"
DESCRIPTION = "Position interpolation: positions squeezed by the factor (transformers rope_type 'linear')."


@dataclass
class PIConfig(RopeConfig):
    """Position interpolation. Only ``factor`` / ``target_length`` (see :class:`RopeConfig`)."""


def rope_parameters(cfg: PIConfig, params: dict, ctx: RopeContext) -> dict:
    return {**params, "rope_type": "linear", "factor": ctx.factor}


def apply(model: nn.Module, cfg: PIConfig) -> Applied:
    return apply_rope_method(model, NAME, cfg, rope_parameters)
