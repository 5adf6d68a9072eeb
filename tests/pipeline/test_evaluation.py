"""Exact top-k of the evaluation against a full sort, in memory-bounded blocks; the popularity order and ranking."""

import numpy as np
import pytest

from pipeline import evaluation
from pipeline.evaluation import exact_top_k


# 37 users × 53 items: a block holds max(1, min(1024, max_block_elements // 53)) users.
@pytest.mark.parametrize("max_block_elements,block_rows", [
    (1, [1] * 37),                 # fewer elements than one row: still one user per block
    (50, [1] * 37),
    (53 * 5 + 52, [5] * 7 + [2]),  # 317 // 53 = 5 users per block
    (2 ** 24, [37]),               # the 1024-row cap, more than the 37 users
])
def test_exact_top_k_matches_a_full_sort_with_exclusions(max_block_elements, block_rows, monkeypatch):
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(37, 8)).astype(np.float32)
    items = rng.normal(size=(53, 8)).astype(np.float32)
    exclude = [rng.choice(53, size=int(rng.integers(0, 6)), replace=False).tolist() for _ in range(37)]
    seen_shapes, real_top_k = [], evaluation.top_k_excluding

    def spy(scores, k, block_exclude):
        seen_shapes.append(scores.shape)
        return real_top_k(scores, k, block_exclude)

    monkeypatch.setattr(evaluation, "top_k_excluding", spy)
    idx, scores = exact_top_k(queries, items, 7, exclude, max_block_elements=max_block_elements)
    # Memory stays bounded: each scored block is [rows, 53] with the rows the bound allows.
    assert seen_shapes == [(rows, 53) for rows in block_rows]
    full = queries @ items.T
    for u, ex in enumerate(exclude):
        allowed = np.setdiff1d(np.arange(53), ex)
        expected = np.sort(full[u, allowed])[::-1][:7]
        np.testing.assert_allclose(scores[u], expected, rtol=1e-6)
        np.testing.assert_allclose(full[u, idx[u]], scores[u], rtol=1e-6)
        assert not set(idx[u]) & set(ex)


def test_tail_only_drops_the_head_items():
    from pipeline.evaluation import tail_only

    popular = ["a", "b", "c", "d", "e"]  # most frequent first; items f, g never trained on
    relevant = [["a", "f"], ["b", "c"], ["e", "g", "a"]]
    # 7 items, head fraction 0.3 -> ceil(2.1) = 3 head items: a, b, c
    assert tail_only(relevant, popular, 0.3, 7) == [["f"], [], ["e", "g"]]
    assert tail_only(relevant, popular, 0.0, 7) == relevant


def test_popularity_order_and_ranking_skip_seen_items():
    from pipeline.evaluation import items_by_popularity, popularity_ranking

    # counts: b 5, a 3, d 3, c 1 -> ties broken by id (a before d)
    popular = items_by_popularity(["a", "b", "c", "d"], np.array([3, 5, 1, 3]))
    assert popular == ["b", "a", "d", "c"]
    assert popularity_ranking(popular, [[], ["b", "d"], ["a", "b", "c", "d"]], 2) == [["b", "a"], ["a", "c"], []]


def test_top_k_excluding_ranks_a_given_score_matrix():
    from pipeline.evaluation import top_k_excluding

    scores = np.array([[0.1, 0.9, 0.5, 0.7], [3.0, 1.0, 2.0, 0.0]])
    idx, top = top_k_excluding(scores.copy(), 2, [[1], []])
    assert idx.tolist() == [[3, 2], [0, 2]]
    np.testing.assert_allclose(top, [[0.7, 0.5], [3.0, 2.0]])


def test_top_k_excluding_never_returns_an_excluded_item_when_k_exceeds_what_is_left():
    from models.metrics import recall_ndcg_at_k, recall_vs_exact
    from pipeline.evaluation import NO_ITEM, exact_top_k, ranked_ids, top_k_excluding

    # Row 0: columns 1, 2, 3 excluded -> only column 0 is left for k=3.
    # Row 1: column 0 excluded -> 3 left, ranked 3 (4.0), 2 (3.0), 1 (2.0).
    scores = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 2.0, 3.0, 4.0]])
    idx, top = top_k_excluding(scores, 3, [[1, 2, 3], [0]])
    assert idx.tolist() == [[0, NO_ITEM, NO_ITEM], [3, 2, 1]]
    np.testing.assert_array_equal(top, [[1.0, -np.inf, -np.inf], [4.0, 3.0, 2.0]])
    assert ranked_ids(idx, ["a", "b", "c", "d"]) == [["a"], ["d", "c", "b"]]

    # Through the evaluation, both users scoring item j as j + 1. User 0 has seen b, c, d: only a
    # is ranked, so of its test items {d, a} the seen d is never a hit -> recall@3 1/2,
    # precision 1/3, NDCG = (1/log2 2) / (1 + 1/log2 3) = 1 / 1.63093.
    # User 1 ranks d, c, b: its test item c at rank 2 -> recall 1, precision 1/3, NDCG 1/log2 3 = 0.63093.
    queries, items = np.array([[1, 0], [1, 0]], np.float32), np.array([[1, 0], [2, 0], [3, 0], [4, 0]], np.float32)
    exact_idx, exact_scores = exact_top_k(queries, items, 5, [[1, 2, 3], [0]])
    assert exact_idx.tolist() == [[0, NO_ITEM, NO_ITEM, NO_ITEM], [3, 2, 1, NO_ITEM]]  # k capped at the 4 items
    ranked = ranked_ids(exact_idx, ["a", "b", "c", "d"])
    assert ranked == [["a"], ["d", "c", "b"]]
    m = recall_ndcg_at_k(ranked, [["d", "a"], ["c"]], 3)
    assert m["recall"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["precision"] == pytest.approx((1 / 3 + 1 / 3) / 2)
    assert m["ndcg"] == pytest.approx((1 / 1.63093 + 0.63093) / 2, abs=1e-5)
    # The exact top-K agrees with itself, its empty slots included (1 and 3 entries to find).
    assert recall_vs_exact(exact_scores, exact_scores, 4) == 1.0
