"""Feature embeddings of the pre-ranker: one ``[B, d_i]`` block per selected feature.

categorical → its embedding (``embedding_dim``); multi-valued and sequence → masked
mean of the value embeddings (the ``history`` sequence shares the ``item_id``
vocabulary and table); numeric → the standardized value (width 1). Keeping one block
per feature is what lets AutoFAS mask a whole feature at once.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence, Tuple

from models.features import Kind, Schema, checked_numeric_stats
from models.tf_compat import keras, tf
from models.towers import make_lookup


def _masked_mean(embeddings: tf.Tensor, ids: tf.Tensor) -> tf.Tensor:
    mask = tf.cast(tf.not_equal(ids, 0), embeddings.dtype)[..., tf.newaxis]
    return tf.math.divide_no_nan(tf.reduce_sum(embeddings * mask, axis=1), tf.reduce_sum(mask, axis=1))


@keras.utils.register_keras_serializable(package="recfunnel")
class FeatureEmbedding(keras.layers.Layer):
    """Embeds the named features of the schema.

    Args:
      schema: a `Schema` or its dict.
      vocabularies: vocabulary name → tokens (only the vocabularies of `features` are kept).
      features: the feature names, in the order of the output blocks.
      embedding_dim: width of every categorical block.
      numeric_stats: feature → (mean, std) for numeric features.

    Call: ``layer(features)`` with ``[B]`` / ``[B, L]`` tensors → list of ``[B, d_i]``.
    """

    def __init__(self, schema, vocabularies: Mapping[str, Sequence[str]], features: Sequence[str],
                 embedding_dim: int = 8, numeric_stats: Optional[Mapping[str, Sequence[float]]] = None, **kwargs):
        super().__init__(**kwargs)
        self.schema = schema if isinstance(schema, Schema) else Schema.from_dict(schema)
        self.features = [str(f) for f in features]
        if not self.features:
            raise ValueError("`features` should name at least one feature. Received: features=[]")
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"`features` should not repeat a name. Received: features={self.features}")
        known = [f.name for f in self.schema.features]
        unknown = [f for f in self.features if f not in known]
        if unknown:
            raise ValueError(f"`features` should be features of the schema {known}. Received unknown: {unknown}")
        if isinstance(embedding_dim, bool) or int(embedding_dim) != embedding_dim or embedding_dim < 1:
            raise ValueError(f"`embedding_dim` should be a positive integer. Received: embedding_dim={embedding_dim!r}")
        self.embedding_dim = int(embedding_dim)
        self.numeric_stats = checked_numeric_stats(numeric_stats)
        needed = []
        for name in self.features:
            f = self.schema.feature(name)
            if f.is_categorical and f.vocabulary_name not in needed:
                needed.append(f.vocabulary_name)
        missing = [v for v in needed if v not in vocabularies]
        if missing:
            raise ValueError(f"`vocabularies` lacks {missing}, needed by features {self.features}")
        self.vocabularies = {v: [str(t) for t in vocabularies[v]] for v in needed}
        self.lookups = {v: make_lookup(self.vocabularies[v], v) for v in needed}
        self.tables = {v: keras.layers.Embedding(int(self.lookups[v].vocabulary_size()), self.embedding_dim,
                                                 name=f"{v}_embedding") for v in needed}

    @property
    def widths(self) -> List[int]:
        """``d_i`` of every block."""
        return [1 if self.schema.feature(n).kind == Kind.NUMERIC else self.embedding_dim for n in self.features]

    def encode_one(self, name: str, x: tf.Tensor) -> tf.Tensor:
        """A feature's raw values → its vocabulary ids (int64), or numeric → standardized ``[B]``."""
        f = self.schema.feature(name)
        if f.kind == Kind.NUMERIC:
            mean, std = self.numeric_stats.get(name, (0.0, 1.0))
            return (tf.cast(x, tf.float32) - mean) / std
        return self.lookups[f.vocabulary_name](x)

    def embed_encoded(self, name: str, code: tf.Tensor) -> tf.Tensor:
        """`encode_one`'s output (ids of any integer type) → the feature's block ``[B, d_i]``."""
        f = self.schema.feature(name)
        if f.kind == Kind.NUMERIC:
            return tf.cast(code, tf.float32)[:, tf.newaxis]
        ids = tf.cast(code, tf.int64)
        emb = self.tables[f.vocabulary_name](ids)
        return emb if f.kind == Kind.CATEGORICAL else _masked_mean(emb, ids)

    def embed_one(self, name: str, x: tf.Tensor) -> tf.Tensor:
        return self.embed_encoded(name, self.encode_one(name, x))

    def call(self, inputs: Mapping[str, Any]) -> List[tf.Tensor]:
        missing = [n for n in self.features if n not in inputs]
        if missing:
            raise ValueError(f"The pre-ranker needs the features {missing} (inputs have {sorted(inputs)}).")
        return [self.embed_one(n, inputs[n]) for n in self.features]

    def candidate_blocks(self, user_features: Mapping[str, Any], item_features: Mapping[str, Any],
                         user_index=None, items_encoded: bool = False) -> List[tf.Tensor]:
        """Blocks ``[N, d_i]`` for N candidates of one user: user features (batch 1 or N)
        are embedded once and broadcast to the N rows. With `user_index` ``[N]``, the
        user features hold U users, each embedded once and gathered for its candidates.
        With `items_encoded`, the item features are `encode_one`'s outputs."""
        user, items = self.side_blocks(user_features, item_features, items_encoded)
        n = tf.shape(items[0])[0]
        user, items = iter(user), iter(items)
        out = []
        for name in self.features:
            if self.schema.feature(name).side == "item":
                out.append(next(items))
            else:
                block = next(user)
                if user_index is not None:
                    out.append(tf.gather(block, user_index))
                else:
                    out.append(tf.broadcast_to(block, tf.stack([n, tf.shape(block)[1]])))
        return out

    def side_blocks(self, user_features: Mapping[str, Any], item_features: Mapping[str, Any],
                    items_encoded: bool = False) -> Tuple[List[tf.Tensor], List[tf.Tensor]]:
        """``(user blocks [U, d_i], item blocks [N, d_i])`` in feature order, each side as
        given (user features are not broadcast to the candidates)."""
        item_names = [n for n in self.features if self.schema.feature(n).side == "item"]
        if not item_names:
            raise ValueError(f"scoring candidates needs an item feature; the features are {self.features}")
        missing = [n for n in item_names if n not in item_features]
        if missing:
            raise ValueError(f"The pre-ranker needs the item features {missing} (inputs have {sorted(item_features)}).")
        user, items = [], []
        for name in self.features:
            if self.schema.feature(name).side == "item":
                x = item_features[name]
                items.append(self.embed_encoded(name, x) if items_encoded else self.embed_one(name, x))
            else:
                user.append(self.embed_one(name, user_features[name]))
        return user, items

    def get_config(self):
        return {**super().get_config(), "schema": self.schema.to_dict(),
                "vocabularies": {k: list(v) for k, v in self.vocabularies.items()}, "features": list(self.features),
                "embedding_dim": self.embedding_dim,
                "numeric_stats": {k: list(v) for k, v in self.numeric_stats.items()}}


__all__ = ["FeatureEmbedding"]
