"""``longctx search MODEL --method longrope --target-length N --text FILE --budget SECONDS [--export OUT]``:
LongRoPE's factor search (see ``longctx.eval.search``), its candidates' table and the winner, exported as a standard
checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (trained_below, DEFAULT_TEXT, app, check_out, console, fail, load_model, model_spec, positive, read_text,
                     text_source)
from .evaluate import _model_name


@app.command("search")
def search_cmd(
    model: Annotated[str, typer.Argument(help="Decoder: a model directory, .gguf file or 'smollm2'.")],
    target_length: Annotated[int, typer.Option(help="The context length to search the factors for, in tokens.")],
    method: Annotated[str, typer.Option(help="What to search: 'longrope' (per-dimension frequency factors), or an "
                                             "attention method's parameters: selfextend, dca, rerope, string.")] = \
        "longrope",
    text: Annotated[str, typer.Option(help="The search text (file or folder; 'emma' = the bundled text); hold out "
                                           "the text you evaluate on.")] = DEFAULT_TEXT,
    budget: Annotated[int, typer.Option(help="Seconds the search may take (the PI / NTK / YaRN seeds always run; "
                                               "the trial running when it ends finishes).")] = 600,
    windows: Annotated[int, typer.Option(help="Windows of N tokens each candidate's perplexity is measured on.")] = 2,
    max_trials: Annotated[Optional[int], typer.Option(help="At most this many candidates (seeds included).")] = None,
    seed: Annotated[int, typer.Option(help="The sampler's seed (same seed, text and model: same candidates).")] = 0,
    export: Annotated[Optional[Path], typer.Option(help="Write the winner here as a standard checkpoint "
                                                        "(plain transformers loads it extended), or as a GGUF for "
                                                        "llama.cpp when it ends in .gguf.")] = None,
    config_for: Annotated[str, typer.Option(help="With --export: the reading to write where engines differ "
                                                 "('transformers', 'vllm', 'sglang'; see 'longctx export "
                                                 "--help').")] = "transformers",
    out: Annotated[Optional[Path], typer.Option(help="Write search.json (every candidate) here.")] = None,
):
    """Search a method's parameters for MODEL at the target length on perplexity, bounded by --budget: LongRoPE's
    per-dimension frequency factors (its evolutionary search, seeded with PI, NTK and YaRN), or an attention method's
    windows and sizes (seeded with its defaults). Print every candidate, the winner's patch line, and with --export
    write it as a checkpoint."""
    from longctx.eval.search import searchable

    model_spec(model)
    methods = searchable()
    if method not in methods:
        fail(f"--method: longctx search searches {', '.join(methods)}; got '{method}'")
    positive("--target-length", target_length, 2)
    positive("--budget", budget, 1)
    positive("--windows", windows, 1)
    positive("--max-trials", max_trials, 1)
    text_source(text)
    from longctx.export.forms import CONFIG_FOR

    if config_for not in CONFIG_FOR:
        fail(f"--config-for must be one of {', '.join(CONFIG_FOR)}, got '{config_for}'")
    if config_for != "transformers" and (export is None or export.suffix == ".gguf"):
        fail("--config-for applies with --export to a directory (a Hugging Face export)")
    if export is not None and export.exists():
        fail(f"--export: {export} exists; give a new directory (an export never overwrites one here)")
    check_out(out)

    import longctx
    from longctx.eval.search import search

    loaded = load_model(model)
    if loaded.kind != "decoder":
        fail(f"{model} is an embedding model; longctx search measures a decoder's perplexity")
    trained = trained_below(loaded, model, target_length)
    console.print(f"[bold]{model}[/]: trained {trained}; searching {method} at {target_length} tokens "
                  f"(budget {budget} s, {windows} window(s), seed {seed})")
    try:
        found = search(loaded.model, method, target_length=target_length, tokenizer=loaded.tokenizer,
                       text=read_text(text), budget_s=budget, max_trials=max_trials, windows=windows, seed=seed,
                       log=lambda line: typer.echo(f"  {line}"))
    except ValueError as e:
        fail(str(e))
    _table(found, model)
    typer.echo(f"stopped: {found.stopped}; {len(found.rows)} candidates in {found.seconds:.0f} s")
    typer.echo(f"apply:  longctx.patch(model, \"{method}\", **{json.dumps(found.params)})")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "search.json").write_text(json.dumps({**found.to_dict(), "model": model}, indent=2))
        typer.echo(f"wrote {out / 'search.json'}")
    if export is not None:
        result = longctx.export(model, export, method, progress=False,
                                **({"config_for": config_for} if export.suffix != ".gguf" else {}), **found.params)
        typer.echo(f"export: {export} ({result.form} form)")


def _table(found, model: str) -> None:
    from rich.table import Table

    seeds = [r for r in found.rows if r["source"] != "search"]
    searched = sorted((r for r in found.rows if r["source"] == "search" and r["ppl"] is not None),
                      key=lambda r: r["ppl"])[:10]
    refused = sum(r["ppl"] is None for r in found.rows)
    table = Table(title=f"longctx search — {_model_name(model)}, {found.method} at {found.target_length} tokens "
                        f"(trained {found.trained_length})",
                  caption=f"{found.measured}; searched: {found.space}"
                          + (f"; {refused} candidate(s) refused by the method (cannot reach the length)" if refused
                             else ""))
    for col in ("candidate", "ppl", "parameters", "seconds"):
        table.add_column(col, justify="left" if col in ("candidate", "parameters") else "right")
    for row in [*seeds, *searched]:
        name = f"{row['source']} #{row['trial']}" + (" (best)" if row is found.best else "")
        figure = f"{row['ppl']:.3f}" if row["ppl"] is not None else "refused"
        table.add_row(name, figure, _params(row), f"{row['seconds']:.1f}")
    console.print(table)


def _params(row: dict) -> str:
    shown = {**row["params"], **row.get("resolved", {})}
    parts = []
    for key, value in shown.items():
        if key in ("target_length", "factor"):
            continue
        if isinstance(value, list):
            value = "[" + ", ".join(f"{x:.3g}" for x in value) + "]"
        elif isinstance(value, float):
            value = f"{value:.3f}"
        parts.append(f"{key}={value}")
    return ", ".join(parts)
