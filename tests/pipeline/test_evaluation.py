"""Exact top-k of the evaluation against a full sort, in memory-bounded blocks."""

import numpy as np
import pytest

from pipeline.evaluation import exact_top_k


@pytest.mark.parametrize("max_block_elements", [1, 50, 2 ** 24])
def test_exact_top_k_matches_a_full_sort_with_exclusions(max_block_elements):
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(37, 8)).astype(np.float32)
    items = rng.normal(size=(53, 8)).astype(np.float32)
    exclude = [rng.choice(53, size=int(rng.integers(0, 6)), replace=False).tolist() for _ in range(37)]
    idx, scores = exact_top_k(queries, items, 7, exclude, max_block_elements=max_block_elements)
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
