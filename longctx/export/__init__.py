"""``longctx.export``: write an extended checkpoint that loads everywhere it can (floor 5).

One straight path: resolve the source (``sources.resolve``: a directory, a ``.gguf``, a model in memory; nothing
loaded) → open it (``sources.open_source``: load it, or a weightless skeleton where the weights are only copied, and
patch it with the public ``longctx.patch``) → write through the output format's writer (``directory.py`` for a
Hugging Face directory, ``gguf.py`` for an ``OUT.gguf`` llama.cpp runs) into a hidden partial sibling → verify →
card → move into place.

Three directory forms, each method declaring its own (``export_form`` in its registration; the table per method is in
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

import os
import shutil
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import api
from ..models import unwrap
from .card import model_card, write_card
from .directory import write_directory
from .files import PARTIAL, ExportError, check_out, move_into_place, partial_dir, recover
from .forms import CONFIG_FOR, NotStandard, standard_config
from .gguf import GGUF_TYPES, verify_gguf, write_gguf_export
from .sources import Opened, open_source, resolve, tokenizer_of

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
    start = time.time()
    if config_for not in CONFIG_FOR:
        raise ValueError(f"config_for must be one of {list(CONFIG_FOR)}, got {config_for!r}")
    out = Path(out).expanduser().absolute()
    to_gguf = out.suffix == ".gguf"
    if to_gguf:
        if gguf_type is not None and gguf_type not in GGUF_TYPES:
            raise ValueError(f"gguf_type must be one of {list(GGUF_TYPES)}, got {gguf_type!r}")
        if checks:
            raise ValueError("evaluations (passkey …) run on a Hugging Face export; a .gguf export checks with "
                             "verify=True (--verify: llama.cpp's logits against the patched model)")
    elif gguf_type is not None:
        raise ValueError("gguf_type applies to a .gguf output only (OUT ending in .gguf)")
    # 1. resolve the source (nothing loaded), 2. check the output, 3. open: load (or a skeleton) and patch
    source = resolve(model_or_path, tokenizer)
    recover(out)  # a previous export left aside by an overwrite that did not finish comes back first
    if to_gguf and out.is_dir():
        raise FileExistsError(f"{out} is a directory")
    if to_gguf and out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if not to_gguf:
        check_out(out, source.folder if source.gguf is None else None, overwrite)
    opened = open_source(source, method, params, weights=to_gguf)
    partial = None
    try:
        # 4. write through the format's writer, into a hidden partial sibling
        if to_gguf:
            partial = out.parent / f".{out.name}{PARTIAL}{os.getpid()}"
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                form, set_keys, notes = write_gguf_export(partial, opened, gguf_type)
            except NotStandard as e:
                raise ValueError(str(e)) from None
        else:
            partial = partial_dir(out)
            form, set_keys, notes = write_directory(partial, opened, config_for, progress)
        info = opened.info
        result = ExportResult(path=Path(), source=source.label, method=opened.record["method"], form=form,
                              params=opened.record["params"], trained_length=info.trained_length,
                              target_length=info.target_length, config=set_keys,
                              notes=list(dict.fromkeys(notes)),  # the patch and the form may say the same thing
                              config_for=config_for)
        # 5. verify, 6. checks, 7. card, then into place
        if to_gguf:
            if verify:
                context = next(v for k, v in set_keys.items() if k.endswith(".context_length"))
                result.verify = verify_gguf(opened.model, partial, info.trained_length or 0, context,
                                            extended=context > (info.trained_length or 0),
                                            exact=set_keys["gguf_type"] == "f32", tokenizer=opened.tokenizer)
            os.replace(partial, out)
            out.with_name(out.name + ".md").write_text(model_card(result))
        else:
            loaded = api.load(partial) if verify or checks else None
            if verify:
                result.verify = _verify(loaded, opened, result)
            for check in checks:
                tok = opened.reference()[1] or tokenizer_of(partial)
                data, lines = check.run(loaded, tok, result, progress)
                result.checks[check.name] = {"title": check.title, "lines": lines, "data": data}
            write_card(partial, result)
            move_into_place(partial, out, overwrite)
    except BaseException:
        if partial is not None and partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        elif partial is not None:
            partial.unlink(missing_ok=True)
        raise
    finally:
        opened.close()
    result.path, result.seconds = out, round(time.time() - start, 3)
    return result


def _outputs(model: Any, ids: torch.Tensor) -> torch.Tensor:
    hf = unwrap(model)
    with torch.no_grad():
        out = hf(input_ids=ids.to(next(hf.parameters()).device))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float().cpu()


def _verify(loaded: Any, opened: Opened, result: ExportResult) -> dict[str, Any]:
    """Compare the reloaded export with the patched model in memory on random tokens past the trained length."""
    reference, _ = opened.reference()
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
