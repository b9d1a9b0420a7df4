"""YaRN (Peng et al. 2023): NTK-by-parts frequencies plus an attention temperature.

Expressed with transformers' own ``yarn`` rope type (``beta_fast``, ``beta_slow``, ``attention_factor``,
``mscale``/``mscale_all_dim``, ``truncate`` exactly as transformers and the paper define them); the pure formulas are
``longctx.core.rope.yarn_inv_freq`` / ``yarn_attention_factor``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import Applied
from .rope_common import RopeConfig, RopeContext, apply_rope_method

NAME = "yarn"
DESCRIPTION = "YaRN: NTK-by-parts interpolation + attention temperature 0.1·ln(s)+1 (transformers rope_type 'yarn')."


@dataclass
class YaRNConfig(RopeConfig):
    """YaRN. ``beta_fast``/``beta_slow``: ramp bounds in rotations over the trained length (paper: 32 and 1);
    ``attention_factor``: override the temperature (default ``0.1·ln(factor)+1``); ``mscale``/``mscale_all_dim``:
    DeepSeek-style temperature; ``truncate``: floor/ceil the ramp bounds (transformers' default)."""

    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


def rope_parameters(cfg: YaRNConfig, params: dict, ctx: RopeContext) -> dict:
    if cfg.beta_fast <= cfg.beta_slow:
        raise ValueError(f"yarn needs beta_fast > beta_slow, got beta_fast={cfg.beta_fast}, beta_slow={cfg.beta_slow}")
    new = {
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


def apply(model: nn.Module, cfg: YaRNConfig) -> Applied:
    return apply_rope_method(model, NAME, cfg, rope_parameters)
