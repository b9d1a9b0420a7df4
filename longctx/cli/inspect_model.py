"""``longctx inspect MODEL``: architecture, rotary dim, rope type, trained length, the methods that apply."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any

import typer

from .common import app, console, model_spec


@app.command("inspect")
def inspect_cmd(
    model: Annotated[str, typer.Argument(help="Model directory (config.json), a .gguf file, or 'smollm2'.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
):
    """Architecture, rotary dim, rope type, trained length and which methods apply (no weights loaded where the
    config suffices)."""
    model_spec(model)
    import longctx

    info = longctx.inspect(_skeleton(model))
    data = dataclasses.asdict(info)
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    from rich.table import Table

    table = Table(title=f"longctx inspect {model}", show_header=False)
    for key, value in data.items():
        table.add_row(key, ", ".join(map(str, value)) if isinstance(value, list) else str(value))
    console.print(table)


def _skeleton(spec: str) -> Any:
    """The model built from its config alone on the meta device (a GGUF file is loaded: its config is inside)."""
    import torch
    from transformers import AutoConfig, AutoModel

    from longctx.loading import load_causal_lm, resolve_model_path

    folder, gguf = resolve_model_path(spec)
    if gguf:
        return load_causal_lm(spec)[0]
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        return AutoModel.from_config(config)
