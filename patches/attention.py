"""The one machinery of the methods that change attention itself (floor 3): SelfExtend, CLEX's KV cache and
``log_scale``, dynamic NTK's cache-consistent mode, the absolute-position ``log_scale`` — and the next ones.

* **Attention functions** registered with transformers' ``AttentionInterface`` *and* ``AttentionMaskInterface``
  (without the second the model would silently get no mask): ``longctx_<base>`` for every base implementation
  (``sdpa``, ``eager``, ``flash_attention_2`` …), with the base's own mask function. Each looks up the
  :class:`AttentionRuntime` attached to the attention module it is called for and lets it compute the output
  (wrapping the base function, or replacing it). No forward is replaced; the state lives on the model.
* **Per-model state attached to the model**: the runtime object is set on each attention module
  (``_longctx_attention``): a deep copy of the model gets its own runtime, pickling takes it along, deleting the
  model frees it, and a model that shares nothing with another never sees the other's patch. What relates to a KV
  cache outside the model (kept keys, histories) is transient: dropped on copy and pickle.
* **Positions per row from masks**: :class:`CallPositions` (queries from ``position_ids``; keys counted back from
  the last query over the valid, unpadded slots), for left padding, chunked prefill and cached decoding.
* **Kept re-rotated keys on the cache layer**: :func:`cached_rotated_keys` keeps keys rotated to other positions on
  the KV-cache layer they came from (they live and die with the cache) and extends them as it grows.
* **Cached-key histories**: :class:`CachedPositions`, the position of every key in each layer's cache, for methods
  that re-rotate cached keys when their frequencies change.
"""

from __future__ import annotations

import functools
import sys
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .base import Undo

__all__ = ["BACKENDS", "resolve_backend", "PREFIX", "RUNTIME_ATTR", "AttentionRuntime", "RotaryRuntime",
           "install_attention", "attention_modules", "base_attention",
           "attention_name", "CallPositions", "key_valid_mask", "call_positions", "cached_rotated_keys",
           "CachedPositions", "cache_layer_pre_hook", "ForwardCheck", "attention_window", "needs_grad",
           "static_cache_view"]

PREFIX = "longctx_"
BACKENDS = ("torch", "triton", "auto")  # attention kernels of the methods that compute attention themselves
RUNTIME_ATTR = "_longctx_attention"
_KEPT_ATTR = "_longctx_kept_keys"


# ---------------------------------------------------------------------------------------------------------------
# the runtime and the registered attention functions
# ---------------------------------------------------------------------------------------------------------------
class AttentionRuntime:
    """One patch's attention behaviour, attached to each attention module of the model it patched.

    Subclasses implement :meth:`forward`; ``base`` is the model's attention implementation before the patch (what a
    wrapper calls, :meth:`call_base`). Attributes named in ``transient`` relate to things outside the model (a KV
    cache, tensors of the last call): :meth:`fresh_transient` gives their empty values, which a deep copy or a
    pickle gets instead."""

    transient: ClassVar[tuple[str, ...]] = ("pending", "calls", "entered")
    base: str = "sdpa"
    method: str = "longctx"  # the patch's name, for errors (set by install_attention)

    def fresh_transient(self) -> dict[str, Any]:
        # ``pending``: the KV-cache layer each module's next call uses (:func:`cache_layer_pre_hook`); ``calls``: the
        # layer of the call in progress (:meth:`cache_layer`); ``entered``: modules entered in this forward
        return {"pending": {}, "calls": {}, "entered": set()}

    def __getattr__(self, name: str) -> Any:
        # transient state a subclass's __init__ did not set up: created on first use
        if name in type(self).transient and not name.startswith("__"):
            fresh = self.fresh_transient()
            if name in fresh:
                self.__dict__.update({k: v for k, v in fresh.items() if k not in self.__dict__})
                return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__} object has no attribute {name!r}")

    def cache_layer(self, module: nn.Module, key: torch.Tensor) -> tuple[Any, bool]:
        """``(the KV-cache layer whose keys these are, or None; whether it continues the kept keys)``."""
        layer, continues = self.calls.pop(id(module), (None, False))
        if layer is None or not _holds(layer, key):
            return None, False
        return layer, continues

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(self.fresh_transient())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        attention_name(self.base)  # a fresh process: make sure the attention function is registered

    def forward(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        return self.call_base(module, query, key, value, attention_mask, **kwargs)

    def call_base(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        return base_attention(self.base, module)(module, query, key, value, attention_mask, **kwargs)


class RotaryRuntime(AttentionRuntime):
    """A runtime that computes attention itself from rotated q/k (SelfExtend, the pair-map methods): the rotary
    module's fp32 frequencies on any device (read live: casts and moves follow), the layer types it extends, and
    the KV-cache layer of each call (``pending``, set by :func:`cache_layer_pre_hook`), the Triton kernels' row layout
    and fallbacks (``backend``, :meth:`triton_layout`, :meth:`fell_back`)."""

    transient: ClassVar[tuple[str, ...]] = (*AttentionRuntime.transient, "_moved", "layout")

    backend: str = "torch"  # "torch", "triton" or "auto" (Triton where it can run, torch elsewhere)

    def __init__(self, rotary: nn.Module, layer_types: list[Any]) -> None:
        self.rotary = rotary
        self.layer_types = list(layer_types)
        self.fallbacks: set[str] = set()  # why calls went to the torch path (warned once each)
        self.__dict__.update(self.fresh_transient())

    def fresh_transient(self) -> dict[str, Any]:
        # ``layout``: the Triton kernels' row layout of the last call, kept with the position_ids / mask it came
        # from (every layer of one forward passes the same ones)
        return {**super().fresh_transient(), "_moved": {}, "layout": None}

    def triton_layout(self, call: "CallPositions", shape: tuple) -> tuple[Any, str | None]:
        """``(row layout, None)`` of the Triton kernels for this call, or ``(None, why not)``; computed (one device
        sync) only when not kept from an earlier layer of the same forward. ``shape``: (batch, q, kv, device)."""
        from longctx.kernels import selfextend_triton as kernel

        last = self.layout
        sources = (call.position_ids, call.mask)
        if last is not None and last[2] == shape and all(_same_object(r, x) for r, x in zip(last[:2], sources)):
            return last[3], last[4]
        try:
            layout, why = kernel.row_layout(*call.positions, call.key_valid, shape[1], shape[2]), None
        except kernel.Unsupported as e:
            layout, why = None, str(e)
        refs = [weakref.ref(x) if x is not None else None for x in sources]  # weak: a mask can be large
        self.layout = (*refs, shape, layout, why)
        return layout, why

    def fell_back(self, why: str, method: str) -> None:
        """A call went to the torch path: warned once per reason when Triton was asked for (``"auto"`` falls back
        quietly, as its patch note says)."""
        if self.backend == "triton" and why not in self.fallbacks:
            self.fallbacks.add(why)
            warnings.warn(f"{method}: this call runs on the torch path, not Triton: {why}", stacklevel=5)

    def frequencies(self, layer_type: Any, device: torch.device) -> torch.Tensor:
        """The rotary module's fp32 ``inv_freq`` of ``layer_type`` on ``device`` (the very tensor while it does not
        change: kept keys are tagged with it)."""
        name = f"{layer_type}_inv_freq" if layer_type is not None else "inv_freq"
        buf = getattr(self.rotary, name)
        if buf.device == device and buf.dtype == torch.float32:
            return buf
        moved = self._moved.get((layer_type, device))
        if moved is None or moved[0] is not buf:
            moved = (buf, buf.detach().float().to(device))
            self._moved[(layer_type, device)] = moved
        return moved[1]

    def layer_type(self, module: nn.Module) -> Any:
        """The layer type of an attention module (None for a flat config)."""
        if self.layer_types == [None]:
            return None
        layer_types = getattr(module.config, "layer_types", None)
        return layer_types[module.layer_idx] if layer_types else None

    def extends(self, module: nn.Module) -> bool:
        """Whether this module's layer is extended (a full-attention layer of an extended layer type)."""
        return self.layer_type(module) in self.layer_types and not attention_window(module)

    def check_call(self, module: nn.Module, kwargs: dict, softcap_supported: bool) -> None:
        """Refuse, naming the method and the cause, a call of an extended layer with what the method cannot honour
        (never computed silently without it): a sliding window passed at run time, logit softcapping."""
        window = kwargs.get("sliding_window")
        if window:
            raise RuntimeError(
                f"{self.method}: layer {getattr(module, 'layer_idx', '?')} ({type(module).__name__}) was called with a "
                f"sliding window of {window} tokens, which {self.method} does not implement; patch a model whose "
                "extended layers attend fully (config.sliding_window = None), or use a frequency method (pi, ntk, "
                "yarn), which keep the window")
        if kwargs.get("softcap") and not softcap_supported:
            raise RuntimeError(f"{self.method}: attention logit softcapping (softcap={kwargs['softcap']}) is not "
                               f"implemented by {self.method}; use selfextend or a frequency method on this model")


def base_attention(name: str, module: nn.Module) -> Callable:
    """The attention function ``name`` stands for (``eager``: the module's own ``eager_attention_forward``)."""
    if name == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward to wrap")
        return fn
    return ALL_ATTENTION_FUNCTIONS[name]


def _dispatch(base: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        runtime = module.__dict__.get(RUNTIME_ATTR)
        if runtime is None:  # never silent: this module was not patched, yet its config points here
            raise RuntimeError(f"{type(module).__name__} runs longctx's attention '{PREFIX}{base}' but carries no "
                               "longctx patch (was its config copied from a patched model?); longctx.unpatch the "
                               f"model it came from, or set_attn_implementation('{base}')")
        runtime.entered.add(id(module))
        layer, continues = runtime.pending.pop(id(module), (None, False))
        key, value, attention_mask = static_cache_view(layer, key, value, attention_mask)
        runtime.calls[id(module)] = (layer, continues)
        try:
            return runtime.forward(module, query, key, value, attention_mask, **kwargs)
        finally:  # nothing of this call is kept (a cache the user drops is freed)
            runtime.calls.pop(id(module), None)

    attention.__name__ = f"{PREFIX}{base}"
    return attention


def attention_name(base: str) -> str:
    """``longctx_<base>``, registered (with ``base``'s mask function) if it is not yet."""
    name = f"{PREFIX}{base}"
    if name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        if base not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            raise ValueError(f"longctx cannot wrap attention implementation '{base}'; supported: "
                             f"{sorted(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)}")
        AttentionInterface.register(name, _dispatch(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


for _base in list(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping):  # registered at import: unpickling finds them
    if not _base.startswith(PREFIX):
        attention_name(_base)


def attention_modules(model: nn.Module, configs: Any = None) -> list[nn.Module]:
    """The attention modules of ``model`` (the ``module`` transformers passes to an attention function: a module
    holding a ``config`` and an ``is_causal`` flag), optionally only those whose config is in ``configs``."""
    from transformers import PreTrainedModel

    ids = None if configs is None else {id(c) for c in configs}
    return [m for m in model.modules()
            if not isinstance(m, PreTrainedModel) and m.__dict__.get("config") is not None
            and hasattr(m, "is_causal") and (ids is None or id(m.config) in ids)]


def _same_object(ref, obj) -> bool:
    """``ref`` (a weak reference or None) still points at ``obj``."""
    return obj is None if ref is None else ref() is obj


def resolve_backend(backend: str, device: torch.device, kernel_note: str) -> tuple[str, str]:
    """``(backend kept for the calls, the patch note saying what runs)`` for ``attn_backend`` on a model on
    ``device``: "auto" is Triton on CUDA when triton is installed, the torch path elsewhere; "triton" without the
    package is an error. ``kernel_note`` says which calls the Triton kernel takes."""
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
    return backend, f"backend={backend}: {kernel_note}; the torch path for other calls"


def install_attention(model: nn.Module, runtime: AttentionRuntime, undo: Undo, modules: list[nn.Module],
                      method: str) -> str:
    """Attach ``runtime`` to ``modules`` and switch the configs they hold (the model's own copies: the language model's
    alone in a vision-language model, whose vision tower keeps its attention) to ``longctx_<base>``; returns that
    name. Installs, on each module, the pre-hook that tells the runtime its KV-cache layer, and on the model the check
    that every forward entered each of them (:class:`ForwardCheck`). The configs are put back by the patch's undo;
    the rest by ``undo`` here."""
    if not modules:
        raise ValueError(f"{method}: found no attention modules in {type(model).__name__}")
    configs = list({id(m.config): m.config for m in modules}.values())
    base = configs[0]._attn_implementation or "sdpa"
    if base.startswith(PREFIX):
        raise RuntimeError(f"{method}: the model already runs longctx attention '{base}' (unpatch it first)")
    try:
        name = attention_name(base)
    except ValueError as e:
        raise ValueError(f"{method}: {e}") from None
    runtime.base, runtime.method = base, method
    for m in modules:
        undo.setattr(m, RUNTIME_ATTR, runtime)
        undo.hook(m.register_forward_pre_hook(cache_layer_pre_hook, with_kwargs=True))
    if model.config in configs:
        model.set_attn_implementation(name)
    for config in configs:  # a vision-language model: the language model's config alone
        config._attn_implementation = name
    check = ForwardCheck(runtime, modules, name)
    undo.hook(model.register_forward_pre_hook(check, with_kwargs=True))
    undo.hook(model.register_forward_hook(check.after, with_kwargs=True))
    return name


class ForwardCheck:
    """Applied or loud: a forward of a patched model whose extended attention layers did not all run longctx's
    attention (the implementation switched after the patch, or a transformers release computing attention another
    way) raises, naming the method and the cause, instead of returning unextended outputs. Plain data (it deep-copies
    and pickles with the model)."""

    def __init__(self, runtime: AttentionRuntime, modules: list[nn.Module], name: str) -> None:
        self.runtime, self.modules, self.name = runtime, list(modules), name
        self.after = _AfterForward(self)

    def __call__(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        for m in self.modules:
            now = m.config._attn_implementation
            if now != self.name:
                raise RuntimeError(
                    f"{self.runtime.method}: {type(m).__name__} now runs attention '{now}', not the patch's "
                    f"'{self.name}' (set_attn_implementation after longctx.patch?), so the method would not be in "
                    "effect; longctx.unpatch(model), switch the implementation, then patch again")
        self.runtime.entered.clear()

    def check(self) -> None:
        missed = [m for m in self.modules if id(m) not in self.runtime.entered]
        if missed:
            m = missed[0]
            raise RuntimeError(
                f"{self.runtime.method}: this forward never entered longctx's attention in {len(missed)} of "
                f"{len(self.modules)} extended layers (first: {type(m).__name__} layer {getattr(m, 'layer_idx', '?')}): "
                "this transformers release does not call the attention interface there, so the method was not in "
                "effect; the outputs are withheld")


class _AfterForward:
    def __init__(self, check: ForwardCheck) -> None:
        self.owner = check

    def __call__(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.owner.check()


def attention_window(module: nn.Module) -> int | None:
    """The sliding window an attention module attends within (None: full attention): its own ``sliding_window``
    where the family sets one per layer (Qwen2, Gemma), else its config's (Mistral, Phi-3 read it for every layer)."""
    if "sliding_window" in module.__dict__:
        return module.__dict__["sliding_window"] or None
    return getattr(module.config, "sliding_window", None) or None


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Autograd records this call (training, LoRA): paths that write into kept buffers or call ops without a
    backward are not used."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _holds(layer: Any, key: torch.Tensor) -> bool:
    """``key`` are the keys ``layer`` returned for this call (its key tensor, or the filled part of a static one)."""
    keys = getattr(layer, "keys", None)
    # a sliding-window layer keeps a view of the keys it returned
    return keys is not None and (keys is key or key._base is keys or keys._base is key)


def static_cache_view(layer: Any, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keys, values and mask of the slots a preallocated (static) cache layer has filled. A ``StaticCache`` (also
    ``generate(cache_implementation="static")`` and compiled generation) returns all ``max_cache_len`` slots, the
    empty ones zeros, and transformers passes no mask to a static prefill (SDPA's top-left causal alignment hides
    them); the methods that place keys by counting back from the last query need the filled slots only."""
    if layer is None or getattr(layer, "keys", None) is not key or getattr(layer, "is_sliding", False):
        return key, value, mask
    filled, capacity = getattr(layer, "cumulative_length", None), getattr(layer, "max_cache_len", None)
    if not isinstance(filled, torch.Tensor) or capacity != key.shape[2]:
        return key, value, mask
    n = int(filled)
    if n >= key.shape[2]:
        return key, value, mask
    return key[:, :, :n], value[:, :, :n], (mask[..., :n] if mask is not None else None)


# ---------------------------------------------------------------------------------------------------------------
# positions per row from masks
# ---------------------------------------------------------------------------------------------------------------
def key_valid_mask(mask: torch.Tensor | None, batch: int, kv_len: int) -> torch.Tensor | None:
    """``[B, kv]`` bool: keys visible to at least one query of this call (padding is visible to none)."""
    if mask is None:
        return None
    if mask.dim() == 2:
        return mask[:, -kv_len:].bool()
    visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return visible[..., :kv_len].any(dim=-2).any(dim=1).expand(batch, kv_len)


def call_positions(position_ids: torch.Tensor | None, key_valid: torch.Tensor | None, batch: int, q_len: int,
                   kv_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_pos [B, q], k_pos [B, kv])`` int64: queries from ``position_ids`` (slot indices without them, as
    encoders pass none); keys the same when the call covers the whole sequence, else counted back from the last
    query over the valid slots (the last slot is the last query's own key)."""
    if position_ids is None:
        q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[None].expand(batch, q_len)
    else:
        q_pos = position_ids.to(device=device, dtype=torch.int64).expand(batch, q_len)
    if q_len == kv_len:
        return q_pos, q_pos
    valid = key_valid if key_valid is not None else torch.ones(batch, kv_len, dtype=torch.bool, device=device)
    after = valid.flip(-1).to(torch.int64).cumsum(-1).flip(-1) - valid.to(torch.int64)
    return q_pos, q_pos[:, -1:] - after


class CallPositions:
    """One attention call's valid keys (``[B, kv]`` or None) and ``(q_pos, k_pos)``, each computed on first use (a
    kernel that keeps its row layout across layers needs them once per forward, not once per layer)."""

    def __init__(self, mask: torch.Tensor | None, position_ids: torch.Tensor | None, batch: int, q_len: int,
                 kv_len: int, device: torch.device) -> None:
        self.mask, self.position_ids = mask, position_ids
        self._shape = (batch, q_len, kv_len, device)

    @functools.cached_property
    def key_valid(self) -> torch.Tensor | None:
        batch, _, kv_len, _ = self._shape
        return key_valid_mask(self.mask, batch, kv_len)

    @functools.cached_property
    def positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        return call_positions(self.position_ids, self.key_valid, *self._shape)


# ---------------------------------------------------------------------------------------------------------------
# the KV cache: which layer a call uses, keys kept rotated on it, histories of cached keys
# ---------------------------------------------------------------------------------------------------------------
def cache_layer_pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on an attention module: note (on its runtime's ``pending``) which KV-cache layer this call
    will use and whether that layer still holds the keys last seen (any cache edit — crop, beam reorder, a new cache
    — replaces its key tensor, so identity is a safe test)."""
    runtime = module.__dict__.get(RUNTIME_ATTR)
    pending = getattr(runtime, "pending", None)
    if pending is None:
        return
    cache = next((v for v in (*args, *kwargs.values()) if isinstance(v, Cache)), None)
    layers = getattr(cache, "layers", None)
    idx = getattr(module, "layer_idx", None)
    layer = layers[idx] if layers is not None and idx is not None and idx < len(layers) else None
    entry = getattr(layer, _KEPT_ATTR, None)
    keys = getattr(layer, "keys", None)
    continues = entry is not None and keys is not None and entry.keys_ref() is keys
    pending[id(module)] = (layer, continues)


@dataclass
class _KeptKeys:
    """Keys of one KV-cache layer rotated to other positions, kept on that layer and extended as it grows."""

    keys_ref: Any  # weakref to the cache layer's key tensor they were computed from
    k_pos: torch.Tensor  # [B, length]
    buffer: torch.Tensor  # [B, Hkv, capacity, D]
    length: int
    tag: tuple  # what they were rotated with (compared by value and identity)


def _same_positions(kept: torch.Tensor, now: torch.Tensor, key_valid: torch.Tensor | None) -> bool:
    """The kept keys' positions still hold on every valid slot (a padded slot's position is arbitrary)."""
    if kept.shape != now.shape:
        return False
    if key_valid is None:
        return torch.equal(kept, now)
    valid = key_valid[:, :now.shape[1]]
    return torch.equal(kept.masked_fill(~valid, 0), now.masked_fill(~valid, 0))


def _same_tag(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y or (not isinstance(x, torch.Tensor) and x == y) for x, y in zip(a, b))


def cached_rotated_keys(layer: Any, continues: bool, key: torch.Tensor, k_pos: torch.Tensor, q_len: int, tag: tuple,
                        rotate: Callable[[torch.Tensor, int, torch.Tensor], None],
                        key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Rotated keys for all ``kv`` slots of a cache layer, reusing (and extending) those kept on it when the cache
    only grew by this call's ``q_len`` keys at unchanged positions of its valid slots and ``tag`` is the same;
    recomputed otherwise. ``rotate(keys, start, out)`` writes the rotated keys of the slots from ``start``."""
    entry: _KeptKeys | None = getattr(layer, _KEPT_ATTR, None)
    batch, hkv, kv_len, dim = key.shape
    old = kv_len - q_len
    if (continues and entry is not None and _same_tag(entry.tag, tag) and entry.length == old > 0
            and entry.buffer.shape[:2] == (batch, hkv) and entry.buffer.dtype == key.dtype
            and _same_positions(entry.k_pos, k_pos[:, :old], key_valid)):
        if entry.buffer.shape[2] < kv_len:  # grow by a margin: one copy per 256+ decoding steps
            grown = key.new_empty(batch, hkv, kv_len + max(256, kv_len // 16), dim)
            grown[:, :, :old] = entry.buffer[:, :, :old]
            entry.buffer = grown
        rotate(key[:, :, old:], old, entry.buffer[:, :, old:kv_len])
        entry.k_pos = k_pos.clone()
    else:
        entry = _KeptKeys(None, k_pos.clone(), key.new_empty(batch, hkv, kv_len + 256, dim), 0, tag)
        rotate(key, 0, entry.buffer[:, :, :kv_len])
    entry.length, entry.keys_ref = kv_len, weakref.ref(key if getattr(layer, "keys", None) is None else layer.keys)
    try:
        setattr(layer, _KEPT_ATTR, entry)
    except AttributeError:  # a cache layer that takes no attributes: nothing is kept
        pass
    return entry.buffer[:, :, :kv_len]


class CachedPositions:
    """The position (fp32) of every key a KV-cache layer holds, appended call by call, kept **on that cache layer**
    (it lives and dies with the cache; two caches used in turn never mix), with whatever else a method records per
    cached key (``state``). A method that re-rotates cached keys when its frequencies change reads them here. Lost
    track (the cache was cropped or reordered outside a forward, or is not one longctx can follow) is an error, never
    a silent mismatch."""

    ATTR = "_longctx_cached_positions"

    def __init__(self, method: str) -> None:
        self.method = method

    def update(self, cache: Any, position_ids: torch.Tensor | None, batch: int, q_len: int, kv_len: int,
               device: torch.device) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """Record this call's ``q_len`` keys on the cache layer ``cache`` (None: no cache); returns ``(positions of
        the keys cached before them [B, past] or None for a new sequence, the layer's state dict)``, the state's
        ``"positions"`` then covering all ``kv_len`` keys. A sliding-window layer keeps only its latest keys: fewer
        cached keys than recorded are the latest of them."""
        if position_ids is None:
            position_ids = torch.arange(kv_len - q_len, kv_len, device=device)[None]
        pos = position_ids.to(device=device, dtype=torch.float32).expand(batch, q_len)
        past = kv_len - q_len
        state = getattr(cache, self.ATTR, None) if cache is not None else None
        if past == 0 or state is None:
            if past:
                raise RuntimeError(
                    f"{self.method} lost track of the KV cache: {past} cached keys it did not see written (the cache "
                    "was filled, cropped or reordered outside a patched forward; beam reordering is not supported)")
            state = {"positions": pos.clone()}
            if cache is not None:
                try:
                    setattr(cache, self.ATTR, state)
                except AttributeError:  # a cache layer that takes no attributes: no cached decoding to follow
                    pass
            return None, state
        history = state["positions"]
        if getattr(cache, "is_sliding", False) and history.shape[0] == batch and history.shape[1] > past:
            history = history[:, history.shape[1] - past:]
        if history.shape != (batch, past):
            raise RuntimeError(f"{self.method} lost track of the KV cache (its length or batch changed outside a "
                               "forward: cache cropping and beam reordering are not supported)")
        state["positions"] = torch.cat((history, pos), dim=1)
        return history, state
