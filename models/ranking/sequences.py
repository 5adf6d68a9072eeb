"""Behaviour sequences for training rows, without leakage (pure numpy).

The ``history`` of an event is the item ids of the same user's events that happened
strictly *before* it (earlier timestamp; events at the same second are not "before"
each other), oldest first, the most recent `max_length` kept, padded with ``""`` at the
end — the schema's sequence layout (`models.features.pad_values(..., keep="last")`).
Earlier events sharing a timestamp are ordered by item id, so the result depends only
on the rows, not on their order in the input.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from models.features import PAD_TOKEN


def build_sequences(user_ids, item_ids, timestamps, max_length: int,
                    eligible: Optional[np.ndarray] = None) -> np.ndarray:
    """Per event, the user's items strictly before it.

    Args:
      user_ids: ``[n]`` user of each event.
      item_ids: ``[n]`` item of each event (converted to ``str``).
      timestamps: ``[n]`` integer (or float) event times.
      max_length: L, the number of most recent earlier items kept.
      eligible: optional ``[n]`` bool, which events may enter histories (e.g. clicks
        only); every row still gets its history. Default: all events.

    Returns:
      ``[n, L]`` object array of ``str``, row i aligned with input row i, oldest first,
      padded with ``""`` at the end.

    Raises:
      ValueError: arrays of different lengths, non-positive `max_length`, non-finite
        timestamps.
    """
    if isinstance(max_length, bool) or int(max_length) != max_length or max_length < 1:
        raise ValueError(f"`max_length` should be a positive integer. Received: max_length={max_length!r}")
    max_length = int(max_length)
    users = np.asarray(user_ids).reshape(-1)
    items = np.asarray(item_ids).reshape(-1).astype(str).astype(object)
    ts = np.asarray(timestamps).reshape(-1)
    n = len(users)
    if len(items) != n or len(ts) != n:
        raise ValueError(f"`user_ids`, `item_ids` and `timestamps` should have the same length. "
                         f"Received: {n}, {len(items)}, {len(ts)}")
    if ts.dtype.kind == "f" and not np.isfinite(ts).all():
        raise ValueError("`timestamps` should be finite")
    if eligible is None:
        eligible = np.ones(n, dtype=bool)
    eligible = np.asarray(eligible, dtype=bool).reshape(-1)
    if len(eligible) != n:
        raise ValueError(f"`eligible` should have one value per event ({n}). Received: {len(eligible)}")
    out = np.full((n, max_length), PAD_TOKEN, dtype=object)
    if n == 0:
        return out

    user_code = np.unique(users, return_inverse=True)[1].reshape(-1).astype(np.int64)
    ts_code = np.unique(ts, return_inverse=True)[1].reshape(-1).astype(np.int64)
    item_code = np.unique(items, return_inverse=True)[1].reshape(-1)
    num_ts = int(ts_code.max()) + 1
    if (int(user_code.max()) + 1) * num_ts >= 2 ** 62:
        raise ValueError(f"too many users × distinct timestamps to key in int64: "
                         f"{int(user_code.max()) + 1} × {num_ts}")
    # One sortable key per (user, time); int64 holds users × distinct times < 2^63.
    key = user_code * num_ts + ts_code

    source = np.flatnonzero(eligible)
    order = source[np.lexsort((item_code[source], key[source]))]
    source_keys = key[order]
    source_items = items[order]
    # [first eligible event of the user, first eligible event at the row's time): the past.
    end = np.searchsorted(source_keys, key, side="left")
    start = np.searchsorted(source_keys, user_code * num_ts, side="left")
    count = np.minimum(end - start, max_length)
    positions = (end - count)[:, None] + np.arange(max_length)[None, :]
    valid = np.arange(max_length)[None, :] < count[:, None]
    out[valid] = source_items[positions[valid]]
    return out
