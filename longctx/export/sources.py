"""Where an export comes from, resolved once (:func:`resolve`), then opened once (:func:`open_source`): the model
loaded — or, where the weights are only copied, a weightless ``meta`` skeleton built from config.json — and patched
with the public API (``longctx.patch``). The writers (``directory.py``, ``gguf.py``) take what this returns."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import api
from ..models import unwrap

__all__ = ["Source", "Opened", "resolve", "open_source", "transformer_dir", "tokenizer_of"]

transformer_dir = api.config_dir  # where config.json lives (a sentence-transformers directory: its module's)


def tokenizer_of(folder: Path) -> Any:
    """The directory's tokenizer, or None where it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return None


@dataclass
class Source:
    """An export's source: a model in memory (``model``), a ``.gguf`` file (``gguf``), or a Hugging Face directory
    (``folder``; ``released``: a checkpoint as a method's authors released it)."""

    label: str
    model: Any = None
    tokenizer: Any = None
    folder: Path | None = None
    gguf: Path | None = None
    released: Any = None


@dataclass
class Opened:
    """A source opened for one export: the patched ``model`` (a ``meta`` skeleton when ``skeleton``: the directory
    writer copies the weights), its ``tokenizer``, the patch's ``info`` and ``record``, the registered method
    (``spec``) and its export ``form``; ``close`` leaves a caller's model as it was found."""

    source: Source
    model: Any
    tokenizer: Any
    info: Any
    record: dict
    spec: Any
    form: str
    skeleton: bool
    patched_here: bool
    method: str | None
    params: dict

    def reference(self) -> tuple[Any, Any]:
        """The patched model in memory with its weights (for verification): the skeleton's directory loaded and
        patched the same way."""
        if not self.skeleton:
            tok = self.tokenizer if self.tokenizer is not None else getattr(self.model, "tokenizer", None)
            return self.model, tok
        model = api.load(self.source.folder)
        api.patch(model, self.method, **self.params)
        return model, None

    def close(self) -> None:
        if self.patched_here and self.source.model is not None:
            api.unpatch(self.model)


def resolve(model_or_path: Any, tokenizer: Any = None) -> Source:
    """What ``model_or_path`` is, without loading it (``FileNotFoundError`` for a path that is no model)."""
    if not isinstance(model_or_path, (str, Path)):
        name = getattr(unwrap(model_or_path).config, "_name_or_path", "") or type(unwrap(model_or_path)).__name__
        return Source(label=name, model=model_or_path, tokenizer=tokenizer)
    from ..loading import resolve_model_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder, gguf = resolve_model_path(str(model_or_path))
    if gguf:
        return Source(label=str(folder / gguf), folder=folder, gguf=folder / gguf)
    if not (transformer_dir(folder) / "config.json").exists():
        raise FileNotFoundError(f"{model_or_path} is not a model directory: no config.json in "
                                f"{transformer_dir(folder)}")
    return Source(label=str(folder), folder=folder, released=api.recognised_checkpoint(folder))


def _skeleton(config_dir: Path) -> Any:
    """The model built from its config alone on the ``meta`` device: no weights read, enough to resolve a method."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(config_dir)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    with torch.device("meta"):
        return cls(config) if cls is not None else transformers.AutoModel.from_config(config)


def _check_method(source: Source, method: str | None, params: dict, model: Any) -> None:
    if source.released is not None:
        name = source.released.name
        if method not in (None, name) or params:
            raise ValueError(f"{source.label} is a {name} checkpoint: it exports with its own {name} (no method or "
                             f"'{name}', no parameters)")
        return
    if method is None and source.model is None:
        raise ValueError("give the method to export with (longctx.methods() lists them)")
    if source.model is not None:
        if method is None and not api.is_patched(model):
            raise ValueError("the model is not patched: give method=… (and its parameters), or longctx.patch it first")
        if method is None and params:
            raise ValueError(f"parameters {sorted(params)} given without a method")
        if method is not None and api.is_patched(model):
            raise ValueError(f"the model is already patched with '{api.patch_info(model).method}': export that "
                             "patch with method=None, or longctx.unpatch it first")


def open_source(source: Source, method: str | None, params: dict, *, weights: bool) -> Opened:
    """Load (``weights``, or where the method changes weights; otherwise a ``meta`` skeleton of a directory) and
    patch. A wrong method or parameter fails here, before any weight is read."""
    from ..loading import load_causal_lm

    _check_method(source, method, params, source.model)
    tokenizer, skeleton = source.tokenizer, False
    if source.model is not None:
        model = source.model
    elif source.released is not None:
        model, tokenizer, method = api.load(source.folder), tokenizer_of(source.folder), None
    elif source.gguf is not None:
        model, tokenizer = load_causal_lm(str(source.gguf))
    else:
        config_dir = transformer_dir(source.folder)
        model = _skeleton(config_dir)
        resolved = api.resolve_method(model, method)
        resolved.make_config(**params)  # a wrong parameter fails before anything is loaded
        skeleton = not weights and resolved.form(params) != "weights"
        if not skeleton:  # the weights are written (GGUF) or change (an interpolated table): load them
            model = api.load(source.folder)
            is_st = (source.folder / "modules.json").exists()  # sentence-transformers saves its own tokenizer
            tokenizer = None if is_st else tokenizer_of(source.folder)
    if method is not None:
        api.patch(model, method, tokenizer=tokenizer, **params)
    info, record = api.patch_info(model), api.reload_record(model)
    spec = api.get_method(record["method"])
    return Opened(source=source, model=model, tokenizer=tokenizer, info=info, record=record, spec=spec,
                  form=info.form or spec.form(info.params), skeleton=skeleton, patched_here=method is not None,
                  method=method, params=dict(params))
