"""Passkey and needle-in-a-haystack by generation on a decoder, over methods × lengths × depths, on the shared
sweep: each method patched once to the target length, each trial appended to the results log as it finishes, so a
stopped run resumes where it stopped (``resume``) and runs with other lengths, methods or seeds add to one table."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from .needle import needle_maker
from .passkey import iter_grid, passkey_maker
from .runner import Cell, ResultsLog, sweep

__all__ = ["generation_grid", "KINDS"]

KINDS = ("passkey", "needle")


def generation_grid(
    model: Any,
    tokenizer: Any,
    kind: str,
    methods: Sequence[str],
    lengths: Sequence[int],
    depths: Sequence[float],
    *,
    trials: int = 1,
    seed: int = 0,
    target_length: int | None = None,
    method_params: dict[str, dict] | None = None,
    haystack: str | None = None,
    log: ResultsLog | None = None,
    progress: bool = True,
) -> list[dict]:
    """Every trial of ``kind`` (``"passkey"`` / ``"needle"``) for each method (``"vanilla"``: the model as it is) ×
    length × depth, ``trials`` each; methods are patched to ``target_length`` (default: the longest length + 16,
    past the trained length). Rows: ``{"task", "method", "length", "depth", "key", "answer", "correct", …,
    "params"}``, earlier runs' rows from ``log`` included."""
    import longctx

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    trained = longctx.inspect(model).trained_length
    target = target_length or max(max(lengths) + 16, trained + 1)
    make = passkey_maker(model, tokenizer) if kind == "passkey" else needle_maker(model, tokenizer, haystack)

    def run(cell: Cell) -> Iterator[dict]:
        done = {(r["length"], r["depth"], r["seed"]) for r in cell.previous}
        for trial in iter_grid(make, [cell.length], depths, trials=trials, seed=seed, done=done,
                               desc=f"{kind} {cell.method}@{cell.length}", progress=progress):
            yield trial.to_dict()

    return sweep(model, methods, lengths, run, target=target, method_params=method_params, tokenizer=None, log=log,
                 match={"task": kind})
