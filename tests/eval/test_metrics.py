"""Retrieval metrics against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from longctx.eval.metrics import ndcg_at_k, recall_at_k, score_queries, tied_groups


def test_perfect_and_worst_rankings():
    scores = {"a": 0.9, "b": 0.5, "c": 0.1, "d": 0.0}
    assert ndcg_at_k(scores, {"a": 1}, 10) == 1.0
    assert ndcg_at_k(scores, {"a": 1}, 1) == 1.0
    # the relevant document last of four: DCG = 1/log2(5), IDCG = 1
    assert ndcg_at_k(scores, {"d": 1}, 10) == pytest.approx(1 / math.log2(5))
    assert ndcg_at_k(scores, {"d": 1}, 3) == 0.0
    assert recall_at_k(scores, {"d": 1}, 3) == 0.0 and recall_at_k(scores, {"d": 1}, 4) == 1.0


def test_graded_relevance_by_hand():
    scores = {"a": 3.0, "b": 2.0, "c": 1.0}
    rel = {"a": 1, "b": 0, "c": 2}
    dcg = 1 / math.log2(2) + 2 / math.log2(4)
    idcg = 2 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(scores, rel, 10) == pytest.approx(dcg / idcg)
    assert recall_at_k(scores, rel, 1) == pytest.approx(0.5)


def test_ties_score_the_expectation_over_orders():
    scores = {"a": 0.5, "b": 0.5, "c": 0.1}
    assert tied_groups(scores) == [(0, ["a", "b"]), (2, ["c"])]
    # relevant "a" tied with "b" for ranks 0-1: at k=1 it is first half the time
    assert ndcg_at_k(scores, {"a": 1}, 1) == pytest.approx(0.5)
    assert ndcg_at_k(scores, {"a": 1}, 10) == pytest.approx((1 + 1 / math.log2(3)) / 2)
    assert recall_at_k(scores, {"a": 1}, 1) == pytest.approx(0.5)
    # all documents tied: both orders of a 2-way tie averaged by brute force
    flat = {"x": 0.0, "y": 0.0}
    brute = (1.0 + 1 / math.log2(3)) / 2
    assert ndcg_at_k(flat, {"y": 1}, 2) == pytest.approx(brute)


def test_mean_over_queries_and_errors():
    scores = {"q1": {"a": 1.0, "b": 0.0}, "q2": {"a": 1.0, "b": 0.0}}
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    got = score_queries(scores, qrels, ks=(1,))
    assert got == {"ndcg@1": 0.5, "recall@1": 0.5}
    with pytest.raises(ValueError, match="relevant"):
        ndcg_at_k({"a": 1.0}, {"a": 0}, 1)
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k({"a": 1.0}, {"a": 1}, 0)
