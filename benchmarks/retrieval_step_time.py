"""Training-step time of the negative-sampling settings against a plain TFRS retrieval task.

    python benchmarks/retrieval_step_time.py --data-dir ../shared/data/bars-movielens1m-m1 \\
        [--batch-sizes 256,1024] [--memory-sizes 1024,4096] [--mixed-negatives U] [--rounds 10] \\
        [--steps-per-round 20] [--set retrieval.key=value ...] --out FILE.json

Every variant is the same two-tower model (same towers, same data, same batch size);
only the loss layer differs:

- ``tfrs``: in-batch negatives with a plain `tfrs.tasks.Retrieval`, the reference;
- ``inbatch``: in-batch negatives as ``negatives: inbatch`` trains them (the same loss,
  computed by the fused path of `models.sampled_softmax`);
- ``cbns-M``: the cross-batch memory bank of M entries, both corrections (the default),
  for every M of ``--memory-sizes``;
- ``cbns-paper-M``: the bank in the paper's form (``item_gradient=all``,
  ``drift_correction=none``), for the largest M;
- ``mixed``: in-batch plus U uniformly drawn corpus items.

All variants are built in one process and timed in interleaved rounds (each round
times ``--steps-per-round`` steps of every variant in turn), so they share the
machine's noise. Before timing, each variant runs past its warm-up (the bank is full
and in use). The input is a fixed set of batches cached in memory, so the figures are
the model's step, not file parsing. Reports per variant the median step time, the
ratio of medians to ``tfrs``, and the throughput ratio (examples/s against ``tfrs``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _variants(memory_sizes, mixed_negatives: int, warmup: int):
    def bank(m):
        return ["retrieval.negatives=cbns", f"retrieval.memory_size={m}", f"retrieval.warmup_steps={warmup}"]

    out = {"tfrs": ["retrieval.negatives=inbatch"], "inbatch": ["retrieval.negatives=inbatch"]}
    out.update({f"cbns-{m}": bank(m) for m in memory_sizes})
    out[f"cbns-paper-{max(memory_sizes)}"] = [*bank(max(memory_sizes)), "retrieval.item_gradient=all",
                                              "retrieval.drift_correction=none"]
    out["mixed"] = ["retrieval.negatives=mixed", f"retrieval.num_mixed_negatives={mixed_negatives}"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="a BARS-format directory (train.txt, test.txt)")
    p.add_argument("--batch-sizes", default="256,1024")
    p.add_argument("--memory-sizes", default="1024,4096")
    p.add_argument("--mixed-negatives", type=int, default=1024)
    p.add_argument("--variants", default="all", help="comma-separated names (see above) or all")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps-per-round", type=int, default=20)
    p.add_argument("--cached-batches", type=int, default=64)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--cache", default=os.path.join(REPO, ".cache", "benchmarks"))
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if args.rounds < 1 or args.steps_per_round < 1 or args.cached_batches < 1:
        p.error("--rounds, --steps-per-round and --cached-batches should be >= 1")
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        p.error(f"--batch-sizes should be comma-separated integers. Received: {args.batch_sizes}")

    from models.tf_compat import tf  # noqa: F401  (Keras 2 before TFRS imports TensorFlow)
    import tensorflow_recommenders as tfrs

    from benchmarks.retrieval_bars import prepare
    from models.input_pipeline import example_dataset
    from models.data_layout import example_files, read_report
    from pipeline import job
    from pipeline.config import load_config

    base = prepare(args.data_dir, args.cache, 50, "all_other")
    data_dir = os.path.join(base, job.DATA_DIR)
    train_rows = read_report(data_dir)["rows"]["train"]
    # Batches drop the remainder: a batch larger than the data would never come.
    if not all(1 <= b <= train_rows for b in batch_sizes):
        p.error(f"--batch-sizes should be between 1 and the {train_rows} training rows of {args.data_dir}. "
                f"Received: {args.batch_sizes}")
    warmup = 5
    memory_sizes = [int(m) for m in args.memory_sizes.split(",")]
    known = _variants(memory_sizes, args.mixed_negatives, warmup)
    names = list(known) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in known]
    if unknown or "tfrs" not in names:
        p.error(f"--variants should include tfrs and name only {', '.join(known)}. Received: {args.variants}")

    results = {}
    for batch_size in batch_sizes:
        runs = {}
        for name in names:
            config = load_config(None, [*known[name], f"retrieval.batch_size={batch_size}",
                                        "retrieval.normalize=false", "retrieval.temperature=1.0",
                                        *args.overrides])
            task = None
            if name == "tfrs":
                rc = config.retrieval
                task = lambda rc=rc: tfrs.tasks.Retrieval(  # noqa: E731
                    temperature=rc.temperature, remove_accidental_hits=rc.remove_accidental_hits)
            model, _ = job.new_retrieval_model(config, base, task=task)
            data = example_dataset(example_files(data_dir, "train"), model.schema, batch_size, shuffle=True,
                                   seed=0, shuffle_buffer=100_000, drop_remainder=True)
            batches = data.take(args.cached_batches).cache().repeat()
            iterator = iter(batches)
            step = model.make_train_function()
            for _ in range(max(args.cached_batches, warmup + 10)):  # trace, fill the cache and the bank
                float(step(iterator)["loss"])
            runs[name] = {"model": model, "step": step, "iterator": iterator, "times": []}
        for round_index in range(args.rounds):
            for name in names:
                run = runs[name]
                for _ in range(args.steps_per_round):
                    t = time.perf_counter()
                    float(run["step"](run["iterator"])["loss"])  # waits for the step's result
                    run["times"].append(time.perf_counter() - t)
            print(f"B={batch_size}: round {round_index + 1}/{args.rounds}", file=sys.stderr, flush=True)
        ref = statistics.median(runs["tfrs"]["times"])
        rows = {}
        for name in names:
            med = statistics.median(runs[name]["times"])
            rows[name] = {"median_step_ms": round(1000 * med, 3),
                          "p90_step_ms": round(1000 * statistics.quantiles(runs[name]["times"], n=10)[-1], 3),
                          "step_time_vs_tfrs": round(med / ref, 3),
                          "throughput_vs_tfrs": round(ref / med, 3),
                          "examples_per_s": round(batch_size / med, 1)}
        results[str(batch_size)] = rows
        print(json.dumps({f"B={batch_size}": rows}, indent=2), flush=True)
        runs.clear()
    out = {"data_dir": os.path.abspath(args.data_dir), "memory_sizes": memory_sizes,
           "mixed_negatives": args.mixed_negatives, "rounds": args.rounds,
           "steps_per_round": args.steps_per_round, "overrides": args.overrides, "results": results,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load": os.getloadavg()}}
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2)
    shutil.move(tmp, args.out)


if __name__ == "__main__":
    main()
