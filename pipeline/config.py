"""Typed, validated run configuration: YAML file + ``--set section.key=value`` overrides.

Every section is a frozen dataclass whose fields are documented where it is
defined. Unknown keys, values of the wrong type, non-finite numbers and settings that
cannot work together are rejected before any work starts, with the dotted key, the
value received and where it came from (the file, or the ``--set`` override) in the
message.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import typing
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from pipeline.data.splits import SplitConfig
from pipeline.promotion import GATE_STAGE_METRICS, PromotionConfig
from pipeline.data.synthetic import SyntheticConfig
from serving.index_config import IndexConfig

SOURCES = ("synthetic", "movielens", "movielens_tfds", "bars", "csv", "parquet")
# pipeline.data.materialize.HISTORY_MODES, repeated so that loading a config does not import TensorFlow.
HISTORY_MODES = ("past", "all_other", "random_prefix", "all")
# models.distribution.DISTRIBUTIONS, repeated so that loading a config does not import TensorFlow.
DISTRIBUTIONS = ("default", "mirrored", "multi_worker")
# models.ssl.MASKINGS, for the same reason.
SSL_MASKINGS = ("random", "correlated", "independent", "none")
SSL_CORRELATIONS = ("mi", "normalized_mi")
# models.cross_batch_retrieval.DRIFT_CORRECTIONS, for the same reason.
DRIFT_CORRECTIONS = ("mean", "none")
# models.cross_batch_retrieval.ITEM_GRADIENTS, for the same reason.
ITEM_GRADIENTS = ("batch", "all")
# models.towers.HISTORY_POOLINGS, for the same reason.
HISTORY_POOLINGS = ("mean", "attention")
# models.cross_batch_retrieval.LOSSES and CCL_NEGATIVES, for the same reason.
RETRIEVAL_LOSSES = ("softmax", "ccl")
CCL_NEGATIVES = ("all", "uniform")
# models.learning_rate.SCHEDULES, for the same reason.
LR_SCHEDULES = ("constant", "step", "cosine")
# Choices the job reads itself (pipeline.job.build_retrieval_model, new_retrieval_model).
NEGATIVES = ("inbatch", "cbns", "mixed")
OPTIMIZERS = ("adam", "adagrad")
SSL_ITEMS = ("corpus", "batch")
SSL_SHARES = ("full", "partial")
# models.preranking.training.MASK_OBJECTIVES and RETRAIN_SELECTIONS, for the same reason.
PRERANKER_MASK_OBJECTIVES = ("labels", "distillation")
PRERANKER_RETRAIN_SELECTIONS = ("auc", "distillation")
# The sources whose reader brings its own train/test split (`RawDataset.predefined_split`).
SOURCES_WITH_SPLIT = ("bars",)
# The sources read by `pipeline.data.tabular.read_tabular`, with `data.tabular` as its options.
TABULAR_SOURCES = ("csv", "parquet")
# The metrics pipeline.evaluation writes at every K of `evaluation.ks`, as ``<prefix>.<name>@K``.
CUTOFF_METRICS = {
    "retrieval": ("recall", "ndcg", "precision"),
    "retrieval.tail": ("recall", "ndcg"),
    "index": ("recall", "ndcg", "recall_vs_exact"),
    "baseline.popularity": ("recall", "ndcg"),
}
# The stage metrics that cannot gate a promotion (lower is better); those that can are
# `GATE_STAGE_METRICS`.
LOWER_IS_BETTER = ("log_loss", "ece", "latency_ms_median", "latency_ms_p99", "expected_latency_ms", "parameters",
                   "num_features")


class ConfigError(ValueError):
    """A configuration file or override is invalid.

    Attributes:
      key: the dotted key at fault, when a single one is known.
    """

    def __init__(self, message: str, key: Optional[str] = None):
        super().__init__(message)
        self.key = key


# A backticked key in a message: `section.key`, `key[0]`, `key['name']`.
_KEY_IN_MESSAGE = re.compile(r"`([A-Za-z_][\w.]*)((?:\[[^\]`]*\])*)`")


def _qualify(message: str, prefix: str, names: typing.Iterable[str]) -> str:
    """Rewrites the keys of `message` that name a field of the section at `prefix` as full dotted keys.

    ``split.method`` or ``method`` under ``data.split`` become ``data.split.method``; keys
    already full or of other sections are kept.
    """
    names = set(names)
    if not prefix:
        return message

    def full(m):
        path, subscripts = m.group(1), m.group(2)
        name = path.rsplit(".", 1)[-1]
        qualified = f"{prefix}.{name}"
        if name in names and (qualified == path or qualified.endswith("." + path)):
            return f"`{qualified}{subscripts}`"
        return m.group(0)

    return _KEY_IN_MESSAGE.sub(full, message)


def _keys_in(message: str) -> List[str]:
    """The backticked keys of a message, without subscripts, in order."""
    return [m.group(1) for m in _KEY_IN_MESSAGE.finditer(message)]


def _check_tabular(source: str, tabular: Mapping[str, Any]) -> None:
    """Checks `data.tabular` by constructing the reader's `TabularOptions` from it."""
    from pipeline.data.tabular import TabularOptions

    fields = dataclasses.fields(TabularOptions)
    names = [f.name for f in fields]
    unknown = sorted(str(k) for k in tabular if k not in names)
    if unknown:
        keys = ", ".join(f"`data.tabular.{u}`" for u in unknown)
        raise ConfigError(f"unknown key(s) {keys} in `data.tabular`; known keys: {names}",
                          key=f"data.tabular.{unknown[0]}")
    for f in fields:
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in tabular:
            raise ConfigError(f"`data.tabular.{f.name}` is required for `data.source`={source!r} (see "
                              f"pipeline.data.tabular.read_tabular). Received: data.tabular={dict(tabular)!r}",
                              key=f"data.tabular.{f.name}")
    try:
        TabularOptions(**tabular)
    except (TypeError, ValueError) as e:
        message = _qualify(str(e), "data.tabular", names)
        if not _keys_in(message):
            message = f"invalid `data.tabular`: {message}"
        raise ConfigError(message) from None


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the interactions come from and how they are split.

    Attributes:
      source: ``synthetic`` (the embedded default), ``movielens`` (RecBole atomic,
        GroupLens 100K or 1M layout, detected), ``movielens_tfds`` (a prepared TFDS
        data dir; nothing is downloaded), ``bars`` (train.txt/test.txt), ``csv`` or
        ``parquet`` (generic logs, see `tabular`).
      path: directory or file of the source (unused for synthetic).
      bad_rows: ``fail`` at the first malformed row, or ``skip`` and count.
      positives: which interactions are retrieval positives: ``label`` (label > 0),
        ``all``, or ``auto`` (label when the data has one).
      history_length: length of the behaviour sequence.
      history_mode: what an event's behaviour sequence holds: ``past`` (the user's
        training positives strictly before it) or ``all_other`` (all the user's
        training positives but the event's own item; for data without meaningful
        time order such as the BARS splits) or ``random_prefix`` (the training
        positives before it in a seeded random order of the user's: a different random
        subset for every event, for the same data) or ``all`` (all the user's training
        positives, the event's own included: the test-time sequence for every event).
      tfds_name: TFDS dataset name for ``movielens_tfds``.
      split: the train/test split (``predefined`` only with a source that brings one:
        ``bars``).
      synthetic: generator settings for ``synthetic``.
      tabular: reader options for ``csv``/``parquet``: the fields of
        `pipeline.data.tabular.TabularOptions` (``columns`` required; feature tables,
        ``format``, ``timestamp_format``; see `pipeline.data.tabular.read_tabular`),
        checked when the config is loaded. Without ``format``, a `path` whose name ends
        in a known extension (``.csv``, ``.tsv``, ``.parquet``, ...) decides the format
        (it is then filled in); otherwise the source does.
    """

    source: str = "synthetic"
    path: str = ""
    bad_rows: str = "fail"
    positives: str = "auto"
    history_length: int = 20
    history_mode: str = "past"
    tfds_name: str = "movielens/100k-ratings"
    split: SplitConfig = SplitConfig()
    synthetic: SyntheticConfig = SyntheticConfig()
    tabular: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ConfigError(f"`data.source` should be one of {SOURCES}. Received: source={self.source!r}")
        if self.split.method == "predefined" and self.source not in SOURCES_WITH_SPLIT:
            raise ConfigError(f"`data.split.method` is 'predefined', but `data.source`={self.source!r} brings no "
                              f"split of its own (only {', '.join(SOURCES_WITH_SPLIT)} does): use auto, "
                              "leave_last_n, time or random. Received: method='predefined'")
        if self.source != "synthetic" and not self.path:
            raise ConfigError(f"`data.path` is required for `data.source`={self.source!r}")
        if self.bad_rows not in ("fail", "skip"):
            raise ConfigError(f"`data.bad_rows` should be 'fail' or 'skip'. Received: {self.bad_rows!r}")
        if self.positives not in ("auto", "all", "label"):
            raise ConfigError(f"`data.positives` should be auto, all or label. Received: {self.positives!r}")
        if self.history_mode not in HISTORY_MODES:
            raise ConfigError(f"`data.history_mode` should be one of {', '.join(HISTORY_MODES)}. "
                              f"Received: {self.history_mode!r}")
        if self.history_length < 1:
            raise ConfigError(f"`data.history_length` should be >= 1. Received: {self.history_length}")
        # One knob for the sequence length whatever the source: the generator's own is kept equal to it.
        if self.synthetic.history_length not in (SyntheticConfig.history_length, self.history_length):
            raise ConfigError("`data.synthetic.history_length` follows `data.history_length`: set that instead. "
                              f"Received: data.synthetic.history_length={self.synthetic.history_length}, "
                              f"data.history_length={self.history_length}", key="data.synthetic.history_length")
        if self.synthetic.history_length != self.history_length:
            object.__setattr__(self, "synthetic", dataclasses.replace(self.synthetic,
                                                                      history_length=self.history_length))
        if self.tabular and self.source not in TABULAR_SOURCES:
            raise ConfigError(f"`data.tabular` holds the options of the {' and '.join(TABULAR_SOURCES)} sources, and "
                              f"`data.source` is {self.source!r}: set data.source or leave data.tabular empty. "
                              f"Received: data.tabular={self.tabular}", key="data.tabular")
        if self.source in TABULAR_SOURCES:
            _check_tabular(self.source, self.tabular)
            if "format" not in self.tabular:
                # Without `format` the file name decides: a .tsv file is read as TSV with source csv.
                from pipeline.data.tabular import format_from_name

                named = format_from_name(self.path)
                if named is not None and named != self.source:
                    object.__setattr__(self, "tabular", {**self.tabular, "format": named})


@dataclasses.dataclass(frozen=True)
class StatsConfig:
    """The Beam statistics stage.

    Attributes:
      pipeline_args: Beam pipeline options passed through unchanged, e.g.
        ``["--runner=DirectRunner", "--direct_num_workers=2"]``.
      min_count: minimum count of a vocabulary entry.
      max_rejected_fraction: the job fails above this fraction of malformed rows.
    """

    pipeline_args: Tuple[str, ...] = ()
    min_count: int = 1
    max_rejected_fraction: float = 0.01

    def __post_init__(self):
        if self.min_count < 1:
            raise ConfigError(f"`stats.min_count` should be >= 1. Received: {self.min_count}")
        if not 0 <= self.max_rejected_fraction <= 1:
            raise ConfigError("`stats.max_rejected_fraction` should be in [0, 1]. "
                              f"Received: {self.max_rejected_fraction}")


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    """The two-tower retrieval model and its training.

    Attributes:
      embedding_dim: output size of both towers.
      feature_dim: embedding size of each categorical feature.
      hidden_units: hidden ReLU layers of each tower.
      normalize: L2-normalize tower outputs (then use a temperature < 1).
      temperature: logits are divided by it.
      dropout: dropout after hidden layers.
      embedding_l2: λ of an L2 penalty λ·Σ‖E‖² on every embedding table of both towers,
        added to the training loss (which is summed over the batch); 0 = none.
      query_dropout: dropout on the query embedding (after normalization) in training
        only, as SimpleX regularizes its user vector; 0 = none.
      history_pooling: how the query tower pools the behaviour history's item
        embeddings: ``mean`` or ``attention`` (weights from a learned query vector,
        `models.towers.MaskedAttentionPooling`; it starts as the mean).
      logq_correction: subtract log q(i) from candidate logits.
      logq_weight: a in the corrected logits q·c/τ − a·log q(i): 1 is the unbiased
        correction; above 1 the trained scores keep a share of popularity, (a − 1)·log q(i)
        (`models.cross_batch_retrieval.CrossBatchRetrieval`).
      remove_accidental_hits: mask in-batch copies of the positive item.
      loss: ``softmax`` (sampled softmax with logQ correction, the loss of
        `tfrs.tasks.Retrieval`) or ``ccl`` (the cosine contrastive loss of SimpleX over
        the same candidates: cosine similarity, a margin, no logQ correction; pair it
        with ``negatives: mixed`` and many uniform negatives).
      ccl_margin: m of the cosine contrastive loss: negatives with a cosine below it
        cost nothing.
      ccl_negative_weight: w of the cosine contrastive loss: the weight of the mean
        negative term against the positive's.
      ccl_negatives: the cosine contrastive loss's negatives: ``all`` (every candidate
        but the positive: the batch, the uniform items and the bank) or ``uniform``
        (only the `num_mixed_negatives` items drawn uniformly from the corpus, as in
        SimpleX; the batch's items follow the interaction distribution, and a pairwise
        loss without logQ correction pushes popular items down).
      negatives: ``inbatch`` (the batch's items), ``cbns``
        (in-batch plus a FIFO memory bank of recent batches' item embeddings after
        `warmup_steps`), or ``mixed`` (in-batch plus `num_mixed_negatives` items
        drawn uniformly from the corpus each step; combinable with the bank through
        `memory_size`).
      memory_size: entries of the cross-batch memory bank (``cbns``/``mixed``).
      warmup_steps: steps trained with in-batch negatives only before the bank is used.
      drift_correction: ``mean`` (the bank is re-centered on the current batch's mean
        embedding, which keeps the encoder from drifting away from its own stale
        entries; see `models.cross_batch_retrieval`) or ``none`` (the bank as stored,
        as in the CBNS paper).
      item_gradient: with a bank, ``batch`` (the batch's items get the gradient of the
        softmax over the fresh candidates, which does not pull every item towards the
        mean query) or ``all`` (of the softmax over every candidate, as in the paper).
      num_hard_negatives: keep only the k hardest negatives per row (0 = all).
      num_mixed_negatives: uniformly sampled corpus items per step (``mixed``).
      drift_every_n_steps: measure the item encoder's feature drift (CBNS Eq. 5) on
        512 items every this many steps, for choosing `warmup_steps` (0 = off); the
        curve is in the run report and TensorBoard.
      ssl_weight: α of the self-supervised auxiliary task on the item tower (Yao et
        al., CIKM'21): L = L_main + α·L_self; 0 = off.
      ssl_masking: how the two views of an item are made: ``correlated`` (CFM: a
        random seed feature and its most correlated features by the statistics'
        mutual information are masked in one view, the rest in the other),
        ``random`` (RFM: a random half), ``independent`` (each feature dropped with
        probability 1/2 in each view; feature dropout) or ``none`` (no masking: with
        `ssl_value_dropout` 0 the loss is the spread-out regularizer).
      ssl_correlation: what ranks a CFM seed feature's partners: ``normalized_mi``
        (MI / √(H(a)·H(b)), so that high-entropy features, the item id above all, do not
        win for their size) or ``mi`` (mutual information, the paper's).
      ssl_value_dropout: fraction of the values of multi-valued item features dropped
        in each view (each keeps at least one).
      ssl_temperature: τ of the contrastive loss.
      ssl_batch_size: items per step for the auxiliary task (with ``ssl_items=corpus``).
      ssl_items: where those items come from: ``corpus`` (uniformly from the item
        corpus, a separate input stream) or ``batch`` (the training batch's items,
        which follow the power-law interaction distribution).
      ssl_share: ``full`` (both tasks use the whole item-tower MLP) or ``partial``
        (shared hidden layers, an output layer of its own for the auxiliary task).
      optimizer: ``adam`` or ``adagrad``.
      learning_rate: optimizer step size (of the first epoch).
      learning_rate_schedule: ``constant``, ``step`` (the rate is multiplied by
        `learning_rate_decay` after each epoch count in `learning_rate_boundaries`) or
        ``cosine`` (from `learning_rate` at the first epoch to
        `learning_rate`·`learning_rate_decay` at the last); set per epoch
        (`models.learning_rate`).
      learning_rate_decay: the factor of the ``step`` and ``cosine`` schedules.
      learning_rate_boundaries: completed epochs after which ``step`` decays the rate.
      batch_size: positives per batch (the in-batch negatives).
      shuffle_buffer: training examples held by the shuffle buffer; each epoch is
        reshuffled within it (and the shards' order). A buffer holding the whole
        training set reshuffles it fully every epoch, which scored about 0.01 higher
        Recall@20 on MovieLens-1M than the default (README, Retrieval negatives); it
        costs the serialized examples' size in memory.
      epochs: passes over the training positives.
      seed: initialisation and shuffling.
      distribution: how many replicas train in lockstep (`models.distribution`):
        ``default`` (one replica, no strategy), ``mirrored`` (one replica per GPU, or
        per logical CPU device without GPU, in this process) or ``multi_worker``
        (synchronous training over the processes listed in the ``TF_CONFIG``
        environment variable; every worker runs the same job on its own workdir, the
        chief's is the one to serve). `batch_size` is the *global* batch: each of R
        replicas trains on batch_size/R examples per step, so with in-batch negatives
        each replica's softmax sees batch_size/R candidates (a cross-batch memory bank
        is shared by all replicas); with R > 1 the last partial batch of each epoch is
        dropped.
    """

    embedding_dim: int = 64
    feature_dim: int = 32
    hidden_units: Tuple[int, ...] = (128,)
    normalize: bool = True
    temperature: float = 0.1
    dropout: float = 0.0
    embedding_l2: float = 0.0
    query_dropout: float = 0.0
    history_pooling: str = "mean"
    logq_correction: bool = True
    logq_weight: float = 1.0
    remove_accidental_hits: bool = True
    loss: str = "softmax"
    ccl_margin: float = 0.9
    ccl_negative_weight: float = 150.0
    ccl_negatives: str = "all"
    negatives: str = "inbatch"
    memory_size: int = 0
    warmup_steps: int = 0
    drift_correction: str = "mean"
    item_gradient: str = "batch"
    num_hard_negatives: int = 0
    num_mixed_negatives: int = 0
    drift_every_n_steps: int = 50
    ssl_weight: float = 0.0
    ssl_masking: str = "correlated"
    ssl_correlation: str = "normalized_mi"
    ssl_value_dropout: float = 0.2
    ssl_temperature: float = 0.1
    ssl_batch_size: int = 512
    ssl_items: str = "corpus"
    ssl_share: str = "full"
    optimizer: str = "adam"
    learning_rate: float = 0.01
    learning_rate_schedule: str = "constant"
    learning_rate_decay: float = 0.1
    learning_rate_boundaries: Tuple[int, ...] = ()
    batch_size: int = 512
    shuffle_buffer: int = 50_000
    epochs: int = 6
    seed: int = 0
    distribution: str = "default"

    def __post_init__(self):
        for name, choices in (("loss", RETRIEVAL_LOSSES), ("ccl_negatives", CCL_NEGATIVES),
                              ("history_pooling", HISTORY_POOLINGS), ("drift_correction", DRIFT_CORRECTIONS),
                              ("item_gradient", ITEM_GRADIENTS), ("ssl_masking", SSL_MASKINGS),
                              ("ssl_correlation", SSL_CORRELATIONS),
                              ("distribution", DISTRIBUTIONS), ("learning_rate_schedule", LR_SCHEDULES),
                              ("negatives", NEGATIVES), ("optimizer", OPTIMIZERS), ("ssl_items", SSL_ITEMS),
                              ("ssl_share", SSL_SHARES)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"`retrieval.{name}` should be one of {', '.join(choices)}. "
                                  f"Received: {getattr(self, name)!r}")
        for name in ("embedding_dim", "feature_dim", "batch_size", "epochs", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`retrieval.{name}` should be >= 1. Received: {getattr(self, name)}")
        if any(u < 1 for u in self.hidden_units):
            raise ConfigError(f"`retrieval.hidden_units` should be positive. Received: {list(self.hidden_units)}")
        if self.temperature <= 0:
            raise ConfigError(f"`retrieval.temperature` should be positive. Received: {self.temperature}")
        if self.learning_rate <= 0:
            raise ConfigError(f"`retrieval.learning_rate` should be positive. Received: {self.learning_rate}")
        if not 0 <= self.learning_rate_decay <= 1 or (self.learning_rate_schedule == "step"
                                                     and self.learning_rate_decay == 0):
            raise ConfigError("`retrieval.learning_rate_decay` should be in (0, 1] (in [0, 1] with the cosine "
                              f"schedule). Received: {self.learning_rate_decay}")
        bounds = self.learning_rate_boundaries
        if any(not 1 <= b < self.epochs for b in bounds) or list(bounds) != sorted(set(bounds)):
            raise ConfigError("`retrieval.learning_rate_boundaries` should be increasing epoch counts in "
                              f"[1, epochs - 1] = [1, {self.epochs - 1}]. Received: {list(bounds)}")
        if (self.learning_rate_schedule == "step") != bool(bounds):
            raise ConfigError("`retrieval.learning_rate_boundaries` are used by, and needed by, "
                              "learning_rate_schedule=step. Received: "
                              f"learning_rate_schedule={self.learning_rate_schedule}, boundaries={list(bounds)}")
        if not -1 <= self.ccl_margin < 1:
            raise ConfigError(f"`retrieval.ccl_margin` should be in [-1, 1). Received: {self.ccl_margin}")
        if self.ccl_negative_weight < 0:
            raise ConfigError(f"`retrieval.ccl_negative_weight` should be >= 0. Received: {self.ccl_negative_weight}")
        if self.loss == "ccl" and not self.normalize:
            raise ConfigError("`retrieval.loss=ccl` trains cosine similarities, and serving scores dot products of "
                              "the tower outputs: set `retrieval.normalize=true`. Received: normalize=false")
        if self.ccl_negatives == "uniform" and (self.loss != "ccl" or self.negatives != "mixed"
                                                or self.num_mixed_negatives < 1):
            raise ConfigError("`retrieval.ccl_negatives=uniform` keeps only the uniformly drawn negatives of the "
                              "cosine contrastive loss: set `retrieval.loss=ccl` and `retrieval.negatives=mixed` "
                              f"with `num_mixed_negatives` >= 1. Received: loss={self.loss}, "
                              f"negatives={self.negatives}, num_mixed_negatives={self.num_mixed_negatives}")
        if self.loss == "ccl" and self.num_hard_negatives:
            raise ConfigError("`retrieval.num_hard_negatives` applies to the softmax loss, not to loss=ccl. "
                              f"Received: num_hard_negatives={self.num_hard_negatives}")
        for name in ("memory_size", "warmup_steps", "num_hard_negatives", "num_mixed_negatives",
                     "drift_every_n_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"`retrieval.{name}` should be >= 0. Received: {getattr(self, name)}")
        if self.negatives == "inbatch" and self.memory_size:
            raise ConfigError("`retrieval.memory_size` builds a memory bank, which negatives=inbatch does not use: "
                              "set `retrieval.negatives=cbns` (or `mixed`, which combines with a bank) or "
                              f"memory_size=0. Received: negatives=inbatch, memory_size={self.memory_size}")
        if self.negatives == "cbns" and self.memory_size < 1:
            raise ConfigError("`retrieval.memory_size` should be >= 1 with negatives=cbns. "
                              f"Received: memory_size={self.memory_size}")
        if self.negatives == "mixed" and self.num_mixed_negatives < 1:
            raise ConfigError("`retrieval.num_mixed_negatives` should be >= 1 with negatives=mixed. "
                              f"Received: num_mixed_negatives={self.num_mixed_negatives}")
        if self.negatives != "mixed" and self.num_mixed_negatives:
            raise ConfigError("`retrieval.num_mixed_negatives` draws uniform negatives, which only negatives=mixed "
                              "uses (with `memory_size` it combines them with a bank): set "
                              f"`retrieval.negatives=mixed` or num_mixed_negatives=0. Received: "
                              f"negatives={self.negatives}, num_mixed_negatives={self.num_mixed_negatives}")
        if self.warmup_steps and not self.memory_size:
            raise ConfigError("`retrieval.warmup_steps` delays the memory bank, and there is none: set "
                              "`retrieval.memory_size` (negatives=cbns or mixed) or warmup_steps=0. "
                              f"Received: memory_size=0, warmup_steps={self.warmup_steps}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"`retrieval.dropout` should be in [0, 1). Received: {self.dropout}")
        if self.embedding_l2 < 0:
            raise ConfigError(f"`retrieval.embedding_l2` should be >= 0. Received: {self.embedding_l2}")
        if not 0 <= self.query_dropout < 1:
            raise ConfigError(f"`retrieval.query_dropout` should be in [0, 1). Received: {self.query_dropout}")
        if not 0 <= self.logq_weight < math.inf:
            raise ConfigError(f"`retrieval.logq_weight` should be a finite number >= 0. Received: {self.logq_weight}")
        if self.logq_weight != 1.0 and not self.logq_correction:
            raise ConfigError("`retrieval.logq_weight` weighs the logQ correction, which logq_correction=false turns "
                              f"off. Received: logq_correction=false, logq_weight={self.logq_weight}")
        if self.logq_weight != 1.0 and self.loss == "ccl":
            raise ConfigError("`retrieval.logq_weight` applies to the softmax loss; loss=ccl has no logQ correction. "
                              f"Received: loss='ccl', logq_weight={self.logq_weight}")
        if self.ssl_weight < 0:
            raise ConfigError(f"`retrieval.ssl_weight` should be >= 0. Received: {self.ssl_weight}")
        if not 0 <= self.ssl_value_dropout < 1:
            raise ConfigError(f"`retrieval.ssl_value_dropout` should be in [0, 1). Received: {self.ssl_value_dropout}")
        if self.ssl_temperature <= 0:
            raise ConfigError(f"`retrieval.ssl_temperature` should be positive. Received: {self.ssl_temperature}")
        if self.ssl_batch_size < 2:
            raise ConfigError(f"`retrieval.ssl_batch_size` should be >= 2. Received: {self.ssl_batch_size}")


RANKER_MODELS = ("can", "dnn", "din", "cartesian")
RANKER_LOSSES = ("bce", "focal", "ghm")
SEQUENCE_POOLINGS = ("coaction_then_sum", "sum_then_coaction", "coaction_then_mean", "mean_then_coaction")


@dataclasses.dataclass(frozen=True)
class RankerConfig:
    """The ranking stage (`models.ranking`): a click model over (user, item) features.

    It trains on the labelled interactions of the data (``label``: clicks of the
    synthetic data, rating >= 4 for MovieLens); data without labels (implicit
    positives only, such as the BARS splits) skip it. Each user's behaviour sequence
    at an event holds only the items of that user's earlier events.

    Attributes:
      enabled: train, evaluate and export the ranker (when the data have labels).
      model: ``can`` (Co-Action Network), or the baselines ``dnn``, ``din`` (target
        attention over the sequence), ``cartesian`` (Cartesian-product ids).
      loss: ``bce``, ``focal`` or ``ghm`` (GHM-C).
      embedding_dim: size of the representation embeddings.
      hidden_units: layers of the final MLP.
      coaction_feed_dim: D, the size of CAN's feed embeddings.
      coaction_layer_sizes: CAN's micro-MLP layer sizes after D.
      coaction_orders: C of the multi-order enhancement.
      order_independent, combination_independent: CAN's independence switches.
      sequence_pooling: ``coaction_then_sum`` or ``sum_then_coaction`` (Eq. 10), or the
        means ``coaction_then_mean`` / ``mean_then_coaction``.
      coaction_l2: λ of an L2 penalty λ·Σw² on the co-action tables (CAN's, or the
        Cartesian model's cross tables); 0 = none.
      epochs: the maximum number of epochs; the epoch with the best validation AUC is kept.
      validation_fraction: each user's last training events held out to pick the epoch.
      batch_size, learning_rate, seed: training.
    """

    enabled: bool = True
    model: str = "can"
    loss: str = "bce"
    embedding_dim: int = 8
    hidden_units: Tuple[int, ...] = (64, 32)
    coaction_feed_dim: int = 8
    coaction_layer_sizes: Tuple[int, ...] = (4, 4)
    coaction_orders: int = 2
    order_independent: bool = False
    combination_independent: bool = False
    sequence_pooling: str = "coaction_then_mean"
    coaction_l2: float = 0.0
    epochs: int = 3
    validation_fraction: float = 0.1
    batch_size: int = 512
    learning_rate: float = 0.003
    seed: int = 0

    def __post_init__(self):
        for name, choices in (("model", RANKER_MODELS), ("loss", RANKER_LOSSES),
                              ("sequence_pooling", SEQUENCE_POOLINGS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"`ranker.{name}` should be one of {', '.join(choices)}. "
                                  f"Received: {getattr(self, name)!r}")
        for name in ("embedding_dim", "coaction_feed_dim", "coaction_orders", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`ranker.{name}` should be >= 1. Received: {getattr(self, name)}")
        for name in ("hidden_units", "coaction_layer_sizes"):
            if any(v < 1 for v in getattr(self, name)):
                raise ConfigError(f"`ranker.{name}` should hold positive sizes. Received: {list(getattr(self, name))}")
        if not self.coaction_layer_sizes:
            raise ConfigError("`ranker.coaction_layer_sizes` should not be empty")
        if not 0 <= self.coaction_l2 < float("inf"):
            raise ConfigError(f"`ranker.coaction_l2` should be a finite number >= 0. Received: {self.coaction_l2}")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"`ranker.validation_fraction` should be in [0, 1). Received: {self.validation_fraction}")
        if not self.learning_rate > 0:
            raise ConfigError(f"`ranker.learning_rate` should be > 0. Received: {self.learning_rate}")


@dataclasses.dataclass(frozen=True)
class PrerankerStageConfig:
    """The pre-ranking stage (`models.preranking`): AutoFAS distilled from the ranker.

    It runs when the ranker does (it is the teacher). The search learns which features
    to keep (a keep probability per feature) and which operator each of `num_mixops`
    layers uses (dense layers of `operator_widths`, or identity), under a latency cost
    measured on this machine; the derived network is retrained from scratch with
    distillation and exported.

    Attributes:
      enabled: search, retrain, evaluate and export the pre-ranker.
      num_mixops: L, the searched layers.
      operator_widths: widths of the dense candidate operators of each layer.
      latency_weight: λ of Loss1 (feature masks), per ms of expected latency.
      distillation_weight: λ1, the share of the ranker-distillation term in [0, 1].
      architecture_latency_weight: λ2 of Loss2 (architecture), per ms.
      search_epochs, retrain_epochs: passes over the training events (retraining keeps
        the epoch of best validation score, see `retrain_selection`).
      retrain_patience: retraining stops after this many epochs without a better
        validation score.
      mask_objective: the task term of Loss1, which trains the feature masks:
        "distillation" (the distilled loss of Loss2, so that a feature the ranker relies
        on is kept even when the labels alone do not need it: more agreement with the
        ranker, more features, more latency) or "labels" (BCE, as in the paper). On the
        default data the labels' search kept 9–10 features at test AUC 0.833–0.873,
        the distilled one 10–11 at 0.873–0.884, the ranker's (`benchmarks/RESULTS.md`).
      retrain_selection: the validation score that picks the retraining epoch: "auc"
        (on the labels) or "distillation" (the retraining loss on the validation
        events, the ranker's logits included).
      search_max_events: the search runs on a seeded sample of at most this many
        training events (0 = all); retraining uses all of them.
      latency_repeats: timed calls per latency micro-benchmark (medians are used).
      candidates: candidates per request that the latency model times; set it to
        what the pre-ranker scores when serving (`recfunnel serve
        --retrieval-candidates`).
      batch_size, learning_rate, seed: training.
      external_feature_costs: feature → extra milliseconds per request for features a
        deployment fetches from an external store (added to the measured costs).
      latency_table: a latency table (JSON) to search against instead of measuring one
        on this machine: the table a run wrote (``latency_table.json`` in the run's
        pre-ranker checkpoint, named in the log and in ``metrics.json`` at
        ``preranker`` → ``latency_table`` → ``path``), taken from a run on a machine
        like the serving CPUs, or kept so that scheduled runs search against the same
        costs every day (the measurement's noise can move the chosen network). Its
        costs are used as they are, so `external_feature_costs` must be empty (a run's
        table already holds that run's). Empty: measure.
    """

    enabled: bool = True
    num_mixops: int = 3
    operator_widths: Tuple[int, ...] = (16, 32, 64, 128)
    latency_weight: float = 0.1
    distillation_weight: float = 0.5
    architecture_latency_weight: float = 0.03
    search_epochs: int = 3
    retrain_epochs: int = 20
    retrain_patience: int = 2
    mask_objective: str = "distillation"
    retrain_selection: str = "distillation"
    search_max_events: int = 30_000
    latency_repeats: int = 15
    candidates: int = 1000
    batch_size: int = 512
    learning_rate: float = 0.003
    seed: int = 0
    external_feature_costs: Dict[str, float] = dataclasses.field(default_factory=dict)
    latency_table: str = ""

    def __post_init__(self):
        if self.latency_table and self.external_feature_costs:
            raise ConfigError(f"`preranker.latency_table` ({self.latency_table}) is used as it is: leave "
                              f"`preranker.external_feature_costs` empty (a run's table already holds that run's "
                              f"external costs). Received: {dict(self.external_feature_costs)}")
        for name in ("num_mixops", "search_epochs", "retrain_epochs", "retrain_patience", "batch_size",
                     "latency_repeats", "candidates"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`preranker.{name}` should be >= 1. Received: {getattr(self, name)}")
        if self.search_max_events < 0:
            raise ConfigError(f"`preranker.search_max_events` should be >= 0 (0 = all events). "
                              f"Received: {self.search_max_events}")
        if not self.operator_widths or any(w < 1 for w in self.operator_widths):
            raise ConfigError(f"`preranker.operator_widths` should hold positive widths. "
                              f"Received: {list(self.operator_widths)}")
        for name, choices in (("mask_objective", PRERANKER_MASK_OBJECTIVES),
                              ("retrain_selection", PRERANKER_RETRAIN_SELECTIONS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"`preranker.{name}` should be one of {', '.join(choices)}. "
                                  f"Received: {name}={getattr(self, name)!r}")
        if not 0 <= self.distillation_weight <= 1:
            raise ConfigError(f"`preranker.distillation_weight` should be in [0, 1]. "
                              f"Received: {self.distillation_weight}")
        for name in ("latency_weight", "architecture_latency_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"`preranker.{name}` should be >= 0. Received: {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"`preranker.learning_rate` should be > 0. Received: {self.learning_rate}")
        for feature, cost in self.external_feature_costs.items():
            if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not cost >= 0:
                raise ConfigError(f"`preranker.external_feature_costs.{feature}` should be a number of "
                                  f"milliseconds >= 0. Received: {cost!r}")


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """Offline evaluation over the full corpus.

    Attributes:
      ks: cut-offs K of Recall@K and NDCG@K.
      max_users: evaluate at most this many test users (seeded sample); 0 = all.
      seed: the user sample.
      head_fraction: the most frequent training items, as a fraction of the corpus,
        that count as the head; Recall/NDCG on the rest (``retrieval.tail.*``) count
        only test items of the tail.
    """

    ks: Tuple[int, ...] = (10, 50)
    max_users: int = 0
    seed: int = 0
    head_fraction: float = 0.2

    def __post_init__(self):
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"`evaluation.ks` should be positive integers. Received: {list(self.ks)}")
        if self.max_users < 0:
            raise ConfigError(f"`evaluation.max_users` should be >= 0. Received: {self.max_users}")
        if not 0 <= self.head_fraction < 1:
            raise ConfigError(f"`evaluation.head_fraction` should be in [0, 1). Received: {self.head_fraction}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The whole scheduled job."""

    data: DataConfig = DataConfig()
    stats: StatsConfig = StatsConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    ranker: RankerConfig = RankerConfig()
    preranker: PrerankerStageConfig = PrerankerStageConfig()
    index: IndexConfig = IndexConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    promotion: PromotionConfig = PromotionConfig()

    def __post_init__(self):
        found = _non_finite(self, "")
        if found is not None:
            key, value = found
            raise ConfigError(f"`{key}` should be a finite number. Received: {value}", key=key)
        metric = re.fullmatch(r"(.+)\.([a-z_]+)@(\d+)", self.promotion.metric)
        if metric is None or metric.group(1) not in CUTOFF_METRICS:
            self._check_stage_metric(self.promotion.metric)
        else:
            prefix, name, k = metric.group(1), metric.group(2), int(metric.group(3))
            if name not in CUTOFF_METRICS[prefix]:
                raise ConfigError(f"`promotion.metric` {self.promotion.metric!r} is not a metric the evaluation "
                                  f"writes; at each K of `evaluation.ks` it writes {prefix}.<name>@K for "
                                  f"<name> in {', '.join(CUTOFF_METRICS[prefix])}", key="promotion.metric")
            if k not in self.evaluation.ks:
                raise ConfigError(f"`promotion.metric` {self.promotion.metric!r} is measured at K={k}, which is "
                                  f"not among `evaluation.ks` {list(self.evaluation.ks)}: add {k} to "
                                  "evaluation.ks or gate on a metric at one of its cut-offs", key="promotion.metric")

    def _check_stage_metric(self, name: str) -> None:
        """`promotion.metric` outside the cut-off metrics: a ranker or pre-ranker AUC the run will write."""
        stage = name.split(".", 1)[0]
        if name not in GATE_STAGE_METRICS:
            lower = stage in ("ranker", "preranker") and name.split(".", 1)[-1] in LOWER_IS_BETTER
            why = ("lower is better for it, and the gate keeps a version whose metric is higher" if lower
                   else "it is not a metric the run writes")
            raise ConfigError(f"`promotion.metric` {name!r} cannot gate a promotion: {why}. Use a cut-off metric "
                              f"<prefix>.<name>@K (prefix in {', '.join(CUTOFF_METRICS)}; K in `evaluation.ks`) "
                              f"or one of {', '.join(GATE_STAGE_METRICS)}", key="promotion.metric")
        needed = ("ranker",) if stage == "ranker" else ("ranker", "preranker")  # the pre-ranker distils the ranker
        off = [s for s in needed if not getattr(self, s).enabled]
        if off:
            raise ConfigError(f"`promotion.metric` {name!r} is written by the {stage} stage, which "
                              f"`{off[0]}.enabled=false` turns off", key="promotion.metric")


def _non_finite(value: Any, key: str) -> Optional[Tuple[str, float]]:
    """(dotted key, value) of the first NaN or infinite number in a config (sections, lists, mappings)."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (key, value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
        children = [(f"{key}.{name}" if key else name, v) for name, v in items]
    elif isinstance(value, (list, tuple)):
        children = [(f"{key}[{i}]", v) for i, v in enumerate(value)]
    elif isinstance(value, Mapping):
        children = [(f"{key}.{k}", v) for k, v in value.items()]
    else:
        return None
    for child_key, child in children:
        found = _non_finite(child, child_key)
        if found is not None:
            return found
    return None


# -- loading -------------------------------------------------------------------------
def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:  # a section with every key commented out
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"`{key}` should be a mapping. Received: {value!r}", key=key)
        return _build(tp, value, key)
    if tp is Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if origin in (tuple, Tuple, list, List, Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"`{key}` should be a list. Received: {value!r}", key=key)
        elem = args[0] if args else Any
        return tuple(_convert(v, elem, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Dict, Mapping):
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"`{key}` should be a mapping. Received: {value!r}", key=key)
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"`{key}` should be true or false. Received: {value!r}", key=key)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"`{key}` should be an integer. Received: {value!r}", key=key)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"`{key}` should be a number. Received: {value!r}", key=key)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"`{key}` should be a string. Received: {value!r}", key=key)
        return value
    return value


def _build(cls, values: Mapping[str, Any], prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(u) for u in set(values) - names)
    if unknown:
        where = f"`{prefix}`" if prefix else "the top level"
        keys = ", ".join(f"`{prefix}.{u}`" if prefix else f"`{u}`" for u in unknown)
        raise ConfigError(f"unknown key(s) {keys} "
                          f"in {where}; known keys: {sorted(names)}",
                          key=f"{prefix}.{unknown[0]}" if prefix else unknown[0])
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        # Sections defined outside this module name their keys without the section
        # (`split.method`, `num_users`): the message gets the full dotted keys.
        message = _qualify(str(e), prefix, names)
        if not _keys_in(message):
            message = f"invalid `{prefix or 'config'}`: {message}"
        raise ConfigError(message) from None


def _set_dotted(tree: Dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if child is None:  # a section with every key commented out
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set `{dotted}`: `{p}` is not a section")
        node = child
    node[parts[-1]] = value


class _Loader(yaml.SafeLoader):
    """YAML with the scalars of YAML 1.2 (``1e-3`` is a number; ``on``/``off``/``yes``/``no`` are strings) and
    duplicate keys refused (PyYAML would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # the base constructor rejects it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def parse_override(text: str) -> Tuple[str, Any]:
    """``a.b=value`` → (``"a.b"``, YAML-parsed value).

    A value that YAML cannot start a scalar with (``%``, ``@``, a backquote), such as a
    strftime format ``%Y-%m-%d``, is taken as the string it is.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} should look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        text = raw.strip()
        value = text if not text or text[0] in "%@`" else _load_yaml(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse the value: {e}") from None
    return key, value


def _read_file(path: str) -> Dict[str, Any]:
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a directory, not a config file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}: not UTF-8 text: byte 0x{data[e.start]:02x} on line {line} "
                          f"(offset {e.start})") from None
    try:
        loaded = _load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level should be a mapping of sections")
    return loaded


def _has_key(tree: Mapping[str, Any], dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _origin(error: ConfigError, path: Optional[str], file_tree: Mapping[str, Any],
            overrides: Sequence[Tuple[str, str]]) -> str:
    """Where the values an error names came from: overrides (``--set key=value``, or a command's own
    flag), the file, or both.

    `overrides` holds (dotted key, how it was given). A key counts as set by the last
    override of it or of a section holding it, else by the file when the file has it.
    When none of the keys named was set anywhere (a default in conflict with another
    setting), every source is named.
    """
    keys = list(dict.fromkeys(([error.key] if error.key else []) + _keys_in(str(error))))
    blamed: List[str] = []
    in_file = False
    for key in keys:
        setters = [given for dotted, given in overrides
                   if key == dotted or key.startswith((dotted + ".", dotted + "["))]
        if setters:
            if setters[-1] not in blamed:
                blamed.append(setters[-1])
        elif path and _has_key(file_tree, key):
            in_file = True
    sources = ([path] if in_file else []) + blamed
    if not sources:
        sources = ([path] if path else []) + [given for _, given in overrides]
    return " and ".join(sources)


def load_config(path: Optional[str] = None, overrides: Sequence[str] = (), *,
                values: Sequence[Tuple[str, Any, str]] = (), defaults: Mapping[str, Any] = {}) -> RunConfig:
    """Reads a YAML config (or the defaults) and applies ``key=value`` overrides.

    Args:
      path: the YAML file, or None for the built-in defaults.
      overrides: ``--set`` texts ``section.key=value`` (values read as YAML), applied last.
      values: (dotted key, value, how it was given, e.g. ``"--data-dir X"``) set as they are (no
        YAML reading), after the file and before `overrides`: a command's own flags.
      defaults: dotted key → value used where neither the file nor an override sets the key.

    Raises:
      ConfigError: naming the key, the value and where it came from (`path`, the
        ``--set`` override, or the flag of `values`).
    """
    file_tree = _read_file(path) if path else {}
    tree = copy.deepcopy(file_tree)
    applied: List[Tuple[str, str]] = []
    settings = [(key, value, given) for key, value, given in values]
    for text in overrides:
        key, value = parse_override(text)
        settings.append((key, value, f"--set {text}"))
    for key, value in defaults.items():
        if not _has_key(file_tree, key) and not any(key == k for k, _, _ in settings):
            _set_dotted(tree, key, value)
    for key, value, given in settings:
        try:
            _set_dotted(tree, key, value)
        except ConfigError as e:
            raise ConfigError(f"{given}: {e}") from None
        applied.append((key, given))
    try:
        return _build(RunConfig, tree)
    except ConfigError as e:
        origin = _origin(e, path, file_tree, applied)
        raise ConfigError(f"{origin}: {e}" if origin else str(e), key=e.key) from None


def config_to_dict(config) -> Dict[str, Any]:
    """Plain dict (lists for tuples) for reports and YAML."""
    def clean(v):
        if isinstance(v, tuple):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v
    return clean(dataclasses.asdict(config))


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
