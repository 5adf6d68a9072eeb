"""Maximum-inner-product indexes over item embeddings: ScaNN and exact brute force.

Both are saved as a SavedModel with one signature, ``search(queries [B, D] float32,
k int32) -> {"scores" [B, k], "item_ids" [B, k] string, "indices" [B, k] int32}``,
next to a ``manifest.json`` that binds the index to the item tower it was built
from (version, embedding dimension, number of items). A ScaNN index holds ScaNN
ops: it is saved with ``namespace_whitelist=["Scann"]`` and `load_index` imports
``scann`` before loading.

References:
  Guo et al., "Accelerating Large-Scale Inference with Anisotropic Vector
  Quantization", ICML 2020 (ScaNN).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from models.tf_compat import tf
from serving.index_config import INDEX_KINDS, MIN_SCANN_ITEMS, IndexConfig  # noqa: F401 (part of this module's API)

MANIFEST_FILE = "manifest.json"
SAVED_MODEL_DIR = "saved_model"

log = logging.getLogger("recfunnel.serving")


# Re-scoring depths tried by the tuner (each capped by the corpus size, at least k).
REORDER_CANDIDATES = (10, 25, 50, 100, 200, 500, 1000)
# Tried only when no depth above reaches the target: embeddings crowded together (e.g.
# many cold items sharing one id bucket) have score gaps below the quantization error,
# and only a deeper exact re-scoring separates them. Still far below N at 1M items.
DEEP_REORDER_CANDIDATES = (2000, 5000, 10000, 20000)
# When the target recall is out of reach, the tuner aims this far below the recall of
# searching every partition at the deepest re-scoring.
UNREACHABLE_TOLERANCE = 0.005
# Partitions searched as fractions of all partitions: the coarse grid of the tuner,
# refined by bisection between the last miss and the first hit.
_LEAF_FRACTIONS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)


class _BruteForceModule(tf.Module):
    def __init__(self, embeddings: np.ndarray, item_ids: Sequence[str]):
        super().__init__()
        self.embeddings = tf.Variable(embeddings, trainable=False, name="embeddings")
        self.item_ids = tf.Variable(np.asarray(item_ids, dtype=object).astype(bytes), trainable=False,
                                    name="item_ids")
        dim = embeddings.shape[1]
        self.search = tf.function(self._search, input_signature=[
            tf.TensorSpec([None, dim], tf.float32, name="queries"), tf.TensorSpec([], tf.int32, name="k")])

    def _search(self, queries, k):
        scores = tf.matmul(queries, self.embeddings, transpose_b=True)
        k = tf.minimum(k, tf.shape(self.embeddings)[0])
        top_scores, indices = tf.math.top_k(scores, k=k)
        return {"scores": top_scores, "indices": indices, "item_ids": tf.gather(self.item_ids, indices)}


class _ScannModule(tf.Module):
    """ScaNN search with the tuned depth; deeper queries search more.

    A query for k neighbours re-scores ``max(reorder, k)`` candidates exactly and
    searches at least enough partitions to hold about 2k points, so that a large k
    (the cascade's 1,000 candidates) is not cut short by the partitions searched.
    k-means can still leave the partitions nearest a query holding fewer than k points
    (ScaNN then pads the row with NaN scores): such rows alone are searched again with
    twice the partitions, until full or every partition is searched, so every query
    gets ``min(k, num_items)`` results and the other rows of the batch are unchanged.
    """

    def __init__(self, searcher, item_ids: Sequence[str], dim: int, num_items: int, leaves_to_search: int,
                 reorder: Optional[int] = None, num_leaves: Optional[int] = None):
        super().__init__()
        self.state = searcher.serialize_to_module()
        self.leaves_to_search = int(leaves_to_search)
        self.num_leaves = int(num_leaves or leaves_to_search)
        self.reorder = int(reorder or 0)
        self.item_ids = tf.Variable(np.asarray(item_ids, dtype=object).astype(bytes), trainable=False,
                                    name="item_ids")
        self.num_items = num_items
        self.search = tf.function(self._search, input_signature=[
            tf.TensorSpec([None, dim], tf.float32, name="queries"), tf.TensorSpec([], tf.int32, name="k")])

    def _search(self, queries, k):
        from scann import scann_ops

        searcher = scann_ops.searcher_from_module(self.state)
        k = tf.minimum(k, self.num_items)
        leaves = tf.minimum(self.num_leaves,
                            tf.maximum(self.leaves_to_search, (2 * k * self.num_leaves) // self.num_items + 1))

        def run(rows, leaves):
            return searcher.search_batched_parallel(
                rows, final_num_neighbors=k, pre_reorder_num_neighbors=tf.maximum(k, self.reorder),
                leaves_to_search=leaves)

        def short_rows(scores):
            return tf.where(tf.reduce_sum(tf.cast(tf.math.is_finite(scores), tf.int32), axis=1) < k)

        def any_short(leaves, indices, scores):
            return tf.logical_and(leaves < self.num_leaves, tf.size(short_rows(scores)) > 0)

        def widen(leaves, indices, scores):
            leaves = tf.minimum(self.num_leaves, 2 * leaves)
            rows = short_rows(scores)
            more_indices, more_scores = run(tf.gather_nd(queries, rows), leaves)
            return (leaves, tf.tensor_scatter_nd_update(indices, rows, more_indices),
                    tf.tensor_scatter_nd_update(scores, rows, more_scores))

        indices, scores = run(queries, leaves)
        _, indices, scores = tf.while_loop(any_short, widen, (leaves, indices, scores))
        return {"scores": scores, "indices": indices, "item_ids": tf.gather(self.item_ids, indices)}


def exact_top_k(queries: np.ndarray, embeddings: np.ndarray, k: int, block_size: Optional[int] = None):
    """Exact maximum-inner-product top-k, in blocks of queries (bounded memory).

    Args:
      queries: ``[Q, D]``.
      embeddings: ``[N, D]``.
      k: neighbours per query (capped by N).
      block_size: queries per ``[block_size, N]`` score block; None = about 16M
        scores per block (64 MB, cache- and memory-friendly at any N).

    Returns:
      ``(scores [Q, k] descending, indices [Q, k])``.
    """
    queries = np.asarray(queries, dtype=np.float32)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if block_size is None:
        block_size = max(1, min(1024, 2**24 // max(1, embeddings.shape[0])))
    if block_size < 1:
        raise ValueError(f"`block_size` should be positive. Received: block_size={block_size}")
    k = min(int(k), embeddings.shape[0])
    scores_out = np.empty((len(queries), k), np.float32)
    index_out = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), block_size):
        block = queries[start:start + block_size] @ embeddings.T
        top = np.argpartition(-block, k - 1, axis=1)[:, :k] if k < block.shape[1] else \
            np.tile(np.arange(block.shape[1]), (len(block), 1))
        top_scores = np.take_along_axis(block, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        scores_out[start:start + len(block)] = np.take_along_axis(top_scores, order, axis=1)
        index_out[start:start + len(block)] = np.take_along_axis(top, order, axis=1)
    return scores_out, index_out


def _recall_at(searcher, embeddings, queries, exact, k, leaves, reorder) -> float:
    """Recall@k of one (leaves, reorder) setting; ``reorder <= 0``: the build-time depth."""
    from models.metrics import recall_vs_exact

    idx, dist = searcher.search_batched(queries, final_num_neighbors=k,
                                        pre_reorder_num_neighbors=max(reorder, k) if reorder > 0 else None,
                                        leaves_to_search=leaves)
    idx = idx.numpy()
    true = np.einsum("qd,qkd->qk", queries, embeddings[idx])
    true[~np.isfinite(dist.numpy())] = -np.inf  # padding when the partitions hold fewer than k points
    return recall_vs_exact(-np.sort(-true, axis=1), exact, k)


def _fewest_leaves(recall_of, num_leaves: int, target_recall: float, upper: Optional[int] = None,
                   measured: Optional[Dict[int, float]] = None):
    """Smallest partition count reaching the target (coarse grid, then bisection).

    `recall_of(leaves)` is measured once per count (into `measured`, which may hold
    earlier measurements of the same setting). Recall grows with the partitions
    searched, up to noise, so the bisection assumes monotonicity.
    Returns ``(leaves or None when even `upper` misses, {leaves: recall})``.
    """
    upper = num_leaves if upper is None else min(upper, num_leaves)
    measured = {} if measured is None else measured

    def measure(leaves):
        if leaves not in measured:
            measured[leaves] = recall_of(leaves)
        return measured[leaves]

    grid = sorted({max(1, int(round(num_leaves * f))) for f in _LEAF_FRACTIONS if num_leaves * f <= upper} | {upper})
    miss, hit = 0, None
    for leaves in grid:
        if measure(leaves) >= target_recall:
            hit = leaves
            break
        miss = leaves
    if hit is None:
        return None, measured
    while hit - miss > 1:
        mid = (hit + miss) // 2
        if measure(mid) >= target_recall:
            hit = mid
        else:
            miss = mid
    return hit, measured


def _seconds_per_query(searcher, queries, k, settings, repeats: int = 3) -> List[float]:
    """Best-of-`repeats` search time per query of each (leaves, reorder) setting.

    The settings are timed in interleaved rounds, so a burst of load from other
    processes slows one round of every setting rather than all rounds of one.
    """
    import time

    best = [float("inf")] * len(settings)
    for _ in range(repeats):
        for i, (leaves, reorder) in enumerate(settings):
            start = time.perf_counter()
            searcher.search_batched(queries, final_num_neighbors=k, pre_reorder_num_neighbors=max(reorder, k),
                                    leaves_to_search=leaves)
            best[i] = min(best[i], time.perf_counter() - start)
    return [b / len(queries) for b in best]


def tune_leaves_to_search(searcher, embeddings: np.ndarray, queries: np.ndarray, num_leaves: int,
                          target_recall: float, k: int = 10, reorder: int = 0,
                          unreachable_tolerance: float = UNREACHABLE_TOLERANCE):
    """Smallest number of searched partitions reaching `target_recall` at `k`.

    Recall is measured against exact search by score (see
    `models.metrics.recall_vs_exact`), so ties cannot flip it. When even all
    partitions miss the target, the fewest reaching their recall minus
    `unreachable_tolerance` (searching them all would cost more for no more than that).
    Returns ``(leaves, curve, report)``: the chosen count, the (leaves, recall) curve
    measured up to it, ascending, and ``{"target_reached": bool}``; when false, also
    ``ceiling`` (the recall searching every partition at `reorder`) and ``tuned_for``.

    Args:
      searcher: a built ScaNN searcher (TensorFlow ops).
      embeddings: ``[N, D]`` the indexed vectors.
      queries: ``[Q, D]`` sample queries.
      num_leaves: partitions of the searcher.
      target_recall: recall@k against exact search to reach.
      k: the recall cut-off.
      reorder: candidates re-scored exactly (0 = the searcher's build-time depth).
    """
    embeddings = np.asarray(embeddings, np.float32)
    queries = np.asarray(queries, np.float32)
    k = min(k, embeddings.shape[0])
    exact, _ = exact_top_k(queries, embeddings, k)

    def recall_of(n):
        return _recall_at(searcher, embeddings, queries, exact, k, n, reorder)

    leaves, measured = _fewest_leaves(recall_of, num_leaves, target_recall)
    report: Dict[str, Any] = {"target_reached": leaves is not None}
    if leaves is None:  # out of reach: the fewest partitions within the tolerance of searching all
        ceiling = measured[num_leaves]
        leaves, measured = _fewest_leaves(recall_of, num_leaves, ceiling - unreachable_tolerance, measured=measured)
        report.update(ceiling=round(float(ceiling), 4), tuned_for=round(float(ceiling - unreachable_tolerance), 4))
        log.warning("index tuning: recall@%d %.4f is out of reach (%.4f searching all %d partitions); searching %d "
                    "partitions for %.4f", k, target_recall, ceiling, num_leaves, leaves, measured[leaves])
    return leaves, [(n, r) for n, r in sorted(measured.items()) if n <= leaves], report


def tune_search(searcher, embeddings: np.ndarray, queries: np.ndarray, num_leaves: int, target_recall: float,
                k: int = 10, reorder_candidates: Sequence[int] = REORDER_CANDIDATES, repeats: int = 3,
                deep_reorder_candidates: Sequence[int] = DEEP_REORDER_CANDIDATES,
                unreachable_tolerance: float = UNREACHABLE_TOLERANCE):
    """Partitions searched and re-scoring depth: the fastest pair reaching the target.

    For each re-scoring depth r (ascending) the fewest partitions l(r) reaching
    `target_recall` at `k` are found (`tune_leaves_to_search`'s search; l(r) cannot
    grow with r, so each search is bounded by the previous l). Each pair needing
    fewer partitions than every shallower depth (the others are dominated) is then
    timed on the sample queries (single thread, best of `repeats` interleaved rounds)
    and the fastest is kept. When no depth reaches the target, the deeper
    `deep_reorder_candidates` are tried the same way. When none of those does either,
    the target is out of this index's reach: the ceiling is the recall of searching all
    partitions at the deepest re-scoring, and the same search runs for the ceiling
    minus `unreachable_tolerance` over every depth (the recall curve is flat near the
    ceiling, so a full search would cost several times more for almost nothing).

    Returns:
      ``(leaves, reorder, report)``; the report holds ``curve`` (leaves, recall) at
      the chosen depth up to the chosen leaves, ``grid``: one
      ``[leaves, reorder, recall, microseconds per query]`` row per timed pair, and
      ``target_reached``; when false, ``ceiling`` and ``tuned_for`` as well.
    """
    embeddings = np.asarray(embeddings, np.float32)
    queries = np.asarray(queries, np.float32)
    n = embeddings.shape[0]
    k = min(k, n)
    exact, _ = exact_top_k(queries, embeddings, k)
    depths = sorted({min(n, max(k, int(r))) for r in reorder_candidates})
    if not depths:
        raise ValueError(f"`reorder_candidates` should not be empty. Received: {reorder_candidates!r}")
    deep = sorted({min(n, int(r)) for r in deep_reorder_candidates} - set(depths))
    deep = [d for d in deep if d > depths[-1]]
    curves: Dict[int, Dict[int, float]] = {}

    def pairs(target: float, groups) -> List[Tuple[int, int, float]]:
        """Per depth (group after group, until one reaches `target`), the fewest
        partitions reaching it; only the pairs no shallower depth dominates."""
        upper, found = num_leaves, []
        for group in groups:
            if found:
                break
            for depth in group:
                leaves, _ = _fewest_leaves(
                    lambda l, d=depth: _recall_at(searcher, embeddings, queries, exact, k, l, d), num_leaves,
                    target, upper, measured=curves.setdefault(depth, {}))
                # A deeper re-scoring that needs as many partitions as a shallower one is slower: skip it.
                if leaves is not None and (not found or leaves < found[-1][0]):
                    found.append((leaves, depth, curves[depth][leaves]))
                    upper = leaves
        return found

    found = pairs(target_recall, (depths, deep))
    reached = bool(found)
    if not found:
        # Out of reach: aim for what searching everything at the deepest re-scoring gets,
        # less the tolerance, rather than pay for a full search.
        deepest = (deep or depths)[-1]
        if num_leaves not in curves.setdefault(deepest, {}):
            curves[deepest][num_leaves] = _recall_at(searcher, embeddings, queries, exact, k, num_leaves, deepest)
        ceiling = curves[deepest][num_leaves]
        found = pairs(ceiling - unreachable_tolerance, (depths + deep,))
    seconds = _seconds_per_query(searcher, queries, k, [(leaves, depth) for leaves, depth, _ in found], repeats)
    grid = [[leaves, depth, round(float(recall), 4), round(1e6 * s, 2)]
            for (leaves, depth, recall), s in zip(found, seconds)]
    leaves, depth = min(grid, key=lambda row: (row[3], row[0], row[1]))[:2]
    curve = [[int(a), round(float(b), 4)] for a, b in sorted(curves[depth].items()) if a <= leaves]
    report = {"curve": curve, "grid": grid, "target_reached": reached}
    if not reached:
        report.update(ceiling=round(float(ceiling), 4), tuned_for=round(float(ceiling - unreachable_tolerance), 4))
        log.warning("index tuning: recall@%d %.4f is out of reach (%.4f searching all %d partitions, re-scoring "
                    "%d); searching %d partitions, re-scoring %d, for %.4f", k, target_recall, ceiling, num_leaves,
                    deepest, leaves, depth, curves[depth][leaves])
    return leaves, depth, report


def build_index(embeddings: np.ndarray, item_ids: Sequence[str], config: IndexConfig = IndexConfig(),
                tuning_queries: Optional[np.ndarray] = None):
    """Builds an index module (not yet saved) and its resolved parameters.

    Args:
      embeddings: ``[N, D]`` item embeddings.
      item_ids: ``N`` ids, returned by searches.
      config: the index settings.
      tuning_queries: ``[Q, D]`` sample queries; with ``leaves_to_search=0`` the
        number of searched partitions (and with ``reorder=0`` and `tune_reorder` the
        re-scoring depth) is tuned on them to reach the target recall; ``params["tuning"]``
        then reports ``target_reached`` (when false, ``ceiling`` and ``tuned_for`` too).

    A corpus of fewer than `MIN_SCANN_ITEMS` items gets a brute-force index whatever the
    kind (logged, and said in ``params["brute_force_reason"]``).
    """
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"`embeddings` should be [num_items, dim]. Received shape {embeddings.shape}")
    if len(item_ids) != embeddings.shape[0]:
        raise ValueError(f"`item_ids` has {len(item_ids)} entries for {embeddings.shape[0]} embeddings")
    if not np.all(np.isfinite(embeddings)):
        raise ValueError("`embeddings` contain NaN or infinite values; the item tower diverged")
    params = config.resolved(embeddings.shape[0])
    if "brute_force_reason" in params:
        log.warning("index: %s", params["brute_force_reason"])
    if params["kind"] == "brute_force":
        return _BruteForceModule(embeddings, item_ids), params
    from scann import scann_ops

    builder = scann_ops.builder(embeddings, params["k_max"], "dot_product")
    builder = builder.tree(num_leaves=params["num_leaves"], num_leaves_to_search=params["leaves_to_search"],
                           training_sample_size=params["training_sample_size"])
    builder = builder.score_ah(params["dimensions_per_block"],
                               anisotropic_quantization_threshold=params["anisotropic_quantization_threshold"])
    builder = builder.reorder(params["reorder"])
    searcher = builder.build()
    if config.leaves_to_search == 0 and tuning_queries is not None and len(tuning_queries):
        queries = np.ascontiguousarray(tuning_queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != embeddings.shape[1]:
            raise ValueError(f"`tuning_queries` should be [Q, {embeddings.shape[1]}]. Received {queries.shape}")
        tuning = {"queries": int(len(queries)), "target_recall@10": config.target_recall}
        if config.reorder == 0 and config.tune_reorder:
            leaves, reorder, report = tune_search(searcher, embeddings, queries, params["num_leaves"],
                                                  config.target_recall)
            params["reorder"] = int(reorder)
            tuning.update(report)
        else:
            leaves, curve, report = tune_leaves_to_search(searcher, embeddings, queries, params["num_leaves"],
                                                          config.target_recall, reorder=params["reorder"])
            tuning["curve"] = [[int(a), round(float(b), 4)] for a, b in curve]
            tuning.update(report)
        params["leaves_to_search"] = int(leaves)
        params["tuning"] = tuning
    return _ScannModule(searcher, item_ids, embeddings.shape[1], embeddings.shape[0],
                        params["leaves_to_search"], reorder=params["reorder"],
                        num_leaves=params["num_leaves"]), params


def save_index(module, params: Dict[str, Any], path: str, *, item_tower_version: Optional[str],
               embedding_dim: int, num_items: int) -> None:
    """Writes the SavedModel and the manifest to `path` (a temp dir, then renamed)."""
    tmp = path.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        options = tf.saved_model.SaveOptions(namespace_whitelist=["Scann"])
        tf.saved_model.save(module, os.path.join(tmp, SAVED_MODEL_DIR), signatures={"search": module.search},
                            options=options)
        manifest = {"format": 1, "params": params, "item_tower_version": item_tower_version,
                    "embedding_dim": int(embedding_dim), "num_items": int(num_items)}
        with open(os.path.join(tmp, MANIFEST_FILE), "w") as f:
            json.dump(manifest, f, indent=2)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class LoadedIndex:
    """A loaded index: `search(queries, k)` returns numpy (scores, item_ids)."""

    def __init__(self, path: str, manifest: Dict[str, Any], module):
        self.path, self.manifest, self._module = path, manifest, module
        self._search = module.signatures["search"]

    @property
    def kind(self) -> str:
        return self.manifest["params"]["kind"]

    @property
    def num_items(self) -> int:
        return int(self.manifest["num_items"])

    @property
    def embedding_dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    def item_ids(self) -> np.ndarray:
        """``[N]`` the indexed item ids (str), in the order of the returned ``indices``."""
        return self._module.item_ids.numpy().astype(str)

    def item_ids_at(self, indices: np.ndarray):
        """``[N]`` string tensor of the item ids at `indices` (positions in `item_ids()`),
        gathered from the index's own id table."""
        return tf.gather(self._module.item_ids, np.asarray(indices))

    def _run(self, queries: np.ndarray, k: int):
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.manifest["embedding_dim"]:
            raise ValueError(f"queries should be [batch, {self.manifest['embedding_dim']}]. "
                             f"Received shape {queries.shape}")
        if k < 1:
            raise ValueError(f"`k` should be positive. Received: k={k}")
        return self._search(queries=tf.constant(queries), k=tf.constant(int(k), tf.int32))

    def search(self, queries: np.ndarray, k: int):
        """``(scores [B, k'], item_ids [B, k'])`` with k' = min(k, N) (ScaNN may return fewer)."""
        out = self._run(queries, k)
        ids = out["item_ids"].numpy().astype(str)
        return out["scores"].numpy(), ids

    def search_indices(self, queries: np.ndarray, k: int):
        """``(scores [B, k'], indices [B, k'])``: positions in `item_ids()`."""
        out = self._run(queries, k)
        return out["scores"].numpy(), out["indices"].numpy()


def load_index(path: str, expected_item_tower_version: Optional[str] = None,
               expected_embedding_dim: Optional[int] = None) -> LoadedIndex:
    """Loads an index; refuses one built for another item tower or dimension."""
    manifest_path = os.path.join(path, MANIFEST_FILE)
    if not os.path.exists(manifest_path):
        raise FileNotFoundError(f"No index manifest at {manifest_path}")
    with open(manifest_path) as f:
        manifest = json.load(f)
    if expected_item_tower_version is not None and manifest.get("item_tower_version") != expected_item_tower_version:
        raise ValueError(
            f"index {path} was built from item tower version {manifest.get('item_tower_version')!r}, "
            f"not {expected_item_tower_version!r}; rebuild the index or load the matching tower")
    if expected_embedding_dim is not None and manifest["embedding_dim"] != expected_embedding_dim:
        raise ValueError(f"index {path} holds {manifest['embedding_dim']}-dim embeddings, "
                         f"the query tower produces {expected_embedding_dim}")
    if manifest["params"]["kind"] == "scann":
        import scann  # noqa: F401  (registers the ScaNN ops before loading)
    module = tf.saved_model.load(os.path.join(path, SAVED_MODEL_DIR))
    return LoadedIndex(path, manifest, module)
