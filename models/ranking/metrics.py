"""Click-prediction metrics (pure numpy): AUC, GAUC, log loss and calibration.

* AUC = P(score of a random positive > score of a random negative) + ½ P(tie), computed
  from average ranks (Mann-Whitney U): ``AUC = (Σ_{positives} rank − n⁺(n⁺+1)/2) / (n⁺ n⁻)``
  with tied scores given the mean of their ranks.
* GAUC = Σ_u n_u AUC_u / Σ_u n_u over users having both a click and a non-click, with
  n_u the user's number of impressions (users with a single class are skipped).
* log loss = −mean[y log p + (1 − y) log(1 − p)], p clipped to [eps, 1 − eps].
* calibration: the ratio of the mean predicted CTR to the observed CTR (1 is perfect,
  > 1 over-predicts) and a reliability table over equal-width probability bins.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import numpy as np


def _binary_labels(labels, name: str = "labels") -> np.ndarray:
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if not np.isin(y, (0.0, 1.0)).all():
        bad = y[~np.isin(y, (0.0, 1.0))][:3]
        raise ValueError(f"`{name}` should be 0 or 1. Received values such as {bad.tolist()}")
    return y


def _scores(scores, n: int, name: str = "scores") -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(s) != n:
        raise ValueError(f"`{name}` should have one value per label ({n}). Received: {len(s)}")
    if not np.isfinite(s).all():
        raise ValueError(f"`{name}` should be finite. Received {int((~np.isfinite(s)).sum())} non-finite values")
    return s


def _grouped_auc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray):
    """Per-group AUC with average ranks; returns (auc [G] nan where one class, size [G])."""
    if len(labels) == 0:
        return np.zeros(0), np.zeros(0)
    codes = np.unique(groups, return_inverse=True)[1].reshape(-1)
    num_groups = int(codes.max()) + 1 if len(codes) else 0
    order = np.lexsort((scores, codes))
    c, s, y = codes[order], scores[order], labels[order]
    n = len(c)
    idx = np.arange(n)
    group_start = np.ones(n, dtype=bool)
    group_start[1:] = c[1:] != c[:-1]
    first_of_group = np.maximum.accumulate(np.where(group_start, idx, 0))
    # Tie runs: equal (group, score); every member gets the mean 1-based rank of the run.
    tie_start = group_start.copy()
    tie_start[1:] |= s[1:] != s[:-1]
    run_id = np.cumsum(tie_start) - 1
    run_first = idx[tie_start]
    run_last = np.append(run_first[1:], n) - 1
    mean_pos = (run_first + run_last) / 2.0
    ranks = mean_pos[run_id] - first_of_group + 1.0
    size = np.bincount(c, minlength=num_groups).astype(np.float64)
    pos = np.bincount(c, weights=y, minlength=num_groups)
    neg = size - pos
    rank_sum = np.bincount(c, weights=ranks * y, minlength=num_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_sum - pos * (pos + 1) / 2.0) / (pos * neg)
    auc[(pos == 0) | (neg == 0)] = np.nan
    return auc, size


def auc(labels, scores) -> float:
    """Area under the ROC curve, ties counted ½.

    Args:
      labels: ``[n]`` 0/1.
      scores: ``[n]`` any monotone score (logits or probabilities).

    Raises:
      ValueError: labels not 0/1, lengths differ, or only one class present.
    """
    y = _binary_labels(labels)
    s = _scores(scores, len(y))
    if len(y) == 0 or y.min() == y.max():
        raise ValueError(f"AUC needs both classes; `labels` has {int(y.sum())} positives of {len(y)}")
    value, _ = _grouped_auc(np.zeros(len(y), dtype=np.int64), y, s)
    return float(value[0])


def gauc(user_ids, labels, scores) -> Dict[str, float]:
    """Impression-weighted mean of per-user AUCs.

    Args:
      user_ids: ``[n]`` the user of each impression (any hashable dtype numpy can sort).
      labels: ``[n]`` 0/1.
      scores: ``[n]``.

    Returns:
      ``{"gauc": ..., "users": users counted, "impressions": their impressions}``;
      ``gauc`` is nan when no user has both classes.
    """
    y = _binary_labels(labels)
    s = _scores(scores, len(y))
    users = np.asarray(user_ids).reshape(-1)
    if len(users) != len(y):
        raise ValueError(f"`user_ids` should have one value per label ({len(y)}). Received: {len(users)}")
    per_user, size = _grouped_auc(users, y, s)
    ok = ~np.isnan(per_user)
    if not ok.any():
        return {"gauc": float("nan"), "users": 0, "impressions": 0}
    return {"gauc": float((per_user[ok] * size[ok]).sum() / size[ok].sum()), "users": int(ok.sum()),
            "impressions": int(size[ok].sum())}


def log_loss(labels, probabilities, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [eps, 1 − eps])."""
    y = _binary_labels(labels)
    p = _scores(probabilities, len(y), "probabilities")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("`probabilities` should be in [0, 1]")
    if len(y) == 0:
        raise ValueError("`labels` is empty")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))


def calibration(labels, probabilities, num_bins: int = 10) -> Dict[str, Any]:
    """Predicted vs observed CTR, overall and in equal-width probability bins.

    Returns:
      ``{"predicted_ctr", "observed_ctr", "ratio" (predicted / observed, nan when no
      click), "ece" (Σ_b n_b/n |mean p_b − rate_b|), "bins": [{"lower", "upper",
      "count", "mean_predicted", "observed_rate"}, ...]}`` (empty bins have count 0 and
      nan means). Bin b holds ``lower <= p < upper``; the last bin includes 1.
    """
    if isinstance(num_bins, bool) or int(num_bins) != num_bins or num_bins < 1:
        raise ValueError(f"`num_bins` should be a positive integer. Received: num_bins={num_bins!r}")
    y = _binary_labels(labels)
    p = _scores(probabilities, len(y), "probabilities")
    if len(y) == 0:
        raise ValueError("`labels` is empty")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("`probabilities` should be in [0, 1]")
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    index = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, num_bins - 1)
    count = np.bincount(index, minlength=num_bins).astype(np.float64)
    sum_p = np.bincount(index, weights=p, minlength=num_bins)
    sum_y = np.bincount(index, weights=y, minlength=num_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_p = sum_p / count
        rate = sum_y / count
    used = count > 0
    ece = float((count[used] / len(y) * np.abs(mean_p[used] - rate[used])).sum())
    observed, predicted = float(y.mean()), float(p.mean())
    bins = [{"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": int(count[b]),
             "mean_predicted": float(mean_p[b]), "observed_rate": float(rate[b])} for b in range(num_bins)]
    return {"predicted_ctr": predicted, "observed_ctr": observed,
            "ratio": predicted / observed if observed > 0 else float("nan"), "ece": ece, "bins": bins}


def ctr_metrics(user_ids: Sequence, labels, probabilities) -> Dict[str, float]:
    """AUC, GAUC, log loss and calibration ratio of one evaluation set."""
    g = gauc(user_ids, labels, probabilities)
    cal = calibration(labels, probabilities)
    return {"auc": auc(labels, probabilities), "gauc": g["gauc"], "gauc_users": g["users"],
            "log_loss": log_loss(labels, probabilities), "calibration_ratio": cal["ratio"], "ece": cal["ece"]}
