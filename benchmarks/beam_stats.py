"""Benchmark of the Beam statistics job against a single-process numpy computation.

For each size (interactions), writes a synthetic dataset in the materialized layout
(`models.data_layout`: schema, users, items, ``interactions/train-*.parquet``) from the
project's generator (`pipeline.data.synthetic`: Zipf item popularity, six categorical
item features including the multi-valued ``tags``), then runs, each in its own
subprocess so peak memory is measured per variant:

  (a) ``beam``: `beam_jobs.stats_job.run_statistics` on the DirectRunner (options from
      ``--beam-args``);
  (b) ``numpy``: the same statistics in one process: whole columns read with pyarrow,
      the same validation, `np.unique` counts, one MI pass over the whole item table.

It reports wall time (of the subprocess, imports included, and of the computation
alone), peak RSS (``ru_maxrss`` of the subprocess and its children), the Beam/numpy time
ratio, and whether the outputs agree (frequencies, vocabularies exactly; probabilities
and MI to 1e-9 relative). With ``--movielens-dir`` it also computes the feature MI of
MovieLens-100K (needs the reader `pipeline.data.movielens.read_movielens`).

Only the Parquet tables the statistics job reads are written (the generator's
`materialize` also encodes tf.Examples for every row, which costs ~10 s per 100k rows
and has no bearing on this job).

Usage:
  python benchmarks/beam_stats.py --sizes 1000000 5000000 --out /tmp/beam_stats.json
  python benchmarks/beam_stats.py --sizes 1000000 \\
      --beam-args="--direct_running_mode=multi_processing --direct_num_workers=2"
  python benchmarks/beam_stats.py --sizes 1000000 --dask-workers 2

With ``--dask-workers N`` the Beam variant runs on Beam's DaskRunner against a
`dask.distributed` cluster (a scheduler and N single-threaded worker processes) that
the benchmark starts on the loopback interface (needs ``apache-beam[dask]``); its peak
RSS is then the submitting process only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

MEAN_INTERACTIONS_PER_USER = 30
SHARD_ROWS = 500_000
ROW_GROUP_ROWS = 100_000
ITEM_ROW_GROUP_ROWS = 20_000
RTOL = 1e-9


# -- data -------------------------------------------------------------------------
def write_synthetic_dataset(data_dir: str, num_interactions: int, num_items: int, seed: int) -> Dict[str, Any]:
    """Writes the Parquet part of a materialized dataset; all interactions go to train."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from models import data_layout
    from pipeline.data.synthetic import SyntheticConfig, generate_synthetic

    start = time.time()
    num_users = max(1, math.ceil(num_interactions / MEAN_INTERACTIONS_PER_USER))
    config = SyntheticConfig(num_users=num_users, num_items=num_items,
                             mean_impressions_per_user=MEAN_INTERACTIONS_PER_USER, seed=seed)
    raw = generate_synthetic(config)
    tmp = data_dir + ".partial"
    os.makedirs(os.path.join(tmp, data_layout.INTERACTIONS_DIR), exist_ok=True)
    raw.schema.save(os.path.join(tmp, data_layout.SCHEMA_FILE))
    pq.write_table(pa.Table.from_pandas(raw.users[raw.schema.table_columns("user")], preserve_index=False),
                   os.path.join(tmp, data_layout.USERS_FILE), row_group_size=ROW_GROUP_ROWS)
    pq.write_table(pa.Table.from_pandas(raw.items[raw.schema.table_columns("item")], preserve_index=False),
                   os.path.join(tmp, data_layout.ITEMS_FILE), row_group_size=ITEM_ROW_GROUP_ROWS)
    buffered: List[pa.Table] = []
    rows, shards = 0, []
    columns = ["user_id", "item_id", "timestamp", "label"]

    def flush():
        table = pa.concat_tables(buffered)
        path = os.path.join(tmp, data_layout.INTERACTIONS_DIR, f"part-{len(shards):05d}.parquet")
        pq.write_table(table, path, row_group_size=ROW_GROUP_ROWS)
        shards.append(path)
        buffered.clear()

    for chunk in raw.interactions():
        buffered.append(pa.Table.from_pandas(chunk[columns], preserve_index=False))
        rows += len(chunk)
        if sum(t.num_rows for t in buffered) >= SHARD_ROWS:
            flush()
    if buffered:
        flush()
    for i, path in enumerate(shards):
        os.rename(path, os.path.join(tmp, data_layout.INTERACTIONS_DIR,
                                     data_layout.shard_name("train", i, len(shards), ".parquet")))
    os.rename(tmp, data_dir)
    return {"interactions": rows, "users": num_users, "items": num_items, "shards": len(shards),
            "seconds": round(time.time() - start, 2)}


# -- the two variants (run inside a subprocess) ----------------------------------------
def run_beam(data_dir: str, out_dir: str, beam_args: List[str]) -> Dict[str, Any]:
    from beam_jobs.stats_job import run_statistics

    start = time.time()
    summary = run_statistics(data_dir, out_dir, pipeline_args=beam_args)
    return {"compute_seconds": time.time() - start, "job_runtime_seconds": summary["runtime_seconds"],
            "rows_read": summary["rows_read"], "positive_rows": summary["positive_rows"]}


def numpy_statistics(data_dir: str) -> Dict[str, Any]:
    """The statistics of `run_statistics` computed in one process over whole columns."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from beam_jobs import stats_math
    from beam_jobs.vocabularies import table_vocabulary_features
    from models import data_layout
    from models.features import ITEM_ID, USER_ID, Schema

    schema = Schema.load(os.path.join(data_dir, data_layout.SCHEMA_FILE))
    items = pq.read_table(os.path.join(data_dir, data_layout.ITEMS_FILE))
    users = pq.read_table(os.path.join(data_dir, data_layout.USERS_FILE))
    item_ids = np.unique(items.column(ITEM_ID).to_numpy(zero_copy_only=False).astype(str))
    columns = [USER_ID, ITEM_ID] + (["label"] if schema.has_label else [])
    tables = [pq.read_table(f, columns=columns) for f in data_layout.interaction_files(data_dir, "train")]
    table = pa.concat_tables(tables)
    del tables
    user = table.column(USER_ID)
    item = table.column(ITEM_ID)
    valid = np.asarray(pc.and_(pc.fill_null(pc.not_equal(user, ""), False),
                               pc.fill_null(pc.not_equal(item, ""), False)).to_numpy(zero_copy_only=False), bool)
    item_str = item.fill_null("").to_numpy(zero_copy_only=False).astype(str)
    valid &= np.isin(item_str, item_ids)
    if schema.has_label:
        label = table.column("label").to_numpy(zero_copy_only=False)
        valid &= ~np.isnan(label)
        positive = valid & (label > 0)
    else:
        positive = valid
    counts = stats_math.count_values(item_str[positive])
    ids, values, probability, _ = stats_math.item_frequency_table(counts)

    vocabularies = {}
    for side, tab in (("user", users), ("item", items)):
        for name in table_vocabulary_features(schema, side):
            column = tab.column(name)
            if name == ITEM_ID:
                vocabularies[name] = stats_math.id_vocabulary(ids.tolist(), item_ids.tolist())
                continue
            tokens = stats_math.flatten_tokens(column.to_pylist())
            vocabularies[name] = stats_math.build_vocabulary(stats_math.count_values(tokens))
    mi_features = schema.categorical_item_features()
    features, mi, nmi = stats_math.feature_mutual_information(
        {f: items.column(f).to_pylist() for f in mi_features}, mi_features)
    return {"frequencies": {"item_id": ids.tolist(), "count": values.tolist(),
                            "probability": probability.tolist()},
            "vocabularies": vocabularies,
            "mi": {"features": features, "mi": mi.tolist(), "normalized_mi": nmi.tolist()},
            "rows_read": int(table.num_rows), "positive_rows": int(positive.sum())}


def run_numpy(data_dir: str, out_path: str) -> Dict[str, Any]:
    import beam_jobs.vocabularies  # noqa: F401  (imports are not part of the timed work)
    import pyarrow.parquet  # noqa: F401

    start = time.time()
    stats = numpy_statistics(data_dir)
    seconds = time.time() - start
    with open(out_path, "w") as f:
        json.dump(stats, f)
    return {"compute_seconds": seconds, "rows_read": stats["rows_read"],
            "positive_rows": stats["positive_rows"]}


def _vm_hwm_mb() -> float:
    """Peak RSS of this process image (``VmHWM``; unlike ``ru_maxrss`` it is not carried
    over from the parent through fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _child_main(args) -> None:
    start = time.time()
    if args.variant == "generate":
        size, num_items, seed = (int(x) for x in args.beam_args.split(","))
        result = write_synthetic_dataset(args.data_dir, size, num_items, seed)
    elif args.variant == "beam":
        result = run_beam(args.data_dir, args.result, shlex.split(args.beam_args))
    else:
        result = run_numpy(args.data_dir, args.result)
    result["process_seconds"] = time.time() - start
    result["vm_hwm_mb"] = _vm_hwm_mb()
    result["maxrss_self_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["maxrss_children_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def run_variant(variant: str, data_dir: str, result: str, beam_args: str) -> Dict[str, Any]:
    start = time.time()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--variant", variant,
                           "--data-dir", data_dir, "--result", result, f"--beam-args={beam_args}"],
                          capture_output=True, text=True, cwd=REPO)
    wall = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-4000:]}")
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    out["wall_seconds"] = wall
    # Reported by the subprocess itself (the running maximum over this parent's children
    # would mix the variants). Peak = the process's own VmHWM, or its children's
    # ru_maxrss (multi-processing SDK workers) if larger; Linux's ru_maxrss includes the
    # RSS inherited at fork, so the parent stays small (data are generated in a
    # subprocess too).
    out["peak_rss_mb"] = max(out["vm_hwm_mb"], out["maxrss_children_mb"])
    out["parent_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# -- agreement --------------------------------------------------------------------------
def compare_outputs(beam_dir: str, numpy_path: str) -> Dict[str, Any]:
    import csv

    with open(numpy_path) as f:
        reference = json.load(f)
    with open(os.path.join(beam_dir, "item_frequencies.csv")) as f:
        rows = list(csv.DictReader(f))
    ids = [r["item_id"] for r in rows]
    counts = [int(r["count"]) for r in rows]
    probability = np.asarray([float(r["probability"]) for r in rows])
    report = {
        "frequency_ids_and_counts_equal": ids == reference["frequencies"]["item_id"]
        and counts == reference["frequencies"]["count"],
        "frequency_probability_max_rel_err": float(np.max(np.abs(
            probability - reference["frequencies"]["probability"]) / probability)) if len(rows) else 0.0,
    }
    vocab_equal = {}
    for name, tokens in reference["vocabularies"].items():
        with open(os.path.join(beam_dir, "vocab", f"{name}.txt")) as f:
            vocab_equal[name] = f.read().splitlines() == tokens
    report["vocabularies_equal"] = vocab_equal
    with open(os.path.join(beam_dir, "feature_mi.json")) as f:
        mi = json.load(f)
    report["mi_features_equal"] = mi["features"] == reference["mi"]["features"]
    for key in ("mi", "normalized_mi"):
        a, b = np.asarray(mi[key]), np.asarray(reference["mi"][key])
        scale = np.maximum(np.abs(b), 1e-300)
        report[f"{key}_max_rel_err"] = float(np.max(np.abs(a - b) / scale)) if a.size else 0.0
    report["agree"] = bool(
        report["frequency_ids_and_counts_equal"] and report["frequency_probability_max_rel_err"] <= RTOL
        and all(vocab_equal.values()) and report["mi_features_equal"]
        and report["mi_max_rel_err"] <= RTOL and report["normalized_mi_max_rel_err"] <= RTOL)
    return report


# -- MovieLens ----------------------------------------------------------------------------
def movielens_mi(movielens_dir: str) -> Dict[str, Any]:
    try:
        from pipeline.data.movielens import read_movielens
    except ImportError as err:
        return {"status": "pending", "reason": f"pipeline.data.movielens.read_movielens unavailable ({err})"}
    import apache_beam as beam
    import pyarrow as pa

    from beam_jobs import stats_math
    from beam_jobs.feature_mi import FeatureMutualInformation

    raw = read_movielens(movielens_dir)
    features = raw.schema.categorical_item_features()
    items = raw.items
    start = time.time()
    _, mi, nmi = stats_math.feature_mutual_information({f: items[f].tolist() for f in features}, features)
    numpy_seconds = time.time() - start
    batches = [pa.Table.from_pandas(items[features].iloc[lo:lo + 500], preserve_index=False)
               for lo in range(0, len(items), 500)]
    result_path = tempfile.mktemp(suffix=".json")
    start = time.time()
    with beam.Pipeline() as p:
        _ = (p | "Items" >> beam.Create(batches) | FeatureMutualInformation(features)
             | beam.Map(lambda r: open(result_path, "w").write(json.dumps(r))))
    beam_seconds = time.time() - start
    with open(result_path) as f:
        report = json.load(f)
    os.remove(result_path)
    agree = bool(np.allclose(report["mi"], mi, rtol=RTOL, atol=0))
    return {"status": "done", "features": features, "num_items": report["num_items"],
            "mi": report["mi"], "normalized_mi": report["normalized_mi"],
            "numpy_seconds": numpy_seconds, "beam_seconds": beam_seconds, "agree": agree}


# -- main ---------------------------------------------------------------------------------
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--num-items", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "recfunnel_beam_stats"),
                        help="datasets are cached here by size and seed")
    parser.add_argument("--beam-args", default="", help="Beam pipeline options, one string")
    parser.add_argument("--dask-workers", type=int, default=0,
                        help="run the Beam variant on a local Dask cluster of this many worker processes")
    parser.add_argument("--movielens-dir", default=None)
    parser.add_argument("--out", default=None, help="JSON report path")
    # internal: one variant in a subprocess
    parser.add_argument("--variant", choices=["beam", "numpy", "generate"], help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:
        _child_main(args)
        return

    cluster = None
    if args.dask_workers:
        import distributed

        from beam_jobs.options import DASK_RUNNER

        cluster = distributed.LocalCluster(n_workers=args.dask_workers, threads_per_worker=1, processes=True,
                                           host="127.0.0.1", dashboard_address=None)
        args.beam_args = (f"{args.beam_args} --runner={DASK_RUNNER} "
                          f"--dask_client_address={cluster.scheduler_address}").strip()
    try:
        _run_sizes(args)
    finally:
        if cluster is not None:
            cluster.close()


def _run_sizes(args) -> None:
    report: Dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "load_average_at_start": os.getloadavg()},
        "beam_args": args.beam_args, "num_items": args.num_items, "runs": []}
    os.makedirs(args.workdir, exist_ok=True)
    for size in args.sizes:
        data_dir = os.path.join(args.workdir, f"synthetic-{size}-{args.num_items}-{args.seed}")
        generation = None
        if not os.path.exists(data_dir):
            generation = run_variant("generate", data_dir, "", f"{size},{args.num_items},{args.seed}")
        beam_out = os.path.join(args.workdir, f"beam-out-{size}")
        numpy_out = os.path.join(args.workdir, f"numpy-out-{size}.json")
        numpy_result = run_variant("numpy", data_dir, numpy_out, args.beam_args)
        beam_result = run_variant("beam", data_dir, beam_out, args.beam_args)
        run = {"interactions_requested": size, "data_dir": data_dir, "generation": generation,
               "load_average_after": os.getloadavg(),
               "beam": beam_result, "numpy": numpy_result,
               "time_ratio_wall": beam_result["wall_seconds"] / numpy_result["wall_seconds"],
               "time_ratio_compute": beam_result["compute_seconds"] / numpy_result["compute_seconds"],
               "agreement": compare_outputs(beam_out, numpy_out)}
        report["runs"].append(run)
        print(json.dumps({k: run[k] for k in ("interactions_requested", "time_ratio_wall",
                                              "time_ratio_compute")}
                         | {"beam_wall": beam_result["wall_seconds"], "numpy_wall": numpy_result["wall_seconds"],
                            "beam_peak_mb": beam_result["peak_rss_mb"],
                            "numpy_peak_mb": numpy_result["peak_rss_mb"],
                            "agree": run["agreement"]["agree"]}), flush=True)
    if args.movielens_dir:
        report["movielens"] = movielens_mi(args.movielens_dir)
        print(json.dumps({"movielens": report["movielens"].get("status")}), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
