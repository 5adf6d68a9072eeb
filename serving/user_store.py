"""User features and behaviour histories for building query-tower inputs at serving time."""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

import numpy as np
import pyarrow.parquet as pq

from models import data_layout as layout
from models.features import HISTORY, OOV_TOKEN, USER_ID, Kind, Schema, padded_batch


class UnknownUserError(KeyError):
    """The user id is not in the user table."""

    def __str__(self):
        return str(self.args[0])


class UserStore:
    """User rows, their recent positive items (``history``) and all training items (``seen``).

    Args:
      data_dir: a materialized dataset directory.
    """

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.schema = Schema.load(os.path.join(data_dir, layout.SCHEMA_FILE))
        users = pq.read_table(os.path.join(data_dir, layout.USERS_FILE)).to_pylist()
        self._users: Dict[str, dict] = {str(r[USER_ID]): r for r in users}
        hist = pq.read_table(os.path.join(data_dir, layout.USER_HISTORY_FILE)).to_pydict()
        self._history: Dict[str, List[str]] = dict(zip(hist[USER_ID], hist["history"]))
        self._seen: Dict[str, List[str]] = dict(zip(hist[USER_ID], hist["seen"]))

    def __contains__(self, user_id: str) -> bool:
        return str(user_id) in self._users

    def __len__(self) -> int:
        return len(self._users)

    def user_ids(self) -> List[str]:
        return list(self._users)

    def seen(self, user_id: str) -> List[str]:
        return list(self._seen.get(str(user_id), []))

    def row(self, user_id: str, allow_unknown: bool = False) -> dict:
        """The user's tower input row; unknown users raise unless `allow_unknown`.

        An unknown user allowed in gets the OOV value for every categorical feature,
        0 for numeric ones and an empty history (a cold-start query).
        """
        user_id = str(user_id)
        if user_id in self._users:
            row = dict(self._users[user_id])
        elif allow_unknown:
            row = {}
            for f in self.schema.user_features:
                if f.kind == Kind.CATEGORICAL:
                    row[f.name] = OOV_TOKEN
                elif f.kind == Kind.NUMERIC:
                    row[f.name] = 0.0
                else:
                    row[f.name] = []
            row[USER_ID] = user_id
        else:
            raise UnknownUserError(
                f"unknown user id {user_id!r}: not in {os.path.join(self.data_dir, layout.USERS_FILE)} "
                f"({len(self._users)} users)")
        seq = self.schema.sequence_feature
        if seq is not None:
            row[seq.name] = list(self._history.get(user_id, []))
        return row

    def features(self, user_ids: Sequence[str], allow_unknown: bool = False) -> Dict[str, np.ndarray]:
        """Query-tower inputs for a batch of users (layout of `Schema.tensor_specs("user")`)."""
        return padded_batch(self.schema, "user", [self.row(u, allow_unknown) for u in user_ids])


__all__ = ["UserStore", "UnknownUserError", "HISTORY"]
