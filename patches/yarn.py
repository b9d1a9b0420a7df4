"""YaRN (Peng et al. 2023): NTK-by-parts frequencies plus an attention temperature.

Expressed with transformers' own ``yarn`` rope type (``beta_fast``, ``beta_slow``, ``attention_factor``,
``mscale``/``mscale_all_dim``, ``truncate`` exactly as transformers and the paper define them); the pure formulas are
``longctx.core.rope.yarn_inv_freq`` / ``yarn_attention_factor``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from .base import Applied, LengthConfig, Undo, param
from .registry import Method, register
from .rope_common import RopeContext, apply_rope_method, rope_applied

NAME = "yarn"
DESCRIPTION = "YaRN: NTK-by-parts interpolation + attention temperature 0.1·ln(s)+1 (transformers rope_type 'yarn')."


@dataclass(frozen=True)
class YaRNConfig(LengthConfig):
    """YaRN. ``beta_fast``/``beta_slow``: ramp bounds in rotations over the trained length (paper: 32 and 1);
    ``attention_factor``: override the temperature (default ``0.1·ln(factor)+1``); ``mscale``/``mscale_all_dim``:
    DeepSeek-style temperature; ``truncate``: floor/ceil the ramp bounds (transformers' default)."""

    method: ClassVar[str] = NAME
    beta_fast: float = param(32.0, kind=float, gt=0, optional=False,
                             doc="rotations over the trained length above which a dim keeps its frequency")
    beta_slow: float = param(1.0, kind=float, gt=0, optional=False,
                             doc="rotations below which a dim is interpolated by the factor")
    attention_factor: float | None = param(kind=float, gt=0, doc="the attention temperature (default 0.1 ln s + 1)")
    mscale: float | None = param(kind=float, gt=0, doc="DeepSeek-style temperature numerator")
    mscale_all_dim: float | None = param(kind=float, gt=0, doc="DeepSeek-style temperature denominator")
    truncate: bool = param(True, kind=bool, optional=False, doc="floor / ceil the ramp bounds")

    def validate(self) -> None:
        super().validate()
        if self.beta_fast <= self.beta_slow:
            raise ValueError(f"yarn needs beta_fast > beta_slow, got beta_fast={self.beta_fast}, "
                             f"beta_slow={self.beta_slow}")


def rope_parameters(cfg: YaRNConfig, params: dict, ctx: RopeContext) -> dict:
    """transformers' ``yarn``. ``max_position_embeddings`` and a top-level ``original_max_position_embeddings`` are
    the trained length: the one reading every transformers release shares (``patches/portable.py``)."""
    new = {
        "__max_position_embeddings__": ctx.trained_length,
        "__original_max_position_embeddings__": ctx.trained_length,
        **params,
        "rope_type": "yarn",
        "factor": ctx.factor,
        "original_max_position_embeddings": ctx.trained_length,
        "beta_fast": float(cfg.beta_fast),
        "beta_slow": float(cfg.beta_slow),
    }
    if not cfg.truncate:
        new["truncate"] = False
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
        value = getattr(cfg, key)
        if value is not None:
            new[key] = float(value)
    return new


def apply(model: nn.Module, cfg: YaRNConfig, undo: Undo) -> Applied:
    return rope_applied(apply_rope_method(model, NAME, cfg, rope_parameters, undo), cfg)


METHOD = register(Method(NAME, "rope", DESCRIPTION, YaRNConfig, apply, export_form="config", compare_by_default=True))
