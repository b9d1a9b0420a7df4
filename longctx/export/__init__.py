"""``longctx.export``: write an extended checkpoint that loads everywhere it can (floor 5).

Three forms, each method declaring its own (``export_form`` in its registration; the table per method is in
docs/export.md):

* ``"config"`` — a standard config expresses the method: config.json gets the transformers 5 ``rope_parameters``
  *and* the 4.x form that vLLM, SGLang and the llama.cpp converter read (``forms.py``). Weights are copied, not
  rewritten: no model is loaded (the method is applied to a weightless skeleton on the ``meta`` device to resolve its
  parameters).
* ``"longctx"`` — no standard config expresses it: config.json keeps the base model's values plus a ``longctx`` block
  ``{"method", "params"}`` that :func:`longctx.load` re-applies (files it names, declared by the method, are carried
  along); plain transformers loads the base model.
* ``"weights"`` — the method changes weights (a learned position table interpolated): they are written, and the
  length limits (``max_position_embeddings``, the tokenizer's ``model_max_length``, sentence-transformers'
  ``max_seq_length``) are raised, so it loads at the new length anywhere.

Writes are atomic and never lose a previous export (``files.py``). ``verify=True`` reloads the export and requires
its outputs to agree with the patched model in memory. Evaluations (passkey …) are not run here: the caller hands
them in as ``checks`` (``longctx.eval.export_checks`` builds the CLI's), so export never imports eval.

``longctx.export`` is this package and is callable: ``longctx.export(model_or_path, out, method, **params)`` calls
:func:`export`.
"""

from __future__ import annotations

import shutil
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..models import unwrap
from .card import model_card, write_card
from .files import PARTIAL, ExportError, move_into_place, partial_dir, recover
from .forms import CONFIG_FOR, standard_config
from .sources import Job, memory_job, path_job, tokenizer_of

__all__ = ["export", "ExportResult", "ExportError", "Check", "model_card", "standard_config"]


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
    config_for: str = "transformers"  # the reading a standard config was written for (forms.CONFIG_FOR)
    notes: list[str] = field(default_factory=list)
    verify: dict[str, Any] | None = None
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"title", "lines", "data"}
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


@dataclass(frozen=True)
class Check:
    """An evaluation run on the reloaded export before it is moved into place: ``run(model, tokenizer, result,
    progress)`` returns ``(data, markdown lines)``; the lines go into the model card under ``title``, the data into
    ``ExportResult.checks[name]``. Raising stops the export (nothing is written)."""

    name: str
    title: str
    run: Callable[[Any, Any, ExportResult, bool], tuple[Any, list[str]]]


def export(
    model_or_path: Any,
    out: str | Path,
    method: str | None = None,
    *,
    tokenizer: Any = None,
    overwrite: bool = False,
    verify: bool = False,
    checks: Sequence[Check] = (),
    progress: bool = True,
    config_for: str = "transformers",
    gguf_type: str | None = None,
    **params: Any,
) -> ExportResult:
    """Write an extended checkpoint of ``model_or_path`` to ``out``; :func:`longctx.load` reloads it extended.

    Args:
        model_or_path: a local model directory (config.json), a sentence-transformers directory (modules.json), a
            ``.gguf`` file (de-quantised into safetensors), ``"smollm2"`` / ``"minilm"`` (the embedded models), a
            checkpoint as a method's authors released it (e.g. CLEX; no method needed), or a model in memory
            (patched already when ``method`` is None; with a ``method`` it is patched for the export and left as it
            was found).
        out: the output directory; created atomically.
        method: a registered method (``longctx.methods()``), with its parameters in ``params`` (``target_length``
            or ``factor``, …).
        tokenizer: for a model in memory: saved with it, its ``model_max_length`` raised to the target.
        overwrite: replace an existing ``out`` (only once the new export is complete; never lost on failure).
        verify: reload the export and require its outputs to agree with the patched model in memory.
        checks: evaluations to run on the reloaded export (see :class:`Check`; ``longctx.eval.export_checks``).
        progress: show progress bars.
        config_for: where one config.json cannot be read the same by every runtime (``yarn``: transformers <= 4.50
            and vLLM >= 0.30 count ``max_position_embeddings`` differently), the reading to write: ``"transformers"``
            (every transformers release 4.45 ... 5.x, vLLM 0.12 ... 0.29) or ``"vllm"`` (every vLLM release and
            transformers >= 4.51). The card says which runtimes read the export as longctx means it
            (docs/export.md).
        gguf_type: for an ``out`` ending in ``.gguf`` (a llama.cpp file, ``export/gguf.py``): ``"f32"``, ``"f16"`` or
            ``"q8_0"``; None: f16 from a Hugging Face model, the source's own tensor types from a ``.gguf``.

    Returns:
        An :class:`ExportResult`. Raises ``FileExistsError`` for an existing ``out`` without ``overwrite``,
        ``FileNotFoundError`` for a source that is not a model, ``ValueError`` / ``TypeError`` for a method or
        parameter that does not fit, :class:`ExportError` when verification fails (nothing is written).
    """
    from .. import api

    start = time.time()
    if config_for not in CONFIG_FOR:
        raise ValueError(f"config_for must be one of {list(CONFIG_FOR)}, got {config_for!r}")
    out = Path(out).expanduser().absolute()
    if out.suffix == ".gguf":
        return _export_gguf(model_or_path, out, method, tokenizer=tokenizer, overwrite=overwrite, verify=verify,
                            checks=checks, gguf_type=gguf_type, params=params, start=start)
    if gguf_type is not None:
        raise ValueError("gguf_type applies to a .gguf output only (OUT ending in .gguf)")
    recover(out)  # a previous export left aside by an overwrite that did not finish comes back first
    if isinstance(model_or_path, (str, Path)):
        job = path_job(str(model_or_path), out, method, params, overwrite)
    else:
        job = memory_job(model_or_path, tokenizer, out, method, params, overwrite)
    partial = None
    try:
        partial = partial_dir(out)
        record, form, info, set_keys, notes = job.run(partial, progress, config_for)
        if form == "longctx":  # who serves it: the method's own reading of each engine
            lines = api.get_method(record["method"]).engine_lines(record["params"])
            notes += [f"{engine}: {line}" for engine, (_, line) in lines.items()]
        notes = list(dict.fromkeys(notes))  # the patch and the form may say the same thing
        result = ExportResult(path=Path(), source=job.source, method=record["method"], form=form,
                              params=record["params"], trained_length=info.trained_length,
                              target_length=info.target_length, config=set_keys, notes=notes,
                              config_for=config_for)
        loaded = api.load(partial) if verify or checks else None
        if verify:
            result.verify = _verify(loaded, job, result)
        for check in checks:
            tok = job.reference()[1] or tokenizer_of(partial)
            data, lines = check.run(loaded, tok, result, progress)
            result.checks[check.name] = {"title": check.title, "lines": lines, "data": data}
        write_card(partial, result)
        move_into_place(partial, out, overwrite)
    except BaseException:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        job.close()
    result.path, result.seconds = out, round(time.time() - start, 3)
    return result


def _export_gguf(source: Any, out: Path, method: str | None, *, tokenizer: Any, overwrite: bool, verify: bool,
                 checks: Sequence[Check], gguf_type: str | None, params: dict, start: float) -> ExportResult:
    """``export`` to a ``.gguf`` file: resolve the source, load it, patch it with the public API, write one file
    (``gguf.py``), verify it with llama.cpp (``verify``), write the card beside it (``OUT.md``)."""
    import os

    from .. import api
    from ..loading import load_causal_lm, resolve_model_path
    from .gguf import GGUF_TYPES, rope_inputs, write_gguf
    from .sources import tokenizer_of
    from longctx.patches.portable import NotStandard, gguf_rope

    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type must be one of {list(GGUF_TYPES)}, got {gguf_type!r}")
    if checks:
        raise ValueError("evaluations (passkey …) run on a Hugging Face export; a .gguf export checks with "
                         "verify=True (--verify: llama.cpp's logits against the patched model)")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if out.exists() and out.is_dir():
        raise FileExistsError(f"{out} is a directory")
    source_gguf, own = None, isinstance(source, (str, Path))
    if own:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        folder, gguf_name = resolve_model_path(str(source))
        if gguf_name is not None:
            source_gguf = folder / gguf_name
            model, tokenizer = load_causal_lm(str(source_gguf))
        else:
            model, tokenizer = api.load(folder), tokenizer_of(folder)
        name = str(source_gguf or folder)
    else:
        model, name = source, getattr(getattr(source, "config", None), "_name_or_path", "") or type(source).__name__
    if method is None:
        if not api.is_patched(model):
            raise ValueError("give the method to export with (longctx.methods() lists them)")
        info, patched_here = api.patch_info(model), False
    else:
        if api.is_patched(model):
            raise ValueError(f"the model is already patched with '{api.patch_info(model).method}': export that "
                             "patch with method=None, or longctx.unpatch it first")
        info, patched_here = api.patch(model, method, tokenizer=tokenizer, **params), True
    partial = out.parent / f".{out.name}{PARTIAL}{os.getpid()}"
    try:
        spec = api.get_method(info.method)
        served = spec.engine_lines(info.params).get("llama.cpp") if spec.engines else None
        form = info.form or spec.form(info.params)
        notes = list(info.notes)
        if form == "config":
            rope_params, inv_freq, attention, base = rope_inputs(model)
            rope = gguf_rope(rope_params, inv_freq, attention, base, int(info.trained_length))
            notes += rope.notes
            context = int(info.target_length or info.trained_length)
            weights = model
        elif served is not None and served[0]:  # the engine runs it on the base model's file (SelfExtend)
            with api.unpatched(model):
                rope_params, inv_freq, attention, base = rope_inputs(model)
            rope = gguf_rope(rope_params, inv_freq, attention, base, int(info.trained_length))
            notes.append(f"llama.cpp: {served[1]}")
            context = int(info.trained_length)
            weights = model
        else:
            why = served[1] if served else f"llama.cpp does not run {info.method} (it changes attention itself)"
            raise NotStandard(f"no GGUF form for '{info.method}': {why}")
        out.parent.mkdir(parents=True, exist_ok=True)
        with api.unpatched(model):  # the weights are the base model's; the extension is in the rope metadata
            keys = write_gguf(partial, model=weights, tokenizer=tokenizer, rope=rope, context=context,
                              gguf_type=gguf_type, source_gguf=source_gguf, name=Path(name).name)
        result = ExportResult(path=out, source=name, method=info.method, form="gguf", params=dict(info.params),
                              trained_length=info.trained_length, target_length=info.target_length, config=keys,
                              notes=list(dict.fromkeys(notes)))
        result.config["gguf_type"] = gguf_type or ("as the source" if source_gguf else "f16")
        if verify:
            result.verify = _verify_gguf(model, partial, result, form == "config")
        os.replace(partial, out)
        out.with_name(out.name + ".md").write_text(model_card(result))
    except NotStandard as e:
        partial.unlink(missing_ok=True)
        raise ValueError(str(e)) from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        if patched_here and not own:
            api.unpatch(model)
    result.seconds = round(time.time() - start, 3)
    return result


def _verify_gguf(model: Any, path: Path, result: ExportResult, extended: bool) -> dict[str, Any]:
    """llama.cpp's logits of the written file against the patched model's on random tokens past the trained length
    (f32 weights: within 1 % of the largest logit and the same top-1 token at ≥ 99 % of positions — llama.cpp sums
    in another order and computes its angles in fp32; f16 / q8_0 / quantised sources: the same top-1 token at ≥ 90 %
    of positions)."""
    from .gguf import llama_cpp_logits

    trained, target = result.trained_length or 0, result.target_length or 0
    n = min(target, trained + 64) if extended and target else min(trained, 128)
    hf = unwrap(model)
    vocab = hf.config.vocab_size
    ids = torch.randint(min(5, vocab - 1), vocab, (1, n), generator=torch.Generator().manual_seed(0))
    expected = _outputs(model, ids)[0].numpy()
    got = llama_cpp_logits(path, ids[0].tolist(), n_ctx=max(n, target if extended else trained))
    diff = float(abs(expected - got).max())
    scale = float(abs(expected).max())
    top1 = float((expected.argmax(-1) == got.argmax(-1)).mean())
    exact = result.config["gguf_type"] == "f32"
    if (exact and (diff > 1e-2 * max(1.0, scale) or top1 < 0.99)) or (not exact and top1 < 0.9):
        raise ExportError(f"llama.cpp's logits of the GGUF differ from the patched model's (max |Δ| {diff:.3g}, "
                          f"top-1 agreement {top1:.1%} at {n} tokens): the export is not written")
    return {"tokens": n, "max_abs_diff": diff, "max_abs_output": scale, "top1_agreement": top1,
            "engine": "llama.cpp (llama-cpp-python)"}


def _outputs(model: Any, ids: torch.Tensor) -> torch.Tensor:
    hf = unwrap(model)
    with torch.no_grad():
        out = hf(input_ids=ids.to(next(hf.parameters()).device))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float().cpu()


def _verify(loaded: Any, job: Job, result: ExportResult) -> dict[str, Any]:
    """Compare the reloaded export with the patched model in memory on random tokens past the trained length."""
    reference, _ = job.reference()
    hf = unwrap(reference)
    trained, target = result.trained_length or 0, result.target_length or 0
    n = min(target, trained + 64) if target else 128
    vocab = hf.config.vocab_size
    ids = torch.randint(min(5, vocab - 1), vocab, (1, n), generator=torch.Generator().manual_seed(0))
    expected, got = _outputs(reference, ids), _outputs(loaded, ids)
    diff = float((expected - got).abs().max())
    scale = float(expected.abs().max())
    if diff > 1e-4 * max(1.0, scale):
        raise ExportError(f"the exported model's outputs differ from the patched model's by {diff:.3g} (at {n} "
                          "tokens): the export is not written")
    return {"tokens": n, "max_abs_diff": diff, "max_abs_output": scale}


class _CallableModule(types.ModuleType):
    """``longctx.export`` is this package; calling it calls :func:`export` (the public one-liner)."""

    def __call__(self, *args: Any, **kwargs: Any) -> ExportResult:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
