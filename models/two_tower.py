"""The two-tower retrieval model trained with in-batch sampled softmax and logQ correction.

The model only produces embeddings; the task owns the loss (as in TFRS): candidates
are the batch's items, their logits are corrected by log q(i) and accidental hits
(another row with the positive's item id) are removed.

References:
  Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
  Recommendations", RecSys 2019.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import tensorflow_recommenders as tfrs

from models.features import ITEM_ID, Schema
from models.logq import ItemLogQ
from models.tf_compat import keras, tf
from models.towers import SharedItemEmbedding, Tower


class TwoTowerModel(tfrs.Model):
    """Query tower + item tower + retrieval task.

    Args:
      schema: the feature schema.
      vocabularies: vocabulary name → tokens.
      item_log_q: an `ItemLogQ` table, or None to train without logQ correction.
      embedding_dim, feature_dim, hidden_units, normalize, dropout: tower settings.
      temperature: logits are divided by it (useful with normalized embeddings).
      remove_accidental_hits: mask in-batch candidates equal to the positive item.
      task: a loss layer with the `tfrs.tasks.Retrieval` call signature; defaults to
        `tfrs.tasks.Retrieval`.
    """

    def __init__(self, schema: Schema, vocabularies: Mapping[str, Sequence[str]],
                 item_log_q: Optional[ItemLogQ] = None, embedding_dim: int = 64, feature_dim: int = 32,
                 hidden_units: Sequence[int] = (128,), normalize: bool = False, temperature: float = 1.0,
                 remove_accidental_hits: bool = True, dropout: float = 0.0,
                 numeric_stats=None, task: Optional[keras.layers.Layer] = None):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"`temperature` should be positive. Received: temperature={temperature}")
        self.schema = schema
        shared = SharedItemEmbedding(vocabularies[ITEM_ID], feature_dim)
        common = dict(vocabularies=vocabularies, feature_dim=feature_dim, hidden_units=hidden_units,
                      output_dim=embedding_dim, normalize=normalize, numeric_stats=numeric_stats,
                      shared_item_embedding=shared, dropout=dropout)
        self.query_tower = Tower(schema, "user", name="query_tower", **common)
        self.item_tower = Tower(schema, "item", name="item_tower", **common)
        self.item_log_q = item_log_q
        self.temperature = float(temperature)
        self.remove_accidental_hits = bool(remove_accidental_hits)
        self.task = task if task is not None else tfrs.tasks.Retrieval(temperature=self.temperature)

    def compute_loss(self, features, training=False):
        user = {f.name: features[f.name] for f in self.schema.user_features}
        item = {f.name: features[f.name] for f in self.schema.item_features}
        query_embeddings = self.query_tower(user, training=training)
        candidate_embeddings = self.item_tower(item, training=training)
        item_ids = features[ITEM_ID]
        kwargs = {}
        if self.item_log_q is not None:
            kwargs["candidate_sampling_probability"] = tf.exp(self.item_log_q(item_ids))
        if self.remove_accidental_hits:
            kwargs["candidate_ids"] = item_ids
        return self.task(query_embeddings, candidate_embeddings, compute_metrics=False,
                         compute_batch_metrics=False, **kwargs)
