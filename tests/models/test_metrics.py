import numpy as np
import pytest

from models.metrics import recall_ndcg_at_k, recall_vs_exact


def test_recall_ndcg_by_hand():
    ranked = [["a", "b", "c"], ["x", "y", "z"], ["p", "q", "r"]]
    relevant = [{"b", "d"}, {"x"}, set()]
    got = recall_ndcg_at_k(ranked, relevant, 3)
    # user 1: one hit of two at rank 2 -> recall 1/2; DCG = 1/log2(3) = 0.63093,
    #         IDCG over min(2, 3) = 1 + 1/log2(3) = 1.63093 -> NDCG 0.38685.
    # user 2: hit at rank 1 -> recall 1, NDCG 1. user 3 has no test items: skipped.
    assert got["users"] == 2
    assert got["recall"] == pytest.approx((0.5 + 1.0) / 2)
    assert got["ndcg"] == pytest.approx((0.63093 / 1.63093 + 1.0) / 2, abs=1e-5)
    # precision = hits / K: user 1 one hit in 3, user 2 one hit in 3.
    assert got["precision"] == pytest.approx((1 / 3 + 1 / 3) / 2)


def test_against_brute_force_reference():
    rng = np.random.default_rng(0)
    for _ in range(5):
        n_items, k = 30, 5
        ranked = [list(rng.permutation(n_items)) for _ in range(20)]
        relevant = [set(rng.choice(n_items, rng.integers(1, 8), replace=False)) for _ in range(20)]
        got = recall_ndcg_at_k(ranked, relevant, k)
        rec, prec, nd = [], [], []
        for r, t in zip(ranked, relevant):
            dcg = sum(1 / np.log2(i + 2) for i, x in enumerate(r[:k]) if x in t)
            idcg = sum(1 / np.log2(i + 2) for i in range(min(len(t), k)))
            rec.append(len(set(r[:k]) & t) / len(t))
            prec.append(len(set(r[:k]) & t) / k)
            nd.append(dcg / idcg)
        assert got["recall"] == pytest.approx(np.mean(rec))
        assert got["precision"] == pytest.approx(np.mean(prec))
        assert got["ndcg"] == pytest.approx(np.mean(nd))


def test_recall_vs_exact_counts_ties_as_hits():
    exact = np.array([[0.9, 0.8, 0.7]])
    # The index returned a different item with the same score as the 3rd: still a hit.
    assert recall_vs_exact(np.array([[0.9, 0.8, 0.7]]), exact, 3) == 1.0
    assert recall_vs_exact(np.array([[0.9, 0.7, 0.1]]), exact, 3) == pytest.approx(2 / 3)
    assert recall_vs_exact(np.array([[0.9, -np.inf, -np.inf]]), exact, 3) == pytest.approx(1 / 3)


def test_recall_vs_exact_judges_a_short_exact_top_k_on_its_finite_entries():
    # Only 3 items were left for K=5: the exact top-5 ends in two -inf slots.
    exact = np.array([[3.0, 2.0, 1.0, -np.inf, -np.inf]])
    assert recall_vs_exact(exact, exact, 5) == 1.0
    assert recall_vs_exact(np.array([[3.0, 1.0, -np.inf, -np.inf, -np.inf]]), exact, 5) == pytest.approx(2 / 3)
    # Two users: 3 of 3 and 1 of 2 (its second exact score is 4) -> (1 + 1/2) / 2.
    exact2 = np.array([[3.0, 2.0, 1.0, -np.inf], [5.0, 4.0, -np.inf, -np.inf]])
    approx2 = np.array([[3.0, 2.0, 1.0, -np.inf], [5.0, -np.inf, -np.inf, -np.inf]])
    assert recall_vs_exact(approx2, exact2, 4) == pytest.approx(0.75)
    # Nothing left to find: the row counts 0 (divided by max(0, 1)).
    assert recall_vs_exact(np.full((1, 2), -np.inf), np.full((1, 2), -np.inf), 2) == 0.0


def test_errors():
    with pytest.raises(ValueError, match="k"):
        recall_ndcg_at_k([["a"]], [{"a"}], 0)
    with pytest.raises(ValueError, match="one entry per user"):
        recall_ndcg_at_k([["a"]], [], 1)
