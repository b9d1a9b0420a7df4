"""Dynamic NTK (emozilla): the NTK base grows with the sequence length, ``α = s·n/L − (s − 1)``.

Two behaviours:

* ``cache_consistent=False`` (default): transformers' own ``dynamic`` rope type, written into the config as
  transformers and vLLM read it — ``{"rope_type": "dynamic", "factor": s}`` with ``max_position_embeddings`` at the
  trained length L (both count the trained length from it) — so the patched model *is* a standard model: logits
  equal to one loaded with that config, and a ``save_pretrained`` copy loads anywhere. Frequencies are recomputed
  when the sequence grows; keys already in the KV cache keep the frequencies they were rotated with (transformers
  issue 25104), so cached generation past L differs from recomputing the sequence; and the frequencies only grow (a
  short input after a long one reuses the long one's frequencies until it drops below L).
* ``cache_consistent=True``: every forward uses exactly the frequencies of its current length n (= max position +
  1, no grow-only memory: a rotary pre-hook, the config keeps the model's own RoPE and a ``longctx`` block), and an
  attention runtime (``patches/attention.py``, wrapping the model's own sdpa / eager / flash attention) re-rotates
  the cached keys from the frequencies they were written with to the current ones:
  ``R(p·f_now) k = R(p·(f_now − f_then)) · R(p·f_then) k``. Every attention call then sees query and keys under one
  set of frequencies, as RoPE's relative-position property requires: for a one-layer model cached decoding equals
  recomputing the sequence; in deeper models the cached states of later layers were computed from hidden states at
  the earlier length, which no cache can undo (``use_cache=False`` is the exact recomputation). Cost
  O(cache · head_dim) per layer per step, no extra cache. Beam-search cache reordering is not tracked in this mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from longctx.core.rope import dynamic_ntk_inv_freq, rotate_by_angles
from longctx.models import layer_params, rotary_dim

from .attention import AttentionRuntime, CachedPositions, attention_modules, install_attention
from .base import Applied, LengthConfig, Undo, param
from .registry import Method, register
from .rope_common import FrequencyHook, RopeContext, apply_rope_method, own_frequencies, layer_type_of, rope_applied, \
    rope_targets

NAME = "dynamic_ntk"
DESCRIPTION = (
    "Dynamic NTK: base grows with the current length (transformers' 'dynamic'); cache_consistent=True rotates "
    "cached keys to the current frequencies (no stale-cache mismatch)."
)


@dataclass(frozen=True)
class DynamicNTKConfig(LengthConfig):
    """Dynamic NTK. ``cache_consistent``: see the module docstring."""

    method: ClassVar[str] = NAME
    cache_consistent: bool = param(False, kind=bool, optional=False,
                                   doc="frequencies of the current length in every forward; cached keys re-rotated")


def rope_parameters(cfg: DynamicNTKConfig, params: dict, ctx: RopeContext) -> dict:
    """transformers' (and vLLM's) ``dynamic``: they read the trained length from ``max_position_embeddings``."""
    params = {k: v for k, v in params.items() if k != "original_max_position_embeddings"}
    return {**params, "rope_type": "dynamic", "factor": ctx.factor,
            "__max_position_embeddings__": ctx.trained_length}


def _frequencies(config: Any, layer_type: str | None, factor: float, trained: int, n: int,
                 device: Any = None) -> torch.Tensor:
    params = layer_params(config, layer_type)
    return dynamic_ntk_inv_freq(rotary_dim(config, params), params["rope_theta"], factor, n, trained, device)


class ByLengthFrequencies(FrequencyHook):
    """Rotary pre-hook: exactly the frequencies of the current length (no grow-only hysteresis)."""

    def __init__(self, config: Any, layer_types: list[str | None], factor: float, trained: int) -> None:
        self.config, self.layer_types, self.factor, self.trained = config, layer_types, factor, trained

    def frequencies(self, layer_type: str | None, n: int) -> torch.Tensor:
        return _frequencies(self.config, layer_type, self.factor, self.trained, n)


class ConsistentCacheRuntime(AttentionRuntime):
    """Re-rotates each layer's cached keys from the frequencies they were written with to the current ones."""

    transient: ClassVar[tuple[str, ...]] = (*AttentionRuntime.transient, "cached")

    def __init__(self, layer_types: list[str | None], factor: float, trained: int) -> None:
        self.layer_types, self.factor, self.trained = layer_types, factor, trained
        self.__dict__.update(self.fresh_transient())

    def fresh_transient(self) -> dict[str, Any]:
        # layer -> [kv, rot/2] fp32: the frequencies each cached key was rotated with
        return {**super().fresh_transient(), "cached": CachedPositions("dynamic_ntk(cache_consistent=True)")}

    def forward(self, module, query, key, value, attention_mask, **kwargs):
        layer_type = layer_type_of(module)
        if layer_type in self.layer_types:
            key = self._rerotate(module, key, query.shape[2], kwargs.get("position_ids"), layer_type)
        return self.call_base(module, query, key, value, attention_mask, **kwargs)

    def _rerotate(self, module, key, q_len, position_ids, layer_type) -> torch.Tensor:
        batch, _, kv_len, _ = key.shape
        if position_ids is None:
            position_ids = torch.arange(kv_len - q_len, kv_len, device=key.device)[None]
        n = int(position_ids.max().item()) + 1
        now = _frequencies(module.config, layer_type, self.factor, self.trained, n, key.device)
        cache, _ = self.cache_layer(module, key)
        past, state = self.cached.update(cache, position_ids, batch, q_len, kv_len, key.device)
        written = now.expand(q_len, -1)
        if past is None:
            state["written"] = written.clone()
            return key
        # the frequencies each cached key was rotated with (a sliding-window cache keeps the latest keys only)
        state["written"] = torch.cat((state["written"][state["written"].shape[0] - past.shape[1]:], written), dim=0)
        delta = state["positions"][..., None] * (now - state["written"])[None]  # [B, kv, rot/2]
        if not torch.any(delta):
            return key
        return rotate_by_angles(key, delta[:, None])


def apply(model: nn.Module, cfg: DynamicNTKConfig, undo: Undo) -> Applied:
    if not cfg.cache_consistent:
        return rope_applied(apply_rope_method(model, NAME, cfg, rope_parameters, undo), cfg)
    targets = rope_targets(model, NAME, cfg)
    ctx = targets.first
    for cid, config in targets.configs.items():
        config.max_position_embeddings = max(ctx.target_length, config.max_position_embeddings or 0)
    layer_types = [c.layer_type for c in targets.first_contexts()]
    for r in targets.rotaries:
        own_frequencies(r.module, undo)
        hook = ByLengthFrequencies(r.config, layer_types, ctx.factor, ctx.trained_length)
        undo.hook(r.module.register_forward_pre_hook(hook, with_kwargs=True))
    runtime = ConsistentCacheRuntime(layer_types, ctx.factor, ctx.trained_length)
    name = install_attention(model, runtime, undo, attention_modules(model, targets.configs.values()),
                             "dynamic_ntk(cache_consistent=True)")
    notes = [f"cache-consistent: attention '{name}' re-rotates cached keys to the current frequencies"]
    return rope_applied(targets, cfg, notes)


def _legacy(cache_consistent: bool):
    """Saves of longctx < 0.2 wrote rope types 'longctx_dynamic' / 'longctx_ntk_by_length'."""
    def convert(params: dict) -> tuple[dict, dict]:
        base = {k: v for k, v in params.items() if k not in ("factor", "original_max_position_embeddings")}
        patch = {"factor": params["factor"], "trained_length": params["original_max_position_embeddings"],
                 "cache_consistent": cache_consistent}
        return {**base, "rope_type": "default"}, patch

    return convert


METHOD = register(Method(
    NAME, "rope", DESCRIPTION, DynamicNTKConfig, apply,
    bounded=False,
    export_form=lambda params: "longctx" if params.get("cache_consistent") else "config",
    cache_exact=lambda params: bool(params.get("cache_consistent")),
    aliases=("dynamic", "ntk_dynamic"),
    examples=lambda L: [{"factor": 4.0}, {"factor": 4.0, "cache_consistent": True}],
    legacy_rope_types={"longctx_dynamic": _legacy(False), "longctx_ntk_by_length": _legacy(True)},
))
