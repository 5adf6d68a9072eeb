"""Training a ranking model with epoch selection on held-out events.

The one training loop of the ranking stage (the scheduled job and `benchmarks/ranking.py`
use it): up to `epochs` passes; after each, AUC on a validation set; the weights of the
best epoch are kept and training stops at the first epoch that does not improve it.
Without a validation set every epoch is trained.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np
import pandas as pd

from models.ranking.metrics import auc
from models.tf_compat import tf


def last_events_mask(user_ids, timestamps, fraction: float) -> np.ndarray:
    """Boolean mask of each user's last ``ceil(fraction × n_u)`` events by time (at least one).

    Ties in time are broken by input position, so the mask depends only on the rows.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"`fraction` should be in (0, 1). Received: fraction={fraction!r}")
    users = np.asarray(user_ids).reshape(-1)
    times = np.asarray(timestamps).reshape(-1)
    if len(users) != len(times):
        raise ValueError(f"`user_ids` and `timestamps` should have the same length. "
                         f"Received: {len(users)} and {len(times)}")
    df = pd.DataFrame({"u": users, "t": times, "i": np.arange(len(users))})
    df = df.sort_values(["u", "t", "i"], kind="stable")
    position = df.groupby("u").cumcount().to_numpy()
    size = df.groupby("u")["u"].transform("size").to_numpy()
    n_last = np.maximum(1, np.ceil(fraction * size)).astype(int)
    mask = np.zeros(len(df), dtype=bool)
    mask[df["i"].to_numpy()] = position >= size - n_last
    return mask


def predict_probabilities(model, features: Mapping[str, Any], batch_size: int = 4096) -> np.ndarray:
    """Click probabilities ``[n]`` (float64) of a ranking model on feature arrays."""
    logits = model.predict(tf.data.Dataset.from_tensor_slices(dict(features)).batch(batch_size), verbose=0)
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64).reshape(-1)))


def fit_ranker(model, train: Tuple[Mapping[str, Any], np.ndarray],
               validation: Optional[Tuple[Mapping[str, Any], np.ndarray]] = None, *, epochs: int,
               batch_size: int, seed: int = 0,
               on_epoch: Optional[Callable[[int, Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Trains a compiled ranking model; returns ``{"train_loss", "validation_auc", "epochs", "seconds"}``.

    Args:
      train: ``(features, labels)``; features are numpy arrays or tensors by name.
      validation: optional ``(features, labels)`` used to choose the epoch.
      epochs: the maximum number of passes.
      on_epoch: called after each epoch with ``(epoch, {"loss", "validation_auc"})``.
    """
    if isinstance(epochs, bool) or int(epochs) != epochs or epochs < 1:
        raise ValueError(f"`epochs` should be a positive integer. Received: epochs={epochs!r}")
    features, labels = train
    labels = np.asarray(labels, np.float32).reshape(-1)
    ds = (tf.data.Dataset.from_tensor_slices((dict(features), labels))
          .shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
          .batch(batch_size).prefetch(2))
    score = None
    if validation is not None:
        def score():
            return auc(validation[1], predict_probabilities(model, validation[0]))
    return fit_with_epoch_selection(model, ds, epochs, score, on_epoch=on_epoch, what="ranking")


def fit_with_epoch_selection(model, ds, epochs: int, validation_score: Optional[Callable[[], float]] = None, *,
                             on_epoch: Optional[Callable[[int, Dict[str, Any]], None]] = None,
                             what: str = "ranking", patience: int = 1, score_name: str = "validation_auc",
                             higher_is_better: bool = True) -> Dict[str, Any]:
    """Up to `epochs` passes of the compiled `model` over `ds`, choosing the epoch.

    After each pass `validation_score()` (when given; validation AUC by default) is
    computed; training stops after `patience` consecutive epochs that do not improve on
    the best one (higher, or lower when not `higher_is_better`), and the best epoch's
    weights are kept. Returns ``{"train_loss", score_name, "epochs", "seconds"}``
    (``epochs``: the kept one); a non-finite loss raises FloatingPointError naming
    `what` and the epoch.
    """
    if isinstance(patience, bool) or not isinstance(patience, (int, np.integer)) or patience < 1:
        raise ValueError(f"`patience` should be a positive integer. Received: patience={patience!r}")
    start = time.perf_counter()
    sign = 1.0 if higher_is_better else -1.0
    best, best_weights, best_epoch, curve, losses, stale = -np.inf, None, 0, [], [], 0
    for epoch in range(int(epochs)):
        history = model.fit(ds, epochs=1, verbose=0)
        loss = float(history.history["loss"][-1])
        if not np.isfinite(loss):
            raise FloatingPointError(f"{what} training diverged at epoch {epoch + 1}: loss {loss}")
        losses.append(round(loss, 5))
        value = None
        if validation_score is not None:
            value = float(validation_score())
            if not np.isfinite(value):
                raise FloatingPointError(f"{what} {score_name} is {value} at epoch {epoch + 1}")
            curve.append(round(value, 5))
        if on_epoch is not None:
            on_epoch(epoch, {"loss": loss, score_name: value})
        if value is None:
            continue
        if sign * value > best:
            best, best_weights, best_epoch, stale = sign * value, model.get_weights(), epoch + 1, 0
        else:
            stale += 1
            if stale >= patience:
                break
    if best_weights is not None:
        model.set_weights(best_weights)
    return {"train_loss": losses, score_name: curve, "epochs": best_epoch if curve else len(losses),
            "seconds": round(time.perf_counter() - start, 3)}
