"""Retrieval evaluation of embedding models (LongEmbed style), patched or not.

:class:`Embedder` encodes with a sentence-transformers model (its own pooling and normalisation) or a raw
transformers encoder (mean pooling over the attention mask, L2-normalised), longest texts first (batches hold
texts of similar length: little padding). Embeddings are cached for the run per (scope, text): the scope is the
patch in force (method, parameters, length it is patched to), except for texts no longer than the trained length
under a method that leaves them unchanged (``Method.unchanged_within``) or under no method at all: those share one
scope, so queries and short documents are encoded once for every method. :func:`evaluate` scores one task (cosine
similarity, tie-aware nDCG@k and recall@k); :func:`retrieval_grid` runs tasks × methods (× context lengths, the
LongEmbed protocol: ``max_lengths``) on the shared sweep.
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


SHARED = "unpatched"  # the scope of texts every method in force leaves as the unpatched model reads them


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
        self.cache: dict[tuple[str, str], torch.Tensor] = {}
        self.scope, self.unchanged_within = SHARED, None
        self.lengths: dict[str, int] = {}  # text -> tokens, special tokens included
        self.ends: dict[str, list[int]] = {}  # text -> the character offset where each of its tokens ends
        self.encoded = {"texts": 0, "tokens": 0}  # what was really run through the model (the rest was cached)
        self.specials = len(self.tokenizer("", verbose=False).input_ids)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` for this model, special tokens excluded."""
        return len(self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids)

    def length(self, text: str) -> int:
        """Tokens of ``text`` as the model reads it (special tokens included, before any cut), cached."""
        if text not in self.lengths:
            self.lengths[text] = self.count_tokens(text) + self.specials
        return self.lengths[text]

    def cut(self, text: str, n: int) -> str:
        """``text`` cut to at most ``n`` tokens, special tokens included (a prefix of the text, cut where a token
        ends, so the tokenizer reads the same tokens again)."""
        if self.length(text) <= n:
            return text
        keep = max(0, n - self.specials)
        if text not in self.ends:  # where each token ends in the text (one tokenization for every n)
            enc = self.tokenizer(text, add_special_tokens=False, truncation=False, verbose=False,
                                 return_offsets_mapping=True)
            self.ends[text] = [end for _, end in enc["offset_mapping"]]
        return text[:self.ends[text][keep - 1]] if keep else ""

    @property
    def max_length(self) -> int:
        """The longest input (tokens, specials included) the model is currently set to read."""
        if self.is_st:
            return int(self.model.max_seq_length)
        import longctx

        info = longctx.patch_info(self.model)  # grouped/recurrent keep the table (and config) at L
        return int(info.target_length if info and info.target_length else self.model.config.max_position_embeddings)

    def use(self, scope: str, unchanged_within: int | None) -> None:
        """Encode from now on under ``scope`` (the patch in force); texts of at most ``unchanged_within`` tokens
        (None: none) are read as by the unpatched model and share the :data:`SHARED` scope."""
        self.scope, self.unchanged_within = scope, unchanged_within

    def _key(self, text: str) -> tuple[str, str]:
        if self.unchanged_within is not None and self.length(text) <= self.unchanged_within:
            return SHARED, text
        return self.scope, text

    def clear(self) -> None:
        """Forget cached embeddings (call after the model changes outside :meth:`use`)."""
        self.cache.clear()

    @torch.no_grad()
    def encode(self, texts: Sequence[str], desc: str = "encode") -> torch.Tensor:
        """``[len(texts), dim]`` L2-normalised fp32 embeddings."""
        todo = sorted({t for t in texts if self._key(t) not in self.cache}, key=self.length, reverse=True)
        batches = [todo[i : i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
        unit = "texts" if self.batch_size == 1 else "batches"
        for batch in progress(batches, desc=desc, enabled=self.show_progress and len(batches) > 1, unit=unit):
            for text, emb in zip(batch, self._encode_batch(batch)):
                self.cache[self._key(text)] = emb
            self.encoded["texts"] += len(batch)
            self.encoded["tokens"] += sum(min(self.length(t), self.max_length) for t in batch)
        return torch.stack([self.cache[self._key(t)] for t in texts])

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
    max_lengths: Sequence[int] | None = None,
    ks: Sequence[int] = (1, 10),
    batch_size: int = 8,
    show_progress: bool = True,
    embedder: Embedder | None = None,
) -> tuple[list[dict], list[dict]]:
    """Evaluate ``tasks`` for each method (``"truncate"`` = the model as it is, inputs cut at its limit).

    One :func:`~longctx.eval.runner.sweep`. Without ``max_lengths`` each method patches the model once to the longest
    synthetic length (or the longest document of a real task). With ``max_lengths`` (LongEmbed's protocol, real tasks
    only) every document and query is cut to N tokens (special tokens included) for each N, and each method is
    patched to N; at an N within the trained length no method has anything to extend, so every method reads the cut
    texts unpatched (rows say ``patched: False``). Returns ``(rows, per_query)``: one row per task × method × length
    with the metrics, and the per-query top-1 records (for the length × depth heat map).
    """
    import longctx
    from longctx.patches import get_method

    from .runner import params_key

    embedder = embedder or Embedder(model, tokenizer, batch_size=batch_size, show_progress=show_progress)
    trained = longctx.inspect(model).trained_length
    per_query: list[dict] = []
    if max_lengths:
        synthetic = [t.name for t in tasks if t.lengths]
        if synthetic:
            raise ValueError(f"max_lengths cuts real tasks; {synthetic} are synthetic (their lengths are built in)")
        if any(n < 2 for n in max_lengths):
            raise ValueError(f"max_lengths must be token counts >= 2, got {list(max_lengths)}")
        # the model as it is reads at most its own limit: at N past it, the texts it reads are those of N = L
        cut = {(t.name, n): t.cut(n, embedder.cut) for t in tasks for n in {*max_lengths, trained}}
    else:
        target = max(max(_longest(task, embedder) for task in tasks), trained + 1)

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
        if cell.info is None:  # the model as it is (a baseline, or a method at a length within the trained one)
            embedder.use("truncate", trained)
        else:
            exact = get_method(cell.info.method).unchanged_within  # the method as resolved (pi -> pi_absolute)
            embedder.use(f"{cell.method} {params_key(cell.params)}", trained if exact else None)
        rows = []
        for task in tasks:
            if max_lengths:
                read = cell.length if cell.info is not None else min(cell.length, trained)
                splits, lengths = [cut[(task.name, read)]], [cell.length]
            elif task.lengths:
                splits, lengths = [task.split(n) for n in task.lengths], task.lengths
            else:
                splits, lengths = [task], [None]
            for split, length in zip(splits, lengths):
                metrics, queries = evaluate(embedder, split, ks)
                rows.append({"task": task.name, "length": length, "trained_length": trained,
                             "patched": cell.info is not None, **metrics})
                per_query.extend({"task": task.name, "method": cell.method, **q} for q in queries)
        return rows

    if max_lengths:
        rows = sweep(model, methods, list(max_lengths), run, target="each", skip_within=trained, within="unpatched",
                     method_params=method_params, baseline=truncated)
    else:
        rows = sweep(model, methods, [None], run, target=target, method_params=method_params, baseline=truncated)
    for row in rows:  # the parameters as a dict (JSON-able) for the results file
        row["params"] = json.loads(row["params"])
    return rows, per_query


def _longest(task: RetrievalTask, embedder: Embedder) -> int:
    if task.lengths:
        return max(task.lengths) + 2  # + the encoder's special tokens
    return max(embedder.count_tokens(t) for t in task.corpus.values()) + 2
