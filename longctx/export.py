"""``longctx.export``: write an extended checkpoint that loads everywhere it can.

Three forms, chosen by the method:

* ``"config"`` — methods a standard config expresses (``pi`` → ``linear``, ``ntk`` → a new ``rope_theta``,
  ``dynamic_ntk`` → ``dynamic``, ``yarn``): config.json gets the transformers 5 ``rope_parameters`` *and* the 4.x
  form (``rope_scaling`` + top-level ``rope_theta``) that vLLM, SGLang and the llama.cpp converter read, with
  ``max_position_embeddings`` set the way their consumers count the served length (vLLM: ``max_position_embeddings
  × factor`` for linear/dynamic, ``original_max_position_embeddings × factor`` for yarn, ``max_position_embeddings``
  for a plain theta change). Weights are copied, not rewritten: no model is loaded (the method is applied to a
  weightless skeleton on the ``meta`` device to resolve its parameters). Both forms are read back with transformers
  before anything is renamed into place; a form that does not reproduce the parameters is not written (e.g.
  ModernBERT, whose 4.x config applied ``rope_scaling`` to every layer type), and the model card says so.
* ``"longctx"`` — methods no standard config expresses (selfextend, grouped, recurrent, pcw, cache-consistent
  dynamic NTK): config.json keeps the base model's values plus a ``longctx`` block ``{"method", "params"}`` that
  :func:`longctx.load` re-applies; plain transformers loads the base model. Weights are copied.
* ``"weights"`` — absolute-position ``pi``: the interpolated position table is written into the weights,
  ``max_position_embeddings``, the tokenizer's ``model_max_length`` and sentence-transformers' ``max_seq_length``
  are raised, so it loads at the new length anywhere (the ``longctx`` block keeps the anchor row mapping, which only
  :func:`longctx.load` installs).

Writes are atomic: everything goes to a hidden sibling ``.OUT.longctx-partial-<pid>`` that is renamed to ``OUT``
last; an interrupted export leaves no ``OUT`` (a killed one leaves its partial sibling, removed by the next export
to the same ``OUT``). An existing ``OUT`` is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch

from . import api
from .models import describe, unwrap
from .patches.base import Undo
from .registry import get_method

__all__ = ["export", "ExportResult", "ExportError", "STANDARD_ROPE_TYPES"]

# rope type of an in-memory patch -> the standard rope type written to disk
STANDARD_ROPE_TYPES = {"default": "default", "linear": "linear", "yarn": "yarn", "longctx_dynamic": "dynamic"}
_PARTIAL = ".longctx-partial-"
_OLD = ".longctx-old-"
_SKIP_DIRS = {".git", "__pycache__", ".cache"}
_BASE_NOTE = "plain transformers loads the base model; longctx.load re-applies the extension"


class ExportError(RuntimeError):
    """The export could not be written as asked (nothing was left at OUT)."""


@dataclass
class ExportResult:
    """What :func:`export` wrote."""

    path: Path
    source: str
    method: str
    form: str  # "config" | "longctx" | "weights"
    params: dict[str, Any]
    trained_length: int | None
    target_length: int | None
    config: dict[str, Any]  # the config.json keys the export set
    notes: list[str] = field(default_factory=list)
    verify: dict[str, Any] | None = None
    eval: list[dict[str, Any]] | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def export(
    model_or_path: Any,
    out: str | os.PathLike,
    method: str | None = None,
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    verify: bool = False,
    eval: bool = False,
    progress: bool = True,
    **params: Any,
) -> ExportResult:
    """Write an extended checkpoint of ``model_or_path`` to ``out``; :func:`longctx.load` reloads it extended.

    Args:
        model_or_path: a local model directory (config.json), a sentence-transformers directory (modules.json), a
            ``.gguf`` file (de-quantised into safetensors), ``"smollm2"`` / ``"minilm"`` (the embedded models), or a
            model in memory (patched already when ``method`` is None; with a ``method`` it is patched for the export
            and left as it was found).
        out: the output directory; created atomically.
        method: a registered method (``longctx.methods()``), with its parameters in ``params`` (``target_length``
            or ``factor``, …).
        tokenizer: for a model in memory: saved with it, its ``model_max_length`` raised to the target.
        overwrite: replace an existing ``out`` (only once the new export is complete).
        verify: reload the export, compare its outputs with the patched model in memory (must agree), and run one
            passkey check at the target length; results go into the model card and ``ExportResult.verify``.
        eval: passkey at the trained and the target length (decoders: by generation at depths 0.1 / 0.5 / 0.9;
            embedding models: LongEmbed passkey retrieval, 8 documents per length), on the reloaded export; the
            table goes into the model card and ``ExportResult.eval``.
        progress: show progress bars.

    Returns:
        An :class:`ExportResult`. Raises ``FileExistsError`` for an existing ``out`` without ``overwrite``,
        ``FileNotFoundError`` for a source that is not a model, ``ValueError`` for a method that does not fit.
    """
    start = time.time()
    out = Path(out).expanduser().absolute()
    if isinstance(model_or_path, (str, os.PathLike)):
        job = _path_job(str(model_or_path), out, method, params, overwrite)
    else:
        job = _memory_job(model_or_path, tokenizer, out, method, params, overwrite)
    partial = None
    try:
        partial = _partial_dir(out)
        result = job.run(partial, progress)
        loaded = api.load(partial) if verify or eval else None
        if verify:
            result.verify = _verify(loaded, partial, job, result, progress)
        if eval:
            lengths = [result.trained_length, result.target_length]
            result.eval = _passkey_rows(loaded, _tokenizer(partial), lengths, (0.1, 0.5, 0.9), 8, progress)
        _write_card(partial, result)
        _move_into_place(partial, out, overwrite)
    except BaseException:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        job.close()
    result.path, result.seconds = out, round(time.time() - start, 3)
    return result


# ----------------------------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------------------------
def _transformer_dir(folder: Path) -> Path:
    """Where config.json lives: ``folder`` itself, or a sentence-transformers directory's Transformer module."""
    modules = folder / "modules.json"
    if modules.exists():
        for module in json.loads(modules.read_text()):
            if module.get("type", "").endswith(".Transformer"):
                return folder / module.get("path", "")
    return folder


def _tokenizer(folder: Path) -> Any:
    """The directory's tokenizer, or None where it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return None


def _check_out(out: Path, src: Path | None, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if src is not None:
        src = src.resolve()
        target = out.resolve()
        if target == src or src in target.parents or target in src.parents:
            raise ValueError(f"the output {out} must be outside the source {src} (and not contain it)")


def _skeleton(config_dir: Path) -> Any:
    """The model built from its config alone on the ``meta`` device: no weights read, enough to resolve a method."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(config_dir)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    with torch.device("meta"):
        return cls(config) if cls is not None else transformers.AutoModel.from_config(config)


def _form(method: str, hf: Any) -> str:
    if method == "pi_absolute":
        return "weights"
    spec = get_method(method)
    if not spec.standard_config:
        return "longctx"
    types = _rope_types(hf.config.rope_parameters)
    return "config" if types and all(t in STANDARD_ROPE_TYPES for t in types) else "longctx"


def _config_form(form: str, base: dict, hf: Any, info: api.PatchInfo) -> tuple[str, tuple | None, list[str]]:
    """``(form, standard_config(...) or None, notes)``: the config form falls back to the longctx form where the
    model's config class cannot read the standard parameters (e.g. Phi-3 accepts only 'default' and 'longrope')."""
    if form != "config":
        return form, None, []
    try:
        return form, standard_config(base, hf.config, info), []
    except _NotStandard as e:
        return "longctx", None, [f"no standard config form: {e}; written as a longctx block instead"]


def _rope_types(rope: dict) -> list[str]:
    if "rope_type" in rope or "rope_theta" in rope:
        return [rope.get("rope_type", "default")]
    return [p.get("rope_type", "default") for p in rope.values() if isinstance(p, dict)]


class _Job:
    """One export: ``run`` writes the partial directory and returns the result; ``reference`` gives the patched
    model in memory for ``--verify``; ``close`` leaves a caller's model as it was found."""

    source: str

    def run(self, partial: Path, progress: bool) -> ExportResult:
        raise NotImplementedError

    def reference(self) -> tuple[Any, Any]:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _path_job(source: str, out: Path, method: str | None, params: dict, overwrite: bool) -> _Job:
    from .loading import load_causal_lm, resolve_model_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder, gguf = resolve_model_path(source)
    if not gguf and api._clex_scaling(folder) is not None:  # a released CLEX checkpoint: its own method
        if method not in (None, "clex") or params:
            raise ValueError(f"{source} is a CLEX checkpoint: it exports with its own learned CLEX (no method or "
                             "'clex', no parameters)")
        _check_out(out, folder, overwrite)
        return _MemoryJob(api.load(folder), _tokenizer(folder), None, {}, source=str(folder), own=True)
    if method is None:
        raise ValueError("give the method to export with (longctx.methods() lists them)")
    _check_out(out, folder if not gguf else None, overwrite)
    if gguf:
        model, tokenizer = load_causal_lm(source)
        return _MemoryJob(model, tokenizer, method, params, source=f"{folder / gguf}", own=True)
    config_dir = _transformer_dir(folder)
    if not (config_dir / "config.json").exists():
        raise FileNotFoundError(f"{source} is not a model directory: no config.json in {config_dir}")
    skeleton = _skeleton(config_dir)
    resolved = api.resolve_method(skeleton, method)
    if resolved.name == "pi_absolute":  # the table is interpolated: needs the weights
        resolved.make_config(**params)  # a wrong parameter fails before the load
        model = api.load(folder)
        tokenizer = None if (folder / "modules.json").exists() else _tokenizer(folder)  # ST saves its own
        return _MemoryJob(model, tokenizer, method, params, source=str(folder), own=True)
    info = api.patch(skeleton, method, **params)
    return _CopyJob(folder, config_dir, skeleton, info, method, params)


def _memory_job(model: Any, tokenizer: Any, out: Path, method: str | None, params: dict, overwrite: bool) -> _Job:
    _check_out(out, None, overwrite)
    if method is None:
        if not api.is_patched(model):
            raise ValueError("the model is not patched: give method=… (and its parameters), or longctx.patch it first")
        if params:
            raise ValueError(f"parameters {sorted(params)} given without a method")
    elif api.is_patched(model):
        raise ValueError(f"the model is already patched with '{api.patch_info(model).method}': export that patch "
                         "with method=None, or longctx.unpatch it first")
    name = getattr(unwrap(model).config, "_name_or_path", "") or type(unwrap(model)).__name__
    return _MemoryJob(model, tokenizer, method, params, source=name, own=False)


class _CopyJob(_Job):
    """config / longctx forms from a directory: copy every file, rewrite the config (and length limits)."""

    def __init__(self, folder: Path, config_dir: Path, skeleton: Any, info: api.PatchInfo, method: str,
                 params: dict) -> None:
        self.folder, self.config_dir, self.skeleton, self.info = folder, config_dir, skeleton, info
        self.method, self.params, self.source = method, params, str(folder)

    def run(self, partial: Path, progress: bool) -> ExportResult:
        record = api.reload_record(self.skeleton)
        rel = self.config_dir.relative_to(self.folder)
        base = json.loads((self.config_dir / "config.json").read_text())
        form, standard, notes = _config_form(_form(record["method"], self.skeleton), base, self.skeleton, self.info)
        notes = list(self.info.notes) + notes
        if standard is not None:
            config, set_keys, form_notes = standard
            notes += form_notes
        else:
            _carry_files(record, partial)
            config = {**base, api.CONFIG_KEY: record}
            set_keys = {api.CONFIG_KEY: record}
            notes.append(_BASE_NOTE)
        rewrites = {rel / "config.json": config}
        if form == "config":
            rewrites.update(_raised_limits(self.folder, self.info.target_length))
        _copy_tree(self.folder, partial, rewrites, progress)
        for path, data in rewrites.items():
            _write_json(partial / path, data)
        return _result(self.source, record, form, self.info, set_keys, notes)

    def reference(self) -> tuple[Any, Any]:
        model = api.load(self.folder)
        api.patch(model, self.method, **self.params)
        return model, None


class _MemoryJob(_Job):
    """A model in memory (or one that had to be loaded: GGUF, absolute pi): ``save_pretrained`` / ST ``save``."""

    def __init__(self, model: Any, tokenizer: Any, method: str | None, params: dict, source: str, own: bool) -> None:
        self.model, self.tokenizer, self.source, self.own = model, tokenizer, source, own
        self.patched_here = method is not None
        if method is not None:
            api.patch(model, method, tokenizer=tokenizer, **params)

    def run(self, partial: Path, progress: bool) -> ExportResult:
        model, hf = self.model, unwrap(self.model)
        info, record = api.patch_info(model), api.reload_record(model)
        form, _, notes = _config_form(_form(record["method"], hf), hf.config.to_dict(), hf, info)
        notes = list(info.notes) + notes
        if form == "longctx":  # the base model's files + the record: unpatch to save, then patch again
            api.unpatch(model)
            try:
                _save(model, self.tokenizer, partial)
            finally:
                api.patch(model, record["method"], tokenizer=self.tokenizer, **record["params"])
        else:
            _save(model, self.tokenizer, partial)
        config_path = _transformer_dir(partial) / "config.json"
        saved = json.loads(config_path.read_text())
        if form == "config":
            config, set_keys, form_notes = standard_config(saved, hf.config, info)
            notes += form_notes
            _write_json(config_path, config)
        else:
            _carry_files(record, partial)
            saved[api.CONFIG_KEY] = record
            set_keys = {api.CONFIG_KEY: record}
            if form == "weights":
                set_keys["max_position_embeddings"] = saved.get("max_position_embeddings")
                notes.append("plain loaders read the interpolated table densely (every input as if at the full "
                             "length); longctx.load restores the anchor mapping (inputs within the trained length "
                             "unchanged)")
            else:
                notes.append(_BASE_NOTE)
            _write_json(config_path, saved)
        return _result(self.source, record, form, info, set_keys, notes)

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
    undo = Undo()
    undo.setattr(model, "hf_quantizer", None)
    if hasattr(model.config, "quantization_config"):
        config_value = model.config.quantization_config
        del model.config.quantization_config
        undo.push(lambda: setattr(model.config, "quantization_config", config_value))
    try:
        yield
    finally:
        undo()


def _carry_files(record: dict, partial: Path) -> None:
    """Files a record refers to go into the export, referred to as ``./name`` (``longctx.load`` resolves them
    against the export's directory): CLEX's learned ODE weights."""
    source = record["params"].get("ode_weights")
    if source:
        from safetensors.torch import save_file

        from .core.clex import ODE_KEYS, read_ode_weights

        tensors = dict(zip((f"model.{k}" for k in ODE_KEYS), read_ode_weights(source)))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial / "clex_ode.safetensors"))
        record["params"]["ode_weights"] = "./clex_ode.safetensors"


def _result(source: str, record: dict, form: str, info: api.PatchInfo, set_keys: dict, notes: list) -> ExportResult:
    return ExportResult(path=Path(), source=source, method=record["method"], form=form, params=record["params"],
                        trained_length=info.trained_length, target_length=info.target_length, config=set_keys,
                        notes=notes)


# ----------------------------------------------------------------------------------------------------------------
# the standard config form
# ----------------------------------------------------------------------------------------------------------------
def _standard_params(params: dict) -> dict:
    out = dict(params)
    rope_type = STANDARD_ROPE_TYPES[out.get("rope_type", "default")]
    out["rope_type"] = rope_type
    if rope_type == "dynamic":  # transformers' and vLLM's dynamic count the trained length from max_position_embeddings
        out.pop("original_max_position_embeddings", None)
    return out


def standard_config(base: dict, patched: Any, info: api.PatchInfo) -> tuple[dict, dict, list[str]]:
    """``base`` config.json with the patched rope parameters in both forms: ``(config, keys set, notes)``.

    ``patched`` is the patched model's config object (its ``rope_parameters``), ``info`` the patch record. Each
    form is read back with transformers' own config class; the 4.x form is dropped (with a note) when transformers
    does not read it back to the same parameters.
    """
    L, target = int(info.trained_length), int(info.target_length)
    rope = copy.deepcopy(patched.rope_parameters)
    nested = [k for k, v in rope.items() if isinstance(v, dict)]
    if nested:
        rope = {k: (_standard_params(v) if isinstance(v, dict) else v) for k, v in rope.items()}
        extended = [k for k in (info.layer_types or nested) if k in rope]
        legacy = dict(rope[extended[0]]) if len(extended) == 1 else None
        main = rope[extended[0]]
    else:
        rope = _standard_params(rope)
        legacy = dict(rope)
        main = rope
    config = copy.deepcopy(base)
    config["rope_parameters"] = rope
    # the served length as each consumer counts it (see the module docstring)
    config["max_position_embeddings"] = L if main["rope_type"] in ("linear", "dynamic") else target
    if "original_max_position_embeddings" in config:  # Phi-3 style: transformers prefers it over rope_parameters
        config["original_max_position_embeddings"] = L
    notes: list[str] = []
    if legacy is not None:
        if legacy["rope_type"] == "default":
            config["rope_scaling"] = None
        else:
            config["rope_scaling"] = {**legacy, "type": legacy["rope_type"]}  # "type": readers before 4.43
        config["rope_theta"] = legacy["rope_theta"]
    if legacy is None or not _reads_back({k: v for k, v in config.items() if k != "rope_parameters"}, rope):
        for key in ("rope_scaling", "rope_theta"):
            if key in base:
                config[key] = base[key]
            else:
                config.pop(key, None)
        notes.append("no 4.x form (rope_scaling + top-level rope_theta) written: transformers does not read it back "
                     f"to these parameters for {base.get('model_type')}; only rope_parameters (transformers >= 5) "
                     "carries them")
    if not _reads_back(config, rope):
        raise _NotStandard(f"{base.get('model_type')}'s config class does not read {_plain(rope)} back")
    if main["rope_type"] == "dynamic":
        notes.append("vLLM and SGLang apply dynamic NTK statically at the full target length (their rotary cache "
                     "is fixed); transformers recomputes it per sequence length, so short inputs differ between them")
    keys = ("rope_parameters", "rope_scaling", "rope_theta", "max_position_embeddings",
            "original_max_position_embeddings")
    return config, {k: config[k] for k in keys if k in config}, notes


def _plain(rope: dict) -> dict:
    """Rope parameters without the legacy ``type`` alias (compared as transformers reads them)."""
    if any(isinstance(v, dict) for v in rope.values()):
        return {k: _plain(v) if isinstance(v, dict) else v for k, v in rope.items()}
    return {k: v for k, v in rope.items() if k != "type"}


class _NotStandard(Exception):
    """transformers cannot read these rope parameters from a config.json of this model type."""


def _reads_back(config: dict, rope: dict) -> bool:
    try:
        return _read_rope(config) == _plain(rope)
    except _NotStandard:
        return False


def _read_rope(config: dict) -> dict:
    """``rope_parameters`` as transformers reads them from this config.json content (``_NotStandard`` if its config
    class rejects them, e.g. Phi-3's, which only accepts 'default' and 'longrope')."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[config["model_type"]]
    data = {k: v for k, v in copy.deepcopy(config).items() if k not in ("model_type", "transformers_version")}
    try:
        return _plain(cls(**data).rope_parameters)
    except Exception as e:  # noqa: BLE001 - any validation error means: not expressible for this config class
        raise _NotStandard(f"{cls.__name__} rejects them: {str(e).strip().splitlines()[-1]}") from None


def _raised_limits(folder: Path, target: int) -> dict[Path, dict]:
    """Tokenizer ``model_max_length`` and sentence-transformers ``max_seq_length`` files raised to ``target``."""
    rewrites = {}
    for path in folder.rglob("*.json"):
        if _SKIP_DIRS & set(path.relative_to(folder).parts):
            continue
        key = {"tokenizer_config.json": "model_max_length", "sentence_bert_config.json": "max_seq_length"}.get(path.name)
        if key is None:
            continue
        data = json.loads(path.read_text())
        if isinstance(data.get(key), (int, float)) and data[key] < target:
            data[key] = target
            rewrites[path.relative_to(folder)] = data
    return rewrites


# ----------------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------------
def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def _copy_file(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)  # follows symlinks (Hub cache snapshots); sendfile on Linux


def _copy_tree(src: Path, dst: Path, skip: dict[Path, Any], progress: bool) -> None:
    """Copy every file of ``src`` into ``dst`` except those in ``skip`` (rewritten by the caller); the source's
    README.md becomes README.base.md (the export's card takes its name)."""
    from tqdm.auto import tqdm

    files = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if _SKIP_DIRS & set(rel.parts) or not path.is_file() or rel in skip:
            continue
        files.append((path, rel if rel != Path("README.md") else Path("README.base.md")))
    total = sum(p.stat().st_size for p, _ in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="copying", disable=not progress) as bar:
        for path, rel in files:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            _copy_file(path, dst / rel)
            bar.update(path.stat().st_size)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _partial_dir(out: Path) -> Path:
    """A fresh hidden sibling of ``out``; partial siblings left by killed exports (dead pids) are removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}{_PARTIAL}*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    partial = out.parent / f".{out.name}{_PARTIAL}{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    return partial


def _move_into_place(partial: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:  # appeared while exporting
            raise FileExistsError(f"{out} appeared while exporting; pass overwrite=True to replace it")
        old = out.parent / f".{out.name}{_OLD}{os.getpid()}"
        os.rename(out, old)
        os.rename(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(partial, out)


# ----------------------------------------------------------------------------------------------------------------
# verify and the model card
# ----------------------------------------------------------------------------------------------------------------
def _outputs(model: Any, ids: torch.Tensor) -> torch.Tensor:
    hf = unwrap(model)
    with torch.no_grad():
        out = hf(input_ids=ids.to(next(hf.parameters()).device))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float().cpu()


def _verify(loaded: Any, partial: Path, job: _Job, result: ExportResult, progress: bool) -> dict[str, Any]:
    """Compare the reloaded export with the patched model in memory, and run one passkey check at the target."""
    reference, tokenizer = job.reference()
    hf = unwrap(reference)
    trained, target = result.trained_length or 0, result.target_length or 0
    n = min(target, trained + 64) if target else 128
    vocab = hf.config.vocab_size
    ids = torch.randint(min(5, vocab - 1), vocab, (1, n), generator=torch.Generator().manual_seed(0))
    expected, got = _outputs(reference, ids), _outputs(loaded, ids)
    diff = float((expected - got).abs().max())
    scale = float(expected.abs().max())
    report: dict[str, Any] = {"tokens": n, "max_abs_diff": diff, "max_abs_output": scale}
    if diff > 1e-4 * max(1.0, scale):
        raise ExportError(f"the exported model's outputs differ from the patched model's by {diff:.3g} (at {n} "
                          "tokens): the export is not written")
    rows = _passkey_rows(loaded, tokenizer or _tokenizer(partial), [target], (0.5,), 4, progress)
    report["passkey"] = rows[0] if rows else {"skipped": "no tokenizer in the export"}
    return report


def _passkey_rows(model: Any, tokenizer: Any, lengths: list, depths: tuple, docs: int, progress: bool) -> list[dict]:
    """Passkey on ``model`` at each length: by generation on a decoder (one trial per depth), LongEmbed passkey
    retrieval over ``docs`` documents on an embedding model. No tokenizer: no rows."""
    if tokenizer is None:
        return []
    if describe(unwrap(model)).kind == "decoder":
        from longctx.eval.passkey import passkey_grid

        trials = passkey_grid(unwrap(model), tokenizer, [n - 16 for n in lengths], list(depths), progress=progress)
        return [{"kind": "generation", **t.to_dict()} for t in trials]
    from longctx.eval.retrieval import Embedder, evaluate
    from longctx.eval.synthetic import passkey_task

    embedder = Embedder(model, tokenizer, batch_size=1, show_progress=progress)
    task = passkey_task(embedder.count_tokens, [n - 2 for n in lengths], n_docs=docs)
    rows = []
    for n in lengths:
        metrics, _ = evaluate(embedder, task.split(n - 2), ks=(1,))
        rows.append({"kind": "retrieval", "length": n - 2, "documents": docs, **metrics})
    return rows


def _write_card(partial: Path, result: ExportResult) -> None:
    (partial / "README.md").write_text(model_card(result, is_st=(partial / "modules.json").exists()))


def model_card(result: ExportResult, is_st: bool = False) -> str:
    """The README.md of an export: base model, method and parameters, lengths, how to load it, verify results."""
    params = "\n".join(f"| `{k}` | `{v}` |" for k, v in result.params.items())
    form = {
        "config": "standard config (loads in plain transformers, vLLM and SGLang without longctx)",
        "longctx": "longctx block in config.json (re-applied by `longctx.load`; plain transformers loads the base "
                   "model)",
        "weights": "interpolated position table written into the weights (loads at the new length anywhere; "
                   "`longctx.load` restores the anchor mapping)",
    }[result.form]
    lines = [
        "---", "tags:", "- longctx", "- long-context", f"- {result.method}",
        f"library_name: {'sentence-transformers' if is_st else 'transformers'}", "---", "",
        f"# {Path(result.source).name or result.source} — extended to {result.target_length} tokens with "
        f"{result.method}", "",
        "Written by [longctx](https://pypi.org/project/longctx/) without training.", "",
        f"- base model: `{result.source}`",
        f"- trained length: {result.trained_length}; target length: {result.target_length}",
        f"- form: {form}", "",
        "| parameter | value |", "|---|---|", params, "",
        "config.json keys set by the export:", "", "```json", json.dumps(result.config, indent=2, default=str), "```",
        "", "## Load", "",
    ]
    if result.form == "config" and not is_st:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(\"PATH\")",
                  "tokenizer = AutoTokenizer.from_pretrained(\"PATH\")", "```", "",
                  "```bash", f"vllm serve PATH --max-model-len {result.target_length}", "```", ""]
    if is_st:
        lines += ["```python", "import longctx  # or: from sentence_transformers import SentenceTransformer",
                  "model = longctx.load(\"PATH\")", "```", ""]
    lines += ["```python", "import longctx", "model = longctx.load(\"PATH\")  # the extension active, whatever the form",
              "```", ""]
    if result.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in result.notes] + [""]
    if result.verify:
        v = result.verify
        lines += ["## Verification (`--verify`)", "",
                  f"- reloaded export vs patched model in memory, {v['tokens']} random tokens: max |Δ| = "
                  f"{v['max_abs_diff']:.3g} (outputs up to {v['max_abs_output']:.3g})"]
        pk = v.get("passkey", {})
        if pk.get("kind") == "generation":
            lines.append(f"- passkey by generation at {pk['tokens']} tokens (depth {pk['depth']}): key "
                         f"{pk['key']}, answer {pk['answer'] or '(none)'} — {'correct' if pk['correct'] else 'wrong'}")
        elif pk.get("kind") == "retrieval":
            scores = ", ".join(f"{k} {v:.3f}" for k, v in pk.items() if isinstance(v, float))
            lines.append(f"- LongEmbed passkey retrieval at {pk['length']} tokens, {pk['documents']} documents: "
                         f"{scores}")
        elif pk:
            lines.append(f"- passkey: {pk.get('skipped')}")
        lines.append("")
    if result.eval is not None:
        lines += ["## Passkey (`--eval`)", ""] + eval_table(result.eval) + [""]
    return "\n".join(lines)


def eval_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["No tokenizer in the export: no passkey run."]
    if rows[0]["kind"] == "retrieval":
        out = ["| prompt tokens | documents | nDCG@1 |", "|---|---|---|"]
        return out + [f"| {r['length']} | {r['documents']} | {r['ndcg@1']:.3f} |" for r in rows]
    out = ["| prompt tokens | depths | correct |", "|---|---|---|"]
    for n in dict.fromkeys(r["length"] for r in rows):
        cell = [r for r in rows if r["length"] == n]
        out.append(f"| {max(r['tokens'] for r in cell)} | {', '.join(str(r['depth']) for r in cell)} | "
                   f"{sum(r['correct'] for r in cell)} / {len(cell)} |")
    return out
