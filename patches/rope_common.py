"""Shared glue of the RoPE methods (floor 3): lengths, the rotary modules, their fp32 guard and in-place rebuild.

A frequency method (pi, ntk, dynamic_ntk, yarn) is "new standard ``rope_parameters`` for the extended layer types":

1. :func:`rope_targets` finds the rotary modules (``longctx.models.find_rotary_modules``), resolves the factor from
   ``factor`` / ``target_length`` and the trained length, and lists the layer types to extend (sliding / local
   layers are left alone);
2. :func:`apply_rope_method` writes the method's ``rope_parameters`` (transformers' own rope types only — ``linear``,
   ``yarn``, ``dynamic``, ``default`` with a new θ — so a saved config loads in plain transformers) into the model's
   own config copy, and rebuilds each rotary module **in place** from its class: the module object, its hooks
   (accelerate's) and its device stay, only buffers and plain attributes are swapped;
3. :class:`RotaryGuard` is installed on every rotary module a RoPE method relies on: ``.to(dtype)`` / ``.half()`` /
   ``.cuda()`` keep its frequencies in fp32 (on the new device), and the buffers saved for ``unpatch`` follow the
   same casts and moves, so unpatch gives exactly what the never-patched module would hold now.

Methods whose frequencies no standard config expresses (CLEX's per-length scale, dynamic NTK's cache-consistent mode)
keep the model's default ``rope_parameters`` and set the frequencies of each forward with a :class:`FrequencyHook`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from longctx.core.rope import resolve_factor
from longctx.models import (
    NotARopeModelError,
    extendable_layer_types,
    find_rotary_modules,
    layer_params,
    rotary_dim,
    trained_length,
)

from .base import Action, LengthConfig, Undo

__all__ = ["RopeContext", "RopeTargets", "rope_targets", "apply_rope_method", "rebuild_rotary", "guard_rotary",
           "RotaryGuard", "FrequencyHook", "layer_type_of", "frequency_buffer", "check_default_rope", "rope_applied", "own_frequencies"]


@dataclass
class RopeContext:
    """What a method's parameter function needs to know about one layer type."""

    factor: float
    trained_length: int
    target_length: int
    rotary_dim: int
    layer_type: str | None


@dataclass
class RopeTargets:
    """The rotary modules of a model and, per config they use, the layer types to extend."""

    rotaries: list[Any]  # longctx.models.RotaryInfo
    configs: dict[int, Any]  # id -> config
    contexts: dict[int, list[RopeContext]]  # config id -> one context per extended layer type (None: flat)
    unsavable: str | None = None  # why the model's config class cannot hold the method's rope parameters

    @property
    def first(self) -> RopeContext:
        return next(iter(self.contexts.values()))[0]

    def layer_types(self) -> list[str] | None:
        return [c.layer_type for c in self.first_contexts() if c.layer_type is not None] or None

    def first_contexts(self) -> list[RopeContext]:
        return next(iter(self.contexts.values()))


def _no_rope(model: nn.Module, method: str) -> NotARopeModelError:
    return NotARopeModelError(
        f"{type(model).__name__} has no rotary position embeddings (no ROPE_INIT_FUNCTIONS-based rotary module), "
        f"so the RoPE method '{method}' cannot apply. For absolute-position encoders (BERT, MiniLM, E5) use the "
        "absolute-position methods ('pi' on the position table, 'grouped', 'recurrent', 'pcw')."
    )


def check_default_rope(config: Any, layer_types: list[str] | None, method: str) -> None:
    """Frequency methods start from plain RoPE: refuse a model whose extended layers already use a scaled type."""
    for layer_type in layer_types or [None]:
        current = layer_params(config, layer_type).get("rope_type", "default")
        if current != "default":
            where = f" for layer type '{layer_type}'" if layer_type else ""
            raise ValueError(
                f"the model already uses rope_type '{current}'{where}; longctx's {method} starts from plain RoPE "
                "(rope_type 'default'). Load the base checkpoint, or set trained_length to the length the scaled "
                "model really reaches and start from its default RoPE."
            )


def rope_targets(model: nn.Module, method: str, cfg: LengthConfig, *, default_rope: bool = True) -> RopeTargets:
    """Resolve lengths and layer types for every config the rotary modules use; raise before any change."""
    rotaries = find_rotary_modules(model)
    if not rotaries:
        raise _no_rope(model, method)
    configs = {id(r.config): r.config for r in rotaries}
    contexts: dict[int, list[RopeContext]] = {}
    for cid, config in configs.items():
        trained = int(cfg.trained_length) if cfg.trained_length else trained_length(config)
        factor = resolve_factor(trained, cfg.factor, cfg.target_length)
        target = int(cfg.target_length) if cfg.target_length else int(math.ceil(trained * factor))
        layer_types = extendable_layer_types(config)
        if layer_types is not None and not layer_types:
            raise ValueError(
                f"{type(config).__name__} only has local (sliding/chunked) rotary layers {list(config.rope_parameters)}"
                "; there is no global layer to extend"
            )
        if default_rope:
            check_default_rope(config, layer_types, method)
        contexts[cid] = [RopeContext(factor, trained, target, rotary_dim(config, layer_params(config, lt)), lt)
                         for lt in layer_types or [None]]
    return RopeTargets(rotaries, configs, contexts)


def apply_rope_method(model: nn.Module, method: str, cfg: LengthConfig, params_fn: Any, undo: Undo,
                      targets: RopeTargets | None = None) -> RopeTargets:
    """Write ``params_fn(cfg, old layer params, context)`` as the ``rope_parameters`` of each extended layer type of
    each config (the model's own copies: see ``privatize_configs``), raise ``max_position_embeddings`` to the target,
    and rebuild the rotary modules in place. Returns the resolved targets.

    ``params_fn`` sets top-level config keys under dunder names — ``"__max_position_embeddings__"`` (another value
    than the target: the trained length where readers count from it, see ``patches/portable.py``),
    ``"__original_max_position_embeddings__"`` — so that the config in memory is the one every runtime reads the
    same (``save_pretrained`` writes it as it is)."""
    targets = targets or rope_targets(model, method, cfg)
    for cid, config in targets.configs.items():
        before = {k: copy.deepcopy(config.__dict__[k]) for k in _ROPE_KEYS if k in config.__dict__}
        params = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.rope_parameters.items()}
        target = targets.contexts[cid][0].target_length
        top = {"max_position_embeddings": max(target, getattr(config, "max_position_embeddings", 0) or 0)}
        for ctx in targets.contexts[cid]:
            old = params[ctx.layer_type] if ctx.layer_type is not None else params
            new = params_fn(cfg, dict(old), ctx)
            top.update({k[2:-2]: new.pop(k) for k in list(new) if k.startswith("__") and k.endswith("__")})
            if ctx.layer_type is None:
                params = new
            else:
                params[ctx.layer_type] = new
        config.rope_parameters = params
        for key, value in top.items():
            setattr(config, key, value)
        why = _unsavable(config)
        if why:  # e.g. Phi-3's config accepts only 'default' and 'longrope': its rotary modules get their own copy
            own = copy.deepcopy(config)
            for key in _ROPE_KEYS:
                config.__dict__.pop(key, None)
            config.__dict__.update(before)
            for r in targets.rotaries:
                if r.config is config:
                    guard_rotary(r.module, undo)
                    undo.setattr(r.module, "config", own)
                    r.config = own
            targets.unsavable = why
    for r in targets.rotaries:
        rebuild_rotary(r.module, undo)
    return targets


_ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta")


def _unsavable(config: Any) -> str | None:
    """Why ``config``'s class would refuse to save (or load) it as it now is (its own validation), or None."""
    validate = getattr(config, "validate", None)
    if validate is None:
        return None
    try:
        validate()
    except Exception as e:  # noqa: BLE001 - the class's own validators: any of their errors
        return str(getattr(e, "__cause__", None) or e).strip().splitlines()[-1]
    return None


# ---------------------------------------------------------------------------------------------------------------
# the rotary modules: fp32 guard and in-place rebuild
# ---------------------------------------------------------------------------------------------------------------
def _frequency_names(module: nn.Module) -> list[str]:
    return [n for n, b in module._buffers.items() if b is not None and n.endswith("inv_freq")]


class RotaryGuard(Action):
    """Installed as a rotary module's ``_apply`` (an instance attribute; the class is untouched) while a RoPE method
    is applied: casts and moves run as usual, then the frequency buffers that were fp32 are put back in fp32 on
    their new device (transformers' rotary modules would otherwise let ``.to(bfloat16)`` round them). It saves the
    module's buffers (the very tensors) and attributes when installed; the saved buffers follow every cast and move
    exactly as they would have inside the never-patched module. As the undo action it puts them back (whatever
    :func:`rebuild_rotary` or a frequency hook did meanwhile) and removes itself."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.saved_attrs = {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}
        self.saved_buffers: dict[str, torch.Tensor | None] = dict(module._buffers)
        self.saved_non_persistent = set(module._non_persistent_buffers_set)

    def __call__(self, fn: Any, recurse: bool = True) -> nn.Module:
        module = self.module
        fp32 = {n: module._buffers[n] for n in _frequency_names(module) if module._buffers[n].dtype == torch.float32}
        type(module)._apply(module, fn, recurse)
        for name, before in fp32.items():
            now = module._buffers.get(name)
            if now is not None and now.dtype != torch.float32:
                module._buffers[name] = before.to(now.device)
        self.saved_buffers = {n: fn(b) if b is not None else None for n, b in self.saved_buffers.items()}
        return module

    def undo(self) -> None:
        module = self.module
        for key in [k for k in vars(module) if not k.startswith("_") and k != "training"]:
            if key not in self.saved_attrs:
                del module.__dict__[key]
        module.__dict__.update(self.saved_attrs)
        module._buffers.clear()
        module._buffers.update(self.saved_buffers)
        module._non_persistent_buffers_set.clear()
        module._non_persistent_buffers_set.update(self.saved_non_persistent)
        module.__dict__.pop("_apply", None)


def guard_rotary(module: nn.Module, undo: Undo) -> RotaryGuard:
    """Keep ``module``'s frequencies fp32 through casts while patched (see :class:`RotaryGuard`); idempotent."""
    guard = module.__dict__.get("_apply")
    if isinstance(guard, RotaryGuard):
        return guard
    guard = RotaryGuard(module)
    module.__dict__["_apply"] = guard
    undo.push(guard)
    return guard


def own_frequencies(module: nn.Module, undo: Undo) -> None:
    """Give ``module`` its own copies of its frequency buffers (for a :class:`FrequencyHook` that writes into them
    every forward); the originals — the very tensors — come back with the undo."""
    guard_rotary(module, undo)
    for name in _frequency_names(module):
        module._buffers[name] = module._buffers[name].clone()


def rebuild_rotary(module: nn.Module, undo: Undo) -> None:
    """Re-run the rotary class on its (already edited) config and move the result into ``module`` in place; the old
    buffers (the very same tensors) and attributes are saved on its :class:`RotaryGuard` for the undo."""
    guard_rotary(module, undo)
    device = next((b.device for n, b in module._buffers.items() if b is not None and n.endswith("inv_freq")),
                  torch.device("cpu"))
    fresh = type(module)(module.config)
    for key in [k for k in vars(module) if not k.startswith("_") and k != "training"]:
        if key not in vars(fresh):
            del module.__dict__[key]
    for key, value in vars(fresh).items():
        if not key.startswith("_") and key != "training":
            module.__dict__[key] = value
    module._buffers.clear()
    for name, buf in fresh._buffers.items():
        module._buffers[name] = buf.to(device) if buf is not None else None
    module._non_persistent_buffers_set.clear()
    module._non_persistent_buffers_set.update(fresh._non_persistent_buffers_set)


def frequency_buffer(module: nn.Module, layer_type: str | None) -> torch.Tensor:
    """The ``inv_freq`` buffer of ``layer_type`` (``{layer_type}_inv_freq``) or the flat one."""
    return getattr(module, f"{layer_type}_inv_freq" if layer_type is not None else "inv_freq")


class FrequencyHook:
    """A forward pre-hook on a rotary module that sets the frequencies of each forward from its length n (largest
    position + 1): ``frequencies(layer_type, n)`` gives them (fp32, ``[rot/2]``), written into the buffer in place.
    Subclasses are plain data (they deep-copy and pickle with the model)."""

    layer_types: list[str | None]

    def frequencies(self, layer_type: str | None, n: int) -> torch.Tensor:
        raise NotImplementedError

    def on_length(self, n: int) -> None:
        """Called once per forward with its length, before the frequencies are set."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        position_ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        if position_ids is None:
            return
        n = int(position_ids.max().item()) + 1
        self.on_length(n)
        for layer_type in self.layer_types:
            buf = frequency_buffer(module, layer_type)
            buf.copy_(self.frequencies(layer_type, n).to(buf.device, buf.dtype))


def layer_type_of(module: nn.Module) -> str | None:
    """The layer type of an attention module whose config nests ``rope_parameters`` per layer type, else None."""
    config = module.config
    layer_types = getattr(config, "layer_types", None)
    nested = isinstance(config.rope_parameters, dict) and layer_types and any(
        k in layer_types for k in config.rope_parameters
    )
    return layer_types[module.layer_idx] if nested else None


def rope_applied(targets: RopeTargets, cfg: LengthConfig, notes: list[str] | None = None) -> Any:
    """The :class:`~longctx.patches.base.Applied` record of a RoPE method: the given parameters with factor,
    target and trained length resolved."""
    from .base import Applied

    first = targets.first
    resolved = {k: v for k, v in cfg.to_dict().items() if v is not None}
    resolved.update(factor=first.factor, target_length=first.target_length, trained_length=first.trained_length)
    notes = list(notes or [])
    form = None
    if targets.unsavable:
        form = "longctx"
        notes.append(f"the model's config class cannot hold these rope parameters ({targets.unsavable}): the rotary "
                     "modules read a copy of the config that does; save_pretrained / export write the base config "
                     "with a longctx block (longctx.load re-applies it; plain transformers loads the base model)")
    return Applied(params=resolved, trained_length=first.trained_length, target_length=first.target_length,
                   factor=first.factor, layer_types=targets.layer_types(), notes=notes, form=form)
