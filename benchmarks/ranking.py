"""Ranking-stage benchmark: CAN against DNN, DIN and a Cartesian-product DNN.

    python benchmarks/ranking.py --dataset {synthetic,movielens-100k} \\
        --model can dnn [din cartesian] [--loss {bce,focal,ghm}] --seeds 3 --out FILE.json

Data:

* ``synthetic``: the project's generator (`pipeline.data.synthetic`), whose clicks carry
  planted user-feature × item-feature co-actions (age × category, gender × price,
  region × sub-category, history × category). Size set by ``--synthetic-users``.
* ``movielens-100k``: `pipeline.data.movielens.read_movielens` on
  ``<repo>/../shared/data/movielens-100k`` (``--data-dir``), label = rating >= 4.

One training row per impression; its ``history`` holds the user's items of events
strictly before the event's timestamp (`models.ranking.sequences.build_sequences`).
Which events: ``--history-events clicks`` (the default, what `recfunnel run` trains and
serves with) takes the user's clicked (label 1) *training* events only, as the serving
user store holds them; ``impressions`` takes every earlier event, test events and
non-clicks included (the synthetic history effect is planted on previous impressions;
no serving store holds this). Split per user by time: each user's last
``--test-fraction`` of events (at least one) is the test set. Vocabularies come from
the training rows only (unseen test values go to the OOV bucket).

Every model gets the same embeddings, MLP, optimizer (Adam), batch size and epoch
budget (``--epochs``). Epoch selection: each user's last ``--validation-fraction`` of
the training events is held out; after every epoch the validation AUC is computed,
training stops at the first epoch that does not improve it and the best epoch's
weights are kept (models that overfit early, like the id-heavy crosses, are not
penalized for the budget). The test set is used once, at the end. Reported per model: AUC, GAUC, log loss and calibration ratio over seeds (mean,
std, min, max, per seed), total and co-action parameter counts, and the latency of the
exported ``serving_default`` signature scoring ``--candidates`` items for one user on
CPU with TensorFlow limited to ``--threads`` threads (median and p99 over
``--latency-calls`` calls after warm-up). The machine's load average before and after
is recorded: the benchmark machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

DATASETS = ("synthetic", "movielens-100k")
HISTORY_EVENTS = ("clicks", "impressions")


def _parse_args(argv=None) -> argparse.Namespace:
    from models.ranking.co_action import SEQUENCE_POOLINGS
    from models.ranking.models import MODEL_TYPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, required=True)
    p.add_argument("--model", nargs="+", choices=MODEL_TYPES, required=True)
    p.add_argument("--loss", choices=("bce", "focal", "ghm"), default="bce")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", required=True)
    p.add_argument("--data-dir", default=os.path.join(REPO, "..", "shared", "data", "movielens-100k"))
    p.add_argument("--synthetic-users", type=int, default=4000)
    p.add_argument("--synthetic-items", type=int, default=2000)
    p.add_argument("--history-length", type=int, default=20)
    p.add_argument("--history-events", choices=HISTORY_EVENTS, default="clicks",
                   help="events a history holds: earlier clicked training events (the job's) or every earlier event")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=3, help="maximum epochs (the same budget for every model)")
    p.add_argument("--validation-fraction", type=float, default=0.1,
                   help="each user's last events of the training part held out to pick the epoch (0: no "
                        "selection, train all epochs)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--learning-rate", type=float, default=0.003)
    p.add_argument("--embedding-dim", type=int, default=8)
    p.add_argument("--hidden-units", default="64,32")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout after each hidden layer (every model)")
    p.add_argument("--feed-dim", type=int, default=8)
    p.add_argument("--coaction-layers", default="4,4")
    p.add_argument("--orders", type=int, default=2)
    p.add_argument("--coaction-initializer", default="uniform",
                   help="Keras initializer of CAN's co-action tables")
    p.add_argument("--coaction-l2", type=float, default=0.0,
                   help="L2 penalty on the co-action tables of CAN and the Cartesian model (per step, whole tables)")
    p.add_argument("--combination-independent", action="store_true",
                   help="CAN: each (induction, feed) pair gets its own micro-MLP")
    p.add_argument("--order-independent", action="store_true", help="CAN: each order gets its own micro-MLP")
    p.add_argument("--coaction-item-features", nargs="+", default=None,
                   help="item side of the co-action pairs (CAN inductions, Cartesian crosses); default: every "
                        "categorical item feature")
    p.add_argument("--coaction-user-features", nargs="+", default=None,
                   help="user side of the co-action pairs (CAN feeds, Cartesian crosses); default: every "
                        "categorical user feature but the user id")
    p.add_argument("--sequence-pooling", choices=SEQUENCE_POOLINGS, default="coaction_then_mean")
    p.add_argument("--cartesian-max-buckets", type=int, default=2 ** 17)
    p.add_argument("--focal-alpha", type=float, default=None)
    p.add_argument("--focal-gamma", type=float, default=2.0)
    p.add_argument("--ghm-bins", type=int, default=30)
    p.add_argument("--ghm-momentum", type=float, default=0.75)
    p.add_argument("--candidates", type=int, default=1000)
    p.add_argument("--latency-calls", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds should be >= 1, got {args.seeds}")
    if not 0 < args.test_fraction < 1:
        p.error(f"--test-fraction should be in (0, 1), got {args.test_fraction}")
    if not 0 <= args.validation_fraction < 1:
        p.error(f"--validation-fraction should be in [0, 1), got {args.validation_fraction}")
    return args


# ---------------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------------
def load_impressions(args) -> Tuple[Any, Any, str]:
    """``(schema, frame, source)``: one row per event with user, item, history
    (``args.history_events``), label."""
    import numpy as np
    import pandas as pd

    from models.features import HISTORY, ITEM_ID, LABEL, TIMESTAMP, USER_ID
    from models.ranking.sequences import build_sequences
    from models.ranking.training import last_events_mask

    if args.dataset == "synthetic":
        from pipeline.data.synthetic import SyntheticConfig, generate_synthetic

        raw = generate_synthetic(SyntheticConfig(num_users=args.synthetic_users, num_items=args.synthetic_items,
                                                 history_length=args.history_length, seed=0))
    else:
        from pipeline.data.movielens import read_movielens

        if not os.path.isdir(args.data_dir):
            sys.exit(f"MovieLens-100K not found at {args.data_dir} (pass --data-dir)")
        raw = read_movielens(args.data_dir, history_length=args.history_length)
    events = pd.concat(list(raw.interactions()), ignore_index=True)
    schema = raw.schema
    frame = events.merge(raw.users, on=USER_ID, how="left").merge(raw.items, on=ITEM_ID, how="left")
    if frame[[c for c in raw.users.columns] + [c for c in raw.items.columns]].isna().any().any():
        raise ValueError("some events reference users or items missing from the tables")
    eligible = None
    if args.history_events == "clicks":
        # The test split `main` takes (the same mask), and the clicked events before it.
        test = last_events_mask(frame[USER_ID].to_numpy(), frame[TIMESTAMP].to_numpy(), args.test_fraction)
        eligible = ~test & (frame[LABEL].to_numpy() > 0)
    frame[HISTORY] = list(build_sequences(frame[USER_ID].to_numpy(), frame[ITEM_ID].to_numpy(),
                                          frame[TIMESTAMP].to_numpy(), schema.feature(HISTORY).max_length,
                                          eligible=eligible))
    frame[LABEL] = frame[LABEL].astype(np.float32)
    return schema, frame, raw.source


def split_last_events(user_ids, timestamps, test_fraction: float):
    """Boolean test mask: each user's last ``ceil(test_fraction × n_u)`` events by time (>= 1)."""
    from models.ranking.training import last_events_mask

    return last_events_mask(user_ids, timestamps, test_fraction)


# ---------------------------------------------------------------------------------
# Training and measurement.
# ---------------------------------------------------------------------------------
def _loss(args):
    from models.ranking.losses import make_loss

    if args.loss == "focal":
        return make_loss("focal", alpha=args.focal_alpha, gamma=args.focal_gamma)
    if args.loss == "ghm":
        return make_loss("ghm", num_bins=args.ghm_bins, momentum=args.ghm_momentum)
    return make_loss("bce")


def train_and_evaluate(model_type: str, seed: int, schema, vocabs, config, train, validation, test,
                       args, stats=None) -> Tuple[Any, Dict]:
    """Trains up to ``args.epochs`` epochs, keeps the epoch with the best validation AUC
    (stops after the first epoch that does not improve it), evaluates on the test set."""
    from models.ranking.metrics import ctr_metrics
    from models.ranking.models import build_ranker
    from models.ranking.training import fit_ranker, predict_probabilities
    from models.tf_compat import keras

    keras.utils.set_random_seed(seed)
    model = build_ranker(model_type, schema, vocabs, config, stats)
    model.compile(optimizer=keras.optimizers.Adam(args.learning_rate), loss=_loss(args))
    training = fit_ranker(model, train, validation, epochs=args.epochs, batch_size=args.batch_size, seed=seed)
    test_features, test_labels, test_users = test
    metrics = ctr_metrics(test_users, test_labels, predict_probabilities(model, test_features))
    metrics.update(train_seconds=round(training["seconds"], 2), train_loss=training["train_loss"],
                   validation_auc=training["validation_auc"], epochs=training["epochs"])
    return model, metrics


def measure_latency(model, schema, frame, test_mask, args) -> Dict[str, float]:
    """Exported signature, one user × `args.candidates` items, CPU, median/p99 in ms."""
    import numpy as np

    from models.features import ITEM_ID
    from models.ranking.models import export_ranker, inputs_from_frame
    from models.tf_compat import tf

    rng = np.random.default_rng(0)
    users = frame[test_mask]
    row = users.iloc[int(rng.integers(len(users)))]
    user_inputs = inputs_from_frame(schema, row.to_frame().T, [f.name for f in schema.user_features])
    item_rows = frame.drop_duplicates(ITEM_ID)
    pick = rng.choice(len(item_rows), size=args.candidates, replace=len(item_rows) < args.candidates)
    item_inputs = inputs_from_frame(schema, item_rows.iloc[pick], [f.name for f in schema.item_features])
    with tempfile.TemporaryDirectory(prefix="ranker-") as tmp:
        export_ranker(model, os.path.join(tmp, "ranker"))
        fn = tf.saved_model.load(os.path.join(tmp, "ranker")).signatures["serving_default"]
        inputs = {k: tf.constant(v) for k, v in {**user_inputs, **item_inputs}.items()}
        for _ in range(10):
            scores = fn(**inputs)["scores"]
        if scores.shape != (args.candidates,):
            raise RuntimeError(f"serving returned scores of shape {scores.shape}")
        times = []
        for _ in range(args.latency_calls):
            start = time.perf_counter()
            fn(**inputs)["scores"].numpy()
            times.append((time.perf_counter() - start) * 1000.0)
    times = np.asarray(times)
    return {"median_ms": round(float(np.median(times)), 3), "p99_ms": round(float(np.percentile(times, 99)), 3),
            "mean_ms": round(float(times.mean()), 3), "calls": len(times), "candidates": args.candidates}


def _summary(values: List[float]) -> Dict[str, Any]:
    return {"mean": round(statistics.fmean(values), 5),
            "std": round(statistics.stdev(values), 5) if len(values) > 1 else 0.0,
            "min": round(min(values), 5), "max": round(max(values), 5),
            "per_seed": [round(v, 5) for v in values]}


def main(argv=None) -> None:
    args = _parse_args(argv)
    wall_start = time.perf_counter()
    load_before = os.getloadavg()
    from models.tf_compat import tf  # noqa: E402  (threading must be set before TF starts)

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    import numpy as np

    from models.features import LABEL, USER_ID, numeric_stats
    from models.ranking.models import RankingConfig, build_vocabularies, inputs_from_frame

    start = time.perf_counter()
    schema, frame, source = load_impressions(args)
    test_mask = split_last_events(frame[USER_ID].to_numpy(), frame["timestamp"].to_numpy(), args.test_fraction)
    train_frame, test_frame = frame[~test_mask], frame[test_mask]
    validation = None
    if args.validation_fraction > 0:
        held_out = split_last_events(train_frame[USER_ID].to_numpy(), train_frame["timestamp"].to_numpy(),
                                     args.validation_fraction)
        validation_frame, train_frame = train_frame[held_out], train_frame[~held_out]
        validation = ({k: tf.constant(v) for k, v in inputs_from_frame(schema, validation_frame).items()},
                      validation_frame[LABEL].to_numpy(np.float32))
    vocabs = build_vocabularies(schema, train_frame)
    stats = numeric_stats(schema, train_frame)
    train = ({k: tf.constant(v) for k, v in inputs_from_frame(schema, train_frame).items()},
             train_frame[LABEL].to_numpy(np.float32))
    test = ({k: tf.constant(v) for k, v in inputs_from_frame(schema, test_frame).items()},
            test_frame[LABEL].to_numpy(np.float32), test_frame[USER_ID].to_numpy())
    data_seconds = time.perf_counter() - start
    print(f"data: {len(train_frame)} train / {0 if validation is None else len(validation[1])} validation / "
          f"{len(test_frame)} test rows, CTR {frame[LABEL].mean():.3f} "
          f"({data_seconds:.1f} s)", file=sys.stderr)

    config = RankingConfig(embedding_dim=args.embedding_dim,
                           hidden_units=tuple(int(x) for x in args.hidden_units.split(",")), dropout=args.dropout,
                           coaction_feed_dim=args.feed_dim,
                           coaction_layer_sizes=tuple(int(x) for x in args.coaction_layers.split(",")),
                           coaction_orders=args.orders, cartesian_max_buckets=args.cartesian_max_buckets,
                           coaction_initializer=args.coaction_initializer, coaction_l2=args.coaction_l2,
                           combination_independent=args.combination_independent,
                           order_independent=args.order_independent, sequence_pooling=args.sequence_pooling,
                           coaction_item_features=args.coaction_item_features,
                           coaction_user_features=args.coaction_user_features)
    results: Dict[str, Any] = {}
    for model_type in args.model:
        per_seed, model = [], None
        for seed in range(args.seeds):
            model, metrics = train_and_evaluate(model_type, seed, schema, vocabs, config, train, validation, test,
                                                args, stats)
            per_seed.append(metrics)
            print(f"{model_type} seed {seed}: AUC {metrics['auc']:.4f} GAUC {metrics['gauc']:.4f} "
                  f"logloss {metrics['log_loss']:.4f} epochs {metrics['epochs']} validation "
                  f"{metrics['validation_auc']} ({metrics['train_seconds']} s)", file=sys.stderr)
        latency = measure_latency(model, schema, frame, test_mask, args)
        print(f"{model_type} latency: {latency}", file=sys.stderr)
        results[model_type] = {
            **{k: _summary([m[k] for m in per_seed]) for k in ("auc", "gauc", "log_loss", "calibration_ratio")},
            "train_seconds": [m["train_seconds"] for m in per_seed],
            "epochs": [m["epochs"] for m in per_seed],
            "validation_auc": [m["validation_auc"] for m in per_seed],
            "train_loss": [m["train_loss"] for m in per_seed],
            "parameters": int(model.count_params()),
            "coaction_parameters": int(model.coaction_parameter_count()),
            "latency": latency,
        }
    out = {
        "dataset": args.dataset,
        "source": source,
        "rows": {"train": int(len(train_frame)), "validation": 0 if validation is None else int(len(validation[1])),
                 "test": int(len(test_frame)), "ctr": round(float(frame[LABEL].mean()), 4),
                 "users": int(frame[USER_ID].nunique())},
        "loss": args.loss,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "model")},
        "config": config.to_dict(),
        "results": results,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "tensorflow": tf.__version__, "threads": args.threads,
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "wall_seconds": round(time.perf_counter() - wall_start, 1),
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps({k: {m: (r["auc"]["mean"], r["auc"]["std"]) for m, r in out["results"].items()}
                      if k == "results" else out[k] for k in ("dataset", "loss", "results", "wall_seconds")}))


if __name__ == "__main__":
    main()
