"""Train/test splits of interaction chunks (pure pandas/numpy, chunk at a time).

Methods:
  * ``leave_last_n``: each user's last `n` interactions (by timestamp) go to test;
    users with at most `n` interactions stay entirely in train. Needs chunks that
    hold complete users.
  * ``time``: interactions at or after a global `cutoff` timestamp go to test.
  * ``random``: each interaction goes to test with probability `test_fraction`,
    decided by a hash of (user, item, timestamp, seed): independent of chunking.
  * ``predefined``: the reader's ``split`` column (BARS files bring their own).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import pandas as pd

SPLIT_METHODS = ("leave_last_n", "time", "random", "predefined")


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """How interactions are split into train and test.

    Attributes:
      method: one of ``leave_last_n``, ``time``, ``random``, ``predefined``; ``auto``
        means ``predefined`` when the reader brings a split, else ``leave_last_n``.
      n: test interactions per user for ``leave_last_n``.
      cutoff: timestamp for ``time``; None = the `time_quantile` of all timestamps.
      time_quantile: quantile used when `cutoff` is None.
      test_fraction: for ``random``.
      seed: for ``random``.
    """

    method: str = "auto"
    n: int = 5
    cutoff: Optional[int] = None
    time_quantile: float = 0.9
    test_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self):
        if self.method not in SPLIT_METHODS + ("auto",):
            raise ValueError(f"`split.method` should be one of {SPLIT_METHODS + ('auto',)}. "
                             f"Received: method={self.method!r}")
        if self.n < 1:
            raise ValueError(f"`split.n` should be >= 1. Received: n={self.n}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"`split.test_fraction` should be in (0, 1). Received: test_fraction={self.test_fraction}")
        if not 0 < self.time_quantile < 1:
            raise ValueError(f"`split.time_quantile` should be in (0, 1). Received: time_quantile={self.time_quantile}")

    def resolve(self, predefined_available: bool) -> "SplitConfig":
        if self.method == "auto":
            return dataclasses.replace(self, method="predefined" if predefined_available else "leave_last_n")
        if self.method == "predefined" and not predefined_available:
            raise ValueError("`split.method` is 'predefined' but this data source brings no split; "
                             "use leave_last_n, time or random.")
        return self


def assign_split(chunk: pd.DataFrame, config: SplitConfig, cutoff: Optional[int] = None) -> np.ndarray:
    """Boolean array: True where the row goes to test.

    `chunk` must be sorted by (user_id, timestamp) for ``leave_last_n``.
    """
    method = config.method
    if method == "predefined":
        if "split" not in chunk.columns:
            raise ValueError("split method 'predefined' needs a 'split' column in the interactions")
        bad = ~chunk["split"].isin(["train", "test"])
        if bad.any():
            raise ValueError(f"unexpected split value {chunk['split'][bad].iloc[0]!r}; expected 'train' or 'test'")
        return (chunk["split"] == "test").to_numpy()
    if method == "time":
        if cutoff is None:
            raise ValueError("split method 'time' needs a cutoff")
        return (chunk["timestamp"].to_numpy() >= cutoff)
    if method == "random":
        key = pd.util.hash_pandas_object(chunk[["user_id", "item_id", "timestamp"]], index=False).to_numpy()
        key = key ^ np.uint64(config.seed * 0x9E3779B97F4A7C15 % (1 << 64))
        # splitmix64 finaliser: a seed change reshuffles every row.
        key = (key ^ (key >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        key = (key ^ (key >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        key = key ^ (key >> np.uint64(31))
        return (key.astype(np.float64) / 2.0 ** 64) < config.test_fraction
    if method == "leave_last_n":
        users = chunk["user_id"].to_numpy()
        n_rows = len(users)
        if n_rows == 0:
            return np.zeros(0, dtype=bool)
        ends = np.ones(n_rows, dtype=bool)
        ends[:-1] = users[1:] != users[:-1]
        starts = np.ones(n_rows, dtype=bool)
        starts[1:] = users[1:] != users[:-1]
        idx = np.arange(n_rows)
        run_start = np.maximum.accumulate(np.where(starts, idx, 0))
        run_end = np.minimum.accumulate(np.where(ends, idx, n_rows - 1)[::-1])[::-1]
        size = run_end - run_start + 1
        from_end = run_end - idx
        return (from_end < config.n) & (size > config.n)
    raise ValueError(f"unknown split method {method!r}")
