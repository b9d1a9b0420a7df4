"""Retrieval metrics: nDCG@k and recall@k, tie-aware.

Tied scores are common with truncated long documents (two documents whose first 512 tokens agree embed
identically). Breaking ties by document id, as trec_eval does, rewards or punishes an arbitrary order; here a tie is
scored as the expectation over all orders of the tied documents (McSherry & Najork, ECIR 2008): each document of a
tied group gets the mean discount of the ranks the group occupies. Without ties this is the usual nDCG (linear gain
``rel``, discount ``1 / log2(rank + 1)``) and recall.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

__all__ = ["ndcg_at_k", "recall_at_k", "tied_groups", "score_queries"]


def tied_groups(scores: Mapping[str, float]) -> list[tuple[int, list[str]]]:
    """Documents grouped by equal score, best first: ``[(first rank (0-based), [doc ids]), …]``."""
    ordered = sorted(scores.items(), key=lambda kv: -kv[1])
    groups: list[tuple[int, list[str]]] = []
    rank = 0
    i = 0
    while i < len(ordered):
        j = i
        while j < len(ordered) and ordered[j][1] == ordered[i][1]:
            j += 1
        groups.append((rank, [d for d, _ in ordered[i:j]]))
        rank += j - i
        i = j
    return groups


def _discount(rank: int) -> float:  # rank 0-based
    return 1.0 / math.log2(rank + 2)


def ndcg_at_k(scores: Mapping[str, float], relevance: Mapping[str, float], k: int) -> float:
    """nDCG@k of one query: ``scores`` doc id → similarity, ``relevance`` doc id → graded relevance (> 0 relevant).
    Raises ``ValueError`` when the query has no relevant document (nDCG is undefined)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    gains = sorted((g for g in relevance.values() if g > 0), reverse=True)
    if not gains:
        raise ValueError("nDCG is undefined for a query without relevant documents")
    ideal = sum(g * _discount(r) for r, g in enumerate(gains[:k]))
    dcg = 0.0
    for first, docs in tied_groups(scores):
        if first >= k:
            break
        mean_discount = sum(_discount(r) for r in range(first, min(first + len(docs), k))) / len(docs)
        dcg += mean_discount * sum(max(0.0, relevance.get(d, 0.0)) for d in docs)
    return dcg / ideal


def recall_at_k(scores: Mapping[str, float], relevance: Mapping[str, float], k: int) -> float:
    """Expected fraction of the relevant documents ranked in the top k (ties: each tied document is in the top k
    with probability = the share of its group's ranks that are < k)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    relevant = {d for d, g in relevance.items() if g > 0}
    if not relevant:
        raise ValueError("recall is undefined for a query without relevant documents")
    found = 0.0
    for first, docs in tied_groups(scores):
        if first >= k:
            break
        inside = min(first + len(docs), k) - first
        found += inside / len(docs) * sum(d in relevant for d in docs)
    return found / len(relevant)


def score_queries(
    scores: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, float]],
    ks: Sequence[int] = (1, 10),
) -> dict[str, float]:
    """Mean ``ndcg@k`` and ``recall@k`` over the queries of ``qrels`` (queries missing from ``scores`` count as 0)."""
    out: dict[str, float] = {}
    queries = [q for q, rel in qrels.items() if any(g > 0 for g in rel.values())]
    if not queries:
        raise ValueError("no query has a relevant document")
    for k in ks:
        out[f"ndcg@{k}"] = sum(ndcg_at_k(scores[q], qrels[q], k) if q in scores else 0.0 for q in queries) / len(queries)
        out[f"recall@{k}"] = sum(recall_at_k(scores[q], qrels[q], k) if q in scores else 0.0 for q in queries) / len(
            queries
        )
    return out
