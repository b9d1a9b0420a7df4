"""Model introspection: where a model keeps its rotary embeddings, how long it was trained, what it is.

The only rules longctx relies on are the ones transformers 5 uses for every rotary class built on
``ROPE_INIT_FUNCTIONS``: the module has a ``config`` with ``rope_parameters``, a ``rope_type`` (a string, or a dict
per layer type) and ``inv_freq`` buffers (``inv_freq``, or ``{layer_type}_inv_freq`` when the config nests
``rope_parameters`` by layer type, as Gemma3 and ModernBERT do).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "RotaryInfo",
    "ModelInfo",
    "unwrap",
    "find_rotary_modules",
    "rope_layer_types",
    "extendable_layer_types",
    "trained_length",
    "rotary_dim",
    "describe",
    "NotARopeModelError",
    "cache_kwarg",
    "returned_cache",
]

# Layer types whose attention only ever sees a bounded window: extending them is pointless (and would change a
# model's local behaviour), so frequency methods leave them alone.
_LOCAL_LAYER_MARKERS = ("sliding", "chunked", "local")


class NotARopeModelError(ValueError):
    """Raised when a RoPE method is asked of a model without rotary position embeddings."""


@dataclass
class RotaryInfo:
    """One rotary module of a model."""

    name: str
    module: nn.Module
    config: Any
    nested: bool
    """True when ``config.rope_parameters`` is a dict per layer type (Gemma3, ModernBERT)."""


@dataclass
class ModelInfo:
    """What ``longctx inspect`` reports."""

    architecture: str
    model_type: str
    kind: str  # "decoder" | "encoder"
    position_encoding: str  # "rope" | "absolute" | "none/unknown"
    trained_length: int | None
    max_position_embeddings: int | None
    rotary_dim: int | None
    head_dim: int | None
    rope_theta: Any = None
    rope_type: Any = None
    rope_factor: Any = None  # the scaling factor of a linear / dynamic / yarn rope type (None: unscaled)
    layer_types: list[str] = field(default_factory=list)
    extended_layer_types: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)


def unwrap(model: Any) -> nn.Module:
    """The transformers model inside ``model`` (a peft wrapper to its base model, a sentence-transformers model to its
    first module's ``auto_model``); transformers models are returned as they are."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    base = getattr(model, "get_base_model", None)  # peft's PeftModel (and its task classes)
    if callable(base) and type(model).__module__.startswith("peft."):
        return unwrap(base())
    # sentence-transformers: SentenceTransformer is an nn.Sequential whose first module wraps the HF model
    try:
        first = model[0]
    except Exception:  # noqa: BLE001 - not indexable: not a sentence-transformers model
        first = None
    for attr in ("auto_model", "model"):
        inner = getattr(first, attr, None)
        if isinstance(inner, nn.Module) and hasattr(inner, "config"):
            return inner
    if isinstance(model, nn.Module) and hasattr(model, "config") and hasattr(model.config, "model_type"):
        return model  # a transformers-style module that is not a PreTrainedModel subclass
    raise TypeError(
        f"expected a transformers PreTrainedModel or a sentence-transformers model, got {type(model).__name__}"
    )


def _is_rotary(module: nn.Module) -> bool:
    config = getattr(module, "config", None)
    if config is None or not getattr(config, "rope_parameters", None):
        return False
    if not hasattr(module, "rope_type"):
        return False
    return any(name == "inv_freq" or name.endswith("_inv_freq") for name in module._buffers)


def find_rotary_modules(model: nn.Module) -> list[RotaryInfo]:
    """All rotary-embedding modules built from ``ROPE_INIT_FUNCTIONS`` (one per model in most families)."""
    found = []
    for name, module in model.named_modules():
        if _is_rotary(module):
            config = module.config
            nested = bool(_nested_keys(config))
            found.append(RotaryInfo(name=name, module=module, config=config, nested=nested))
    return found


def _nested_keys(config: Any) -> list[str]:
    params = getattr(config, "rope_parameters", None) or {}
    fn = getattr(config, "nested_rope_parameter_keys", None)
    if fn is not None:
        return list(fn(params))
    labels = getattr(config, "layer_types", None) or ()
    return [k for k in params if k in labels]


def rope_layer_types(config: Any) -> list[str] | None:
    """Layer types that carry their own RoPE parameters, or None for a flat ``rope_parameters``."""
    keys = _nested_keys(config)
    return keys or None


def extendable_layer_types(config: Any) -> list[str] | None:
    """Layer types a frequency method extends: all but sliding/chunked/local ones (None for flat configs)."""
    keys = rope_layer_types(config)
    if keys is None:
        return None
    params = config.rope_parameters
    return [k for k in keys if params.get(k) is not None and not any(m in k for m in _LOCAL_LAYER_MARKERS)]


def trained_length(config: Any) -> int:
    """The context length the model was trained at: ``original_max_position_embeddings`` if the config has it
    (top level or in ``rope_parameters``), else ``max_position_embeddings``."""
    for source in (config, getattr(config, "rope_parameters", None) or {}):
        value = source.get("original_max_position_embeddings") if isinstance(source, dict) else getattr(
            source, "original_max_position_embeddings", None
        )
        if value:
            return int(value)
    value = getattr(config, "max_position_embeddings", None)
    if not value:
        raise ValueError(
            f"{type(config).__name__} has neither original_max_position_embeddings nor max_position_embeddings; "
            "pass trained_length=… to longctx.patch"
        )
    return int(value)


_OFFSET_MODELS = ("roberta", "xlm-roberta", "xlm_roberta", "camembert")


def position_offset(config: Any) -> int:
    """Rows of a learned position table before position 0: ``pad_token_id + 1`` for RoBERTa-style models (which
    count positions from the padding index), else 0."""
    return (config.pad_token_id + 1) if getattr(config, "model_type", "") in _OFFSET_MODELS else 0


def head_dim(config: Any) -> int:
    value = getattr(config, "head_dim", None)
    if value:
        return int(value)
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    if not hidden or not heads:
        raise ValueError(f"{type(config).__name__} lacks head_dim / hidden_size / num_attention_heads")
    return int(hidden // heads)


def rotary_dim(config: Any, params: dict | None = None) -> int:
    """Rotary dimension: ``int(head_dim · partial_rotary_factor)`` (what transformers' rope functions use)."""
    params = params if params is not None else config.rope_parameters
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    return int(head_dim(config) * factor)


def layer_params(config: Any, layer_type: str | None) -> dict:
    """``rope_parameters`` of one layer type (or the flat dict)."""
    return config.rope_parameters[layer_type] if layer_type is not None else config.rope_parameters


def is_encoder(model: nn.Module) -> bool:
    config = model.config
    if getattr(config, "is_decoder", False) or getattr(config, "is_causal", None) is True:
        return False
    name = type(model).__name__
    if "CausalLM" in name or "ForConditionalGeneration" in name:
        return False
    model_type = getattr(config, "model_type", "")
    return any(t in model_type for t in ("bert", "roberta", "electra", "gte", "nomic", "e5", "xlm")) or (
        "MaskedLM" in name or "SequenceClassification" in name and "bert" in model_type
    )


def has_absolute_positions(model: nn.Module) -> bool:
    for module in model.modules():
        emb = getattr(module, "position_embeddings", None)
        if isinstance(emb, nn.Embedding):
            return True
    return False


def describe(model: Any) -> ModelInfo:
    """A summary of the model's position encoding and trained length (``longctx.inspect`` adds the methods)."""
    hf = unwrap(model)
    config = hf.config
    rotary = find_rotary_modules(hf)
    text_config = rotary[0].config if rotary else config
    encoding = "rope" if rotary else ("absolute" if has_absolute_positions(hf) else "none/unknown")
    try:
        trained = trained_length(text_config)
        if encoding == "absolute":
            trained -= position_offset(text_config)
    except ValueError:
        trained = None
    info = ModelInfo(
        architecture=(getattr(config, "architectures", None) or [type(hf).__name__])[0],
        model_type=getattr(config, "model_type", "?"),
        kind="encoder" if is_encoder(hf) else "decoder",
        position_encoding=encoding,
        trained_length=trained,
        max_position_embeddings=getattr(text_config, "max_position_embeddings", None),
        rotary_dim=None,
        head_dim=None,
    )
    if rotary:
        layer_types = rope_layer_types(text_config)
        first = (extendable_layer_types(text_config) or [None])[0] if layer_types else None
        params = layer_params(text_config, first)
        info.head_dim = head_dim(text_config)
        info.rotary_dim = rotary_dim(text_config, params)
        if layer_types:
            info.layer_types = layer_types
            info.extended_layer_types = extendable_layer_types(text_config) or []
            info.rope_theta = {lt: text_config.rope_parameters[lt].get("rope_theta") for lt in layer_types}
            info.rope_type = {lt: text_config.rope_parameters[lt].get("rope_type") for lt in layer_types}
            factors = {lt: text_config.rope_parameters[lt].get("factor") for lt in layer_types}
            info.rope_factor = {lt: f for lt, f in factors.items() if f is not None} or None
        else:
            info.rope_theta = params.get("rope_theta")
            info.rope_type = params.get("rope_type")
            info.rope_factor = params.get("factor")
    return info


def cache_kwarg(model: Any = None) -> str:
    """The keyword a transformers forward takes the KV cache under: ``cache`` from transformers 5.25 (which deprecates
    ``past_key_values``, removal announced for 5.40), ``past_key_values`` before. ``model``: whose forward to read
    (default: Llama's, as every family follows the same release)."""
    import inspect as _inspect

    if model is None:
        from transformers import LlamaForCausalLM as model
    forward = getattr(model, "forward", model)
    return "cache" if "cache" in _inspect.signature(forward).parameters else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The KV cache a forward returned (``output.cache`` from transformers 5.25, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def buffer_device(module: nn.Module) -> torch.device:
    for name, buf in module._buffers.items():
        if buf is not None and name.endswith("inv_freq"):
            return buf.device
    return torch.device("cpu")
