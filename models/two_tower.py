"""The two-tower retrieval model trained with in-batch sampled softmax and logQ correction.

The model only produces embeddings; the task owns the loss (as in TFRS): candidates
are the batch's items, their logits are corrected by log q(i) and accidental hits
(another row with the positive's item id) are removed.

References:
  Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
  Recommendations", RecSys 2019.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import tensorflow_recommenders as tfrs

from models.features import ITEM_ID, Schema, feature_lists
from models.cross_batch_retrieval import CrossBatchRetrieval
from models.distribution import cross_replica_sum
from models.logq import ItemLogQ
from models.ssl import SSL_PREFIX, ItemSelfSupervision
from models.tf_compat import keras, tf
from models.towers import SharedItemEmbedding, Tower


@keras.utils.register_keras_serializable(package="recfunnel")
class TwoTowerModel(tfrs.Model):
    """Query tower + item tower + retrieval task.

    Args:
      schema: the feature schema.
      vocabularies: vocabulary name → tokens.
      item_log_q: an `ItemLogQ` table, or None to train without logQ correction.
      embedding_dim, feature_dim, hidden_units, normalize, dropout, history_pooling: tower
        settings (`models.towers.Tower`).
      temperature: logits are divided by it (useful with normalized embeddings).
      remove_accidental_hits: mask in-batch candidates equal to the positive item.
      task: the loss layer: `tfrs.tasks.Retrieval` (default, in-batch negatives) or a
        `CrossBatchRetrieval` (memory bank, hard and mixed negatives).
      corpus: item features of the whole corpus (padded, `Schema.tensor_specs("item")`
        layout) to draw `num_mixed_negatives` uniform negatives from each step.
      num_mixed_negatives: uniform corpus negatives per step (needs a
        `CrossBatchRetrieval` task and `corpus`).
      ssl: an `ItemSelfSupervision` auxiliary task on the item tower, or None. Its
        items are the batch's ``ssl/<feature>`` entries when present (a separate
        stream, `models.ssl.with_ssl_items`), else the batch's own items.
      ssl_weight: α in L = L_main + α·L_self.
      embedding_l2: λ of an L2 penalty λ·Σ‖E‖² over every embedding table E of both
        towers (the shared item table once), added to the loss, which is summed over the
        batch; 0 adds nothing. Its gradient touches every row of every table each step.
      query_dropout: dropout rate on the query tower's output (after normalization) in
        training only, as SimpleX (Mao et al., CIKM'21) regularizes its user vector; the
        item embeddings and serving are untouched.

    Training logs show ``loss`` (the last step's total loss, as `tfrs.Model` reports
    it), ``main_loss`` (the retrieval loss summed over the global batch, averaged over
    the epoch's steps) and, with `ssl`, ``ssl_loss`` (the unweighted contrastive loss per
    item pair, averaged over the epoch). With a cross-batch memory bank, ``bank_share``
    is the share of the softmax mass on the bank's entries, averaged over the epoch's
    steps after the warm-up: near M/(B+M) when stale entries compete like fresh ones,
    near 0 when the encoder has learned to tell its fresh embeddings from stale ones.
    These trackers hold global values (summed over the replicas in sync), so the model
    logs the first replica's (``distribute_reduction_method = "first"``) where Keras
    would otherwise sum them over the replicas.
    """

    def __init__(self, schema: Schema, vocabularies: Mapping[str, Sequence[str]],
                 item_log_q: Optional[ItemLogQ] = None, embedding_dim: int = 64, feature_dim: int = 32,
                 hidden_units: Sequence[int] = (128,), normalize: bool = False, temperature: float = 1.0,
                 remove_accidental_hits: bool = True, dropout: float = 0.0,
                 numeric_stats=None, task: Optional[keras.layers.Layer] = None,
                 corpus: Optional[Mapping[str, object]] = None, num_mixed_negatives: int = 0,
                 ssl: Optional[ItemSelfSupervision] = None, ssl_weight: float = 0.0,
                 history_pooling: str = "mean", embedding_l2: float = 0.0, query_dropout: float = 0.0):
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"`temperature` should be a finite number > 0. Received: temperature={temperature}")
        if not (math.isfinite(embedding_l2) and embedding_l2 >= 0):
            raise ValueError(f"`embedding_l2` should be a finite number >= 0. Received: embedding_l2={embedding_l2}")
        self.embedding_l2 = float(embedding_l2)
        if not 0 <= query_dropout < 1:
            raise ValueError(f"`query_dropout` should be in [0, 1). Received: query_dropout={query_dropout}")
        self.query_dropout = float(query_dropout)
        self.query_dropout_layer = keras.layers.Dropout(self.query_dropout, name="query_dropout")
        self.schema = schema
        shared = SharedItemEmbedding(vocabularies[ITEM_ID], feature_dim)
        common = dict(vocabularies=vocabularies, feature_dim=feature_dim, hidden_units=hidden_units,
                      output_dim=embedding_dim, normalize=normalize, numeric_stats=numeric_stats,
                      shared_item_embedding=shared, dropout=dropout, history_pooling=history_pooling)
        self.query_tower = Tower(schema, "user", name="query_tower", **common)
        self.item_tower = Tower(schema, "item", name="item_tower", **common)
        self.item_log_q = item_log_q
        self.temperature = float(temperature)
        self.remove_accidental_hits = bool(remove_accidental_hits)
        # The default task is described by `temperature` and `remove_accidental_hits` in the config.
        self._default_task = task is None
        self.task = task if task is not None else tfrs.tasks.Retrieval(
            temperature=self.temperature, remove_accidental_hits=self.remove_accidental_hits)
        if int(num_mixed_negatives) < 0:
            raise ValueError("`num_mixed_negatives` should be >= 0. "
                             f"Received: num_mixed_negatives={num_mixed_negatives}")
        self.num_mixed_negatives = int(num_mixed_negatives)
        if self.num_mixed_negatives:
            if not isinstance(self.task, CrossBatchRetrieval):
                raise ValueError("`num_mixed_negatives` needs a CrossBatchRetrieval task")
            if corpus is None:
                raise ValueError("`num_mixed_negatives` needs the item `corpus` to sample from")
        self.corpus = {k: tf.constant(v) for k, v in corpus.items()} if corpus is not None else None
        if not (math.isfinite(ssl_weight) and ssl_weight >= 0):
            raise ValueError(f"`ssl_weight` should be a finite number >= 0. Received: ssl_weight={ssl_weight}")
        self.ssl = ssl
        self.ssl_weight = float(ssl_weight)
        self.main_loss_tracker = keras.metrics.Mean(name="main_loss")
        # The trackers already hold global values: log them once, not summed over replicas.
        self.distribute_reduction_method = "first"
        if ssl is not None:
            self.ssl_loss_tracker = keras.metrics.Mean(name="ssl_loss")
        # The bank's share of the softmax mass (the cosine contrastive loss has no softmax).
        self._has_bank = (isinstance(self.task, CrossBatchRetrieval) and self.task.memory is not None
                          and self.task.loss == "softmax")
        if self._has_bank:
            self.bank_share_tracker = keras.metrics.Mean(name="bank_share")

    def compute_loss(self, features, training=False):
        # The trackers see global values (summed over replicas), so every replica logs
        # the same numbers as one replica training on the global batch would.
        loss = self._main_loss(features, training)
        self.main_loss_tracker.update_state(cross_replica_sum(tf.stop_gradient(loss)))
        if self.embedding_l2 and training:
            loss += self.embedding_penalty()
        if self.ssl is None:
            return loss
        prefixed = SSL_PREFIX + ITEM_ID in features
        items = {f.name: features[(SSL_PREFIX + f.name) if prefixed else f.name] for f in self.schema.item_features}
        self_loss = self.ssl(self.item_tower, items, training=training, item_ids=items[ITEM_ID])
        pairs = cross_replica_sum(tf.cast(tf.shape(items[ITEM_ID])[0], self_loss.dtype))
        self.ssl_loss_tracker.update_state(cross_replica_sum(tf.stop_gradient(self_loss)) / pairs)
        return loss + self.ssl_weight * self_loss

    def embedding_penalty(self) -> tf.Tensor:
        """λ·Σ‖E‖² over the embedding tables, as this replica's share: the replicas' gradients
        are summed, so each adds 1/R of it."""
        tables = {id(v): v for tower in (self.query_tower, self.item_tower) for v in tower.embedding_tables()}
        total = tf.add_n([tf.reduce_sum(tf.square(v)) for v in tables.values()])
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        return self.embedding_l2 * total / replicas

    def _main_loss(self, features, training):
        user = {f.name: features[f.name] for f in self.schema.user_features}
        item = {f.name: features[f.name] for f in self.schema.item_features}
        query_embeddings = self.query_tower(user, training=training)
        if self.query_dropout and training:
            query_embeddings = self.query_dropout_layer(query_embeddings, training=True)
        candidate_embeddings = self.item_tower(item, training=training)
        item_ids = features[ITEM_ID]
        if isinstance(self.task, CrossBatchRetrieval):
            log_q = self.item_log_q(item_ids) if self.item_log_q is not None else None
            extra = None
            if self.num_mixed_negatives:
                extra = self._uniform_negatives(training)
            optimizer = getattr(self, "optimizer", None)
            step = optimizer.iterations if optimizer is not None else None
            loss, share = self.task(query_embeddings, candidate_embeddings, item_ids, log_q, step=step,
                                    extra_negatives=extra, training=training, return_bank_share=True)
            if self._has_bank:
                in_use = 1.0 if step is None else tf.cast(step >= self.task.warmup_steps, tf.float32)
                rows = tf.cast(tf.shape(query_embeddings)[0], tf.float32)
                share = cross_replica_sum(share * rows) / cross_replica_sum(rows)
                self.bank_share_tracker.update_state(share, sample_weight=in_use)
            return loss
        kwargs = {}
        if self.item_log_q is not None:
            kwargs["candidate_sampling_probability"] = tf.exp(self.item_log_q(item_ids))
        if self.remove_accidental_hits:
            kwargs["candidate_ids"] = item_ids
        return self.task(query_embeddings, candidate_embeddings, compute_metrics=False,
                         compute_batch_metrics=False, **kwargs)

    def get_config(self):
        task = None if self._default_task else self.task
        if isinstance(task, tfrs.tasks.Retrieval):
            raise ValueError("A `tfrs.tasks.Retrieval` task passed in cannot be described by a config (it has "
                             "none); leave `task` out for the default one, or pass a serializable layer such as "
                             f"CrossBatchRetrieval. Received: task={task!r}")
        tower = self.item_tower

        def layer(value):
            return None if value is None else keras.layers.serialize(value)

        return {"schema": self.schema.to_dict(),
                "vocabularies": {k: list(v) for k, v in tower.vocabularies.items()},
                "item_log_q": layer(self.item_log_q), "embedding_dim": tower.output_dim,
                "feature_dim": tower.feature_dim, "hidden_units": list(tower.hidden_units),
                "normalize": tower.normalize, "temperature": self.temperature,
                "remove_accidental_hits": self.remove_accidental_hits, "dropout": tower.dropout,
                "numeric_stats": {k: list(v) for k, v in tower.numeric_stats.items()}, "task": layer(task),
                "corpus": None if self.corpus is None else feature_lists(self.corpus),
                "num_mixed_negatives": self.num_mixed_negatives, "ssl": layer(self.ssl),
                "ssl_weight": self.ssl_weight, "history_pooling": tower.history_pooling,
                "embedding_l2": self.embedding_l2, "query_dropout": self.query_dropout}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["schema"] = Schema.from_dict(config["schema"])
        for name in ("item_log_q", "task", "ssl"):
            if config.get(name) is not None:
                config[name] = keras.layers.deserialize(config[name])
        return cls(**config)

    def _uniform_negatives(self, training):
        """Item embeddings, ids and log q of items drawn uniformly from the corpus."""
        size = tf.shape(self.corpus[ITEM_ID])[0]
        idx = tf.random.uniform([self.num_mixed_negatives], 0, size, dtype=tf.int32)
        feats = {f.name: tf.gather(self.corpus[f.name], idx) for f in self.schema.item_features}
        emb = self.item_tower(feats, training=training)
        ids = feats[ITEM_ID]
        log_q = self.item_log_q(ids) if self.item_log_q is not None else tf.zeros([self.num_mixed_negatives])
        return emb, ids, log_q, size
