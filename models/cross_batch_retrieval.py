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

Formula: L = Σ_i w_i · −log softmax(z_i)[i],  z_ij = q_i·c_j/τ − log Q(j).

References:
  Wang et al., "Cross-Batch Negative Sampling for Training Two-Tower Recommenders",
  SIGIR 2021.
  Yang et al., "Mixed Negative Sampling for Learning Two-tower Neural Networks in
  Recommendations", WWW 2020.
"""

from __future__ import annotations

from typing import Optional, Tuple

from models.cross_batch_memory import CrossBatchMemory
from models.sampled_softmax import (hard_negative_logits, id_hashes, mixed_log_q, sampled_softmax_logits,
                                    softmax_cross_entropy)
from models.tf_compat import keras, tf


class CrossBatchRetrieval(keras.layers.Layer):
    """Sampled-softmax retrieval loss over batch + memory bank + uniform negatives.

    Args:
      embedding_dim: D (sizes the memory bank).
      memory_size: M; 0 gives exactly the in-batch loss.
      warmup_steps: optimizer steps before the bank's entries are used as negatives.
      temperature: logits are divided by it.
      remove_accidental_hits: mask candidates with the positive's id.
      num_hard_negatives: keep only the k highest-scoring negatives per row (0 = all).

    Call:
      query_embeddings ``[B, D]``, candidate_embeddings ``[B, D]`` (the positives),
      candidate_ids ``[B]`` string or int, candidate_log_q ``[B]`` or None, step
      (scalar int, e.g. ``optimizer.iterations``), extra_negatives ``(embeddings
      [U, D], ids [U], log_q [U], corpus_size)`` or None, sample_weight ``[B]`` or None.
      Returns the scalar loss summed over the batch (as `tfrs.tasks.Retrieval`).
    """

    def __init__(self, embedding_dim: int, memory_size: int = 0, warmup_steps: int = 0, temperature: float = 1.0,
                 remove_accidental_hits: bool = True, num_hard_negatives: int = 0, **kwargs):
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ValueError(f"`temperature` should be positive. Received: temperature={temperature}")
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
        self.memory = CrossBatchMemory(self.memory_size, self.embedding_dim, name="memory") if self.memory_size else None

    def call(self, query_embeddings, candidate_embeddings, candidate_ids, candidate_log_q=None, step=None,
             extra_negatives: Optional[Tuple] = None, sample_weight=None, training=True):
        batch = tf.shape(candidate_embeddings)[0]
        positive_ids = id_hashes(candidate_ids)
        log_q = (tf.zeros([batch], tf.float32) if candidate_log_q is None
                 else tf.cast(candidate_log_q, tf.float32))
        candidates, ids, logqs, valid = [candidate_embeddings], [positive_ids], [log_q], [tf.ones([batch], tf.bool)]
        num_unigram = tf.cast(batch, tf.float32)
        if self.memory is not None:
            bank_emb, bank_log_q, bank_ids, bank_valid = self.memory.read()
            in_use = tf.constant(True) if step is None else tf.cast(step, tf.int64) >= self.warmup_steps
            bank_valid = tf.logical_and(bank_valid, in_use)
            candidates.append(tf.cast(bank_emb, candidate_embeddings.dtype))
            ids.append(bank_ids)
            logqs.append(bank_log_q)
            valid.append(bank_valid)
            num_unigram += tf.reduce_sum(tf.cast(bank_valid, tf.float32))
        if extra_negatives is not None:
            extra_emb, extra_ids, extra_log_q, corpus_size = extra_negatives
            num_uniform = tf.cast(tf.shape(extra_emb)[0], tf.float32)
            candidates.append(extra_emb)
            ids.append(id_hashes(extra_ids))
            logqs.append(tf.cast(extra_log_q, tf.float32))
            valid.append(tf.ones(tf.shape(extra_emb)[:1], tf.bool))
        all_log_q = tf.concat(logqs, axis=0)
        if extra_negatives is not None:
            # Any candidate could have come from either source: correct by the mixture.
            all_log_q = mixed_log_q(all_log_q, num_unigram, num_uniform, corpus_size)
        logits = sampled_softmax_logits(
            query_embeddings, tf.concat(candidates, axis=0), positive_ids=positive_ids,
            candidate_ids=tf.concat(ids, axis=0),
            candidate_log_q=all_log_q if (candidate_log_q is not None or extra_negatives is not None) else None,
            candidate_valid=tf.concat(valid, axis=0), temperature=self.temperature,
            remove_accidental_hits=self.remove_accidental_hits)
        if self.num_hard_negatives:
            logits = hard_negative_logits(logits, self.num_hard_negatives)
            losses = softmax_cross_entropy(logits, tf.zeros([batch], tf.int32))
        else:
            losses = softmax_cross_entropy(logits)
        if sample_weight is not None:
            losses = losses * tf.cast(sample_weight, losses.dtype)
        loss = tf.reduce_sum(losses)
        if self.memory is not None and training:
            with tf.control_dependencies([loss]):
                self.memory.enqueue(candidate_embeddings, log_q, positive_ids)
        return loss

    def get_config(self):
        return {**super().get_config(), "embedding_dim": self.embedding_dim, "memory_size": self.memory_size,
                "warmup_steps": self.warmup_steps, "temperature": self.temperature,
                "remove_accidental_hits": self.remove_accidental_hits,
                "num_hard_negatives": self.num_hard_negatives}
