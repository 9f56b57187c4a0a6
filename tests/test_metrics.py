from __future__ import annotations

import math

import pytest

from evaluation.metrics import mrr_at_k, ndcg_at_k, recall_at_k, score_queries, success_at_k


def test_ndcg_hand_computed():
    # relevant at ranks 1 and 3 of 2 relevant: DCG = 1 + 1/log2(4) = 1.5; IDCG = 1 + 1/log2(3)
    assert ndcg_at_k(["a", "x", "b"], {"a", "b"}, 10) == pytest.approx(1.5 / (1 + 1 / math.log2(3)))
    assert ndcg_at_k(["a", "b"], {"a", "b"}) == pytest.approx(1.0)
    assert ndcg_at_k(["x", "y"], {"a"}) == 0.0
    # more relevant items than k: the ideal DCG stops at k
    assert ndcg_at_k(["a"], {"a", "b", "c"}, 1) == pytest.approx(1.0)


def test_recall_mrr_success():
    ranked = ["x", "a", "y", "b"]
    assert recall_at_k(ranked, {"a", "b", "c"}, 2) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, {"a", "b", "c"}, 10) == pytest.approx(2 / 3)
    assert mrr_at_k(ranked, {"b"}, 10) == pytest.approx(1 / 4)
    assert mrr_at_k(ranked, {"b"}, 3) == 0.0
    assert success_at_k(ranked, {"y"}, 3) == 1.0
    assert success_at_k(ranked, {"b"}, 3) == 0.0


def test_empty_relevant_and_score_queries():
    assert ndcg_at_k(["a"], set()) == 0.0 and recall_at_k(["a"], set(), 10) == 0.0
    means, per_query = score_queries({"q1": ["a", "b"], "q2": ["c"], "q3": ["z"]}, {"q1": {"b"}, "q2": {"c"}})
    assert set(per_query) == {"q1", "q2"}  # q3 has no judgments
    assert per_query["q1"]["MRR@10"] == pytest.approx(0.5)
    assert means["MRR@10"] == pytest.approx(0.75)
    assert means["Success@10"] == pytest.approx(1.0)
