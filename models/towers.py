"""Query and item towers built from the feature schema.

A tower embeds every feature of its side (categorical: lookup + embedding;
multi-valued: masked mean of the value embeddings; sequence: masked mean, or
attention-weighted mean, of the item-id embeddings, shared with the item tower;
numeric: standardized value),
concatenates them and maps them through an MLP to the output embedding.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

from models.features import ITEM_ID, OOV_TOKEN, PAD_TOKEN, Feature, Kind, Schema, checked_numeric_stats
from models.tf_compat import keras, tf


@keras.utils.register_keras_serializable(package="recfunnel")
class MaskedMeanPooling(keras.layers.Layer):
    """Mean over the non-padding positions.

    Inputs: embeddings ``[B, L, D]`` and ids ``[B, L]`` (int, 0 = padding).
    Output: ``[B, D]``; all-padding rows give zeros.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.built = True  # no weights

    def call(self, embeddings, ids):
        mask = tf.cast(tf.not_equal(ids, 0), embeddings.dtype)[..., tf.newaxis]
        total = tf.reduce_sum(embeddings * mask, axis=1)
        count = tf.reduce_sum(mask, axis=1)
        return tf.math.divide_no_nan(total, count)


@keras.utils.register_keras_serializable(package="recfunnel")
class MaskedAttentionPooling(keras.layers.Layer):
    """Attention-weighted mean over the non-padding positions, scored by a learned query.

    Formula: a_j = softmax_j(vᵀ tanh(W e_j + b)) over the positions with id ≠ 0;
    output Σ_j a_j e_j. The towers of a two-tower model cannot see the target item, so
    the query v is one learned vector (attention pooling as in YouTube-DNN-style query
    towers), not the candidate as in DIN. v starts at zero: a fresh layer is exactly the
    masked mean, and training moves it only where weighting the history helps.

    Args:
      units: width of W.

    Inputs: embeddings ``[B, L, D]`` and ids ``[B, L]`` (int, 0 = padding).
    Output: ``[B, D]``; all-padding rows give zeros.
    """

    def __init__(self, units: int = 32, **kwargs):
        super().__init__(**kwargs)
        if int(units) < 1:
            raise ValueError(f"`units` should be positive. Received: units={units}")
        self.units = int(units)
        # The sublayers compute in this layer's dtype policy (e.g. float16).
        self.hidden = keras.layers.Dense(self.units, activation="tanh", dtype=self.dtype_policy, name="hidden")
        self.query = keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros", dtype=self.dtype_policy,
                                        name="query")

    def call(self, embeddings, ids):
        present = tf.not_equal(ids, 0)
        scores = tf.squeeze(self.query(self.hidden(embeddings)), axis=-1)
        # A softmax over the present positions only, written out so that padding never
        # enters an exponential (a stand-in score such as -1e9 is -inf in float16, and an
        # all-padding row then gave NaN): shift by the largest present score (0 for an
        # all-padding row), exponentiate, zero the padding, normalize.
        zeros = tf.zeros_like(scores)
        lowest = tf.fill(tf.shape(scores), tf.constant(scores.dtype.min, scores.dtype))
        shift = tf.reduce_max(tf.where(present, scores, lowest), axis=1, keepdims=True)
        shift = tf.where(tf.reduce_any(present, axis=1, keepdims=True), shift, tf.zeros_like(shift))
        exps = tf.where(present, tf.exp(tf.where(present, scores - tf.stop_gradient(shift), zeros)), zeros)
        weights = tf.math.divide_no_nan(exps, tf.reduce_sum(exps, axis=1, keepdims=True))
        return tf.reduce_sum(weights[..., tf.newaxis] * embeddings, axis=1)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


HISTORY_POOLINGS = ("mean", "attention")


def drop_values(ids: tf.Tensor, rate: float) -> tf.Tensor:
    """Sets a `rate` fraction of the values of ``ids [B, L]`` (0 = padding) to padding.

    A row that had values keeps at least one of them (drawn uniformly among its values).
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"`rate` should be in [0, 1). Received: rate={rate}")
    present = tf.not_equal(ids, 0)
    keep = tf.logical_and(tf.random.uniform(tf.shape(ids)) >= rate, present)
    lost = tf.logical_and(tf.reduce_any(present, axis=1), tf.logical_not(tf.reduce_any(keep, axis=1)))
    pick = tf.argmax(tf.where(present, tf.random.uniform(tf.shape(ids)), -1.0), axis=1, output_type=tf.int32)
    rescue = tf.logical_and(tf.one_hot(pick, tf.shape(ids)[1], on_value=True, off_value=False), lost[:, tf.newaxis])
    return tf.where(tf.logical_or(keep, rescue), ids, tf.zeros_like(ids))


def feature_sizes(features: Sequence[Feature], feature_dim: int) -> List[int]:
    """Width of each feature's slice of a tower's concatenated feature embeddings."""
    return [1 if f.kind == Kind.NUMERIC else int(feature_dim) for f in features]


# The one token of a vocabulary that has none (every training value unknown, as the user id of an
# anonymous log): StringLookup refuses an empty list, and no input carries this token.
NO_TOKEN = "\x00[no token]"


def make_lookup(tokens: Sequence[str], name: str) -> keras.layers.StringLookup:
    """String → id with ``""`` as mask (id 0) and one OOV bucket (id 1).

    A vocabulary without tokens maps every value but ``""`` to the OOV bucket (the
    feature is constant: it carries nothing, and breaks nothing).
    """
    vocab = [t for t in tokens if t not in (PAD_TOKEN, OOV_TOKEN)] or [NO_TOKEN]
    return keras.layers.StringLookup(vocabulary=vocab, mask_token=PAD_TOKEN, num_oov_indices=1,
                                     oov_token=OOV_TOKEN, name=f"{name}_lookup")


@keras.utils.register_keras_serializable(package="recfunnel")
class SharedItemEmbedding(keras.layers.Layer):
    """Item-id lookup and embedding shared by the item tower and the query tower's history."""

    def __init__(self, item_vocabulary: Sequence[str], dim: int, **kwargs):
        super().__init__(**kwargs)
        self.item_vocabulary = list(item_vocabulary)
        self.dim = int(dim)
        if self.dim < 1:
            raise ValueError(f"`dim` should be positive. Received: dim={dim}")
        self.lookup = make_lookup(self.item_vocabulary, ITEM_ID)
        self.embedding = keras.layers.Embedding(self.lookup.vocabulary_size(), self.dim,
                                                name="item_id_embedding")
        # The towers call `ids` and `embedding` directly; the sublayers build lazily.
        self.built = True

    def ids(self, item_ids):
        return self.lookup(item_ids)

    def call(self, item_ids):
        return self.embedding(self.lookup(item_ids))

    def get_config(self):
        return {**super().get_config(), "item_vocabulary": self.item_vocabulary, "dim": self.dim}


@keras.utils.register_keras_serializable(package="recfunnel")
class Tower(keras.Model):
    """One tower: features of `side` → ``[B, output_dim]`` embedding.

    Args:
      schema: a `Schema` or its dict.
      side: ``"user"`` (query tower) or ``"item"``.
      vocabularies: vocabulary name → tokens (most frequent first), for every
        categorical feature of the side (sequences use ``item_id``).
      feature_dim: embedding size of every categorical feature.
      hidden_units: sizes of the hidden ReLU layers.
      output_dim: size of the output embedding.
      normalize: L2-normalize the output (cosine similarity).
      numeric_stats: feature → (mean, std) for standardizing numeric features.
      shared_item_embedding: a `SharedItemEmbedding` to use for item ids and
        sequences (the two-tower model passes the same one to both towers).
      dropout: dropout after the hidden layers.
      history_pooling: how a sequence feature (the behaviour history) is pooled:
        ``mean`` (masked mean) or ``attention`` (`MaskedAttentionPooling`, width
        `feature_dim`). Multi-valued features are always mean-pooled.
    """

    def __init__(self, schema, side: str, vocabularies: Mapping[str, Sequence[str]],
                 feature_dim: int = 32, hidden_units: Sequence[int] = (128,), output_dim: int = 64,
                 normalize: bool = False, numeric_stats: Optional[Mapping[str, Sequence[float]]] = None,
                 shared_item_embedding: Optional[SharedItemEmbedding] = None, dropout: float = 0.0,
                 history_pooling: str = "mean", **kwargs):
        super().__init__(**kwargs)
        self.schema = schema if isinstance(schema, Schema) else Schema.from_dict(schema)
        self.side = side
        self.features: List[Feature] = list(self.schema.side(side))
        for name, value in (("feature_dim", feature_dim), ("output_dim", output_dim)):
            if int(value) < 1:
                raise ValueError(f"`{name}` should be positive. Received: {name}={value}")
        if not 0 <= dropout < 1:
            raise ValueError(f"`dropout` should be in [0, 1). Received: dropout={dropout}")
        if history_pooling not in HISTORY_POOLINGS:
            raise ValueError(f"`history_pooling` should be one of {HISTORY_POOLINGS}. "
                             f"Received: history_pooling={history_pooling!r}")
        self.history_pooling = history_pooling
        self.vocabularies = {k: list(v) for k, v in vocabularies.items()}
        self.feature_dim = int(feature_dim)
        self.hidden_units = [int(u) for u in hidden_units]
        self.output_dim = int(output_dim)
        self.normalize = bool(normalize)
        self.dropout = float(dropout)
        self.numeric_stats = checked_numeric_stats(numeric_stats)
        needs_items = any(f.name == ITEM_ID or f.kind == Kind.SEQUENCE for f in self.features)
        if needs_items and shared_item_embedding is None:
            if ITEM_ID not in self.vocabularies:
                raise ValueError(f"the {side} tower needs the {ITEM_ID!r} vocabulary")
            shared_item_embedding = SharedItemEmbedding(self.vocabularies[ITEM_ID], self.feature_dim)
        self.item_embedding = shared_item_embedding if needs_items else None
        self.lookups: Dict[str, keras.layers.Layer] = {}
        self.embeddings: Dict[str, keras.layers.Layer] = {}
        for f in self.features:
            if f.kind == Kind.NUMERIC or f.vocabulary_name == ITEM_ID:
                continue
            if f.vocabulary_name not in self.vocabularies:
                raise ValueError(f"no vocabulary for feature {f.name!r} of the {side} tower; "
                                 f"have {sorted(self.vocabularies)}")
            lookup = make_lookup(self.vocabularies[f.vocabulary_name], f.name)
            self.lookups[f.name] = lookup
            self.embeddings[f.name] = keras.layers.Embedding(lookup.vocabulary_size(), self.feature_dim,
                                                             name=f"{f.name}_embedding")
        self.pool = MaskedMeanPooling()
        has_sequence = any(f.kind == Kind.SEQUENCE for f in self.features)
        self.sequence_pool = (MaskedAttentionPooling(self.feature_dim, name="history_attention")
                              if history_pooling == "attention" and has_sequence else self.pool)
        layers = []
        for units in self.hidden_units:
            layers.append(keras.layers.Dense(units, activation="relu"))
            if self.dropout:
                layers.append(keras.layers.Dropout(self.dropout))
        layers.append(keras.layers.Dense(self.output_dim))
        self.mlp = keras.Sequential(layers, name=f"{side}_mlp")

    def embedding_tables(self) -> List[tf.Variable]:
        """The tower's embedding tables (the shared item-id table included), built on first use."""
        layers = list(self.embeddings.values())
        if self.item_embedding is not None:
            layers.append(self.item_embedding.embedding)
        return [layer.embeddings for layer in layers if layer.built]

    def feature_sizes(self) -> List[int]:
        """Width of each feature's slice of `embed_features`, in `features` order."""
        return feature_sizes(self.features, self.feature_dim)

    def embed_features(self, inputs: Mapping[str, tf.Tensor], value_dropout: float = 0.0) -> tf.Tensor:
        """Concatenated feature embeddings ``[B, sum of feature_sizes()]``.

        `value_dropout` drops that fraction of the values of every multi-valued
        feature before pooling (each row keeps at least one; the self-supervised
        task's second augmentation).
        """
        parts = []
        for f in self.features:
            x = inputs[f.name]
            if f.kind == Kind.NUMERIC:
                mean, std = self.numeric_stats.get(f.name, (0.0, 1.0))
                parts.append(((tf.cast(x, tf.float32) - mean) / std)[:, tf.newaxis])
            elif f.vocabulary_name == ITEM_ID:
                ids = self.item_embedding.ids(x)
                emb = self.item_embedding.embedding(ids)
                if f.kind == Kind.CATEGORICAL:
                    parts.append(emb)
                else:
                    parts.append((self.sequence_pool if f.kind == Kind.SEQUENCE else self.pool)(emb, ids))
            else:
                ids = self.lookups[f.name](x)
                if value_dropout and f.kind == Kind.MULTI_CATEGORICAL:
                    ids = drop_values(ids, value_dropout)
                emb = self.embeddings[f.name](ids)
                parts.append(emb if f.kind == Kind.CATEGORICAL else self.pool(emb, ids))
        return tf.concat(parts, axis=-1)

    def project(self, features: tf.Tensor, training=False, head: Optional[keras.layers.Layer] = None) -> tf.Tensor:
        """The MLP on concatenated feature embeddings; `head` replaces its output layer."""
        if head is None:
            out = self.mlp(features, training=training)
        else:
            out = features
            for layer in self.mlp.layers[:-1]:
                out = layer(out, training=training)
            out = head(out)
        if self.normalize:
            out = tf.math.l2_normalize(out, axis=-1)
        return out

    def call(self, inputs, training=False):
        return self.project(self.embed_features(inputs), training=training)

    def get_config(self):
        # Attributes holding dicts/lists are wrapped by Keras' tracking: hand back plain ones.
        return {
            "schema": self.schema.to_dict(), "side": self.side,
            "vocabularies": {k: list(v) for k, v in self.vocabularies.items()},
            "feature_dim": self.feature_dim, "hidden_units": list(self.hidden_units),
            "output_dim": self.output_dim, "normalize": self.normalize,
            "numeric_stats": {k: list(v) for k, v in self.numeric_stats.items()},
            "shared_item_embedding": (None if self.item_embedding is None
                                      else keras.layers.serialize(self.item_embedding)),
            "dropout": self.dropout, "history_pooling": self.history_pooling, "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        shared = config.get("shared_item_embedding")
        return cls(**{**config, "shared_item_embedding": None if shared is None else keras.layers.deserialize(shared)})

    def serving_function(self):
        """A concrete function taking the side's features and returning ``{"embedding"}``."""
        specs = self.schema.tensor_specs(self.side)

        @tf.function
        def serve(**features):
            return {"embedding": self(features, training=False)}

        return serve.get_concrete_function(**specs)
