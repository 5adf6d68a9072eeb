"""Retrieval quality and time on one replica, two mirrored replicas and two worker processes.

    python benchmarks/distributed_training.py --out distributed.json [--seeds 3]
        [--negatives inbatch cbns] [--config pipeline/configs/default.yaml] [--set KEY=VALUE ...]

For each negatives setting and seed it runs `recfunnel run` three ways on the same data:

* ``default``: one replica (no strategy);
* ``mirrored``: one process with its CPU split into 2 logical devices, MirroredStrategy;
* ``multi_worker``: two processes on loopback (TF_CONFIG, one task each),
  MultiWorkerMirroredStrategy; the chief's (worker 0's) metrics are reported and the
  other worker's are checked to be identical.

The global batch is the configured `retrieval.batch_size` in every mode. ``cbns`` uses
dot-product towers and a memory bank (see the README's "Retrieval negatives"). Each
mode keeps its own workdirs under --workdir, so the data and statistics stages run once
and later seeds only retrain. Reported per mode: Recall@10 / NDCG@10 per seed, their mean
and spread (max − min), and the retrieval-training seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ("default", "mirrored", "multi_worker")
NEGATIVES = {
    "inbatch": [],
    "cbns": ["retrieval.negatives=cbns", "retrieval.memory_size=2048", "retrieval.warmup_steps=200",
             "retrieval.normalize=false", "retrieval.temperature=1.0"],
}
MIRRORED = """
import sys
import models.tf_compat
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _free_ports(n: int) -> List[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _metrics(workdir: str) -> Dict[str, Any]:
    with open(os.path.join(workdir, "reports", "latest", "metrics.json")) as f:
        return json.load(f)


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    # 5 = finished but not promoted (a seed worse than the last): the metrics are still valid
    if proc.returncode not in (0, 5):
        sys.exit(f"{what} failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}")


def run_mode(mode: str, workdir: str, run_args: List[str]) -> Dict[str, Any]:
    """One training in `mode`; returns the chief's metrics."""
    cli = [sys.executable, "-m", "pipeline.cli"]
    if mode == "default":
        proc = subprocess.run([*cli, "run", "--workdir", workdir, *run_args], cwd=REPO, capture_output=True,
                              text=True)
        _check(proc, mode)
        return _metrics(workdir)
    if mode == "mirrored":
        proc = subprocess.run([sys.executable, "-c", MIRRORED, "run", "--workdir", workdir, *run_args,
                               "--set", "retrieval.distribution=mirrored"], cwd=REPO, capture_output=True, text=True)
        _check(proc, mode)
        return _metrics(workdir)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
        procs.append(subprocess.Popen([*cli, "run", "--workdir", f"{workdir}-w{index}", *run_args,
                                       "--set", "retrieval.distribution=multi_worker"],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for index, p in enumerate(procs):
        out, err = p.communicate()
        _check(subprocess.CompletedProcess(p.args, p.returncode, out, err), f"{mode} worker {index}")
    chief, other = _metrics(f"{workdir}-w0"), _metrics(f"{workdir}-w1")
    keys = [k for k in chief if k.startswith("retrieval.")]
    if {k: chief[k] for k in keys} != {k: other[k] for k in keys}:
        sys.exit(f"the two workers disagree: {[(k, chief[k], other[k]) for k in keys if chief[k] != other[k]]}")
    return chief


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--negatives", nargs="+", choices=sorted(NEGATIVES), default=["inbatch", "cbns"])
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--config", default=os.path.join(REPO, "pipeline", "configs", "default.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "recfunnel_distributed"))
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    results: Dict[str, Any] = {}
    for negatives in args.negatives:
        for mode in args.modes:
            rows = []
            for seed in range(args.seeds):
                run_args = ["--config", args.config, "--set", f"retrieval.seed={seed}",
                            *[a for o in NEGATIVES[negatives] + args.overrides for a in ("--set", o)]]
                start = time.perf_counter()
                m = run_mode(mode, os.path.join(args.workdir, f"{negatives}-{mode}"), run_args)
                rows.append({"seed": seed, "recall@10": m["retrieval.recall@10"], "ndcg@10": m["retrieval.ndcg@10"],
                             "replicas": m["retrieval_training"]["replicas"],
                             "training_seconds": m["stage_seconds"].get("retrieval_training"),
                             "wall_seconds": round(time.perf_counter() - start, 1)})
                print(json.dumps({"negatives": negatives, "mode": mode, **rows[-1]}), flush=True)
            recalls = [r["recall@10"] for r in rows]
            results.setdefault(negatives, {})[mode] = {
                "runs": rows, "recall@10_mean": round(statistics.mean(recalls), 4),
                "recall@10_spread": round(max(recalls) - min(recalls), 4),
                "ndcg@10_mean": round(statistics.mean(r["ndcg@10"] for r in rows), 4),
                "training_seconds_median": statistics.median(r["training_seconds"] or 0 for r in rows)}
    out = {"config": args.config, "overrides": args.overrides, "seeds": args.seeds, "results": results,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "load_average_before": [round(x, 2) for x in load_before],
                       "load_average_after": [round(x, 2) for x in os.getloadavg()]}}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    for negatives, modes in results.items():
        for mode, r in modes.items():
            print(f"{negatives:8s} {mode:13s} Recall@10 {r['recall@10_mean']:.4f} (spread {r['recall@10_spread']:.4f}) "
                  f"NDCG@10 {r['ndcg@10_mean']:.4f} training {r['training_seconds_median']} s")


if __name__ == "__main__":
    main()
