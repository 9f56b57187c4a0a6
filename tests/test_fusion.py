from __future__ import annotations

import pytest

from query.fusion import weighted_rrf


def test_rrf_hand_computed():
    fused = weighted_rrf({"bm25": ["a", "b", "c"], "image": ["b", "a"]}, k=60)
    scores = {f.id: f.score for f in fused}
    assert scores["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert scores["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert scores["c"] == pytest.approx(1 / 63)
    # a and b tie exactly: the id breaks the tie
    assert [f.id for f in fused] == ["a", "b", "c"]
    assert [f.rank for f in fused] == [1, 2, 3]
    assert fused[0].ranks == {"bm25": 1, "image": 2}


def test_weights_change_the_order():
    lists = {"bm25": ["x", "y"], "image": ["y", "x"]}
    assert weighted_rrf(lists, {"bm25": 2.0, "image": 1.0})[0].id == "x"
    assert weighted_rrf(lists, {"bm25": 1.0, "image": 2.0})[0].id == "y"
    zero = weighted_rrf(lists, {"bm25": 0.0, "image": 1.0})
    assert zero[0].id == "y" and zero[1].score == pytest.approx(1 / 62)


def test_duplicate_keeps_best_rank_and_empty_input():
    fused = weighted_rrf({"l": ["a", "a", "b"]}, k=1)
    assert {f.id: f.score for f in fused} == {"a": pytest.approx(1 / 2), "b": pytest.approx(1 / 4)}
    assert weighted_rrf({}) == []


@pytest.mark.parametrize("k, weights", [(0, None), (-1, None), (60, {"bm25": -0.5})])
def test_invalid_parameters(k, weights):
    with pytest.raises(ValueError):
        weighted_rrf({"bm25": ["a"]}, weights, k)
