"""Dynamic NTK (emozilla): the NTK base grows with the sequence length, ``α = s·n/L − (s − 1)``.

Two behaviours, both registered as rope types in transformers' ``ROPE_INIT_FUNCTIONS``:

* ``cache_consistent=False`` (default, rope type ``longctx_dynamic``): transformers' own ``dynamic`` behaviour,
  logits equal to a model loaded with ``rope_parameters={"rope_type": "dynamic", …}``. Frequencies are recomputed
  when the sequence grows; keys already in the KV cache keep the frequencies they were rotated with
  (transformers issue 25104), so cached generation past the trained length differs from recomputing the sequence;
  and the frequencies only grow (a short input after a long one reuses the long one's frequencies until it drops
  below the trained length).
* ``cache_consistent=True`` (rope type ``longctx_ntk_by_length``): every forward uses exactly the frequencies of its
  current length n (= max position + 1, no grow-only memory), and an attention function (registered with
  ``AttentionInterface`` and ``AttentionMaskInterface``, wrapping the model's own sdpa/eager/flash attention)
  re-rotates the cached keys from the frequencies they were written with to the current ones:
  ``R(p·f_now) k = R(p·(f_now − f_then)) · R(p·f_then) k``. Every attention call then sees query and keys under one
  set of frequencies, as RoPE's relative-position property requires: for a one-layer model cached decoding equals
  recomputing the sequence; in deeper models the cached states of later layers were computed from hidden states at
  the earlier length, which no cache can undo (``use_cache=False`` is the exact recomputation). Cost
  O(cache · head_dim) per layer per step, no extra cache. Beam-search cache reordering is not tracked in this mode.

transformers' ``dynamic`` type reads the trained length from ``max_position_embeddings``; longctx's types read it
from ``rope_parameters["original_max_position_embeddings"]``, so ``max_position_embeddings`` can announce the target
length like every other method.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from longctx.core.rope import dynamic_ntk_inv_freq, rotate_by_angles
from longctx.models import layer_params, rotary_dim

from .base import Applied, Undo
from .rope_common import (
    RopeConfig,
    RopeContext,
    apply_rope_method,
    base_attention,
    install_attention_wrapper,
    layer_type_of,
)

NAME = "dynamic_ntk"
DESCRIPTION = (
    "Dynamic NTK: base grows with the current length (transformers' 'dynamic'); cache_consistent=True rotates "
    "cached keys to the current frequencies (no stale-cache mismatch)."
)
ROPE_TYPE = "longctx_dynamic"
ROPE_TYPE_CONSISTENT = "longctx_ntk_by_length"
ATTN_PREFIX = "longctx_ntk_by_length_"


@dataclass
class DynamicNTKConfig(RopeConfig):
    """Dynamic NTK. ``cache_consistent``: see the module docstring."""

    cache_consistent: bool = False


def _seq_len_to_int(seq_len: Any, default: int) -> int:
    if seq_len is None:
        return default
    if isinstance(seq_len, torch.Tensor):
        return int(seq_len.max().item())
    return int(seq_len)


def compute_dynamic_parameters(
    config: Any, device: torch.device | None = None, seq_len: Any = None, layer_type: str | None = None, **_: Any
) -> tuple[torch.Tensor, float]:
    """``ROPE_INIT_FUNCTIONS`` entry for both longctx dynamic types (the length only comes from the rope params)."""
    params = layer_params(config, layer_type)
    original = int(params["original_max_position_embeddings"])
    n = _seq_len_to_int(seq_len, original)
    inv_freq = dynamic_ntk_inv_freq(rotary_dim(config, params), params["rope_theta"], params["factor"], n, original)
    return inv_freq.to(device) if device is not None else inv_freq, 1.0


ROPE_INIT_FUNCTIONS[ROPE_TYPE] = compute_dynamic_parameters
ROPE_INIT_FUNCTIONS[ROPE_TYPE_CONSISTENT] = compute_dynamic_parameters


def rope_parameters(cfg: DynamicNTKConfig, params: dict, ctx: RopeContext) -> dict:
    return {
        **params,
        "rope_type": ROPE_TYPE_CONSISTENT if cfg.cache_consistent else ROPE_TYPE,
        "factor": ctx.factor,
        "original_max_position_embeddings": ctx.trained_length,
    }


# ---------------------------------------------------------------------------------------------------------------
# cache-consistent mode: per-forward frequencies + key re-rotation in attention
# ---------------------------------------------------------------------------------------------------------------
class _History:
    """Per attention layer: the position and the frequencies each cached key was rotated with."""

    def __init__(self) -> None:
        self.positions: torch.Tensor | None = None  # [B, kv] fp32
        self.inv_freq: torch.Tensor | None = None  # [kv, rot/2] fp32


# id(config) -> {layer key -> _History}; entries exist only while a model is patched in this mode
_STATES: dict[int, dict[Any, _History]] = {}


def _make_attention(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        histories = _STATES.get(id(module.config))
        layer_type = layer_type_of(module) if histories is not None else None
        params = layer_params(module.config, layer_type) if histories is not None else None
        if histories is None or params.get("rope_type") != ROPE_TYPE_CONSISTENT:
            return base_attention(base, module)(module, query, key, value, attention_mask, **kwargs)
        key = _rerotate_keys(module, key, query.shape[2], kwargs.get("position_ids"), params, histories)
        return base_attention(base, module)(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{ATTN_PREFIX}{base}"
    return attention


def _rerotate_keys(module, key, q_len, position_ids, params, histories) -> torch.Tensor:
    batch, _, kv_len, _ = key.shape
    device = key.device
    if position_ids is None:
        position_ids = torch.arange(kv_len - q_len, kv_len, device=device)[None]
    pos = position_ids.to(device=device, dtype=torch.float32).expand(batch, q_len)
    original = int(params["original_max_position_embeddings"])
    seq_len = int(position_ids.max().item()) + 1
    dim = rotary_dim(module.config, params)
    inv_now = dynamic_ntk_inv_freq(dim, params["rope_theta"], params["factor"], seq_len, original, device)

    hist = histories.setdefault(module.layer_idx, _History())
    if kv_len == q_len or hist.positions is None:
        hist.positions, hist.inv_freq = pos.clone(), inv_now.expand(q_len, -1).clone()
    else:
        if hist.positions.shape[1] + q_len != kv_len or hist.positions.shape[0] != batch:
            raise RuntimeError(
                "dynamic_ntk(cache_consistent=True) lost track of the KV cache (its length or batch changed outside "
                "a forward: cache cropping or beam reordering are not supported in this mode)"
            )
        hist.positions = torch.cat((hist.positions, pos), dim=1)
        hist.inv_freq = torch.cat((hist.inv_freq, inv_now.expand(q_len, -1)), dim=0)
    delta = hist.positions[..., None] * (inv_now - hist.inv_freq)[None]  # [B, kv, rot/2]
    if not torch.any(delta):
        return key
    return rotate_by_angles(key, delta[:, None])


def _frequency_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Set the rotary module's frequencies to exactly those of the current length (no grow-only hysteresis)."""
    position_ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
    if position_ids is None:
        return
    seq_len = int(position_ids.max().item()) + 1
    config = module.config
    rope_types = module.rope_type if isinstance(module.rope_type, dict) else {None: module.rope_type}
    for layer_type, rope_type in rope_types.items():
        if rope_type != ROPE_TYPE_CONSISTENT:
            continue
        prefix = f"{layer_type}_" if layer_type is not None else ""
        buf = getattr(module, f"{prefix}inv_freq")
        inv_freq, _ = compute_dynamic_parameters(config, seq_len=seq_len, layer_type=layer_type)
        buf.copy_(inv_freq.to(buf.device, buf.dtype))


def _post(model: nn.Module, rotaries: list, undo: Undo, contexts: list[RopeContext]) -> list[str]:
    notes = []
    configs = {id(r.config): r.config for r in rotaries}
    if not any(r.config.rope_parameters.get("rope_type") == ROPE_TYPE_CONSISTENT or any(
        isinstance(p, dict) and p.get("rope_type") == ROPE_TYPE_CONSISTENT for p in r.config.rope_parameters.values()
    ) for r in rotaries):
        # standard mode: transformers' dynamic semantics count the trained length from these attributes
        for r in rotaries:
            ctx = contexts[0]
            r.module.max_seq_len_cached = ctx.trained_length
            r.module.original_max_seq_len = ctx.trained_length
        return notes
    for r in rotaries:
        handle = r.module.register_forward_pre_hook(_frequency_pre_hook, with_kwargs=True)
        undo.push(handle.remove)
    for cid, config in configs.items():
        _STATES[cid] = {}
        undo.push(lambda cid=cid: _STATES.pop(cid, None))
    name = install_attention_wrapper(model, ATTN_PREFIX, _make_attention, "dynamic_ntk(cache_consistent=True)", undo)
    notes.append(f"cache-consistent: attention '{name}' re-rotates cached keys to the current frequencies")
    weakref.finalize(model, lambda ids=list(configs): [_STATES.pop(i, None) for i in ids])
    return notes


def apply(model: nn.Module, cfg: DynamicNTKConfig) -> Applied:
    return apply_rope_method(model, NAME, cfg, rope_parameters, post=_post)
