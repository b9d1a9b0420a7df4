"""CLEX (Chen et al., ICLR 2024): continuous length-extrapolation scaling, on transformers' own model classes.

The math is ``longctx.core.clex``; this module is the integration:

* rope type ``longctx_clex`` in ``ROPE_INIT_FUNCTIONS`` (its init gives the t = 1 frequencies, the model's own), with
  ``factor`` = ``max_factor`` and ``original_max_position_embeddings`` = L in ``rope_parameters``;
* the frequencies of every scale ``t = 1 … max_factor`` are computed once at patch time — integrated from learned
  ODE weights (``ode_weights``: a CLEX checkpoint directory or weights file, tensors named
  ``…clex_layer.proj_func.ode_up_proj`` / ``ode_down_proj``), or, without them, the training-free limit in closed
  form: NTK scaling with ``α = 2t − 1`` (the ODE with zero dynamics; logged);
* a forward pre-hook on each rotary module selects the row of ``t = ceil(n / L)`` (n = largest position + 1, capped
  at ``max_factor``) for the current forward;
* an attention function (``AttentionInterface`` + ``AttentionMaskInterface``, wrapping the model's own sdpa / eager /
  flash attention) keeps the KV cache consistent — when ``t`` steps up during generation, the cached keys are
  re-rotated once, in place, from the old frequencies to the new ones (``R(p·f_new) k = R(p·(f_new − f_old)) ·
  R(p·f_old) k``); the reference re-rotates every cached key at every step — and applies ``log_scale``: queries
  multiplied by ``log(kv_len) / log(L)`` for each row's real keys (unclamped: below 1 for inputs shorter than L), on
  every backend. The reference does this only on its flash-attention path (its eager path does not); released
  CLEX configs set ``log_scale: true``.

``t`` is one per forward (the longest row of a batch), as in the reference, which assumes batch 1: rows of a
left-padded batch equal their own runs when they fall in the same ``t``.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from longctx.core.clex import (
    ACTIVATIONS,
    clex_inv_freq_table,
    clex_scale,
    clex_training_free_table,
    log_scale_factor,
    read_ode_weights,
)
from longctx.core.rope import default_inv_freq, rotate_by_angles
from longctx.models import layer_params, rotary_dim

from .base import Applied, Undo, real_key_lengths
from .rope_common import (
    RopeConfig,
    RopeContext,
    apply_rope_method,
    base_attention,
    install_attention_wrapper,
    layer_type_of,
)

NAME = "clex"
DESCRIPTION = (
    "CLEX: frequencies from a learned ODE in the scale t = ceil(n/L) (released CLEX checkpoints: ode_weights); "
    "without learned weights its training-free limit, NTK with alpha = 2t - 1."
)
ROPE_TYPE = "longctx_clex"
ATTN_PREFIX = "longctx_clex_"
logger = logging.getLogger("longctx")


@dataclass
class CLEXConfig(RopeConfig):
    """CLEX. ``max_factor``: largest scale t (default: ``ceil(target / trained)``; or give ``factor`` /
    ``target_length``); ``ode_weights``: a CLEX checkpoint directory or a ``.safetensors`` / ``.bin`` file holding
    ``…clex_layer.proj_func.ode_up_proj`` / ``ode_down_proj`` (None: the training-free limit); ``param_factor``,
    ``act``, ``time_dt``: the ODE's width factor, activation (``tanh`` / ``silu``) and RK4 step, as in the checkpoint's
    ``rope_scaling``; ``log_scale``: multiply queries by ``log(kv_len) / log(L)`` (the reference's flash path)."""

    max_factor: int | None = None
    ode_weights: str | None = None
    param_factor: int = 1
    act: str = "tanh"
    time_dt: float = 0.01
    log_scale: bool = False


def compute_clex_parameters(config: Any, device: torch.device | None = None, seq_len: Any = None,
                            layer_type: str | None = None, **_: Any) -> tuple[torch.Tensor, float]:
    """``ROPE_INIT_FUNCTIONS`` entry: the t = 1 frequencies (the model's own); the patch swaps in the row of the
    current scale before every forward."""
    params = layer_params(config, layer_type)
    return default_inv_freq(rotary_dim(config, params), params["rope_theta"], device), 1.0


ROPE_INIT_FUNCTIONS[ROPE_TYPE] = compute_clex_parameters


@dataclass
class _State:
    trained_length: int
    max_factor: int
    log_scale: bool
    tables: dict[Any, torch.Tensor] = field(default_factory=dict)  # layer type (None: flat) -> [max_factor, d/2]
    t: int = 1  # the scale of the current forward
    cache_t: dict[int, int] = field(default_factory=dict)  # layer index -> scale its cached keys are rotated with
    positions: dict[int, torch.Tensor] = field(default_factory=dict)  # layer index -> [B, kv] positions of its keys


_STATES: dict[int, _State] = {}  # id(config) -> state, while a model is patched


def rope_parameters(cfg: CLEXConfig, params: dict, ctx: RopeContext) -> dict:
    return {**params, "rope_type": ROPE_TYPE, "factor": float(_max_factor(cfg, ctx)),
            "original_max_position_embeddings": ctx.trained_length}


def _max_factor(cfg: CLEXConfig, ctx: RopeContext) -> int:
    return int(cfg.max_factor) if cfg.max_factor is not None else int(math.ceil(ctx.factor - 1e-9))


def _frequency_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    position_ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
    state = _STATES.get(id(module.config))
    if position_ids is None or state is None:
        return
    state.t = clex_scale(int(position_ids.max().item()) + 1, state.trained_length, state.max_factor)
    for layer_type, table in state.tables.items():
        buf = getattr(module, f"{layer_type}_inv_freq" if layer_type is not None else "inv_freq")
        buf.copy_(table[state.t - 1].to(buf.device, buf.dtype))


def _sync_cache(module: nn.Module, key: torch.Tensor, q_len: int, position_ids: Any, state: _State) -> None:
    """Track the positions of this layer's cached keys; when the scale changed since they were rotated, re-rotate
    them once, in place (the tensor the cache holds)."""
    layer, (batch, _, kv_len, _) = getattr(module, "layer_idx", None), key.shape
    if layer is None:  # an encoder's attention: no cache
        return
    if position_ids is None:
        position_ids = torch.arange(kv_len - q_len, kv_len, device=key.device)[None]
    pos = position_ids.to(device=key.device, dtype=torch.float32).expand(batch, q_len)
    past = kv_len - q_len
    history = state.positions.get(layer)
    if past == 0 or history is None or history.shape != (batch, past):
        state.positions[layer] = pos.clone()
        state.cache_t[layer] = state.t
        if past and (history is None or history.shape != (batch, past)):
            raise RuntimeError("clex lost track of the KV cache (its length or batch changed outside a forward: "
                               "cache cropping or beam reordering are not supported)")
        return
    old_t = state.cache_t[layer]
    if old_t != state.t:
        table = state.tables[layer_type_of(module)].to(key.device)
        delta = history[..., None] * (table[state.t - 1] - table[old_t - 1])[None, None]  # [B, past, d/2]
        key[:, :, :past] = rotate_by_angles(key[:, :, :past], delta[:, None]).to(key.dtype)
        state.cache_t[layer] = state.t
    state.positions[layer] = torch.cat((history, pos), dim=1)


def _make_attention(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        state = _STATES.get(id(module.config))
        if state is not None and layer_type_of(module) in state.tables:
            _sync_cache(module, key, query.shape[2], kwargs.get("position_ids"), state)
            if state.log_scale:
                n = real_key_lengths(attention_mask, query.shape[0], key.shape[2]).to(query.device)
                query = query * log_scale_factor(n, state.trained_length).to(query.dtype).view(-1, 1, 1, 1)
        return base_attention(base, module)(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{ATTN_PREFIX}{base}"
    return attention


def _post(cfg: CLEXConfig, weights: tuple[torch.Tensor, torch.Tensor] | None):
    def post(model: nn.Module, rotaries: list, undo: Undo, contexts: list[RopeContext]) -> list[str]:
        ctx = contexts[0]
        max_factor = _max_factor(cfg, ctx)
        configs = {id(r.config): r.config for r in rotaries}
        for cid, config in configs.items():
            state = _State(ctx.trained_length, max_factor, cfg.log_scale)
            for c in contexts:
                params = layer_params(config, c.layer_type)
                dim, theta = c.rotary_dim, params["rope_theta"]
                if weights is None:
                    state.tables[c.layer_type] = clex_training_free_table(dim, theta, max_factor)
                else:
                    base = default_inv_freq(dim, theta)
                    state.tables[c.layer_type] = clex_inv_freq_table(base, *weights, cfg.act, max_factor, cfg.time_dt)
            _STATES[cid] = state
            undo.push(lambda cid=cid: _STATES.pop(cid, None))
        for r in rotaries:
            handle = r.module.register_forward_pre_hook(_frequency_pre_hook, with_kwargs=True)
            undo.push(handle.remove)
        name = install_attention_wrapper(model, ATTN_PREFIX, _make_attention, "clex", undo)
        weakref.finalize(model, lambda ids=list(configs): [_STATES.pop(i, None) for i in ids])
        source = (f"learned ODE weights from {cfg.ode_weights}" if weights is not None else
                  "no learned weights: the training-free limit, NTK scaling with alpha = 2t - 1")
        logger.info(f"longctx: clex with {source}; t = ceil(n / {ctx.trained_length}) up to {max_factor}")
        notes = [f"clex: {source}", f"attention '{name}': cached keys re-rotated once when t steps up"
                 + (f"; queries scaled by log(kv_len) / log({ctx.trained_length})" if cfg.log_scale else "")]
        return notes

    return post


def apply(model: nn.Module, cfg: CLEXConfig) -> Applied:
    if cfg.act not in ACTIVATIONS:
        raise ValueError(f"clex act must be one of {sorted(ACTIVATIONS)}, got {cfg.act!r}")
    if cfg.max_factor is not None:
        if int(cfg.max_factor) < 1 or int(cfg.max_factor) != cfg.max_factor:
            raise ValueError(f"clex max_factor must be an integer >= 1, got {cfg.max_factor}")
        if cfg.factor is None and cfg.target_length is None:
            cfg.factor = float(cfg.max_factor)
    if cfg.time_dt <= 0:
        raise ValueError(f"clex time_dt must be > 0, got {cfg.time_dt}")
    weights = read_ode_weights(cfg.ode_weights) if cfg.ode_weights else None  # fails before touching the model
    applied = apply_rope_method(model, NAME, cfg, rope_parameters, post=_post(cfg, weights))
    applied.params["max_factor"] = int(cfg.max_factor) if cfg.max_factor is not None else math.ceil(applied.factor - 1e-9)
    if cfg.ode_weights is None:
        applied.params["training_free"] = True
    return applied
