"""The public API: ``patch``, ``unpatch``, ``methods``, ``inspect``, ``load_default_model``."""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .models import ModelInfo, describe, unwrap
from .patches.base import Undo
from .registry import get_method, registry

__all__ = ["PatchInfo", "patch", "unpatch", "methods", "inspect", "is_patched", "patch_info", "load", "CONFIG_KEY"]

logger = logging.getLogger("longctx")
_STATE_ATTR = "_longctx_state"
CONFIG_KEY = "longctx"  # config.json block of a saved model whose method no standard config expresses


@dataclass
class PatchInfo:
    """What ``longctx.patch`` applied."""

    method: str
    params: dict[str, Any]
    trained_length: int | None
    target_length: int | None
    factor: float | None
    layer_types: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = f", layers {self.layer_types}" if self.layer_types else ""
        extra = {k: v for k, v in self.params.items() if k not in ("factor", "target_length", "trained_length")}
        shown = ", ".join(f"{k}={v}" for k, v in extra.items())
        factor = f"factor {self.factor:g}" if self.factor is not None else "no fixed factor"
        return (
            f"longctx: {self.method} applied: trained {self.trained_length} -> target {self.target_length} "
            f"({factor}{', ' + shown if shown else ''}{where})"
        )


@dataclass
class _State:
    info: PatchInfo
    reverts: list
    record: dict[str, Any]  # {"method", "params"}: what re-applies this patch to a saved copy of the model


def patch(model: Any, method: str, *, tokenizer: Any = None, **params: Any) -> PatchInfo:
    """Extend ``model``'s context window in place with ``method``; reversible with :func:`unpatch`.

    Args:
        model: a transformers model (decoder or encoder) or a sentence-transformers model.
        method: a name from :func:`methods` (``"pi"``, ``"ntk"``, ``"dynamic_ntk"``, ``"yarn"``, …).
        tokenizer: optional; its ``model_max_length`` is raised to the target length.
        **params: the method's parameters: ``factor`` or ``target_length`` (one of them), ``trained_length`` to
            override the config, and method-specific ones (see ``longctx.methods()``).

    Returns:
        A :class:`PatchInfo` record (method, resolved parameters, trained and target length). Patching an
        already patched model first removes the earlier patch.
    """
    spec = resolve_method(model, method)
    hf = unwrap(model)
    cfg = spec.make_config(**params)
    if is_patched(hf):
        unpatch(model)
    applied = spec.apply(hf, cfg)
    reverts = [applied.revert]
    if applied.target_length:
        reverts += _raise_limits(model, hf, tokenizer, applied.target_length)
    record = _reload_record(spec, applied)
    if not spec.standard_config:
        undo = Undo()
        undo.setattr(hf.config, CONFIG_KEY, copy.deepcopy(record))
        reverts.append(undo)
    info = PatchInfo(
        method=spec.name,
        params=applied.params,
        trained_length=applied.trained_length,
        target_length=applied.target_length,
        factor=applied.factor,
        layer_types=applied.layer_types,
        notes=applied.notes,
    )
    setattr(hf, _STATE_ATTR, _State(info=info, reverts=reverts, record=record))
    logger.info(str(info))
    return info


def resolve_method(model: Any, method: str) -> Any:
    """The registry entry ``method`` means for ``model``: ``"pi"`` on an absolute-position model is ``pi_absolute``
    (the learned table interpolated)."""
    spec = get_method(method)
    if spec.kind != "absolute" and f"{spec.name}_absolute" in registry and (
        describe(unwrap(model)).position_encoding == "absolute"
    ):
        spec = registry[f"{spec.name}_absolute"]
    return spec


def _reload_record(spec: Any, applied: Any) -> dict[str, Any]:
    """``{"method", "params"}`` that re-apply ``applied`` to a saved copy of the model: written as
    ``config.longctx`` (saved with the config) for a method no standard config expresses, so that :func:`load` can
    re-apply it."""
    fields = {name for name, _, _ in spec.parameters()}
    resolved = {**applied.params, "trained_length": applied.trained_length, "target_length": applied.target_length}
    params = applied.reload if applied.reload is not None else {k: v for k, v in resolved.items() if k in fields}
    return {"method": spec.name, "params": params}


def reload_record(model: Any) -> dict[str, Any] | None:
    """The ``{"method", "params"}`` record that re-applies ``model``'s patch (``None`` if it is not patched)."""
    state = getattr(unwrap(model), _STATE_ATTR, None)
    return copy.deepcopy(state.record) if state is not None else None


def load(path: str | Any, *, dtype: Any = None, device: str | None = None, allow_training_free: bool = False) -> Any:
    """Load a model directory with its extension active: an export (``longctx export``) or a directory saved from a
    patched model (``st.save`` / ``save_pretrained``) — methods a standard config expresses come back by themselves;
    the others (``grouped``, ``recurrent``, ``pcw``, ``selfextend``, ``clex``, absolute ``pi``'s row mapping) are
    re-applied from the ``longctx`` block of config.json — or a CLEX checkpoint as its authors released it
    (``rope_scaling`` of type ``clex``; see :func:`load_clex_checkpoint`). Returns the model (a sentence-transformers
    model for a sentence-transformers directory); a plain directory loads as it is.

    ``allow_training_free``: load a CLEX checkpoint whose weights lack the ODE parameters with CLEX's training-free
    limit instead of failing."""
    from pathlib import Path

    import torch
    import transformers

    folder = Path(path)
    if (folder / "modules.json").exists():
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(folder), device=device or "cpu")
    elif _clex_scaling(folder) is not None:
        return load_clex_checkpoint(folder, dtype=dtype, device=device, allow_training_free=allow_training_free)
    else:  # the class it was saved from (LlamaForCausalLM, BertModel …); no tokenizer needed
        config = transformers.AutoConfig.from_pretrained(folder)
        arch = (getattr(config, "architectures", None) or ["AutoModel"])[0]
        model = getattr(transformers, arch, transformers.AutoModel).from_pretrained(folder)
    model = model.to(dtype or torch.float32).eval()
    if device:
        model = model.to(device)
    hf = unwrap(model)
    block = getattr(hf.config, CONFIG_KEY, None)
    if block:
        delattr(hf.config, CONFIG_KEY)
        params = {k: str(folder / v[2:]) if isinstance(v, str) and v.startswith("./") else v  # files of the export
                  for k, v in block["params"].items()}
        patch(model, block["method"], **params)
    return model


CLEX_FAMILIES = ("llama", "mistral", "mixtral", "phi", "qwen2")  # model types of CLEX checkpoints longctx maps


def _clex_scaling(folder: Any) -> dict | None:
    import json

    config = folder / "config.json"
    if not config.exists():
        return None
    scaling = json.loads(config.read_text()).get("rope_scaling") or {}
    return scaling if (scaling.get("type") or scaling.get("rope_type")) == "clex" else None


def load_clex_checkpoint(path: Any, *, dtype: Any = None, device: str | None = None,
                         allow_training_free: bool = False) -> Any:
    """A CLEX checkpoint as released (CLEX-LLaMA-2, CLEX-Phi-2, CLEX-Mixtral: config.json with ``rope_scaling``
    ``{"type": "clex", "max_factor", "param_factor", "act", "time_dt"}``, ``log_scale``, an ``auto_map`` to remote
    code, weights holding ``model.clex_layer.proj_func.ode_up_proj`` / ``ode_down_proj``) on transformers' own class
    for its model type — no ``trust_remote_code`` — patched with ``clex`` and those weights."""
    import json
    from pathlib import Path

    import torch
    import transformers

    from .core.clex import read_ode_weights

    folder = Path(path)
    raw = json.loads((folder / "config.json").read_text())
    scaling = raw["rope_scaling"]
    model_type = raw.get("model_type")
    if model_type not in CLEX_FAMILIES:
        raise ValueError(f"CLEX checkpoint of model type '{model_type}': longctx maps CLEX checkpoints of "
                         f"{', '.join(CLEX_FAMILIES)} onto transformers' own classes")
    try:
        read_ode_weights(folder)
        ode_weights: str | None = str(folder)
    except FileNotFoundError:
        if not allow_training_free:
            raise FileNotFoundError(
                f"{folder} is a CLEX checkpoint (rope_scaling type 'clex') but its weights hold no ODE parameters "
                "(model.clex_layer.proj_func.ode_up_proj / ode_down_proj); pass allow_training_free=True to load it "
                "with CLEX's training-free limit (NTK with alpha = 2t - 1)"
            ) from None
        ode_weights = None
    drop = ("model_type", "rope_scaling", "auto_map", "architectures", "log_scale", "use_flashattn",
            "transformers_version")
    config = transformers.CONFIG_MAPPING[model_type](**{k: v for k, v in raw.items() if k not in drop})
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype or torch.float32)
    model = model.eval()
    if device:
        model = model.to(device)
    params = {k: scaling[k] for k in ("max_factor", "param_factor", "act", "time_dt") if k in scaling}
    log_scale = bool(raw.get("log_scale", True))  # CLEXLlamaConfig's default
    patch(model, "clex", ode_weights=ode_weights, log_scale=log_scale, **params)
    logger.warning(f"longctx: loaded the CLEX checkpoint {folder} as {type(model).__name__} without remote code "
                   f"({'learned ODE weights' if ode_weights else 'training-free limit: no ODE weights'}, max_factor "
                   f"{params.get('max_factor')}, log_scale {log_scale})")
    return model


def unpatch(model: Any) -> bool:
    """Remove a longctx patch, restoring the original behaviour bit for bit. Returns False if none was applied."""
    hf = unwrap(model)
    state: _State | None = getattr(hf, _STATE_ATTR, None)
    if state is None:
        return False
    for revert in reversed(state.reverts):
        revert()
    delattr(hf, _STATE_ATTR)
    logger.info(f"longctx: {state.info.method} removed")
    return True


def is_patched(model: Any) -> bool:
    return getattr(unwrap(model), _STATE_ATTR, None) is not None


def patch_info(model: Any) -> PatchInfo | None:
    state = getattr(unwrap(model), _STATE_ATTR, None)
    return state.info if state is not None else None


def methods() -> list[dict[str, Any]]:
    """Every registered method: name, kind, one-line description, parameters (name, type, default)."""
    return [
        {
            "name": spec.name,
            "kind": spec.kind,
            "description": spec.description,
            "standard_config": spec.standard_config,
            "parameters": [{"name": n, "type": t, "default": d} for n, t, d in spec.parameters()],
        }
        for spec in registry.values()
    ]


def inspect(model: Any) -> ModelInfo:
    """Architecture, position encoding, rotary dim, rope type, trained length and the methods that apply."""
    info = describe(model)
    info.methods = [spec.name for spec in registry.values() if spec.applies_to(info)]
    return info


def _raise_limits(model: Any, hf: nn.Module, tokenizer: Any, target: int) -> list:
    """Raise the length limits that would otherwise truncate inputs (the tokenizer given, sentence-transformers'
    ``max_seq_length`` and its tokenizer's ``model_max_length``)."""
    reverts = []
    wrapper = model if model is not hf else None  # sentence-transformers: its length cap and its own tokenizer
    limits = ((tokenizer, "model_max_length"), (wrapper, "max_seq_length"),
              (getattr(wrapper, "tokenizer", None), "model_max_length"))
    for obj, attr in limits:
        if obj is None or not hasattr(obj, attr):
            continue
        old = getattr(obj, attr)
        if old is None or old < target:
            setattr(obj, attr, target)
            reverts.append(lambda obj=obj, attr=attr, old=old: setattr(obj, attr, old))
    return reverts
