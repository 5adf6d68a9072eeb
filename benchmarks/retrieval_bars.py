"""Two-tower retrieval on a BARS-format split, evaluated under the BARS protocol.

    python benchmarks/retrieval_bars.py --data-dir ../shared/data/bars-movielens1m-m1 \\
        --negatives {inbatch,cbns,mixed} [--batch-size B] [--memory-size M] \\
        [--warmup-steps W] [--epochs E] [--set retrieval.key=value ...] --out FILE.json

Trains on DIR/train.txt and evaluates on DIR/test.txt: every item is scored, the user's
training items are removed, the top K are kept; Recall@K = hits / |test items|,
NDCG@K with binary relevance and ideal DCG over min(|test items|, K); mean over users.
Works on any directory in that format. The materialized data and statistics are cached
under --cache (keyed by the data directory) so several runs share them.

Writes recall@20, ndcg@20, recall@50, ndcg@50, precision@20 (hits / 20) and f1@20
(2·P·R / (P + R) of the mean precision@20 and recall@20, the form BARS reports for
Amazon-Electronics), epochs, training wall time and the median step time (measured over
all steps after the first epoch's first 20). With --eval-every-epoch it also writes the
test figures after every epoch (`per_epoch`: exact search on the towers in memory, the same
users and exclusions; the last row equals the final figures), and the training time then
includes those evaluations.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pipeline.config import HISTORY_MODES, NEGATIVES  # noqa: E402  (TensorFlow-free)


def prepare(data_dir: str, cache: str, history_length: int, history_mode: str) -> str:
    """Materialized data + statistics for `data_dir` (cached)."""
    from beam_jobs.stats_job import run_statistics
    from pipeline.data.bars import read_bars
    from models import data_layout
    from pipeline.data.materialize import EXAMPLE_ORDER, materialize
    from pipeline.data.splits import SplitConfig

    key = hashlib.sha256(f"{os.path.abspath(data_dir)}|{history_length}|{history_mode}".encode()).hexdigest()[:12]
    workdir = os.path.join(cache, f"bars-{key}")
    report = os.path.join(workdir, "data", data_layout.READ_REPORT_FILE)
    current = False
    if os.path.exists(report):
        with open(report) as f:
            current = json.load(f).get("example_order") == EXAMPLE_ORDER
    if not (current and os.path.exists(os.path.join(workdir, "stats", "summary.json"))):
        shutil.rmtree(workdir, ignore_errors=True)
        os.makedirs(workdir)
        materialize(read_bars(data_dir, history_length=history_length), os.path.join(workdir, "data"),
                    SplitConfig(method="predefined"), positives="all", history_mode=history_mode)
        run_statistics(os.path.join(workdir, "data"), os.path.join(workdir, "stats"), positives="all")
    return workdir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--negatives", choices=NEGATIVES, default="inbatch")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--memory-size", type=int, default=0)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--num-mixed-negatives", type=int, default=0)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--history-length", type=int, default=50)
    p.add_argument("--history-mode", choices=HISTORY_MODES, default="all_other",
                   help="BARS files carry no time: by default an event's history is the user's other "
                        "training items")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config override, e.g. retrieval.learning_rate=0.003")
    p.add_argument("--eval-every-epoch", action="store_true",
                   help="also evaluate after every epoch (exact search, in memory) and write the curve as "
                        "`per_epoch`")
    p.add_argument("--cache", default=os.path.join(REPO, ".cache", "benchmarks"))
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from benchmarks.common import epoch_evaluation, train_and_evaluate
    from models.tf_compat import keras
    from pipeline.config import config_to_dict, load_config

    base = prepare(args.data_dir, args.cache, args.history_length, args.history_mode)
    overrides = [f"retrieval.negatives={args.negatives}", f"retrieval.batch_size={args.batch_size}",
                 f"retrieval.memory_size={args.memory_size}", f"retrieval.warmup_steps={args.warmup_steps}",
                 f"retrieval.num_mixed_negatives={args.num_mixed_negatives}", f"retrieval.epochs={args.epochs}",
                 "index.kind=brute_force", "evaluation.ks=[20, 50]", "promotion.metric=retrieval.recall@20",
                 *args.overrides]
    config = load_config(None, overrides)
    run_name = f"run-{os.getpid()}"
    run_dir = os.path.join(base, run_name)
    shutil.rmtree(run_dir, ignore_errors=True)

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times, self._t = [], None

        def on_train_batch_begin(self, batch, logs=None):
            self._t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter() - self._t)

    timer = StepTimer()
    callbacks = [timer]
    if args.eval_every_epoch:
        per_epoch = epoch_evaluation(os.path.join(base, "data"), config.evaluation)
        callbacks.append(per_epoch)
    try:
        summary, metrics, train_seconds = train_and_evaluate(config, base, run_name, callbacks=callbacks)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    precision, recall = metrics["retrieval.precision@20"], metrics["retrieval.recall@20"]
    steady = timer.times[20:] if len(timer.times) > 40 else timer.times
    result = {
        "data_dir": os.path.abspath(args.data_dir),
        "negatives": args.negatives, "batch_size": args.batch_size, "memory_size": args.memory_size,
        "warmup_steps": args.warmup_steps, "num_mixed_negatives": args.num_mixed_negatives,
        "epochs": args.epochs,
        "recall@20": metrics["retrieval.recall@20"], "ndcg@20": metrics["retrieval.ndcg@20"],
        "recall@50": metrics["retrieval.recall@50"], "ndcg@50": metrics["retrieval.ndcg@50"],
        "precision@20": precision, "f1@20": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "users": metrics["evaluation"]["users"], "items": metrics["evaluation"]["items"],
        "train_seconds": round(train_seconds, 2),
        "median_step_ms": round(1000 * statistics.median(steady), 3),
        "steps": len(timer.times),
        "loss": summary["loss"],
        **({"bank_share": summary["bank_share"]} if "bank_share" in summary else {}),
        **({"per_epoch": per_epoch.rows} if args.eval_every_epoch else {}),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()},
        "config": config_to_dict(config)["retrieval"],
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k not in ("config", "loss")}, indent=2))


if __name__ == "__main__":
    main()
