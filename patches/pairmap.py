"""What the per-pair position-map methods share (Dual Chunk Attention, ReRoPE): their attention runtime on the shared
machinery and their apply. The maps themselves are ``longctx.core.pairmaps``; the attention on plain tensors is
``longctx.kernels.pairmap_torch``.

The runtime computes attention itself (q/k arrive rotated at their positions): positions per row from the mask
(``CallPositions``: left padding, chunked prefill, cached decoding), each branch's keys rotated once and kept on the
KV-cache layer (extended as the cache grows: a decoding step rotates only its new keys), and per-method query /
key scales (ReRoPE's log-length query scale, DCA's mscale). Sliding-window layers keep plain attention. Decoders
only: the methods are defined for causal attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from longctx.core.pairmaps import PairMap
from longctx.kernels.pairmap_torch import pairmap_attention, variant_keys
from longctx.models import NotARopeModelError, extendable_layer_types, find_rotary_modules, trained_length

from .attention import BACKENDS, CallPositions, RotaryRuntime, attention_modules, attention_window, \
    cached_rotated_keys, install_attention, needs_grad, resolve_backend
from .base import Applied, MethodConfig, Undo, param
from .rope_common import guard_rotary

__all__ = ["PairMapConfig", "PairMapRuntime", "Decoder", "decoder", "install_pairmap", "decoder_rotary"]

KERNEL_NOTE = ("Triton pair-map kernel for fp16/bf16/fp32, head dims 16-256, full rotary, contiguous positions, "
               "left padding")


@dataclass(frozen=True)
class PairMapConfig(MethodConfig):
    """What every pair-map method takes besides its own geometry: the length wanted (recorded, raises
    ``max_position_embeddings``: these methods have no hard reach), the trained length override, the kernel."""

    target_length: int | None = param(kind=int, ge=2, doc="the length wanted (recorded; no hard reach)")
    trained_length: int | None = param(kind=int, ge=2, doc="override the trained length read from the config")
    attn_backend: str = param("auto", kind=str, choices=BACKENDS, optional=False,
                              doc="the attention kernel (auto: Triton on CUDA, else torch)")


class PairMapRuntime(RotaryRuntime):
    """Attention under ``self.pmap`` on the extended layers. Subclasses set ``pmap`` and may scale queries
    (:meth:`query_scale`) and kept keys (:meth:`key_scale`: a per-row factor applied to the keys a call adds)."""

    pmap: PairMap

    def query_scale(self, q_pos: torch.Tensor, n: torch.Tensor) -> torch.Tensor | None:
        """``[B, q]`` multiplier of the queries (None: none); ``n [B]`` the real keys of each row in this call."""
        return None

    def key_scale(self, n: torch.Tensor) -> torch.Tensor | None:
        """``[B]`` multiplier of the keys this call adds (None: none)."""
        return None

    def tag(self) -> tuple:
        return (self.pmap,)

    def forward(self, module, query, key, value, attention_mask, **kwargs):
        if not self.extends(module):
            return self.call_base(module, query, key, value, attention_mask, **kwargs)
        self.check_call(module, kwargs, softcap_supported=False)
        batch, _, q_len, dim = query.shape
        kv_len = key.shape[2]
        call = CallPositions(attention_mask, kwargs.get("position_ids"), batch, q_len, kv_len, query.device)
        scaling = kwargs.get("scaling") or getattr(module, "scaling", None) or dim**-0.5
        inv_freq = self.frequencies(self.layer_type(module), query.device)
        q_pos, k_pos = call.positions
        key_valid = call.key_valid
        n = key_valid.sum(-1) if key_valid is not None else torch.full((batch,), kv_len, device=query.device)
        k_mult = self.key_scale(n)
        layer, continues = self.cache_layer(module, key)
        grad = needs_grad(query, key, value)
        if grad:  # autograd: nothing kept across calls, the differentiable torch path
            layer = None
        keys = {}
        for variant in sorted(set(self.pmap.variants)):
            if self.pmap.key_identity(variant) and k_mult is None:
                continue  # the keys as they are

            def rotate(part, start, out, variant=variant):
                rotated = variant_keys(part, k_pos[:, start:], inv_freq, self.pmap, variant)
                if k_mult is not None:
                    rotated = rotated * k_mult.to(rotated.dtype)[:, None, None, None]
                out.copy_(rotated)

            if layer is not None:
                keys[variant] = cached_rotated_keys(layer, continues, key, k_pos, q_len,
                                                    (*self.tag(), variant, inv_freq), rotate, key_valid)
            else:
                keys[variant] = torch.empty_like(key)
                rotate(key, 0, keys[variant])
        q_scale = self.query_scale(q_pos, n)
        out = None
        if self.backend != "torch" and not grad:
            out = self._triton(query, key, value, call, inv_freq, scaling, keys, q_scale, kwargs.get("softcap"))
        if out is None:
            out = pairmap_attention(query, key, value, q_pos, k_pos, inv_freq, self.pmap, scaling,
                                    key_valid=key_valid, q_scale=q_scale, keys=keys)
        return out.transpose(1, 2).contiguous(), None

    def _triton(self, query, key, value, call, inv_freq, scaling, keys, q_scale, softcap):
        """The Triton kernel's output, or ``None`` when this call goes to the torch path (see
        :meth:`~longctx.patches.attention.RotaryRuntime.fell_back`)."""
        from longctx.kernels import pairmap_triton as kernel

        if self.backend == "auto" and query.device.type != "cuda":
            return None
        why = kernel.supports(query, key, value, inv_freq, self.pmap, softcap)
        if why is None:
            layout, why = self.triton_layout(call, (query.shape[0], query.shape[2], key.shape[2], query.device))
            if layout is not None:
                every = {v: keys.get(v, key) for v in set(self.pmap.variants)}  # identity variants: the keys
                return kernel.pairmap_attention_triton(query, value, self.pmap, inv_freq, scaling, every, layout,
                                                       q_scale=q_scale)
        self.fell_back(why, type(self).__name__.removesuffix("Runtime"))
        return None


def decoder_rotary(model: nn.Module, method: str) -> tuple[Any, nn.Module, list]:
    """``(config, rotary module, extended layer types)`` of a decoder with rotary embeddings; errors name what is
    supported. Changes nothing."""
    rotaries = find_rotary_modules(model)
    if not rotaries:
        raise NotARopeModelError(
            f"{type(model).__name__} has no rotary position embeddings; {method} remaps RoPE positions. For "
            "absolute-position encoders use the absolute-position methods ('grouped', 'recurrent', 'pi', 'pcw')."
        )
    config = rotaries[0].config
    modules = attention_modules(model, [config])
    if any(getattr(m, "is_causal", True) is False for m in modules):
        raise ValueError(f"{method} is defined for causal attention (decoders); {type(model).__name__} attends "
                         "both ways — for RoPE encoders use selfextend (bidirectional) or a frequency method")
    if modules and all(attention_window(m) for m in modules):
        raise ValueError(f"{method}: every attention layer of this model attends within a sliding window "
                         f"(config.sliding_window={getattr(config, 'sliding_window', None)}), which {method} does not "
                         "implement; it applies to full-attention layers. Set config.sliding_window = None before "
                         "patching for full attention, or use a frequency method (pi, ntk, yarn), which keep the window")
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap:
        raise ValueError(f"{method}: this model caps attention logits (config.attn_logit_softcapping={softcap}), "
                         f"which {method} does not implement; use selfextend (which does) or a frequency method")
    rotary = next(r.module for r in rotaries if r.config is config)
    return config, rotary, extendable_layer_types(config) or [None]


@dataclass
class Decoder:
    """What a pair-map method's apply reads from the model before it changes anything."""

    config: Any
    rotary: nn.Module
    layer_types: list
    trained_length: int


def decoder(model: nn.Module, cfg: PairMapConfig) -> Decoder:
    """The model's rotary config, module, extended layer types and trained length, every check on them and on
    ``target_length`` run (nothing changed yet)."""
    config, rotary, layer_types = decoder_rotary(model, cfg.method)
    L = int(cfg.trained_length) if cfg.trained_length else trained_length(config)
    if cfg.target_length is not None and cfg.target_length <= L:
        raise ValueError(f"{cfg.method}: target_length={cfg.target_length} is not longer than the trained length {L}")
    return Decoder(config, rotary, layer_types, L)


def install_pairmap(model: nn.Module, runtime: PairMapRuntime, undo: Undo, cfg: PairMapConfig, found: Decoder,
                    params: dict[str, Any], note: str) -> Applied:
    """Attach ``runtime`` (with the backend ``cfg.attn_backend`` resolves to) to the model's attention, with the cache
    pre-hooks and the rotary modules' fp32 guard, raise ``max_position_embeddings`` to the target; what was applied
    (``params``: the method's resolved geometry; ``note``: its one-line description)."""
    backend, backend_note = resolve_backend(cfg.attn_backend, next(model.parameters()).device, KERNEL_NOTE)
    runtime.backend = backend
    rotaries = find_rotary_modules(model)
    for r in rotaries:
        guard_rotary(r.module, undo)
    modules = attention_modules(model, [found.config])
    install_attention(model, runtime, undo, modules, cfg.method)
    target, L = cfg.target_length, found.trained_length
    if target:
        found.config.max_position_embeddings = max(target, found.config.max_position_embeddings or 0)
    params = {**params, "attn_backend": backend}
    return Applied(params=params, trained_length=L, target_length=target, factor=target / L if target else None,
                   layer_types=[lt for lt in found.layer_types if lt is not None] or None, notes=[backend_note, note],
                   reload={**params, "attn_backend": cfg.attn_backend, "trained_length": L, "target_length": target})
