"""Self-supervised auxiliary task for the item tower: augmentations and loss.

Pure functions only (arrays in, arrays out); the Keras wiring into the item
tower is built on top of them.

References: Yao et al., "Self-supervised Learning for Large-scale Item
Recommendations", CIKM 2021.
"""

from __future__ import annotations

import numpy as np

from models.tf_compat import keras, tf


def random_feature_masks(num_features: int, rng: np.random.Generator):
    """RFM: a random split of the features into two disjoint halves.

    Returns two boolean arrays ``[num_features]`` (True = masked in that view);
    they are complementary: ``mask_a ^ mask_b`` is all True.
    """
    if num_features < 2:
        raise ValueError(f"`num_features` should be at least 2. Received: num_features={num_features}")
    order = rng.permutation(num_features)
    mask_a = np.zeros(num_features, dtype=bool)
    mask_a[order[: num_features // 2]] = True
    return mask_a, ~mask_a


def correlated_feature_masks(mutual_information, rng: np.random.Generator):
    """CFM: mask a uniformly drawn seed feature with its ⌊k/2⌋ most correlated features.

    Args:
      mutual_information: ``[k, k]`` pairwise MI (``feature_mi.json`` "mi").
    Returns two complementary boolean masks ``[k]``; view A masks the seed and
    its ⌊k/2⌋ - 1 highest-MI partners (⌊k/2⌋ features in all), view B masks the rest.
    """
    mi = np.asarray(mutual_information, dtype=np.float64)
    if mi.ndim != 2 or mi.shape[0] != mi.shape[1] or mi.shape[0] < 2:
        raise ValueError(f"`mutual_information` should be a square matrix of size >= 2. "
                         f"Received: shape={mi.shape}")
    k = mi.shape[0]
    seed = int(rng.integers(k))
    scores = mi[seed].copy()
    scores[seed] = np.inf  # the seed itself is always in the masked group
    group = np.argsort(-scores, kind="stable")[: k // 2]
    mask_a = np.zeros(k, dtype=bool)
    mask_a[group] = True
    return mask_a, ~mask_a


def multi_value_dropout(ids, rate: float, rng: np.random.Generator, keep_at_least_one: bool = True):
    """Drops individual values of a multi-valued feature (ids ``[B, L]``, 0 = padding).

    With `keep_at_least_one`, a row that had values keeps at least one of them.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"`rate` should be in [0, 1). Received: rate={rate}")
    ids = np.asarray(ids)
    present = ids != 0
    keep = (rng.random(ids.shape) >= rate) & present
    if keep_at_least_one:
        lost = present.any(axis=1) & ~keep.any(axis=1)
        for row in np.flatnonzero(lost):
            keep[row, rng.choice(np.flatnonzero(present[row]))] = True
    return np.where(keep, ids, 0)


def contrastive_loss(view_a, view_b, temperature: float):
    """Batch softmax contrastive loss over view pairs (Eq. 3 of Yao et al.).

    view_a, view_b: ``[B, D]``, rows L2-normalized here.
    Formula: L = -1/B Σ_i log( exp(s(a_i, b_i)/τ) / Σ_j exp(s(a_i, b_j)/τ) ),
    s = cosine similarity.
    """
    if temperature <= 0:
        raise ValueError(f"`temperature` should be positive. Received: temperature={temperature}")
    a = tf.math.l2_normalize(view_a, axis=-1)
    b = tf.math.l2_normalize(view_b, axis=-1)
    logits = tf.matmul(a, b, transpose_b=True) / temperature
    labels = tf.range(tf.shape(logits)[0])
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))


def uniform_item_dataset(item_features, batch_size: int, seed: int):
    """SSL item batches drawn uniformly (with replacement) from the item corpus.

    item_features: feature name → array ``[num_items, ...]`` (one row per item).
    Returns an infinite `tf.data.Dataset` of feature dicts ``[batch_size, ...]``,
    independent of the training interactions (so popular items are not over-drawn).
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` should be positive. Received: batch_size={batch_size}")
    sizes = {name: len(values) for name, values in item_features.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"`item_features` should have one row per item. Received: sizes={sizes}")
    num_items = next(iter(sizes.values()))
    tables = {name: tf.constant(values) for name, values in item_features.items()}
    indices = tf.data.Dataset.random(seed=seed).map(lambda x: tf.math.floormod(x, num_items))
    return indices.batch(batch_size).map(lambda idx: {n: tf.gather(t, idx) for n, t in tables.items()})


class FeatureMasking(keras.layers.Layer):
    """Replaces masked features by a learned per-feature default embedding.

    Inputs: feature embeddings ``[B, F, D]`` and a boolean mask ``[F]`` (True = masked).
    Output: ``[B, F, D]``.
    """

    def __init__(self, num_features: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.num_features, self.dim = int(num_features), int(dim)
        self.defaults = self.add_weight(name="default_embeddings", shape=(self.num_features, self.dim),
                                        initializer="zeros", trainable=True)

    def call(self, embeddings, mask):
        m = tf.cast(tf.reshape(mask, (1, self.num_features, 1)), embeddings.dtype)
        return embeddings * (1.0 - m) + self.defaults[tf.newaxis] * m

    def get_config(self):
        return {**super().get_config(), "num_features": self.num_features, "dim": self.dim}
