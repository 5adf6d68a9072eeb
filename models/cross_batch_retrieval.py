"""Retrieval task with cross-batch, mixed and hard negatives (owns the loss, as a TFRS task does).

Candidates for a batch of B (query, positive item) pairs are:

1. the batch's B items (in-batch negatives);
2. after `warmup_steps`, the M entries of a `CrossBatchMemory` filled from earlier
   batches (CBNS); before that, only the batch (the encoder is still drifting fast
   and stale embeddings would be poor negatives);
3. optionally, items drawn uniformly from the corpus (mixed negative sampling).

Every column is corrected by log Q of its item: q(i) for the batch and bank (both
drawn from the training distribution), or the mixture probability when uniform
items are added (`models.sampled_softmax.mixed_log_q`). A candidate with the
positive's id is masked (accidental hit) wherever it sits. After the loss, the
batch's item embeddings are enqueued into the bank with stop-gradient.

Formula: L = Σ_i w_i · −log softmax(z_i)[i],  z_ij = q_i·c_j/τ − a·log Q(j)  (a = `logq_weight`, 1 by
default).

The loss is computed by `models.sampled_softmax.sampled_softmax_loss` (one softmax and a
hand-written gradient, both item-gradient modes below); with hard negatives, by the
unfused chain (`sampled_softmax_logits` → top-k → cross-entropy).

Two corrections keep the bank from destabilising training (both on by default; the
paper's form is ``item_gradient="all", drift_correction="none"``):

* ``item_gradient="batch"``: queries get the gradient of the softmax over every
  candidate, the batch's items that of the softmax over the fresh candidates only
  (batch and uniform items; the loss value is the full softmax's). In an in-batch
  softmax the item gradients of row i sum to zero (Σ_j p_ij − 1 = 0), so the loss
  never moves the items' mean. With a bank holding a share μ_i of row i's mass, the
  batch's items get Σ_j (p_ij − δ_ij) = −μ_i: every step pulls all items towards the
  mean query, by the bank's share of the mass.
* ``drift_correction="mean"``: the bank stores each embedding minus the mean
  embedding of its batch and is read back plus the current batch's mean (stop-
  gradient): c_bank = c_then − mean(batch_then) + mean(batch_now). The bank's mean
  otherwise lags the fresh items' mean by the encoder's recent drift d; every query's
  gradient (towards its fresh positive, away from the stale bank) then shares d, the
  positives follow their queries, and the drift feeds itself. Only the shared
  component is replaced: the entries' spread around their mean is kept as stored.

Measured on MovieLens-1M with Adam (README, Retrieval negatives): in the paper's form,
with dot-product towers, the scores grew by two orders of magnitude within a few
hundred steps of the warm-up's end while the bank's share of the softmax mass fell far
below its share of the candidates (fresh items outscored their stale copies); with
cosine towers every embedding collapsed onto one direction. Either correction alone
still diverged or collapsed; both together kept the share at the bank's share of the
candidates and the scores at their in-batch scale. `call(..., return_bank_share=True)`
also returns that share, which `TwoTowerModel` logs as ``bank_share``.

References:
  Wang et al., "Cross-Batch Negative Sampling for Training Two-Tower Recommenders",
  SIGIR 2021.
  Yang et al., "Mixed Negative Sampling for Learning Two-tower Neural Networks in
  Recommendations", WWW 2020.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

from models.cosine_contrastive import check_ccl_args, cosine_contrastive_loss
from models.cross_batch_memory import CrossBatchMemory
from models.distribution import cross_replica_sum
from models.sampled_softmax import (MASKED_LOGIT, hard_negative_logits, id_hashes, mixed_log_q,
                                    sampled_softmax_logits, sampled_softmax_loss, softmax_cross_entropy)
from models.tf_compat import keras, tf

DRIFT_CORRECTIONS = ("mean", "none")
ITEM_GRADIENTS = ("batch", "all")
LOSSES = ("softmax", "ccl")
CCL_NEGATIVES = ("all", "uniform")


@keras.utils.register_keras_serializable(package="recfunnel")
class CrossBatchRetrieval(keras.layers.Layer):
    """Sampled-softmax retrieval loss over batch + memory bank + uniform negatives.

    Args:
      embedding_dim: D (sizes the memory bank).
      memory_size: M; 0 gives exactly the in-batch loss.
      warmup_steps: optimizer steps before the bank's entries are used as negatives.
      temperature: logits are divided by it.
      remove_accidental_hits: mask candidates with the positive's id.
      num_hard_negatives: keep only the k highest-scoring negatives per row (0 = all).
      drift_correction: ``mean`` (re-center the bank on the current batch's mean, see
        above) or ``none`` (the bank as stored, as in the CBNS paper).
      item_gradient: ``batch`` (items get the gradient of the softmax over the fresh
        candidates, see above) or ``all`` (of the full softmax, as in the paper).
      loss: ``softmax`` (the sampled softmax above) or ``ccl`` (the cosine contrastive
        loss of SimpleX over the same candidates, `models.cosine_contrastive`: no logQ
        correction, no temperature; `item_gradient` and hard negatives do not apply).
      margin, negative_weight: m and w of the cosine contrastive loss.
      ccl_negatives: which candidates are the cosine contrastive loss's negatives:
        ``all`` (every candidate but the positive and its accidental hits) or
        ``uniform`` (only the items drawn uniformly from the corpus, as in SimpleX: the
        batch's and the bank's items follow the interaction distribution, and a
        pairwise loss without logQ correction pushes popular items down).
      logq_weight: a in z_ij = q_i·c_j/τ − a·log Q(j). 1 is the unbiased correction (the
        sampled softmax estimates the full softmax over the corpus); above 1 the trained
        scores keep a share of popularity, q_i·c_j/τ ≈ log p(j|i) + (a − 1)·log q(j) up to a
        row constant, and below 1 they lose one. Applies when log q is given.

    Call:
      query_embeddings ``[B, D]``, candidate_embeddings ``[B, D]`` (the positives),
      candidate_ids ``[B]`` string or int, candidate_log_q ``[B]`` or None, step
      (scalar int, e.g. ``optimizer.iterations``), extra_negatives ``(embeddings
      [U, D], ids [U], log_q [U], corpus_size)`` or None, sample_weight ``[B]`` or None.
      Returns the scalar loss summed over the batch (as `tfrs.tasks.Retrieval`), and
      with ``return_bank_share=True`` also the mean share of the softmax mass on the
      bank's entries (0 without a bank or before the warm-up's end).
    """

    def __init__(self, embedding_dim: int, memory_size: int = 0, warmup_steps: int = 0, temperature: float = 1.0,
                 remove_accidental_hits: bool = True, num_hard_negatives: int = 0,
                 drift_correction: str = "mean", item_gradient: str = "batch", loss: str = "softmax",
                 margin: float = 0.9, negative_weight: float = 150.0, ccl_negatives: str = "all",
                 logq_weight: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= float(logq_weight) < float("inf"):
            raise ValueError(f"`logq_weight` should be a finite number >= 0. Received: logq_weight={logq_weight}")
        if ccl_negatives not in CCL_NEGATIVES:
            raise ValueError(f"`ccl_negatives` should be one of {CCL_NEGATIVES}. "
                             f"Received: ccl_negatives={ccl_negatives!r}")
        if ccl_negatives == "uniform" and loss != "ccl":
            raise ValueError(f"`ccl_negatives` applies to loss='ccl'. Received: loss={loss!r}, "
                             f"ccl_negatives={ccl_negatives!r}")
        if loss not in LOSSES:
            raise ValueError(f"`loss` should be one of {LOSSES}. Received: loss={loss!r}")
        if loss == "ccl" and num_hard_negatives:
            raise ValueError("`num_hard_negatives` applies to the softmax loss, not to loss='ccl'. "
                             f"Received: num_hard_negatives={num_hard_negatives}")
        check_ccl_args(margin, negative_weight)
        if item_gradient not in ITEM_GRADIENTS:
            raise ValueError(f"`item_gradient` should be one of {ITEM_GRADIENTS}. "
                             f"Received: item_gradient={item_gradient!r}")
        if drift_correction not in DRIFT_CORRECTIONS:
            raise ValueError(f"`drift_correction` should be one of {DRIFT_CORRECTIONS}. "
                             f"Received: drift_correction={drift_correction!r}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"`temperature` should be a finite number > 0. Received: temperature={temperature}")
        for name, value in (("memory_size", memory_size), ("warmup_steps", warmup_steps),
                            ("num_hard_negatives", num_hard_negatives)):
            if int(value) < 0:
                raise ValueError(f"`{name}` should be >= 0. Received: {name}={value}")
        self.embedding_dim = int(embedding_dim)
        self.memory_size = int(memory_size)
        self.warmup_steps = int(warmup_steps)
        self.temperature = float(temperature)
        self.remove_accidental_hits = bool(remove_accidental_hits)
        self.num_hard_negatives = int(num_hard_negatives)
        self.drift_correction = drift_correction
        self.item_gradient = item_gradient
        self.loss = loss
        self.margin = float(margin)
        self.negative_weight = float(negative_weight)
        self.ccl_negatives = ccl_negatives
        self.logq_weight = float(logq_weight)
        self.memory = (CrossBatchMemory(self.memory_size, self.embedding_dim, name="memory")
                       if self.memory_size else None)

    def call(self, query_embeddings, candidate_embeddings, candidate_ids, candidate_log_q=None, step=None,
             extra_negatives: Optional[Tuple] = None, sample_weight=None, training=True,
             return_bank_share=False):
        for name, x in (("query_embeddings", query_embeddings), ("candidate_embeddings", candidate_embeddings)):
            if x.shape[-1] is not None and x.shape[-1] != self.embedding_dim:
                raise ValueError(f"`embedding_dim` should be the size of the towers' embeddings. Received: "
                                 f"embedding_dim={self.embedding_dim}, {name} of size {x.shape[-1]}")
        batch = tf.shape(candidate_embeddings)[0]
        positive_ids = id_hashes(candidate_ids)
        corrected = candidate_log_q is not None
        log_q = tf.zeros([batch], tf.float32) if not corrected else tf.cast(candidate_log_q, tf.float32)
        uniform = None
        if extra_negatives is not None:
            extra_emb, extra_ids, extra_log_q, corpus_size = extra_negatives
            uniform = (extra_emb, id_hashes(extra_ids), tf.cast(extra_log_q, tf.float32), corpus_size)
        bank, center = None, None
        if self.memory is not None:
            bank_emb, bank_log_q, bank_ids, bank_valid = self.memory.read()
            if self.drift_correction == "mean":
                center = _global_mean(tf.stop_gradient(tf.cast(candidate_embeddings, tf.float32)))
                bank_emb = bank_emb + center[tf.newaxis, :]
            in_use = tf.constant(True) if step is None else tf.cast(step, tf.int64) >= self.warmup_steps
            bank = (tf.cast(bank_emb, candidate_embeddings.dtype), bank_log_q, bank_ids,
                    tf.logical_and(bank_valid, in_use))
        args = dict(positive_ids=positive_ids, log_q=log_q, corrected=corrected, sample_weight=sample_weight)
        if self.loss == "ccl":
            loss, share = self._ccl_loss(query_embeddings, candidate_embeddings, bank, uniform, **args)
        elif not self.num_hard_negatives:
            loss, share = self._fused_loss(query_embeddings, candidate_embeddings, bank, uniform, **args)
        elif bank is not None and self.item_gradient == "batch":
            # Queries see every candidate; fresh items get the gradient of the softmax over
            # the fresh candidates only, whose item gradients sum to zero (see above).
            sg_uniform = None if uniform is None else (tf.stop_gradient(uniform[0]),) + uniform[1:]
            query_loss, share = self._loss(query_embeddings, tf.stop_gradient(candidate_embeddings), bank,
                                           sg_uniform, **args)
            item_loss, _ = self._loss(tf.stop_gradient(query_embeddings), candidate_embeddings, None, uniform,
                                      **args)
            loss = query_loss + (item_loss - tf.stop_gradient(item_loss))
        else:
            loss, share = self._loss(query_embeddings, candidate_embeddings, bank, uniform, **args)

        if self.memory is not None and training:
            with tf.control_dependencies([loss]):
                stored = candidate_embeddings if center is None else (
                    tf.cast(candidate_embeddings, tf.float32) - center[tf.newaxis, :])
                self.memory.enqueue(stored, log_q, positive_ids)
        return (loss, share) if return_bank_share else loss

    def _candidates(self, batch_embeddings, bank, uniform, positive_ids, log_q, corrected):
        """Every candidate, fresh ones first: the batch, the uniform items, then the bank.

        Returns ``(embeddings [N, D], ids [N], log Q [N] or None, valid [N], F or None)``:
        log Q is log q(i), or the log mixture probability when uniform items are drawn
        (None without correction and without uniform items), times `logq_weight`; F is the
        number of fresh candidates when there is a bank.
        """
        batch = tf.shape(batch_embeddings)[0]
        embeddings, ids, logqs, valid = [batch_embeddings], [positive_ids], [log_q], [tf.ones([batch], tf.bool)]
        num_unigram = tf.cast(batch, tf.float32)
        if uniform is not None:
            embeddings.append(tf.cast(uniform[0], batch_embeddings.dtype))
            ids.append(uniform[1])
            logqs.append(uniform[2])
            valid.append(tf.ones_like(uniform[1], tf.bool))
        num_fresh = None
        if bank is not None:
            num_fresh = tf.add_n([tf.shape(e)[0] for e in embeddings])
            bank_emb, bank_log_q, bank_ids, bank_valid = bank
            embeddings.append(bank_emb)
            ids.append(bank_ids)
            logqs.append(bank_log_q)
            valid.append(bank_valid)
            num_unigram += tf.reduce_sum(tf.cast(bank_valid, tf.float32))
        all_log_q = tf.concat(logqs, axis=0)
        if uniform is not None:
            # Any candidate could have come from either source: correct by the mixture.
            all_log_q = mixed_log_q(all_log_q, num_unigram, tf.cast(tf.shape(uniform[0])[0], tf.float32), uniform[3])
        elif not corrected:
            all_log_q = None
        if all_log_q is not None and self.logq_weight != 1.0:
            all_log_q = all_log_q * self.logq_weight
        return (tf.concat(embeddings, axis=0), tf.concat(ids, axis=0), all_log_q, tf.concat(valid, axis=0),
                num_fresh)

    def _fused_loss(self, query, batch_embeddings, bank, uniform, *, positive_ids, log_q, corrected,
                    sample_weight):
        """(Σ_i w_i · −log softmax(z_i)[i], bank share) by `sampled_softmax_loss`, both item-gradient modes."""
        candidates, ids, all_log_q, valid, num_fresh = self._candidates(batch_embeddings, bank, uniform,
                                                                        positive_ids, log_q, corrected)
        bias = None if all_log_q is None else -all_log_q
        if bank is not None:
            bias = tf.where(valid, tf.zeros_like(valid, tf.float32) if bias is None else bias, MASKED_LOGIT)
        losses, stale_mass = sampled_softmax_loss(
            query, candidates, positive_ids=positive_ids, candidate_ids=ids, candidate_bias=bias,
            temperature=self.temperature, remove_accidental_hits=self.remove_accidental_hits, num_fresh=num_fresh,
            fresh_item_softmax=bank is not None and self.item_gradient == "batch", sample_weight=sample_weight)
        share = tf.reduce_mean(stale_mass) if bank is not None else tf.zeros([], tf.float32)
        return tf.reduce_sum(losses), share

    def _ccl_loss(self, query, batch_embeddings, bank, uniform, *, positive_ids, log_q, corrected, sample_weight):
        """(Σ_i CCL_i over the batch, the uniform items and the bank, or the uniform items only, 0): no logQ,
        no bank share."""
        uniform_only = self.ccl_negatives == "uniform"
        if uniform_only and uniform is None:
            raise ValueError("ccl_negatives='uniform' needs items drawn uniformly from the corpus: pass "
                             "`extra_negatives`.")
        # With uniform negatives only, the bank's entries are never negatives: skip their [B, M] similarities.
        candidates, ids, _, valid, _ = self._candidates(batch_embeddings, None if uniform_only else bank, uniform,
                                                        positive_ids, log_q, corrected)
        if uniform_only:
            # Candidates are [batch, uniform]: the batch's items are positives only.
            valid = tf.logical_and(valid, tf.range(tf.shape(candidates)[0]) >= tf.shape(batch_embeddings)[0])
        losses = cosine_contrastive_loss(
            query, candidates, positive_ids=positive_ids, candidate_ids=ids, margin=self.margin,
            negative_weight=self.negative_weight, candidate_valid=valid,
            remove_accidental_hits=self.remove_accidental_hits, sample_weight=sample_weight)
        return tf.reduce_sum(losses), tf.zeros([], tf.float32)

    def _loss(self, query, batch_embeddings, bank, uniform, *, positive_ids, log_q, corrected, sample_weight):
        """(Σ_i w_i · −log softmax(z_i)[i], bank share) with the k hardest negatives of each row only
        (`num_hard_negatives`): the unfused chain."""
        candidates, ids, all_log_q, valid, num_fresh = self._candidates(batch_embeddings, bank, uniform,
                                                                        positive_ids, log_q, corrected)
        logits = sampled_softmax_logits(
            query, candidates, positive_ids=positive_ids, candidate_ids=ids, candidate_log_q=all_log_q,
            candidate_valid=valid, temperature=self.temperature, remove_accidental_hits=self.remove_accidental_hits)
        share = tf.zeros([], tf.float32)
        if bank is not None:
            probs = tf.nn.softmax(tf.cast(logits, tf.float32), axis=1)[:, num_fresh:]
            share = tf.reduce_mean(tf.reduce_sum(probs, axis=1))
        logits = hard_negative_logits(logits, self.num_hard_negatives)
        losses = softmax_cross_entropy(logits, tf.zeros([tf.shape(batch_embeddings)[0]], tf.int32))
        if sample_weight is not None:
            losses = losses * tf.cast(sample_weight, losses.dtype)
        return tf.reduce_sum(losses), tf.stop_gradient(share)

    def get_config(self):
        return {**super().get_config(), "embedding_dim": self.embedding_dim, "memory_size": self.memory_size,
                "warmup_steps": self.warmup_steps, "temperature": self.temperature,
                "remove_accidental_hits": self.remove_accidental_hits,
                "num_hard_negatives": self.num_hard_negatives, "drift_correction": self.drift_correction,
                "item_gradient": self.item_gradient, "loss": self.loss, "margin": self.margin,
                "negative_weight": self.negative_weight, "ccl_negatives": self.ccl_negatives,
                "logq_weight": self.logq_weight}


def _global_mean(embeddings: tf.Tensor) -> tf.Tensor:
    """``[D]`` mean over the global batch (all replicas' rows, as the bank sees them)."""
    total = cross_replica_sum(tf.reduce_sum(embeddings, axis=0))
    count = cross_replica_sum(tf.cast(tf.shape(embeddings)[0], tf.float32))
    return total / tf.maximum(count, 1.0)
