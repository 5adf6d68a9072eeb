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

import dataclasses
import json
import math
import os
import shutil
from typing import Any, Dict, Optional, Sequence

import numpy as np

from models.tf_compat import tf

MANIFEST_FILE = "manifest.json"
SAVED_MODEL_DIR = "saved_model"
INDEX_KINDS = ("auto", "scann", "brute_force")


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """How the item index is built.

    Attributes:
      kind: ``scann``, ``brute_force`` or ``auto`` (brute force up to
        `brute_force_max_items` items, ScaNN above).
      brute_force_max_items: the corpus size up to which ``auto`` stays exact.
      num_leaves: ScaNN partitions; 0 = about sqrt(N).
      leaves_to_search: partitions searched per query; 0 = tuned at build time on
        sample queries to reach `target_recall` against exact search (a third of
        the partitions when no sample queries are given).
      target_recall: recall@10 against exact search that tuning aims for.
      dimensions_per_block: asymmetric-hashing block size.
      anisotropic_quantization_threshold: ScaNN's η for score-aware quantization.
      reorder: candidates re-scored exactly; 0 = max(100, 10·k_max), capped by N.
      k_max: the largest k a query may ask for (ScaNN's default neighbours).
      training_sample_size: points used to train the partitioner; 0 = all.
    """

    kind: str = "auto"
    brute_force_max_items: int = 1000
    num_leaves: int = 0
    leaves_to_search: int = 0
    dimensions_per_block: int = 2
    anisotropic_quantization_threshold: float = 0.2
    reorder: int = 0
    k_max: int = 100
    training_sample_size: int = 0
    target_recall: float = 0.97

    def __post_init__(self):
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"`index.kind` should be one of {INDEX_KINDS}. Received: kind={self.kind!r}")
        for name in ("brute_force_max_items", "num_leaves", "leaves_to_search", "reorder", "training_sample_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"`index.{name}` should be >= 0. Received: {name}={getattr(self, name)}")
        if self.k_max < 1:
            raise ValueError(f"`index.k_max` should be >= 1. Received: k_max={self.k_max}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"`index.target_recall` should be in (0, 1]. Received: {self.target_recall}")
        if self.dimensions_per_block < 1:
            raise ValueError(f"`index.dimensions_per_block` should be >= 1. Received: {self.dimensions_per_block}")

    def resolved(self, num_items: int) -> Dict[str, Any]:
        """The concrete parameters for a corpus of `num_items` (side-effect free)."""
        if num_items < 1:
            raise ValueError(f"cannot index an empty corpus. Received: num_items={num_items}")
        kind = self.kind
        if kind == "auto":
            kind = "brute_force" if num_items <= self.brute_force_max_items else "scann"
        out: Dict[str, Any] = {"kind": kind, "k_max": min(self.k_max, num_items)}
        if kind == "scann":
            leaves = self.num_leaves or max(2, int(round(math.sqrt(num_items))))
            leaves = min(leaves, num_items)
            search = self.leaves_to_search or max(10, leaves // 3)
            out.update(
                num_leaves=leaves, leaves_to_search=min(search, leaves),
                dimensions_per_block=self.dimensions_per_block,
                anisotropic_quantization_threshold=self.anisotropic_quantization_threshold,
                reorder=min(num_items, self.reorder or max(100, 10 * out["k_max"])),
                training_sample_size=min(num_items, self.training_sample_size or num_items),
            )
        return out


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
    def __init__(self, searcher, item_ids: Sequence[str], dim: int, num_items: int, leaves_to_search: int):
        super().__init__()
        self.state = searcher.serialize_to_module()
        self.leaves_to_search = int(leaves_to_search)
        self.item_ids = tf.Variable(np.asarray(item_ids, dtype=object).astype(bytes), trainable=False,
                                    name="item_ids")
        self.num_items = num_items
        self.search = tf.function(self._search, input_signature=[
            tf.TensorSpec([None, dim], tf.float32, name="queries"), tf.TensorSpec([], tf.int32, name="k")])

    def _search(self, queries, k):
        from scann import scann_ops

        searcher = scann_ops.searcher_from_module(self.state)
        k = tf.minimum(k, self.num_items)
        indices, scores = searcher.search_batched_parallel(queries, final_num_neighbors=k,
                                                           leaves_to_search=self.leaves_to_search)
        return {"scores": scores, "indices": indices, "item_ids": tf.gather(self.item_ids, indices)}


def tune_leaves_to_search(searcher, embeddings: np.ndarray, queries: np.ndarray, num_leaves: int,
                          target_recall: float, k: int = 10):
    """Smallest number of searched partitions reaching `target_recall` at `k`.

    Recall is measured against exact search by score (see
    `models.metrics.recall_vs_exact`), so ties cannot flip it. Returns the chosen
    count and the (leaves, recall) curve that was measured.
    """
    from models.metrics import recall_vs_exact

    k = min(k, embeddings.shape[0])
    exact = -np.sort(-(queries @ embeddings.T), axis=1)[:, :k]
    candidates = sorted({max(1, int(round(num_leaves * f))) for f in
                         (0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)})
    curve = []
    for leaves in candidates:
        idx, _ = searcher.search_batched(queries, final_num_neighbors=k, leaves_to_search=leaves)
        idx = idx.numpy()
        true = np.einsum("qd,qkd->qk", queries, embeddings[idx])
        recall = recall_vs_exact(-np.sort(-true, axis=1), exact, k)
        curve.append((leaves, recall))
        if recall >= target_recall:
            return leaves, curve
    return num_leaves, curve


def build_index(embeddings: np.ndarray, item_ids: Sequence[str], config: IndexConfig = IndexConfig(),
                tuning_queries: Optional[np.ndarray] = None):
    """Builds an index module (not yet saved) and its resolved parameters.

    Args:
      embeddings: ``[N, D]`` item embeddings.
      item_ids: ``N`` ids, returned by searches.
      config: the index settings.
      tuning_queries: ``[Q, D]`` sample queries; with ``leaves_to_search=0`` the
        number of searched partitions is tuned on them to reach the target recall.
    """
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2:
        raise ValueError(f"`embeddings` should be [num_items, dim]. Received shape {embeddings.shape}")
    if len(item_ids) != embeddings.shape[0]:
        raise ValueError(f"`item_ids` has {len(item_ids)} entries for {embeddings.shape[0]} embeddings")
    if not np.all(np.isfinite(embeddings)):
        raise ValueError("`embeddings` contain NaN or infinite values; the item tower diverged")
    params = config.resolved(embeddings.shape[0])
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
        leaves, curve = tune_leaves_to_search(searcher, embeddings, queries, params["num_leaves"],
                                              config.target_recall)
        params["leaves_to_search"] = leaves
        params["tuning"] = {"queries": int(len(queries)), "target_recall@10": config.target_recall,
                            "curve": [[int(a), round(float(b), 4)] for a, b in curve]}
    return _ScannModule(searcher, item_ids, embeddings.shape[1], embeddings.shape[0],
                        params["leaves_to_search"]), params


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

    def search(self, queries: np.ndarray, k: int):
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.manifest["embedding_dim"]:
            raise ValueError(f"queries should be [batch, {self.manifest['embedding_dim']}]. "
                             f"Received shape {queries.shape}")
        if k < 1:
            raise ValueError(f"`k` should be positive. Received: k={k}")
        out = self._search(queries=tf.constant(queries), k=tf.constant(int(k), tf.int32))
        ids = out["item_ids"].numpy().astype(str)
        return out["scores"].numpy(), ids


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
