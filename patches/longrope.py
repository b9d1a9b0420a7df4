"""LongRoPE-style per-dimension frequency factors (Ding et al., ICML 2024; ``microsoft/LongRoPE``), expressed with
transformers' own ``longrope`` rope type — the form Phi-3 ships and vLLM and llama.cpp serve.

Each rotary dimension pair i has its own factor λ_i: its frequency is θ^(−2i/d) / λ_i. ``long_factor`` applies to
inputs longer than the trained length L, ``short_factor`` (default all ones: the model as trained) to the others
(transformers switches per forward, as it does for Phi-3); ``attention_factor`` scales cos and sin (default
transformers' ``sqrt(1 + ln s / ln L)``). Without ``long_factor`` the factors are static NTK's, written per
dimension (λ_i = s^(2i/(d−2))): the seed a search starts from (``longctx.core.rope.ntk_factors``).

The patched config is a standard one (``rope_type: longrope`` with ``original_max_position_embeddings`` = L and
``max_position_embeddings`` = the target, as Phi-3's config reads): ``save_pretrained`` and ``longctx export`` write
it, plain transformers loads it extended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from longctx.core.rope import ntk_factors

from .base import Applied, LengthConfig, Undo, param
from .registry import Method, register
from .rope_common import RopeContext, apply_rope_method, rope_applied

NAME = "longrope"
DESCRIPTION = ("LongRoPE: per-dimension frequency factors (long for inputs past L, short within), transformers "
               "rope_type 'longrope' (Phi-3's form); default factors: static NTK's, per dimension.")


@dataclass(frozen=True)
class LongRoPEConfig(LengthConfig):
    """LongRoPE. ``long_factor`` / ``short_factor``: one factor per rotary dimension pair (rotary dim / 2 numbers,
    each > 0; a frequency is divided by its factor); ``attention_factor``: cos / sin × it (default
    ``sqrt(1 + ln s / ln L)``)."""

    method: ClassVar[str] = NAME
    long_factor: tuple[float, ...] | None = param(kind=tuple, gt=0,
                                                  doc="per-dimension factors past the trained length (default: NTK's)")
    short_factor: tuple[float, ...] | None = param(kind=tuple, gt=0,
                                                   doc="per-dimension factors within it (default: all 1)")
    attention_factor: float | None = param(kind=float, gt=0, doc="cos / sin x this (default sqrt(1 + ln s / ln L))")


def rope_parameters(cfg: LongRoPEConfig, params: dict, ctx: RopeContext) -> dict:
    """transformers' ``longrope``: the trained length in ``original_max_position_embeddings`` (top level and inside),
    the target in ``max_position_embeddings`` (Phi-3's reading: the factor is their ratio)."""
    half = ctx.rotary_dim // 2
    long = list(cfg.long_factor) if cfg.long_factor is not None else ntk_factors(ctx.rotary_dim, ctx.factor)
    short = list(cfg.short_factor) if cfg.short_factor is not None else [1.0] * half
    for name, factors in (("long_factor", long), ("short_factor", short)):
        if len(factors) != half:
            raise ValueError(f"longrope: {name} needs one factor per rotary dimension pair ({half} for a rotary dim "
                             f"of {ctx.rotary_dim}), got {len(factors)}")
    new = {
        "__max_position_embeddings__": ctx.target_length,
        "__original_max_position_embeddings__": ctx.trained_length,
        **{k: v for k, v in params.items() if k not in ("factor",)},
        "rope_type": "longrope",
        "factor": ctx.factor,  # = max / original; 4.x requires the key, 5.x prefers it
        "long_factor": [float(x) for x in long],
        "short_factor": [float(x) for x in short],
        "original_max_position_embeddings": ctx.trained_length,
    }
    if cfg.attention_factor is not None:
        new["attention_factor"] = float(cfg.attention_factor)
    return new


def apply(model: nn.Module, cfg: LongRoPEConfig, undo: Undo) -> Applied:
    applied = rope_applied(apply_rope_method(model, NAME, cfg, rope_parameters, undo), cfg)
    applied.params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in applied.params.items()}
    return applied


METHOD = register(Method(
    NAME, "rope", DESCRIPTION, LongRoPEConfig, apply, export_form="config",
    cache_exact=False,  # transformers switches short -> long per forward: keys cached before it keep the short ones
    examples=lambda L: [{"factor": 4.0}, {"target_length": 4 * L, "attention_factor": 1.2}],
))
