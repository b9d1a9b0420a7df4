"""What every command shares: the typer apps, the one-line errors, and the validators that check a whole command
before any work starts (nothing here imports torch or transformers at import time: ``--help`` answers at once)."""

from __future__ import annotations

import csv
import json
import os
import platform
import time
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import typer

__all__ = ["app", "eval_app", "console", "fail", "methods_list", "method_params", "int_list", "float_list",
           "positive", "model_spec", "text_source", "check_out", "read_text", "write_results", "plots_enabled",
           "load_model", "trained_below", "DEFAULT_TEXT", "BASELINE_DECODER", "BASELINE_ENCODER"]

app = typer.Typer(
    help="longctx: give existing Hugging Face checkpoints a longer context window, without training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
eval_app = typer.Typer(help="Evaluate a model, patched or not, at long context.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

DEFAULT_TEXT = "emma"  # the bundled public-domain text (longctx/data/emma_austen_1816.txt)
BASELINE_DECODER = "vanilla"  # a decoder as it is
BASELINE_ENCODER = "truncate"  # an embedding model as it is: inputs cut at its position table


class _Console:
    """rich's console, created on first use."""

    def __getattr__(self, name: str) -> Any:
        from rich.console import Console

        real = Console()
        globals()["console"] = real
        return getattr(real, name)


console: Any = _Console()


def fail(message: str) -> NoReturn:
    """One line on stderr saying what is wrong and what is allowed; exit code 2."""
    typer.echo(f"longctx: error: {message}", err=True)
    raise typer.Exit(2)


def methods_list(value: str | None, option: str, baselines: tuple[str, ...]) -> list[str]:
    """Comma-separated method names: each a registered method (or alias) or one of ``baselines``."""
    from longctx.patches import get_method, registry

    names = [v.strip() for v in (value or "").split(",") if v.strip()]
    if value is not None and not names:
        fail(f"{option} needs at least one method name")
    out = []
    for name in names:
        if name in baselines:
            out.append(name)
            continue
        try:
            out.append(get_method(name).name)  # aliases to their method's name
        except ValueError:
            fail(f"{option}: unknown method '{name}'; available: {', '.join([*baselines, *registry])}")
    return out


def method_params(items: list[str] | None, methods: list[str] | None, *, default_method: str | None = None,
                  fixed: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """``METHOD.NAME=VALUE`` items (``NAME=VALUE`` for ``default_method``) → ``{method: {name: value}}``, values
    parsed as JSON where they can be; each method's parameters are checked against its config (names and values)
    together with ``fixed`` ones (e.g. the target length), and a method not evaluated is an error."""
    from longctx.patches import get_method

    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        method, dot, name = key.partition(".")
        if not dot and default_method:
            method, name = default_method, key
        if not sep or not method or not name:
            fail(f"--param takes METHOD.NAME=VALUE (e.g. selfextend.group_size=16), got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(method, {})[name] = value
    checked: dict[str, dict[str, Any]] = {}
    for method, params in out.items():
        try:
            spec = get_method(method)
        except ValueError as e:
            fail(f"--param: {e}")
        if methods is not None and spec.name not in methods:
            fail(f"--param sets '{method}' parameters but '{method}' is not evaluated (methods: {', '.join(methods)})")
        try:
            spec.make_config(**{**params, **(fixed or {})})
        except (TypeError, ValueError) as e:
            fail(f"--param: {e}")
        checked.setdefault(spec.name, {}).update(params)
    return checked


def int_list(value: str, option: str, minimum: int = 1) -> list[int]:
    """Comma-separated integers, each >= ``minimum`` (no empty item: ``512,,1024`` is a typo, not two lengths)."""
    parts = [v.strip() for v in value.split(",")]
    if not all(parts):
        fail(f"{option} takes comma-separated integers >= {minimum} (no empty item), got {value!r}")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        fail(f"{option} takes comma-separated integers >= {minimum}, got {value!r}")
    if not numbers or min(numbers) < minimum:
        fail(f"{option} takes comma-separated integers >= {minimum}, got {value!r}")
    return numbers


def float_list(value: str, option: str, low: float, high: float) -> list[float]:
    """Comma-separated numbers in [low, high]."""
    import math

    parts = [v.strip() for v in value.split(",")]
    if not all(parts):
        fail(f"{option} takes comma-separated numbers in [{low:g}, {high:g}] (no empty item), got {value!r}")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        fail(f"{option} takes comma-separated numbers in [{low:g}, {high:g}], got {value!r}")
    if not numbers or any(not math.isfinite(x) or not low <= x <= high for x in numbers):
        fail(f"{option} takes comma-separated numbers in [{low:g}, {high:g}], got {value!r}")
    return numbers


def positive(option: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        fail(f"{option} must be an integer >= {minimum}, got {value}")


def model_spec(spec: str) -> None:
    """The model exists where the spec says (no weights loaded)."""
    from longctx.loading import resolve_model_path

    try:
        resolve_model_path(spec)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))


def text_source(text: str, option: str = "--text") -> None:
    if text == DEFAULT_TEXT:
        return
    path = Path(text)
    if not path.exists():
        fail(f"{option}: no such text file or folder: {path} (or '{DEFAULT_TEXT}', the bundled text)")
    files = _text_files(path) if path.is_dir() else [path]
    if not files:
        fail(f"{option}: no text files (.txt, .tex, .raw) under {path}")
    for file in files:
        why = _not_text(file)
        if why:
            fail(f"{option}: {file} {why}; give UTF-8 text")
    if not any(_has_words(file) for file in files):
        fail(f"{option}: {path} holds no words (empty or blank); give a text to read")


def _not_text(path: Path) -> str | None:
    """Why ``path`` is not a text file (a NUL byte or bytes that are not UTF-8 in its first 64 KiB), or None."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if b"\0" in head:
        return "is a binary file (it holds NUL bytes)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the 64 KiB boundary
            return f"is not UTF-8 text (byte {e.start})"
    return None


def _has_words(path: Path) -> bool:
    with open(path, "rb") as f:
        return any(chunk.strip() for chunk in iter(lambda: f.read(1 << 16), b""))


def _text_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".tex", ".raw", ""))


def read_text(text: str) -> str:
    if text == DEFAULT_TEXT:
        return resources.files("longctx.data").joinpath("emma_austen_1816.txt").read_text()
    path = Path(text)
    if path.is_dir():
        return "\n\n".join(p.read_text(errors="replace") for p in _text_files(path))
    return path.read_text(errors="replace")


def check_out(out: Path | None) -> None:
    """Fail before any long work when the output directory cannot be written. Folders it had to create to find out
    are removed again: a command refused later leaves no empty output directory (the writers create it)."""
    if out is None:
        return
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".longctx-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        fail(f"cannot write results to {out}: {e.strerror or e}")
    finally:
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break


def load_model(model: str) -> Any:
    from longctx.loading import load_model as load

    try:
        with console.status(f"loading {model} ..."):
            return load(model)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))


def trained_below(loaded: Any, model: str, target_length: int) -> int:
    """The loaded model's trained length, after failing (one line) where ``--target-length`` does not exceed it."""
    import longctx

    trained = longctx.inspect(loaded.model).trained_length
    if target_length <= trained:
        fail(f"--target-length ({target_length}) must be longer than {model}'s trained length ({trained})")
    return trained


def plots_enabled(plots: bool, out: Path | None) -> bool:
    if not plots or out is None:
        return False
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        console.print("[yellow]matplotlib is not installed: no plots (pip install 'longctx[plot]')[/]")
        return False
    return True


def write_results(out: Path, rows: list[dict], meta: dict) -> None:
    """results.json (written atomically) and a tidy results.csv."""
    import torch
    import transformers

    import longctx

    out.mkdir(parents=True, exist_ok=True)
    payload = {
        **meta,
        "rows": rows,
        "versions": {"longctx": longctx.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, out / "results.json")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    console.print(f"wrote {out / 'results.json'} and {out / 'results.csv'}")

