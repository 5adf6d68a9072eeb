"""Cosine contrastive loss (CCL) over a batch of positives and shared negatives (pure TF).

Every row i has one positive (column i) and, as negatives, every other candidate that is
valid and does not carry the positive's id (accidental hits are removed, as in the
softmax chain of `models.sampled_softmax`):

Formula: L_i = (1 − cos(q_i, c_i)) + w / |N_i| · Σ_{j ∈ N_i} max(0, cos(q_i, c_j) − m).

The margin m ignores negatives that are already dissimilar enough, so the loss
concentrates on the hard ones; the weight w balances the positive against the many
negatives. It is a pairwise loss, not a softmax: no sampling-bias (logQ) correction
applies, and uniformly drawn negatives (`negatives: mixed`) are its natural partner.

Reference:
  Mao et al., "SimpleX: A Simple and Strong Baseline for Collaborative Filtering",
  CIKM 2021.
"""

from __future__ import annotations

from typing import Optional

from models.sampled_softmax import accidental_hits
from models.tf_compat import tf


def check_ccl_args(margin: float, negative_weight: float) -> None:
    """Raises ValueError unless m is in [-1, 1) and w >= 0."""
    if not -1.0 <= margin < 1.0:
        raise ValueError(f"`margin` should be in [-1, 1). Received: margin={margin}")
    if negative_weight < 0:
        raise ValueError(f"`negative_weight` should be >= 0. Received: negative_weight={negative_weight}")


def cosine_contrastive_loss(query: tf.Tensor, candidates: tf.Tensor, *, positive_ids: tf.Tensor,
                            candidate_ids: tf.Tensor, margin: float, negative_weight: float,
                            candidate_valid: Optional[tf.Tensor] = None, remove_accidental_hits: bool = True,
                            sample_weight: Optional[tf.Tensor] = None) -> tf.Tensor:
    """Per-row CCL ``[B]``.

    Args:
      query: ``[B, D]``; candidates: ``[N, D]``, N >= B, the first B the positives.
        Both are L2-normalized here (cosine similarity).
      positive_ids, candidate_ids: ``[B]``, ``[N]`` int64 id fingerprints.
      margin: m in [-1, 1).
      negative_weight: w >= 0.
      candidate_valid: ``[N]`` bool, False for candidates to ignore, or None.
      remove_accidental_hits: drop negatives with the positive's id.
      sample_weight: ``[B]`` row weights, or None.
    """
    check_ccl_args(margin, negative_weight)
    q = tf.math.l2_normalize(tf.cast(query, tf.float32), axis=1)
    c = tf.math.l2_normalize(tf.cast(candidates, tf.float32), axis=1)
    batch = tf.shape(q)[0]
    cos = tf.matmul(q, c, transpose_b=True)
    positive = tf.reduce_sum(q * c[:batch], axis=1)
    # Every column but the positive's own, without its accidental hits.
    excluded = (accidental_hits(positive_ids, candidate_ids) if remove_accidental_hits
                else tf.zeros(tf.shape(cos), tf.bool))
    is_negative = tf.linalg.set_diag(tf.logical_not(excluded), tf.zeros([batch], tf.bool))
    if candidate_valid is not None:
        is_negative = tf.logical_and(is_negative, candidate_valid[tf.newaxis, :])
    mask = tf.cast(is_negative, tf.float32)
    count = tf.reduce_sum(mask, axis=1)
    hinge = tf.reduce_sum(tf.nn.relu(cos - margin) * mask, axis=1)
    loss = (1.0 - positive) + negative_weight * hinge / tf.maximum(count, 1.0)
    if sample_weight is not None:
        loss = loss * tf.cast(sample_weight, tf.float32)
    return loss
