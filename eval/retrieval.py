"""Retrieval evaluation of embedding models (LongEmbed style), patched or not.

:class:`Embedder` encodes with a sentence-transformers model (its own pooling and normalisation) or a raw
transformers encoder (mean pooling over the attention mask, L2-normalised); embeddings are cached per text for the
run (queries repeat across lengths). :func:`evaluate` scores one task (cosine similarity, tie-aware nDCG@k and
recall@k); :func:`retrieval_grid` runs tasks × methods × lengths on the shared sweep, patching the model once per
method to the longest length and restoring it afterwards.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .metrics import score_queries
from .progress import progress
from .runner import Cell, sweep
from .synthetic import RetrievalTask

__all__ = ["Embedder", "evaluate", "retrieval_grid", "BASELINE"]

BASELINE = "truncate"  # no method: inputs are cut at the model's own limit


class Embedder:
    """Encode texts with a sentence-transformers model or a transformers encoder (+ its tokenizer)."""

    def __init__(self, model: Any, tokenizer: Any = None, *, batch_size: int = 8, show_progress: bool = True):
        self.model = model
        self.is_st = hasattr(model, "encode") and hasattr(model, "tokenizer")
        self.tokenizer = model.tokenizer if self.is_st else tokenizer
        if self.tokenizer is None:
            raise ValueError("a transformers encoder needs its tokenizer: Embedder(model, tokenizer)")
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.cache: dict[str, torch.Tensor] = {}

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` for this model, special tokens excluded."""
        return len(self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids)

    @property
    def max_length(self) -> int:
        """The longest input (tokens, specials included) the model is currently set to read."""
        if self.is_st:
            return int(self.model.max_seq_length)
        import longctx

        info = longctx.patch_info(self.model)  # grouped/recurrent keep the table (and config) at L
        return int(info.target_length if info and info.target_length else self.model.config.max_position_embeddings)

    def clear(self) -> None:
        """Forget cached embeddings (call after the model changes)."""
        self.cache.clear()

    @torch.no_grad()
    def encode(self, texts: Sequence[str], desc: str = "encode") -> torch.Tensor:
        """``[len(texts), dim]`` L2-normalised fp32 embeddings."""
        todo = sorted({t for t in texts if t not in self.cache}, key=len, reverse=True)
        batches = [todo[i : i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
        for batch in progress(batches, desc=desc, enabled=self.show_progress and len(batches) > 1):
            for text, emb in zip(batch, self._encode_batch(batch)):
                self.cache[text] = emb
        return torch.stack([self.cache[t] for t in texts])

    def _encode_batch(self, batch: list[str]) -> torch.Tensor:
        if self.is_st:
            emb = self.model.encode(batch, batch_size=len(batch), convert_to_tensor=True, show_progress_bar=False)
        else:
            device = next(self.model.parameters()).device
            enc = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(device)
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(emb.float().cpu(), dim=-1)


def evaluate(embedder: Embedder, task: RetrievalTask, ks: Sequence[int] = (1, 10)) -> tuple[dict, list[dict]]:
    """``(metrics, per-query rows)`` of one task: cosine similarity of query and document embeddings, mean
    tie-aware nDCG@k / recall@k; per-query rows carry top-1 correctness and the query's metadata (depth …)."""
    qids, docs = list(task.queries), list(task.corpus)
    q = embedder.encode([task.queries[i] for i in qids], desc=f"{task.name} queries")
    d = embedder.encode([task.corpus[i] for i in docs], desc=f"{task.name} documents")
    sims = (q @ d.T).tolist()
    scores = {qid: dict(zip(docs, row)) for qid, row in zip(qids, sims)}
    metrics = score_queries(scores, task.qrels, ks)
    per_query = []
    for qid in qids:
        best = max(scores[qid].values())
        top = [doc for doc, s in scores[qid].items() if s == best]
        hit = sum(task.qrels[qid].get(doc, 0) > 0 for doc in top) / len(top)  # ties: expected top-1 accuracy
        per_query.append({"qid": qid, "top1": hit, **task.query_meta.get(qid, {})})
    metrics["queries"] = len(qids)
    return metrics, per_query


def retrieval_grid(
    model: Any,
    tasks: Sequence[RetrievalTask],
    methods: Sequence[str],
    *,
    tokenizer: Any = None,
    method_params: dict[str, dict] | None = None,
    ks: Sequence[int] = (1, 10),
    batch_size: int = 8,
    show_progress: bool = True,
) -> tuple[list[dict], list[dict]]:
    """Evaluate ``tasks`` for each method (``"truncate"`` = the model as it is, inputs cut at its limit).

    One :func:`~longctx.eval.runner.sweep`: each method patches the model once to the longest synthetic length (or
    the longest document for real tasks) and is undone before the next. Returns ``(rows, per_query)``: one row per
    task × method × length with the metrics, and the per-query top-1 records (for the length × depth heat map).
    """
    import longctx

    embedder = Embedder(model, tokenizer, batch_size=batch_size, show_progress=show_progress)
    trained = longctx.inspect(model).trained_length
    target = max(max(_longest(task, embedder) for task in tasks), trained + 1)
    per_query: list[dict] = []

    @contextlib.contextmanager
    def truncated(method: str) -> Iterator[None]:
        """sentence-transformers: cut at the model's real limit (not its shorter default ``max_seq_length``)."""
        limit = model.max_seq_length if embedder.is_st else None
        if limit is not None:
            model.max_seq_length = trained
        try:
            yield None
        finally:
            if limit is not None:
                model.max_seq_length = limit

    def run(cell: Cell) -> list[dict]:
        embedder.clear()  # embeddings of the model as it was for the previous method
        rows = []
        for task in tasks:
            splits = [task.split(n) for n in task.lengths] if task.lengths else [task]
            for split, length in zip(splits, task.lengths or [None]):
                metrics, queries = evaluate(embedder, split, ks)
                rows.append({"task": task.name, "length": length, "trained_length": trained, **metrics})
                per_query.extend({"task": task.name, "method": cell.method, **q} for q in queries)
        return rows

    rows = sweep(model, methods, [None], run, target=target, method_params=method_params, baseline=truncated)
    for row in rows:  # the parameters as a dict (JSON-able) for the results file
        row["params"] = json.loads(row["params"])
    embedder.clear()
    return rows, per_query


def _longest(task: RetrievalTask, embedder: Embedder) -> int:
    if task.lengths:
        return max(task.lengths) + 2  # + the encoder's special tokens
    return max(embedder.count_tokens(t) for t in task.corpus.values()) + 2
