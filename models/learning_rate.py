"""Epoch-wise learning-rate schedules for training.

Formula, for epoch e = 0, 1, …, E − 1 of E, base rate η and factor d:

  constant: η
  step:     η · d^(number of boundaries b ≤ e)   (boundaries in completed epochs)
  cosine:   η · (d + (1 − d) · ½ (1 + cos(π e / (E − 1))))   (η at the first epoch, η·d at the last)

The rate is set at the start of each epoch, so a run resumed at epoch e (Keras'
`BackupAndRestore`) trains on the rate an uninterrupted run would use there.
`learning_rate_at` is the pure function; `EpochLearningRate` applies it during `fit`.
"""

from __future__ import annotations

import math
from typing import Sequence

from models.tf_compat import keras

SCHEDULES = ("constant", "step", "cosine")


def learning_rate_at(epoch: int, base: float, schedule: str = "constant", epochs: int = 1,
                     decay: float = 0.1, boundaries: Sequence[int] = ()) -> float:
    """The learning rate of 0-based `epoch` (see the module docstring for the formulas).

    Args:
      epoch: the epoch about to be trained, 0-based.
      base: η, the rate of the first epoch.
      schedule: ``constant``, ``step`` or ``cosine``.
      epochs: E, the run's number of epochs (``cosine``).
      decay: d: the factor of each boundary (``step``), the final fraction of η (``cosine``).
      boundaries: completed-epoch counts after which ``step`` multiplies the rate by d;
        ``(8,)`` trains epochs 0–7 at η and the rest at η·d.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"`schedule` should be one of {', '.join(SCHEDULES)}. Received: {schedule!r}")
    if epoch < 0 or epochs < 1:
        raise ValueError(f"`epoch` should be >= 0 and `epochs` >= 1. Received: epoch={epoch}, epochs={epochs}")
    if not 0 <= decay <= 1 or (schedule == "step" and decay == 0):
        raise ValueError("`decay` should be in (0, 1] (in [0, 1] with the cosine schedule). "
                         f"Received: decay={decay}, schedule={schedule!r}")
    if any(b < 1 for b in boundaries) or list(boundaries) != sorted(set(boundaries)):
        raise ValueError(f"`boundaries` should be increasing epoch counts >= 1. Received: {list(boundaries)}")
    if schedule == "constant":
        return float(base)
    if schedule == "step":
        return float(base * decay ** sum(1 for b in boundaries if b <= epoch))
    if epochs == 1:
        return float(base)
    progress = min(epoch, epochs - 1) / (epochs - 1)
    return float(base * (decay + (1.0 - decay) * 0.5 * (1.0 + math.cos(math.pi * progress))))


@keras.utils.register_keras_serializable(package="recfunnel")
class EpochLearningRate(keras.callbacks.Callback):
    """Sets the optimizer's learning rate to `learning_rate_at(epoch, ...)` before each epoch.

    Args: as `learning_rate_at`, except `epoch`. `history` holds the rate of each trained epoch.
    """

    def __init__(self, base: float, schedule: str, epochs: int, decay: float = 0.1,
                 boundaries: Sequence[int] = ()):
        super().__init__()
        learning_rate_at(0, base, schedule, epochs, decay, boundaries)  # validates the arguments
        self.base, self.schedule, self.epochs = float(base), schedule, int(epochs)
        self.decay, self.boundaries = float(decay), tuple(int(b) for b in boundaries)
        self.history = []

    def on_epoch_begin(self, epoch, logs=None):
        rate = learning_rate_at(epoch, self.base, self.schedule, self.epochs, self.decay, self.boundaries)
        self.model.optimizer.learning_rate.assign(rate)
        self.history.append(rate)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = self.history[-1]

    def get_config(self):
        return {"base": self.base, "schedule": self.schedule, "epochs": self.epochs, "decay": self.decay,
                "boundaries": list(self.boundaries)}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
