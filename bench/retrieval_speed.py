"""What the retrieval eval costs beyond the model's own forward passes (goal: at most 1.15x).

In one run, on one real task in LongEmbed's layout (default: ``sotu-quotes``, built by ``bench/sotu_task.py``):

* **eval**: ``retrieval_grid(..., max_lengths=N…)`` — LongEmbed's protocol, every method patched to each N, with
  everything the eval does (cutting, caching, scoring);
* **bare encode**: for the same methods and N, the model patched the same way encodes every cut document and query
  once, nothing shared between methods or lengths, nothing scored — the floor a naive loop pays.

    python bench/retrieval_speed.py [--data DIR] [--max-length 512,1024,2048] [--compare truncate,grouped,pi]

Prints one JSON line: both times, their ratio, and how many texts / tokens the model really encoded in each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def bare_encode(loaded, task, methods: list[str], lengths: list[int]) -> dict:
    """Every method × N: patch, encode the cut documents and queries (a fresh cache each time), unpatch."""
    import longctx
    from longctx.eval.retrieval import Embedder

    trained = longctx.inspect(loaded.model).trained_length
    counter = Embedder(loaded.model, show_progress=False)
    start, texts, tokens = time.perf_counter(), 0, 0
    for method in methods:
        for n in lengths:
            cut = task.cut(n, counter.cut)
            items = list(cut.corpus.values()) + list(cut.queries.values())
            if method == "truncate" or n <= trained:
                limit = loaded.model.max_seq_length
                loaded.model.max_seq_length = trained
                scope = None
            else:
                scope = longctx.patched(loaded.model, method, target_length=n)
                scope.__enter__()
            embedder = Embedder(loaded.model, batch_size=1, show_progress=False)
            embedder.use(f"{method}@{n}", None)
            embedder.encode(items)
            texts += embedder.encoded["texts"]
            tokens += embedder.encoded["tokens"]
            if scope is None:
                loaded.model.max_seq_length = limit
            else:
                scope.__exit__(None, None, None)
    return {"seconds": time.perf_counter() - start, "texts": texts, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=None, help="task directory (default: sotu-quotes, built here)")
    ap.add_argument("--max-length", default="512,1024,2048")
    ap.add_argument("--compare", default="truncate,grouped,pi")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from longctx.eval.retrieval import Embedder, retrieval_grid
    from longctx.eval.synthetic import load_task
    from longctx.loading import load_model

    loaded = load_model("minilm")
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            import sotu_task

            data = Path(tmp) / "sotu-quotes"
            sotu_task.build(data, loaded.tokenizer)
        task = load_task(data)
    lengths = [int(n) for n in args.max_length.split(",")]
    methods = args.compare.split(",")
    bare = bare_encode(loaded, task, methods, lengths)
    embedder = Embedder(loaded.model, batch_size=1, show_progress=False)
    start = time.perf_counter()
    rows, _ = retrieval_grid(loaded.model, [task], methods, max_lengths=lengths, embedder=embedder)
    seconds = time.perf_counter() - start
    print(json.dumps({"task": task.name, "documents": len(task.corpus), "queries": len(task.queries),
                      "methods": methods, "max_lengths": lengths,
                      "eval_seconds": round(seconds, 1), "bare_encode_seconds": round(bare["seconds"], 1),
                      "ratio": round(seconds / bare["seconds"], 3),
                      "eval_encoded": embedder.encoded, "bare_encoded": {"texts": bare["texts"],
                                                                        "tokens": bare["tokens"]}}))


if __name__ == "__main__":
    main()
