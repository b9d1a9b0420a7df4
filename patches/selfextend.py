"""SelfExtend (Jin et al., ICML 2024) as a transformers attention function — no forward is replaced.

``longctx.patch(model, "selfextend", group_size=G, window=W)`` (or ``target_length=N``: G and W solved so that
(L − W)·G + W ≥ N with W + (N − W)/G ≤ 2/3·L). It registers ``longctx_selfextend`` with ``AttentionInterface`` *and*
``AttentionMaskInterface`` (the mask is transformers' own sdpa mask), points ``config._attn_implementation`` at it,
and keeps per model the rotary ``inv_freq`` of every extended layer type. In attention, q/k arrive already rotated;
the grouped branch rotates them further by the position delta (``longctx.kernels.selfextend_torch``).

Positions, per row: queries from ``position_ids`` (slot indices when the model passes none, as encoders do); keys
from the same positions when the call covers the whole sequence, else counted back from the last query over the valid (unpadded) cached slots — so left padding,
batches of different lengths, chunked prefill and q_len = 1 decode with transformers' standard KV cache (rotated
keys) all work. Sliding-window layers (Gemma3's local layers, ModernBERT's local layers) are left to sdpa: they never
see a distance ≥ their window. Encoders (``is_causal = False``) get the bidirectional variant: keys ≥ W away on
either side use grouped positions.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from longctx.core.positions import solve_selfextend
from longctx.kernels.selfextend_torch import grouped_keys, selfextend_attention
from longctx.models import NotARopeModelError, extendable_layer_types, find_rotary_modules, trained_length

from .base import Applied, Undo

NAME = "selfextend"
DESCRIPTION = (
    "SelfExtend: grouped attention — neighbours (distance < W) keep their positions, farther keys use positions "
    "floor-divided by G; an attention function, exact, O(n) memory."
)
ATTN_NAME = "longctx_selfextend"
BACKENDS = ("torch", "triton", "auto")


@dataclass
class SelfExtendConfig:
    """SelfExtend. ``group_size`` G and ``window`` W (neighbour window), or ``target_length`` to solve them;
    ``shift``: ``"int"`` (W − W//G) or ``"float"`` (W − W/G, LongLM's released code); ``scale_base``: multiply
    queries by max(1, ln(i+1)/ln(scale_base)) (LongLM's option; off by default); ``attn_backend``: ``"torch"``,
    ``"triton"`` (the Triton kernel; calls it does not take go to the torch path with a warning) or ``"auto"`` (Triton
    when the model is on CUDA at patch time and triton is installed, quietly torch for the calls it does not take;
    torch elsewhere);
    ``block_size``: query rows per block of the torch path (default: ~32M scores per block)."""

    group_size: int | None = None
    window: int | None = None
    target_length: int | None = None
    trained_length: int | None = None
    shift: str = "int"
    scale_base: float | None = None
    attn_backend: str = "auto"
    block_size: int | None = None


@dataclass
class _ModelState:
    group_size: int
    window: int
    shift: str
    scale_base: float | None
    block_size: int | None
    inv_freq: dict[Any, torch.Tensor] = field(default_factory=dict)  # layer type (None: flat) -> fp32 inv_freq
    base_attention: str = "sdpa"
    backend: str = "torch"  # "torch", "triton" or "auto" (Triton where it can run, torch elsewhere)
    fallbacks: set[str] = field(default_factory=set)  # why calls went to the torch path (warned once each)
    # the Triton kernel's row layout of the last call, kept with the position_ids / mask tensors it came from: every
    # layer of one forward (one decoding step) passes the same ones, so it is checked (a device sync) once a step
    layout: tuple | None = None
    # id(attention module) -> (cache layer of this call, whether its keys are the ones last seen), set by a pre-hook
    pending: dict[int, tuple[Any, bool]] = field(default_factory=dict)


_CACHE_ATTR = "_longctx_selfextend_grouped"


@dataclass
class _GroupedKeys:
    """Keys of one KV-cache layer re-rotated to their grouped positions, kept on that cache layer (so they live and
    die with the cache) and extended as it grows: a decoding step rotates only its new keys, not the whole cache."""

    keys_ref: Any  # weakref to the cache layer's key tensor they were computed from
    k_pos: torch.Tensor  # [B, length]
    buffer: torch.Tensor  # [B, Hkv, capacity, D]
    length: int
    tag: tuple  # (group size, inv_freq) they were rotated with


def _cache_layer_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Note which KV-cache layer this attention call will use and whether the cache still holds the keys we last
    saw (any cache edit — crop, beam reorder, a new cache — replaces that tensor, so identity is a safe test)."""
    state = _STATES.get(id(getattr(module, "config", None)))
    if state is None:
        return
    cache = next((v for v in (*args, *kwargs.values()) if isinstance(v, Cache)), None)
    layers = getattr(cache, "layers", None)
    idx = getattr(module, "layer_idx", None)
    layer = layers[idx] if layers is not None and idx is not None and idx < len(layers) else None
    entry = getattr(layer, _CACHE_ATTR, None)
    keys = getattr(layer, "keys", None)
    continues = entry is not None and keys is not None and entry.keys_ref() is keys
    state.pending[id(module)] = (layer, continues)


def _same_positions(kept: torch.Tensor, now: torch.Tensor, key_valid: torch.Tensor | None) -> bool:
    """The kept keys' positions still hold on every valid slot (a padded slot's position is arbitrary and unused;
    the count back from the last query gives it another value at every step)."""
    if kept.shape != now.shape:
        return False
    if key_valid is None:
        return torch.equal(kept, now)
    valid = key_valid[:, :now.shape[1]]
    return torch.equal(kept.masked_fill(~valid, 0), now.masked_fill(~valid, 0))


def _cached_grouped_keys(layer: Any, continues: bool, key: torch.Tensor, k_pos: torch.Tensor, q_len: int,
                         inv_freq: torch.Tensor, group_size: int, key_valid: torch.Tensor | None = None,
                         rotate: Callable | None = None) -> torch.Tensor:
    """Grouped keys for all ``kv`` slots, reusing (and extending) those stored on the cache layer when the cache
    only grew by this call's ``q_len`` keys at unchanged positions of its valid (unpadded) slots; recomputed
    otherwise. ``rotate(keys, start, out)`` writes the grouped keys of the slots from ``start`` into ``out``
    (default: the torch path's)."""
    if rotate is None:
        def rotate(part: torch.Tensor, start: int, out: torch.Tensor) -> None:
            out.copy_(grouped_keys(part, k_pos[:, start:], inv_freq, group_size))
    entry: _GroupedKeys | None = getattr(layer, _CACHE_ATTR, None)
    batch, hkv, kv_len, dim = key.shape
    old = kv_len - q_len
    tag = (group_size, inv_freq)
    if (continues and entry is not None and entry.tag[0] == group_size and entry.tag[1] is inv_freq
            and entry.length == old > 0 and entry.buffer.shape[:2] == (batch, hkv)
            and entry.buffer.dtype == key.dtype and _same_positions(entry.k_pos, k_pos[:, :old], key_valid)):
        if entry.buffer.shape[2] < kv_len:  # grow by a margin: one copy per 256+ decoding steps
            grown = key.new_empty(batch, hkv, kv_len + max(256, kv_len // 16), dim)
            grown[:, :, :old] = entry.buffer[:, :, :old]
            entry.buffer = grown
        rotate(key[:, :, old:], old, entry.buffer[:, :, old:kv_len])
        entry.k_pos = k_pos.clone()
    else:
        entry = _GroupedKeys(None, k_pos.clone(), key.new_empty(batch, hkv, kv_len + 256, dim), 0, tag)
        rotate(key, 0, entry.buffer[:, :, :kv_len])
    entry.length, entry.keys_ref = kv_len, weakref.ref(key)
    try:
        setattr(layer, _CACHE_ATTR, entry)
    except AttributeError:  # a cache layer that takes no attributes: nothing is kept
        pass
    return entry.buffer[:, :, :kv_len]


# id(config) -> state, while a model is patched
_STATES: dict[int, _ModelState] = {}


def _layer_type(module: nn.Module, state: _ModelState) -> Any:
    if None in state.inv_freq:
        return None
    layer_types = getattr(module.config, "layer_types", None)
    return layer_types[module.layer_idx] if layer_types else None


def _key_valid(mask: torch.Tensor | None, batch: int, kv_len: int) -> torch.Tensor | None:
    """``[B, kv]`` bool: keys visible to at least one query of this call (padding is visible to none)."""
    if mask is None:
        return None
    if mask.dim() == 2:
        return mask[:, -kv_len:].bool()
    visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return visible[..., :kv_len].any(dim=-2).any(dim=1).expand(batch, kv_len)


def _positions(position_ids, key_valid, batch, q_len, kv_len, device):
    if position_ids is None:
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[None].expand(batch, q_len)
    else:
        q_pos = position_ids.to(device=device, dtype=torch.int64).expand(batch, q_len)
    if q_len == kv_len:  # no cache: key slot s is query s
        return q_pos, q_pos
    valid = key_valid if key_valid is not None else torch.ones(batch, kv_len, dtype=torch.bool, device=device)
    # number of valid keys after each slot; the last slot is the last query's own key
    after = valid.flip(-1).to(torch.int64).cumsum(-1).flip(-1) - valid.to(torch.int64)
    k_pos = q_pos[:, -1:] - after
    return q_pos, k_pos


class _CallPositions:
    """One attention call's valid keys (``[B, kv]`` or None) and ``(q_pos, k_pos)``, each computed on first use: the
    Triton path needs them once per forward (its row layout is kept across layers), not once per layer."""

    def __init__(self, mask, position_ids, batch: int, q_len: int, kv_len: int, device: torch.device) -> None:
        self.mask, self.position_ids = mask, position_ids
        self._shape = (batch, q_len, kv_len, device)

    @functools.cached_property
    def key_valid(self) -> torch.Tensor | None:
        batch, _, kv_len, _ = self._shape
        return _key_valid(self.mask, batch, kv_len)

    @functools.cached_property
    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _positions(self.position_ids, self.key_valid, *self._shape)


def selfextend_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """``AttentionInterface`` entry: SelfExtend on extended full-attention layers, sdpa elsewhere."""
    state = _STATES.get(id(module.config))
    layer_type = _layer_type(module, state) if state is not None else None
    if state is None or layer_type not in state.inv_freq or getattr(module, "sliding_window", None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    batch, _, q_len, dim = query.shape
    call = _CallPositions(attention_mask, kwargs.get("position_ids"), batch, q_len, key.shape[2], query.device)
    scaling = kwargs.get("scaling") or getattr(module, "scaling", None) or dim**-0.5
    inv_freq = state.inv_freq[layer_type]
    layer, continues = state.pending.pop(id(module), (None, False))
    causal = getattr(module, "is_causal", True)
    softcap = kwargs.get("softcap")
    out = None
    if state.backend != "torch":
        out = _triton_attention(state, query, key, value, call, inv_freq, scaling, causal, softcap, layer,
                                continues)
    if out is None:
        key_valid = call.key_valid
        q_pos, k_pos = call.positions
        grouped = None
        if layer is not None and getattr(layer, "keys", None) is key:  # keys come from a KV cache: keep them rotated
            grouped = _cached_grouped_keys(layer, continues, key, k_pos, q_len, inv_freq, state.group_size,
                                           key_valid)
        out = selfextend_attention(
            query, key, value, q_pos, k_pos, inv_freq, state.group_size, state.window, scaling,
            causal=causal, key_valid=key_valid, shift=state.shift, scale_base=state.scale_base, softcap=softcap,
            block_size=state.block_size, grouped_key=grouped,
        )
    return out.transpose(1, 2).contiguous(), None


def _same(ref, obj) -> bool:
    """``ref`` (a weak reference or None) still points at ``obj``."""
    return obj is None if ref is None else ref() is obj


def _triton_attention(state, query, key, value, call, inv_freq, scaling, causal, softcap, layer, continues):
    """The Triton kernel's output, or ``None`` when this call goes to the torch path (the reason is warned once
    for ``attn_backend="triton"``; ``"auto"`` falls back quietly, as its patch note says). Positions and the
    valid keys are computed only when the row layout is not kept from an earlier layer of the same forward."""
    from longctx.kernels import selfextend_triton as kernel

    if state.backend == "auto" and query.device.type != "cuda":
        return None
    why = kernel.supports(query, key, value, inv_freq, softcap)
    if why is None:
        q_len = query.shape[2]
        shape = (query.shape[0], q_len, key.shape[2], query.device)
        last = state.layout
        sources = (call.position_ids, call.mask)
        if last is not None and last[2] == shape and all(_same(r, x) for r, x in zip(last[:2], sources)):
            layout = last[3]
        else:
            try:
                layout = kernel.row_layout(*call.positions, call.key_valid, q_len, key.shape[2])
            except kernel.Unsupported as e:
                layout, why = None, str(e)
            refs = [weakref.ref(x) if x is not None else None for x in sources]  # weak: a mask can be large
            state.layout = (*refs, shape, layout, why)
        why = state.layout[4]
        if layout is not None:
            grouped = None
            if q_len > 16 and layer is not None and getattr(layer, "keys", None) is key:
                # prefill / chunks against a cache: grouped keys kept on the cache layer, extended as it grows,
                # rotated by the kernel's one-pass rotation (positions are slot + the layout's row offset)
                def rotate(part, start, out, offset=layout[0]):
                    kernel.grouped_keys_triton(part, offset + start, inv_freq, state.group_size, out=out)

                grouped = _cached_grouped_keys(layer, continues, key, call.positions[1], q_len, inv_freq,
                                               state.group_size, call.key_valid, rotate)
            return kernel.selfextend_attention_triton(
                query, key, value, None, None, inv_freq, state.group_size, state.window, scaling, causal=causal,
                shift=state.shift, scale_base=state.scale_base, grouped_key=grouped, layout=layout,
            )
    if state.backend == "triton" and why not in state.fallbacks:
        state.fallbacks.add(why)
        warnings.warn(f"SelfExtend: this call runs on the torch path, not Triton: {why}", stacklevel=3)
    return None


def _register() -> None:
    if ATTN_NAME not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(ATTN_NAME, selfextend_attention_forward)
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _check_backend(backend: str, device: torch.device) -> tuple[str, str]:
    """(backend kept for the calls, the note saying what runs)."""
    if backend not in BACKENDS:
        raise ValueError(f"attn_backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch", "backend=torch"
    from longctx.kernels import selfextend_triton as kernel

    if kernel.triton is None:
        if backend == "triton":
            raise ImportError("attn_backend='triton' needs the triton package (pip install 'longctx[triton]'); "
                              "use attn_backend='torch' or 'auto'")
        return "torch", "backend=torch (auto: triton is not installed)"
    if backend == "auto" and device.type != "cuda":  # recorded as "torch": the same note as asking for it
        return "torch", "backend=torch"
    return backend, (f"backend={backend}: Triton kernel for fp16/bf16/fp32, head dims {kernel.HEAD_DIMS}, full "
                     "rotary, contiguous positions, one padded side; the torch path for other calls")


def apply(model: nn.Module, cfg: SelfExtendConfig) -> Applied:
    if cfg.shift not in ("int", "float"):
        raise ValueError(f"shift must be 'int' or 'float', got {cfg.shift!r}")
    backend, backend_note = _check_backend(cfg.attn_backend, next(model.parameters()).device)
    rotaries = find_rotary_modules(model)
    if not rotaries:
        raise NotARopeModelError(
            f"{type(model).__name__} has no rotary position embeddings; SelfExtend regroups RoPE positions. For "
            "absolute-position encoders use the absolute-position methods ('grouped', 'recurrent', 'pi', 'pcw')."
        )
    config = rotaries[0].config
    L = int(cfg.trained_length) if cfg.trained_length else trained_length(config)
    if cfg.target_length is not None and int(cfg.target_length) <= L:
        raise ValueError(f"target_length={cfg.target_length} is not longer than the trained length {L}")
    plan = solve_selfextend(L, cfg.target_length, cfg.group_size, cfg.window)
    layer_types = extendable_layer_types(config)
    state = _ModelState(plan.group_size, plan.window, cfg.shift, cfg.scale_base, cfg.block_size, backend=backend)
    for r in rotaries:
        for lt in layer_types or [None]:
            name = f"{lt}_inv_freq" if lt is not None else "inv_freq"
            state.inv_freq[lt] = getattr(r.module, name).detach().float().clone()
    attention_modules = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config")
                         and hasattr(m, "scaling") and m.config is config]
    if attention_modules and all(getattr(m, "sliding_window", None) for m in attention_modules):
        raise ValueError(
            "every attention layer of this model uses a sliding window (config.sliding_window="
            f"{getattr(config, 'sliding_window', None)}); SelfExtend applies to full-attention layers"
        )

    undo = Undo()
    base = model.config._attn_implementation
    state.base_attention = base if base != ATTN_NAME else "sdpa"
    _register()
    _STATES[id(config)] = state
    undo.push(lambda: _STATES.pop(id(config), None))
    model.set_attn_implementation(ATTN_NAME)
    undo.push(lambda: model.set_attn_implementation(state.base_attention))
    for m in attention_modules:
        handle = m.register_forward_pre_hook(_cache_layer_pre_hook, with_kwargs=True)
        undo.push(handle.remove)
    target = int(cfg.target_length) if cfg.target_length else plan.max_length
    undo.setattr(config, "max_position_embeddings", max(target, config.max_position_embeddings or 0))

    notes = [backend_note, f"reaches up to {plan.max_length} tokens "
             f"(largest grouped relative position at the target: {plan.effective_length:.0f} of {L})"]
    if state.base_attention not in ("sdpa", "eager"):
        notes.append(f"attention '{state.base_attention}' replaced by SelfExtend's torch path while patched")
    params = {"group_size": plan.group_size, "window": plan.window, "shift": cfg.shift, "attn_backend": backend}
    if cfg.scale_base:
        params["scale_base"] = cfg.scale_base
    # a saved copy re-requests the backend the user asked for (resolved again where it is loaded), not this one
    reload = {**params, "attn_backend": cfg.attn_backend, "trained_length": L, "target_length": target}
    if cfg.block_size:
        reload["block_size"] = cfg.block_size
    return Applied(
        method=NAME, params=params, trained_length=L, target_length=target, factor=target / L,
        layer_types=layer_types, revert=undo, notes=notes, reload=reload,
    )
