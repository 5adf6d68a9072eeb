"""The sampled-softmax logits chain of the retrieval task (pure TF functions).

Candidates are the batch's items (row i's positive is column i) followed by any
extra rows: a cross-batch memory bank, uniformly sampled corpus items. The logits are
built in small steps, as in TFRS:

    scores → ÷ temperature → − log q (sampling-bias correction) → accidental hits
    removed → invalid extra rows removed → optional top-k hard negatives → softmax
    cross-entropy against the diagonal.

Formula: loss_i = −log softmax(z_i)[i],  z_ij = q_i·c_j / τ − log Q(j)  (masked
entries get a very negative logit).

References:
  Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
  Recommendations", RecSys 2019 (logQ correction).
  Wang et al., "Cross-Batch Negative Sampling for Training Two-Tower Recommenders",
  SIGIR 2021 (memory-bank candidates).
  Yang et al., "Mixed Negative Sampling for Learning Two-tower Neural Networks in
  Recommendations", WWW 2020 (batch + uniform candidates).
"""

from __future__ import annotations

import math
from typing import Optional

from models.tf_compat import tf

# Large but finite, so masked logits never produce NaN in the softmax gradient.
MASKED_LOGIT = -1e9


def id_hashes(ids: tf.Tensor) -> tf.Tensor:
    """int64 fingerprints of string ids (used to detect accidental hits cheaply)."""
    if ids.dtype == tf.string:
        return tf.strings.to_hash_bucket_fast(ids, 2 ** 62)
    return tf.cast(ids, tf.int64)


def mixed_log_q(log_q: tf.Tensor, num_unigram, num_uniform, corpus_size) -> tf.Tensor:
    """log of the per-draw probability of each candidate when candidates are a mix.

    `num_unigram` draws come from the training distribution q(i) (the batch and a
    bank filled from past batches), `num_uniform` from the uniform distribution over
    `corpus_size` items. Any candidate could have come from either source, so every
    column is corrected by the mixture probability:

    Formula: Q(i) = (n_u·q(i) + n_v/N) / (n_u + n_v).
    """
    n_u = tf.cast(num_unigram, tf.float32)
    n_v = tf.cast(num_uniform, tf.float32)
    total = n_u + n_v
    unigram = tf.math.log(n_u / total) + tf.cast(log_q, tf.float32)
    uniform = tf.math.log(n_v / tf.cast(corpus_size, tf.float32) / total)
    return tf.reduce_logsumexp(tf.stack([unigram, tf.fill(tf.shape(unigram), uniform)]), axis=0)


def accidental_hits(positive_ids: tf.Tensor, candidate_ids: tf.Tensor) -> tf.Tensor:
    """``[B, N]`` bool: candidate j carries row i's positive id but is not the positive
    itself (column i); the batch's positives are the first B candidates."""
    same = tf.equal(positive_ids[:, tf.newaxis], candidate_ids[tf.newaxis, :])
    return tf.linalg.set_diag(same, tf.zeros(tf.shape(positive_ids), tf.bool))


def sampled_softmax_logits(query: tf.Tensor, candidates: tf.Tensor, *, positive_ids: tf.Tensor,
                           candidate_ids: tf.Tensor, candidate_log_q: Optional[tf.Tensor] = None,
                           candidate_valid: Optional[tf.Tensor] = None, temperature: float = 1.0,
                           remove_accidental_hits: bool = True) -> tf.Tensor:
    """Corrected, masked logits ``[B, N]``; row i's positive is column i.

    Args:
      query: ``[B, D]`` query embeddings.
      candidates: ``[N, D]`` candidate embeddings, N >= B; the first B are the batch's
        positives.
      positive_ids: ``[B]`` int64 id fingerprints of the positives.
      candidate_ids: ``[N]`` int64 id fingerprints of the candidates.
      candidate_log_q: ``[N]`` log sampling probability of each candidate, or None.
      candidate_valid: ``[N]`` bool, False for empty memory slots, or None.
      temperature: positive; scores are divided by it.
      remove_accidental_hits: mask candidates with the positive's id other than the
        positive itself.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"`temperature` should be a finite number > 0. Received: temperature={temperature}")
    logits = tf.matmul(query, candidates, transpose_b=True) / temperature
    if candidate_log_q is not None:
        logits = logits - tf.cast(candidate_log_q, logits.dtype)[tf.newaxis, :]
    masked = (accidental_hits(positive_ids, candidate_ids) if remove_accidental_hits
              else tf.zeros(tf.shape(logits), tf.bool))
    if candidate_valid is not None:
        masked = tf.logical_or(masked, tf.logical_not(candidate_valid)[tf.newaxis, :])
    return tf.where(masked, tf.cast(MASKED_LOGIT, logits.dtype), logits)


def sampled_softmax_loss(query: tf.Tensor, candidates: tf.Tensor, *, positive_ids: tf.Tensor,
                         candidate_ids: tf.Tensor, candidate_bias: Optional[tf.Tensor] = None,
                         temperature: float = 1.0, remove_accidental_hits: bool = True,
                         num_fresh=None, fresh_item_softmax: bool = False,
                         sample_weight: Optional[tf.Tensor] = None):
    """Per-row sampled-softmax loss ``[B]`` and each row's mass on the stale columns, fused.

    The loss of `sampled_softmax_logits` followed by `softmax_cross_entropy`, with a
    hand-written gradient, so that the ``[B, N]`` logits are traversed a few times
    instead of a dozen (on CPU the step is bound by passes over that matrix, not by
    the matmul): 1/τ is applied to the queries, the bias rides on an extra column of
    the matmul, the loss comes from one softmax, and the gradient goes straight to the
    queries and candidates. `tests/models/test_cross_batch.py` checks values and
    gradients against automatic differentiation of the unfused chain.

    Args:
      query: ``[B, D]``.
      candidates: ``[N, D]``: the batch's B positives first, then any other fresh
        candidates (e.g. uniformly sampled items), then the stale ones (a memory bank).
      positive_ids, candidate_ids: ``[B]``, ``[N]`` int64 id fingerprints.
      candidate_bias: ``[N]`` added to every row's logits: −log Q(j), and
        `MASKED_LOGIT` for candidates to ignore (empty bank slots); None for 0.
      temperature: positive; scores q·c are divided by it.
      remove_accidental_hits: mask candidates with the positive's id other than the
        positive itself.
      num_fresh: F, the number of leading candidates that are fresh; the others are
        constants (no gradient) and their softmax mass is returned. None means N.
      fresh_item_softmax: the fresh candidates get the gradient of the softmax over
        the fresh columns only (``item_gradient="batch"``) instead of the full
        softmax's (the same when every candidate is fresh). The queries always get the
        full softmax's.
      sample_weight: ``[B]`` row weights, or None.

    Returns:
      ``(loss [B], stale_mass [B])``: w_i·(logsumexp_j z_ij − z_ii) with
      z_ij = q_i·c_j/τ + bias_j (masked entries excluded), and Σ_{j≥F} softmax(z_i)_j
      (a statistic: not differentiated).
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"`temperature` should be a finite number > 0. Received: temperature={temperature}")
    query = tf.cast(query, tf.float32)
    candidates = tf.cast(candidates, tf.float32)
    batch = tf.shape(query)[0]
    num = tf.shape(candidates)[0]
    fresh = num if num_fresh is None else num_fresh
    fresh_item_softmax = fresh_item_softmax and num_fresh is not None
    bias = tf.zeros([num], tf.float32) if candidate_bias is None else tf.cast(candidate_bias, tf.float32)
    weights = tf.ones([batch], tf.float32) if sample_weight is None else tf.cast(sample_weight, tf.float32)
    hits = accidental_hits(positive_ids, candidate_ids) if remove_accidental_hits else None

    @tf.custom_gradient
    def fused(q, c):
        scaled = q / temperature
        # z = [q/τ, 1] · [c, bias]ᵀ: the bias rides on the matmul, not on a pass over [B, N].
        logits = tf.matmul(tf.concat([scaled, tf.ones([batch, 1])], axis=1),
                           tf.concat([c, bias[:, tf.newaxis]], axis=1), transpose_b=True)
        if hits is not None:
            logits = tf.where(hits, tf.constant(MASKED_LOGIT, tf.float32), logits)
        probs = tf.nn.softmax(logits, axis=1)
        # log Σ_j e^{z_ij} = max_j z_ij − log max_j p_ij (max p ≥ 1/N: no underflow).
        lse = tf.reduce_max(logits, axis=1) - tf.math.log(tf.reduce_max(probs, axis=1))
        positive = tf.reduce_sum(scaled * c[:batch], axis=1) + bias[:batch]
        loss = weights * (lse - positive)
        stale_mass = tf.zeros([batch], tf.float32)
        fresh_mass = None
        if num_fresh is not None:
            fresh_mass = tf.reduce_sum(probs[:, :fresh], axis=1)
            stale_mass = 1.0 - fresh_mass

        def grad(d_loss, d_stale_mass):
            del d_stale_mass
            w = (weights * d_loss)[:, tf.newaxis]
            weighted = probs * w                                # ∂L/∂z_ij = w_i (p_ij − δ_ij)
            d_scaled = tf.matmul(weighted, c) - w * c[:batch]
            if fresh_item_softmax:
                # softmax over the fresh columns = p / (their mass), unless that mass underflowed.
                item_weights = tf.cond(
                    tf.reduce_min(fresh_mass) > 1e-30,
                    lambda: probs[:, :fresh] * (w / fresh_mass[:, tf.newaxis]),
                    lambda: tf.nn.softmax(logits[:, :fresh], axis=1) * w)
            else:
                item_weights = weighted if num_fresh is None else weighted[:, :fresh]
            d_fresh = tf.matmul(item_weights, scaled, transpose_a=True)
            d_c = d_fresh - tf.pad(w * scaled, [[0, fresh - batch], [0, 0]])
            if num_fresh is not None:
                d_c = tf.pad(d_c, [[0, num - fresh], [0, 0]])
            return d_scaled / temperature, d_c

        return (loss, tf.stop_gradient(stale_mass)), grad

    return fused(query, candidates)


def hard_negative_logits(logits: tf.Tensor, num_hard_negatives: int) -> tf.Tensor:
    """``[B, 1 + k]``: the positive (column 0) and the k highest-scoring negatives of each row."""
    batch = tf.shape(logits)[0]
    positive = tf.linalg.diag_part(logits[:, :batch])
    negatives = tf.where(tf.equal(tf.range(batch)[:, tf.newaxis], tf.range(tf.shape(logits)[1])[tf.newaxis, :]),
                         tf.cast(MASKED_LOGIT, logits.dtype), logits)
    k = tf.minimum(num_hard_negatives, tf.shape(logits)[1] - 1)
    top, _ = tf.math.top_k(negatives, k=k)
    return tf.concat([positive[:, tf.newaxis], top], axis=1)


def softmax_cross_entropy(logits: tf.Tensor, positive_column: Optional[tf.Tensor] = None) -> tf.Tensor:
    """Per-row loss ``[B]``; the positive is column i of row i (or `positive_column`)."""
    batch = tf.shape(logits)[0]
    labels = tf.range(batch) if positive_column is None else positive_column
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
