"""Shared by the retrieval benchmarks: train, export and evaluate one variant on prepared data."""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Tuple


def train_and_evaluate(cfg, base: str, name: str, callbacks=()) -> Tuple[Dict[str, Any], Dict[str, Any], float]:
    """Trains the two-tower model of `cfg` in ``base/name`` and evaluates it over the full corpus.

    `base` holds the dataset and statistics (`pipeline.job.stage_data` / `stage_stats`,
    done once); the variant's workdir links to them, so every variant trains on the same
    data; `callbacks` go to Keras' fit. Returns (training summary, evaluation metrics
    by `cfg.evaluation`, training seconds).
    """
    from pipeline import job
    from pipeline.evaluation import evaluate_retrieval

    w = os.path.join(base, name)
    os.makedirs(w)
    for d in (job.DATA_DIR, job.STATS_DIR):
        os.symlink(os.path.join(base, d), os.path.join(w, d))
    start = time.perf_counter()
    model, summary = job.stage_train(cfg, w, callbacks=callbacks)
    seconds = time.perf_counter() - start
    job.stage_export(model, w, 1)
    job.stage_index(cfg, w, 1)
    return summary, evaluate_retrieval(w, 1, cfg.evaluation), seconds


def epoch_evaluation(data_dir: str, evaluation_config, log=print):
    """A Keras callback that evaluates the model being trained on the test split after every
    epoch (`pipeline.evaluation.ExactEvaluator`: exact search, training items removed) and
    keeps the figures in its ``rows`` (one dict per epoch: ``epoch`` counted from 1, the epoch's
    mean training loss as ``train_loss``, its ``learning_rate`` under a schedule, then the test
    metrics)."""
    from models.tf_compat import keras
    from pipeline.evaluation import ExactEvaluator

    evaluator = ExactEvaluator(data_dir, evaluation_config)

    class EpochEvaluation(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.rows: List[Dict[str, float]] = []

        def on_epoch_end(self, epoch, logs=None):
            start = time.perf_counter()
            logs = logs or {}
            loss = logs.get("main_loss", logs.get("loss"))
            row = {"epoch": epoch + 1, **({"train_loss": float(loss)} if loss is not None else {}),
                   **({"learning_rate": float(logs["learning_rate"])} if "learning_rate" in logs else {}),
                   **evaluator(self.model.query_tower, self.model.item_tower)}
            self.rows.append(row)
            log(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch")
                + f" ({time.perf_counter() - start:.1f} s)")

    return EpochEvaluation()
