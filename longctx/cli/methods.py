"""``longctx methods``: the registry — methods, what they do, their parameters and what each accepts."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .common import app, console


@app.command("methods")
def methods_cmd(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False):
    """List the registered methods, what they do and their parameters."""
    import longctx

    listing = longctx.methods()
    if as_json:
        typer.echo(json.dumps(listing, indent=2, default=str))
        return
    from rich.table import Table

    table = Table(title="longctx methods")
    for col in ("method", "kind", "description", "parameters (default)"):
        table.add_column(col, overflow="fold")
    for m in listing:
        params = ", ".join(f"{p['name']}={p['default']}" for p in m["parameters"])
        table.add_row(m["name"], m["kind"], m["description"], params)
    console.print(table)
