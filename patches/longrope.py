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

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from longctx.core.rope import default_inv_freq, ntk_factors, yarn_inv_freq

from .base import Applied, LengthConfig, Undo, param
from .registry import Method, register
from .rope_common import RopeContext, apply_rope_method, rope_applied
from .space import SearchSpace, Tunable

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


ATTENTION_RANGE = (1.0, 1.5)


def seeds(rotary: int, theta: float, factor: float, trained: int) -> dict[str, tuple[list[float], float]]:
    """``{name: (long_factor, attention_factor)}`` of PI, NTK and YaRN written per dimension (``rotary`` dims)."""
    half = rotary // 2
    base = default_inv_freq(rotary, theta).double()
    yarn = yarn_inv_freq(rotary, theta, factor, trained).double()
    yarn_factors = [max(1.0, min(factor, float(x))) for x in (base / yarn)]
    default_attention = math.sqrt(1 + math.log(factor) / math.log(trained)) if factor > 1 else 1.0
    return {
        "pi": ([float(factor)] * half, default_attention),
        "ntk": (ntk_factors(rotary, factor), default_attention),
        "yarn": (yarn_factors, 0.1 * math.log(factor) + 1),
    }


def encode(factors: list[float], s: float) -> list[float]:
    """Monotone factors in [1, s] → the sampler's unit cube (x_0, u_1 … u_{h−1}); :func:`decode` inverts it."""
    top = math.log(s)
    logs = [min(max(math.log(max(f, 1.0)), 0.0), top) for f in factors]
    out = [logs[0] / top if top > 0 else 0.0]
    previous = logs[0]
    for value in logs[1:]:
        value = max(value, previous)  # made monotone
        room = top - previous
        out.append((value - previous) / room if room > 1e-12 else 0.0)
        previous = value
    return [min(max(x, 0.0), 1.0) for x in out]


def decode(unit: list[float], s: float) -> list[float]:
    top = math.log(s)
    current = unit[0] * top
    logs = [current]
    for u in unit[1:]:
        current = current + u * (top - current)
        logs.append(current)
    return [math.exp(v) for v in logs]


def tune(model: nn.Module, target_length: int) -> SearchSpace:
    """LongRoPE's space: monotone factors 1 <= λ_0 <= … <= s (λ_0 = s^x_0, log λ_i = log λ_{i−1} + u_i·(ln s −
    log λ_{i−1}), x_0, u_i in [0, 1]) and the attention factor in [1, 1.5]; seeds PI, NTK and YaRN per dimension."""
    from longctx.models import find_rotary_modules, layer_params, rotary_dim, trained_length

    rotaries = find_rotary_modules(model)
    if not rotaries:
        raise ValueError(f"{type(model).__name__} has no rotary position embeddings: longrope tunes RoPE factors")
    config = rotaries[0].config
    L = trained_length(config)
    if target_length <= L:
        raise ValueError(f"target_length={target_length} is not longer than the trained length {L}")
    nested = any(isinstance(v, dict) for v in config.rope_parameters.values())
    params = layer_params(config, "full_attention" if nested and "full_attention" in config.rope_parameters else None)
    d = rotary_dim(config, params)
    s = target_length / L
    names = [f"x{i}" for i in range(d // 2)]
    seeded = {name: {"long_factor": factors, "attention_factor": attention}
              for name, (factors, attention) in seeds(d, params["rope_theta"], s, L).items()}

    def to_params(sampled: dict[str, Any]) -> dict[str, Any]:
        factors = decode([sampled[n] for n in names], s)
        return {"long_factor": [round(x, 6) for x in factors], "attention_factor": sampled["attention"]}

    def to_sampled(params: dict[str, Any]) -> dict[str, Any]:
        attention = min(max(float(params["attention_factor"]), ATTENTION_RANGE[0]), ATTENTION_RANGE[1])
        return {**dict(zip(names, encode(list(params["long_factor"]), s))), "attention": attention}

    dims: dict[str, Tunable] = {n: Tunable(0.0, 1.0, float) for n in names}
    dims["attention"] = Tunable(*ATTENTION_RANGE, float)
    return SearchSpace(dims, seeded, {"target_length": target_length}, to_params, to_sampled, genetic=True,
                       note=f"{d // 2} monotone factors in [1, {s:g}] and the attention factor in [1, 1.5]")


METHOD = register(Method(
    NAME, "rope", DESCRIPTION, LongRoPEConfig, apply, export_form="config", tune=tune,
    cache_exact=False,  # transformers switches short -> long per forward: keys cached before it keep the short ones
    examples=lambda L: [{"factor": 4.0}, {"target_length": 4 * L, "attention_factor": 1.2}],
))
