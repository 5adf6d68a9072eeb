"""Maximum-inner-product search: recall@10 against queries/s for ScaNN and the alternatives.

    python benchmarks/index.py --sizes 100000 1000000 --out index.json [--plot index.png]
        [--dim 64] [--queries 10000] [--threads 2] [--workdir W] [--methods ...]

One run builds every method on the same 64-dim L2-normalised clustered vectors for
each corpus size (and, with --workdir, on the item tower's embeddings of a workdir, with
that workdir's users as queries) and measures, for each query-time setting:

* recall@10 against exact search, by score (`models.metrics.recall_vs_exact`: an
  item counts when its true score reaches the exact 10th score, so ties cannot flip it);
* queries/s over all queries in one batch, with `--threads` threads, best of 3 runs
  (1 run for the exact searches);
* build time, serialized index size and the process RSS growth during the build.

Methods:

* ``exact-faiss``: faiss IndexFlatIP (BLAS matmul with a fused top-k heap);
* ``exact-blocked``: `serving.index.exact_top_k` (numpy blocked matmul + argpartition);
* ``scann-auto``: `serving.index.build_index` as the job builds it (partitions ≈ √N,
  searched partitions and re-scoring depth tuned on 1,000 separate sample queries to
  the target recall; default target 0.97, and 0.95), searched through its SavedModel
  module as serving does;
* ``scann``: hand-picked ScaNN configurations (partitions, searched, AH, re-scoring);
* ``faiss-hnsw``: IndexHNSWFlat (M=32, efConstruction=64), efSearch swept;
* ``faiss-ivfpq``: IVF (4·√N lists) + PQ (16 × 8 bits) with exact re-ranking of 100
  candidates (IndexRefineFlat), nprobe swept;
* ``hnswlib``: M=32, ef_construction=100, ef swept.

The JSON holds every measurement, the machine (CPU count, load average before/after)
and a summary per size: the fastest setting of each method reaching recall@10 ≥ 0.95.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

K = 10
METHODS = ("exact-faiss", "exact-blocked", "scann-auto", "scann", "faiss-hnsw", "faiss-ivfpq", "hnswlib")


def clustered_vectors(n: int, dim: int, num_clusters: int, spread: float, seed: int,
                      centers_seed: int = 1234) -> np.ndarray:
    """``[n, dim]`` unit vectors: a mixture of `num_clusters` Gaussian blobs.

    Centers are fixed by `centers_seed` (so corpus and queries share them); a point
    is its center (unit norm) plus `spread`/√dim·N(0, I) noise, then L2-normalised.
    Cluster sizes are Zipf-like (a few large clusters, many small ones).
    """
    centers = np.random.default_rng(centers_seed).normal(size=(num_clusters, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_clusters + 1) ** 0.5
    which = rng.choice(num_clusters, size=n, p=weights / weights.sum())
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 200_000):  # bounded temporaries at 1M
        w = which[start:start + 200_000]
        x = centers[w] + spread / np.sqrt(dim) * rng.normal(size=(len(w), dim))
        out[start:start + len(w)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def recall_at_k(queries, db, returned, exact_scores) -> float:
    from models.metrics import recall_vs_exact

    returned = np.asarray(returned)
    valid = (returned >= 0) & (returned < len(db))
    true = np.einsum("qd,qkd->qk", queries, db[np.where(valid, returned, 0)])
    true[~valid] = -np.inf
    return recall_vs_exact(-np.sort(-true, axis=1), exact_scores, K)


def best_time(fn: Callable[[], Any], repeats: int = 3):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


class Bench:
    def __init__(self, db, queries, tuning, exact_scores, threads, label):
        self.db, self.queries, self.tuning, self.exact, self.threads = db, queries, tuning, exact_scores, threads
        self.label = label
        self.rows: List[Dict[str, Any]] = []

    def measure(self, method, params, search, build_s, index_bytes, rss_delta, repeats=3):
        seconds, ids = best_time(search, repeats)
        row = {"data": self.label, "n": len(self.db), "method": method, "params": params,
               "qps": round(len(self.queries) / seconds, 1),
               "recall@10": round(recall_at_k(self.queries, self.db, ids, self.exact), 4),
               "build_s": round(build_s, 2), "index_mb": round(index_bytes / 2**20, 1),
               "rss_delta_mb": round(rss_delta, 1)}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    # -- methods -------------------------------------------------------------------------
    def exact_faiss(self):
        import faiss

        t, r0 = time.perf_counter(), rss_mb()
        index = faiss.IndexFlatIP(self.db.shape[1])
        index.add(self.db)
        build, grown = time.perf_counter() - t, rss_mb() - r0
        self.measure("exact-faiss", {}, lambda: index.search(self.queries, K)[1], build, self.db.nbytes, grown,
                     repeats=1)

    def exact_blocked(self):
        from serving.index import exact_top_k

        block = max(1, min(1024, 2**24 // len(self.db)))  # exact_top_k's default
        self.measure("exact-blocked", {"block_size": block},
                     lambda: exact_top_k(self.queries, self.db, K)[1], 0.0, self.db.nbytes, 0.0, repeats=1)

    def scann_auto(self, target_recall):
        from models.tf_compat import tf
        from serving.index import IndexConfig, build_index, save_index

        ids = [str(i) for i in range(len(self.db))]
        t, r0 = time.perf_counter(), rss_mb()
        module, params = build_index(self.db, ids, IndexConfig(kind="scann", target_recall=target_recall),
                                     tuning_queries=self.tuning)
        build, grown = time.perf_counter() - t, rss_mb() - r0
        tmp = tempfile.mkdtemp(prefix="bench-scann-")
        try:
            save_index(module, params, os.path.join(tmp, "index"), item_tower_version="0",
                       embedding_dim=self.db.shape[1], num_items=len(self.db))
            size = dir_bytes(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        q = tf.constant(self.queries)
        k = tf.constant(K, tf.int32)
        shown = {key: params[key] for key in ("num_leaves", "leaves_to_search", "reorder", "dimensions_per_block")}
        shown["target_recall"] = target_recall
        shown["tuning_grid"] = params.get("tuning", {}).get("grid")
        self.measure("scann-auto", shown, lambda: module.search(q, k)["indices"].numpy(), build, size, grown)
        module = None  # free it before the next method is built

    def scann_manual(self, num_leaves, settings):
        import scann

        t, r0 = time.perf_counter(), rss_mb()
        searcher = (scann.scann_ops_pybind.builder(self.db, K, "dot_product")
                    .tree(num_leaves=num_leaves, num_leaves_to_search=settings[0][0],
                          training_sample_size=min(len(self.db), 250_000))
                    .score_ah(2, anisotropic_quantization_threshold=0.2).reorder(100).build())
        build, grown = time.perf_counter() - t, rss_mb() - r0
        tmp = tempfile.mkdtemp(prefix="bench-scann-")
        try:
            searcher.serialize(tmp)
            size = dir_bytes(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for leaves, reorder in settings:
            self.measure("scann", {"num_leaves": num_leaves, "leaves_to_search": leaves, "reorder": reorder},
                         lambda: searcher.search_batched_parallel(self.queries, final_num_neighbors=K,
                                                                  pre_reorder_num_neighbors=reorder,
                                                                  leaves_to_search=leaves)[0],
                         build, size, grown)
        searcher = None

    def faiss_hnsw(self, efs):
        import faiss

        t, r0 = time.perf_counter(), rss_mb()
        index = faiss.IndexHNSWFlat(self.db.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 64
        index.add(self.db)
        build, grown = time.perf_counter() - t, rss_mb() - r0
        size = faiss.serialize_index(index).nbytes
        for ef in efs:
            index.hnsw.efSearch = ef
            self.measure("faiss-hnsw", {"M": 32, "efConstruction": 64, "efSearch": ef},
                         lambda: index.search(self.queries, K)[1], build, size, grown)
        index = None

    def faiss_ivfpq(self, nprobes):
        import faiss

        n, d = self.db.shape
        nlist = int(4 * np.sqrt(n))
        t, r0 = time.perf_counter(), rss_mb()
        quantizer = faiss.IndexFlatIP(d)
        ivfpq = faiss.IndexIVFPQ(quantizer, d, nlist, 16, 8, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        train = self.db[rng.choice(n, min(n, 100 * nlist), replace=False)]
        ivfpq.train(train)
        index = faiss.IndexRefineFlat(ivfpq)  # adding through it fills both the PQ codes and the flat copy
        index.add(self.db)
        index.k_factor = 10  # 100 candidates re-ranked exactly
        build, grown = time.perf_counter() - t, rss_mb() - r0
        size = faiss.serialize_index(index).nbytes
        for nprobe in nprobes:
            ivfpq.nprobe = nprobe
            self.measure("faiss-ivfpq", {"nlist": nlist, "m": 16, "nbits": 8, "refine": 100, "nprobe": nprobe},
                         lambda: index.search(self.queries, K)[1], build, size, grown)
        index = ivfpq = quantizer = None

    def hnswlib(self, efs):
        import hnswlib

        n, d = self.db.shape
        t, r0 = time.perf_counter(), rss_mb()
        index = hnswlib.Index(space="ip", dim=d)
        index.init_index(max_elements=n, M=32, ef_construction=100, random_seed=0)
        index.add_items(self.db, np.arange(n), num_threads=self.threads)
        build, grown = time.perf_counter() - t, rss_mb() - r0
        size = index.index_file_size()
        for ef in efs:
            index.set_ef(ef)
            self.measure("hnswlib", {"M": 32, "ef_construction": 100, "ef": ef},
                         lambda: index.knn_query(self.queries, k=K, num_threads=self.threads)[0].astype(np.int64),
                         build, size, grown)
        index = None


def run_one(label, db, queries, tuning, methods, threads) -> List[Dict[str, Any]]:
    import faiss

    faiss.omp_set_num_threads(threads)
    exact_index = faiss.IndexFlatIP(db.shape[1])
    exact_index.add(db)
    exact_scores, _ = exact_index.search(queries, K)
    del exact_index
    bench = Bench(db, queries, tuning, exact_scores, threads, label)
    n = len(db)
    sqrt_n = int(round(np.sqrt(n)))
    if "exact-faiss" in methods:
        bench.exact_faiss()
    if "exact-blocked" in methods:
        bench.exact_blocked()
    if "scann-auto" in methods:
        for target in (0.97, 0.95):
            bench.scann_auto(target)
            gc.collect()
    if "scann" in methods:
        for leaves, settings in ((2 * sqrt_n, [(max(1, int(2 * sqrt_n * f)), r) for f, r in
                                              ((0.01, 100), (0.025, 100), (0.05, 100), (0.025, 200))]),
                                 (sqrt_n, [(max(1, int(sqrt_n * f)), r) for f, r in
                                           ((0.02, 100), (0.04, 100), (0.08, 100))])):
            bench.scann_manual(leaves, settings)
            gc.collect()
    if "faiss-hnsw" in methods:
        bench.faiss_hnsw((16, 32, 64, 128))
        gc.collect()
    if "faiss-ivfpq" in methods:
        bench.faiss_ivfpq((8, 16, 32, 64))
        gc.collect()
    if "hnswlib" in methods:
        bench.hnswlib((16, 32, 64, 128))
        gc.collect()
    return bench.rows


def summarize(rows, min_recall=0.95) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for label in dict.fromkeys(r["data"] for r in rows):
        best: Dict[str, Any] = {}
        for r in rows:
            if r["data"] != label or r["recall@10"] < min_recall:
                continue
            key = r["method"] if r["method"] != "scann-auto" else f"scann-auto@{r['params']['target_recall']}"
            if key not in best or r["qps"] > best[key]["qps"]:
                best[key] = {"qps": r["qps"], "recall@10": r["recall@10"], "params": {
                    k: v for k, v in r["params"].items() if k != "tuning_grid"}}
        exact = max((v["qps"] for k, v in best.items() if k.startswith("exact")), default=None)
        graphs = max((best[k]["qps"] for k in ("faiss-hnsw", "hnswlib") if k in best), default=None)
        for key, v in best.items():
            if exact:
                v["speedup_vs_exact"] = round(v["qps"] / exact, 1)
            if graphs:
                v["vs_best_hnsw"] = round(v["qps"] / graphs, 2)
        out[label] = best
    return out


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["data"] for r in rows))
    fig, axes = plt.subplots(1, len(labels), figsize=(6.5 * len(labels), 4.8), squeeze=False)
    markers = dict(zip(METHODS, "os*^vDx"))
    for ax, label in zip(axes[0], labels):
        for method in METHODS:
            pts = sorted((r["recall@10"], r["qps"]) for r in rows if r["data"] == label and r["method"] == method)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[method],
                        linestyle="-" if len(pts) > 1 else "", label=method)
        ax.set_yscale("log")
        ax.axvline(0.95, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("recall@10 vs exact")
        ax.set_ylabel("queries / s (batched)")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def workdir_vectors(workdir: str, num_queries: int):
    """Item-tower embeddings of the served version and query embeddings of its users."""
    from pipeline import job
    from serving import exports

    version = exports.serving_version(workdir)
    ids, emb = job.item_embeddings(exports.version_path(workdir, exports.ITEM_TOWER, version),
                                   os.path.join(workdir, "data"))
    queries = job.tuning_queries(workdir, version, num_users=num_queries + 1000, seed=1)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(queries))
    return emb.astype(np.float32), queries[order[:-1000]], queries[order[-1000:]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000],
                   help="clustered corpus sizes (none: only --workdir)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--clusters", type=int, default=0, help="mixture components (default: √N)")
    p.add_argument("--spread", type=float, default=1.0, help="noise norm relative to the unit centers")
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--workdir", help="also benchmark a workdir's item-tower embeddings")
    p.add_argument("--out", required=True)
    p.add_argument("--plot", help="PNG of recall@10 against queries/s")
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    meta = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version(), "load_avg_start": os.getloadavg()},
            "threads": args.threads, "k": K, "queries": args.queries, "dim": args.dim, "spread": args.spread}
    rows: List[Dict[str, Any]] = []
    start = time.time()
    for n in args.sizes:
        clusters = args.clusters or int(np.sqrt(n))
        db = clustered_vectors(n, args.dim, clusters, args.spread, seed=1)
        queries = clustered_vectors(args.queries, args.dim, clusters, args.spread, seed=2)
        tuning = clustered_vectors(1000, args.dim, clusters, args.spread, seed=3)
        label = f"clustered {n:,} x {args.dim} ({clusters} clusters)"
        print(f"== {label}", flush=True)
        rows += run_one(label, db, queries, tuning, args.methods, args.threads)
        del db
        gc.collect()
    if args.workdir:
        db, queries, tuning = workdir_vectors(args.workdir, min(args.queries, 5000))
        label = f"item tower {len(db):,} x {db.shape[1]} ({os.path.basename(os.path.abspath(args.workdir))})"
        print(f"== {label}", flush=True)
        rows += run_one(label, db, queries, tuning, args.methods, args.threads)
    meta["machine"]["load_avg_end"] = os.getloadavg()
    meta["wall_seconds"] = round(time.time() - start, 1)
    out = {**meta, "results": rows, "summary": summarize(rows)}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    if args.plot:
        plot(rows, args.plot)
    print(json.dumps(out["summary"], indent=2))


if __name__ == "__main__":
    main()
