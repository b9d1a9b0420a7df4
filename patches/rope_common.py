"""Shared glue of the frequency-scaling methods (pi, ntk, dynamic_ntk, yarn).

Every such method is "new ``rope_parameters`` for the extended layer types". The glue:

1. finds the model's rotary modules (``longctx.models.find_rotary_modules``) and their configs;
2. resolves the factor from ``factor`` / ``target_length`` and the trained length;
3. writes the method's ``rope_parameters`` into the config (flat, or per layer type: sliding/local layers are left
   alone) and sets ``max_position_embeddings`` to the target length;
4. rebuilds each rotary module *in place* from its class and the new config — the module object, its hooks
   (accelerate's device hooks included) and its device stay; only its buffers and plain attributes are swapped;
5. returns an undo that restores the old buffers (the very same tensors), attributes and config values, so
   ``unpatch`` is bit-exact.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from longctx.core.rope import resolve_factor
from longctx.models import (
    NotARopeModelError,
    buffer_device,
    extendable_layer_types,
    find_rotary_modules,
    rotary_dim,
    trained_length,
)

from .base import Applied, Undo

__all__ = ["RopeConfig", "RopeContext", "apply_rope_method", "rebuild_rotary", "layer_type_of", "base_attention",
           "install_attention_wrapper"]


@dataclass
class RopeConfig:
    """Parameters every frequency method takes.

    Give ``factor`` (target / trained length) or ``target_length``; ``trained_length`` overrides what the config
    says (``original_max_position_embeddings``, else ``max_position_embeddings``).
    """

    factor: float | None = None
    target_length: int | None = None
    trained_length: int | None = None


@dataclass
class RopeContext:
    """What a method's parameter function needs to know about one layer type."""

    factor: float
    trained_length: int
    target_length: int
    rotary_dim: int
    layer_type: str | None


# (method config, old per-layer params, context) -> new per-layer params
ParamsFn = Callable[[Any, dict, RopeContext], dict]
# (model, rotary modules, undo, contexts) -> notes; for methods that need more than new rope_parameters
PostFn = Callable[[nn.Module, list, Undo, list[RopeContext]], list[str]]


def rebuild_rotary(module: nn.Module, undo: Undo) -> None:
    """Re-run the rotary class on its (already edited) config and move the result into ``module`` in place."""
    device = buffer_device(module)
    fresh = type(module)(module.config)
    saved_attrs = {k: v for k, v in vars(module).items() if not k.startswith("_") and k != "training"}
    saved_buffers = dict(module._buffers)
    saved_non_persistent = set(module._non_persistent_buffers_set)

    for key, value in vars(fresh).items():
        if not key.startswith("_") and key != "training":
            module.__dict__[key] = value
    module._buffers.clear()
    for name, buf in fresh._buffers.items():
        module._buffers[name] = buf.to(device) if buf is not None else None
    module._non_persistent_buffers_set.clear()
    module._non_persistent_buffers_set.update(fresh._non_persistent_buffers_set)

    def restore() -> None:
        for key in [k for k in vars(module) if not k.startswith("_") and k != "training"]:
            if key not in saved_attrs:
                del module.__dict__[key]
        module.__dict__.update(saved_attrs)
        module._buffers.clear()
        module._buffers.update(saved_buffers)
        module._non_persistent_buffers_set.clear()
        module._non_persistent_buffers_set.update(saved_non_persistent)

    undo.push(restore)


def apply_rope_method(
    model: nn.Module,
    method: str,
    cfg: RopeConfig,
    params_fn: ParamsFn,
    post: PostFn | None = None,
) -> Applied:
    """Apply a frequency method given its per-layer ``rope_parameters`` function; see the module docstring."""
    rotaries = find_rotary_modules(model)
    if not rotaries:
        raise NotARopeModelError(
            f"{type(model).__name__} has no rotary position embeddings (no ROPE_INIT_FUNCTIONS-based rotary module), "
            f"so the RoPE method '{method}' cannot apply. For absolute-position encoders (BERT, MiniLM, E5) use the "
            "absolute-position methods ('pi' on the position table, 'grouped', 'recurrent', 'pcw')."
        )
    undo = Undo()
    contexts: list[RopeContext] = []
    try:
        configs = {id(r.config): r.config for r in rotaries}
        for config in configs.values():
            contexts.extend(_edit_config(config, method, cfg, params_fn, undo))
        for r in rotaries:
            rebuild_rotary(r.module, undo)
        notes = post(model, rotaries, undo, contexts) if post is not None else []
    except BaseException:
        undo()
        raise
    first = contexts[0]
    resolved = {k: v for k, v in asdict(cfg).items() if v is not None}
    resolved.update(factor=first.factor, target_length=first.target_length, trained_length=first.trained_length)
    layer_types = [c.layer_type for c in contexts if c.layer_type is not None] or None
    return Applied(
        method=method,
        params=resolved,
        trained_length=first.trained_length,
        target_length=first.target_length,
        factor=first.factor,
        layer_types=layer_types,
        revert=undo,
        notes=notes,
    )


def _edit_config(config: Any, method: str, cfg: RopeConfig, params_fn: ParamsFn, undo: Undo) -> list[RopeContext]:
    trained = int(cfg.trained_length) if cfg.trained_length else trained_length(config)
    factor = resolve_factor(trained, cfg.factor, cfg.target_length)
    target = int(cfg.target_length) if cfg.target_length else int(math.ceil(trained * factor))

    old_params = copy.deepcopy(config.rope_parameters)
    new_params = copy.deepcopy(old_params)
    layer_types = extendable_layer_types(config)
    if layer_types is not None and not layer_types:
        raise ValueError(
            f"{type(config).__name__} only has local (sliding/chunked) rotary layers {list(old_params)}; "
            "there is no global layer to extend"
        )
    contexts = []
    for layer_type in layer_types or [None]:
        params = new_params[layer_type] if layer_type is not None else new_params
        current = params.get("rope_type", "default")
        if current != "default":
            where = f" for layer type '{layer_type}'" if layer_type else ""
            raise ValueError(
                f"the model already uses rope_type '{current}'{where}; longctx's frequency methods start from "
                "plain RoPE (rope_type 'default'). Load the base checkpoint, or set trained_length to the length "
                "the scaled model really reaches and start from its default RoPE."
            )
        ctx = RopeContext(
            factor=factor,
            trained_length=trained,
            target_length=target,
            rotary_dim=rotary_dim(config, params),
            layer_type=layer_type,
        )
        updated = params_fn(cfg, dict(params), ctx)
        if layer_type is None:
            new_params = updated
        else:
            new_params[layer_type] = updated
        contexts.append(ctx)

    def restore_params() -> None:
        config.rope_parameters = old_params

    config.rope_parameters = new_params
    undo.push(restore_params)
    undo.setattr(config, "max_position_embeddings", max(target, getattr(config, "max_position_embeddings", 0) or 0))
    return contexts


# ---------------------------------------------------------------------------------------------------------------
# attention functions that wrap the model's own (sdpa / eager / flash …): registered with AttentionInterface and,
# with the base's mask function, AttentionMaskInterface (without the second the model would silently get no mask)
# ---------------------------------------------------------------------------------------------------------------
def layer_type_of(module: nn.Module) -> str | None:
    """The layer type of an attention module whose config nests ``rope_parameters`` per layer type, else None."""
    config = module.config
    layer_types = getattr(config, "layer_types", None)
    nested = isinstance(config.rope_parameters, dict) and layer_types and any(
        k in layer_types for k in config.rope_parameters
    )
    return layer_types[module.layer_idx] if nested else None


def base_attention(name: str, module: nn.Module) -> Callable:
    """The attention function ``name`` stands for (``eager``: the module's own ``eager_attention_forward``)."""
    if name == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"{type(module).__name__} has no eager_attention_forward to wrap")
        return fn
    return ALL_ATTENTION_FUNCTIONS[name]


def install_attention_wrapper(model: nn.Module, prefix: str, make: Callable[[str], Callable], method: str,
                              undo: Undo) -> str:
    """Switch ``model`` to the attention function ``make(base)`` registered as ``prefix + base`` (``base``: the
    model's current implementation); returns the name, and pushes the switch back onto ``undo``."""
    base = model.config._attn_implementation
    if base.startswith(prefix):
        base = base[len(prefix):]
    name = f"{prefix}{base}"
    if name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        if base not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            raise ValueError(f"{method} cannot wrap attention implementation '{base}'; supported: "
                             f"{sorted(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)}")
        AttentionInterface.register(name, make(base))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.set_attn_implementation(name)
    undo.push(lambda: model.set_attn_implementation(base))
    return name
