"""The pre-ranking stage of the scheduled job: AutoFAS distilled from the run's ranker.

It reads the same labelled events as the ranking stage (`pipeline.ranker_stage`), with
the same split: the ranker's training events (minus each user's last
`ranker.validation_fraction`, which choose the retraining epoch) train the search and
the derived network; the test events measure it. The teacher is the ranker trained by
this run. The derived network's config and weights go to the stage's checkpoint
directory, from which the export stage rebuilds it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, Tuple

import numpy as np

from models import data_layout as layout
from models.features import LABEL, TIMESTAMP, USER_ID, Schema
from pipeline import ranker_stage

log = logging.getLogger("recfunnel")

MODEL_CONFIG_FILE = "preranker_config.json"
WEIGHTS = "weights"
LATENCY_TABLE_FILE = "latency_table.json"


def autofas_config(config):
    """`models.preranking.PrerankerConfig` of a `pipeline.config.PrerankerStageConfig`."""
    from models.preranking.training import PrerankerConfig

    p = config.preranker
    return PrerankerConfig(num_mixops=p.num_mixops, operator_widths=p.operator_widths,
                           latency_weight=p.latency_weight, distillation_weight=p.distillation_weight,
                           architecture_latency_weight=p.architecture_latency_weight,
                           search_epochs=p.search_epochs, retrain_epochs=p.retrain_epochs,
                           retrain_patience=p.retrain_patience, mask_objective=p.mask_objective,
                           retrain_selection=p.retrain_selection, search_max_events=p.search_max_events,
                           latency_repeats=p.latency_repeats, candidates=p.candidates,
                           batch_size=p.batch_size, learning_rate=p.learning_rate,
                           external_feature_costs=tuple(sorted(p.external_feature_costs.items())), seed=p.seed)


def read_latency_table(path: str):
    """`LatencyTable.load`, a missing or malformed file a ConfigError naming it."""
    from models.preranking.latency import LatencyTable
    from pipeline.config import ConfigError

    try:
        return LatencyTable.load(path)
    except FileNotFoundError:
        raise ConfigError(f"`preranker.latency_table`: {path} was not found") from None
    except (ValueError, TypeError) as e:  # JSON, keys or values
        raise ConfigError(f"`preranker.latency_table`: {path} is not a latency table: {e}") from None


def load_latency_table(config, schema: Schema):
    """The table of `preranker.latency_table`, checked against this search (ConfigError
    naming the file otherwise); None when the option is empty (measure)."""
    from pipeline.config import ConfigError

    path = config.preranker.latency_table
    if not path:
        return None
    table = read_latency_table(path)
    try:
        table.check_covers([f.name for f in schema.features], config.preranker.operator_widths,
                           config.preranker.candidates)
    except ValueError as e:
        raise ConfigError(f"`preranker.latency_table`: {path}: {e}") from None
    return table


def stage_preranker(config, workdir: str, teacher, checkpoint_dir: str) -> Tuple[Any, Dict[str, Any]]:
    """Searches, derives and retrains the pre-ranker; returns ``(model, summary)``."""
    from models.preranking.latency import LatencyTable
    from models.preranking.training import predict_logits, train_preranker
    from models.ranking.metrics import ctr_metrics
    from models.ranking.models import inputs_from_frame
    from models.ranking.training import last_events_mask
    from models.tf_compat import tf

    data_dir = os.path.join(workdir, "data")
    schema = Schema.load(os.path.join(data_dir, layout.SCHEMA_FILE))
    start = time.time()
    frame = ranker_stage.ranking_frame(data_dir, schema)
    train_frame, test_frame = frame[frame["split"] == "train"], frame[frame["split"] == "test"]
    valid_frame = None
    if config.ranker.validation_fraction > 0:
        held_out = last_events_mask(train_frame[USER_ID].to_numpy(), train_frame[TIMESTAMP].to_numpy(),
                                    config.ranker.validation_fraction)
        valid_frame, train_frame = train_frame[held_out], train_frame[~held_out]
    p = config.preranker
    table = load_latency_table(config, schema)  # before any work
    searched = min(p.search_max_events, len(train_frame)) if p.search_max_events else len(train_frame)
    log.info("preranker: AutoFAS search on %d of the %d training events, the derived network retrained on all of "
             "them (teacher: the %s ranker)", searched, len(train_frame), config.ranker.model)
    model, details = train_preranker(schema, teacher.vocabularies, train_frame, valid_frame, teacher,
                                     autofas_config(config), numeric_stats=teacher.numeric_stats,
                                     latency_table=table, progress=_log_progress)
    logits = predict_logits(model, inputs_from_frame(schema, test_frame, model.features))
    probabilities = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
    metrics = ctr_metrics(test_frame[USER_ID].to_numpy(), test_frame[LABEL].to_numpy(np.float32), probabilities)
    os.makedirs(checkpoint_dir, exist_ok=True)
    with open(os.path.join(checkpoint_dir, MODEL_CONFIG_FILE), "w") as f:
        json.dump(model.get_config(), f)
    tf.train.Checkpoint(model=model).write(os.path.join(checkpoint_dir, WEIGHTS))
    table_path = LatencyTable.from_dict(details["latency_table"]).save(os.path.join(checkpoint_dir, LATENCY_TABLE_FILE))
    log.info("preranker: searched against the latency table %s%s (set preranker.latency_table to it to reuse it)",
             table_path, f", a copy of {p.latency_table}" if table is not None else " measured on this machine")
    summary = {
        "metrics": ranker_stage.json_safe(metrics),
        "features": list(details["features"]), "hidden_units": list(details["hidden_units"]),
        "operators": list(details["operators"]),
        "expected_latency_ms": details["expected_latency_ms"],
        "latency_table": {"path": table_path,
                          "source": os.path.abspath(p.latency_table) if table is not None else "measured"},
        "search": ranker_stage.json_safe({k: v for k, v in details.items() if k != "latency_table"}),
        "parameters": int(model.count_params()),
        # Timed for the candidates it scores when serving, as its latency model is.
        "latency": ranker_stage.measure_latency(model, schema, frame, num_candidates=config.preranker.candidates),
        "checkpoint": checkpoint_dir, "seconds": round(time.time() - start, 3),
    }
    log.info("preranker: features %s, layers %s; test AUC %.4f; %s ms median for %d candidates",
             summary["features"], summary["hidden_units"], metrics["auc"], summary["latency"]["median_ms"],
             config.preranker.candidates)
    return model, summary


def _log_progress(event: str, info: Dict[str, Any]) -> None:
    """One log line per step of `train_preranker` (its `progress` events)."""
    if event == "latency_table":
        log.info("preranker: latency of every feature and layer shape measured in %.1f s", info["seconds"])
    elif event == "search_epoch":
        log.info("preranker search epoch %d/%d: loss2 %.4f, expected latency %.2f ms, %d of %d features kept",
                 info["epoch"] + 1, info["epochs"], info["loss2"], info["expected_latency_ms"], info["kept"],
                 len(info["keep_probabilities"]))
    elif event == "derived":
        log.info("preranker: derived %d features %s, layers %s; retraining", len(info["features"]),
                 info["features"], info["hidden_units"])
    elif event == "retrain_epoch":
        scores = "".join(f", {name.replace('_', ' ')} {value:.4f}" for name, value in info.items()
                         if name.startswith("validation") and value is not None)
        log.info("preranker retrain epoch %d/%d: loss %.4f%s", info["epoch"] + 1, info["epochs"], info["loss"],
                 scores)


def restore_preranker(checkpoint_dir: str):
    """The derived pre-ranker rebuilt from `checkpoint_dir` (as `stage_preranker` left it)."""
    from models.preranking.preranker import PreRanker
    from models.tf_compat import tf

    with open(os.path.join(checkpoint_dir, MODEL_CONFIG_FILE)) as f:
        model = PreRanker.from_config(json.load(f))
    model.serving_function()  # builds every variable
    status = tf.train.Checkpoint(model=model).read(os.path.join(checkpoint_dir, WEIGHTS))
    status.assert_existing_objects_matched().expect_partial()
    return model


def flat_metrics(summary: Dict[str, Any]) -> Dict[str, Any]:
    """``preranker.*`` entries of the run's metrics.json."""
    m = summary["metrics"]
    out = {f"preranker.{k}": v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out["preranker.latency_ms_median"] = summary["latency"]["median_ms"]
    out["preranker.latency_ms_p99"] = summary["latency"]["p99_ms"]
    out["preranker.parameters"] = summary["parameters"]
    out["preranker.num_features"] = len(summary["features"])
    expected = summary["expected_latency_ms"]
    if isinstance(expected, dict) and "total_ms" in expected:
        out["preranker.expected_latency_ms"] = expected["total_ms"]
    return out
