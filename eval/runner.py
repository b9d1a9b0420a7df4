"""The one sweep every evaluation runs: methods × lengths on one model, each method patched (and always unpatched)
through ``longctx.patched``, rows tagged with the method and its resolved parameters, optionally resumed from and
appended to a results log.

``perplexity.ppl_table`` (each method patched to each evaluated length), ``retrieval.retrieval_grid`` (each method
patched once to the longest length), the generation evals (passkey / needle by generation, resumable) and the CLI all
run on :func:`sweep`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BASELINES", "Cell", "ResultsLog", "InvalidSweep", "sweep", "params_key"]

BASELINES = ("vanilla", "truncate")  # the model as it is (a decoder as is; an embedding model cut at its limit)


class InvalidSweep(ValueError):
    """A cell of a sweep cannot be patched (a parameter the model does not allow): raised by :func:`sweep` before any
    cell runs, with the method's own message."""


def params_key(params: dict[str, Any]) -> str:
    """Resolved parameters as one comparable string (rows of different parameters are never pooled silently)."""
    return json.dumps(params, sort_keys=True, default=str)


@dataclass(frozen=True)
class Cell:
    """One (method, length) of a sweep: the patch in force (None for a baseline) and the rows a log already holds
    for it (``previous``: a resumed run skips what they cover)."""

    method: str
    length: int | None
    info: Any = None  # longctx.PatchInfo
    previous: tuple[dict, ...] = ()

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.info.params) if self.info is not None else {}


@dataclass
class ResultsLog:
    """Rows appended one JSON line at a time as they finish (a stopped run keeps every finished row); a torn last
    line is dropped with a warning when read back."""

    path: Path
    rows: list[dict] = field(default_factory=list)
    unreadable: int = 0  # lines of the file that were not JSON (a run stopped while writing its last line)

    @classmethod
    def open(cls, path: Path, resume: bool) -> ResultsLog:
        """Read the rows of an earlier run (``resume``), or start the file afresh."""
        path = Path(path)
        log = cls(path)
        if resume and path.exists():
            text = path.read_text()
            for line in text.splitlines():
                try:
                    log.rows.append(json.loads(line))
                except json.JSONDecodeError:
                    log.unreadable += 1
            if log.unreadable or (text and not text.endswith("\n")):
                # the torn line goes: rows appended now start on a line of their own (written atomically)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in log.rows))
                os.replace(tmp, path)
        elif not resume:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")
        return log

    def previous(self, method: str, params: dict, length: int | None, **match: Any) -> tuple[dict, ...]:
        key = params_key(params)
        return tuple(r for r in self.rows if r.get("method") == method and r.get("params") == key
                     and r.get("length") == length and all(r.get(k) == v for k, v in match.items()))

    def append(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")


def sweep(
    model: Any,
    methods: Sequence[str],
    lengths: Sequence[int | None],
    run: Callable[[Cell], Iterable[dict]],
    *,
    target: str | int = "each",
    method_params: dict[str, dict[str, Any]] | None = None,
    skip_within: int | None = None,
    within: str = "skip",
    trained_length: int | None = None,
    tokenizer: Any = None,
    baseline: Callable[[str], contextlib.AbstractContextManager] | None = None,
    log: ResultsLog | None = None,
    match: dict[str, Any] | None = None,
) -> list[dict]:
    """Run ``run(cell)`` for every method × length and return its rows, each tagged with ``method``, ``length`` and
    ``params`` (the resolved parameters as a string, :func:`params_key`).

    ``target``: ``"each"`` patches every method to each evaluated length in turn (not at lengths up to
    ``skip_within``, the trained length, where a method has nothing to extend: such cells are skipped, or with
    ``within="unpatched"`` run on the model as it is, inside ``baseline(method)``, with ``cell.info`` None), an integer
    patches every method once to that length.
    Baselines (``vanilla``, ``truncate``) run the model as it is, inside ``baseline(method)`` when given (e.g. an
    embedding model's length cap). ``method_params``: extra parameters per method; ``trained_length`` overrides the
    config's. ``log``: rows of an earlier run for a cell (same method, parameters, length and ``match``) are handed to
    ``run`` as ``cell.previous`` and returned with the new ones; new rows are appended as they come.

    Every patch of the sweep is tried on the model (and undone) before the first cell runs: a parameter the model does
    not allow raises :class:`InvalidSweep` before any work.
    """
    import longctx

    if within not in ("skip", "unpatched"):
        raise ValueError(f"within must be 'skip' or 'unpatched', got {within!r}")
    method_params = method_params or {}
    plan = []  # (method, length it is patched to, the lengths evaluated there, its parameters; None: a baseline)
    for method in methods:
        groups = [(n, [n]) for n in lengths] if target == "each" else [(target, list(lengths))]
        for patch_to, group in groups:
            if method in BASELINES:
                plan.append((method, group, None))
                continue
            if target == "each" and skip_within is not None and patch_to is not None and patch_to <= skip_within:
                if within == "unpatched":
                    plan.append((method, group, None))
                continue
            params = {"target_length": patch_to, **method_params.get(method, {})}
            if trained_length is not None:
                params.setdefault("trained_length", trained_length)
            plan.append((method, group, params))
    for method, _, params in plan:  # every patch checked on the model before any cell runs (patched, unpatched)
        if params is not None:
            try:
                with longctx.patched(model, method, tokenizer=tokenizer, **params):
                    pass
            except ValueError as e:
                raise InvalidSweep(str(e)) from e
    rows: list[dict] = []
    for method, group, params in plan:
        if params is None:
            scope = baseline(method) if baseline is not None else contextlib.nullcontext()
        else:
            scope = longctx.patched(model, method, tokenizer=tokenizer, **params)
        with scope as info:
            info = info if params is not None else None
            for n in group:
                resolved = info.params if info is not None else {}
                previous = log.previous(method, resolved, n, **(match or {})) if log is not None else ()
                rows.extend(previous)
                for row in run(Cell(method, n, info, previous)):
                    tagged = {"method": method, "length": n, **row, "params": params_key(resolved)}
                    if match:
                        tagged.update(match)
                    rows.append(tagged)
                    if log is not None:
                        log.append(tagged)
    return rows

