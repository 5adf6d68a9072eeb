"""Answers top-k queries from the exports of a workdir (the `recfunnel query` path).

A thin wrapper over `serving.cascade.Cascade`: query tower → index → seen filter, then
the pre-ranker and ranker when they are exported.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from models.tf_compat import tf
from serving.cascade import DATA_DIR, Cascade, CascadeConfig
from serving.user_store import UnknownUserError


class Recommender:
    """Loads the promoted exports of `workdir` (or the given version).

    Args:
      workdir: the directory `recfunnel run` wrote.
      version: export version to load; None = `serving.exports.serving_version`.
      config: the cascade's stage sizes.
      data_dir: the user and item tables to serve with (default: the version's own copy).
    """

    def __init__(self, workdir: str, version: Optional[int] = None, config: CascadeConfig = CascadeConfig(),
                 data_dir: Optional[str] = None):
        self.workdir = workdir
        self.cascade = Cascade.load(workdir, version, config=config, data_dir=data_dir)
        self.version = self.cascade.version
        self.users = self.cascade.users
        self.index = self.cascade.index

    def query_embeddings(self, user_ids: List[str], allow_unknown: bool = False) -> np.ndarray:
        """``[len(user_ids), D]`` query-tower embeddings."""
        feats = self.users.features(user_ids, allow_unknown=allow_unknown)
        return self.cascade.query_tower({k: tf.constant(v) for k, v in feats.items()})

    def recommend(self, user_id: str, k: int = 10, exclude_seen: bool = True,
                  allow_unknown: bool = False) -> Dict[str, Any]:
        """Top-k distinct items for one user as ``{"user_id", "items": [{"item_id", "score"}], ...}``.

        The retrieval depth grows to k when k exceeds the configured candidates.

        Raises:
          UnknownUserError: the user is not known and `allow_unknown` is False.
          ValueError: `k` is not positive.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"`k` should be a positive integer. Received: k={k!r}")
        if user_id not in self.users and not allow_unknown:
            raise UnknownUserError(
                f"unknown user id {user_id!r}: not among the {len(self.users)} users of {self.workdir}; "
                "pass --cold-start to answer with the model's cold-start embedding")
        return self.cascade.recommend(str(user_id), k=int(k), include_seen=not exclude_seen,
                                      allow_unknown=allow_unknown)


__all__ = ["Recommender", "UnknownUserError", "DATA_DIR"]
