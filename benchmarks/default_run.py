"""Wall time, peak memory and quality of `recfunnel run` with the default configuration.

    python benchmarks/default_run.py [--runs 1] [--config FILE] [--out default_run.json]

Each run is a fresh `recfunnel run` process in a new temporary workdir (installation and
first-import caches are warm, as on a scheduled machine). Reports the median wall time,
the peak resident memory of the run, per-stage seconds, and the retrieval, index and
baseline metrics of the last run, with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--config", help="config file (default: built-in defaults)")
    p.add_argument("--out", default="default_run.json")
    args = p.parse_args()

    walls, peaks, metrics = [], [], None
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="recfunnel-bench-") as tmp:
            workdir = os.path.join(tmp, "w")
            cmd = [sys.executable, "-m", "pipeline.cli", "run", "--workdir", workdir]
            if args.config:
                cmd += ["--config", args.config]
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                sys.exit(f"run {i} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            walls.append(wall)
            peaks.append(max(peak, before) / 1024.0)
            with open(os.path.join(workdir, "reports", "latest", "metrics.json")) as f:
                metrics = json.load(f)
        print(f"run {i + 1}/{args.runs}: {wall:.1f} s", file=sys.stderr)

    keys = sorted(k for k in metrics if k.startswith(("retrieval.", "index.", "baseline.", "ranker.", "preranker."))
                  and isinstance(metrics[k], (int, float)) and not isinstance(metrics[k], bool))
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "config": args.config or "built-in defaults",
        "runs": args.runs,
        "wall_seconds_median": round(statistics.median(walls), 2),
        "wall_seconds": [round(w, 2) for w in walls],
        "peak_rss_mib": round(max(peaks), 1),
        "stage_seconds": metrics["stage_seconds"],
        "data_rows": metrics["data"]["rows"],
        "evaluation": metrics["evaluation"],
        "index_build": {k: v for k, v in metrics["index_build"].items() if k != "tuning"},
        "metrics": {k: round(metrics[k], 4) for k in keys},
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
