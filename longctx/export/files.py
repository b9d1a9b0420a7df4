"""Atomic writes of an export: a hidden partial sibling renamed into place last; an ``--overwrite`` that never loses
the previous export; leftovers of killed or failed exports cleaned (or restored) by the next export to the same
place."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = ["PARTIAL", "OLD", "SKIP_DIRS", "ExportError", "check_out", "recover", "partial_dir", "move_into_place", "copy_tree",
           "copy_file", "write_json"]

PARTIAL = ".longctx-partial-"
OLD = ".longctx-old-"
SKIP_DIRS = {".git", "__pycache__", ".cache"}
logger = logging.getLogger("longctx")


class ExportError(RuntimeError):
    """The export could not be written as asked (nothing new was left at OUT)."""


def check_out(out: Path, src: Path | None, overwrite: bool) -> None:
    """``out`` may be written: not a file, absent unless ``overwrite``, neither inside nor around the source."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if src is not None:
        src = src.resolve()
        target = out.resolve()
        if target == src or src in target.parents or target in src.parents:
            raise ValueError(f"the output {out} must be outside the source {src} (and not contain it)")


def _alive(pid: int) -> bool:
    if pid == os.getpid():  # an earlier export of this process: finished (exports in a process run one at a time)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(out: Path, marker: str) -> list[Path]:
    found = []
    for path in out.parent.glob(f".{out.name}{marker}*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            found.append(path)
    return sorted(found)


def recover(out: Path) -> None:
    """Deal with leftovers of earlier exports to ``out`` whose process is gone (run before anything else): partial
    siblings are removed; a previous export set aside by an overwrite that did not finish is renamed back to ``out``
    if ``out`` is missing (it was the last good export), else removed."""
    if not out.parent.exists():
        return
    for stale in _stale(out, PARTIAL):  # a directory, or a GGUF file
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    for old in _stale(out, OLD):
        if not out.exists():
            os.rename(old, out)
            logger.warning(f"longctx: restored {out} from {old.name}, left by an overwrite that did not finish")
        else:
            shutil.rmtree(old, ignore_errors=True)


def partial_dir(out: Path) -> Path:
    """A fresh hidden sibling of ``out`` to write into (leftovers dealt with first, see :func:`recover`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    partial = out.parent / f".{out.name}{PARTIAL}{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    return partial


def move_into_place(partial: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished ``partial`` to ``out``. An existing ``out`` (``overwrite``) is set aside first and removed
    only once the new one is in place; if that fails, the previous export is renamed back — and if even that fails,
    the error names where it is kept (the next export to ``out`` restores it)."""
    if not out.exists():
        os.rename(partial, out)
        return
    if not overwrite:  # appeared while exporting
        raise FileExistsError(f"{out} appeared while exporting; pass overwrite=True to replace it")
    old = out.parent / f".{out.name}{OLD}{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(out, old)
    try:
        os.rename(partial, out)
    except BaseException as error:
        try:
            os.rename(old, out)
        except BaseException:
            raise ExportError(f"could not move the new export to {out} ({error}); the previous export is kept at "
                              f"{old} (the next export to {out} restores it)") from error
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def copy_file(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)  # follows symlinks (Hub cache snapshots); sendfile on Linux


def copy_tree(src: Path, dst: Path, skip: dict[Path, Any], progress: bool) -> None:
    """Copy every file of ``src`` into ``dst`` except those in ``skip`` (rewritten by the caller); the source's
    README.md becomes README.base.md (the export's card takes its name)."""
    from tqdm.auto import tqdm

    files = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if SKIP_DIRS & set(rel.parts) or not path.is_file() or rel in skip:
            continue
        files.append((path, rel if rel != Path("README.md") else Path("README.base.md")))
    total = sum(p.stat().st_size for p, _ in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="copying", disable=not progress) as bar:
        for path, rel in files:
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            copy_file(path, dst / rel)
            bar.update(path.stat().st_size)
