"""Pre-ranking benchmark: AutoFAS against a two-tower pre-ranker, a hand-designed distilled
MLP and the CAN ranker itself.

    python benchmarks/preranker.py --dataset {synthetic,movielens-100k} --out FILE.json \\
        [--plot FILE.svg] [--lambda2 0 0.03 0.1 0.3 1] [--users 1000]

Data and split as in `benchmarks/ranking.py` (one row per impression, history of the
user's earlier clicked training events by default, ``--history-events``; each user's last
``--test-fraction`` of events is the test set, the last ``--validation-fraction`` of the
rest picks epochs). Vocabularies come from the training rows.

Models, all trained on the training rows:

* **CAN ranker** (the teacher, `models.ranking`): ``--ranker-epochs`` with epoch selection.
* **Two-tower** (`models.two_tower.TwoTowerModel`, in-batch softmax on the training
  clicks): the retrieval model. For every test user (``--users`` of them, user features
  and history as of their first test event) it retrieves the ``--candidates`` items of
  largest inner product from the corpus (every item of the data). As a pre-ranker it
  scores those candidates by the same inner product (item embeddings precomputed
  offline; serving runs the query tower and one matrix product).
* **AutoFAS** (`models.preranking.train_preranker`): search, derive, retrain with
  distillation from the CAN ranker, one model per λ2 in ``--lambda2`` (the Pareto
  curve); the headline model is the one with λ2 = ``--headline-lambda2``. The latency
  table is measured once on this machine and shared by the sweep (or read from
  ``--latency-table``, e.g. an earlier run's ``--out``, to compare searches over the same
  costs).
* **Hand MLP**: every feature (or ``--hand-features``) → ``--hand-hidden`` ReLU layers,
  trained with the same distillation loss and epochs as the AutoFAS retraining.

Reported per model:

* ``recall_top10_in_top100``: over test users, |ranker top-10 ∩ model top-100| / |ranker top-10|
  on the user's retrieved candidates (how AutoFAS measures agreement with the ranker; the
  top-10 is every candidate when there are fewer than 10);
* ``recall_vs_hand_mlp`` (AutoFAS models): the mean per-user difference from the hand
  MLP's recall on the same users, with its standard error; near a recall of 1 the two
  differ on a few users only, and this says whether a gap is more than those few;
* ``auc``: AUC of the model's scores on the labelled test impressions;
* ``latency``: the exported ``serving_default`` signature scoring ``--candidates``
  candidates for one user (median and p99 ms over ``--latency-calls`` calls after
  warm-up, TensorFlow limited to ``--threads`` threads, CPU). All models are timed
  together at the end in 5 interleaved rounds, so that a change of load on the (possibly
  shared) machine hits every model alike; the load average before and after is recorded.
  ``latency_encoded``: the same call as the serving cascade makes it, through the
  ``score_users_encoded`` signature with the candidates' features encoded in advance
  (vocabulary ids, `models.signatures`); the two-tower's one signature already takes
  precomputed item embeddings, so both figures are the same for it. ``targets`` use
  ``latency``, ``targets_encoded_items`` ``latency_encoded``.

The plot (SVG) shows recall against median latency for the λ2 sweep and the baselines.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any, Dict, List

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
for path in (REPO, BENCH):
    if path not in sys.path:
        sys.path.insert(0, path)

DATASETS = ("synthetic", "movielens-100k")
ENCODED = " [encoded items]"  # suffix of a model's timing through its encoded-items signature


def _ints(text: str):
    return tuple(int(x) for x in text.split(",") if x.strip())


def _parse_args(argv=None) -> argparse.Namespace:
    from models.preranking.training import MASK_OBJECTIVES, RETRAIN_SELECTIONS, PrerankerConfig
    from ranking import HISTORY_EVENTS

    d = PrerankerConfig()  # the model's defaults are the benchmark's
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--plot", default=None, help="SVG of the accuracy/latency Pareto curve")
    p.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "data", "movielens-100k"))
    p.add_argument("--synthetic-users", type=int, default=2000)
    p.add_argument("--synthetic-items", type=int, default=2000)
    p.add_argument("--history-length", type=int, default=20)
    p.add_argument("--history-events", choices=HISTORY_EVENTS, default="clicks",
                   help="events a history holds: earlier clicked training events (the job's) or every earlier event "
                        "(see benchmarks/ranking.py)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--validation-fraction", type=float, default=0.1)
    p.add_argument("--users", type=int, default=1000, help="test users scored for recall (all when fewer)")
    p.add_argument("--candidates", type=int, default=d.candidates)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--ranker-epochs", type=int, default=4)
    p.add_argument("--retrieval-epochs", type=int, default=5)
    p.add_argument("--search-epochs", type=int, default=d.search_epochs)
    p.add_argument("--warmup-epochs", type=int, default=d.search_warmup_epochs)
    p.add_argument("--retrain-epochs", type=int, default=d.retrain_epochs)
    p.add_argument("--retrain-patience", type=int, default=d.retrain_patience)
    p.add_argument("--mask-objective", choices=MASK_OBJECTIVES, default=d.mask_objective,
                   help="task term of Loss1 (the feature masks): BCE on the labels, or the distilled loss of Loss2")
    p.add_argument("--retrain-selection", choices=RETRAIN_SELECTIONS, default=d.retrain_selection,
                   help="validation score that picks the retraining epoch (AutoFAS and the hand MLP alike)")
    p.add_argument("--embedding-dim", type=int, default=d.embedding_dim)
    p.add_argument("--num-mixops", type=int, default=d.num_mixops)
    p.add_argument("--operator-widths", type=_ints, default=d.operator_widths)
    p.add_argument("--lambda1", type=float, default=d.distillation_weight, help="distillation weight")
    p.add_argument("--lambda", dest="lambda_", type=float, default=d.latency_weight,
                   help="feature latency weight (per ms)")
    p.add_argument("--lambda2", type=float, nargs="+", default=[0.0, 0.03, 0.1, 0.3, 1.0],
                   help="architecture latency weights of the Pareto sweep (per ms)")
    p.add_argument("--headline-lambda2", type=float, default=d.architecture_latency_weight,
                   help="λ2 of the headline AutoFAS model (the PrerankerConfig default; one of --lambda2)")
    p.add_argument("--hand-hidden", type=_ints, default=(64, 32))
    p.add_argument("--hand-features", nargs="+", default=None,
                   help="features of the hand MLP (default: every feature of the schema)")
    p.add_argument("--latency-table", default=None,
                   help="search against this latency table instead of measuring one: a table JSON (as the job "
                        "writes) or an earlier --out of this script (its latency_table), so that runs compare "
                        "searches over the same costs")
    p.add_argument("--latency-calls", type=int, default=200)
    p.add_argument("--latency-repeats", type=int, default=d.latency_repeats)
    p.add_argument("--latency-items", choices=("encoded", "strings"),
                   default="encoded" if d.latency_items_encoded else "strings",
                   help="how the latency table's item features arrive: ids encoded in advance (the serving "
                        "cascade's path) or strings looked up per candidate (serving_default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=d.seed)
    args = p.parse_args(argv)
    if not 0 < args.test_fraction < 1:
        p.error(f"--test-fraction should be in (0, 1). Received: {args.test_fraction}")
    # Unlike benchmarks/ranking.py, no 0: the ranker, AutoFAS and the hand MLP all pick their epoch on these events.
    if not 0 < args.validation_fraction < 1:
        p.error(f"--validation-fraction should be in (0, 1). Received: {args.validation_fraction}")
    if args.headline_lambda2 not in args.lambda2:
        p.error(f"--headline-lambda2 {args.headline_lambda2} should be one of --lambda2 {args.lambda2}")
    return args


def _given_latency_table(path, features, operator_widths, candidates):
    """The `--latency-table` file (a table, or this script's output holding one), checked to fit the search."""
    from models.preranking.latency import LatencyTable

    with open(path) as f:
        d = json.load(f)
    table = LatencyTable.from_dict(d["latency_table"] if "latency_table" in d else d)
    try:
        table.check_covers(features, operator_widths, candidates)
    except ValueError as e:
        raise SystemExit(f"--latency-table {path}: {e}") from None
    return table


# ---------------------------------------------------------------------------------
# Measurement helpers.
# ---------------------------------------------------------------------------------
def _interleaved_latency(timed, calls: int, candidates: int, rounds: int = 5) -> Dict[str, Dict[str, float]]:
    """Times every ``(name, signature, inputs)`` in `rounds` interleaved rounds of
    ``calls / rounds`` calls (after warm-up); median and p99 over all calls of a model."""
    import numpy as np

    for name, fn, inputs in timed:
        for _ in range(10):
            scores = fn(**inputs)["scores"]
        if tuple(scores.shape) != (candidates,):
            raise RuntimeError(f"{name} returned scores of shape {scores.shape}, expected ({candidates},)")
    times: Dict[str, List[float]] = {name: [] for name, _, _ in timed}
    per_round = max(1, calls // rounds)
    for _ in range(rounds):
        for name, fn, inputs in timed:
            for _ in range(per_round):
                start = time.perf_counter()
                fn(**inputs)["scores"].numpy()
                times[name].append((time.perf_counter() - start) * 1e3)
    out = {}
    for name, values in times.items():
        v = np.asarray(values)
        out[name] = {"median_ms": round(float(np.median(v)), 3), "p99_ms": round(float(np.percentile(v, 99)), 3),
                     "mean_ms": round(float(v.mean()), 3), "calls": len(v), "candidates": candidates}
    return out


def paired_difference(values, reference) -> Dict[str, float]:
    """Mean of the per-user differences ``values − reference`` and its standard error
    (sample standard deviation / √n): how far apart two models' recalls are on the same
    users, and whether that is more than the choice of users."""
    import numpy as np

    d = np.asarray(values, np.float64) - np.asarray(reference, np.float64)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"paired_difference needs two equal-length vectors of at least 2 users; got {d.shape}")
    return {"difference": round(float(d.mean()), 4),
            "standard_error": round(float(d.std(ddof=1) / np.sqrt(len(d))), 4),
            "users_better": int((d > 0).sum()), "users_worse": int((d < 0).sum())}


class TwoTowerScorer:
    """The two-tower pre-ranker as served: query tower + inner product with the
    candidates' precomputed item embeddings (SavedModel with the same calling shape)."""

    def __init__(self, model, schema):
        from models.tf_compat import tf

        self.model, self.schema = model, schema
        user_specs = schema.tensor_specs("user")
        dim = int(model.query_tower.output_dim) if hasattr(model.query_tower, "output_dim") else None

        @tf.function
        def score(item_embeddings, **features):
            query = model.query_tower({k: features[k] for k in user_specs}, training=False)  # [1, D]
            logits = tf.linalg.matvec(item_embeddings, query[0])  # [N]
            return {"scores": logits, "logits": logits}

        self.function = score.get_concrete_function(
            item_embeddings=tf.TensorSpec([None, dim], tf.float32, name="item_embeddings"), **user_specs)

    def export(self, path: str) -> str:
        from models.tf_compat import tf

        module = tf.Module()
        module.model = self.model.query_tower
        tf.saved_model.save(module, path, signatures={"serving_default": self.function})
        return path


def _svg_plot(points: List[Dict[str, Any]], baselines: Dict[str, Dict[str, float]], path: str, title: str) -> None:
    """Recall (y) against median latency (x): the λ2 sweep as a line, baselines as dots."""
    width, height, margin = 640, 420, 60
    xs = [p["latency_ms"] for p in points] + [b["latency_ms"] for b in baselines.values()]
    ys = [p["recall"] for p in points] + [b["recall"] for b in baselines.values()]
    x_max = max(xs) * 1.1
    y_lo, y_hi = max(0.0, min(ys) - 0.05), min(1.0, max(ys) + 0.05)

    def sx(v):
        return margin + (width - 2 * margin) * v / x_max

    def sy(v):
        return height - margin - (height - 2 * margin) * (v - y_lo) / max(y_hi - y_lo, 1e-9)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="13">{title}</text>',
             f'<line x1="{margin}" y1="{height - margin}" x2="{width - margin}" y2="{height - margin}" '
             'stroke="black"/>',
             f'<line x1="{margin}" y1="{margin}" x2="{margin}" y2="{height - margin}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 15}" text-anchor="middle">median latency, ms per '
             f'{points[0]["candidates"] if points else ""} candidates</text>',
             f'<text x="15" y="{height / 2}" transform="rotate(-90 15 {height / 2})" text-anchor="middle">'
             f'recall of ranker top-10 in top-100</text>']
    for k in range(6):
        xv, yv = x_max * k / 5, y_lo + (y_hi - y_lo) * k / 5
        parts.append(f'<text x="{sx(xv)}" y="{height - margin + 15}" text-anchor="middle">{xv:.2f}</text>')
        parts.append(f'<text x="{margin - 5}" y="{sy(yv) + 4}" text-anchor="end">{yv:.2f}</text>')
    ordered = sorted(points, key=lambda p: p["latency_ms"])
    if len(ordered) > 1:
        parts.append('<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="'
                     + " ".join(f"{sx(p['latency_ms']):.1f},{sy(p['recall']):.1f}" for p in ordered) + '"/>')
    for p in ordered:
        parts.append(f'<circle cx="{sx(p["latency_ms"]):.1f}" cy="{sy(p["recall"]):.1f}" r="4" fill="#1f77b4"/>')
        parts.append(f'<text x="{sx(p["latency_ms"]) + 6:.1f}" y="{sy(p["recall"]) - 6:.1f}" fill="#1f77b4">'
                     f'AutoFAS λ2={p["lambda2"]:g}</text>')
    colors = {"two_tower": "#d62728", "hand_mlp": "#2ca02c", "can_ranker": "#7f7f7f"}
    for name, b in baselines.items():
        c = colors.get(name, "black")
        parts.append(f'<rect x="{sx(b["latency_ms"]) - 4:.1f}" y="{sy(b["recall"]) - 4:.1f}" width="8" height="8" '
                     f'fill="{c}"/>')
        parts.append(f'<text x="{sx(b["latency_ms"]) + 6:.1f}" y="{sy(b["recall"]) + 14:.1f}" fill="{c}">{name}</text>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts))


# ---------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------
def main(argv=None) -> None:
    args = _parse_args(argv)
    wall_start = time.perf_counter()
    load_before = os.getloadavg()
    from models.tf_compat import keras, tf  # threading must be set before TF starts

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import numpy as np

    from models.features import ITEM_ID, LABEL, USER_ID, numeric_stats
    from models.preranking import (PreRanker, PrerankerConfig, export_preranker, fit_distilled, measure_latency_table,
                                   teacher_logits, train_preranker)
    from models.preranking.training import derived_latency, latency_grid, predict_logits
    from models.ranking.metrics import auc
    from models.ranking.models import (RankingConfig, build_ranker, build_vocabularies, export_ranker,
                                       inputs_from_frame)
    from models.ranking.training import fit_ranker, last_events_mask
    from models.signatures import ENCODE_ITEMS_SIGNATURE, ENCODED_SCORING_SIGNATURE, several_user_arguments
    from models.two_tower import TwoTowerModel
    from ranking import load_impressions

    def log(msg):
        print(f"[{time.perf_counter() - wall_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    # -- data -----------------------------------------------------------------------
    schema, frame, source = load_impressions(args)
    frame = frame.reset_index(drop=True)
    test_mask = last_events_mask(frame[USER_ID].to_numpy(), frame["timestamp"].to_numpy(), args.test_fraction)
    train_frame, test_frame = frame[~test_mask], frame[test_mask]
    held_out = last_events_mask(train_frame[USER_ID].to_numpy(), train_frame["timestamp"].to_numpy(),
                                args.validation_fraction)
    valid_frame, train_frame = train_frame[held_out], train_frame[~held_out]
    vocabs = build_vocabularies(schema, train_frame)
    stats = numeric_stats(schema, train_frame)
    names = [f.name for f in schema.features]
    hand_names = list(args.hand_features or names)
    unknown = sorted(set(hand_names) - set(names))
    if unknown:
        raise SystemExit(f"--hand-features names {unknown}, which are not features of the {args.dataset} "
                         f"schema {names}")
    train_x = inputs_from_frame(schema, train_frame, names)
    valid_x = inputs_from_frame(schema, valid_frame, names)
    test_x = inputs_from_frame(schema, test_frame, names)
    train_y, valid_y, test_y = (f[LABEL].to_numpy(np.float32) for f in (train_frame, valid_frame, test_frame))
    log(f"data: {len(train_frame)} train / {len(valid_frame)} validation / {len(test_frame)} test rows, "
        f"CTR {frame[LABEL].mean():.3f}")

    # Corpus and test users: user state at their first test event.
    user_names = [f.name for f in schema.user_features]
    item_names = [f.name for f in schema.item_features]
    items = frame.drop_duplicates(ITEM_ID).reset_index(drop=True)
    item_x = inputs_from_frame(schema, items, item_names)
    n_cand = min(args.candidates, len(items))
    first_test = test_frame.sort_values([USER_ID, "timestamp"], kind="stable").drop_duplicates(USER_ID)
    rng = np.random.default_rng(args.seed)
    pick = rng.choice(len(first_test), size=min(args.users, len(first_test)), replace=False)
    users = first_test.iloc[np.sort(pick)]
    user_rows = [inputs_from_frame(schema, users.iloc[[i]], user_names) for i in range(len(users))]

    # -- teacher ----------------------------------------------------------------------
    keras.utils.set_random_seed(args.seed)
    ranker = build_ranker("can", schema, vocabs, RankingConfig(embedding_dim=args.embedding_dim), stats)
    ranker.compile(optimizer=keras.optimizers.Adam(0.003), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    ranker_fit = fit_ranker(ranker, (train_x, train_y), (valid_x, valid_y), epochs=args.ranker_epochs,
                            batch_size=args.batch_size, seed=args.seed)
    log(f"CAN ranker: {ranker_fit}")

    # -- retrieval (two-tower) ------------------------------------------------------------
    keras.utils.set_random_seed(args.seed)
    two_tower = TwoTowerModel(schema, vocabs, embedding_dim=64, feature_dim=32, hidden_units=(128,), normalize=True,
                              temperature=0.1)
    two_tower.compile(optimizer=keras.optimizers.Adam(0.01))
    positives = train_y > 0.5
    tt_ds = (tf.data.Dataset.from_tensor_slices({k: v[positives] for k, v in train_x.items()})
             .shuffle(int(positives.sum()), seed=args.seed).batch(args.batch_size))
    start = time.perf_counter()
    two_tower.fit(tt_ds, epochs=args.retrieval_epochs, verbose=0)
    log(f"two-tower: {args.retrieval_epochs} epochs on {int(positives.sum())} clicks "
        f"({time.perf_counter() - start:.1f} s)")
    item_emb = two_tower.item_tower({k: tf.constant(v) for k, v in item_x.items()}).numpy()
    candidates = []  # per test user: item positions of the retrieved candidates (best first)
    for row in user_rows:
        q = two_tower.query_tower({k: tf.constant(v) for k, v in row.items()}).numpy()[0]
        s = item_emb @ q
        candidates.append(np.argsort(-s, kind="stable")[:n_cand])

    # -- scorers: exported SavedModels -------------------------------------------------------
    tmp = tempfile.mkdtemp(prefix="preranker-bench-")

    def signature(path):
        return tf.saved_model.load(path).signatures

    def evaluate(name, signatures, inputs_of_user, test_scores, extra=None):
        """Recall vs the ranker's top-10, AUC on test labels; `signatures` are timed at the end."""
        fn = signatures["serving_default"]
        recalls = []
        for u, row in enumerate(user_rows):
            idx = candidates[u]
            scores = fn(**inputs_of_user(row, idx))["scores"].numpy().reshape(-1)
            top100 = set(idx[np.argsort(-scores, kind="stable")[:100]].tolist())
            recalls.append(len(top100 & ranker_top10[u]) / len(ranker_top10[u]))
        # Latency is measured at the end, all models interleaved (`_interleaved_latency`): the
        # signature on strings, and as the serving cascade calls it, on items encoded in advance.
        inputs = inputs_of_user(user_rows[0], candidates[0])
        timed.append((name, fn, inputs))
        if ENCODED_SCORING_SIGNATURE in signatures:
            encoded = signatures[ENCODE_ITEMS_SIGNATURE](**{k: v for k, v in inputs.items() if k in item_x})
            served = several_user_arguments({k: v for k, v in inputs.items() if k not in item_x}, encoded,
                                            tf.zeros([len(candidates[0])], tf.int32))
            timed.append((name + ENCODED, signatures[ENCODED_SCORING_SIGNATURE], served))
        per_user_recall[name] = recalls
        out = {"recall_top10_in_top100": round(float(np.mean(recalls)), 4), "auc": round(auc(test_y, test_scores), 4)}
        out.update(extra or {})
        evaluated.append((name, out))
        log(f"{name}: recall {out['recall_top10_in_top100']} AUC {out['auc']}")
        return out

    def feature_inputs(feature_names):
        def make(row, idx):
            args_ = {k: tf.constant(row[k]) for k in feature_names if k in row}
            args_.update({k: tf.constant(item_x[k][idx]) for k in feature_names if k in item_x})
            return args_
        return make

    results: Dict[str, Any] = {}
    timed: List = []  # (name, signature, inputs) of every model, timed together at the end
    evaluated: List = []  # (name, result entry) of every model, for its latencies
    per_user_recall: Dict[str, List[float]] = {}  # model → recall of each test user, for paired comparisons
    ranker_signatures = signature(export_ranker(ranker, os.path.join(tmp, "can")))
    ranker_fn = ranker_signatures["serving_default"]
    ranker_top10 = []
    for u, row in enumerate(user_rows):
        idx = candidates[u]
        s = ranker_fn(**feature_inputs(names)(row, idx))["scores"].numpy()
        ranker_top10.append(set(idx[np.argsort(-s, kind="stable")[:10]].tolist()))
    ranker_test = ranker.predict(tf.data.Dataset.from_tensor_slices(test_x).batch(4096), verbose=0).reshape(-1)
    results["can_ranker"] = evaluate("CAN ranker", ranker_signatures, feature_inputs(names), ranker_test,
                                     {"epochs": ranker_fit["epochs"], "validation_auc": ranker_fit["validation_auc"]})

    tt_scorer = TwoTowerScorer(two_tower, schema)
    tt_signatures = signature(tt_scorer.export(os.path.join(tmp, "two_tower")))

    def tt_inputs(row, idx):
        out = {k: tf.constant(row[k]) for k in user_names}
        out["item_embeddings"] = tf.constant(item_emb[idx])
        return out

    tt_test = np.sum(two_tower.query_tower({k: tf.constant(test_x[k]) for k in user_names}).numpy()
                     * two_tower.item_tower({k: tf.constant(test_x[k]) for k in item_names}).numpy(), axis=1)
    results["two_tower"] = evaluate("two-tower", tt_signatures, tt_inputs, tt_test)

    # -- AutoFAS: latency table once, then the λ2 sweep -------------------------------------
    items_encoded = args.latency_items == "encoded"
    base = PrerankerConfig(embedding_dim=args.embedding_dim, num_mixops=args.num_mixops,
                           operator_widths=args.operator_widths, latency_weight=args.lambda_,
                           distillation_weight=args.lambda1, search_epochs=args.search_epochs,
                           search_warmup_epochs=args.warmup_epochs, retrain_epochs=args.retrain_epochs,
                           retrain_patience=args.retrain_patience, retrain_selection=args.retrain_selection,
                           mask_objective=args.mask_objective, batch_size=args.batch_size, candidates=n_cand,
                           latency_repeats=args.latency_repeats, latency_items_encoded=items_encoded, seed=args.seed)
    input_width = sum(1 if f.kind.value == "numeric" else args.embedding_dim for f in schema.features)
    start = time.perf_counter()
    if args.latency_table:
        table = _given_latency_table(args.latency_table, names, args.operator_widths, n_cand)
        log(f"latency table read from {args.latency_table}: features {table.feature_costs}")
    else:
        table = measure_latency_table(schema, vocabs, {k: v[:n_cand] for k, v in train_x.items()}, names,
                                      args.embedding_dim, args.operator_widths,
                                      latency_grid(input_width, args.operator_widths), n_cand, None,
                                      args.latency_repeats, args.seed, items_encoded=items_encoded)
        log(f"latency table measured in {time.perf_counter() - start:.1f} s: features {table.feature_costs}")
    # The ranker's logits, computed once for every sweep point and the hand MLP.
    teacher_train, teacher_valid = teacher_logits(ranker, train_x), teacher_logits(ranker, valid_x)
    sweep = []
    for lam2 in args.lambda2:
        config = dataclasses.replace(base, architecture_latency_weight=float(lam2))
        model, metrics = train_preranker(schema, vocabs, train_frame, valid_frame, ranker, config, numeric_stats=stats,
                                         latency_table=table, teacher_outputs=(teacher_train, teacher_valid))
        autofas_signatures = signature(export_preranker(model, os.path.join(tmp, f"autofas_{lam2:g}")))
        test_scores = predict_logits(model, test_x)
        summary = {k: metrics[k] for k in ("features", "hidden_units", "operators", "keep_probabilities",
                                           "operator_probabilities", "expected_latency_ms", "seconds", "search",
                                           "retrain")}
        entry = evaluate(f"AutoFAS λ2={lam2:g}", autofas_signatures, feature_inputs(model.features), test_scores,
                         {"lambda2": float(lam2), **summary})
        log(f"AutoFAS λ2={lam2:g}: features {metrics['features']} hidden {metrics['hidden_units']} "
            f"operators {metrics['operators']}")
        sweep.append(entry)
    headline = next(e for e in sweep if e["lambda2"] == float(args.headline_lambda2))
    results["autofas"] = headline

    # -- hand-designed distilled MLP ---------------------------------------------------------
    keras.utils.set_random_seed(args.seed)
    hand = PreRanker(schema, vocabs, hand_names, args.hand_hidden, args.embedding_dim, stats, name="hand_mlp")
    hand_valid = (valid_x, valid_y) + ((teacher_valid,) if args.retrain_selection == "distillation" else ())
    hand_fit = fit_distilled(hand, (train_x, train_y, teacher_train), hand_valid, epochs=args.retrain_epochs,
                             batch_size=args.batch_size, learning_rate=base.learning_rate,
                             distillation_weight=args.lambda1, seed=args.seed, patience=args.retrain_patience,
                             select_on=args.retrain_selection)
    hand_signatures = signature(export_preranker(hand, os.path.join(tmp, "hand")))
    hand_test = predict_logits(hand, test_x)
    results["hand_mlp"] = evaluate("hand MLP", hand_signatures, feature_inputs(hand_names), hand_test,
                                   {"hidden_units": list(args.hand_hidden), "features": hand_names, "retrain": hand_fit,
                                    "expected_latency_ms": derived_latency(table, hand_names, args.hand_hidden,
                                                                           hand.embedding.widths)})

    # Recall against the hand MLP's on the same users (the AutoFAS models are compared with it).
    for entry in sweep:
        entry["recall_vs_hand_mlp"] = paired_difference(per_user_recall[f"AutoFAS λ2={entry['lambda2']:g}"],
                                                        per_user_recall["hand MLP"])
        log(f"AutoFAS λ2={entry['lambda2']:g} recall − hand MLP recall: {entry['recall_vs_hand_mlp']}")

    # -- latency: every model in interleaved rounds, so load changes hit all alike -----------
    latencies = _interleaved_latency(timed, args.latency_calls, n_cand)
    for name, entry in evaluated:
        # The two-tower takes precomputed item embeddings: its one signature is already the served form.
        entry["latency"] = latencies[name]
        entry["latency_encoded"] = latencies.get(name + ENCODED, latencies[name])
        log(f"{name}: latency median {latencies[name]['median_ms']} ms, p99 {latencies[name]['p99_ms']} ms; "
            f"encoded items: median {entry['latency_encoded']['median_ms']} ms, "
            f"p99 {entry['latency_encoded']['p99_ms']} ms")

    # -- targets ---------------------------------------------------------------------------
    def med(name, key="latency"):
        return results[name][key]["median_ms"]

    def rec(name):
        return results[name]["recall_top10_in_top100"]

    def targets_by(key):
        """The issue's targets with the latencies of `key` (strings, or encoded items)."""
        faster_sweep = [e for e in sweep if e[key]["median_ms"] <= med("hand_mlp", key)]
        return {
            "autofas_recall_ge_two_tower": rec("autofas") >= rec("two_tower"),
            "autofas_latency_le_2x_two_tower": med("autofas", key) <= 2.0 * med("two_tower", key),
            "autofas_latency_le_third_of_ranker": med("autofas", key) <= med("can_ranker", key) / 3.0,
            "autofas_beats_hand_mlp_at_le_latency": (rec("autofas") > rec("hand_mlp")
                                                     and med("autofas", key) <= med("hand_mlp", key)),
            "some_sweep_point_beats_hand_mlp_at_le_latency": any(
                e["recall_top10_in_top100"] > rec("hand_mlp") for e in faster_sweep),
        }

    targets, targets_encoded = targets_by("latency"), targets_by("latency_encoded")
    out = {
        "dataset": args.dataset, "source": source,
        "rows": {"train": int(len(train_frame)), "validation": int(len(valid_frame)), "test": int(len(test_frame)),
                 "ctr": round(float(frame[LABEL].mean()), 4), "users": int(frame[USER_ID].nunique()),
                 "items": int(len(items)), "test_users_scored": len(user_rows), "candidates": n_cand},
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "out"},
        "results": results,
        "pareto": [{"lambda2": e["lambda2"], "recall_top10_in_top100": e["recall_top10_in_top100"], "auc": e["auc"],
                    "median_ms": e["latency"]["median_ms"], "p99_ms": e["latency"]["p99_ms"],
                    "encoded_median_ms": e["latency_encoded"]["median_ms"],
                    "encoded_p99_ms": e["latency_encoded"]["p99_ms"], "recall_vs_hand_mlp": e["recall_vs_hand_mlp"],
                    "features": e["features"], "hidden_units": e["hidden_units"]} for e in sweep],
        "sweep": sweep,
        "targets": targets,
        "targets_encoded_items": targets_encoded,
        "latency_table": table.to_dict(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "tensorflow": tf.__version__, "threads": args.threads,
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "wall_seconds": round(time.perf_counter() - wall_start, 1),
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    if args.plot:
        _svg_plot([{"lambda2": e["lambda2"], "latency_ms": e["latency"]["median_ms"],
                    "recall": e["recall_top10_in_top100"], "candidates": n_cand} for e in sweep],
                  {k: {"latency_ms": med(k), "recall": rec(k)} for k in ("two_tower", "hand_mlp", "can_ranker")},
                  args.plot, f"AutoFAS pre-ranker, {args.dataset}: recall vs latency")
    print(json.dumps({"dataset": args.dataset,
                      "results": {k: {"recall": rec(k), "auc": v["auc"], "median_ms": med(k),
                                      "p99_ms": v["latency"]["p99_ms"],
                                      "encoded_median_ms": med(k, "latency_encoded")} for k, v in results.items()},
                      "autofas": {"features": headline["features"], "hidden_units": headline["hidden_units"]},
                      "sweep_recall_vs_hand_mlp": {f"{e['lambda2']:g}": e["recall_vs_hand_mlp"] for e in sweep},
                      "targets": targets, "targets_encoded_items": targets_encoded,
                      "wall_seconds": out["wall_seconds"]}, indent=1))


if __name__ == "__main__":
    main()
