"""AutoFAS end to end: measure latency, search, derive, retrain with distillation.

    train_preranker(schema, vocabularies, train_frame, valid_frame, teacher, config)
        1. ranker logits r(x) of every training/validation row (the teacher);
        2. the latency table measured on this machine (`measurement.measure_latency_table`,
           plus `config.external_feature_costs`), unless one is given;
        3. search: each batch draws the feature masks once, runs the super-network once
           and takes Loss1 → θ and Loss2 → (α, weights) (`losses` module docstring);
        4. derive (`autofas.derive_architecture`) and retrain the derived `PreRanker`
           from scratch on ``(1 − λ1)·BCE + λ1·(r − p)²``, keeping the epoch of lowest
           validation loss (or of best validation AUC: `retrain_selection`);
        → ``(PreRanker, metrics)``, metrics holding the chosen features and architecture.

References:
  Li et al., "AutoFAS: Automatic Feature and Architecture Selection for Pre-Ranking
  System", KDD 2022.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from models.features import LABEL, Schema
from models.preranking.autofas import AutoFASSearch, DerivedArchitecture, derive_from_model
from models.preranking.latency import (IDENTITY, LatencyTable, architecture_latency, expected_architecture_latency,
                                       expected_feature_latency, expected_input_width)
from models.preranking.losses import DistillationLoss, distillation_loss, distillation_terms
from models.preranking.measurement import measure_latency_table
from models.preranking.preranker import PreRanker
from models.ranking.metrics import auc
from models.ranking.models import inputs_from_frame
from models.ranking.training import fit_with_epoch_selection
from models.tf_compat import keras, tf


RETRAIN_SELECTIONS = ("auc", "distillation")
MASK_OBJECTIVES = ("labels", "distillation")


@dataclasses.dataclass(frozen=True)
class PrerankerConfig:
    """Settings of the AutoFAS pre-ranking stage.

    Attributes:
      candidate_features: features the search may keep (None: every schema feature).
      embedding_dim: width of every categorical feature block.
      num_mixops: L, the searched layers.
      operator_widths: dense candidate widths of every Mixop.
      include_identity: add the identity operator (lets the network get shallower).
      latency_weight: λ of Loss1, per ms of expected latency. The costs are this
        machine's, so λ and λ2 are too. With Loss1 on the labels, λ = 0.02 kept exactly
        the features carrying planted signal on the synthetic benchmark data and 0.1
        dropped most of them; with the distilled Loss1 (the default), 0.1 keeps the
        features the ranker relies on (`benchmarks/RESULTS.md`).
      distillation_weight: λ1 of Loss2 and of the retraining loss, in [0, 1].
      architecture_latency_weight: λ2 of Loss2, per ms.
      initial_keep_probability: θ at the start of the search.
      keep_threshold: θ at or above which a feature is kept.
      search_epochs, retrain_epochs: passes over the training rows (retraining keeps
        the epoch of best validation score, see `retrain_selection`, and may stop
        earlier, see `retrain_patience`).
        A distilled network learns the teacher's logits slowly: on the synthetic
        benchmark data every derived network and the hand-designed MLP still improved
        at epoch 4, and the one-layer network at epoch 15.
      retrain_patience: retraining stops after this many epochs without a better
        validation score (the AUC curve is noisy by a few 1e-3 from epoch to epoch).
      retrain_selection: the validation score that picks the retraining epoch:
        ``"auc"`` (AUC on the labels) or ``"distillation"`` (the retraining loss on the
        validation rows, labels and ranker logits alike; see `fit_distilled`). The
        label AUC flattens while the student still learns the ranker's order: on the
        synthetic benchmark data it stopped the hand-designed MLP at epoch 11 (recall
        of the ranker's top 10: 0.9875), the loss at epoch 15 (0.9912).
      mask_objective: the task term of Loss1, which trains the feature masks:
        ``"distillation"`` (the distilled loss of Loss2, the default) or ``"labels"``
        (BCE, the paper's Loss1). On labels alone the search drops features the ranker
        relies on (the behaviour history, or brand and tags, on the synthetic benchmark
        data, which cost the pre-ranker part of the ranker's top 10;
        `benchmarks/RESULTS.md`).
      search_warmup_epochs: first search epochs that train only the network weights
        (on Loss2, with sampled masks) before θ and α move: untrained dense operators
        look worse than the identity, and a search without warm-up chose the identity
        in every Mixop in our small runs (the skip-connection bias known from
        differentiable architecture search).
      batch_size: rows per step.
      learning_rate: Adam step of the network weights (search and retraining).
      architecture_learning_rate: Adam step of α.
      mask_learning_rate: Adam step of θ.
      candidates: N of the latency model (candidates scored per request).
      external_feature_costs: feature → extra ms per request for features a deployment
        fetches from an external store (added to the measured lookup cost).
      latency_repeats: timed calls per micro-benchmark (medians are used).
      latency_items_encoded: item features cost what they cost on the serving cascade's
        path, vocabulary ids encoded when the model is loaded (True), or a string lookup
        per candidate as through ``serving_default`` (False); see `measurement`.
      search_max_events: the search runs on a seeded uniform sample of at most this many
        training events (0 = all of them); retraining always uses all of them. The
        search only has to rank features and operators, which a sample does nearly as
        well at a fraction of the cost of its three gradient computations per step.
      seed: initialization, shuffling and mask draws.
    """

    candidate_features: Optional[Tuple[str, ...]] = None
    embedding_dim: int = 8
    num_mixops: int = 3
    operator_widths: Tuple[int, ...] = (16, 32, 64, 128)
    include_identity: bool = True
    latency_weight: float = 0.1
    distillation_weight: float = 0.5
    architecture_latency_weight: float = 0.03
    initial_keep_probability: float = 0.9
    keep_threshold: float = 0.5
    search_epochs: int = 3
    search_warmup_epochs: int = 1
    retrain_epochs: int = 20
    retrain_patience: int = 2
    retrain_selection: str = "distillation"
    mask_objective: str = "distillation"
    batch_size: int = 512
    learning_rate: float = 0.003
    architecture_learning_rate: float = 0.05
    mask_learning_rate: float = 0.01
    candidates: int = 1000
    external_feature_costs: Tuple[Tuple[str, float], ...] = ()
    latency_repeats: int = 30
    latency_items_encoded: bool = True
    search_max_events: int = 0
    seed: int = 0

    def __post_init__(self):
        if self.candidate_features is not None:
            if isinstance(self.candidate_features, str):
                raise TypeError(f"`candidate_features` should be a sequence of feature names. "
                                f"Received: candidate_features={self.candidate_features!r}")
            object.__setattr__(self, "candidate_features", tuple(str(v) for v in self.candidate_features))
            if not self.candidate_features:
                raise ValueError("`candidate_features` should name at least one feature. Received: ()")
        object.__setattr__(self, "operator_widths", tuple(self.operator_widths))
        if not self.operator_widths or any(isinstance(w, bool) or int(w) != w or w < 1 for w in self.operator_widths) \
                or len(set(self.operator_widths)) != len(self.operator_widths):
            raise ValueError(f"`operator_widths` should be distinct positive widths. "
                             f"Received: operator_widths={self.operator_widths!r}")
        object.__setattr__(self, "operator_widths", tuple(int(w) for w in self.operator_widths))
        costs = self.external_feature_costs
        items = costs.items() if isinstance(costs, Mapping) else costs
        try:
            pairs = tuple(sorted((str(k), float(v)) for k, v in items))
        except (TypeError, ValueError):
            raise ValueError(f"`external_feature_costs` should map feature names to ms. "
                             f"Received: external_feature_costs={costs!r}") from None
        for name, value in pairs:
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"`external_feature_costs[{name!r}]` should be a finite cost >= 0 ms. "
                                 f"Received: {value!r}")
        object.__setattr__(self, "external_feature_costs", pairs)
        for name in ("embedding_dim", "num_mixops", "search_epochs", "retrain_epochs", "retrain_patience",
                     "batch_size", "candidates", "latency_repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"`{name}` should be a positive integer. Received: {name}={value!r}")
        value = self.search_max_events
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"`search_max_events` should be an integer >= 0 (0 = all events). "
                             f"Received: search_max_events={value!r}")
        if isinstance(self.search_warmup_epochs, bool) or not isinstance(self.search_warmup_epochs, (int, np.integer)) \
                or not 0 <= self.search_warmup_epochs < self.search_epochs:
            raise ValueError(f"`search_warmup_epochs` should be an integer in [0, search_epochs={self.search_epochs}). "
                             f"Received: search_warmup_epochs={self.search_warmup_epochs!r}")
        for name, choices in (("mask_objective", MASK_OBJECTIVES), ("retrain_selection", RETRAIN_SELECTIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"`{name}` should be one of {choices}. Received: {name}={getattr(self, name)!r}")
        for name in ("latency_weight", "architecture_latency_weight"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` should be >= 0. Received: {name}={value!r}")
        for name in ("distillation_weight", "initial_keep_probability", "keep_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"`{name}` should be in [0, 1]. Received: {name}={value!r}")
        for name in ("learning_rate", "architecture_learning_rate", "mask_learning_rate"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"`{name}` should be positive. Received: {name}={value!r}")

    @property
    def mixop_operators(self) -> Tuple[int, ...]:
        """Candidates of every Mixop (0 = identity first)."""
        return ((IDENTITY,) if self.include_identity else ()) + self.operator_widths

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["external_feature_costs"] = dict(self.external_feature_costs)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PrerankerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown preranker config keys {sorted(unknown)}; expected {sorted(known)}.")
        return cls(**d)


# ---------------------------------------------------------------------------------
# Search.
# ---------------------------------------------------------------------------------
class AutoFASSearchTrainer:
    """Runs the AutoFAS search on an `AutoFASSearch` super-network.

    Three Adam optimizers, one per variable group; each step applies ∂Loss1/∂θ and
    ∂Loss2/∂(α, weights) from one forward pass (the gradient block), then clips θ to
    [0, 1].
    """

    def __init__(self, model: AutoFASSearch, table: LatencyTable, config: PrerankerConfig,
                 optimizers: Optional[Tuple[Any, Any, Any]] = None):
        self.model, self.table, self.config = model, table, config
        self.feature_costs = tf.constant([table.feature_cost(n) for n in model.features], tf.float32)
        if optimizers is None:
            optimizers = (keras.optimizers.Adam(config.mask_learning_rate),
                          keras.optimizers.Adam(config.architecture_learning_rate),
                          keras.optimizers.Adam(config.learning_rate))
        self.mask_optimizer, self.architecture_optimizer, self.weight_optimizer = optimizers
        self._step = tf.function(self._train_step)
        self._warmup_step = tf.function(self._weights_step)

    def losses(self, features, labels, teacher_logits, seed) -> Dict[str, tf.Tensor]:
        """Loss1, Loss2 and their parts for one batch (one mask draw from `seed`)."""
        cfg, model = self.config, self.model
        logits = model(features, seed=seed, training=True)
        bce, distill = (tf.reduce_mean(t) for t in distillation_terms(labels, teacher_logits, logits))
        theta = model.mask.keep_probabilities()
        alphas = model.operator_probabilities()
        width = expected_input_width(theta, model.feature_widths)
        feature_latency = expected_feature_latency(theta, self.feature_costs)
        # Gradient block inside the latency terms: Loss1 sees α as constants, Loss2 sees θ.
        arch_latency_masks = expected_architecture_latency([tf.stop_gradient(a) for a in alphas],
                                                           model.operator_widths, width, self.table)
        arch_latency = expected_architecture_latency(alphas, model.operator_widths, tf.stop_gradient(width),
                                                     self.table)
        distilled = tf.reduce_mean(distillation_loss(labels, teacher_logits, logits, cfg.distillation_weight))
        mask_task = bce if cfg.mask_objective == "labels" else distilled
        loss1 = mask_task + cfg.latency_weight * (feature_latency + arch_latency_masks)
        loss2 = distilled + cfg.architecture_latency_weight * arch_latency
        return {"loss1": loss1, "loss2": loss2, "bce": bce, "distillation": distill,
                "feature_latency_ms": feature_latency, "architecture_latency_ms": arch_latency,
                "expected_latency_ms": feature_latency + arch_latency}

    def gradients(self, features, labels, teacher_logits, seed):
        """``(losses, ∂Loss1/∂θ, ∂Loss2/∂α, ∂Loss2/∂weights)``."""
        model = self.model
        with tf.GradientTape(persistent=True) as tape:
            out = self.losses(features, labels, teacher_logits, seed)
        g_mask = tape.gradient(out["loss1"], model.mask_variables)
        g_arch = tape.gradient(out["loss2"], model.architecture_variables)
        g_weights = tape.gradient(out["loss2"], model.weight_variables)
        del tape
        return out, g_mask, g_arch, g_weights

    def _train_step(self, features, labels, teacher_logits, seed):
        model = self.model
        out, g_mask, g_arch, g_weights = self.gradients(features, labels, teacher_logits, seed)
        self.mask_optimizer.apply_gradients(zip(g_mask, model.mask_variables))
        self.architecture_optimizer.apply_gradients(zip(g_arch, model.architecture_variables))
        self.weight_optimizer.apply_gradients(
            [(g, v) for g, v in zip(g_weights, model.weight_variables) if g is not None])
        model.mask.theta.assign(tf.clip_by_value(model.mask.theta, 0.0, 1.0))
        return out

    def _weights_step(self, features, labels, teacher_logits, seed):
        """Warm-up: ∂Loss2 on the network weights only (θ and α stay)."""
        model = self.model
        with tf.GradientTape() as tape:
            out = self.losses(features, labels, teacher_logits, seed)
        grads = tape.gradient(out["loss2"], model.weight_variables)
        self.weight_optimizer.apply_gradients([(g, v) for g, v in zip(grads, model.weight_variables) if g is not None])
        return out

    def train_step(self, features, labels, teacher_logits, seed) -> Dict[str, float]:
        out = self._step(features, labels, teacher_logits, tf.constant(seed, tf.int32))
        return {k: float(v) for k, v in out.items()}

    def fit(self, features: Mapping[str, Any], labels, teacher_logits, epochs: int, warmup_epochs: int = 0,
            on_epoch: Optional[Callable[[int, Dict[str, Any]], None]] = None) -> List[Dict[str, Any]]:
        """Trains `epochs` passes (the first `warmup_epochs` on the weights only); returns
        per-epoch means of the losses and θ, softmax(α)."""
        cfg = self.config
        labels = np.asarray(labels, np.float32).reshape(-1)
        teacher_logits = np.asarray(teacher_logits, np.float32).reshape(-1)
        ds = (tf.data.Dataset.from_tensor_slices((dict(features), labels, teacher_logits))
              .shuffle(len(labels), seed=cfg.seed, reshuffle_each_iteration=True)
              # Whole batches only (when there is at least one): a short last batch would
              # trace both step functions a second time, which costs more than it teaches.
              .batch(cfg.batch_size, drop_remainder=len(labels) >= cfg.batch_size).prefetch(2))
        # The model must exist before the optimizers see its variables.
        first = next(iter(ds))
        self.model(first[0])
        history, step = [], 0
        for epoch in range(int(epochs)):
            sums: Dict[str, float] = {}
            batches = 0
            for x, y, r in ds:
                step_fn = self._warmup_step if epoch < warmup_epochs else self._step
                out = step_fn(x, y, r, tf.constant([cfg.seed, step], tf.int32))
                step += 1
                batches += 1
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
            record = {k: round(v / max(batches, 1), 5) for k, v in sums.items()}
            record["keep_probabilities"] = [round(float(t), 4) for t in self.model.mask.keep_probabilities().numpy()]
            record["operator_probabilities"] = [[round(float(p), 4) for p in a.numpy()]
                                                for a in self.model.operator_probabilities()]
            if not all(np.isfinite(v) for k, v in record.items() if isinstance(v, float)):
                raise FloatingPointError(f"AutoFAS search diverged at epoch {epoch + 1}: {record}")
            history.append(record)
            if on_epoch is not None:
                on_epoch(epoch, record)
        return history


# ---------------------------------------------------------------------------------
# Teacher, retraining, latency of a derived network.
# ---------------------------------------------------------------------------------
def teacher_logits(teacher, features: Mapping[str, Any], batch_size: int = 4096) -> np.ndarray:
    """Ranker logits ``[n]`` (float32) of feature rows; `teacher` is a Keras model
    returning logits (e.g. a `RankingModel`) or a callable ``features → logits``."""
    ds = tf.data.Dataset.from_tensor_slices(dict(features)).batch(batch_size)
    if isinstance(teacher, keras.Model):
        out = teacher.predict(ds, verbose=0)
    else:
        out = np.concatenate([np.asarray(teacher(batch)).reshape(-1) for batch in ds])
    out = np.asarray(out, np.float32).reshape(-1)
    if not np.all(np.isfinite(out)):
        raise FloatingPointError(f"the teacher returned {int(np.sum(~np.isfinite(out)))} non-finite logits")
    return out


def predict_logits(model, features: Mapping[str, Any], batch_size: int = 4096) -> np.ndarray:
    names = getattr(model, "features", None) or list(features)
    ds = tf.data.Dataset.from_tensor_slices({n: features[n] for n in names}).batch(batch_size)
    return np.asarray(model.predict(ds, verbose=0), np.float64).reshape(-1)


def fit_distilled(model: PreRanker, train: Tuple[Mapping[str, Any], np.ndarray, np.ndarray],
                  validation: Optional[Tuple] = None, *, epochs: int,
                  batch_size: int, learning_rate: float, distillation_weight: float, seed: int = 0,
                  patience: int = 1, select_on: str = "auc",
                  on_epoch: Optional[Callable[[int, Dict[str, Any]], None]] = None) -> Dict[str, Any]:
    """Trains a pre-ranker on ``(1 − λ1)·BCE + λ1·(r − p)²`` with epoch selection on the
    validation rows (stops after `patience` epochs without improvement, keeps the best).

    Args:
      train: ``(features, labels, teacher logits)``.
      validation: ``(features, labels)``, or ``(features, labels, teacher logits)``
        (needed by ``select_on="distillation"``), or None (train every epoch).
      select_on: ``"auc"``: the epoch of highest validation AUC on the labels;
        ``"distillation"``: the epoch of lowest validation loss, the training objective
        itself (how well the pre-ranker reproduces the ranker as well as the labels).
      on_epoch: called after each epoch with ``(epoch, {"loss", <validation score>})``.

    Returns:
      ``{"train_loss", "validation_auc", "epochs", "seconds"}``, plus
      ``"validation_distillation_loss"`` when selecting on it (both curves per epoch).
    """
    if select_on not in RETRAIN_SELECTIONS:
        raise ValueError(f"`select_on` should be one of {RETRAIN_SELECTIONS}. Received: select_on={select_on!r}")
    features, labels, teacher = train
    y = np.stack([np.asarray(labels, np.float32).reshape(-1), np.asarray(teacher, np.float32).reshape(-1)], 1)
    names = list(model.features)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=DistillationLoss(distillation_weight))
    ds = (tf.data.Dataset.from_tensor_slices(({n: features[n] for n in names}, y))
          .shuffle(len(y), seed=seed, reshuffle_each_iteration=True).batch(batch_size).prefetch(2))
    score, selection, aucs = None, {}, None
    if validation is not None and select_on == "auc":
        def score():
            return auc(validation[1], predict_logits(model, validation[0]))
    elif validation is not None:
        if len(validation) != 3:
            raise ValueError("select_on='distillation' needs the ranker's logits of the validation rows: "
                             "`validation` should be (features, labels, teacher logits)")
        valid_y = np.asarray(validation[1], np.float32).reshape(-1)
        valid_r = np.asarray(validation[2], np.float32).reshape(-1)
        if len(valid_r) != len(valid_y):
            raise ValueError(f"`validation` holds {len(valid_y)} labels but {len(valid_r)} teacher logits")
        aucs = []

        def score():
            logits = predict_logits(model, validation[0])
            aucs.append(round(auc(valid_y, logits), 5))
            return float(np.mean(distillation_loss(valid_y, valid_r, logits, distillation_weight)))
        selection = {"score_name": "validation_distillation_loss", "higher_is_better": False}
    fit = fit_with_epoch_selection(model, ds, epochs, score, on_epoch=on_epoch, what="pre-ranker", patience=patience,
                                   **selection)
    if aucs is not None:
        fit["validation_auc"] = aucs
    return fit


def derived_latency(table: LatencyTable, features: Sequence[str], hidden_units: Sequence[int],
                    feature_widths: Sequence[int]) -> Dict[str, float]:
    """Latency-model cost (ms) of a derived network: Σ_{kept} L_i + the MLP's T_{a×b}."""
    feature_ms = float(sum(table.feature_cost(n) for n in features))
    network_ms = architecture_latency(hidden_units, int(sum(feature_widths)), table)
    return {"features_ms": round(feature_ms, 5), "network_ms": round(network_ms, 5),
            "total_ms": round(feature_ms + network_ms, 5)}


def latency_grid(input_width: int, operator_widths: Sequence[int]) -> List[int]:
    """Input widths to measure: operator widths and a ladder up to the full input width."""
    ladder = {max(1, int(round(input_width * f))) for f in (0.125, 0.25, 0.5, 0.75, 1.0)}
    return sorted(ladder | {int(w) for w in operator_widths} | {1})


# ---------------------------------------------------------------------------------
# The stage's entry point.
# ---------------------------------------------------------------------------------
def train_preranker(schema: Schema, vocabularies: Mapping[str, Sequence[str]], train_frame, valid_frame, teacher,
                    config: PrerankerConfig = PrerankerConfig(), *,
                    numeric_stats: Optional[Mapping[str, Sequence[float]]] = None,
                    latency_table: Optional[LatencyTable] = None,
                    teacher_outputs: Optional[Tuple[np.ndarray, Optional[np.ndarray]]] = None,
                    progress: Optional[Callable[[str, Dict[str, Any]], None]] = None,
                    ) -> Tuple[PreRanker, Dict[str, Any]]:
    """Searches, derives and retrains the AutoFAS pre-ranker.

    Args:
      schema: the feature schema.
      vocabularies: vocabulary name → tokens (the ranker's).
      train_frame, valid_frame: DataFrames of impressions with every schema feature
        (`inputs_from_frame` layout) and ``label``; `valid_frame` may be None.
      teacher: the trained ranker (a Keras model over all schema features returning
        logits, e.g. the CAN `RankingModel`).
      config: a `PrerankerConfig`.
      numeric_stats: feature → (mean, std).
      latency_table: reuse a measured table (None: measure now), e.g. one measured on
        the serving CPU; it must cover the candidate features, the operator widths and
        `config.candidates` (`LatencyTable.check_covers`). Its feature costs are used as
        they are (`config.external_feature_costs` is added only to a table measured now).
      teacher_outputs: reuse the teacher's logits of ``(train_frame, valid_frame)`` rows
        (`teacher_logits`; the second may be None without a validation frame), e.g. across
        a sweep over one teacher (None: compute them now).
      progress: called as the work goes on, ``progress(event, info)``: ``"latency_table"``
        (``seconds``), ``"search_epoch"`` (``epoch``, ``epochs``, ``events``, ``kept`` (the
        features at or above the keep threshold) and the epoch's record of
        `AutoFASSearchTrainer.fit`), ``"derived"`` (``features``, ``hidden_units``),
        ``"retrain_epoch"`` (``epoch``, ``epochs``, ``loss`` and the validation score, as
        `fit_with_epoch_selection` reports them).

    Returns:
      ``(PreRanker, metrics)``; metrics: ``features``, ``hidden_units``, ``operators``,
      ``keep_probabilities``, ``operator_probabilities``, ``validation_auc``,
      ``expected_latency_ms`` (latency model of the derived network),
      ``feature_costs_ms``, ``latency_table`` (the table searched against, as
      `LatencyTable.to_dict`), ``search`` (per-epoch losses), timings.
    """
    if not isinstance(config, PrerankerConfig):
        raise TypeError(f"`config` should be a PrerankerConfig. Received: {type(config).__name__}")
    if progress is None:
        def progress(event, info):
            del event, info
    if LABEL not in train_frame:
        raise ValueError(f"`train_frame` should have a {LABEL!r} column; it has {list(train_frame.columns)}")
    start = time.perf_counter()
    candidates = list(config.candidate_features or [f.name for f in schema.features])
    unknown = sorted(set(dict(config.external_feature_costs)) - set(candidates))
    if unknown:
        raise ValueError(f"`external_feature_costs` names {unknown}, which are not candidate features {candidates}")
    # Checked now, not when the search ends: a pre-ranker must tell candidates apart.
    item_names = [f.name for f in schema.item_features]
    if not set(item_names) & set(candidates):
        raise ValueError(f"`candidate_features` should hold at least one item feature of {item_names}. "
                         f"Received: candidate_features={candidates}")
    if latency_table is not None:
        latency_table.check_covers(candidates, config.operator_widths, config.candidates)
    all_names = [f.name for f in schema.features]
    train_x = inputs_from_frame(schema, train_frame, all_names)
    train_y = train_frame[LABEL].to_numpy(np.float32)
    has_valid = valid_frame is not None and len(valid_frame) > 0
    if teacher_outputs is not None:
        train_r, valid_r = (None if r is None else np.asarray(r, np.float32).reshape(-1) for r in teacher_outputs)
        n_valid = len(valid_frame) if valid_frame is not None else 0
        if train_r is None or len(train_r) != len(train_frame) or (valid_r is not None and len(valid_r) != n_valid):
            raise ValueError(f"`teacher_outputs` should hold one logit per train row ({len(train_frame)}) and "
                             f"per validation row ({n_valid}) or None. Received lengths "
                             f"{[None if r is None else len(r) for r in (train_r, valid_r)]}")
    else:
        train_r = teacher_logits(teacher, train_x)
        valid_r = None
    valid = None
    if has_valid:
        valid_x = inputs_from_frame(schema, valid_frame, all_names)
        valid = (valid_x, valid_frame[LABEL].to_numpy(np.float32))
        if config.retrain_selection == "distillation":
            valid = valid + (teacher_logits(teacher, valid_x) if valid_r is None else valid_r,)
    teacher_seconds = time.perf_counter() - start

    keras.utils.set_random_seed(config.seed)
    search_model = AutoFASSearch(schema, vocabularies, candidates, config.embedding_dim, config.num_mixops,
                                 config.mixop_operators, config.initial_keep_probability, config.keep_threshold,
                                 numeric_stats, name="autofas_search")
    if latency_table is None:
        t = time.perf_counter()
        latency_table = measure_latency_table(
            schema, vocabularies, {n: train_x[n][:config.candidates] for n in candidates}, candidates,
            config.embedding_dim, config.operator_widths,
            latency_grid(search_model.input_width, config.operator_widths), config.candidates,
            dict(config.external_feature_costs), config.latency_repeats, config.seed,
            items_encoded=config.latency_items_encoded)
        measure_seconds = time.perf_counter() - t
        progress("latency_table", {"seconds": measure_seconds})
        # The micro-benchmarks draw random weights: seed again, so that the super-network (built at its first
        # call) starts from the weights it starts from when the same table is given.
        keras.utils.set_random_seed(config.seed)
    else:
        measure_seconds = 0.0
    t = time.perf_counter()
    trainer = AutoFASSearchTrainer(search_model, latency_table, config)
    search_x, search_y, search_r = {n: train_x[n] for n in candidates}, train_y, train_r
    if 0 < config.search_max_events < len(train_y):  # else: all events, no copy
        rows = np.sort(np.random.default_rng(config.seed).choice(len(train_y), config.search_max_events,
                                                                 replace=False))
        search_x = {n: np.asarray(v)[rows] for n, v in search_x.items()}
        search_y, search_r = train_y[rows], np.asarray(train_r)[rows]
    def on_search_epoch(epoch, record):
        kept = int(np.sum(search_model.mask.keep_probabilities().numpy() >= config.keep_threshold))
        progress("search_epoch", {"epoch": epoch, "epochs": config.search_epochs, "events": len(search_y),
                                  "kept": kept, **record})

    search_history = trainer.fit(search_x, search_y, search_r, config.search_epochs, config.search_warmup_epochs,
                                 on_epoch=on_search_epoch)
    search_seconds = time.perf_counter() - t
    derived: DerivedArchitecture = derive_from_model(search_model)
    progress("derived", {"features": list(derived.features), "hidden_units": list(derived.hidden_units)})

    keras.utils.set_random_seed(config.seed)
    model = PreRanker(schema, vocabularies, derived.features, derived.hidden_units, config.embedding_dim,
                      numeric_stats, name="autofas_preranker")
    fit = fit_distilled(model, (train_x, train_y, train_r), valid, epochs=config.retrain_epochs,
                        batch_size=config.batch_size, learning_rate=config.learning_rate,
                        distillation_weight=config.distillation_weight, seed=config.seed,
                        patience=config.retrain_patience, select_on=config.retrain_selection,
                        on_epoch=lambda epoch, logs: progress("retrain_epoch", {"epoch": epoch,
                                                                                "epochs": config.retrain_epochs,
                                                                                **logs}))
    metrics: Dict[str, Any] = {
        **derived.to_dict(),
        "candidate_features": candidates,
        "validation_auc": fit["validation_auc"][fit["epochs"] - 1] if fit["validation_auc"] else None,
        "retrain": fit,
        "expected_latency_ms": derived_latency(latency_table, derived.features, derived.hidden_units,
                                               model.embedding.widths),
        "feature_costs_ms": {k: round(v, 5) for k, v in latency_table.feature_costs.items()},
        "latency_table": latency_table.to_dict(),
        "search": search_history,
        "search_events": int(len(search_y)),
        "seconds": {"teacher": round(teacher_seconds, 2), "latency_measurement": round(measure_seconds, 2),
                    "search": round(search_seconds, 2), "retrain": fit["seconds"],
                    "total": round(time.perf_counter() - start, 2)},
        "config": config.to_dict(),
    }
    return model, metrics


def flat_metrics(metrics: Mapping[str, Any]) -> Dict[str, Any]:
    """``preranker.*`` entries of a run's metrics.json from `train_preranker`'s metrics."""
    out = {"preranker.features": list(metrics["features"]), "preranker.hidden_units": list(metrics["hidden_units"]),
           "preranker.operators": list(metrics["operators"]),
           "preranker.expected_latency_ms": metrics["expected_latency_ms"]["total_ms"],
           "preranker.search_seconds": metrics["seconds"]["search"]}
    if metrics.get("validation_auc") is not None:
        out["preranker.validation_auc"] = metrics["validation_auc"]
    return out


__all__ = ["AutoFASSearchTrainer", "MASK_OBJECTIVES", "PrerankerConfig", "RETRAIN_SELECTIONS", "derived_latency",
           "fit_distilled", "flat_metrics", "latency_grid", "predict_logits", "teacher_logits", "train_preranker"]
