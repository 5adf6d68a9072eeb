"""The FIFO memory bank of Cross-Batch Negative Sampling.

The bank keeps the item embeddings (with stop-gradient), their log q and their id
fingerprints from the most recent batches, M entries at most; the oldest are
overwritten first. It lives in non-trainable variables, so it is saved and restored
with the model's checkpoints (a resumed run continues with the same bank).

Under a `tf.distribute` strategy every replica all-gathers the global batch before
writing, so all replicas hold the same bank, in the same order as single-replica
training on the concatenated global batch (replica 0's rows first).

References:
  Wang et al., "Cross-Batch Negative Sampling for Training Two-Tower Recommenders",
  SIGIR 2021.
"""

from __future__ import annotations

from models.tf_compat import keras, tf


@keras.utils.register_keras_serializable(package="recfunnel")
class CrossBatchMemory(keras.layers.Layer):
    """A FIFO bank of ``memory_size`` (embedding, log q, id fingerprint) entries.

    Args:
      memory_size: M, the number of entries (>= 1).
      embedding_dim: D, the embedding size.

    `read()` returns ``embeddings [M, D]``, ``log_q [M]``, ``ids [M]`` (int64) and
    ``valid [M]`` (bool; False for slots never written). `enqueue(embeddings, log_q,
    ids)` appends a batch, overwriting the oldest entries.
    """

    def __init__(self, memory_size: int, embedding_dim: int, **kwargs):
        super().__init__(**kwargs)
        if int(memory_size) < 1:
            raise ValueError(f"`memory_size` should be positive. Received: memory_size={memory_size}")
        if int(embedding_dim) < 1:
            raise ValueError(f"`embedding_dim` should be positive. Received: embedding_dim={embedding_dim}")
        self.memory_size = int(memory_size)
        self.embedding_dim = int(embedding_dim)
        common = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_WRITE,
                      aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.embeddings = self.add_weight(name="embeddings", shape=(self.memory_size, self.embedding_dim),
                                          initializer="zeros", dtype=tf.float32, **common)
        self.log_q = self.add_weight(name="log_q", shape=(self.memory_size,), initializer="zeros",
                                     dtype=tf.float32, **common)
        self.ids = self.add_weight(name="ids", shape=(self.memory_size,), initializer="zeros", dtype=tf.int64,
                                   **common)
        self.count = self.add_weight(name="count", shape=(), initializer="zeros", dtype=tf.int64, **common)
        self.pointer = self.add_weight(name="pointer", shape=(), initializer="zeros", dtype=tf.int64, **common)
        self.built = True

    def read(self):
        valid = tf.range(self.memory_size, dtype=tf.int64) < self.count
        return (tf.stop_gradient(self.embeddings.read_value()), self.log_q.read_value(),
                self.ids.read_value(), valid)

    def enqueue(self, embeddings: tf.Tensor, log_q: tf.Tensor, ids: tf.Tensor) -> None:
        """Appends a batch (``[B, D]``, ``[B]``, ``[B]`` int64), oldest entries dropped first."""
        embeddings = tf.stop_gradient(tf.cast(embeddings, tf.float32))
        log_q = tf.cast(log_q, tf.float32)
        ids = tf.cast(ids, tf.int64)
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and ctx.num_replicas_in_sync > 1:
            embeddings = ctx.all_gather(embeddings, axis=0)
            log_q = ctx.all_gather(log_q, axis=0)
            ids = ctx.all_gather(ids, axis=0)
        m = self.memory_size
        # A batch larger than the bank keeps only its newest M rows.
        embeddings, log_q, ids = embeddings[-m:], log_q[-m:], ids[-m:]
        n = tf.shape(ids, out_type=tf.int64)[0]
        slots = (self.pointer + tf.range(n, dtype=tf.int64)) % m
        slots = slots[:, tf.newaxis]
        self.embeddings.assign(tf.tensor_scatter_nd_update(self.embeddings, slots, embeddings))
        self.log_q.assign(tf.tensor_scatter_nd_update(self.log_q, slots, log_q))
        self.ids.assign(tf.tensor_scatter_nd_update(self.ids, slots, ids))
        self.pointer.assign((self.pointer + n) % m)
        self.count.assign(tf.minimum(self.count + n, m))

    def get_config(self):
        return {**super().get_config(), "memory_size": self.memory_size, "embedding_dim": self.embedding_dim}
