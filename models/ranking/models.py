"""Ranking models over the feature schema: DNN, DIN, CartesianDNN and CAN.

Every model scores (user, candidate) rows. Its input is one dict of tensors: the user
features and the item features of the schema, row-aligned, laid out as
`Schema.tensor_specs` (categorical ``[B]`` string, multi-valued/sequence ``[B, L]`` string
padded with ``""``, numeric ``[B]`` float32); the ``history`` sequence holds item ids and
shares the ``item_id`` vocabulary and embedding. The output is the click logit ``[B]``.

The common base (`RankingModel`, used as is by `DNN`):

* one ``StringLookup`` per vocabulary (vocabularies given at construction, ``""`` =
  mask id 0, one OOV bucket id 1) and one embedding table per vocabulary;
* categorical → its embedding; multi-valued and sequence → masked mean of the value
  embeddings; numeric → the value (standardized when `numeric_stats` gives mean/std);
* everything concatenated (plus the model's extra parts) → ReLU MLP → logit.

Extra parts:

* `DIN`: the history is pooled by target attention (the activation unit scores each
  behaviour against the candidate's ``item_id`` embedding) instead of the mean.
* `CartesianDNN`: one id per (user feature, item feature) pair value — the Cartesian
  product of the two lookups, exact when the product fits in `cartesian_max_buckets`,
  folded modulo that many buckets otherwise — with its own embedding table; pairs with a
  multi-valued or sequence side yield one cross per element, mean-pooled.
* `CAN`: the co-action unit (`co_action.py`) of every (feed = user feature, induction =
  item feature) pair, on co-action embedding tables of their own.

The co-action pairs of CAN and CartesianDNN are the same: `coaction_user_features` ×
`coaction_item_features` (defaults: every categorical/multi-valued user feature but
``user_id``, plus the sequence; every categorical/multi-valued item feature).

Serving: `score_candidates(user_features, item_features)` scores N candidates of one
user (user features unbatched or with batch 1; string lookups run once for the user,
whose ids are broadcast to the N rows); `export_ranker(model, path)` writes a SavedModel
whose ``serving_default`` signature takes every feature by name — user features
``[1]`` / ``[1, L]`` (or N rows, one per candidate), item features ``[N]`` / ``[N, L]`` — and
returns ``{"scores": [N] click probabilities, "logits": [N]}``; its ``score_users``
signature scores the candidates of several users in one call (user features with U
rows, plus ``user_index`` ``[N]`` int32: each candidate's user row); ``encode_items``
turns item features into the model's vocabulary ids once, and ``score_users_encoded``
scores candidates given in that form (`models.signatures`).

References:
  Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018.
  Bian et al., "CAN: Feature Co-Action for Click-Through Rate Prediction", WSDM 2022.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from models.features import (ITEM_ID, PAD_TOKEN, USER_ID, Feature, Kind, Schema, checked_numeric_stats,
                             pad_values)
from models.ranking.co_action import (ORDER_COMBINATIONS, SEQUENCE_POOLINGS, CoActionUnit)
from models.signatures import (ENCODE_ITEMS_SIGNATURE, ENCODED_SCORING_SIGNATURE, MULTI_USER_SIGNATURE,
                               SERVING_DEFAULT, USER_INDEX, several_user_arguments)
from models.tf_compat import keras, tf
from models.towers import make_lookup

MODEL_TYPES = ("dnn", "din", "cartesian", "can")


# ---------------------------------------------------------------------------------
# Configuration.
# ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RankingConfig:
    """Hyper-parameters shared by the ranking models (each uses the fields it needs).

    Attributes:
      embedding_dim: size of every representation embedding.
      hidden_units: ReLU layers of the final MLP (a 1-unit linear layer follows).
      dropout: dropout after each hidden layer.
      coaction_item_features: induction features of CAN / item side of the Cartesian
        pairs; None = every categorical or multi-valued item feature.
      coaction_user_features: feed features of CAN / user side of the Cartesian pairs;
        None = every categorical or multi-valued user feature but ``user_id``, plus the
        sequence.
      coaction_feed_dim: D, the size of the feed co-action embeddings.
      coaction_layer_sizes: the micro-MLP's layer sizes after D.
      coaction_use_bias: micro-MLP biases.
      coaction_activation: activation between micro-MLP layers.
      coaction_orders: C of the multi-order enhancement.
      combine_orders: ``"concat"`` or ``"sum"`` (see `co_action`).
      order_independent, combination_independent: CAN's independence switches.
      sequence_pooling: ``"coaction_then_sum"``, ``"sum_then_coaction"``,
        ``"coaction_then_mean"`` or ``"mean_then_coaction"`` (`co_action`).
      coaction_initializer: Keras initializer name of CAN's co-action tables (the
        representation embeddings keep Keras' default ``"uniform"``).
      coaction_l2: λ of an L2 penalty λ·Σw² on the co-action parameters (CAN's
        induction and feed tables, the Cartesian model's cross tables), added to the
        training loss; every row of a table counts at each step. 0 (the default, the
        papers' setting) adds none.
      attention_units: hidden layers of DIN's activation unit.
      cartesian_dim: embedding size of the Cartesian ids (None = `embedding_dim`).
      cartesian_max_buckets: largest table of one Cartesian pair; larger products are
        folded into this many buckets (cross index modulo the bucket count).
    """

    embedding_dim: int = 8
    hidden_units: Tuple[int, ...] = (64, 32)
    dropout: float = 0.0
    coaction_item_features: Optional[Tuple[str, ...]] = None
    coaction_user_features: Optional[Tuple[str, ...]] = None
    coaction_feed_dim: int = 8
    coaction_layer_sizes: Tuple[int, ...] = (4, 4)
    coaction_use_bias: bool = True
    coaction_activation: Optional[str] = "tanh"
    coaction_orders: int = 2
    combine_orders: str = "concat"
    order_independent: bool = False
    combination_independent: bool = False
    sequence_pooling: str = "coaction_then_mean"
    coaction_initializer: str = "uniform"
    coaction_l2: float = 0.0
    attention_units: Tuple[int, ...] = (32,)
    cartesian_dim: Optional[int] = None
    cartesian_max_buckets: int = 2 ** 17

    def __post_init__(self):
        for name in ("hidden_units", "coaction_layer_sizes", "attention_units"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        for name in ("coaction_item_features", "coaction_user_features"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str):
                    raise TypeError(f"`{name}` should be a sequence of feature names. Received: {name}={value!r}")
                object.__setattr__(self, name, tuple(str(v) for v in value))
        positive = {"embedding_dim": self.embedding_dim, "coaction_feed_dim": self.coaction_feed_dim,
                    "coaction_orders": self.coaction_orders, "cartesian_max_buckets": self.cartesian_max_buckets}
        if self.cartesian_dim is not None:
            positive["cartesian_dim"] = self.cartesian_dim
        for name, value in positive.items():
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"`{name}` should be a positive integer. Received: {name}={value!r}")
        for name in ("hidden_units", "coaction_layer_sizes", "attention_units"):
            if any(v < 1 for v in getattr(self, name)):
                raise ValueError(f"`{name}` should hold positive sizes. Received: {name}={getattr(self, name)}")
        if not self.coaction_layer_sizes:
            raise ValueError("`coaction_layer_sizes` should not be empty")
        l2 = self.coaction_l2
        number = isinstance(l2, (int, float, np.integer, np.floating)) and not isinstance(l2, bool)
        if not (number and np.isfinite(l2) and l2 >= 0):
            raise ValueError(f"`coaction_l2` should be a finite number >= 0. Received: coaction_l2={l2!r}")
        object.__setattr__(self, "coaction_l2", float(l2))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` should be in [0, 1). Received: dropout={self.dropout}")
        if self.combine_orders not in ORDER_COMBINATIONS:
            raise ValueError(f"`combine_orders` should be one of {ORDER_COMBINATIONS}. "
                             f"Received: combine_orders={self.combine_orders!r}")
        try:
            keras.initializers.get(self.coaction_initializer)
        except (ValueError, TypeError):
            raise ValueError(f"`coaction_initializer` should name a Keras initializer. "
                             f"Received: coaction_initializer={self.coaction_initializer!r}") from None
        if self.sequence_pooling not in SEQUENCE_POOLINGS:
            raise ValueError(f"`sequence_pooling` should be one of {SEQUENCE_POOLINGS}. "
                             f"Received: sequence_pooling={self.sequence_pooling!r}")

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RankingConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown ranking config keys {sorted(unknown)}; expected {sorted(known)}.")
        return cls(**d)


def candidate_scoring_function(model, user_specs: Mapping[str, Any], item_specs: Mapping[str, Any]):
    """The ``serving_default`` concrete function of a model with ``candidate_logits``.

    One user's features (batch 1) and N candidates' features in, ``{"scores" [N]
    (sigmoid), "logits" [N]}`` out; shared by the rankers and the pre-ranker.
    """

    @tf.function
    def score_candidates(**features):
        logits = model.candidate_logits({k: features[k] for k in user_specs},
                                        {k: features[k] for k in item_specs})
        return {"scores": tf.sigmoid(logits), "logits": logits}

    return score_candidates.get_concrete_function(**user_specs, **item_specs)


def multi_user_scoring_function(model, user_specs: Mapping[str, Any], item_specs: Mapping[str, Any],
                                items_encoded: bool = False):
    """The ``score_users`` concrete function: the candidates of U users in one call.

    User features have U rows, item features N rows, and ``user_index`` ``[N]`` int32
    names each candidate's user (a row of the user features). Each user's features
    are looked up and embedded once, then gathered for its candidates, so a batch of
    users costs little more than their candidates. Outputs as `serving_default`.
    With `items_encoded`, the ``score_users_encoded`` function: the item features are
    those ``encode_items`` returns (`encoded_item_specs`), so no string is looked up
    per candidate.
    """
    if items_encoded:
        item_specs = encoded_item_specs(item_specs)
    # Checked first: no feature may be named `user_index` or be both a user and an item feature.
    specs = several_user_arguments(user_specs, item_specs, tf.TensorSpec([None], tf.int32, name=USER_INDEX))

    @tf.function
    def score_users(**features):
        logits = model.candidate_logits({k: features[k] for k in user_specs},
                                        {k: features[k] for k in item_specs}, user_index=features[USER_INDEX],
                                        items_encoded=items_encoded)
        return {"scores": tf.sigmoid(logits), "logits": logits}

    return score_users.get_concrete_function(**specs)


def encoded_item_specs(item_specs: Mapping[str, Any]) -> Dict[str, Any]:
    """Specs of the encoded item features (``encode_items``' outputs): string ``[N]`` /
    ``[N, L]`` → int32 ids of the same shape; numeric stays float32 ``[N]``."""
    return {k: tf.TensorSpec(spec.shape, tf.int32 if spec.dtype == tf.string else spec.dtype, name=k)
            for k, spec in item_specs.items()}


def to_encoded(code: tf.Tensor) -> tf.Tensor:
    """A looked-up feature in the form of ``encode_items``' outputs: vocabulary ids as
    int32, numeric values as they are."""
    return tf.cast(code, tf.int32) if code.dtype.is_integer else code


def encode_items_function(model, item_specs: Mapping[str, Any]):
    """The ``encode_items`` concrete function: N items' features → ``model.encode_items``
    (vocabulary ids int32, standardized numeric values), by feature name."""

    @tf.function
    def encode_items(**features):
        encoded = model.encode_items({k: features[k] for k in item_specs})
        return {k: encoded[k] for k in item_specs}

    return encode_items.get_concrete_function(**item_specs)


def scoring_signatures(model) -> Dict[str, Any]:
    """Every signature of a ranker or pre-ranker export (`models.signatures`): one user,
    many users, item encoding and many users with encoded items."""
    user_specs, item_specs = model.tensor_specs()
    return {SERVING_DEFAULT: candidate_scoring_function(model, user_specs, item_specs),
            MULTI_USER_SIGNATURE: multi_user_scoring_function(model, user_specs, item_specs),
            ENCODE_ITEMS_SIGNATURE: encode_items_function(model, item_specs),
            ENCODED_SCORING_SIGNATURE: multi_user_scoring_function(model, user_specs, item_specs, items_encoded=True)}


def coaction_features(schema: Schema, config: RankingConfig) -> Tuple[List[str], List[str]]:
    """``(item feature names, user feature names)`` of the co-action pairs (validated)."""
    def usable(f: Feature) -> bool:
        return f.kind in (Kind.CATEGORICAL, Kind.MULTI_CATEGORICAL, Kind.SEQUENCE)

    chosen = {}
    for side, requested in (("item", config.coaction_item_features), ("user", config.coaction_user_features)):
        if requested is None:
            names = [f.name for f in schema.side(side) if usable(f) and f.name != USER_ID]
        else:
            names = list(requested)
            for name in names:
                feature = next((f for f in schema.features if f.name == name), None)
                if feature is None or feature.side != side or not usable(feature):
                    raise ValueError(
                        f"`coaction_{side}_features` should name categorical, multi-valued or sequence {side} "
                        f"features of the schema. Received: {name!r}; usable: "
                        f"{[f.name for f in schema.side(side) if usable(f)]}")
        if not names:
            raise ValueError(f"The schema {schema.name!r} has no {side} feature to form co-action pairs with "
                             f"(set `coaction_{side}_features`).")
        chosen[side] = names
    return chosen["item"], chosen["user"]


# ---------------------------------------------------------------------------------
# Data helpers (numpy).
# ---------------------------------------------------------------------------------
def build_vocabularies(schema: Schema, columns: Mapping[str, Sequence], min_count: int = 1
                       ) -> Dict[str, List[str]]:
    """Vocabulary name → tokens by decreasing frequency (ties by token), from training columns.

    Args:
      columns: feature name → values (``str`` per row; a list or padded row for
        multi-valued and sequence features), e.g. a DataFrame. Features sharing a
        vocabulary (``history`` and ``item_id``) are counted together.
      min_count: tokens seen fewer times are left to the OOV bucket.
    """
    counts: Dict[str, collections.Counter] = {v: collections.Counter() for v in schema.vocabulary_names()}
    for f in schema.features:
        if not f.is_categorical:
            continue
        if f.name not in columns:
            raise ValueError(f"`columns` lacks the categorical feature {f.name!r}")
        values = columns[f.name]
        if f.kind == Kind.CATEGORICAL:
            tokens = np.asarray(values, dtype=object).reshape(-1)
        else:
            tokens = np.asarray([t for row in values for t in row], dtype=object)
        if len(tokens):
            uniq, n = np.unique(tokens.astype(str), return_counts=True)
            counts[f.vocabulary_name].update(dict(zip(uniq.tolist(), n.tolist())))
    out = {}
    for name, counter in counts.items():
        counter.pop(PAD_TOKEN, None)
        kept = [t for t, c in counter.items() if c >= min_count]
        out[name] = sorted(kept, key=lambda t: (-counter[t], t))
    return out


def inputs_from_frame(schema: Schema, frame, features: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
    """Model inputs (numpy, `Schema.tensor_specs` layout) from a DataFrame-like of rows.

    Categorical columns hold ``str``; multi-valued/sequence columns hold lists (or
    already padded rows) and are padded/truncated to ``max_length`` (sequences keep the
    most recent values); numeric columns are cast to float32.
    """
    names = list(features) if features is not None else [f.name for f in schema.features]
    out = {}
    for name in names:
        f = schema.feature(name)
        if name not in frame:
            raise ValueError(f"missing column {name!r} for the {f.side} feature of the same name")
        values = frame[name]
        if f.kind == Kind.NUMERIC:
            out[name] = np.asarray(values, dtype=np.float32).reshape(-1)
        elif f.kind == Kind.CATEGORICAL:
            out[name] = np.asarray(values, dtype=object).reshape(-1).astype(str).astype(object)
        else:
            keep = "last" if f.kind == Kind.SEQUENCE else "first"
            rows = [pad_values([str(v) for v in row if str(v) != PAD_TOKEN], f.max_length, keep)
                    for row in values]
            out[name] = np.asarray(rows, dtype=object).reshape(len(rows), f.max_length)
    return out


# ---------------------------------------------------------------------------------
# Layers.
# ---------------------------------------------------------------------------------
def _masked_mean(embeddings: tf.Tensor, ids: tf.Tensor) -> tf.Tensor:
    mask = tf.cast(tf.not_equal(ids, 0), embeddings.dtype)[..., tf.newaxis]
    return tf.math.divide_no_nan(tf.reduce_sum(embeddings * mask, axis=1), tf.reduce_sum(mask, axis=1))


def _broadcast_rows(x: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
    """``[1, ...]`` (or ``[n, ...]``) → ``[n, ...]``."""
    return tf.broadcast_to(x, tf.concat([tf.reshape(n, [1]), tf.shape(x)[1:]], axis=0))


@keras.utils.register_keras_serializable(package="recfunnel")
class TargetAttentionPooling(keras.layers.Layer):
    """DIN's activation unit: behaviours weighted by their relevance to the candidate.

    Inputs: ``query`` ``[B, E]`` (candidate), ``keys`` ``[B, L, E]`` (behaviours), ``ids``
    ``[B, L]`` (0 = padding). Output ``[B, E] = Σ_l a_l keys_l`` with
    ``a_l = MLP([q, k_l, q − k_l, q ⊙ k_l])`` (no softmax, as in DIN; padding gets 0).

    References:
      Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018.
    """

    def __init__(self, units: Sequence[int] = (32,), **kwargs):
        super().__init__(**kwargs)
        self.units = [int(u) for u in units]
        self.hidden = [keras.layers.Dense(u, activation="relu") for u in self.units]
        self.score = keras.layers.Dense(1)

    def call(self, query, keys, ids):
        q = tf.broadcast_to(query[:, tf.newaxis, :], tf.shape(keys))
        h = tf.concat([q, keys, q - keys, q * keys], axis=-1)
        for layer in self.hidden:
            h = layer(h)
        weights = self.score(h) * tf.cast(tf.not_equal(ids, 0), keys.dtype)[..., tf.newaxis]
        return tf.reduce_sum(weights * keys, axis=1)

    def get_config(self):
        return {**super().get_config(), "units": list(self.units)}


def cartesian_ids(user_ids: tf.Tensor, item_ids: tf.Tensor, user_vocab_size: int, item_vocab_size: int,
                  num_buckets: int) -> tf.Tensor:
    """Ids of the Cartesian product of two lookups' ids.

    Args:
      user_ids: ``[B]`` or ``[B, Lu]`` lookup ids (0 = padding, 1 = OOV).
      item_ids: ``[B]`` or ``[B, Li]``.
      user_vocab_size, item_vocab_size: the lookups' sizes (mask and OOV included).
      num_buckets: number of cross ids; when the product
        ``(user_vocab_size − 1)(item_vocab_size − 1)`` exceeds it, the cross index
        ``(u − 1)(item_vocab_size − 1) + (i − 1)`` is taken modulo `num_buckets`.

    Returns:
      ``[B, Lu·Li]`` int64 in ``[0, num_buckets]``; 0 where either side is padding.
    """
    u = tf.cast(user_ids, tf.int64)
    i = tf.cast(item_ids, tf.int64)
    u = u[:, :, tf.newaxis] if u.shape.rank == 2 else u[:, tf.newaxis, tf.newaxis]
    i = i[:, tf.newaxis, :] if i.shape.rank == 2 else i[:, tf.newaxis, tf.newaxis]
    cross = (u - 1) * tf.constant(int(item_vocab_size) - 1, tf.int64) + (i - 1)  # [B, Lu, Li]
    valid = tf.logical_and(u > 0, i > 0)
    batch = tf.shape(cross)[0]
    cross = tf.reshape(cross, [batch, -1])
    valid = tf.reshape(valid, [batch, -1])
    if (user_vocab_size - 1) * (item_vocab_size - 1) > num_buckets:
        # The cross index modulo the table size: every bucket gets the same number of
        # possible pairs, and no string formatting on the serving path.
        ids = tf.math.floormod(cross, tf.constant(int(num_buckets), tf.int64)) + 1
    else:
        ids = cross + 1
    return tf.where(valid, ids, tf.zeros_like(ids))


# ---------------------------------------------------------------------------------
# Models.
# ---------------------------------------------------------------------------------
@keras.utils.register_keras_serializable(package="recfunnel")
class RankingModel(keras.Model):
    """Embeddings of every feature → MLP → click logit (the DNN baseline; base of the others).

    Args:
      schema: a `Schema` or its dict.
      vocabularies: vocabulary name → tokens (most frequent first) for every vocabulary
        of the schema (`Schema.vocabulary_names`).
      config: a `RankingConfig` or its dict.
      numeric_stats: feature → (mean, std) to standardize numeric features (default:
        passed through as they are).

    Call: ``model(features)`` with every feature of the schema ``[B]`` / ``[B, L]`` →
    logits ``[B]``.
    """

    model_type = "dnn"

    def __init__(self, schema, vocabularies: Mapping[str, Sequence[str]], config=None,
                 numeric_stats: Optional[Mapping[str, Sequence[float]]] = None, **kwargs):
        super().__init__(**kwargs)
        self.schema = schema if isinstance(schema, Schema) else Schema.from_dict(schema)
        if config is None:
            config = RankingConfig()
        self.ranking_config = config if isinstance(config, RankingConfig) else RankingConfig.from_dict(config)
        cfg = self.ranking_config
        missing = [v for v in self.schema.vocabulary_names() if v not in vocabularies]
        if missing:
            raise ValueError(f"`vocabularies` lacks {missing}; the schema needs {self.schema.vocabulary_names()}")
        self.vocabularies = {v: [str(t) for t in vocabularies[v]] for v in self.schema.vocabulary_names()}
        self.numeric_stats = checked_numeric_stats(numeric_stats)
        self.lookups = {v: make_lookup(self.vocabularies[v], v) for v in self.schema.vocabulary_names()}
        # Python ints (the lookup reports a tensor inside tf.function).
        self._vocab_sizes = {v: int(self.lookups[v].vocabulary_size()) for v in self.schema.vocabulary_names()}
        self.embeddings = {v: keras.layers.Embedding(self._vocab_sizes[v], cfg.embedding_dim,
                                                     name=f"{v}_embedding")
                           for v in self.schema.vocabulary_names()}
        layers = []
        for units in cfg.hidden_units:
            layers.append(keras.layers.Dense(units, activation="relu"))
            if cfg.dropout:
                layers.append(keras.layers.Dropout(cfg.dropout))
        layers.append(keras.layers.Dense(1, name="logit"))
        self.mlp = keras.Sequential(layers, name="mlp")

    # -- inputs -------------------------------------------------------------------
    def vocab_size(self, feature_name: str) -> int:
        """Rows of the feature's lookup: tokens + mask + OOV."""
        return self._vocab_sizes[self.schema.feature(feature_name).vocabulary_name]

    def lookup(self, features: Mapping[str, Any], side: Optional[str] = None) -> Dict[str, tf.Tensor]:
        """String features → lookup ids (int64; numeric → standardized float32), one side or both."""
        wanted = self.schema.side(side) if side else self.schema.features
        missing = [f.name for f in wanted if f.name not in features]
        if missing:
            raise ValueError(f"The ranking model needs the features {missing} "
                             f"(inputs have {sorted(features)}).")
        out = {}
        for f in wanted:
            x = features[f.name]
            if f.kind == Kind.NUMERIC:
                mean, std = self.numeric_stats.get(f.name, (0.0, 1.0))
                out[f.name] = (tf.cast(x, tf.float32) - mean) / std
            else:
                out[f.name] = self.lookups[f.vocabulary_name](x)
        return out

    # -- scoring ------------------------------------------------------------------
    def pool_sequence(self, feature: Feature, ids: Mapping[str, tf.Tensor], embeddings: tf.Tensor) -> tf.Tensor:
        return _masked_mean(embeddings, ids[feature.name])

    def extra_parts(self, ids: Mapping[str, tf.Tensor]) -> List[tf.Tensor]:
        """Model-specific ``[B, k]`` inputs of the MLP (none for the DNN)."""
        del ids
        return []

    def logits_from_ids(self, ids: Mapping[str, tf.Tensor], training=False) -> tf.Tensor:
        parts = []
        for f in self.schema.features:
            x = ids[f.name]
            if f.kind == Kind.NUMERIC:
                parts.append(x[:, tf.newaxis])
                continue
            emb = self.embeddings[f.vocabulary_name](x)
            if f.kind == Kind.CATEGORICAL:
                parts.append(emb)
            elif f.kind == Kind.SEQUENCE:
                parts.append(self.pool_sequence(f, ids, emb))
            else:
                parts.append(_masked_mean(emb, x))
        parts.extend(self.extra_parts(ids))
        return tf.squeeze(self.mlp(tf.concat(parts, axis=-1), training=training), axis=-1)

    def call(self, inputs, training=False):
        return self.logits_from_ids(self.lookup(inputs), training=training)

    def encode_items(self, item_features: Mapping[str, Any]) -> Dict[str, tf.Tensor]:
        """Item features → the form `candidate_logits(..., items_encoded=True)` takes:
        vocabulary ids as int32, numeric values standardized (float32)."""
        return {k: to_encoded(v) for k, v in self.lookup(item_features, "item").items()}

    def candidate_logits(self, user_features: Mapping[str, Any], item_features: Mapping[str, Any],
                         user_index=None, items_encoded: bool = False) -> tf.Tensor:
        """Logits ``[N]`` of N candidates: of one user (user tensors with batch 1 or N), or
        with `user_index` ``[N]``, of several users (user tensors with U rows, candidate i
        belonging to row ``user_index[i]``). With `items_encoded`, `item_features` come
        from `encode_items`."""
        if items_encoded:
            missing = [f.name for f in self.schema.item_features if f.name not in item_features]
            if missing:
                raise ValueError(f"The ranking model needs the encoded item features {missing} "
                                 f"(inputs have {sorted(item_features)}).")
            items = {f.name: (tf.cast(item_features[f.name], tf.int64) if f.kind != Kind.NUMERIC
                              else tf.cast(item_features[f.name], tf.float32)) for f in self.schema.item_features}
        else:
            items = self.lookup(item_features, "item")
        n = tf.shape(items[ITEM_ID])[0]
        user = self.lookup(user_features, "user")
        if user_index is None:
            user = {k: _broadcast_rows(v, n) for k, v in user.items()}
        else:
            user = {k: tf.gather(v, user_index) for k, v in user.items()}
        return self.logits_from_ids({**user, **items}, training=False)

    def score_candidates(self, user_features: Mapping[str, Any], item_features: Mapping[str, Any]) -> tf.Tensor:
        """Click probabilities ``[N]`` of N candidates for one user.

        Args:
          user_features: the user's features, unbatched (categorical ``[]``, sequence
            ``[L]``), with batch 1 (``[1]``, ``[1, L]``) or, as `candidate_logits`
            takes them, with batch N (row i for candidate i). Several users' candidates
            are scored by `candidate_logits` with `user_index`.
          item_features: the candidates' features, ``[N]`` / ``[N, L]``.
        """
        items = {name: tf.convert_to_tensor(item_features[name], dtype=spec.dtype)
                 for name, spec in self.schema.tensor_specs("item").items()}
        n = items[ITEM_ID].shape[0]
        user = {}
        for name, spec in self.schema.tensor_specs("user").items():
            if name not in user_features:
                raise ValueError(f"`user_features` lacks {name!r}")
            x = tf.convert_to_tensor(user_features[name], dtype=spec.dtype)
            user[name] = x[tf.newaxis] if x.shape.rank == spec.shape.rank - 1 else x
            if user[name].shape[0] not in (1, n):
                raise ValueError(f"`user_features` should hold one user (batch 1) or one row per candidate "
                                 f"(batch {n}). Received: user_features[{name!r}] with batch {user[name].shape[0]} "
                                 f"for {n} candidates")
        return tf.sigmoid(self.candidate_logits(user, items))

    def tensor_specs(self):
        """``(user specs, item specs)`` of the scoring signatures: every feature of the schema."""
        return self.schema.tensor_specs("user"), self.schema.tensor_specs("item")

    def serving_function(self):
        """Concrete function for the ``serving_default`` signature (see the module docstring)."""
        return candidate_scoring_function(self, *self.tensor_specs())

    def multi_user_function(self):
        """Concrete function for the ``score_users`` signature (`multi_user_scoring_function`)."""
        return multi_user_scoring_function(self, *self.tensor_specs())

    # -- accounting / config -------------------------------------------------------
    def coaction_parameter_count(self) -> int:
        """Parameters spent on feature co-action (the CAN tables or the Cartesian tables)."""
        return 0

    def get_config(self):
        # Attributes holding dicts/lists are wrapped by Keras' tracking: hand back plain ones.
        return {"schema": self.schema.to_dict(),
                "vocabularies": {k: list(v) for k, v in self.vocabularies.items()},
                "config": self.ranking_config.to_dict(),
                "numeric_stats": {k: list(v) for k, v in self.numeric_stats.items()}, "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@keras.utils.register_keras_serializable(package="recfunnel")
class DNN(RankingModel):
    """Embeddings + MLP (the common base, no interaction modelling)."""

    model_type = "dnn"


@keras.utils.register_keras_serializable(package="recfunnel")
class DIN(RankingModel):
    """The base with the history pooled by target attention on the candidate's item id.

    References:
      Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018.
    """

    model_type = "din"

    def __init__(self, schema, vocabularies, config=None, numeric_stats=None, **kwargs):
        super().__init__(schema, vocabularies, config, numeric_stats, **kwargs)
        if self.schema.sequence_feature is None:
            raise ValueError(f"DIN needs a sequence feature; the schema {self.schema.name!r} has none")
        self.attention = TargetAttentionPooling(self.ranking_config.attention_units, name="target_attention")

    def pool_sequence(self, feature, ids, embeddings):
        query = self.embeddings[ITEM_ID](ids[ITEM_ID])
        return self.attention(query, embeddings, ids[feature.name])


def _coaction_regularizer(config: RankingConfig):
    """The L2 penalty of a co-action table (`RankingConfig.coaction_l2`), or None."""
    return keras.regularizers.L2(config.coaction_l2) if config.coaction_l2 else None


@keras.utils.register_keras_serializable(package="recfunnel")
class CartesianDNN(RankingModel):
    """The base plus one embedded Cartesian-product id per co-action pair.

    Pair (u, i) gets a table of ``min((|V_u| − 1)(|V_i| − 1), cartesian_max_buckets) + 1``
    rows (row 0 = padding); crosses with a multi-valued or sequence side are mean-pooled.
    """

    model_type = "cartesian"

    def __init__(self, schema, vocabularies, config=None, numeric_stats=None, **kwargs):
        super().__init__(schema, vocabularies, config, numeric_stats, **kwargs)
        cfg = self.ranking_config
        item_names, user_names = coaction_features(self.schema, cfg)
        self.pairs = [(u, i) for i in item_names for u in user_names]
        self.pair_buckets = {}
        self.cross_embeddings = {}
        for u, i in self.pairs:
            key = f"{u}_x_{i}"
            product = (self.vocab_size(u) - 1) * (self.vocab_size(i) - 1)
            self.pair_buckets[key] = int(min(product, cfg.cartesian_max_buckets))
            self.cross_embeddings[key] = keras.layers.Embedding(
                self.pair_buckets[key] + 1, cfg.cartesian_dim or cfg.embedding_dim,
                embeddings_regularizer=_coaction_regularizer(cfg), name=f"{key}_cross_embedding")

    def extra_parts(self, ids):
        parts = []
        for u, i in self.pairs:
            key = f"{u}_x_{i}"
            cross = cartesian_ids(ids[u], ids[i], self.vocab_size(u), self.vocab_size(i), self.pair_buckets[key])
            parts.append(_masked_mean(self.cross_embeddings[key](cross), cross))
        return parts

    def coaction_parameter_count(self) -> int:
        return int(sum(e.input_dim * e.output_dim for e in self.cross_embeddings.values()))


@keras.utils.register_keras_serializable(package="recfunnel")
class CAN(RankingModel):
    """The base plus the co-action unit of every (user feed, item induction) pair.

    Co-action tables (parameter independence): each induction feature has a table of
    ``induction_dim`` columns (`co_action.induction_dim`), each feed feature a table of
    ``coaction_feed_dim`` columns. A multi-valued induction feature averages its
    values' ``P_induction``. The outputs (``num_feeds × output_dim`` per induction
    feature) join the MLP input.

    References:
      Bian et al., "CAN: Feature Co-Action for Click-Through Rate Prediction", WSDM 2022.
    """

    model_type = "can"

    def __init__(self, schema, vocabularies, config=None, numeric_stats=None, **kwargs):
        super().__init__(schema, vocabularies, config, numeric_stats, **kwargs)
        cfg = self.ranking_config
        self.induction_features, self.feed_features = coaction_features(self.schema, cfg)
        self.unit = CoActionUnit(
            feed_dim=cfg.coaction_feed_dim, layer_sizes=cfg.coaction_layer_sizes, use_bias=cfg.coaction_use_bias,
            activation=cfg.coaction_activation, orders=cfg.coaction_orders, order_independent=cfg.order_independent,
            num_feeds=len(self.feed_features), combination_independent=cfg.combination_independent,
            combine_orders=cfg.combine_orders, sequence_pooling=cfg.sequence_pooling, name="co_action")
        self.induction_embeddings = {
            name: keras.layers.Embedding(self.vocab_size(name), self.unit.induction_dim,
                                         embeddings_initializer=cfg.coaction_initializer,
                                         embeddings_regularizer=_coaction_regularizer(cfg),
                                         name=f"{name}_induction_embedding")
            for name in self.induction_features}
        self.feed_embeddings = {
            name: keras.layers.Embedding(self.vocab_size(name), cfg.coaction_feed_dim,
                                         embeddings_initializer=cfg.coaction_initializer,
                                         embeddings_regularizer=_coaction_regularizer(cfg),
                                         name=f"{name}_feed_embedding")
            for name in self.feed_features}

    def extra_parts(self, ids):
        feeds, masks = [], []
        for name in self.feed_features:
            x = ids[name]
            feeds.append(self.feed_embeddings[name](x))
            masks.append(tf.not_equal(x, 0) if x.shape.rank == 2 else None)
        inductions = []
        for name in self.induction_features:
            x = ids[name]
            p = self.induction_embeddings[name](x)
            inductions.append(_masked_mean(p, x) if x.shape.rank == 2 else p)
        # All induction features in one call: [B, I, K] -> [B, I, feeds × output_dim].
        out = self.unit(tf.stack(inductions, axis=1), feeds, masks)
        return [tf.reshape(out, [-1, len(self.induction_features) * len(self.feed_features) * self.unit.output_dim])]

    def coaction_parameter_count(self) -> int:
        tables = list(self.induction_embeddings.values()) + list(self.feed_embeddings.values())
        return int(sum(e.input_dim * e.output_dim for e in tables))


MODELS = {"dnn": DNN, "din": DIN, "cartesian": CartesianDNN, "can": CAN}


def build_ranker(model_type: str, schema, vocabularies, config=None, numeric_stats=None, **kwargs) -> RankingModel:
    """``"dnn"``, ``"din"``, ``"cartesian"`` or ``"can"`` → the model."""
    if model_type not in MODELS:
        raise ValueError(f"`model_type` should be one of {MODEL_TYPES}. Received: model_type={model_type!r}")
    return MODELS[model_type](schema, vocabularies, config, numeric_stats, **kwargs)


def export_ranker(model: RankingModel, path: str) -> str:
    """Writes a SavedModel whose ``serving_default`` is `score_candidates`.

    Signature inputs, one per schema feature, named by the feature: user features
    ``[1]`` string / ``[1, L]`` string / ``[1]`` float32 (one user, broadcast to every
    candidate; N rows are accepted too), item features ``[N]`` / ``[N, L]`` / ``[N]``.
    Outputs: ``scores`` ``[N]`` click probabilities, ``logits`` ``[N]``. A second
    signature, ``score_users``, takes user features with U rows and ``user_index``
    ``[N]`` int32 (`multi_user_scoring_function`); ``encode_items`` and
    ``score_users_encoded`` score items encoded once in advance (`scoring_signatures`).
    """
    signatures = scoring_signatures(model)
    module = tf.Module()
    # The lookups' tables and the variables travel with the signature.
    module.model = model
    tf.saved_model.save(module, path, signatures=signatures)
    return path
