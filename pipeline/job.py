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
import filecmp
import json
import logging
import os
import re
import shutil
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from models import data_layout as layout
from models.features import ITEM_ID, Kind, Schema
from pipeline import preranker_stage, ranker_stage
from pipeline.config import ConfigError, RunConfig, config_to_dict, dump_config

log = logging.getLogger("recfunnel")

DATA_DIR = "data"
STATS_DIR = "stats"


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
def check_beam_flags(config: RunConfig, paths: Optional[Dict[str, str]] = None) -> None:
    """Raises ConfigError unless Beam accepts `stats.pipeline_args` (and, on a remote runner, `paths`)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # Beam's import warns on the root logger that optional GCP clients are absent
    try:
        from beam_jobs.options import validate_pipeline_args
    finally:
        root.setLevel(level)

    try:
        validate_pipeline_args(list(config.stats.pipeline_args), paths)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"`stats.pipeline_args`: {e}", key="stats.pipeline_args") from e


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
    return materialize(raw, os.path.join(workdir, DATA_DIR), config.data.split, config.data.positives,
                       config.data.history_mode)


def stage_stats(config: RunConfig, workdir: str) -> Dict[str, Any]:
    from beam_jobs.stats_job import run_statistics

    data_dir = os.path.join(workdir, DATA_DIR)
    read = layout.read_report(data_dir)
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
    """Numeric feature → ``[mean, std]`` over the user and item tables (each entity once), by the
    standardization every model shares (`models.features.numeric_stats`)."""
    import pyarrow.parquet as pq

    from models.features import numeric_stats as standardization

    columns = {}
    for side, fname in (("user", layout.USERS_FILE), ("item", layout.ITEMS_FILE)):
        cols = [f.name for f in schema.side(side) if f.kind == Kind.NUMERIC]
        if cols:
            table = pq.read_table(os.path.join(data_dir, fname), columns=cols)
            columns.update({c: table.column(c).to_numpy() for c in cols})
    return standardization(schema, columns)


def retrieval_task(config: RunConfig):
    """The loss layer for `retrieval.negatives` (in-batch is a bank of size 0: the same loss
    as `tfrs.tasks.Retrieval`, computed by the fused `models.sampled_softmax` path)."""
    from models.cross_batch_retrieval import CrossBatchRetrieval

    r = config.retrieval
    return CrossBatchRetrieval(r.embedding_dim, memory_size=r.memory_size, warmup_steps=r.warmup_steps,
                               temperature=r.temperature, remove_accidental_hits=r.remove_accidental_hits,
                               num_hard_negatives=r.num_hard_negatives, drift_correction=r.drift_correction,
                               item_gradient=r.item_gradient, loss=r.loss, margin=r.ccl_margin,
                               negative_weight=r.ccl_negative_weight, ccl_negatives=r.ccl_negatives,
                               logq_weight=r.logq_weight, name="cross_batch_retrieval")


def item_corpus(data_dir: str, schema: Schema) -> Dict[str, np.ndarray]:
    """Every item's features in the item tower's input layout (for uniform negatives)."""
    import pyarrow.parquet as pq

    from models.features import padded_batch

    rows = pq.read_table(os.path.join(data_dir, layout.ITEMS_FILE)).to_pylist()
    return padded_batch(schema, "item", rows)


def read_feature_mi(stats_dir: str) -> Dict[str, Any]:
    """The statistics job's ``feature_mi.json`` (features, mi, normalized_mi, num_items)."""
    path = os.path.join(stats_dir, "feature_mi.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: retrieval.ssl_masking=correlated needs the statistics "
                                f"stage's feature mutual information (run the stats stage)") from None


def build_ssl_task(config: RunConfig, schema: Schema, feature_mi: Optional[Mapping[str, Any]] = None):
    """The item tower's self-supervised task from `retrieval.ssl_*`, or None when off."""
    from models.ssl import ItemSelfSupervision, mutual_information_matrix
    from models.towers import feature_sizes

    r = config.retrieval
    if not r.ssl_weight:
        return None
    mi = None
    if r.ssl_masking == "correlated":
        if feature_mi is None:
            raise ValueError("retrieval.ssl_masking=correlated needs the feature mutual information")
        mi = mutual_information_matrix([f.name for f in schema.item_features], feature_mi["features"],
                                       feature_mi["mi"], normalized=r.ssl_correlation == "normalized_mi",
                                       num_items=feature_mi.get("num_items"))
    return ItemSelfSupervision(feature_sizes(schema.item_features, r.feature_dim), masking=r.ssl_masking,
                               mutual_information=mi, value_dropout=r.ssl_value_dropout,
                               temperature=r.ssl_temperature, share=r.ssl_share, output_dim=r.embedding_dim,
                               name="item_ssl")


def build_retrieval_model(config: RunConfig, schema: Schema, vocabularies, log_q_table, num_stats,
                          corpus: Optional[Mapping[str, np.ndarray]] = None,
                          feature_mi: Optional[Mapping[str, Any]] = None, task=None):
    """The compiled two-tower model of `config`.

    `corpus` (`item_corpus`) is needed for mixed negatives, `feature_mi`
    (`read_feature_mi`) for correlated feature masking; `task` replaces the loss layer
    `retrieval_task` would build (benchmarks compare loss layers on the same towers).
    """
    from models.tf_compat import keras
    from models.two_tower import TwoTowerModel

    r = config.retrieval
    keras.utils.set_random_seed(r.seed)
    if r.memory_size and r.normalize and (r.item_gradient == "all" or r.drift_correction == "none"):
        log.warning("cross-batch memory with normalized (cosine) towers and without both bank corrections "
                    "(retrieval.item_gradient=batch, retrieval.drift_correction=mean): on our data the "
                    "embeddings collapsed (see README, Retrieval negatives)")
    if r.ssl_weight and r.ssl_items == "corpus" and r.optimizer == "adam":
        log.warning("self-supervised task on corpus items with Adam: Adam's step does not shrink with the "
                    "gradient, so item rows the main task rarely reaches (the tail) move at the full "
                    "learning rate whatever retrieval.ssl_weight is, and a small weight can lower Recall@50 "
                    "(measured in benchmarks/RESULTS.md). retrieval.optimizer=adagrad does not have this "
                    "(see README, Self-supervised item task)")
    if r.ssl_weight and r.logq_weight > 1:
        log.warning("retrieval.logq_weight=%s > 1 keeps popularity in the scores and lowers the recall of tail "
                    "items, which the self-supervised task (retrieval.ssl_weight) is there to raise (measured in "
                    "benchmarks/RESULTS.md; see README, How much popularity the scores keep)", r.logq_weight)
    mixed = r.negatives == "mixed"
    if mixed and corpus is None:
        raise ValueError("negatives=mixed needs the item corpus to sample from")
    model = TwoTowerModel(schema, vocabularies, item_log_q=log_q_table if r.logq_correction else None,
                          embedding_dim=r.embedding_dim, feature_dim=r.feature_dim,
                          hidden_units=r.hidden_units, normalize=r.normalize, temperature=r.temperature,
                          remove_accidental_hits=r.remove_accidental_hits, dropout=r.dropout,
                          numeric_stats=num_stats, task=task if task is not None else retrieval_task(config),
                          corpus=corpus if mixed else None,
                          num_mixed_negatives=r.num_mixed_negatives if mixed else 0,
                          ssl=build_ssl_task(config, schema, feature_mi), ssl_weight=r.ssl_weight,
                          history_pooling=r.history_pooling, embedding_l2=r.embedding_l2,
                          query_dropout=r.query_dropout)
    opt = (keras.optimizers.Adam(r.learning_rate) if r.optimizer == "adam"
           else keras.optimizers.Adagrad(r.learning_rate))
    model.compile(optimizer=opt)
    return model


def load_retrieval_inputs(config: RunConfig, workdir: str):
    """(schema, vocabularies, ItemLogQ, numeric stats, positives mode) for building the model."""
    from models.logq import ItemLogQ

    data_dir = os.path.join(workdir, DATA_DIR)
    stats_dir = os.path.join(workdir, STATS_DIR)
    schema = Schema.load(os.path.join(data_dir, layout.SCHEMA_FILE))
    vocabs = read_vocabularies(stats_dir, schema)
    ids, _, probs = read_item_frequencies(stats_dir)
    log_q = ItemLogQ(ids, probs, name="item_log_q")
    return schema, vocabs, log_q, numeric_stats(data_dir, schema), layout.positives_mode(data_dir)


def new_retrieval_model(config: RunConfig, workdir: str, task=None, resumable: bool = False):
    """A freshly built (untrained) retrieval model and its training dataset.

    `task`: a callable returning a loss layer to use instead of `retrieval_task(config)`
    (called under the strategy's scope; see `build_retrieval_model`).

    `resumable`: the dataset is made for a run that may resume (`stage_train` with a
    checkpoint directory). On one replica (``distribution: default``) and with the row
    count in the data's read report, an epoch then has exactly its number of batches, so
    the optimizer counts one iteration per step, and epoch e's order is drawn from
    (``retrieval.seed``, e), with e = the optimizer's iterations / steps per epoch when
    the pass starts. A run resumed at epoch e from its checkpoint (weights, optimizer
    state) therefore sees the batches an uninterrupted run sees and trains the same model
    (`tests/pipeline/test_resume.py`). Random draws inside training (dropout, mixed
    negatives, the SSL task's items and masks) start their streams again on resume.

    The model is built and compiled under the `retrieval.distribution` strategy's
    scope (`models.distribution`; the strategy is created first, before any other
    TensorFlow work, as multi-worker training requires), and the dataset is batched
    by the global batch size, with static batches when there are several replicas.
    """
    from models.distribution import create_strategy, dataset_for_strategy, needs_static_batches
    from models.input_pipeline import example_dataset, num_batches
    from models.tf_compat import tf

    r = config.retrieval
    strategy = create_strategy(r.distribution)
    data_dir = os.path.join(workdir, DATA_DIR)
    feature_mi = None
    if r.ssl_weight and r.ssl_masking == "correlated":
        feature_mi = read_feature_mi(os.path.join(workdir, STATS_DIR))
    ssl_stream = bool(r.ssl_weight) and r.ssl_items == "corpus"
    with strategy.scope():
        schema, vocabs, log_q, num_stats, mode = load_retrieval_inputs(config, workdir)
        # Read once for both users of the whole item table: mixed negatives and the SSL stream.
        corpus = item_corpus(data_dir, schema) if (r.negatives == "mixed" or ssl_stream) else None
        model = build_retrieval_model(config, schema, vocabs, log_q, num_stats, corpus=corpus,
                                      feature_mi=feature_mi, task=task() if task is not None else None)
    exact = {}
    drop_remainder = needs_static_batches(strategy)
    if resumable and r.distribution == "default":
        rows = _training_rows(data_dir, mode)
        if rows:
            steps = tf.constant(num_batches(rows, r.batch_size, drop_remainder), tf.int64)
            iterations = model.optimizer.iterations
            exact = dict(num_rows=rows, epoch=lambda: tf.cast(iterations, tf.int64) // steps)
    train = example_dataset(layout.example_files(data_dir, "train"), schema, r.batch_size,
                            shuffle=True, seed=r.seed, shuffle_buffer=r.shuffle_buffer,
                            positives_only=(mode == "label"),
                            drop_remainder=drop_remainder, **exact)
    if ssl_stream:
        from models.ssl import uniform_item_dataset, with_ssl_items

        items = uniform_item_dataset(corpus, r.ssl_batch_size, seed=r.seed)
        train = with_ssl_items(train, items).prefetch(2)
    if r.distribution != "default":
        with strategy.scope():
            _create_variables(model, train)  # every variable a distributed one, also when restoring
        train = dataset_for_strategy(train, strategy)
    return model, train


def _training_rows(data_dir: str, mode: str) -> Optional[int]:
    """Training rows retrieval learns from (the positives with ``mode == "label"``), from
    the read report; None when the report does not say (older data directories)."""
    report = layout.read_report(data_dir)
    counts = report.get("positive_rows" if mode == "label" else "rows") or {}
    rows = counts.get("train")
    return int(rows) if isinstance(rows, int) and rows > 0 else None


def _create_variables(model, dataset) -> None:
    """Runs one forward pass so every variable exists (before restoring weights)."""
    batch = next(iter(dataset))
    model.query_tower({f.name: batch[f.name] for f in model.schema.user_features})
    model.item_tower({f.name: batch[f.name] for f in model.schema.item_features})
    if model.ssl is not None:
        model.ssl(model.item_tower, {f.name: batch[f.name] for f in model.schema.item_features})


def stage_train(config: RunConfig, workdir: str, callbacks=(), checkpoint_dir: Optional[str] = None
                ) -> Tuple[Any, Dict[str, Any]]:
    """Trains the retrieval model.

    With `checkpoint_dir`, training state is backed up every epoch (and restored
    after a crash: a killed run resumes from the last completed epoch), and the
    final weights are written to ``checkpoint_dir/final`` for the export stage.
    """
    from models.tf_compat import keras, tf

    model, train = new_retrieval_model(config, workdir, resumable=checkpoint_dir is not None)
    r = config.retrieval

    class _Progress(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            parts = "".join(f", {name} {float(logs[name]):.4f}" for name in ("ssl_loss", "bank_share")
                            if name in logs)
            log.info("retrieval epoch %d/%d: loss %.4f (epoch mean)%s", epoch + 1, r.epochs,
                     logs.get("main_loss", logs.get("loss", float("nan"))), parts)

    class _EpochLog(keras.callbacks.Callback):
        """Appends each finished epoch's figures to a JSON-lines file, which outlives a killed run."""

        def __init__(self, path: str):
            super().__init__()
            self.path = path

        def on_epoch_end(self, epoch, logs=None):
            row = {"epoch": int(epoch), **{k: float(v) for k, v in (logs or {}).items() if k in _EPOCH_KEYS}}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    cbs = [_Progress(), *callbacks]
    if r.learning_rate_schedule != "constant":
        from models.learning_rate import EpochLearningRate

        # First, so the epoch's rate is in the logs every later callback (and the history) sees.
        cbs.insert(0, EpochLearningRate(r.learning_rate, r.learning_rate_schedule, r.epochs,
                                        decay=r.learning_rate_decay, boundaries=r.learning_rate_boundaries))
    drift = None
    if r.drift_every_n_steps:
        from models.feature_drift import FeatureDriftCallback

        corpus = item_corpus(os.path.join(workdir, DATA_DIR), model.schema)
        n = len(corpus[ITEM_ID])
        pick = np.sort(np.random.default_rng(r.seed).choice(n, size=min(n, 512), replace=False))
        drift = FeatureDriftCallback(model.item_tower, {k: v[pick] for k, v in corpus.items()},
                                     every_n_steps=r.drift_every_n_steps,
                                     log_dir=os.path.join(workdir, "logs", "feature_drift") if checkpoint_dir else None)
        cbs.append(drift)
    epoch_log = os.path.join(checkpoint_dir, EPOCH_LOG) if checkpoint_dir else None
    if checkpoint_dir:
        os.makedirs(checkpoint_dir, exist_ok=True)
        cbs.append(keras.callbacks.TensorBoard(os.path.join(workdir, "logs", "retrieval"), write_graph=False,
                                               update_freq="epoch"))
        cbs.append(_EpochLog(epoch_log))
        cbs.append(keras.callbacks.BackupAndRestore(os.path.join(checkpoint_dir, "backup")))
    start = time.time()
    unbuilt_warning = _UnbuiltModelWarning()
    logging.getLogger("tensorflow").addFilter(unbuilt_warning)
    try:
        history = model.fit(train, epochs=r.epochs, verbose=0, callbacks=cbs).history
    except tf.errors.FailedPreconditionError as e:
        found = re.search(r"expected to contain (\d+) elements but contained ((?:only |at least )?\d+)", str(e))
        if found is None:
            raise
        data_dir, read = os.path.join(workdir, DATA_DIR), found.group(2).replace("only ", "")
        raise ValueError(f"The training examples of {data_dir} do not hold the rows its {layout.READ_REPORT_FILE} "
                         f"counts: {found.group(1)} batches of {r.batch_size} expected, {read} read. The directory "
                         f"changed after it was written; delete it to have the data stage write it again.") from None
    finally:
        logging.getLogger("tensorflow").removeFilter(unbuilt_warning)
    if epoch_log is not None:  # every epoch, those before a resume included
        history = _read_epoch_log(epoch_log, r.epochs, history)
    # The epoch means of the retrieval loss (Keras' "loss" is only the last step's).
    losses = [float(x) for x in history.get("main_loss", history.get("loss", []))]
    if losses and not np.isfinite(losses[-1]):
        raise FloatingPointError(f"retrieval training diverged: losses {losses}")
    if checkpoint_dir:
        tf.train.Checkpoint(model=model).write(os.path.join(checkpoint_dir, "final", "weights"))
    summary = {"loss": losses, "seconds": round(time.time() - start, 3),
               "replicas": int(model.distribute_strategy.num_replicas_in_sync)}
    for name in ("ssl_loss", "bank_share", "learning_rate"):
        if name in history:
            summary[name] = [float(x) for x in history[name]]
    if drift is not None:
        summary["feature_drift"] = {"every_n_steps": r.drift_every_n_steps, "rows": drift.history}
    return model, summary


class _UnbuiltModelWarning(logging.Filter):
    """Drops Keras' warning that `BackupAndRestore` wants a built model: a TFRS model is never
    "built" (it has no `call`), and its variables and the optimizer's are restored as they
    are created (`tests/pipeline/test_resume.py` checks that a resumed run trains the same
    model as an uninterrupted one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "BackupAndRestore callback, you model must be built" not in record.getMessage()


EPOCH_LOG = "epochs.jsonl"
_EPOCH_KEYS = ("loss", "main_loss", "ssl_loss", "bank_share", "learning_rate")


def _read_epoch_log(path: str, epochs: int, fallback: Dict[str, list]) -> Dict[str, list]:
    """Per key, the figures of epochs 0..epochs-1 from `path` (the last line of an epoch counts: an
    epoch run again after a resume); `fallback` (Keras' history) when the file lacks an epoch."""
    rows: Dict[int, Dict[str, float]] = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            rows[int(row.pop("epoch"))] = row
    if any(e not in rows for e in range(epochs)):
        return fallback
    keys = [k for k in _EPOCH_KEYS if all(k in rows[e] for e in range(epochs))]
    return {k: [rows[e][k] for e in range(epochs)] for k in keys}


def restore_retrieval_model(config: RunConfig, workdir: str, checkpoint_dir: str):
    """The trained model rebuilt from ``checkpoint_dir/final`` (for a resumed export)."""
    from models.tf_compat import tf

    model, train = new_retrieval_model(config, workdir)
    _create_variables(model, train)
    tf.train.Checkpoint(model=model).read(os.path.join(checkpoint_dir, "final", "weights")).expect_partial()
    return model


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


def export_serving_data(workdir: str, version: int) -> str:
    """Copies the tables serving reads (`exports.SERVING_DATA_FILES` of ``<workdir>/data``) to
    ``export/serving_data/<version>`` atomically: the version keeps them when a later run
    rewrites the data. A table identical to the newest earlier copy is hard-linked to it."""
    from serving import exports

    src = os.path.join(workdir, DATA_DIR)
    path = exports.version_path(workdir, exports.SERVING_DATA, version)
    earlier = [v for v in exports.versions(workdir, exports.SERVING_DATA) if v < version]
    previous = exports.version_path(workdir, exports.SERVING_DATA, earlier[-1]) if earlier else None
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in exports.SERVING_DATA_FILES:
        source, target = os.path.join(src, name), os.path.join(tmp, name)
        old = os.path.join(previous, name) if previous else None
        if old and os.path.exists(old) and filecmp.cmp(source, old, shallow=False):
            os.link(old, target)
        else:
            shutil.copy2(source, target)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def export_ranker_version(model, workdir: str, version: int, name: str = "ranker") -> str:
    """Writes a ranker's (or pre-ranker's) SavedModel to ``export/<name>/<version>`` atomically,
    with its one-user (``serving_default``) and several-user (``score_users``) signatures."""
    from models.ranking.models import scoring_signatures
    from models.tf_compat import tf
    from serving import exports

    os.makedirs(exports.model_dir(workdir, name), exist_ok=True)
    path = exports.version_path(workdir, name, version)
    module = tf.Module()
    module.model = model  # the lookups' tables and the variables travel with the signature
    _export_saved_model(module, path, scoring_signatures(model))
    return path


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
    from pipeline.report import write_report as _write

    return _write(workdir, run_id, dump_config(config), metrics, stats_dir=os.path.join(workdir, STATS_DIR))


STAGES = ("data", "statistics", "retrieval", "ranker", "preranker", "export", "index", "evaluation")


def _cleanup_incomplete_exports(workdir: str) -> None:
    """Removes leftovers of an export killed midway (we hold the workdir lock).

    Temporary directories, and versions present for only some of the required models
    (never the promoted one), cannot be served and are deleted.
    """
    from serving import exports

    promoted = exports.promoted_version(workdir)
    complete = None
    for model in exports.ARTIFACTS:
        d = exports.model_dir(workdir, model)
        if os.path.isdir(d):
            for name in os.listdir(d):
                if name.endswith(".tmp"):
                    shutil.rmtree(os.path.join(d, name), ignore_errors=True)
        if model in exports.REQUIRED_MODELS:
            vs = set(exports.versions(workdir, model))
            complete = vs if complete is None else complete & vs
    # A run's optional models (ranker) and data tables are exported with its towers, so they
    # too are incomplete when the towers or the index of their version are missing.
    for model in exports.ARTIFACTS:
        for v in exports.versions(workdir, model):
            if v not in (complete or set()) and v != promoted:
                log.warning("removing incomplete export %s version %d", model, v)
                shutil.rmtree(exports.version_path(workdir, model, v), ignore_errors=True)


def _source_paths(config: RunConfig) -> List[str]:
    if config.data.source == "synthetic":
        return []
    paths = [config.data.path]
    for key in ("user_table", "item_table"):
        if config.data.tabular.get(key):
            paths.append(str(config.data.tabular[key]))
    return paths


class _NotRunYet(Exception):
    """A stage after `only_stage` has never run: an ``--only-stage`` run ends there."""

    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage


def ranker_fingerprint(config: RunConfig, data_fingerprint: str) -> str:
    """The ranking stage's fingerprint: its config, the data's, and the rule its
    histories follow (`ranker_stage.HISTORY_RULE`)."""
    from pipeline.orchestration import digest

    return digest({"ranker": config_to_dict(config.ranker), "data": data_fingerprint,
                   "histories": ranker_stage.HISTORY_RULE})


def run(config: RunConfig, workdir: str, from_stage: Optional[str] = None,
        only_stage: Optional[str] = None) -> Dict[str, Any]:
    """Runs the job; returns the metrics written to ``reports/latest/metrics.json``.

    Stages whose inputs and config are unchanged since their last successful run
    are skipped (see `pipeline.orchestration`). `from_stage` re-runs that stage and
    every later one; `only_stage` runs just that stage (its inputs must exist).

    Raises:
      WorkdirLocked: another run holds the workdir.
    """
    from pipeline.evaluation import evaluate_retrieval
    from pipeline.orchestration import StageState, WorkdirLock, content_hash, digest
    from pipeline.promotion import promote_if_better
    from serving import exports

    for name, value in (("from_stage", from_stage), ("only_stage", only_stage)):
        if value is not None and value not in STAGES:
            raise ValueError(f"`{name}` should be one of {STAGES}. Received: {value!r}")
    # A typo in the Beam flags, or a multi-worker job without its cluster, fails now, not after the data stage.
    check_beam_flags(config, {"data_dir": os.path.join(workdir, DATA_DIR),
                              "output_dir": os.path.join(workdir, STATS_DIR)})
    if config.retrieval.distribution == "multi_worker":
        from models.distribution import TF_CONFIG, parse_tf_config
        try:
            parse_tf_config(os.environ.get(TF_CONFIG))
        except ValueError as e:
            raise ConfigError(f"`retrieval.distribution=multi_worker`: {e}", key="retrieval.distribution") from None
    if config.preranker.enabled and config.preranker.latency_table:
        # A missing or malformed table fails now, not after the stages before the pre-ranker (whether it fits
        # the data's features is checked when the schema exists).
        preranker_stage.read_latency_table(config.preranker.latency_table)
    if only_stage not in (None, STAGES[0]) and not os.path.isdir(workdir):
        raise ConfigError(f"--only-stage {only_stage} needs the earlier stages' outputs, and workdir {workdir} does "
                          f"not exist: run the job without --only-stage first")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"workdir {workdir} is a file, not a directory")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create workdir {workdir}: {e.strerror or e}") from None
    with WorkdirLock(workdir):
        started = time.time()
        run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started))
        timer = StageTimer()
        state = StageState(workdir)
        if from_stage:
            state.invalidate(STAGES[STAGES.index(from_stage):])
        if only_stage:
            state.invalidate([only_stage])

        def wanted(stage: str) -> bool:
            return only_stage is None or only_stage == stage

        def skipped(stage: str, current: bool) -> None:
            """A stage that does not run: an ``--only-stage`` run stops before a later stage whose
            record does not match this run's inputs (no gate or report from stale records)."""
            if only_stage is not None and STAGES.index(stage) > STAGES.index(only_stage) and not current:
                raise _NotRunYet(stage)
            metrics["skipped_stages"].append(stage)

        def prior(stage: str) -> Dict[str, Any]:
            record = state.load(stage)
            if record is None:
                if only_stage is not None and STAGES.index(stage) < STAGES.index(only_stage):
                    raise ConfigError(f"--only-stage {only_stage} needs the output of stage {stage!r}, which has "
                                      f"not completed in {workdir}: run the job without --only-stage first")
                if only_stage is not None:
                    raise _NotRunYet(stage)
                raise FileNotFoundError(f"stage {stage!r} has not completed in {workdir}; run it first")
            return record

        metrics: Dict[str, Any] = {"run_id": run_id, "skipped_stages": []}
        try:
            data_dir = os.path.join(workdir, DATA_DIR)
            stats_dir = os.path.join(workdir, STATS_DIR)

            # data
            fp_data = digest({"data": config_to_dict(config.data), "source": content_hash(_source_paths(config))})
            if wanted("data") and not state.is_current("data", fp_data, [os.path.join(data_dir, layout.SCHEMA_FILE)]):
                with timer("data"):
                    state.record("data", fp_data, stage_data(config, workdir))
            else:
                skipped("data", True)
            metrics["data"] = prior("data")["summary"]
            has_labels = Schema.load(os.path.join(data_dir, layout.SCHEMA_FILE)).has_label
            if config.promotion.metric.split(".", 1)[0] in ("ranker", "preranker") and not has_labels:
                raise ConfigError(f"`promotion.metric` {config.promotion.metric!r} is written by a stage that "
                                  "needs labels, and the data have none: gate on a retrieval metric")

            # statistics
            fp_stats = digest({"stats": config_to_dict(config.stats), "data": prior("data")["fingerprint"]})
            stats_current = state.is_current("statistics", fp_stats, [os.path.join(stats_dir, "item_frequencies.csv")])
            if wanted("statistics") and not stats_current:
                with timer("statistics"):
                    state.record("statistics", fp_stats, stage_stats(config, workdir))
            else:
                skipped("statistics", stats_current)
            metrics["statistics"] = prior("statistics")["summary"]

            # retrieval training (checkpointed: a killed run resumes from the last epoch)
            fp_ret = digest({"retrieval": config_to_dict(config.retrieval),
                             "stats": prior("statistics")["fingerprint"]})
            ckpt = os.path.join(workdir, "checkpoints", "retrieval", fp_ret[:16])
            model = None
            ret_current = state.is_current("retrieval", fp_ret, [os.path.join(ckpt, "final")])
            if wanted("retrieval") and not ret_current:
                with timer("retrieval_training"):
                    model, summary = stage_train(config, workdir, checkpoint_dir=ckpt)
                    state.record("retrieval", fp_ret, {**summary, "checkpoint": ckpt})
            else:
                skipped("retrieval", ret_current)
            metrics["retrieval_training"] = prior("retrieval")["summary"]

            # ranker (labelled data only); its weights and vocabularies go to a checkpoint
            ranker_model = None
            ranker_on = config.ranker.enabled and has_labels
            fp_rank = ranker_fingerprint(config, prior("data")["fingerprint"])
            rank_ckpt = os.path.join(workdir, "checkpoints", "ranker", fp_rank[:16])
            if ranker_on:
                rank_current = state.is_current("ranker", fp_rank,
                                                [os.path.join(rank_ckpt, ranker_stage.VOCABULARIES_FILE)])
                if wanted("ranker") and not rank_current:
                    with timer("ranker"):
                        ranker_model, summary = ranker_stage.stage_ranker(config, workdir, rank_ckpt)
                        state.record("ranker", fp_rank, summary)
                else:
                    skipped("ranker", rank_current)
                metrics["ranker"] = prior("ranker")["summary"]
                metrics.update(ranker_stage.flat_metrics(metrics["ranker"]))
            else:
                reason = "ranker.enabled is false" if not config.ranker.enabled else "the data have no labels"
                log.info("stage ranker: off (%s)", reason)
                metrics["ranker"] = {"skipped": reason}

            # pre-ranker: AutoFAS distilled from this run's ranker
            preranker_model = None
            preranker_on = ranker_on and config.preranker.enabled
            pre_inputs = {"preranker": config_to_dict(config.preranker),
                          "ranker": prior("ranker")["fingerprint"] if ranker_on else None}
            if config.preranker.latency_table:  # the table's costs, not only its path
                pre_inputs["latency_table"] = content_hash([config.preranker.latency_table])
            fp_pre = digest(pre_inputs)
            pre_ckpt = os.path.join(workdir, "checkpoints", "preranker", fp_pre[:16])
            if preranker_on:
                pre_current = state.is_current("preranker", fp_pre,
                                               [os.path.join(pre_ckpt, preranker_stage.MODEL_CONFIG_FILE)])
                if wanted("preranker") and not pre_current:
                    with timer("preranker"):
                        if ranker_model is None:
                            ranker_model = ranker_stage.restore_ranker(config, workdir,
                                                                       prior("ranker")["summary"]["checkpoint"])
                        preranker_model, summary = preranker_stage.stage_preranker(config, workdir, ranker_model,
                                                                                   pre_ckpt)
                        state.record("preranker", fp_pre, summary)
                else:
                    skipped("preranker", pre_current)
                metrics["preranker"] = prior("preranker")["summary"]
                metrics.update(preranker_stage.flat_metrics(metrics["preranker"]))
            else:
                reason = ("preranker.enabled is false" if ranker_on else "there is no ranker to distil from")
                log.info("stage preranker: off (%s)", reason)
                metrics["preranker"] = {"skipped": reason}

            # export (a new version, written atomically)
            exported = ([exports.QUERY_TOWER, exports.ITEM_TOWER, exports.SERVING_DATA]
                        + ([exports.RANKER] if ranker_on else []) + ([exports.PRERANKER] if preranker_on else []))
            fp_exp = digest({"retrieval": prior("retrieval")["fingerprint"],
                             "ranker": prior("ranker")["fingerprint"] if ranker_on else None,
                             "preranker": prior("preranker")["fingerprint"] if preranker_on else None})
            rec = state.load("export")
            version = rec["summary"]["version"] if rec else None
            export_outputs = ([exports.version_path(workdir, m, version) for m in exported] if version
                              else ["/nonexistent"])
            export_current = state.is_current("export", fp_exp, export_outputs)
            # A version's index is built once: a new index (other settings, --from-stage/--only-stage
            # index) goes into a new version, exported again, never over one that may be served.
            fp_idx = digest({"index": config_to_dict(config.index), "export": fp_exp})
            index_path = exports.version_path(workdir, exports.INDEX, version) if version else None
            new_index_over_built = (index_path is not None and wanted("index") and os.path.exists(index_path)
                                    and not state.is_current("index", fp_idx, [index_path]))
            if new_index_over_built:
                log.info("the index of version %d changes: exporting a new version for it", version)
            if (wanted("export") or new_index_over_built) and (not export_current or new_index_over_built):
                with timer("export"):
                    _cleanup_incomplete_exports(workdir)
                    if model is None:
                        model = restore_retrieval_model(config, workdir, prior("retrieval")["summary"]["checkpoint"])
                    version = exports.next_version(workdir)
                    export_serving_data(workdir, version)
                    stage_export(model, workdir, version)
                    if ranker_on:
                        if ranker_model is None:
                            ranker_model = ranker_stage.restore_ranker(config, workdir,
                                                                       prior("ranker")["summary"]["checkpoint"])
                        export_ranker_version(ranker_model, workdir, version)
                    if preranker_on:
                        if preranker_model is None:
                            preranker_model = preranker_stage.restore_preranker(
                                prior("preranker")["summary"]["checkpoint"])
                        export_ranker_version(preranker_model, workdir, version, exports.PRERANKER)
                    state.record("export", fp_exp, {"version": version, "models": exported})
            else:
                skipped("export", export_current)
            version = prior("export")["summary"]["version"]

            # index
            index_current = state.is_current("index", fp_idx, [exports.version_path(workdir, exports.INDEX, version)])
            if wanted("index") and not index_current:
                with timer("index"):
                    state.record("index", fp_idx, stage_index(config, workdir, version))
            else:
                skipped("index", index_current)
            metrics["index_build"] = prior("index")["summary"]["params"]

            # evaluation (of this version: a new version with the same models is measured again)
            fp_eval = digest({"evaluation": config_to_dict(config.evaluation), "index": prior("index")["fingerprint"],
                              "version": version})
            eval_current = state.is_current("evaluation", fp_eval)
            if wanted("evaluation") and not eval_current:
                with timer("evaluation"):
                    state.record("evaluation", fp_eval, evaluate_retrieval(workdir, version, config.evaluation))
            else:
                skipped("evaluation", eval_current)
            metrics.update(prior("evaluation")["summary"])

            # promotion: only a version that passes the quality gate becomes the served one
            metrics["export_version"] = version
            metrics["promotion"] = promote_if_better(
                workdir, version, metrics, config.promotion, data_fingerprint=prior("data")["fingerprint"],
                reevaluate=lambda v: evaluate_retrieval(workdir, v, config.evaluation,
                                                        with_index=config.promotion.metric.startswith("index.")))
            metrics["stage_seconds"] = timer.seconds
            metrics["total_seconds"] = round(time.time() - started, 3)
            metrics["config"] = config_to_dict(config)
            path = write_report(workdir, run_id, config, metrics)
            log.info("report written to %s", path)
            return metrics
        except _NotRunYet as e:
            log.info("--only-stage %s: done; stage %r has not run yet, so the run stops here", only_stage, e.stage)
            metrics.update(export_version=None, promotion={"promote": None, "reason": f"stage {e.stage!r} not run"},
                           stage_seconds=timer.seconds, total_seconds=round(time.time() - started, 3))
            return metrics
