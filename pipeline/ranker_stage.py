"""The ranking stage of the scheduled job: labelled events → CAN (or a baseline) → metrics.

Rows are the materialized interactions (train and test splits) joined with the user
and item tables. Each row's ``history`` is rebuilt from the events themselves: the
same user's *training positives* strictly before the event's timestamp
(`build_sequences`), the events the retrieval examples and the serving user store draw
their histories from. A test event thus sees the history it would be served with
(the user store holds each user's last training positives), never itself, a later
event, a test event or an impression without a click.

The model trains on the train split (each user's last `validation_fraction` of it
held out to choose the epoch) and is measured on the test split: AUC, GAUC, log loss,
calibration; and the exported signature's latency for scoring 1,000 candidates.
The trained weights, the vocabularies and the numeric features' training mean and
standard deviation (the model standardizes them) are written to the stage's
checkpoint directory, from which the export stage rebuilds the model.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, Tuple

import numpy as np

from models import data_layout as layout
from models.features import HISTORY, ITEM_ID, LABEL, TIMESTAMP, USER_ID, Schema

log = logging.getLogger("recfunnel")

VOCABULARIES_FILE = "vocabularies.json"
NUMERIC_STATS_FILE = "numeric_stats.json"
WEIGHTS = "weights"
LATENCY_CANDIDATES = 1000


class NoLabelsError(ValueError):
    """The dataset has no ``label`` column, so there is nothing to rank against."""


# The rule `history_sources` follows, part of the stage's fingerprint: a workdir whose ranker
# was trained under an earlier rule (every earlier event) retrains once.
HISTORY_RULE = "positives of the training split, strictly before the event"


def history_sources(data_dir: str, frame) -> np.ndarray:
    """``[n]`` bool: which events of `frame` may enter a behaviour history.

    The training events the dataset counts as positives (`materialize`'s positives mode:
    label > 0, or every event), as in the materialized examples and the user store.
    """
    eligible = frame["split"].to_numpy() == "train"
    if layout.positives_mode(data_dir) == "label":
        eligible &= frame[LABEL].to_numpy() > 0
    return eligible


def ranking_frame(data_dir: str, schema: Schema):
    """All labelled events of a materialized dataset, one row each, with a ``split`` column
    and each event's ``history`` (`history_sources`, strictly before the event).

    Raises:
      NoLabelsError: the dataset has no labels.
    """
    import pandas as pd

    from models.ranking.sequences import build_sequences

    if not schema.has_label:
        raise NoLabelsError(f"dataset {schema.name!r} has no `label` column (implicit positives only): "
                            "the ranking stage needs labelled impressions")
    parts = []
    for split in layout.SPLITS:
        for path in layout.interaction_files(data_dir, split):
            part = pd.read_parquet(path, columns=[USER_ID, ITEM_ID, TIMESTAMP, LABEL])
            part["split"] = split
            parts.append(part)
    events = pd.concat(parts, ignore_index=True)
    users = pd.read_parquet(os.path.join(data_dir, layout.USERS_FILE),
                            columns=[f.name for f in schema.user_features if f.name != HISTORY])
    items = pd.read_parquet(os.path.join(data_dir, layout.ITEMS_FILE), columns=[f.name for f in schema.item_features])
    frame = events.merge(users, on=USER_ID, how="left", validate="many_to_one")
    frame = frame.merge(items, on=ITEM_ID, how="left", validate="many_to_one")
    for table, columns in (("users", users.columns), ("items", items.columns)):
        missing = frame[list(columns)].isna().any(axis=1).to_numpy()
        if missing.any():
            row = frame[missing].iloc[0]
            raise ValueError(f"{int(missing.sum())} event(s) of {data_dir} reference ids missing from the {table} "
                             f"table, e.g. user_id={row[USER_ID]!r} item_id={row[ITEM_ID]!r}")
    if any(f.name == HISTORY for f in schema.user_features):
        frame[HISTORY] = list(build_sequences(frame[USER_ID].to_numpy(), frame[ITEM_ID].to_numpy(),
                                              frame[TIMESTAMP].to_numpy(), schema.feature(HISTORY).max_length,
                                              eligible=history_sources(data_dir, frame)))
    frame[LABEL] = frame[LABEL].astype(np.float32)
    return frame


def ranking_model_config(config):
    """`models.ranking.RankingConfig` of a `pipeline.config.RankerConfig`."""
    from models.ranking.models import RankingConfig

    return RankingConfig(embedding_dim=config.embedding_dim, hidden_units=config.hidden_units,
                         coaction_feed_dim=config.coaction_feed_dim,
                         coaction_layer_sizes=config.coaction_layer_sizes, coaction_orders=config.coaction_orders,
                         order_independent=config.order_independent,
                         combination_independent=config.combination_independent,
                         sequence_pooling=config.sequence_pooling, coaction_l2=config.coaction_l2)


def _compiled_model(config, schema: Schema, vocabularies, numeric_stats=None):
    from models.ranking.losses import make_loss
    from models.ranking.models import build_ranker
    from models.tf_compat import keras

    model = build_ranker(config.model, schema, vocabularies, ranking_model_config(config), numeric_stats)
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), loss=make_loss(config.loss))
    return model


def measure_latency(model, schema: Schema, frame, calls: int = 50,
                    num_candidates: int = LATENCY_CANDIDATES) -> Dict[str, float]:
    """Median/p99 milliseconds of scoring `num_candidates` candidates of one user as the
    serving cascade scores them: through the encoded-items function, the candidates'
    features encoded once in advance (`models.signatures`)."""
    from models.ranking.models import encode_items_function, inputs_from_frame, multi_user_scoring_function
    from models.signatures import several_user_arguments
    from models.tf_compat import tf

    rng = np.random.default_rng(0)
    user_row = frame.iloc[[int(rng.integers(len(frame)))]]
    items = frame.drop_duplicates(ITEM_ID)
    pick = rng.choice(len(items), size=num_candidates, replace=len(items) < num_candidates)
    user_specs, item_specs = model.tensor_specs()  # a pre-ranker takes only its selected features
    user = inputs_from_frame(schema, user_row, list(user_specs))
    candidates = inputs_from_frame(schema, items.iloc[pick], list(item_specs))
    # Only the two functions the served call needs (the export traces all four later).
    encoded = encode_items_function(model, item_specs)(**{k: tf.constant(v) for k, v in candidates.items()})
    fn = multi_user_scoring_function(model, user_specs, item_specs, items_encoded=True)
    args = several_user_arguments({k: tf.constant(v) for k, v in user.items()}, {k: encoded[k] for k in item_specs},
                                  tf.zeros([num_candidates], tf.int32))
    for _ in range(5):
        fn(**args)["scores"].numpy()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(**args)["scores"].numpy()
        times.append((time.perf_counter() - start) * 1000.0)
    return {"median_ms": round(float(np.median(times)), 3), "p99_ms": round(float(np.percentile(times, 99)), 3),
            "candidates": int(num_candidates), "items": "encoded in advance"}


def stage_ranker(config, workdir: str, checkpoint_dir: str) -> Tuple[Any, Dict[str, Any]]:
    """Trains and evaluates the ranker; returns ``(model, summary)``.

    The summary holds the test metrics (``auc``, ``gauc``, ``log_loss``,
    ``calibration``), training curves, parameter counts and serving latency.
    """
    from models.ranking.metrics import calibration, ctr_metrics
    from models.features import numeric_stats
    from models.ranking.models import build_vocabularies, inputs_from_frame
    from models.ranking.training import fit_ranker, last_events_mask, predict_probabilities
    from models.tf_compat import keras, tf

    r = config.ranker
    data_dir = os.path.join(workdir, "data")
    schema = Schema.load(os.path.join(data_dir, layout.SCHEMA_FILE))
    start = time.time()
    frame = ranking_frame(data_dir, schema)
    train_frame, test_frame = frame[frame["split"] == "train"], frame[frame["split"] == "test"]
    validation = None
    if r.validation_fraction > 0:
        held_out = last_events_mask(train_frame[USER_ID].to_numpy(), train_frame[TIMESTAMP].to_numpy(),
                                    r.validation_fraction)
        validation_frame, train_frame = train_frame[held_out], train_frame[~held_out]
        validation = (inputs_from_frame(schema, validation_frame), validation_frame[LABEL].to_numpy(np.float32))
    log.info("ranker: %d train / %d validation / %d test events (CTR %.3f)", len(train_frame),
             0 if validation is None else len(validation[1]), len(test_frame), float(frame[LABEL].mean()))
    vocabularies = build_vocabularies(schema, train_frame)
    stats = numeric_stats(schema, train_frame)
    keras.utils.set_random_seed(r.seed)
    model = _compiled_model(r, schema, vocabularies, stats)

    def progress(epoch, logs):
        auc_text = "" if logs["validation_auc"] is None else f", validation AUC {logs['validation_auc']:.4f}"
        log.info("ranker epoch %d/%d: loss %.4f%s", epoch + 1, r.epochs, logs["loss"], auc_text)

    training = fit_ranker(model, (inputs_from_frame(schema, train_frame), train_frame[LABEL].to_numpy(np.float32)),
                          validation, epochs=r.epochs, batch_size=r.batch_size, seed=r.seed, on_epoch=progress)
    probabilities = predict_probabilities(model, inputs_from_frame(schema, test_frame))
    labels = test_frame[LABEL].to_numpy(np.float32)
    metrics = ctr_metrics(test_frame[USER_ID].to_numpy(), labels, probabilities)
    os.makedirs(checkpoint_dir, exist_ok=True)
    with open(os.path.join(checkpoint_dir, VOCABULARIES_FILE), "w") as f:
        json.dump(vocabularies, f)
    with open(os.path.join(checkpoint_dir, NUMERIC_STATS_FILE), "w") as f:
        json.dump(stats, f)
    tf.train.Checkpoint(model=model).write(os.path.join(checkpoint_dir, WEIGHTS))
    summary = {
        "model": r.model, "loss": r.loss,
        "metrics": json_safe(metrics), "calibration": json_safe(calibration(labels, probabilities)),
        "training": training,
        "rows": {"train": int(len(train_frame)), "validation": 0 if validation is None else int(len(validation[1])),
                 "test": int(len(test_frame))},
        "parameters": int(model.count_params()), "coaction_parameters": int(model.coaction_parameter_count()),
        "latency": measure_latency(model, schema, frame),
        "checkpoint": checkpoint_dir, "seconds": round(time.time() - start, 3),
    }
    log.info("ranker (%s): test AUC %.4f, GAUC %.4f, log loss %.4f; %s ms median for %d candidates", r.model,
             metrics["auc"], metrics["gauc"], metrics["log_loss"], summary["latency"]["median_ms"],
             LATENCY_CANDIDATES)
    return model, summary


def json_safe(value):
    """`value` with NaN/inf floats as None (strict JSON)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def restore_ranker(config, workdir: str, checkpoint_dir: str):
    """The trained ranker rebuilt from `checkpoint_dir` (as `stage_ranker` left it)."""
    from models.tf_compat import tf

    schema = Schema.load(os.path.join(workdir, "data", layout.SCHEMA_FILE))
    with open(os.path.join(checkpoint_dir, VOCABULARIES_FILE)) as f:
        vocabularies = json.load(f)
    stats = {}  # a checkpoint written before numeric features were standardized has none
    if os.path.exists(os.path.join(checkpoint_dir, NUMERIC_STATS_FILE)):
        with open(os.path.join(checkpoint_dir, NUMERIC_STATS_FILE)) as f:
            stats = json.load(f)
    model = _compiled_model(config.ranker, schema, vocabularies, stats)
    fn = model.serving_function()  # builds every variable
    del fn
    tf.train.Checkpoint(model=model).read(os.path.join(checkpoint_dir, WEIGHTS)).assert_existing_objects_matched().expect_partial()
    return model


def flat_metrics(summary: Dict[str, Any]) -> Dict[str, Any]:
    """``ranker.*`` entries of the run's metrics.json."""
    m = summary["metrics"]
    out = {f"ranker.{k}": v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out["ranker.latency_ms_median"] = summary["latency"]["median_ms"]
    out["ranker.latency_ms_p99"] = summary["latency"]["p99_ms"]
    out["ranker.parameters"] = summary["parameters"]
    return out
