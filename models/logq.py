"""The item sampling-probability table q(i) used for logQ correction.

References:
  Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
  Recommendations", RecSys 2019 (logQ correction of in-batch sampled softmax).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from models.features import OOV_TOKEN, PAD_TOKEN
from models.tf_compat import keras, tf


def log_q_with_floor(probabilities: np.ndarray, floor: float) -> np.ndarray:
    """log max(q, floor): items never seen in training get the floor, not log 0."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    bad = np.flatnonzero(~((probabilities >= 0) & (probabilities <= 1)))  # NaN fails both
    if len(bad):
        raise ValueError(f"`probabilities` should be in [0, 1]. Received: probabilities[{bad[0]}]="
                         f"{probabilities[bad[0]]} ({len(bad)} of {len(probabilities)} values are not)")
    if not 0 < floor <= 1:
        raise ValueError(f"`floor` should be in (0, 1]. Received: floor={floor}")
    return np.log(np.maximum(probabilities, floor))


@keras.utils.register_keras_serializable(package="recfunnel")
class ItemLogQ(keras.layers.Layer):
    """Looks up log q(i) by item id; unknown ids get log of the `floor` probability.

    Args:
      item_ids: ids of the table.
      probabilities: q(i) for each id (count / total training interactions).
      floor: probability used for unknown or zero-count items; defaults to half of
        the smallest positive probability.

    Call: item ids ``[B]`` string → ``[B]`` float32 log q.
    """

    def __init__(self, item_ids: Sequence[str], probabilities: Sequence[float], floor: float = None, **kwargs):
        super().__init__(**kwargs)
        ids = [str(i) for i in item_ids]
        probs = np.asarray(probabilities, dtype=np.float64)
        if len(ids) != len(probs):
            raise ValueError(f"`item_ids` and `probabilities` should have the same length. "
                             f"Received: {len(ids)} and {len(probs)}")
        if len(ids) == 0:
            raise ValueError("`item_ids` is empty.")
        if floor is None:
            positive = probs[probs > 0]
            floor = float(positive.min() / 2) if len(positive) else 1.0 / len(ids)
        self.item_ids = ids
        self.probabilities = [float(p) for p in probs]
        self.floor = float(floor)
        log_q = log_q_with_floor(probs, self.floor)
        self.lookup = keras.layers.StringLookup(vocabulary=[i for i in ids if i not in (PAD_TOKEN, OOV_TOKEN)],
                                                num_oov_indices=1, mask_token=None, oov_token=OOV_TOKEN)
        # Row 0 is the OOV bucket.
        table = np.concatenate([[np.log(self.floor)], log_q[[i not in (PAD_TOKEN, OOV_TOKEN) for i in ids]]])
        self.table = tf.constant(table.astype(np.float32))

    def call(self, item_ids):
        return tf.gather(self.table, self.lookup(item_ids))

    def get_config(self):
        return {**super().get_config(), "item_ids": self.item_ids,
                "probabilities": self.probabilities, "floor": self.floor}
