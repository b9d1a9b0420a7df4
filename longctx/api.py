"""The public API (floor 4): ``patch``, ``unpatch``, ``patched``, ``load``, ``methods``, ``inspect``.

Nothing here names a method: every method declares itself in ``longctx.patches`` (its config, apply, export form,
checkpoint recognition) and this module reads the declarations.

The life of a patched model:

* ``patch`` validates every parameter before touching anything; the model gets its own copies of its configs (a
  config object shared with another model is never written); every edit is recorded as data on the model, so a
  deep copy or a pickle of a patched model carries its own patch and ``unpatch`` of a copy touches only the copy;
* a failed patch leaves the model as it was — a failed re-patch of a patched model included: its earlier patch is
  applied again;
* ``unpatch`` restores the original outputs, buffers, configs, attention implementation and length limits bit for
  bit, on the model's current device and dtype;
* ``save_pretrained`` of a patched model writes a config plain transformers reads (standard rope types only), plus a
  ``longctx`` block for methods no standard config expresses, which :func:`load` re-applies.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from .models import ModelInfo, describe, unwrap
from .patches import registry
from .patches.portable import portable_configs
from .patches.base import STATE_ATTR, PatchInfo, PatchState, ReachWarning, SetLimit, Transient, Undo, \
    privatize_configs
from .patches.registry import Method, get_method  # noqa: F401  (get_method: for the faces)

__all__ = ["PatchInfo", "patch", "unpatch", "patched", "unpatched", "methods", "inspect", "is_patched", "patch_info", "load",
           "resolve_method", "reload_record", "recognised_checkpoint", "config_dir", "CONFIG_KEY"]

logger = logging.getLogger("longctx")
CONFIG_KEY = "longctx"  # config.json block of a saved model whose method no standard config expresses
_LIMITS_ATTR = "_longctx_limits"  # on a sentence-transformers wrapper: the length limits a patch raised on it


def patch(model: Any, method: str, *, tokenizer: Any = None, **params: Any) -> PatchInfo:
    """Extend ``model``'s context window in place with ``method``; reversible with :func:`unpatch`.

    Args:
        model: a transformers model (decoder or encoder) or a sentence-transformers model.
        method: a name from :func:`methods` (``"pi"``, ``"ntk"``, ``"dynamic_ntk"``, ``"yarn"``, ``"selfextend"`` …).
        tokenizer: optional; its ``model_max_length`` is raised to the target length (and put back by ``unpatch``).
        **params: the method's parameters: ``factor`` or ``target_length`` (one of them), ``trained_length`` to
            override the config, and method-specific ones (``longctx.methods()`` lists them with what they accept).

    Returns:
        A :class:`PatchInfo` (method, resolved parameters, trained and target length). Patching a patched model
        replaces its patch; if the new one fails, the earlier one is applied again and the error raised.

    Raises:
        ValueError: an unknown method, a parameter value outside what it accepts (the message names the parameter
            and what is allowed), or a method that does not fit the model; ``TypeError``: an unknown parameter.
            The model is unchanged in every case.
    """
    if method == "auto":
        raise ValueError("'auto' chooses a method by measuring the candidates: call longctx.patch(model, 'auto', "
                         "target_length=N) (the package-level function), or run 'longctx recommend'")
    spec = resolve_method(model, method)
    cfg = spec.make_config(**params)
    hf = unwrap(model)
    previous: PatchState | None = getattr(hf, STATE_ATTR, None)
    if previous is not None:
        earlier_tokenizer = previous.tokenizer()
        unpatch(model)
    try:
        state = _apply(model, hf, spec, cfg, params, tokenizer)
    except BaseException:
        if previous is not None:  # the earlier patch comes back as it was
            request = previous.request
            earlier = get_method(request["method"])
            _apply(model, hf, earlier, earlier.make_config(**request["params"]), request["params"], earlier_tokenizer)
        raise
    logger.info(str(state.info))
    return state.info


def _apply(model: Any, hf: nn.Module, spec: Method, cfg: Any, params: dict, tokenizer: Any) -> PatchState:
    undo = Undo()
    wrapper_limits = Undo()
    try:
        privatize_configs(hf, undo)
        applied = spec.apply(hf, cfg, undo)
        record = _reload_record(spec, applied)
        form = applied.form or spec.form(applied.params)
        # the model's own config copy, saved with it: the record re-applies a method no standard config expresses;
        # for the others ("form": "config") it only tells longctx.load the target length (limits to raise)
        setattr(hf.config, CONFIG_KEY, {**copy.deepcopy(record), "form": form})
        for name, value in (spec.config_keys(record["params"]) if spec.config_keys else {}).items():
            setattr(hf.config, name, copy.deepcopy(value))  # keys the method declares for other runtimes (vLLM)
        if spec.kind.startswith("rope"):  # the 4.x layout beside rope_parameters: save_pretrained writes both
            layout_notes = portable_configs(hf, applied.layer_types)
            if form == "config":
                applied.notes.extend(layout_notes)
        if applied.target_length:
            _raise_limits(model, hf, tokenizer, applied.target_length, undo, wrapper_limits)
            if spec.bounded:  # past the target the extension is not what it was set up for: say so
                undo.hook(hf.register_forward_pre_hook(ReachWarning(spec.name, int(applied.target_length)),
                                                       with_kwargs=True))
    except BaseException:
        wrapper_limits()
        undo()
        raise
    info = PatchInfo(method=spec.name, params=applied.params, trained_length=applied.trained_length,
                     target_length=applied.target_length, factor=applied.factor, layer_types=applied.layer_types,
                     notes=applied.notes, form=form)
    state = PatchState(info=info, request={"method": spec.name, "params": dict(params)}, record=record, undo=undo,
                       tokenizer=Transient(tokenizer))
    setattr(hf, STATE_ATTR, state)
    if len(wrapper_limits):
        setattr(model, _LIMITS_ATTR, wrapper_limits)
    return state


def unpatch(model: Any) -> bool:
    """Remove a longctx patch, restoring the original behaviour bit for bit. Returns False if none was applied."""
    hf = unwrap(model)
    state: PatchState | None = getattr(hf, STATE_ATTR, None)
    limits = getattr(model, _LIMITS_ATTR, None) if model is not hf else None
    if limits is not None:
        limits()
        delattr(model, _LIMITS_ATTR)
    if state is None:
        return False
    delattr(hf, STATE_ATTR)
    state.undo()
    logger.info(f"longctx: {state.info.method} removed")
    return True


@contextlib.contextmanager
def patched(model: Any, method: str, *, tokenizer: Any = None, **params: Any) -> Iterator[PatchInfo]:
    """``with longctx.patched(model, "yarn", target_length=n) as info: …`` — patched inside the block, left as it
    was found afterwards (unpatched, or with its earlier patch applied again), whatever happens inside."""
    hf = unwrap(model)
    previous: PatchState | None = getattr(hf, STATE_ATTR, None)
    earlier = (previous.request, previous.tokenizer()) if previous is not None else None
    info = patch(model, method, tokenizer=tokenizer, **params)
    try:
        yield info
    finally:
        unpatch(model)
        if earlier is not None:
            request, earlier_tokenizer = earlier
            patch(model, request["method"], tokenizer=earlier_tokenizer, **request["params"])


@contextlib.contextmanager
def unpatched(model: Any) -> Iterator[None]:
    """``with longctx.api.unpatched(model): …`` — the model without its patch inside the block (e.g. to save the
    base model), the same patch applied again afterwards."""
    hf = unwrap(model)
    state: PatchState | None = getattr(hf, STATE_ATTR, None)
    if state is None:
        yield
        return
    request, tokenizer = state.request, state.tokenizer()
    unpatch(model)
    try:
        yield
    finally:
        patch(model, request["method"], tokenizer=tokenizer, **request["params"])


def resolve_method(model: Any, method: str) -> Method:
    """The registry entry ``method`` means for ``model``: a method with an absolute-position counterpart
    (``pi`` → ``pi_absolute``) means that one on an absolute-position model."""
    spec = get_method(method)
    if spec.on_absolute is not None and describe(unwrap(model)).position_encoding == "absolute":
        spec = get_method(spec.on_absolute)
    return spec


def _reload_record(spec: Method, applied: Any) -> dict[str, Any]:
    """``{"method", "params"}`` that re-apply ``applied`` to a saved copy of the model (the ``longctx`` block)."""
    fields = {name for name, _, _ in spec.parameters()}
    resolved = {**applied.params, "trained_length": applied.trained_length, "target_length": applied.target_length}
    params = applied.reload if applied.reload is not None else {k: v for k, v in resolved.items() if k in fields}
    return {"method": spec.name, "params": params}


def reload_record(model: Any) -> dict[str, Any] | None:
    """The ``{"method", "params"}`` record that re-applies ``model``'s patch to a saved copy (None: not patched)."""
    state = getattr(unwrap(model), STATE_ATTR, None)
    return copy.deepcopy(state.record) if state is not None else None


def is_patched(model: Any) -> bool:
    return getattr(unwrap(model), STATE_ATTR, None) is not None


def patch_info(model: Any) -> PatchInfo | None:
    state = getattr(unwrap(model), STATE_ATTR, None)
    return state.info if state is not None else None


def methods() -> list[dict[str, Any]]:
    """Every registered method: name, kind, one-line description, whether a standard config expresses it, and
    its parameters (name, type, default, help: what it does and accepts)."""
    out = []
    for spec in registry.values():
        helps = spec.parameter_help()
        out.append({
            "name": spec.name,
            "kind": spec.kind,
            "description": spec.description,
            "standard_config": spec.standard_config,
            "aliases": list(spec.aliases),
            "parameters": [{"name": n, "type": t, "default": d, "help": helps.get(n, "")}
                           for n, t, d in spec.parameters()],
        })
    return out


def inspect(model: Any) -> ModelInfo:
    """Architecture, position encoding, rotary dim, rope type, trained length and the methods that apply."""
    info = describe(model)
    info.methods = [spec.name for spec in registry.values() if spec.applies_to(info)]
    return info


def _raise_limits(model: Any, hf: nn.Module, tokenizer: Any, target: int, undo: Undo, wrapper_undo: Undo) -> None:
    """Raise the length limits that would otherwise truncate inputs: the tokenizer given (undone while it lives;
    a copy of the model does not carry it), sentence-transformers' ``max_seq_length`` and its tokenizer's
    ``model_max_length`` (undone with the wrapper's own record)."""
    wrapper = model if model is not hf else None
    limits = [(tokenizer, "model_max_length", undo, True), (wrapper, "max_seq_length", wrapper_undo, False),
              (getattr(wrapper, "tokenizer", None), "model_max_length", wrapper_undo, False)]
    for obj, attr, into, transient in limits:
        if obj is None or not hasattr(obj, attr):
            continue
        old = getattr(obj, attr)
        if old is None or old < target:
            into.push(SetLimit(Transient(obj) if transient else obj, attr, old))
            setattr(obj, attr, target)


# ---------------------------------------------------------------------------------------------------------------
# loading saved and released checkpoints
# ---------------------------------------------------------------------------------------------------------------
def config_dir(folder: Path) -> Path:
    """Where config.json lives: ``folder``, or a sentence-transformers directory's Transformer module."""
    modules = folder / "modules.json"
    if modules.exists():
        for module in json.loads(modules.read_text()):
            if module.get("type", "").endswith(".Transformer"):
                return folder / module.get("path", "")
    return folder


def _raw_config(folder: Path) -> dict:
    path = config_dir(folder) / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def recognised_checkpoint(folder: str | Path) -> Method | None:
    """The method whose authors' released-checkpoint layout ``folder`` has (e.g. a CLEX checkpoint), or None."""
    raw = _raw_config(Path(folder))
    return next((spec for spec in registry.values() if spec.recognise is not None and spec.recognise(raw)), None)


def _legacy(raw: dict) -> tuple[dict, dict | None]:
    """A config.json written by an earlier longctx whose rope parameters hold a longctx rope type: the same config
    with the base rope parameters, and the ``{"method", "params"}`` to re-apply (None: nothing legacy)."""
    legacy = {t: (spec, fn) for spec in registry.values() for t, fn in spec.legacy_rope_types.items()}
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    nested = {k: v for k, v in rope.items() if isinstance(v, dict)}
    found = None
    for key, params in (nested.items() if nested else [(None, rope)]):
        kind = params.get("rope_type", params.get("type"))
        if kind in legacy:
            spec, convert = legacy[kind]
            base, patch_params = convert(params)
            if key is None:
                rope = base
            else:
                rope = {**rope, key: base}
            found = {"method": spec.name, "params": patch_params}
    if found is None:
        return raw, None
    fixed = {k: v for k, v in raw.items() if k not in ("rope_scaling", "rope_parameters")}
    fixed["rope_parameters"] = rope
    if found["params"].get("trained_length"):
        fixed["max_position_embeddings"] = max(raw.get("max_position_embeddings") or 0,
                                               found["params"]["trained_length"])
    return fixed, found


def _check_block(block: Any, folder: Path) -> None:
    """A config.json ``longctx`` block as longctx writes it, or a ``ValueError`` saying what is wrong."""
    where = f"{config_dir(folder) / 'config.json'}: the '{CONFIG_KEY}' block"
    shape = ('{"method": NAME, "params": {...}, "form": "config" | "longctx" | "weights"}')
    if not isinstance(block, dict):
        raise ValueError(f"{where} must be an object {shape}, got {type(block).__name__}")
    if not isinstance(block.get("method"), str):
        raise ValueError(f"{where} needs a method name ('method'): {shape}; got keys {sorted(block)}")
    if not isinstance(block.get("params", {}), dict):
        raise ValueError(f"{where}: 'params' must be an object of the method's parameters, got "
                         f"{type(block['params']).__name__}")
    if block.get("form") not in (None, "config", "longctx", "weights"):
        raise ValueError(f"{where}: 'form' must be 'config', 'longctx' or 'weights', got {block['form']!r}")
    try:
        get_method(block["method"])
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    block.setdefault("params", {})


def load(path: str | Path, *, dtype: Any = None, device: str | None = None, allow_training_free: bool = False) -> Any:
    """Load a model directory with its extension active.

    * an export (``longctx export``) or a directory saved from a patched model (``save_pretrained``,
      sentence-transformers' ``save``): methods a standard config expresses come back by themselves; the others are
      re-applied from the ``longctx`` block of config.json (their files, e.g. CLEX's ODE weights, read from the
      directory);
    * a checkpoint as its method's authors released it (a CLEX checkpoint: ``rope_scaling`` of type ``clex``), on
      transformers' own class — no remote code; ``allow_training_free``: such a checkpoint without its learned
      weights loads with the method's training-free limit instead of failing;
    * a directory saved by an earlier longctx with a longctx rope type in its config: converted and re-applied.

    Returns the model (a sentence-transformers model for a sentence-transformers directory; a plain directory loads
    as it is), in eval mode, fp32 unless ``dtype`` says otherwise.
    """
    import torch
    import transformers

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no model directory at {folder}")
    released = recognised_checkpoint(folder)
    if released is not None:
        model, params = released.load_checkpoint(folder, dtype=dtype, device=device,
                                                 allow_training_free=allow_training_free)
        patch(model, released.name, **params)
        return model
    raw, legacy = _legacy(_raw_config(folder))
    if (folder / "modules.json").exists():
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(folder), device=device or "cpu")
    else:  # the class it was saved from (LlamaForCausalLM, BertModel …); no tokenizer needed
        if legacy is not None:
            config = transformers.CONFIG_MAPPING[raw["model_type"]].from_dict(
                {k: v for k, v in raw.items() if k != "model_type"})
        else:
            config = transformers.AutoConfig.from_pretrained(folder)
        arch = (getattr(config, "architectures", None) or ["AutoModel"])[0]
        model = getattr(transformers, arch, transformers.AutoModel).from_pretrained(folder, config=config)
    hf = unwrap(model)
    # as transformers loads a model in a dtype: the rotary frequencies stay fp32
    keep = {(id(m), n): b for m in hf.modules() for n, b in m._buffers.items()
            if b is not None and n.endswith("inv_freq") and b.dtype == torch.float32}
    model = model.to(dtype or torch.float32).eval()
    for m in hf.modules():
        for n, b in list(m._buffers.items()):
            if (id(m), n) in keep and b is not None and b.dtype != torch.float32:
                m._buffers[n] = keep[(id(m), n)]
    if device:
        model = model.to(device)
    block = getattr(hf.config, CONFIG_KEY, None) or legacy
    if block:
        _check_block(block, folder)
        if hasattr(hf.config, CONFIG_KEY):
            delattr(hf.config, CONFIG_KEY)
        if block.get("form") == "config":  # the config itself carries the method: only the length limits
            target = block["params"].get("target_length")
            if target and model is not hf and getattr(model, "max_seq_length", None) is not None:
                model.max_seq_length = max(model.max_seq_length, int(target))
            return model
        params = {k: str(folder / v[2:]) if isinstance(v, str) and v.startswith("./") else v  # files of the export
                  for k, v in block["params"].items()}
        if legacy is not None and block is not legacy:
            params = {**legacy["params"], **params}
        patch(model, block["method"], **params)
    return model
