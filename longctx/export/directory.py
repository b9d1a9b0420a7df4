"""The Hugging Face directory writer of an export: config / longctx / weights forms (see ``export/__init__.py``).

From a skeleton (the source directory's weights are only copied): every file copied, config.json rewritten, length
limits raised. From a loaded model: ``save_pretrained`` (sentence-transformers: ``save``), the base model's for the
longctx form, then config.json rewritten."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import api
from ..models import unwrap
from .files import copy_tree, write_json
from .forms import NotStandard, raised_limits, standard_config
from .sources import Opened, transformer_dir

__all__ = ["write_directory", "BASE_NOTE"]

BASE_NOTE = "plain transformers loads the base model; longctx.load re-applies the extension"
WEIGHTS_NOTE = ("plain loaders read the interpolated table densely (every input as if at the full length); "
                "longctx.load restores the anchor mapping (inputs within the trained length unchanged)")


def write_directory(partial: Path, opened: Opened, config_for: str, progress: bool
                    ) -> tuple[str, dict, list[str]]:
    """Write the export into ``partial``: ``(form, config.json keys set, notes)``."""
    model, info, record = opened.model, opened.info, opened.record
    hf = unwrap(model)
    spec, form = opened.spec, opened.form
    notes = list(info.notes)
    if opened.skeleton:
        base_dir = transformer_dir(opened.source.folder)
        base = json.loads((base_dir / "config.json").read_text())
    else:
        base = {k: v for k, v in hf.config.to_dict().items() if k != api.CONFIG_KEY}
    standard = None
    if form == "config":
        try:
            standard = standard_config(base, hf.config, info, config_for)
        except NotStandard as e:  # e.g. Phi-3's config class accepts only 'default' and 'longrope'
            form = "longctx"
            notes.append(f"no standard config form: {e}; written as a longctx block instead")
    if opened.skeleton:
        rel = base_dir.relative_to(opened.source.folder)
        rewrites = {rel / "config.json": base}
        if form == "config":
            rewrites.update(raised_limits(opened.source.folder, info.target_length))
        copy_tree(opened.source.folder, partial, rewrites, progress)
        for path, data in rewrites.items():  # raised limits (config.json is written below)
            write_json(partial / path, data)
        config_path, saved = partial / rel / "config.json", base
    else:
        if form == "longctx":  # the base model's files + the record: saved unpatched, then patched again
            with api.unpatched(model):
                _save(model, opened.tokenizer, partial)
        else:
            _save(model, opened.tokenizer, partial)
        config_path = transformer_dir(partial) / "config.json"
        saved = json.loads(config_path.read_text())
    if standard is not None:
        config, set_keys, form_notes = (standard_config(saved, hf.config, info, config_for) if not opened.skeleton
                                        else standard)
        notes += form_notes
    else:
        for name, write in spec.carry_files.items():  # files the parameters name go into the export as ./name
            if record["params"].get(name):
                record["params"][name] = write(record["params"][name], partial)
        keys = spec.config_keys(record["params"]) if spec.config_keys else {}
        config = {**saved, api.CONFIG_KEY: record, **keys}
        set_keys = {api.CONFIG_KEY: record, **keys}
        if form == "weights":
            set_keys["max_position_embeddings"] = saved.get("max_position_embeddings")
            notes.append(WEIGHTS_NOTE)
        else:
            notes.append(BASE_NOTE)
            notes += [f"{engine}: {line}" for engine, (_, line) in spec.engine_lines(record["params"]).items()]
    write_json(config_path, config)
    return form, set_keys, notes


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
