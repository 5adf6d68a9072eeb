"""Offline evaluation of retrieval over the full corpus: exact, through the index, and a baseline.

For every test user (optionally a seeded sample): score every item with the
exported towers, remove the user's training items, and compare the top K with the
user's test positives (Recall@K, NDCG@K, see `models.metrics`). The same is done
through the exported index, whose agreement with exact search is also reported
(`index.recall_vs_exact@K`, by score), and for a most-popular baseline. Exact
metrics are also given on the tail (`retrieval.tail.*`): the same rankings judged
only on test items outside the `head_fraction` most frequent training items.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence

import numpy as np
import pyarrow.parquet as pq

from models import data_layout as layout
from models.features import ITEM_ID, LABEL, USER_ID
from models.metrics import recall_ndcg_at_k, recall_vs_exact
from pipeline.config import EvaluationConfig

NEG_INF = -np.inf
NO_ITEM = -1  # an empty slot of `top_k_excluding` (fewer items left than k)


def test_positives(data_dir: str) -> Dict[str, List[str]]:
    """user → test items that count as positives (by the dataset's positives mode)."""
    mode = layout.positives_mode(data_dir)
    out: Dict[str, List[str]] = {}
    for path in layout.interaction_files(data_dir, "test"):
        cols = [USER_ID, ITEM_ID] + ([LABEL] if mode == "label" else [])
        t = pq.read_table(path, columns=cols).to_pandas()
        if mode == "label":
            t = t[t[LABEL] > 0]
        for u, it in zip(t[USER_ID].to_numpy(), t[ITEM_ID].to_numpy()):
            out.setdefault(str(u), []).append(str(it))
    return out


def tail_only(relevant: Sequence[Sequence[str]], popular: Sequence[str], head_fraction: float,
              corpus_size: int) -> List[List[str]]:
    """Each user's relevant items without the head: the ⌈head_fraction·corpus_size⌉
    most frequent training items (`popular`, most frequent first)."""
    head = set(popular[:int(np.ceil(head_fraction * corpus_size))])
    return [[i for i in rel if i not in head] for rel in relevant]


def items_by_popularity(item_ids: Sequence[str], counts: np.ndarray) -> List[str]:
    """Item ids, most frequent first (ties by id): the order of the head/tail split and
    of the popularity baseline."""
    return [i for _, i in sorted(zip(-np.asarray(counts), item_ids))]


def popularity_ranking(popular: Sequence[str], seen: Sequence[Sequence[str]], k: int) -> List[List[str]]:
    """Per user, the `k` most popular items (`popular`, most frequent first) not in `seen`."""
    out = []
    for user_seen in seen:
        skip, row = set(user_seen), []
        for i in popular:
            if i not in skip:
                row.append(i)
                if len(row) == k:
                    break
        out.append(row)
    return out


def top_k_excluding(scores: np.ndarray, k: int, exclude: Sequence[Sequence[int]]):
    """Top-k columns of each row of ``scores [U, N]`` (modified in place: excluded
    columns set to -inf), skipping each row's `exclude` indices.

    Returns (indices ``[U, k]``, scores ``[U, k]``) sorted by descending score, k capped
    at N. An excluded column is never returned: a row with fewer than k columns left
    fills its last slots with `NO_ITEM` and score -inf, which callers drop (`ranked_ids`).
    """
    k = min(k, scores.shape[1])
    excluded = np.zeros(scores.shape, dtype=bool)
    for row, ex in enumerate(exclude):
        if len(ex):
            excluded[row, np.asarray(ex, dtype=np.int64)] = True
    scores[excluded] = NEG_INF
    part = np.argpartition(scores, scores.shape[1] - k, axis=1)[:, scores.shape[1] - k:]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    idx, top = np.take_along_axis(part, order, axis=1), np.take_along_axis(part_scores, order, axis=1)
    idx[np.take_along_axis(excluded, idx, axis=1)] = NO_ITEM
    return idx, top


def ranked_ids(indices: np.ndarray, item_ids: Sequence[str]) -> List[List[str]]:
    """`top_k_excluding` indices → per row, the item ids in rank order, `NO_ITEM` slots dropped."""
    return [[item_ids[i] for i in row if i != NO_ITEM] for row in indices]


def exact_top_k(queries: np.ndarray, items: np.ndarray, k: int, exclude: Sequence[Sequence[int]],
                block: int = 1024, max_block_elements: int = 2 ** 24):
    """Exact top-k by inner product with per-user excluded item indices.

    Users are scored in blocks of at most `block` rows and `max_block_elements`
    scores (64 MiB of float32 by default), so memory stays bounded however large the
    corpus: with 1M items a block holds 16 users.

    Args:
      queries: ``[U, D]``; items: ``[N, D]``; exclude: per user, item indices to skip.

    Returns:
      (indices ``[U, k]``, scores ``[U, k]``) sorted by descending score.
    """
    block = max(1, min(int(block), int(max_block_elements) // max(1, items.shape[0])))
    all_idx, all_scores = [], []
    for start in range(0, len(queries), block):
        idx, scores = top_k_excluding(queries[start:start + block] @ items.T, k, exclude[start:start + block])
        all_idx.append(idx)
        all_scores.append(scores)
    return np.concatenate(all_idx), np.concatenate(all_scores)


def evaluation_users(truth: Dict[str, List[str]], known, config: EvaluationConfig, data_dir: str) -> List[str]:
    """The test users evaluated: those of `truth` that are `known` (training users), or a
    seeded sample of `config.max_users` of them, sorted."""
    users = sorted(u for u in truth if u in known)
    if config.max_users and len(users) > config.max_users:
        rng = np.random.default_rng(config.seed)
        users = sorted(rng.choice(users, size=config.max_users, replace=False).tolist())
    if not users:
        raise ValueError(f"no test user with positives in {data_dir}; cannot evaluate")
    return users


def seen_positions(store, users: Sequence[str], position: Dict[str, int]) -> List[List[int]]:
    """Per user, the corpus positions (`position`: item id → row) of the user's training items
    (`store.seen`; items outside the corpus skipped): what the evaluation removes from each
    user's ranking."""
    return [[position[i] for i in store.seen(u) if i in position] for u in users]


class ExactEvaluator:
    """Exact Recall@K and NDCG@K of towers held in memory, for following a model while it
    trains (no export, no index).

    The users, the excluded training items and the metrics are those of the exact part of
    `evaluate_retrieval`, so after the last epoch both give the same figures. The inputs
    are read once; each call embeds the test users and the whole corpus.

    Args:
      data_dir: a materialized dataset directory.
      config: the evaluation settings (`ks`, `max_users`, `seed`).
    """

    def __init__(self, data_dir: str, config: EvaluationConfig):
        from models.features import padded_batch
        from serving.user_store import UserStore

        store = UserStore(data_dir)
        truth = test_positives(data_dir)
        self.users = evaluation_users(truth, store, config, data_dir)
        self.ks = tuple(config.ks)
        self._user_features = store.features(self.users)
        rows = pq.read_table(os.path.join(data_dir, layout.ITEMS_FILE)).to_pylist()
        self.item_ids = [str(r[ITEM_ID]) for r in rows]
        self._item_features = padded_batch(store.schema, "item", rows)
        self._seen = seen_positions(store, self.users, {it: i for i, it in enumerate(self.item_ids)})
        self._relevant = [truth[u] for u in self.users]

    def __call__(self, query_tower, item_tower, batch_size: int = 4096) -> Dict[str, float]:
        """``{"recall@K": …, "ndcg@K": …}`` for every K of the config, of the two towers
        (Keras models called with ``training=False``)."""
        queries = _embed(query_tower, self._user_features, batch_size)
        items = _embed(item_tower, self._item_features, batch_size)
        idx, _ = exact_top_k(queries, items, max(self.ks), self._seen)
        ranked = ranked_ids(idx, self.item_ids)
        out: Dict[str, float] = {}
        for k in self.ks:
            m = recall_ndcg_at_k(ranked, self._relevant, k)
            out[f"recall@{k}"], out[f"ndcg@{k}"] = m["recall"], m["ndcg"]
        return out


def _embed(tower, features: Dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    from models.tf_compat import tf

    n = len(next(iter(features.values())))
    parts = [np.asarray(tower({k: tf.constant(v[s:s + batch_size]) for k, v in features.items()}, training=False))
             for s in range(0, n, batch_size)]
    return np.concatenate(parts, axis=0)


def evaluate_retrieval(workdir: str, version: int, config: EvaluationConfig, with_index: bool = True
                       ) -> Dict[str, Any]:
    """Metrics of the exported models of `version` in `workdir` on the workdir's current data.

    The towers of any version are measured on the current test split, users and catalogue
    (an older version's own copy of the tables is not used), so that two versions can be
    compared on the same data. `with_index=False` leaves out the ``index.*`` metrics
    (an older version's index holds its own catalogue).
    """
    from pipeline.job import DATA_DIR, STATS_DIR, item_embeddings, read_item_frequencies
    from serving import exports
    from serving.recommender import Recommender

    data_dir = os.path.join(workdir, DATA_DIR)
    rec = Recommender(workdir, version, data_dir=data_dir)
    truth = test_positives(data_dir)
    users = evaluation_users(truth, rec.users, config, data_dir)

    item_ids, item_emb = item_embeddings(exports.version_path(workdir, exports.ITEM_TOWER, version), data_dir)
    position = {it: i for i, it in enumerate(item_ids)}
    queries = np.concatenate([rec.query_embeddings(users[s:s + 2048]) for s in range(0, len(users), 2048)])
    seen_idx = seen_positions(rec.users, users, position)
    relevant = [truth[u] for u in users]
    kmax = max(config.ks)

    exact_idx, exact_scores = exact_top_k(queries, item_emb, kmax, seen_idx)
    exact_ranked = ranked_ids(exact_idx, item_ids)

    # Through the index: ask for enough neighbours to survive the seen-item filter.
    idx_ranked, idx_scores = [], np.full((len(users), kmax), NEG_INF)
    if with_index:
        max_seen = max(len(s) for s in seen_idx)
        fetch = min(len(item_ids), kmax + max_seen)
        for start in range(0, len(users), 1024):
            _, ids = rec.index.search(queries[start:start + 1024], fetch)
            for r, row in enumerate(ids):
                u = start + r
                seen = set(rec.users.seen(users[u]))
                kept = [i for i in row if i not in seen][:kmax]
                idx_ranked.append(kept)
                # Exact scores of the returned items, so agreement is judged by score.
                sc = [float(queries[u] @ item_emb[position[i]]) for i in kept]
                idx_scores[u, :len(sc)] = sc

    freq_ids, counts, _ = read_item_frequencies(os.path.join(workdir, STATS_DIR))
    popular = items_by_popularity(freq_ids, counts)
    tail_relevant = tail_only(relevant, popular, config.head_fraction, len(item_ids))
    pop_ranked = popularity_ranking(popular, [rec.users.seen(u) for u in users], kmax)

    metrics: Dict[str, Any] = {"evaluation": {"users": len(users), "items": len(item_ids),
                                              "index_kind": rec.index.kind,
                                              "tail_users": sum(1 for t in tail_relevant if t)}}
    for k in config.ks:
        ex = recall_ndcg_at_k(exact_ranked, relevant, k)
        tail = recall_ndcg_at_k(exact_ranked, tail_relevant, k)
        pop = recall_ndcg_at_k(pop_ranked, relevant, k)
        metrics[f"retrieval.recall@{k}"] = ex["recall"]
        metrics[f"retrieval.ndcg@{k}"] = ex["ndcg"]
        metrics[f"retrieval.precision@{k}"] = ex["precision"]
        metrics[f"retrieval.tail.recall@{k}"] = tail["recall"]
        metrics[f"retrieval.tail.ndcg@{k}"] = tail["ndcg"]
        if with_index:
            ix = recall_ndcg_at_k(idx_ranked, relevant, k)
            metrics[f"index.recall@{k}"] = ix["recall"]
            metrics[f"index.ndcg@{k}"] = ix["ndcg"]
            metrics[f"index.recall_vs_exact@{k}"] = recall_vs_exact(idx_scores[:, :k], exact_scores[:, :k], k)
        metrics[f"baseline.popularity.recall@{k}"] = pop["recall"]
        metrics[f"baseline.popularity.ndcg@{k}"] = pop["ndcg"]
    return metrics
