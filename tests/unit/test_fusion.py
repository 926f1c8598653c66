import pytest

from hybrid_serve.retrieval.fusion import reciprocal_rank_fusion


def test_rrf_scores_by_hand():
    fused = dict(reciprocal_rank_fusion([["a", "b", "c"], ["b", "d"]], k=60))
    assert fused["a"] == pytest.approx(1 / 61)
    assert fused["b"] == pytest.approx(1 / 62 + 1 / 61)
    assert fused["c"] == pytest.approx(1 / 63)
    assert fused["d"] == pytest.approx(1 / 62)


def test_rrf_order_agreement_wins():
    ranked = [x for x, _ in reciprocal_rank_fusion([["a", "b", "c"], ["b", "d"]])]
    assert ranked == ["b", "a", "d", "c"]


def test_rrf_weights():
    ranked = [x for x, _ in reciprocal_rank_fusion([["a"], ["b"]], weights=[1.0, 2.0])]
    assert ranked == ["b", "a"]


def test_rrf_ties_are_deterministic():
    ranked = [x for x, _ in reciprocal_rank_fusion([["a"], ["b"]])]
    assert ranked == ["a", "b"]


def test_rrf_empty_and_mismatch():
    assert reciprocal_rank_fusion([[], []]) == []
    with pytest.raises(ValueError):
        reciprocal_rank_fusion([["a"]], weights=[1.0, 1.0])
