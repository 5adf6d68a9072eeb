"""The scheduled job: data → statistics → retrieval training → export → index → evaluation.

`run(config, workdir)` executes every stage in order and writes::

    <workdir>/data/            the materialized dataset (models.data_layout)
    <workdir>/stats/           item_frequencies.csv, vocab/, feature_mi.json, summary.json
    <workdir>/export/          query_tower/<v>/, item_tower/<v>/, index/<v>/
    <workdir>/reports/<run>/   metrics.json, config.yaml, run.log summary
    <workdir>/reports/latest/  a copy of the newest report
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from models import data_layout as layout
from models.features import ITEM_ID, Kind, Schema
from pipeline.config import RunConfig, config_to_dict, dump_config

log = logging.getLogger("recfunnel")

DATA_DIR = "data"
STATS_DIR = "stats"
REPORTS_DIR = "reports"


class StageTimer:
    """Logs the start and end of each stage and keeps their durations."""

    def __init__(self):
        self.seconds: Dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                self.start = time.time()
                log.info("== stage %s: started", name)

            def __exit__(self, exc_type, exc, tb):
                elapsed = time.time() - self.start
                timer.seconds[name] = round(elapsed, 3)
                if exc_type is None:
                    log.info("== stage %s: done in %.1f s", name, elapsed)
                else:
                    log.error("== stage %s: failed after %.1f s: %s", name, elapsed, exc)
                return False

        return _Stage()


# -- stages --------------------------------------------------------------------------
def read_source(config: RunConfig):
    """The configured reader's `RawDataset`."""
    data = config.data
    if data.source == "synthetic":
        import dataclasses

        from pipeline.data.synthetic import generate_synthetic
        # One knob for the sequence length whatever the source: data.history_length.
        return generate_synthetic(dataclasses.replace(data.synthetic, history_length=data.history_length))
    if data.source == "movielens":
        from pipeline.data.movielens import read_movielens
        return read_movielens(data.path, bad_rows=data.bad_rows, history_length=data.history_length)
    if data.source == "movielens_tfds":
        from pipeline.data.movielens import read_movielens_tfds
        return read_movielens_tfds(data.path, name=data.tfds_name, bad_rows=data.bad_rows,
                                   history_length=data.history_length)
    if data.source == "bars":
        from pipeline.data.bars import read_bars
        return read_bars(data.path, bad_rows=data.bad_rows, history_length=data.history_length)
    from pipeline.data.tabular import read_tabular
    options = dict(data.tabular)
    options.setdefault("format", data.source)
    return read_tabular(data.path, bad_rows=data.bad_rows, history_length=data.history_length, **options)


def stage_data(config: RunConfig, workdir: str) -> Dict[str, Any]:
    from pipeline.data.materialize import materialize

    raw = read_source(config)
    log.info("reading %s", raw.source)
    return materialize(raw, os.path.join(workdir, DATA_DIR), config.data.split, config.data.positives)


def stage_stats(config: RunConfig, workdir: str) -> Dict[str, Any]:
    from beam_jobs.stats_job import run_statistics

    data_dir = os.path.join(workdir, DATA_DIR)
    with open(os.path.join(data_dir, layout.READ_REPORT_FILE)) as f:
        read = json.load(f)
    return run_statistics(data_dir, os.path.join(workdir, STATS_DIR),
                          pipeline_args=list(config.stats.pipeline_args), min_count=config.stats.min_count,
                          max_rejected_fraction=config.stats.max_rejected_fraction,
                          positives=read["positives"], upstream_rejections=read["read"])


def read_item_frequencies(stats_dir: str) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """(item ids, counts, probabilities) from ``item_frequencies.csv``."""
    path = os.path.join(stats_dir, "item_frequencies.csv")
    ids, counts, probs = [], [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != ["item_id", "count", "probability"]:
            raise ValueError(f"{path}: header should be item_id,count,probability. Received: {reader.fieldnames}")
        for row in reader:
            ids.append(row["item_id"])
            counts.append(int(row["count"]))
            probs.append(float(row["probability"]))
    return ids, np.asarray(counts, np.int64), np.asarray(probs, np.float64)


def read_vocabularies(stats_dir: str, schema: Schema) -> Dict[str, List[str]]:
    vocabs = {}
    for name in schema.vocabulary_names():
        path = os.path.join(stats_dir, "vocab", f"{name}.txt")
        if not os.path.exists(path):
            raise FileNotFoundError(f"vocabulary of {name!r} missing: {path}; re-run the statistics stage")
        with open(path, encoding="utf-8") as f:
            vocabs[name] = [line.rstrip("\n") for line in f if line.rstrip("\n")]
    return vocabs


def numeric_stats(data_dir: str, schema: Schema) -> Dict[str, List[float]]:
    import pyarrow.parquet as pq

    out = {}
    for side, fname in (("user", layout.USERS_FILE), ("item", layout.ITEMS_FILE)):
        cols = [f.name for f in schema.side(side) if f.kind == Kind.NUMERIC]
        if cols:
            table = pq.read_table(os.path.join(data_dir, fname), columns=cols).to_pandas()
            for c in cols:
                out[c] = [float(table[c].mean()), float(table[c].std() or 1.0)]
    return out


def build_retrieval_model(config: RunConfig, schema: Schema, vocabularies, log_q_table, num_stats):
    from models.tf_compat import keras, tf
    from models.two_tower import TwoTowerModel

    r = config.retrieval
    keras.utils.set_random_seed(r.seed)
    model = TwoTowerModel(schema, vocabularies, item_log_q=log_q_table if r.logq_correction else None,
                          embedding_dim=r.embedding_dim, feature_dim=r.feature_dim,
                          hidden_units=r.hidden_units, normalize=r.normalize, temperature=r.temperature,
                          remove_accidental_hits=r.remove_accidental_hits, dropout=r.dropout,
                          numeric_stats=num_stats)
    opt = (keras.optimizers.Adam(r.learning_rate) if r.optimizer == "adam"
           else keras.optimizers.Adagrad(r.learning_rate))
    model.compile(optimizer=opt)
    del tf
    return model


def stage_train(config: RunConfig, workdir: str) -> Tuple[Any, Dict[str, Any]]:
    from models.input_pipeline import example_dataset
    from models.logq import ItemLogQ
    from models.tf_compat import keras

    data_dir = os.path.join(workdir, DATA_DIR)
    stats_dir = os.path.join(workdir, STATS_DIR)
    schema = Schema.load(os.path.join(data_dir, layout.SCHEMA_FILE))
    vocabs = read_vocabularies(stats_dir, schema)
    ids, _, probs = read_item_frequencies(stats_dir)
    log_q = ItemLogQ(ids, probs, name="item_log_q")
    model = build_retrieval_model(config, schema, vocabs, log_q, numeric_stats(data_dir, schema))
    r = config.retrieval
    with open(os.path.join(data_dir, layout.READ_REPORT_FILE)) as f:
        mode = json.load(f)["positives"]
    train = example_dataset(layout.example_files(data_dir, "train"), schema, r.batch_size, shuffle=True,
                            seed=r.seed, positives_only=(mode == "label"))

    class _Progress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            log.info("retrieval epoch %d/%d: loss %.4f", epoch + 1, r.epochs, (logs or {}).get("loss", float("nan")))

    start = time.time()
    history = model.fit(train, epochs=r.epochs, verbose=0, callbacks=[_Progress()])
    losses = [float(x) for x in history.history.get("loss", [])]
    if not losses or not np.isfinite(losses[-1]):
        raise FloatingPointError(f"retrieval training diverged: losses {losses}")
    return model, {"loss": losses, "seconds": round(time.time() - start, 3)}


def _export_saved_model(obj, path: str, signatures, options=None) -> None:
    from models.tf_compat import tf

    tmp = path.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    try:
        tf.saved_model.save(obj, tmp, signatures=signatures, options=options)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def stage_export(model, workdir: str, version: int) -> Dict[str, str]:
    from models.tf_compat import tf
    from serving import exports

    schema = model.schema
    for m in (exports.QUERY_TOWER, exports.ITEM_TOWER):
        os.makedirs(exports.model_dir(workdir, m), exist_ok=True)
    q_path = exports.version_path(workdir, exports.QUERY_TOWER, version)
    i_path = exports.version_path(workdir, exports.ITEM_TOWER, version)
    _export_saved_model(model.query_tower, q_path, {"serving_default": model.query_tower.serving_function()})

    item_sigs = {"serving_default": model.item_tower.serving_function()}
    if model.item_log_q is not None:
        # The logQ table travels with the item tower so training and serving agree.
        log_q_layer = model.item_log_q
        log_q_fn = tf.function(lambda item_id: {"log_q": log_q_layer(item_id)},
                               input_signature=[tf.TensorSpec([None], tf.string, name=ITEM_ID)])
        model.item_tower.log_q_table = log_q_layer
        item_sigs["log_q"] = log_q_fn.get_concrete_function()
    _export_saved_model(model.item_tower, i_path, item_sigs)
    del schema
    return {"query_tower": q_path, "item_tower": i_path}


def item_embeddings(item_tower_path: str, data_dir: str, batch_size: int = 4096) -> Tuple[List[str], np.ndarray]:
    """Embeds the whole item corpus with the *exported* item tower."""
    import pyarrow.parquet as pq

    from models.features import padded_batch
    from models.tf_compat import tf

    schema = Schema.load(os.path.join(data_dir, layout.SCHEMA_FILE))
    rows = pq.read_table(os.path.join(data_dir, layout.ITEMS_FILE)).to_pylist()
    fn = tf.saved_model.load(item_tower_path).signatures["serving_default"]
    ids, parts = [], []
    for start in range(0, len(rows), batch_size):
        block = rows[start:start + batch_size]
        feats = padded_batch(schema, "item", block)
        parts.append(fn(**{k: tf.constant(v) for k, v in feats.items()})["embedding"].numpy())
        ids.extend(str(r[ITEM_ID]) for r in block)
    return ids, np.concatenate(parts, axis=0)


def tuning_queries(workdir: str, version: int, num_users: int = 1000, seed: int = 0) -> np.ndarray:
    """Query embeddings of a seeded sample of users, for tuning the index."""
    from models.tf_compat import tf
    from serving import exports
    from serving.user_store import UserStore

    store = UserStore(os.path.join(workdir, DATA_DIR))
    users = store.user_ids()
    rng = np.random.default_rng(seed)
    if len(users) > num_users:
        users = [users[i] for i in sorted(rng.choice(len(users), num_users, replace=False))]
    fn = tf.saved_model.load(exports.version_path(workdir, exports.QUERY_TOWER, version)).signatures["serving_default"]
    parts = []
    for start in range(0, len(users), 1024):
        feats = store.features(users[start:start + 1024])
        parts.append(fn(**{k: tf.constant(v) for k, v in feats.items()})["embedding"].numpy())
    return np.concatenate(parts)


def stage_index(config: RunConfig, workdir: str, version: int) -> Dict[str, Any]:
    from serving import exports
    from serving.index import build_index, save_index

    ids, emb = item_embeddings(exports.version_path(workdir, exports.ITEM_TOWER, version),
                               os.path.join(workdir, DATA_DIR))
    module, params = build_index(emb, ids, config.index, tuning_queries=tuning_queries(workdir, version))
    os.makedirs(exports.model_dir(workdir, exports.INDEX), exist_ok=True)
    path = exports.version_path(workdir, exports.INDEX, version)
    save_index(module, params, path, item_tower_version=str(version), embedding_dim=emb.shape[1],
               num_items=len(ids))
    log.info("index: %s over %d items (%s)", params["kind"], len(ids), params)
    return {"path": path, "params": params, "num_items": len(ids)}


def write_report(workdir: str, run_id: str, config: RunConfig, metrics: Dict[str, Any]) -> str:
    reports = os.path.join(workdir, REPORTS_DIR)
    os.makedirs(reports, exist_ok=True)
    tmp = os.path.join(reports, f".{run_id}.tmp")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
    with open(os.path.join(tmp, "config.yaml"), "w") as f:
        f.write(dump_config(config))
    final = os.path.join(reports, run_id)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    latest_tmp = os.path.join(reports, ".latest.tmp")
    if os.path.exists(latest_tmp):
        shutil.rmtree(latest_tmp)
    shutil.copytree(final, latest_tmp)
    latest = os.path.join(reports, "latest")
    if os.path.exists(latest):
        old = os.path.join(reports, ".latest.old")
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(latest, old)
        os.rename(latest_tmp, latest)
        shutil.rmtree(old)
    else:
        os.rename(latest_tmp, latest)
    return final


def run(config: RunConfig, workdir: str) -> Dict[str, Any]:
    """Runs the whole job; returns the metrics written to ``reports/latest/metrics.json``."""
    from pipeline.evaluation import evaluate_retrieval
    from serving import exports

    os.makedirs(workdir, exist_ok=True)
    started = time.time()
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started))
    timer = StageTimer()
    metrics: Dict[str, Any] = {"run_id": run_id}

    with timer("data"):
        data_summary = stage_data(config, workdir)
    metrics["data"] = data_summary
    with timer("statistics"):
        stats_summary = stage_stats(config, workdir)
    metrics["statistics"] = stats_summary
    with timer("retrieval_training"):
        model, train_summary = stage_train(config, workdir)
    metrics["retrieval_training"] = train_summary
    version = exports.next_version(workdir)
    with timer("export"):
        stage_export(model, workdir, version)
    with timer("index"):
        index_summary = stage_index(config, workdir, version)
    metrics["index_build"] = index_summary["params"]
    with timer("evaluation"):
        metrics.update(evaluate_retrieval(workdir, version, config.evaluation))
    metrics["export_version"] = version
    metrics["stage_seconds"] = timer.seconds
    metrics["total_seconds"] = round(time.time() - started, 3)
    metrics["config"] = config_to_dict(config)
    path = write_report(workdir, run_id, config, metrics)
    log.info("report written to %s", path)
    return metrics
