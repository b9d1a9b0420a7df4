"""SelfExtend (Jin et al., ICML 2024) as a transformers attention function — no forward is replaced.

``longctx.patch(model, "selfextend", group_size=G, window=W)`` (or ``target_length=N``: G and W solved so that
(L − W)·G + W ≥ N with W + (N − W)/G ≤ 2/3·L). The model's attention switches to ``longctx_<base>``
(``patches/attention.py``), whose runtime here computes SelfExtend: q/k arrive already rotated, and the grouped
branch rotates them further by the position delta with the rotary module's own fp32 ``inv_freq``
(``longctx.kernels.selfextend_torch`` / ``selfextend_triton``).

Positions, per row: queries from ``position_ids`` (slot indices when the model passes none, as encoders do); keys
from the same positions when the call covers the whole sequence, else counted back from the last query over the
valid (unpadded) cached slots — so left padding, batches of different lengths, chunked prefill and q_len = 1 decode
with transformers' standard KV cache (rotated keys) all work. Sliding-window layers (Gemma3's local layers,
ModernBERT's local layers) are left to plain attention: they never see a distance ≥ their window. Encoders
(``is_causal = False``) get the bidirectional variant: keys ≥ W away on either side use grouped positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from longctx.core.positions import solve_selfextend
from longctx.kernels.selfextend_torch import grouped_keys, selfextend_attention
from longctx.models import NotARopeModelError, extendable_layer_types, find_rotary_modules, trained_length

from .attention import (
    BACKENDS,
    CallPositions,
    RotaryRuntime,
    attention_modules,
    attention_window,
    cached_rotated_keys,
    install_attention,
    needs_grad,
    resolve_backend,
)
from .base import Applied, MethodConfig, Undo, param
from .registry import Method, register
from .space import SearchSpace, Tunable, rope_trained_length
from .rope_common import guard_rotary

NAME = "selfextend"
DESCRIPTION = (
    "SelfExtend: grouped attention — neighbours (distance < W) keep their positions, farther keys use positions "
    "floor-divided by G; an attention function, exact, O(n) memory."
)


@dataclass(frozen=True)
class SelfExtendConfig(MethodConfig):
    """SelfExtend. ``group_size`` G and ``window`` W (neighbour window), or ``target_length`` to solve them;
    ``shift``: ``"int"`` (W − W//G) or ``"float"`` (W − W/G, LongLM's released code); ``scale_base``: multiply
    queries by max(1, ln(i+1)/ln(scale_base)) (LongLM's option; off by default); ``attn_backend``: ``"torch"``,
    ``"triton"`` (the Triton kernel; calls it does not take go to the torch path with a warning) or ``"auto"`` (Triton
    when the model is on CUDA at patch time and triton is installed, quietly torch for the calls it does not take;
    torch elsewhere); ``block_size``: query rows per block of the torch path (default: ~32M scores per block)."""

    method: ClassVar[str] = NAME
    group_size: int | None = param(kind=int, ge=1, doc="G: far keys use positions floor-divided by G")
    window: int | None = param(kind=int, ge=1, doc="W: neighbours closer than W keep their positions")
    target_length: int | None = param(kind=int, ge=2, doc="the length to reach (solves G and W)")
    trained_length: int | None = param(kind=int, ge=2, doc="override the trained length read from the config")
    shift: str = param("int", kind=str, choices=("int", "float"), optional=False,
                       doc="grouped query shift W - W//G ('int') or W - W/G ('float', LongLM's code)")
    scale_base: float | None = param(kind=float, gt=1, doc="queries x max(1, ln(i+1)/ln(scale_base))")
    attn_backend: str = param("auto", kind=str, choices=BACKENDS, optional=False, doc="the attention kernel")
    block_size: int | None = param(kind=int, ge=1, doc="query rows per block of the torch path")


@dataclass(frozen=True)
class SelfExtendParams:
    """What a SelfExtend runtime computes with, resolved at patch time."""

    group_size: int
    window: int
    shift: str
    scale_base: float | None
    block_size: int | None
    backend: str  # "torch", "triton" or "auto" (Triton where it can run, torch elsewhere)


class SelfExtendRuntime(RotaryRuntime):
    """SelfExtend on the extended full-attention layers, plain attention on the others."""

    def __init__(self, params: SelfExtendParams, rotary: nn.Module, layer_types: list[str | None]) -> None:
        self.params = params
        self.backend = params.backend
        super().__init__(rotary, layer_types)

    def forward(self, module, query, key, value, attention_mask, **kwargs):
        p = self.params
        if not self.extends(module):
            return self.call_base(module, query, key, value, attention_mask, **kwargs)
        self.check_call(module, kwargs, softcap_supported=True)
        layer_type = self.layer_type(module)
        batch, _, q_len, dim = query.shape
        call = CallPositions(attention_mask, kwargs.get("position_ids"), batch, q_len, key.shape[2], query.device)
        scaling = kwargs.get("scaling") or getattr(module, "scaling", None) or dim**-0.5
        inv_freq = self.frequencies(layer_type, query.device)
        layer, continues = self.cache_layer(module, key)
        causal = getattr(module, "is_causal", True)
        softcap = kwargs.get("softcap")
        out = None
        grad = needs_grad(query, key, value)
        if grad:  # autograd: nothing kept across calls, the differentiable torch path
            layer = None
        if p.backend != "torch" and not grad:
            out = self._triton(query, key, value, call, inv_freq, scaling, causal, softcap, layer, continues)
        if out is None:
            key_valid = call.key_valid
            q_pos, k_pos = call.positions
            grouped = None
            if layer is not None:  # keys from a KV cache: keep them rotated
                def rotate(part, start, out, k_pos=k_pos):
                    out.copy_(grouped_keys(part, k_pos[:, start:], inv_freq, p.group_size))

                grouped = cached_rotated_keys(layer, continues, key, k_pos, q_len, (p.group_size, inv_freq), rotate,
                                              key_valid)
            out = selfextend_attention(
                query, key, value, q_pos, k_pos, inv_freq, p.group_size, p.window, scaling,
                causal=causal, key_valid=key_valid, shift=p.shift, scale_base=p.scale_base, softcap=softcap,
                block_size=p.block_size, grouped_key=grouped,
            )
        return out.transpose(1, 2).contiguous(), None

    def _triton(self, query, key, value, call, inv_freq, scaling, causal, softcap, layer, continues):
        """The Triton kernel's output, or ``None`` when this call goes to the torch path (the reason is warned once
        for ``attn_backend="triton"``; ``"auto"`` falls back quietly, as its patch note says). Positions and the
        valid keys are computed only when the row layout is not kept from an earlier layer of the same forward."""
        from longctx.kernels import selfextend_triton as kernel

        p = self.params
        if p.backend == "auto" and query.device.type != "cuda":
            return None
        why = kernel.supports(query, key, value, inv_freq, softcap)
        if why is None:
            q_len = query.shape[2]
            layout, why = self.triton_layout(call, (query.shape[0], q_len, key.shape[2], query.device))
            if layout is not None:
                grouped = None
                if q_len > 16 and layer is not None:
                    # prefill / chunks against a cache: grouped keys kept on the cache layer, extended as it grows,
                    # rotated by the kernel's one-pass rotation (positions are slot + the layout's row offset)
                    def rotate(part, start, out, offset=layout[0]):
                        kernel.grouped_keys_triton(part, offset + start, inv_freq, p.group_size, out=out)

                    grouped = cached_rotated_keys(layer, continues, key, call.positions[1], q_len,
                                                  (p.group_size, inv_freq), rotate, call.key_valid)
                return kernel.selfextend_attention_triton(
                    query, key, value, None, None, inv_freq, p.group_size, p.window, scaling, causal=causal,
                    shift=p.shift, scale_base=p.scale_base, grouped_key=grouped, layout=layout,
                )
        self.fell_back(why, "SelfExtend")
        return None


def apply(model: nn.Module, cfg: SelfExtendConfig, undo: Undo) -> Applied:
    rotaries = find_rotary_modules(model)
    if not rotaries:
        raise NotARopeModelError(
            f"{type(model).__name__} has no rotary position embeddings; SelfExtend regroups RoPE positions. For "
            "absolute-position encoders use the absolute-position methods ('grouped', 'recurrent', 'pi', 'pcw')."
        )
    from longctx.kernels.selfextend_triton import HEAD_DIMS

    backend, backend_note = resolve_backend(
        cfg.attn_backend, next(model.parameters()).device,
        f"Triton kernel for fp16/bf16/fp32, head dims {HEAD_DIMS}, full rotary, contiguous positions, one padded side")
    config = rotaries[0].config
    L = int(cfg.trained_length) if cfg.trained_length else trained_length(config)
    if cfg.target_length is not None and int(cfg.target_length) <= L:
        raise ValueError(f"selfextend: target_length={cfg.target_length} is not longer than the trained length {L}")
    plan = solve_selfextend(L, cfg.target_length, cfg.group_size, cfg.window)
    layer_types = extendable_layer_types(config) or [None]
    modules = attention_modules(model, [config])
    if modules and all(attention_window(m) for m in modules):
        raise ValueError(
            "selfextend: every attention layer of this model attends within a sliding window (config.sliding_window="
            f"{getattr(config, 'sliding_window', None)}), which SelfExtend does not implement; it applies to "
            "full-attention layers. Set config.sliding_window = None before patching for full attention, or use a "
            "frequency method (pi, ntk, yarn), which keep the window"
        )
    rotary = next(r.module for r in rotaries if r.config is config)
    for r in rotaries:
        guard_rotary(r.module, undo)
    params = SelfExtendParams(plan.group_size, plan.window, cfg.shift, cfg.scale_base, cfg.block_size, backend)
    runtime = SelfExtendRuntime(params, rotary, layer_types)
    base = model.config._attn_implementation
    install_attention(model, runtime, undo, modules, NAME)
    target = int(cfg.target_length) if cfg.target_length else plan.max_length
    config.max_position_embeddings = max(target, config.max_position_embeddings or 0)

    notes = [backend_note, f"reaches up to {plan.max_length} tokens "
             f"(largest grouped relative position at the target: {plan.effective_length:.0f} of {L})"]
    if base not in ("sdpa", "eager"):
        notes.append(f"attention '{base}' replaced by SelfExtend's own paths while patched")
    resolved = {"group_size": plan.group_size, "window": plan.window, "shift": cfg.shift, "attn_backend": backend}
    if cfg.scale_base:
        resolved["scale_base"] = cfg.scale_base
    # a saved copy re-requests the backend the user asked for (resolved again where it is loaded), not this one
    reload = {**resolved, "attn_backend": cfg.attn_backend, "trained_length": L, "target_length": target}
    if cfg.block_size:
        reload["block_size"] = cfg.block_size
    return Applied(params=resolved, trained_length=L, target_length=target, factor=target / L,
                   layer_types=[lt for lt in layer_types if lt is not None] or None, notes=notes, reload=reload)


def tune(model: nn.Module, target_length: int) -> SearchSpace:
    """G and W (the reach W + (N − W)/G < L checked by the patch), and LongLM's log scaling of the queries."""
    L = rope_trained_length(model, NAME)
    n = int(target_length)
    return SearchSpace(
        {"window": Tunable(max(2, L // 32), max(2, L // 2), int, log=True),
         "group_size": Tunable(2, max(4, 4 * -(-n // L)), int, log=True),
         "scale_base": Tunable(choices=(None, float(L)))},
        {"default": {}}, {"target_length": n},
        note=f"window in [{max(2, L // 32)}, {max(2, L // 2)}], group size, log-scaled queries or not")


def engines(params: dict[str, Any]) -> dict[str, tuple[bool, str]]:
    """llama.cpp's own port of SelfExtend (LongLM authors, llama.cpp PR #4815): ``--grp-attn-n`` / ``--grp-attn-w``
    of ``llama-completion`` (tools/completion/completion.cpp, llama.cpp of 2026-10): it shifts and divides the
    positions of cached keys in blocks of ``-gaw`` as generation passes them, rather than SelfExtend's two-branch
    attention, so its logits are not longctx's; ``-gaw`` must be a multiple of ``-gan``."""
    g, w = int(params.get("group_size") or 1), int(params.get("window") or 0)
    gaw = max(g, (w // g) * g)
    return {"llama.cpp": (True, f"runs its own SelfExtend port on the base model's GGUF: `llama-completion -m OUT.gguf "
                                f"-c {params.get('target_length') or 'N'} --grp-attn-n {g} --grp-attn-w {gaw}` (keys "
                                "re-positioned in blocks as generation passes them, not longctx's two-branch "
                                "attention: logits differ; llama-server and llama-cpp-python have no such option)")}


METHOD = register(Method(NAME, "rope_attention", DESCRIPTION, SelfExtendConfig, apply, export_form="longctx",
                         tune=tune, engines=engines,
                         aliases=("self_extend", "grouped_attention"),
                         examples=lambda L: [{"group_size": 4, "window": L // 4},
                                             {"target_length": 8 * L, "shift": "float", "scale_base": float(L)}]))
