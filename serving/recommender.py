"""Answers top-k queries from the exports of a workdir: query tower → index → filter."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import numpy as np

from models.tf_compat import tf
from serving import exports
from serving.index import load_index
from serving.user_store import UnknownUserError, UserStore

DATA_DIR = "data"


class Recommender:
    """Loads the newest complete exports of `workdir` (or the given version).

    Args:
      workdir: the directory `recfunnel run` wrote.
      version: export version to load; None = the promoted one (else the newest).
    """

    def __init__(self, workdir: str, version: Optional[int] = None):
        self.workdir = workdir
        if version is None:
            version = exports.serving_version(workdir)
            if version is None:
                raise FileNotFoundError(
                    f"no exported index under {exports.model_dir(workdir, exports.INDEX)}; "
                    f"run `recfunnel run --workdir {workdir}` first")
        self.version = int(version)
        for model in exports.MODELS:
            path = exports.version_path(workdir, model, self.version)
            if not os.path.isdir(path):
                raise FileNotFoundError(f"export {model} version {self.version} is missing: {path}")
        self.users = UserStore(os.path.join(workdir, DATA_DIR))
        self._query_tower = tf.saved_model.load(exports.version_path(workdir, exports.QUERY_TOWER, self.version))
        self._embed = self._query_tower.signatures["serving_default"]
        dim = int(self._embed.structured_outputs["embedding"].shape[-1])
        self.index = load_index(exports.version_path(workdir, exports.INDEX, self.version),
                                expected_item_tower_version=str(self.version), expected_embedding_dim=dim)

    def query_embeddings(self, user_ids: List[str], allow_unknown: bool = False) -> np.ndarray:
        feats = self.users.features(user_ids, allow_unknown=allow_unknown)
        tensors = {k: tf.constant(v) for k, v in feats.items()}
        return self._embed(**tensors)["embedding"].numpy()

    def recommend(self, user_id: str, k: int = 10, exclude_seen: bool = True,
                  allow_unknown: bool = False) -> Dict[str, Any]:
        """Top-k distinct items for one user as ``{"user_id", "items": [{"item_id", "score"}]}``.

        Raises:
          UnknownUserError: the user is not known and `allow_unknown` is False.
          ValueError: `k` is not positive.
        """
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"`k` should be a positive integer. Received: k={k!r}")
        k = min(int(k), self.index.num_items)
        known = user_id in self.users
        if not known and not allow_unknown:
            raise UnknownUserError(
                f"unknown user id {user_id!r}: not among the {len(self.users)} users of {self.workdir}; "
                "pass --cold-start to answer with the model's cold-start embedding")
        seen = set(self.users.seen(user_id)) if exclude_seen else set()
        q = self.query_embeddings([user_id], allow_unknown=allow_unknown)
        fetch = min(self.index.num_items, k + len(seen))
        scores, ids = self.index.search(q, fetch)
        items = []
        taken = set()
        for item_id, score in zip(ids[0], scores[0]):
            if item_id in seen or item_id in taken:
                continue
            taken.add(item_id)
            items.append({"item_id": str(item_id), "score": float(score)})
            if len(items) == k:
                break
        return {"user_id": str(user_id), "items": items, "version": self.version,
                "cold_start": not known}


__all__ = ["Recommender", "UnknownUserError"]
