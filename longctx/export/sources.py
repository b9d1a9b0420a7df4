"""Where an export comes from: a model directory (copied, its config rewritten; no weights loaded), a GGUF file or
a model whose weights change (loaded and saved), or a model in memory (saved)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .. import api
from ..models import unwrap
from .files import check_out, copy_tree, write_json
from .forms import NotStandard, raised_limits, standard_config

__all__ = ["Job", "path_job", "memory_job", "transformer_dir", "tokenizer_of"]

BASE_NOTE = "plain transformers loads the base model; longctx.load re-applies the extension"


transformer_dir = api.config_dir  # where config.json lives (a sentence-transformers directory: its module's)


def tokenizer_of(folder: Path) -> Any:
    """The directory's tokenizer, or None where it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return None


def _skeleton(config_dir: Path) -> Any:
    """The model built from its config alone on the ``meta`` device: no weights read, enough to resolve a method."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(config_dir)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    with torch.device("meta"):
        return cls(config) if cls is not None else transformers.AutoModel.from_config(config)


def _form(record: dict, info: Any) -> str:
    return info.form or api.get_method(record["method"]).form(info.params)


def _config_form(form: str, base: dict, hf: Any, info: Any, config_for: str) -> tuple[str, tuple | None, list[str]]:
    """``(form, standard_config(...) or None, notes)``: the config form falls back to the longctx form where the
    model's config class cannot read the standard parameters (e.g. Phi-3 accepts only 'default' and 'longrope')."""
    if form != "config":
        return form, None, []
    try:
        return form, standard_config(base, hf.config, info, config_for), []
    except NotStandard as e:
        return "longctx", None, [f"no standard config form: {e}; written as a longctx block instead"]


def method_keys(record: dict) -> dict:
    """config.json keys the method declares beside its block (``Method.config_keys``, e.g. vLLM's DCA config)."""
    spec = api.get_method(record["method"])
    return spec.config_keys(record["params"]) if spec.config_keys else {}


def carry_files(record: dict, partial: Path) -> None:
    """Files the record's parameters name go into the export (each method declares which, ``carry_files``),
    referred to as ``./name``."""
    spec = api.get_method(record["method"])
    for name, write in spec.carry_files.items():
        value = record["params"].get(name)
        if value:
            record["params"][name] = write(value, partial)


class Job:
    """One export: ``run`` writes the partial directory and returns ``(record, form, info, keys set, notes)``
    (``config_for``: the reading a standard config is written for, ``forms.CONFIG_FOR``); ``reference`` gives the
    patched model in memory for verification; ``close`` leaves a caller's model as found."""

    source: str

    def run(self, partial: Path, progress: bool, config_for: str = "transformers"
            ) -> tuple[dict, str, Any, dict, list[str]]:
        raise NotImplementedError

    def reference(self) -> tuple[Any, Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def path_job(source: str, out: Path, method: str | None, params: dict, overwrite: bool) -> Job:
    from ..loading import load_causal_lm, resolve_model_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder, gguf = resolve_model_path(source)
    released = None if gguf else api.recognised_checkpoint(folder)
    if released is not None:  # a released checkpoint of a method: exported with its own parameters
        if method not in (None, released.name) or params:
            raise ValueError(f"{source} is a {released.name} checkpoint: it exports with its own {released.name} "
                             f"(no method or '{released.name}', no parameters)")
        check_out(out, folder, overwrite)
        return MemoryJob(api.load(folder), tokenizer_of(folder), None, {}, source=str(folder), own=True)
    if method is None:
        raise ValueError("give the method to export with (longctx.methods() lists them)")
    check_out(out, folder if not gguf else None, overwrite)
    if gguf:
        model, tokenizer = load_causal_lm(source)
        return MemoryJob(model, tokenizer, method, params, source=f"{folder / gguf}", own=True)
    config_dir = transformer_dir(folder)
    if not (config_dir / "config.json").exists():
        raise FileNotFoundError(f"{source} is not a model directory: no config.json in {config_dir}")
    skeleton = _skeleton(config_dir)
    resolved = api.resolve_method(skeleton, method)
    resolved.make_config(**params)  # a wrong parameter fails before anything is loaded
    if resolved.form(params) == "weights":  # the weights change: load them
        model = api.load(folder)
        tokenizer = None if (folder / "modules.json").exists() else tokenizer_of(folder)  # ST saves its own
        return MemoryJob(model, tokenizer, method, params, source=str(folder), own=True)
    info = api.patch(skeleton, method, **params)
    return CopyJob(folder, config_dir, skeleton, info, method, params)


def memory_job(model: Any, tokenizer: Any, out: Path, method: str | None, params: dict, overwrite: bool) -> Job:
    check_out(out, None, overwrite)
    if method is None:
        if not api.is_patched(model):
            raise ValueError("the model is not patched: give method=… (and its parameters), or longctx.patch it first")
        if params:
            raise ValueError(f"parameters {sorted(params)} given without a method")
    elif api.is_patched(model):
        raise ValueError(f"the model is already patched with '{api.patch_info(model).method}': export that patch "
                         "with method=None, or longctx.unpatch it first")
    name = getattr(unwrap(model).config, "_name_or_path", "") or type(unwrap(model)).__name__
    return MemoryJob(model, tokenizer, method, params, source=name, own=False)


class CopyJob(Job):
    """config / longctx forms from a directory: copy every file, rewrite the config (and length limits)."""

    def __init__(self, folder: Path, config_dir: Path, skeleton: Any, info: Any, method: str, params: dict) -> None:
        self.folder, self.config_dir, self.skeleton, self.info = folder, config_dir, skeleton, info
        self.method, self.params, self.source = method, params, str(folder)

    def run(self, partial: Path, progress: bool, config_for: str = "transformers"
            ) -> tuple[dict, str, Any, dict, list[str]]:
        record = api.reload_record(self.skeleton)
        rel = self.config_dir.relative_to(self.folder)
        base = json.loads((self.config_dir / "config.json").read_text())
        form, standard, notes = _config_form(_form(record, self.info), base, self.skeleton, self.info, config_for)
        notes = list(self.info.notes) + notes
        if standard is not None:
            config, set_keys, form_notes = standard
            notes += form_notes
        else:
            carry_files(record, partial)
            config = {**base, api.CONFIG_KEY: record, **method_keys(record)}
            set_keys = {api.CONFIG_KEY: record, **method_keys(record)}
            notes.append(BASE_NOTE)
        rewrites = {rel / "config.json": config}
        if form == "config":
            rewrites.update(raised_limits(self.folder, self.info.target_length))
        copy_tree(self.folder, partial, rewrites, progress)
        for path, data in rewrites.items():
            write_json(partial / path, data)
        return record, form, self.info, set_keys, notes

    def reference(self) -> tuple[Any, Any]:
        model = api.load(self.folder)
        api.patch(model, self.method, **self.params)
        return model, None


class MemoryJob(Job):
    """A model in memory (or one that had to be loaded: GGUF, a weights-form method, a released checkpoint):
    ``save_pretrained`` / sentence-transformers ``save``."""

    def __init__(self, model: Any, tokenizer: Any, method: str | None, params: dict, source: str, own: bool) -> None:
        self.model, self.tokenizer, self.source, self.own = model, tokenizer, source, own
        self.patched_here = method is not None
        if method is not None:
            api.patch(model, method, tokenizer=tokenizer, **params)

    def run(self, partial: Path, progress: bool, config_for: str = "transformers"
            ) -> tuple[dict, str, Any, dict, list[str]]:
        model, hf = self.model, unwrap(self.model)
        info, record = api.patch_info(model), api.reload_record(model)
        base = {k: v for k, v in hf.config.to_dict().items() if k != api.CONFIG_KEY}
        form, _, notes = _config_form(_form(record, info), base, hf, info, config_for)
        notes = list(info.notes) + notes
        if form == "longctx":  # the base model's files + the record: saved unpatched, then patched again
            with api.unpatched(model):
                _save(model, self.tokenizer, partial)
        else:
            _save(model, self.tokenizer, partial)
        config_path = transformer_dir(partial) / "config.json"
        saved = json.loads(config_path.read_text())
        if form == "config":
            config, set_keys, form_notes = standard_config(saved, hf.config, info, config_for)
            notes += form_notes
            write_json(config_path, config)
        else:
            carry_files(record, partial)
            saved[api.CONFIG_KEY] = record
            saved.update(method_keys(record))
            set_keys = {api.CONFIG_KEY: record, **method_keys(record)}
            if form == "weights":
                set_keys["max_position_embeddings"] = saved.get("max_position_embeddings")
                notes.append("plain loaders read the interpolated table densely (every input as if at the full "
                             "length); longctx.load restores the anchor mapping (inputs within the trained length "
                             "unchanged)")
            else:
                notes.append(BASE_NOTE)
            write_json(config_path, saved)
        return record, form, info, set_keys, notes

    def reference(self) -> tuple[Any, Any]:
        tok = self.tokenizer if self.tokenizer is not None else getattr(self.model, "tokenizer", None)
        return self.model, tok

    def close(self) -> None:
        if self.patched_here and not self.own:
            api.unpatch(self.model)


def _save(model: Any, tokenizer: Any, partial: Path) -> None:
    if model is not unwrap(model):  # sentence-transformers: modules.json, its tokenizer and max_seq_length
        model.save(str(partial))
    else:
        with _gguf_dequantized(model):
            model.save_pretrained(partial)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
    card = partial / "README.md"
    if card.exists():  # the library's own card for the saved model; ours replaces it
        card.rename(partial / "README.base.md")


@contextlib.contextmanager
def _gguf_dequantized(model: Any) -> Iterator[None]:
    """A model loaded from GGUF holds de-quantised tensors but keeps transformers' gguf quantizer marker, which
    refuses ``save_pretrained``; save it as the plain model it is (the marker is put back afterwards)."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or str(getattr(method, "value", method)) != "gguf":
        yield
        return
    config_value = model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if config_value is not None:
            model.config.quantization_config = config_value
