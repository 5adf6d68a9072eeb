"""Feature drift of the item encoder, to choose when cross-batch negatives become reliable.

CBNS reuses item embeddings computed a few steps ago; they are good negatives only
once the encoder changes slowly. The paper measures that with the feature drift

Formula: D(t, Δt) = Σ_{i ∈ I} ‖g(i; θ_t) − g(i; θ_{t−Δt})‖₂

over a fixed item sample I. `FeatureDriftCallback` embeds the same items every
`every_n_steps` training steps and records D for Δt ∈ {1, 5, 10} measurement
intervals (Δt · every_n_steps steps). Reading the curve: drift falls steeply at the
start and then flattens; set `warmup_steps` to where the Δt = 1 curve has flattened
(for example where it first drops below 10–20% of its initial value), so the bank
never serves embeddings from a fast-moving encoder.

References:
  Wang et al., "Cross-Batch Negative Sampling for Training Two-Tower Recommenders",
  SIGIR 2021 (Eq. 5).
"""

from __future__ import annotations

import collections
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from models.features import feature_lists
from models.tf_compat import keras, tf


def feature_drift(now: np.ndarray, before: np.ndarray) -> float:
    """Σ_i ‖now_i − before_i‖₂ for two ``[N, D]`` embedding matrices of the same items."""
    now, before = np.asarray(now, np.float64), np.asarray(before, np.float64)
    if now.shape != before.shape:
        raise ValueError(f"embeddings should have the same shape. Received: {now.shape} and {before.shape}")
    return float(np.linalg.norm(now - before, axis=1).sum())


@keras.utils.register_keras_serializable(package="recfunnel")
class FeatureDriftCallback(keras.callbacks.Callback):
    """Records the item encoder's feature drift during `fit`.

    Args:
      item_model: maps the item features to ``[N, D]`` embeddings (the item tower).
      item_features: a fixed sample of items in the tower's input layout.
      every_n_steps: measurement interval in training steps.
      deltas: Δt values, in measurement intervals.
      log_dir: if given, drift is written there as TensorBoard scalars
        ``feature_drift/delta_<Δt>``.

    After training, `history` holds rows ``{"step", "delta", "drift"}``.
    """

    def __init__(self, item_model: Callable, item_features: Mapping[str, np.ndarray], every_n_steps: int = 50,
                 deltas: Sequence[int] = (1, 5, 10), log_dir: Optional[str] = None):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"`every_n_steps` should be positive. Received: every_n_steps={every_n_steps}")
        if not deltas or min(deltas) < 1:
            raise ValueError(f"`deltas` should be positive integers. Received: deltas={list(deltas)}")
        self.item_model = item_model
        self.item_features = {k: tf.constant(v) for k, v in item_features.items()}
        self.every_n_steps = int(every_n_steps)
        self.deltas = sorted(int(d) for d in deltas)
        self.history: List[Dict[str, float]] = []
        self._past: collections.deque = collections.deque(maxlen=max(self.deltas) + 1)
        self._step = 0
        self.log_dir = log_dir
        self._writer = tf.summary.create_file_writer(log_dir) if log_dir else None

    def _measure(self) -> None:
        emb = np.asarray(self.item_model(self.item_features, training=False))
        self._past.append(emb)
        for d in self.deltas:
            if len(self._past) > d:
                drift = feature_drift(self._past[-1], self._past[-1 - d])
                self.history.append({"step": self._step, "delta": d, "drift": drift})
                if self._writer is not None:
                    with self._writer.as_default():
                        tf.summary.scalar(f"feature_drift/delta_{d}", drift, step=self._step)

    def on_train_begin(self, logs=None):
        self._measure()

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.every_n_steps == 0:
            self._measure()

    def save_plot(self, path: str) -> None:
        """Writes the drift curves (one per Δt) as a PNG."""
        plot_feature_drift(self.history, self.every_n_steps, path)

    def get_config(self):
        if not isinstance(self.item_model, keras.layers.Layer):
            raise ValueError("`item_model` should be a Keras layer or model for the callback to have a config. "
                             f"Received: item_model={self.item_model!r}")
        return {"item_model": keras.layers.serialize(self.item_model),
                "item_features": feature_lists(self.item_features),
                "every_n_steps": self.every_n_steps, "deltas": list(self.deltas), "log_dir": self.log_dir}

    @classmethod
    def from_config(cls, config):
        return cls(**{**config, "item_model": keras.layers.deserialize(config["item_model"])})


def plot_feature_drift(rows: Sequence[Mapping[str, float]], every_n_steps: int, path: str) -> None:
    """PNG of drift rows ``{"step", "delta", "drift"}``, one curve per Δt (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for d in sorted({r["delta"] for r in rows}):
        mine = [r for r in rows if r["delta"] == d]
        ax.plot([r["step"] for r in mine], [r["drift"] for r in mine], label=f"Δt = {d * every_n_steps} steps")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("feature drift Σ‖g_t − g_{t−Δt}‖")
    ax.set_title("Item encoder feature drift (CBNS Eq. 5)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
