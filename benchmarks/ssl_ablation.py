"""Ablation of the item tower's self-supervised task (Yao et al., CIKM'21), in one run.

    python benchmarks/ssl_ablation.py --dataset synthetic --alpha 1.0 \\
        --set retrieval.optimizer=adagrad --set retrieval.learning_rate=0.1 --out ssl_synthetic.json
    python benchmarks/ssl_ablation.py --dataset movielens-100k \\
        --data-path ../shared/data/movielens-100k --alpha 1.0 \\
        --set retrieval.optimizer=adagrad --set retrieval.learning_rate=0.1 --out ssl_ml100k.json

(Adagrad: under Adam the uniform item stream moves the tail's item rows at the full
learning rate whatever α is; see the README.)

The dataset is materialized and its statistics (item frequencies, feature mutual
information) computed once. Then every variant trains the two-tower model for each
seed and is evaluated exactly over the full corpus (training items removed):
Recall@50 and NDCG@50 overall and on the tail (test items outside the 20% most
frequent training items; `evaluation.head_fraction`). Variants:

  baseline    no auxiliary task
  dropout     feature dropout: each feature masked with p = 1/2 in each view independently
  rfm         random complementary feature masking
  cfm         correlated feature masking, partners ranked by normalized mutual
              information (the default `retrieval.ssl_correlation`)
  cfm_mi      cfm with the partners ranked by mutual information (the paper's)
  spread_out  identity views (no masking, no value dropout): the spread-out regularizer
  cfm_batch   cfm, but its items are the training batch's (power-law) instead of the
              uniform corpus stream

All SSL variants share `--alpha`, the value-dropout rate and the uniform corpus
stream; `--set key=value` adds config overrides for every variant. Reported per
variant: mean and standard deviation over seeds of each metric, the relative change
of the means against the baseline, and the training time per epoch as a ratio to
the baseline's (the overhead of the auxiliary task), all from this run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

VARIANTS = {
    "baseline": "retrieval.ssl_weight=0",
    "dropout": "retrieval.ssl_masking=independent",
    "rfm": "retrieval.ssl_masking=random",
    "cfm": "retrieval.ssl_masking=correlated retrieval.ssl_correlation=normalized_mi",
    "cfm_mi": "retrieval.ssl_masking=correlated retrieval.ssl_correlation=mi",
    "spread_out": "retrieval.ssl_masking=none retrieval.ssl_value_dropout=0",
    "cfm_batch": "retrieval.ssl_masking=correlated retrieval.ssl_items=batch",
}
METRICS = ("retrieval.recall@50", "retrieval.ndcg@50", "retrieval.tail.recall@50", "retrieval.tail.ndcg@50")
DATASET_CONFIGS = {"synthetic": None, "movielens-100k": os.path.join(REPO, "pipeline", "configs",
                                                                     "movielens-100k.yaml")}


def summarize(values):
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(mean, 4), "std": round(std, 4), "values": [round(v, 4) for v in values]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(DATASET_CONFIGS), default="synthetic")
    p.add_argument("--data-path", help="data directory (movielens-100k; default: the config's path)")
    p.add_argument("--config", help="config file instead of the dataset's (for the data section)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0,
                   help="training seeds are first-seed … first-seed+seeds-1 (fresh seeds confirm a setting)")
    p.add_argument("--epochs", type=int, help="retrieval epochs (default: the config's)")
    p.add_argument("--alpha", type=float, default=0.3, help="weight of the auxiliary loss")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every variant")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from benchmarks.common import train_and_evaluate
    from pipeline import job
    from pipeline.config import ConfigError, load_config

    if args.seeds < 1 or args.first_seed < 0:
        p.error(f"--seeds should be >= 1 and --first-seed >= 0; got {args.seeds} and {args.first_seed}")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    config_path = args.config or DATASET_CONFIGS[args.dataset]
    common = ["index.kind=brute_force", "evaluation.ks=[10, 50]", "retrieval.drift_every_n_steps=0",
              f"retrieval.ssl_weight={args.alpha}"]
    if args.data_path:
        common.append(f"data.path={args.data_path}")
    if args.epochs is not None:  # 0 included: the config rejects it
        common.append(f"retrieval.epochs={args.epochs}")
    common += args.set
    try:
        cfg = load_config(config_path, common)
    except ConfigError as e:  # e.g. --epochs 0
        p.error(str(e))
    base = tempfile.mkdtemp(prefix="recfunnel-ssl-")
    runs = {name: [] for name in names}
    try:
        job.stage_data(cfg, base)
        job.stage_stats(cfg, base)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for name in names:
                cfg = load_config(config_path, common + VARIANTS[name].split() + [f"retrieval.seed={seed}"])
                summary, m, seconds = train_and_evaluate(cfg, base, f"{name}-{seed}")
                row = {"seed": seed, "epochs": len(summary["loss"]),
                       "seconds_per_epoch": seconds / cfg.retrieval.epochs,
                       "final_main_loss": summary["loss"][-1],
                       "final_ssl_loss": (summary.get("ssl_loss") or [None])[-1],
                       "tail_users": m["evaluation"]["tail_users"],
                       **{k: m[k] for k in METRICS}}
                runs[name].append(row)
                print(name, json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}),
                      flush=True)
                shutil.rmtree(os.path.join(base, f"{name}-{seed}"), ignore_errors=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    results = {}
    for name in names:
        rows = runs[name]
        results[name] = {"overrides": VARIANTS[name],
                         **{k: summarize([r[k] for r in rows]) for k in METRICS},
                         "seconds_per_epoch": summarize([r["seconds_per_epoch"] for r in rows])}
    if "baseline" in results:
        base_row = results["baseline"]
        for name in names:
            res = results[name]
            res["relative_to_baseline"] = {
                k: round(res[k]["mean"] / base_row[k]["mean"] - 1.0, 4) if base_row[k]["mean"] else None
                for k in METRICS}
            res["epoch_time_ratio"] = round(res["seconds_per_epoch"]["mean"] / base_row["seconds_per_epoch"]["mean"], 3)
    out = {"dataset": args.dataset, "config": config_path or "built-in synthetic", "seeds": args.seeds,
           "first_seed": args.first_seed, "epochs": cfg.retrieval.epochs,
           "alpha": args.alpha, "overrides": common, "machine_cpus": os.cpu_count(), "results": results,
           "runs": runs}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"{'variant':<11} {'recall@50':>17} {'ndcg@50':>17} {'tail recall@50':>17} {'tail ndcg@50':>17} "
          f"{'epoch time':>10}" + ("" if "baseline" in results else " (s; ratio needs the baseline)"))
    for name in names:
        res = results[name]
        cells = " ".join(f"{res[k]['mean']:.4f} ± {res[k]['std']:.4f}".rjust(17) for k in METRICS)
        if "epoch_time_ratio" in res:
            time_cell = f"{res['epoch_time_ratio']:>9.2f}x"
        else:  # no baseline in this run: seconds per epoch instead of the ratio
            time_cell = f"{res['seconds_per_epoch']['mean']:>9.2f}s"
        print(f"{name:<11} {cells} {time_cell}")


if __name__ == "__main__":
    main()
