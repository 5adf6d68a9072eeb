"""The AutoFAS search space: feature masks, Mixop layers and the super-network.

    features ─► FeatureEmbedding ─► blocks [B, d_i] ─► FeatureMask (m_i ~ Bernoulli(θ_i))
        ─► concat [B, D] ─► Mixop_1 … Mixop_L ─► Dense(1) ─► logit [B]

* **Feature masks.** One real parameter θ_i ∈ [0, 1] per feature, the probability of
  keeping it. Each training batch draws one mask vector ``m ~ Bernoulli(θ)`` (a whole
  feature block is kept or zeroed for the batch). Gradients reach θ through the
  **straight-through estimator**: ``m̃ = θ + stop_gradient(m − θ)``, so the forward pass
  uses the hard 0/1 mask and the backward pass takes ∂m/∂θ = 1. Why straight-through
  rather than a relaxed (Concrete/Gumbel-sigmoid) mask: the super-network then only
  ever sees inputs the derived network can see (a feature is present or absent, never
  scaled by 0.37), so the search does not learn to rely on fractional features that
  the derive step removes; there is no temperature to anneal; and at θ = 0 or 1 the
  mask is exactly deterministic. The price is a biased gradient, which the paper
  accepts as well.
* **Mixop.** N candidate operators — ReLU dense layers of different widths and the
  identity (width `IDENTITY` = 0, the zero-cost operator that lets the network become
  shallower) — applied to the same input and mixed by ``softmax(α_l)``. Outputs are
  zero-padded to one common width ``H = max(D, widths)`` so they can be summed; a
  dense operator reading a zero-padded input equals the same operator on the unpadded
  input, which keeps the derived network faithful.
* **Derive.** Features with ``θ_i ≥ keep_threshold`` (at least one item feature: the
  strongest one if none passes) and the operator of largest α per Mixop (identities
  drop out of the chain) — `derive_architecture`.

References:
  Li et al., "AutoFAS: Automatic Feature and Architecture Selection for Pre-Ranking
  System", KDD 2022.
  Bengio et al., "Estimating or Propagating Gradients Through Stochastic Neurons", 2013.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from models.features import Schema
from models.preranking.embedding import FeatureEmbedding
from models.preranking.latency import IDENTITY
from models.tf_compat import keras, tf


def straight_through_bernoulli(probabilities: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Hard ``m ~ Bernoulli(p)`` forward, identity gradient to ``p`` backward.

    Args:
      probabilities: ``[F]`` in [0, 1].
      seed: ``[2]`` int32 seed of the stateless draw (one draw per call).
    """
    u = tf.random.stateless_uniform(tf.shape(probabilities), seed=seed)  # in [0, 1)
    hard = tf.cast(u < probabilities, probabilities.dtype)
    return probabilities + tf.stop_gradient(hard - probabilities)


@keras.utils.register_keras_serializable(package="recfunnel")
class FeatureMask(keras.layers.Layer):
    """θ_i and the masked feature blocks.

    Args:
      num_features: F.
      initial_probability: starting θ for every feature.
      keep_threshold: θ at or above which a feature counts as kept when not sampling.

    Call: ``layer(blocks, seed=None, training=False)`` with a list of F ``[B, d_i]`` →
    the blocks times ``m_i``: sampled with the straight-through estimator when
    `training` (one draw per call, from `seed`), ``1[θ_i ≥ keep_threshold]`` otherwise.
    """

    def __init__(self, num_features: int, initial_probability: float = 0.9, keep_threshold: float = 0.5,
                 **kwargs):
        super().__init__(**kwargs)
        if isinstance(num_features, bool) or int(num_features) != num_features or num_features < 1:
            raise ValueError(f"`num_features` should be a positive integer. Received: num_features={num_features!r}")
        for name, value in (("initial_probability", initial_probability), ("keep_threshold", keep_threshold)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"`{name}` should be in [0, 1]. Received: {name}={value!r}")
        self.num_features = int(num_features)
        self.initial_probability = float(initial_probability)
        self.keep_threshold = float(keep_threshold)
        self.theta = self.add_weight(
            name="theta", shape=[self.num_features],
            initializer=keras.initializers.Constant(self.initial_probability), trainable=True)

    def keep_probabilities(self) -> tf.Tensor:
        """θ clipped to [0, 1] (the optimizer step is followed by the same clip)."""
        return tf.clip_by_value(self.theta, 0.0, 1.0)

    def masks(self, seed=None, training=False) -> tf.Tensor:
        p = self.keep_probabilities()
        if training:
            if seed is None:
                raise ValueError("`seed` is needed to sample the feature masks while training")
            return straight_through_bernoulli(p, tf.cast(seed, tf.int32))
        return tf.cast(p >= self.keep_threshold, tf.float32)

    def call(self, blocks, seed=None, training=False):
        if len(blocks) != self.num_features:
            raise ValueError(f"FeatureMask expects {self.num_features} blocks. Received: {len(blocks)}")
        m = self.masks(seed, training)
        return [x * m[i] for i, x in enumerate(blocks)]

    def get_config(self):
        return {**super().get_config(), "num_features": self.num_features,
                "initial_probability": self.initial_probability, "keep_threshold": self.keep_threshold}


@keras.utils.register_keras_serializable(package="recfunnel")
class MixOp(keras.layers.Layer):
    """One searched layer: ``Σ_j softmax(α)_j · pad_H(op_j(x))``.

    Args:
      operator_widths: width of each candidate; `IDENTITY` (0) = the identity.
      output_width: H, the common (zero-padded) output width; at least every
        operator width and the input width.

    Call: ``[B, a]`` (a ≤ H) → ``[B, H]``.
    """

    def __init__(self, operator_widths: Sequence[int], output_width: int, **kwargs):
        super().__init__(**kwargs)
        self.operator_widths = [int(w) for w in operator_widths]
        if len(self.operator_widths) < 1 or any(w < 0 for w in self.operator_widths):
            raise ValueError(f"`operator_widths` should be a non-empty list of widths >= 0 (0 = identity). "
                             f"Received: operator_widths={list(operator_widths)}")
        if len(set(self.operator_widths)) != len(self.operator_widths):
            raise ValueError(f"`operator_widths` should be distinct. Received: operator_widths={self.operator_widths}")
        self.output_width = int(output_width)
        if self.output_width < max(self.operator_widths):
            raise ValueError(f"`output_width` should be >= every operator width {self.operator_widths}. "
                             f"Received: output_width={output_width!r}")
        self.operators = {w: keras.layers.Dense(w, activation="relu", name=f"dense_{w}")
                          for w in self.operator_widths if w != IDENTITY}
        self.alpha = self.add_weight(name="alpha", shape=[len(self.operator_widths)],
                                     initializer="zeros", trainable=True)

    def build(self, input_shape):
        a = int(input_shape[-1])
        if a > self.output_width:
            raise ValueError(f"MixOp input width {a} exceeds `output_width`={self.output_width}")
        for op in self.operators.values():
            op.build(input_shape)
        super().build(input_shape)

    def operator_probabilities(self) -> tf.Tensor:
        return tf.nn.softmax(self.alpha)

    def _pad(self, x):
        return tf.pad(x, [[0, 0], [0, self.output_width - int(x.shape[-1])]])

    def call(self, x):
        probs = self.operator_probabilities()
        outs = [self._pad(x if w == IDENTITY else self.operators[w](x)) for w in self.operator_widths]
        return tf.add_n([probs[j] * o for j, o in enumerate(outs)])

    def get_config(self):
        return {**super().get_config(), "operator_widths": list(self.operator_widths),
                "output_width": self.output_width}


@keras.utils.register_keras_serializable(package="recfunnel")
class AutoFASSearch(keras.Model):
    """The super-network searched by AutoFAS.

    Args:
      schema: a `Schema` or its dict.
      vocabularies: vocabulary name → tokens.
      features: the candidate features (default: every feature of the schema).
      embedding_dim: width of the categorical blocks.
      num_mixops: L.
      operator_widths: the candidates of every Mixop (0 = identity).
      initial_probability: starting θ.
      keep_threshold: θ at or above which a feature is kept (evaluation, derive).
      numeric_stats: feature → (mean, std).

    Call: ``model(features, seed=None, training=False)`` → logits ``[B]``.
    Variables: `mask_variables` (θ), `architecture_variables` (α), `weight_variables`
    (embeddings, operators, head).
    """

    def __init__(self, schema, vocabularies: Mapping[str, Sequence[str]], features: Optional[Sequence[str]] = None,
                 embedding_dim: int = 8, num_mixops: int = 3, operator_widths: Sequence[int] = (0, 16, 32, 64),
                 initial_probability: float = 0.9, keep_threshold: float = 0.5,
                 numeric_stats: Optional[Mapping[str, Sequence[float]]] = None, **kwargs):
        super().__init__(**kwargs)
        schema = schema if isinstance(schema, Schema) else Schema.from_dict(schema)
        features = list(features) if features is not None else [f.name for f in schema.features]
        if isinstance(num_mixops, bool) or int(num_mixops) != num_mixops or num_mixops < 1:
            raise ValueError(f"`num_mixops` should be a positive integer. Received: num_mixops={num_mixops!r}")
        self.embedding = FeatureEmbedding(schema, vocabularies, features, embedding_dim, numeric_stats,
                                          name="features")
        self.schema = self.embedding.schema
        self.features = list(self.embedding.features)
        self.num_mixops = int(num_mixops)
        self.operator_widths = [int(w) for w in operator_widths]
        self.mask = FeatureMask(len(self.features), initial_probability, keep_threshold, name="feature_mask")
        self.input_width = int(sum(self.embedding.widths))
        hidden = max([self.input_width] + self.operator_widths)
        self.mixops = [MixOp(self.operator_widths, hidden, name=f"mixop_{l}") for l in range(self.num_mixops)]
        self.head = keras.layers.Dense(1, name="logit")

    @property
    def feature_widths(self) -> List[int]:
        return self.embedding.widths

    def call(self, inputs, seed=None, training=False):
        blocks = self.mask(self.embedding(inputs), seed=seed, training=training)
        h = tf.concat(blocks, axis=-1)
        for mixop in self.mixops:
            h = mixop(h)
        return tf.squeeze(self.head(h), axis=-1)

    # -- variable groups (the gradient block updates each from its own loss) ----------
    @property
    def mask_variables(self) -> List[tf.Variable]:
        return [self.mask.theta]

    @property
    def architecture_variables(self) -> List[tf.Variable]:
        return [m.alpha for m in self.mixops]

    @property
    def weight_variables(self) -> List[tf.Variable]:
        skip = {id(v) for v in self.mask_variables + self.architecture_variables}
        return [v for v in self.trainable_variables if id(v) not in skip]

    def operator_probabilities(self) -> List[tf.Tensor]:
        return [m.operator_probabilities() for m in self.mixops]

    def get_config(self):
        emb = self.embedding.get_config()
        return {"schema": emb["schema"], "vocabularies": emb["vocabularies"], "features": list(self.features),
                "embedding_dim": self.embedding.embedding_dim, "num_mixops": self.num_mixops,
                "operator_widths": list(self.operator_widths),
                "initial_probability": self.mask.initial_probability, "keep_threshold": self.mask.keep_threshold,
                "numeric_stats": emb["numeric_stats"], "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


@dataclasses.dataclass(frozen=True)
class DerivedArchitecture:
    """The outcome of a search.

    Attributes:
      features: kept features, in the schema's order.
      hidden_units: widths of the derived ReLU layers (identities removed).
      operators: chosen operator width per Mixop (0 = identity).
      keep_probabilities: θ of every candidate feature.
      operator_probabilities: softmax(α) of every Mixop.
    """

    features: Tuple[str, ...]
    hidden_units: Tuple[int, ...]
    operators: Tuple[int, ...]
    keep_probabilities: Mapping[str, float]
    operator_probabilities: Tuple[Tuple[float, ...], ...]

    def to_dict(self) -> Dict[str, Any]:
        return {"features": list(self.features), "hidden_units": list(self.hidden_units),
                "operators": ["identity" if w == IDENTITY else int(w) for w in self.operators],
                "keep_probabilities": {k: round(float(v), 4) for k, v in self.keep_probabilities.items()},
                "operator_probabilities": [[round(float(p), 4) for p in row] for row in self.operator_probabilities]}


def derive_architecture(keep_probabilities: Sequence[float], feature_names: Sequence[str],
                        feature_sides: Sequence[str], operator_probabilities: Sequence[Sequence[float]],
                        operator_widths: Sequence[int], keep_threshold: float = 0.5) -> DerivedArchitecture:
    """Pure derive rule (numpy): strongest features and the strongest operator per Mixop.

    Features with ``θ_i ≥ keep_threshold`` are kept; when no item feature passes, the
    item feature of largest θ is kept too (a pre-ranker must tell candidates apart).
    Ties between operators go to the earlier one in `operator_widths`.
    """
    theta = np.asarray(keep_probabilities, np.float64).reshape(-1)
    names, sides = list(feature_names), list(feature_sides)
    if not len(theta) == len(names) == len(sides):
        raise ValueError(f"`keep_probabilities`, `feature_names` and `feature_sides` should have the same length. "
                         f"Received: {len(theta)}, {len(names)}, {len(sides)}")
    kept = [i for i in range(len(names)) if theta[i] >= keep_threshold]
    items = [i for i in range(len(names)) if sides[i] == "item"]
    if not items:
        raise ValueError(f"the candidate features {names} hold no item feature")
    if not any(sides[i] == "item" for i in kept):
        kept.append(max(items, key=lambda i: (theta[i], -i)))
    kept = sorted(kept)
    widths = [int(w) for w in operator_widths]
    chosen = []
    for l, probs in enumerate(operator_probabilities):
        probs = np.asarray(probs, np.float64).reshape(-1)
        if len(probs) != len(widths):
            raise ValueError(f"`operator_probabilities[{l}]` should have {len(widths)} entries. Received: {len(probs)}")
        chosen.append(widths[int(np.argmax(probs))])
    return DerivedArchitecture(
        features=tuple(names[i] for i in kept), hidden_units=tuple(w for w in chosen if w != IDENTITY),
        operators=tuple(chosen), keep_probabilities={n: float(t) for n, t in zip(names, theta)},
        operator_probabilities=tuple(tuple(float(p) for p in np.asarray(row).reshape(-1))
                                     for row in operator_probabilities))


def derive_from_model(model: AutoFASSearch) -> DerivedArchitecture:
    """`derive_architecture` on a trained `AutoFASSearch`."""
    return derive_architecture(
        model.mask.keep_probabilities().numpy(), model.features,
        [model.schema.feature(n).side for n in model.features],
        [p.numpy() for p in model.operator_probabilities()], model.operator_widths, model.mask.keep_threshold)


__all__ = ["AutoFASSearch", "DerivedArchitecture", "FeatureMask", "MixOp", "derive_architecture",
           "derive_from_model", "straight_through_bernoulli"]
