"""Top-K retrieval metrics (pure numpy).

Protocol (as BARS / SimpleX): every item of the corpus is scored, the user's
training items are removed, the top K are kept; relevance is binary.

  Recall@K = |top-K ∩ test items| / |test items|
  NDCG@K   = DCG@K / IDCG@K, DCG@K = Σ_{r=1..K} rel_r / log2(r + 1),
             IDCG@K over min(|test items|, K) relevant items.

Both are averaged over users with at least one test item.
"""

from __future__ import annotations

from typing import Dict, Iterable, Sequence

import numpy as np


def recall_ndcg_at_k(ranked: Sequence[Sequence], relevant: Sequence[Iterable], k: int) -> Dict[str, float]:
    """Mean Recall@K, Precision@K and NDCG@K.

    Args:
      ranked: per user, item ids in rank order (at least K unless the corpus is smaller).
      relevant: per user, the set of test items.
      k: cut-off.

    Returns:
      ``{"recall": ..., "precision": ..., "ndcg": ..., "users": n}`` over users with
      test items. Precision@K is hits / K, as in the BARS evaluation.
    """
    if k < 1:
        raise ValueError(f"`k` should be positive. Received: k={k}")
    if len(ranked) != len(relevant):
        raise ValueError(f"`ranked` and `relevant` should have one entry per user. "
                         f"Received: {len(ranked)} and {len(relevant)}")
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    recalls, precisions, ndcgs = [], [], []
    for items, truth in zip(ranked, relevant):
        truth = set(truth)
        if not truth:
            continue
        top = list(items)[:k]
        hits = np.array([1.0 if it in truth else 0.0 for it in top])
        dcg = float((hits * discounts[:len(hits)]).sum())
        idcg = float(discounts[:min(len(truth), k)].sum())
        recalls.append(hits.sum() / len(truth))
        precisions.append(hits.sum() / k)
        ndcgs.append(dcg / idcg)
    if not recalls:
        return {"recall": float("nan"), "precision": float("nan"), "ndcg": float("nan"), "users": 0}
    return {"recall": float(np.mean(recalls)), "precision": float(np.mean(precisions)),
            "ndcg": float(np.mean(ndcgs)), "users": len(recalls)}


def recall_vs_exact(approx_scores: np.ndarray, exact_scores: np.ndarray, k: int, atol: float = 1e-4) -> float:
    """Fraction of the exact top-K that an approximate search recovers, by score.

    Compares scores, not ids, so ties between equally scored items cannot flip the
    result: an approximate hit counts when its exact score reaches the exact K-th
    score (minus `atol` for float noise). Rows are users; scores are sorted
    descending; ``-inf`` marks missing entries. A row whose exact top-K has fewer than K
    entries (fewer items left than K) is judged on those: its recall is
    hits / (finite exact entries), so returning all of them scores 1.

    Args:
      approx_scores: ``[U, K]`` exact scores of the items the index returned.
      exact_scores: ``[U, K]`` scores of the exact top-K.
    """
    approx_scores = np.asarray(approx_scores, dtype=np.float64)[:, :k]
    exact_scores = np.asarray(exact_scores, dtype=np.float64)[:, :k]
    if approx_scores.shape[0] != exact_scores.shape[0]:
        raise ValueError("`approx_scores` and `exact_scores` should have the same number of rows. "
                         f"Received: {approx_scores.shape[0]} and {exact_scores.shape[0]}")
    finite = np.isfinite(exact_scores)
    wanted = finite.sum(axis=1)
    # The lowest exact score that counts (+inf when the row has none, so nothing is found).
    kth = np.where(finite, exact_scores, np.inf).min(axis=1, keepdims=True)
    found = np.isfinite(approx_scores) & (approx_scores >= kth - atol)
    return float((found.sum(axis=1).clip(max=wanted) / np.maximum(wanted, 1)).mean())
