"""Pre-ranking losses: the distilled click loss and the two AutoFAS search objectives.

Formula (per example, logits ``p`` of the pre-ranker, ``r`` of the ranker, label y):

    distill(y, r, p) = (1 − λ1) · BCE(y, σ(p)) + λ1 · (r − p)²

The distillation term compares *logits*: the pre-ranker must reproduce the ranker's
order of the candidates, and logits keep the differences between confident scores
that sigmoid probabilities squash.

AutoFAS (Li et al., Sec. 3.3), with E[·] from `models.preranking.latency`:

    Loss1 = BCE + λ · (E[latency] + E[latency'](α fixed))   → updates θ only
    Loss2 = (1 − λ1) · BCE + λ1 · mean (r − p)² + λ2 · E[latency'](θ fixed)  → α and weights

`PrerankerConfig.mask_objective = "distillation"` replaces the BCE of Loss1 by Loss2's
distilled task term, so that the masks keep what the ranker uses too.

The gradient block: θ receives ∂Loss1 only and (α, weights) receive ∂Loss2 only;
inside the latency terms the other group is a `stop_gradient` constant.

References:
  Li et al., "AutoFAS: Automatic Feature and Architecture Selection for Pre-Ranking
  System", KDD 2022.
"""

from __future__ import annotations

from typing import Tuple

from models.tf_compat import keras, tf


def distillation_terms(labels, teacher_logits, logits) -> Tuple[tf.Tensor, tf.Tensor]:
    """The two per-example terms of the distilled loss: ``(BCE(y, σ(p)), (r − p)²)``, each ``[B]``.

    Args:
      labels: ``[B]`` click labels in [0, 1].
      teacher_logits: ``[B]`` ranker logits r.
      logits: ``[B]`` pre-ranker logits p.
    """
    y = tf.reshape(tf.cast(labels, tf.float32), [-1])
    r = tf.reshape(tf.cast(teacher_logits, tf.float32), [-1])
    p = tf.reshape(tf.cast(logits, tf.float32), [-1])
    return tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=p), tf.square(r - p)


def distillation_loss(labels, teacher_logits, logits, distillation_weight: float) -> tf.Tensor:
    """Per-example ``(1 − λ1)·BCE(y, σ(p)) + λ1·(r − p)²``: ``[B]``.

    Args:
      labels, teacher_logits, logits: as `distillation_terms`.
      distillation_weight: λ1 in [0, 1].
    """
    _check_weight(distillation_weight)
    bce, squared = distillation_terms(labels, teacher_logits, logits)
    return (1.0 - distillation_weight) * bce + distillation_weight * squared


def _check_weight(distillation_weight) -> None:
    if not 0.0 <= float(distillation_weight) <= 1.0:
        raise ValueError(f"`distillation_weight` should be in [0, 1]. Received: "
                         f"distillation_weight={distillation_weight!r}")


@keras.utils.register_keras_serializable(package="recfunnel")
class DistillationLoss(keras.losses.Loss):
    """`distillation_loss` for `Model.fit`: ``y_true`` is ``[B, 2]`` = (label, ranker logit)."""

    def __init__(self, distillation_weight: float = 0.5, name: str = "distillation", **kwargs):
        super().__init__(name=name, **kwargs)
        _check_weight(distillation_weight)
        self.distillation_weight = float(distillation_weight)

    def call(self, y_true, y_pred):
        return distillation_loss(y_true[:, 0], y_true[:, 1], y_pred, self.distillation_weight)

    def get_config(self):
        return {**super().get_config(), "distillation_weight": self.distillation_weight}


__all__ = ["DistillationLoss", "distillation_loss", "distillation_terms"]
