"""Retrieval quality of negative-sampling settings on one dataset, in one run.

    python benchmarks/retrieval_negatives.py [--config FILE] [--epochs 4] --out FILE.json \\
        [--variant NAME="key=value key=value" ...]

The dataset (default: the built-in synthetic data) is materialized and its statistics
computed once; then every variant trains the two-tower model from the same seed and is
evaluated exactly over the full corpus (Recall@10/50, training items removed). Without
--variant it compares in-batch negatives with the cross-batch memory bank, for cosine
and dot-product towers (and, for dot products, the bank in the paper's form, without
the stabilising corrections), and mixed negatives.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DEFAULT_VARIANTS = {
    "inbatch-cosine": "",
    "cbns-cosine": "retrieval.negatives=cbns retrieval.memory_size=512 retrieval.warmup_steps=100",
    "inbatch-dot": "retrieval.normalize=false retrieval.temperature=1.0",
    "cbns-dot": "retrieval.negatives=cbns retrieval.memory_size=512 retrieval.warmup_steps=100 "
                "retrieval.normalize=false retrieval.temperature=1.0",
    "cbns-dot-paper": "retrieval.negatives=cbns retrieval.memory_size=512 retrieval.warmup_steps=100 "
                      "retrieval.normalize=false retrieval.temperature=1.0 "
                      "retrieval.item_gradient=all retrieval.drift_correction=none",
    "mixed-cosine": "retrieval.negatives=mixed retrieval.num_mixed_negatives=512",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="config file for the data section (default: built-in synthetic)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--variant", action="append", default=[], metavar='NAME="k=v ..."')
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from benchmarks.common import train_and_evaluate
    from pipeline import job
    from pipeline.config import load_config

    variants = dict(DEFAULT_VARIANTS)
    if args.variant:
        variants = dict(v.split("=", 1) for v in args.variant)
        variants = {k: v.strip('"') for k, v in variants.items()}
    common = [f"retrieval.epochs={args.epochs}", "index.kind=brute_force", "evaluation.ks=[10, 50]"]
    base = tempfile.mkdtemp(prefix="recfunnel-negatives-")
    results = {}
    try:
        cfg = load_config(args.config, common)
        job.stage_data(cfg, base)
        job.stage_stats(cfg, base)
        for name, overrides in variants.items():
            cfg = load_config(args.config, common + overrides.split())
            summary, m, seconds = train_and_evaluate(cfg, base, name)
            results[name] = {"overrides": overrides, "train_seconds": round(seconds, 1),
                             "loss": [round(x, 2) for x in summary["loss"]],
                             **({"bank_share": [round(x, 4) for x in summary["bank_share"]]}
                                if "bank_share" in summary else {}),
                             **{k: round(m[k], 4) for k in ("retrieval.recall@10", "retrieval.recall@50",
                                                            "baseline.popularity.recall@10")}}
            print(name, json.dumps(results[name]), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    out = {"config": args.config or "built-in synthetic", "epochs": args.epochs, "machine_cpus": os.cpu_count(),
           "load": os.getloadavg(), "results": results}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
