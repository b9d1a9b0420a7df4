"""``longctx recommend MODEL --target-length N``: which method, with which parameters (see
``longctx.eval.recommend``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .evaluate import _model_name
from .common import (trained_below, DEFAULT_TEXT, app, check_out, console, fail, load_model, methods_list, model_spec, positive,
                     read_text, text_source)


@app.command("recommend")
def recommend_cmd(
    model: Annotated[str, typer.Argument(help="Model directory, .gguf file, 'smollm2' or 'minilm'.")],
    target_length: Annotated[int, typer.Option(help="The context length you need, in tokens.")],
    text: Annotated[str, typer.Option(help="Decoder: text for the perplexity (file or folder; 'emma' = the "
                                           "bundled public-domain text).")] = DEFAULT_TEXT,
    budget: Annotated[int, typer.Option(help="Seconds the sweep may take; candidates past it are listed as not "
                                               "measured (the reference and the first candidate always run).")] = 600,
    compare: Annotated[Optional[str], typer.Option(help="Only these methods (comma-separated; default: every "
                                                        "method that applies, each variant it declares).")] = None,
    docs: Annotated[int, typer.Option(help="Encoder: documents per synthetic retrieval task.")] = 8,
    tune: Annotated[int, typer.Option(help="Decoder: tune the N best-ranked methods that have a search space "
                                           "(SelfExtend, DCA, ReRoPE, STRING, LongRoPE) with the budget left after "
                                           "the ranking; 0: rank only.")] = 2,
    ruler: Annotated[Optional[bool], typer.Option(
        "--ruler/--no-ruler", help="Decoder: rank by a RULER subset too (5 tasks at N, one sample each) — by default "
                                   "when the budget allows it for every candidate, decided on the reference.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write recommendation.json here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the recommendation as JSON.")] = False,
):
    """Measure every method that applies to MODEL at the target length — perplexity, passkey and (when the budget
    allows) a RULER subset for a decoder, LongEmbed passkey and needle retrieval for an embedding model — and print the ranked table with its evidence,
    the line that applies the winner and its export command."""
    model_spec(model)
    positive("--target-length", target_length, 2)
    positive("--budget", budget, 1)
    positive("--docs", docs, 2)
    positive("--tune", tune, 0)
    text_source(text)
    methods = methods_list(compare, "--compare", ()) if compare else None
    check_out(out)

    from longctx.eval.recommend import recommend

    loaded = load_model(model)
    trained = trained_below(loaded, model, target_length)
    console.print(f"[bold]{model}[/]: {loaded.kind}, trained {trained}; measuring candidates at {target_length} "
                  f"tokens (budget {budget:.0f} s)")
    try:
        found = recommend(loaded.model, target_length, tokenizer=loaded.tokenizer,
                          text=read_text(text) if loaded.kind == "decoder" else None, budget_s=budget, docs=docs,
                          methods=methods, log=lambda line: typer.echo(f"  {line}"), tune=tune, ruler=ruler)
    except ValueError as e:
        fail(str(e))
    data = {**found.to_dict(), "model": model, "patch": found.patch_line() if found.improves else None,
            "export": found.export_line(model) if found.improves else None}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recommendation.json").write_text(json.dumps(data, indent=2, default=str))
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    _table(found, model)
    if not found.improves:
        typer.echo(f"no candidate measured better than {model} as it is at {found.target_length} tokens: keep it "
                   "as it is, or give a larger --budget (candidates left out are listed above)")
        return
    typer.echo(f"apply:  {found.patch_line()}")
    typer.echo(f"export: {found.export_line(model)}")


def _table(found, model: str) -> None:
    from rich.table import Table

    metrics = [k for k in found.rows[0] if isinstance(found.rows[0][k], float) and k != "seconds"]
    name = _model_name(model)
    table = Table(title=f"longctx recommend — {name} at {found.target_length} tokens (trained {found.trained_length})",
                  caption="; ".join(f"{k}: {v}" for k, v in found.measured.items()))
    for col in ("rank", "method", "parameters", *metrics, "seconds"):
        table.add_column(col, justify="left" if col in ("method", "parameters") else "right")
    for row in found.rows:
        params = ", ".join(f"{k}={v}" for k, v in row["params"].items() if k != "target_length")
        values = [f"{100 * row[k]:.0f} %" if k in ("passkey", "retrieval", "ruler") or k.startswith(("passkey", "needle"))
                  else f"{row[k]:.2f}" for k in metrics]
        name = row["method"] + (" (tuned)" if row.get("tuned") else "")
        table.add_row(str(row["rank"] or "ref"), name, params, *values, f"{row['seconds']:.0f}")
    console.print(table)
    for t in found.tuning:
        typer.echo(f"  tuned {t['method']}: {t['candidates']} candidates in {t['seconds']:.0f} s, tuning-window ppl "
                   f"{t['default_ppl']:.3g} with its defaults, {t['best_ppl']:.3g} tuned"
                   + ("" if t["improved"] else " (defaults kept)"))
    for skipped in found.not_measured:
        typer.echo(f"  not measured: {skipped['method']} {skipped['params']} ({skipped['why']})")
