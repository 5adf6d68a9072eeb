"""Load test of `recfunnel serve`: fixed concurrency levels, throughput, latency percentiles, errors.

    # 1. (optional) a workdir with a 1M-item corpus, from a finished run's workdir
    python benchmarks/serving_load.py prepare --from runs/demo --to runs/demo-1m --num-items 1000000

    # 2. the service, in another shell
    recfunnel serve --workdir runs/demo-1m --port 8500

    # 3. the load, on loopback
    python benchmarks/serving_load.py run --url http://127.0.0.1:8500 --workdir runs/demo-1m \\
        --concurrency 1 8 16 --duration 60 --out load.json

    # the cascade's cost per query, in process, by batch size (no HTTP)
    python benchmarks/serving_load.py batch-cost --workdir runs/demo-1m --batch-sizes 1 4 8 16

``run`` keeps `concurrency` requests in flight (closed loop: each client thread sends
its next request when the previous one is answered, over one keep-alive connection)
for `duration` seconds per level, after a short warm-up, with user ids drawn (seeded)
from the workdir's users. It reports per level: completed requests/s, latency p50 /
p90 / p99 / max, and errors (non-200 answers or transport failures, with the first
few messages), the server's batches during the level and their mean size (when it
batches requests; for a server of several processes, those of the process that
answered the status requests before and after the level, when the same one did), plus
the machine's load average before and after.

``prepare`` copies a workdir's data and the served version's towers, grows the item
table to `num_items` (the original items plus synthetic ones whose features are drawn
from the original columns, ids ``x<n>``), embeds every item with the exported item
tower, builds the index as the job does (`serving.index.build_index` with the default
`IndexConfig`: ScaNN, tuned on 1,000 users' query embeddings) and — unless
``--no-rankers`` — copies the source run's trained pre-ranker and ranker exports (a
stage the run did not export is skipped by the cascade, and the answers say so).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sys
import threading
import time
import urllib.parse
from typing import Any, Dict, List

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


# -- load ----------------------------------------------------------------------------------
def _user_ids(workdir: str, count: int, seed: int) -> List[str]:
    import pyarrow.parquet as pq

    users = pq.read_table(os.path.join(workdir, "data", "users.parquet"), columns=["user_id"]).column(0).to_pylist()
    rng = np.random.default_rng(seed)
    return [str(users[i]) for i in rng.choice(len(users), size=min(count, len(users)), replace=False)]


def run_level(url: str, path: str, bodies: List[bytes], concurrency: int, duration: float,
              warmup: float) -> Dict[str, Any]:
    """Closed-loop load at one concurrency level; latencies of requests started after warm-up."""
    parsed = urllib.parse.urlparse(url)
    start_at = time.perf_counter() + warmup
    stop_at = start_at + duration
    latencies: List[List[float]] = [[] for _ in range(concurrency)]
    errors: List[List[str]] = [[] for _ in range(concurrency)]

    def client(slot: int) -> None:
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port or 80, timeout=30)
        i = slot
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            body = bodies[i % len(bodies)]
            i += concurrency
            try:
                conn.request("POST", path, body=body, headers={"content-type": "application/json"})
                response = conn.getresponse()
                payload = response.read()
                ok = response.status == 200
                message = "" if ok else f"{response.status}: {payload[:200]!r}"
            except (OSError, http.client.HTTPException) as e:
                ok, message = False, repr(e)
                conn.close()
                conn = http.client.HTTPConnection(parsed.hostname, parsed.port or 80, timeout=30)
            t1 = time.perf_counter()
            if t0 >= start_at:
                if ok:
                    latencies[slot].append(t1 - t0)
                else:
                    errors[slot].append(message)
        conn.close()

    threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = np.sort(np.concatenate([np.asarray(x) for x in latencies])) * 1e3
    errs = [e for x in errors for e in x]
    out = {"concurrency": concurrency, "duration_s": duration, "requests": int(len(lat)),
           "throughput_rps": round(len(lat) / duration, 1), "errors": len(errs), "error_examples": errs[:5]}
    if len(lat):
        out.update({f"p{q}_ms": round(float(np.percentile(lat, q)), 2) for q in (50, 90, 99)})
        out["max_ms"] = round(float(lat[-1]), 2)
        out["mean_ms"] = round(float(lat.mean()), 2)
    return out


def _finish(result: Dict[str, Any], out: str) -> None:
    """Records the load average at the end and writes the result to `out` (if given)."""
    result["machine"]["load_avg_end"] = os.getloadavg()
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)


def cmd_run(args) -> None:
    users = _user_ids(args.workdir, args.users, args.seed)
    bodies = [json.dumps({"user_id": u, "k": args.k}).encode() for u in users]
    parsed = urllib.parse.urlparse(args.url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port or 80, timeout=30)
    conn.request("GET", "/v1/models")
    models = json.loads(conn.getresponse().read())
    conn.close()
    result: Dict[str, Any] = {
        "url": args.url, "endpoint": args.endpoint, "k": args.k, "users": len(users),
        "server": {k: models.get(k) for k in ("version", "models", "stages", "num_items", "index", "config",
                                             "batching")},
        "machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}, "levels": []}
    def batching() -> Dict[str, Any]:
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port or 80, timeout=30)
        conn.request("GET", "/v1/models")
        models = json.loads(conn.getresponse().read())
        conn.close()
        return {**(models.get("batching") or {}), "process": models.get("process")}

    for c in args.concurrency:
        before = batching()
        level = run_level(args.url, args.endpoint, bodies, c, args.duration, args.warmup)
        after = batching()
        # The server's batches during this level (warm-up included); with several server
        # processes the two reports may come from different ones: then none is given.
        if "batches" in after and after["process"] == before["process"]:
            batches, items = after["batches"] - before["batches"], after["items"] - before["items"]
            level["batches"] = batches
            level["mean_batch"] = round(items / batches, 2) if batches else 0.0
        level["load_avg_after"] = os.getloadavg()
        result["levels"].append(level)
        print(json.dumps(level), flush=True)
    _finish(result, args.out)


# -- batch cost ----------------------------------------------------------------------------
def cmd_batch_cost(args) -> None:
    """Milliseconds per query of `Cascade.answer` on batches of distinct users, in process."""
    sys.path.insert(0, REPO)
    from serving.cascade import Cascade

    cascade = Cascade.load(args.workdir)
    cascade.warm_up()
    users = _user_ids(args.workdir, max(args.batch_sizes) * args.repeats, args.seed)
    result: Dict[str, Any] = {"workdir": os.path.abspath(args.workdir), "stages": cascade.stages,
                              "num_items": cascade.index.num_items, "k": args.k,
                              "machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}, "batches": []}
    for size in args.batch_sizes:
        seconds, stages = [], []
        for r in range(args.repeats):
            queries = [cascade.prepare(u, k=args.k, timings=True)
                       for u in (users[(r * size + i) % len(users)] for i in range(size))]
            start = time.perf_counter()
            answers = cascade.answer(queries)
            seconds.append(time.perf_counter() - start)
            stages.append(answers[0]["timings_ms"])
        keys = [k for k in stages[0] if k not in ("user_features", "wait", "total")]
        row = {"batch_size": size, "ms_per_batch": round(1e3 * float(np.median(seconds)), 2),
               "ms_per_query": round(1e3 * float(np.median(seconds)) / size, 2),
               "stage_ms_per_batch": {k: round(float(np.median([t[k] for t in stages])), 2) for k in keys}}
        result["batches"].append(row)
        print(json.dumps(row), flush=True)
    _finish(result, args.out)


# -- prepare -------------------------------------------------------------------------------
def _grow_items(items, num_items: int, seed: int):
    """The item table plus synthetic rows drawn column-wise from it (ids ``x<n>``)."""
    import pandas as pd

    extra = num_items - len(items)
    if extra <= 0:
        return items.iloc[:num_items].reset_index(drop=True)
    rng = np.random.default_rng(seed)
    grown = {}
    for column in items.columns:
        if column == "item_id":
            grown[column] = [f"x{i}" for i in range(extra)]
        else:
            grown[column] = items[column].to_numpy()[rng.integers(0, len(items), extra)]
    return pd.concat([items, pd.DataFrame(grown)], ignore_index=True)


def _copy_rankers(workdir: str, version: int, src: str, src_version: int) -> List[str]:
    """Copies the source run's trained pre-ranker and ranker exports; returns what was copied."""
    from serving import exports

    made = []
    for model_name in (exports.PRERANKER, exports.RANKER):
        source_version = exports.stage_version(src, model_name, src_version)
        if source_version is None:
            print(f"prepare: {src} has no {model_name} export for version {src_version}; "
                  f"the cascade will skip that stage", file=sys.stderr)
            continue
        os.makedirs(exports.model_dir(workdir, model_name), exist_ok=True)
        shutil.copytree(exports.version_path(src, model_name, source_version),
                        exports.version_path(workdir, model_name, version))
        made.append(f"{model_name} (trained, copied from {src} version {source_version})")
    return made


def cmd_prepare(args) -> None:
    import pandas as pd

    from models.tf_compat import tf  # noqa: F401
    from pipeline import job
    from serving import exports
    from serving.index import IndexConfig, build_index, save_index

    src, dst = args.source, args.to
    version = exports.serving_version(src)
    if version is None:
        raise SystemExit(f"no exported version in {src}")
    if os.path.exists(dst):
        raise SystemExit(f"{dst} exists; remove it first")
    started = time.time()
    data_dir = os.path.join(dst, "data")
    shutil.copytree(os.path.join(src, "data"), data_dir, ignore=shutil.ignore_patterns("examples", "interactions"))
    items = _grow_items(pd.read_parquet(os.path.join(data_dir, "items.parquet")), args.num_items, args.seed)
    items.to_parquet(os.path.join(data_dir, "items.parquet"), index=False)
    for model in (exports.QUERY_TOWER, exports.ITEM_TOWER):
        shutil.copytree(exports.version_path(src, model, version), exports.version_path(dst, model, 1))
    t = time.time()
    ids, emb = job.item_embeddings(exports.version_path(dst, exports.ITEM_TOWER, 1), data_dir, batch_size=8192)
    embed_s = time.time() - t
    queries = job.tuning_queries(dst, 1)
    t = time.time()
    module, params = build_index(emb, ids, IndexConfig(), tuning_queries=queries)
    build_s = time.time() - t
    os.makedirs(exports.model_dir(dst, exports.INDEX), exist_ok=True)
    save_index(module, params, exports.version_path(dst, exports.INDEX, 1), item_tower_version="1",
               embedding_dim=emb.shape[1], num_items=len(ids))
    rankers = [] if args.no_rankers else _copy_rankers(dst, 1, src, version)
    summary = {"workdir": os.path.abspath(dst), "from": os.path.abspath(src), "from_version": version,
               "num_items": len(ids), "embedding_dim": int(emb.shape[1]), "embed_s": round(embed_s, 1),
               "index_build_s": round(build_s, 1),
               "index": {k: v for k, v in params.items() if k != "tuning"},
               "index_tuning_grid": params.get("tuning", {}).get("grid"), "rankers": rankers,
               "seconds": round(time.time() - started, 1)}
    with open(os.path.join(dst, "prepared.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="load a running service")
    r.add_argument("--url", default="http://127.0.0.1:8500")
    r.add_argument("--workdir", required=True, help="the served workdir (user ids are drawn from it)")
    r.add_argument("--endpoint", default="/v1/recommend", choices=("/v1/recommend", "/v1/retrieve"))
    r.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    r.add_argument("--duration", type=float, default=60.0, help="seconds per level (default: %(default)s)")
    r.add_argument("--warmup", type=float, default=3.0, help="seconds not measured at each level's start")
    r.add_argument("-k", type=int, default=10)
    r.add_argument("--users", type=int, default=2000, help="distinct users cycled through")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out")
    pr = sub.add_parser("prepare", help="a workdir with a larger item corpus")
    pr.add_argument("--from", dest="source", required=True)
    pr.add_argument("--to", required=True)
    pr.add_argument("--num-items", type=int, default=1_000_000)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--no-rankers", action="store_true", help="do not copy the pre-ranker and ranker")
    bc = sub.add_parser("batch-cost", help="the cascade's cost per query by batch size, in process")
    bc.add_argument("--workdir", required=True)
    bc.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    bc.add_argument("--repeats", type=int, default=30, help="batches timed per size (default: %(default)s)")
    bc.add_argument("-k", type=int, default=10)
    bc.add_argument("--seed", type=int, default=0)
    bc.add_argument("--out")
    args = p.parse_args()
    {"run": cmd_run, "prepare": cmd_prepare, "batch-cost": cmd_batch_cost}[args.command](args)


if __name__ == "__main__":
    main()
