"""Shared by the retrieval benchmarks: train, export and evaluate one variant on prepared data."""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Tuple


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
