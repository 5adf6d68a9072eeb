"""The derived pre-ranker: selected feature blocks → ReLU MLP → click logit, and its export.

The same class serves the AutoFAS result (features and layer widths from the search)
and hand-designed MLP baselines. For N candidates of one user the user features are
embedded once and broadcast (`FeatureEmbedding.candidate_blocks`).

Serving: `export_preranker(model, path)` writes a SavedModel whose ``serving_default``
signature has the shape of `models.ranking.export_ranker`'s — so the serving cascade
calls pre-ranker and ranker the same way — but takes only the *selected* features:
user features ``[1]`` / ``[1, L]`` / ``[1]`` float32, item features ``[N]`` / ``[N, L]``
/ ``[N]``; outputs ``{"scores": [N] click probabilities, "logits": [N]}``. Features the
search dropped are not inputs, so they are never fetched. Like the rankers' exports it
also has ``score_users``, ``encode_items`` and ``score_users_encoded`` (`models.signatures`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

from models.features import Schema
from models.preranking.embedding import FeatureEmbedding
from models.ranking.models import (candidate_scoring_function, multi_user_scoring_function, scoring_signatures,
                                   to_encoded)
from models.tf_compat import keras, tf


@keras.utils.register_keras_serializable(package="recfunnel")
class PreRanker(keras.Model):
    """Embeddings of `features` → ReLU layers `hidden_units` → logit.

    Args:
      schema: a `Schema` or its dict.
      vocabularies: vocabulary name → tokens.
      features: the input features (at least one item feature).
      hidden_units: the ReLU layers (may be empty: a linear model).
      embedding_dim: width of the categorical blocks.
      numeric_stats: feature → (mean, std).

    Call: ``model(features)`` (every selected feature, ``[B]`` / ``[B, L]``) → logits ``[B]``.
    """

    def __init__(self, schema, vocabularies: Mapping[str, Sequence[str]], features: Sequence[str],
                 hidden_units: Sequence[int] = (64, 32), embedding_dim: int = 8,
                 numeric_stats: Optional[Mapping[str, Sequence[float]]] = None, **kwargs):
        super().__init__(**kwargs)
        self.embedding = FeatureEmbedding(schema, vocabularies, features, embedding_dim, numeric_stats,
                                          name="features")
        self.schema: Schema = self.embedding.schema
        self.features = list(self.embedding.features)
        if not any(self.schema.feature(n).side == "item" for n in self.features):
            raise ValueError(f"`features` should hold at least one item feature. Received: features={self.features}")
        self.hidden_units = [int(u) for u in hidden_units]
        if any(u < 1 for u in self.hidden_units):
            raise ValueError(f"`hidden_units` should hold positive widths. Received: hidden_units={self.hidden_units}")
        self.mlp = keras.Sequential([keras.layers.Dense(u, activation="relu") for u in self.hidden_units]
                                    + [keras.layers.Dense(1, name="logit")], name="mlp")

    @property
    def input_width(self) -> int:
        return int(sum(self.embedding.widths))

    def call(self, inputs, training=False):
        return tf.squeeze(self.mlp(tf.concat(self.embedding(inputs), axis=-1), training=training), axis=-1)

    def encode_items(self, item_features: Mapping[str, Any]) -> Dict[str, tf.Tensor]:
        """The selected item features → vocabulary ids (int32) / standardized numeric values,
        the form `candidate_logits(..., items_encoded=True)` takes."""
        out = {}
        for name in self.features:
            if self.schema.feature(name).side == "item":
                out[name] = to_encoded(self.embedding.encode_one(name, item_features[name]))
        return out

    def candidate_logits(self, user_features: Mapping[str, Any], item_features: Mapping[str, Any],
                         user_index=None, items_encoded: bool = False) -> tf.Tensor:
        """Logits ``[N]`` of N candidates for one user (user tensors with batch 1 or N), or
        with `user_index` ``[N]`` for several users (user tensors with U rows); with
        `items_encoded`, `item_features` come from `encode_items`."""
        if not self.mlp.built:
            blocks = self.embedding.candidate_blocks(user_features, item_features, user_index, items_encoded)
            return tf.squeeze(self.mlp(tf.concat(blocks, axis=-1), training=False), axis=-1)
        # The first layer splits into a user part, computed once per user, and an item part:
        # x·W = x_user·W[user rows] + x_item·W[item rows] (the same logits, fewer products).
        user_blocks, item_blocks = self.embedding.side_blocks(user_features, item_features, items_encoded)
        first, rest = self.mlp.layers[0], self.mlp.layers[1:]
        rows = self._first_layer_rows()
        h = tf.matmul(tf.concat(item_blocks, axis=-1), tf.gather(first.kernel, rows["item"]))
        if user_blocks:
            per_user = tf.matmul(tf.concat(user_blocks, axis=-1), tf.gather(first.kernel, rows["user"]))
            if user_index is not None:
                per_user = tf.gather(per_user, user_index)
            h = h + per_user  # a user batch of 1 broadcasts
        h = first.activation(tf.nn.bias_add(h, first.bias))
        for layer in rest:
            h = layer(h, training=False)
        return tf.squeeze(h, axis=-1)

    def _first_layer_rows(self) -> Dict[str, List[int]]:
        """Rows of the first layer's kernel fed by the user blocks and by the item blocks."""
        rows: Dict[str, List[int]] = {"user": [], "item": []}
        start = 0
        for name, width in zip(self.features, self.embedding.widths):
            rows[self.schema.feature(name).side].extend(range(start, start + width))
            start += width
        return rows

    def tensor_specs(self):
        """``(user specs, item specs)`` of the selected features."""
        user = {k: v for k, v in self.schema.tensor_specs("user").items() if k in self.features}
        item = {k: v for k, v in self.schema.tensor_specs("item").items() if k in self.features}
        return user, item

    def serving_function(self):
        """Concrete function of the ``serving_default`` signature (module docstring)."""
        return candidate_scoring_function(self, *self.tensor_specs())

    def multi_user_function(self):
        """Concrete function of the ``score_users`` signature (several users per call)."""
        return multi_user_scoring_function(self, *self.tensor_specs())

    def get_config(self):
        emb = self.embedding.get_config()
        return {"schema": emb["schema"], "vocabularies": emb["vocabularies"], "features": list(self.features),
                "hidden_units": list(self.hidden_units), "embedding_dim": self.embedding.embedding_dim,
                "numeric_stats": emb["numeric_stats"], "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def export_preranker(model: PreRanker, path: str) -> str:
    """Writes a SavedModel whose ``serving_default`` scores N candidates of one user.

    Signature inputs: the model's selected features by name (user ``[1]``/``[1, L]``,
    item ``[N]``/``[N, L]``); outputs ``scores`` ``[N]`` and ``logits`` ``[N]``. The
    ``score_users`` signature also takes ``user_index`` ``[N]`` int32, with U user rows;
    ``encode_items`` and ``score_users_encoded`` score items encoded once in advance.
    """
    signatures = scoring_signatures(model)
    module = tf.Module()
    module.model = model  # the lookups' tables and the variables travel with the signature
    tf.saved_model.save(module, path, signatures=signatures)
    return path


__all__ = ["PreRanker", "export_preranker"]
