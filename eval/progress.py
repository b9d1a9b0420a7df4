"""Progress of long evaluation loops: a rich bar with rate and time left on a terminal; plain lines at a steady rate
otherwise (a log file or CI gets a line every ``LONGCTX_PROGRESS_SECONDS`` seconds, 10 by default, and one when the
loop ends — never blank lines, never minutes of silence)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

__all__ = ["progress", "clock"]


def clock(seconds: float) -> str:
    """``seconds`` as m:ss (h:mm:ss past an hour)."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress(items: Iterable[T], desc: str, *, enabled: bool = True, total: int | None = None,
             unit: str = "it", terminal: bool | None = None) -> Iterator[T]:
    """Iterate ``items`` showing progress labelled ``desc`` (``unit``: what one item is, for the rate)."""
    if not enabled:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if terminal is None:
        terminal = sys.stdout.isatty()
    if not terminal:
        yield from _lines(items, desc, total, unit)
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(desc, total=total)
        for item in items:
            yield item
            bar.advance(task)


def _lines(items: Iterable[T], desc: str, total: int | None, unit: str) -> Iterator[T]:
    every = float(os.environ.get("LONGCTX_PROGRESS_SECONDS", "10"))
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every and (total is None or done < total):
            last = now
            rate = done / (now - start)
            left = f", {clock((total - done) / rate)} left" if total and rate > 0 else ""
            of = f"/{total}" if total else ""
            print(f"{desc}: {done}{of} {unit} ({rate:.2f} {unit}/s, {clock(now - start)} elapsed{left})",
                  file=sys.stderr, flush=True)
    if done and time.monotonic() - start >= every:
        print(f"{desc}: {done} {unit} in {clock(time.monotonic() - start)}", file=sys.stderr, flush=True)
