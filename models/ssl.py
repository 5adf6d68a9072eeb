"""Self-supervised auxiliary task for the item tower: augmentations and loss.

In-graph augmentations (`draw_masks`, and `models.towers.drop_values` for
multi-value dropout), the contrastive loss, the uniform item stream, and the Keras
layers that wire them into the item tower (`FeatureMasking`, `ItemSelfSupervision`).

References: Yao et al., "Self-supervised Learning for Large-scale Item
Recommendations", CIKM 2021.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from models.sampled_softmax import id_hashes, sampled_softmax_loss
from models.tf_compat import keras, tf


def contrastive_loss(view_a, view_b, temperature: float, ids=None):
    """Batch softmax contrastive loss over view pairs (Eq. 3 of Yao et al.).

    view_a, view_b: ``[B, D]``, rows L2-normalized here.
    Formula: L = -1/B Σ_i log( exp(s(a_i, b_i)/τ) / Σ_j exp(s(a_i, b_j)/τ) ),
    s = cosine similarity.
    ids: optional ``[B]`` item ids; another row of the same item is not used as a
    negative (a batch drawn with replacement, or from interactions, repeats items).
    """
    a = tf.math.l2_normalize(view_a, axis=-1)
    b = tf.math.l2_normalize(view_b, axis=-1)
    # Row i's positive is column i; with `ids`, other columns of the same item are
    # masked as accidental hits are in the retrieval loss (no ids: every row distinct).
    hashes = id_hashes(tf.range(tf.shape(a)[0]) if ids is None else ids)
    losses, _ = sampled_softmax_loss(a, b, positive_ids=hashes, candidate_ids=hashes, temperature=temperature)
    return tf.reduce_mean(losses)


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


SSL_PREFIX = "ssl/"


def with_ssl_items(dataset, ssl_items):
    """Zips training batches with SSL item batches, the latter under ``ssl/<feature>`` keys.

    The result ends with `dataset` (`ssl_items` is typically infinite,
    `uniform_item_dataset`).
    """
    def merge(batch, items):
        return {**batch, **{SSL_PREFIX + k: v for k, v in items.items()}}

    return tf.data.Dataset.zip((dataset, ssl_items)).map(merge)


MASKINGS = ("random", "correlated", "independent", "none")


def mutual_information_matrix(feature_names, mi_features, mi, item_id: str = "item_id",
                              normalized: bool = False, num_items: Optional[int] = None) -> np.ndarray:
    """Pairwise MI over the masked feature set, from the statistics job's ``feature_mi.json``.

    The statistics job measures MI between the categorical item features
    (`mi_features`, matrix `mi` with entropies H(f) on the diagonal). The item id is
    a feature too: every other feature is a function of it, so MI(id; f) = H(f).
    Features the job does not cover (numeric ones) get MI 0 with every other feature.

    With `normalized`, each pair's MI is divided by the geometric mean of the two
    entropies, NMI(a; b) = MI(a; b) / √(H(a)·H(b)) (1 on the diagonal, 0 where an
    entropy is 0), so that a feature with many values (the id above all: it shares all
    of H(f) with every f) is not every feature's closest partner for being large
    alone. The id's entropy is log `num_items` (each item once in the item table).

    Returns ``[F, F]`` in `feature_names` order.
    """
    mi = np.asarray(mi, dtype=np.float64)
    position = {name: i for i, name in enumerate(mi_features)}
    if mi.shape != (len(position), len(position)):
        raise ValueError(f"`mi` should be {len(position)}x{len(position)} for features {list(mi_features)}. "
                         f"Received: shape={mi.shape}")
    names = list(feature_names)
    out = np.zeros((len(names), len(names)))
    for a, fa in enumerate(names):
        for b, fb in enumerate(names):
            if fa in position and fb in position:
                out[a, b] = mi[position[fa], position[fb]]
            elif fa == item_id and fb in position:
                out[a, b] = mi[position[fb], position[fb]]
            elif fb == item_id and fa in position:
                out[a, b] = mi[position[fa], position[fa]]
    if not normalized:
        return out
    if item_id in names:
        if num_items is None or num_items < 1:
            raise ValueError(f"normalized MI with the item id needs `num_items` >= 1 (its entropy is log n). "
                             f"Received: num_items={num_items}")
        out[names.index(item_id), names.index(item_id)] = np.log(num_items)
    entropy = np.diag(out).copy()
    denominator = np.sqrt(np.outer(entropy, entropy))
    nmi = np.divide(out, denominator, out=np.zeros_like(out), where=denominator > 0)
    np.fill_diagonal(nmi, (entropy > 0).astype(np.float64))
    return nmi


def draw_masks(masking: str, num_features: int, mutual_information=None):
    """Two boolean feature masks ``[F]`` (True = masked), drawn in-graph (new ones every call).

    ``random`` (RFM) masks a random ⌊F/2⌋ of the features in view A and the rest in
    view B; ``correlated`` (CFM) masks a uniformly drawn seed feature and its
    ⌊F/2⌋ - 1 highest-MI partners in view A and the rest in view B; ``independent`` masks each
    feature with probability 1/2 in each view independently (feature dropout);
    ``none`` masks nothing (identity views: the loss is the spread-out regularizer).
    """
    if masking not in MASKINGS:
        raise ValueError(f"`masking` should be one of {MASKINGS}. Received: masking={masking!r}")
    f = int(num_features)
    if masking == "none":
        nothing = tf.zeros([f], tf.bool)
        return nothing, nothing
    if masking == "independent":
        return tf.random.uniform([f]) < 0.5, tf.random.uniform([f]) < 0.5
    if masking == "random":
        group = tf.random.shuffle(tf.range(f))[: f // 2]
    else:
        if mutual_information is None:
            raise ValueError("masking='correlated' needs the `mutual_information` matrix")
        mi = tf.convert_to_tensor(mutual_information, tf.float32)
        seed = tf.random.uniform([], 0, f, dtype=tf.int32)
        scores = tf.tensor_scatter_nd_update(tf.gather(mi, seed), [[seed]], [np.inf])
        group = tf.math.top_k(scores, k=f // 2, sorted=True).indices
    mask_a = tf.scatter_nd(group[:, tf.newaxis], tf.ones_like(group), [f]) > 0
    return mask_a, tf.logical_not(mask_a)


@keras.utils.register_keras_serializable(package="recfunnel")
class FeatureMasking(keras.layers.Layer):
    """Replaces masked features by a learned per-feature default embedding.

    Args:
      feature_sizes: width of each feature's slice of the concatenated embedding.
    Inputs: concatenated feature embeddings ``[B, sum(feature_sizes)]`` and a boolean
    mask ``[F]`` (True = masked). Output: same shape as the embeddings.
    """

    def __init__(self, feature_sizes, **kwargs):
        super().__init__(**kwargs)
        self.feature_sizes = [int(x) for x in feature_sizes]
        if not self.feature_sizes or min(self.feature_sizes) < 1:
            raise ValueError(f"`feature_sizes` should be positive. Received: feature_sizes={feature_sizes}")
        self.defaults = self.add_weight(name="default_embeddings", shape=(sum(self.feature_sizes),),
                                        initializer="zeros", trainable=True)

    def call(self, embeddings, mask):
        columns = tf.repeat(tf.cast(mask, embeddings.dtype), self.feature_sizes)[tf.newaxis]
        return embeddings * (1.0 - columns) + self.defaults[tf.newaxis] * columns

    def get_config(self):
        return {**super().get_config(), "feature_sizes": self.feature_sizes}


@keras.utils.register_keras_serializable(package="recfunnel")
class ItemSelfSupervision(keras.layers.Layer):
    """The auxiliary contrastive task on the item tower (Yao et al., Sec. 3).

    Each call draws one pair of feature masks for the batch, builds two views of
    every item (masked feature embeddings with learned defaults, plus independent
    multi-value dropout), encodes both with the item tower's embedding tables and
    MLP, and returns the contrastive loss of Eq. 3 summed over the batch (the
    convention of the main retrieval loss, so that `weight` is the paper's α).

    Args:
      feature_sizes: `Tower.feature_sizes()` of the item tower.
      masking: one of `MASKINGS`.
      mutual_information: ``[F, F]`` for ``correlated`` (`mutual_information_matrix`).
      value_dropout: rate of multi-value dropout (0 = off).
      temperature: τ of the loss.
      share: ``full`` (the views go through the main task's whole MLP) or
        ``partial`` (shared hidden layers, an SSL-only output layer of `output_dim`).
      output_dim: the tower's output size (for ``partial``).
    """

    def __init__(self, feature_sizes, masking: str = "correlated", mutual_information=None,
                 value_dropout: float = 0.0, temperature: float = 0.1, share: str = "full",
                 output_dim: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        if masking not in MASKINGS:
            raise ValueError(f"`masking` should be one of {MASKINGS}. Received: masking={masking!r}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"`temperature` should be a finite number > 0. Received: temperature={temperature}")
        if not 0.0 <= value_dropout < 1.0:
            raise ValueError(f"`value_dropout` should be in [0, 1). Received: value_dropout={value_dropout}")
        if share not in ("full", "partial"):
            raise ValueError(f"`share` should be 'full' or 'partial'. Received: share={share!r}")
        self.feature_sizes = [int(x) for x in feature_sizes]
        self.masking = masking
        self.value_dropout = float(value_dropout)
        self.temperature = float(temperature)
        self.share = share
        self.output_dim = None if output_dim is None else int(output_dim)
        self._mutual_information = None
        if masking == "correlated":
            if mutual_information is None:
                raise ValueError("masking='correlated' needs the `mutual_information` matrix")
            mi = np.asarray(mutual_information, dtype=np.float64)
            if mi.shape != (len(self.feature_sizes),) * 2:
                raise ValueError(f"`mutual_information` should be {len(self.feature_sizes)}x"
                                 f"{len(self.feature_sizes)}. Received: shape={mi.shape}")
            self._mutual_information = mi
        self.feature_masking = FeatureMasking(self.feature_sizes, name="feature_masking")
        self.head = None
        if share == "partial":
            if not self.output_dim:
                raise ValueError("share='partial' needs `output_dim`")
            self.head = keras.layers.Dense(self.output_dim, name="ssl_head")

    def views(self, tower, item_features, training=True):
        """The two encoded views ``([B, D], [B, D])`` of a batch of items."""
        mask_a, mask_b = draw_masks(self.masking, len(self.feature_sizes), self._mutual_information)
        encoded = []
        for mask in (mask_a, mask_b):
            emb = tower.embed_features(item_features, value_dropout=self.value_dropout if training else 0.0)
            encoded.append(tower.project(self.feature_masking(emb, mask), training=training, head=self.head))
        return encoded[0], encoded[1]

    def call(self, tower, item_features, training=True, item_ids=None):
        """Σ over the batch of the contrastive loss; rows sharing `item_ids` are not negatives."""
        view_a, view_b = self.views(tower, item_features, training=training)
        batch = tf.cast(tf.shape(view_a)[0], view_a.dtype)
        return contrastive_loss(view_a, view_b, self.temperature, ids=item_ids) * batch

    def get_config(self):
        return {**super().get_config(), "feature_sizes": self.feature_sizes, "masking": self.masking,
                "mutual_information": (None if self._mutual_information is None
                                       else self._mutual_information.tolist()),
                "value_dropout": self.value_dropout,
                "temperature": self.temperature, "share": self.share, "output_dim": self.output_dim}
