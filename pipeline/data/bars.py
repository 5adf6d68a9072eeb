"""Reader of the BARS "m1" matching benchmark splits (``train.txt``/``test.txt``).

One line per user: ``user_id item item ...`` (whitespace-separated integers, ids already
remapped). The files carry no timestamps; a user's items get timestamps 0, 1, 2, ... in
file order, training items first, so the order within each file is preserved and every
test item comes after every training item of the same user. Rows carry the file's
``split`` (``"train"``/``"test"``) and the benchmark protocol is reproduced with the
``predefined`` split.
"""

from __future__ import annotations

import os
from typing import Dict, List, Tuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from models.features import HISTORY, ITEM_ID, TIMESTAMP, USER_ID, Feature, Kind, Schema
from pipeline.data.canonical import DataError, RawDataset, RowErrors
from pipeline.data.tabular import (FileProblems, check_history_length, empty_file_error, read_text_lines,
                                   user_grouped_chunks)

SPLIT_FILES = (("train", "train.txt"), ("test", "test.txt"))
_INTEGER = r"^[+-]?\d{1,18}$"


def bars_schema(name: str = "bars", history_length: int = 50) -> Schema:
    """Ids only: the BARS files have no side features."""
    return Schema(
        name=name,
        user_features=(
            Feature(USER_ID, Kind.CATEGORICAL, "user"),
            Feature(HISTORY, Kind.SEQUENCE, "user", max_length=check_history_length(history_length),
                    description="training items before the event, in file order"),
        ),
        item_features=(Feature(ITEM_ID, Kind.CATEGORICAL, "item"),),
    )


def _read_split_file(path: str, errors: RowErrors) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One BARS file -> (users of the kept lines ``[u]``, items ``[n]``, owner line index ``[n]`` into
    the kept users, position within the line ``[n]``), ids normalised to decimal strings."""
    _, lines, numbers = read_text_lines(path, "utf-8")
    if len(lines) == 0:
        raise empty_file_error(path, "one line per user: 'user_id item item ...'")
    errors.rows_read += len(lines)
    tokens = pc.utf8_split_whitespace(lines)
    counts = pc.list_value_length(tokens).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(tokens)
    owner = np.repeat(np.arange(len(lines)), counts)
    starts = np.cumsum(counts) - counts
    position = np.arange(len(flat)) - starts[owner]  # 0 = the user id
    is_int = pc.match_substring_regex(flat, _INTEGER).to_numpy(zero_copy_only=False)
    ids = np.empty(len(flat), dtype=object)
    if is_int.any():
        ids[is_int] = pc.cast(pc.cast(flat.filter(pa.array(is_int)), pa.int64()), pa.string()).to_numpy(
            zero_copy_only=False)

    problems = FileProblems(path, errors, numbers)
    bad_tokens = np.flatnonzero(~is_int)
    first_bad = {}
    for t in bad_tokens:
        first_bad.setdefault(int(owner[t]), int(t))
    bad_user = np.zeros(len(lines), dtype=bool)
    bad_item = np.zeros(len(lines), dtype=bool)
    for line, t in first_bad.items():
        (bad_user if position[t] == 0 else bad_item)[line] = True

    flat_values = flat.to_numpy(zero_copy_only=False) if len(bad_tokens) else None
    problems.reject(bad_user, USER_ID, "non-integer user_id",
                    lambda r: f"user id {flat_values[starts[r]]!r} is not an integer")
    problems.reject(bad_item, "item", "non-integer item",
                    lambda r: f"item {flat_values[first_bad[r]]!r} (token {position[first_bad[r]] + 1} of the "
                              f"line) is not an integer")
    users = ids[starts]
    valid_user = ~bad_user
    first_line: Dict[str, int] = {}
    series = pd.Series(np.where(valid_user, users, None), dtype=object)
    dup = series.duplicated().to_numpy() & valid_user
    if dup.any():
        for i in np.flatnonzero(series.duplicated(keep=False).to_numpy() & valid_user):
            first_line.setdefault(users[i], int(numbers[i]))
    problems.reject(dup, USER_ID, "duplicate user",
                    lambda r: f"user {users[r]} already has a line in this file (line {first_line[users[r]]})")
    keep = problems.flush()

    keep_token = keep[owner] & (position > 0)
    new_index = np.cumsum(keep) - 1
    return users[keep], ids[keep_token], new_index[owner[keep_token]], position[keep_token] - 1


def read_bars(data_dir: str, bad_rows: str = "fail", history_length: int = 50) -> RawDataset:
    """Reads a BARS m1 split directory (``train.txt`` and ``test.txt``).

    Args:
      data_dir: the directory holding both files.
      bad_rows: ``fail`` or ``skip``. Bad rows: a non-integer token (field ``user_id``
        or ``item``), a user with two lines in the same file (field ``user_id``). A line
        with a user and no items is allowed (the user has no interactions in that file).
      history_length: max length of the ``history`` sequence feature.

    Returns:
      a `RawDataset` with ``split`` in every chunk (``predefined_split=True``); users are
      everyone with a line in either file, items everything listed in either file.
      ``errors.rows_read`` counts user lines.

    Raises:
      DataError: naming `data_dir` when a split file is missing or no line lists a valid
        item, or naming the file, line and field of a bad row under ``fail``.
    """
    errors = RowErrors(bad_rows)
    history_length = check_history_length(history_length)
    paths = {split: os.path.join(data_dir, name) for split, name in SPLIT_FILES}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        where = (f"; the directory holds {sorted(os.listdir(data_dir))[:20]}" if os.path.isdir(data_dir)
                 else "; this is not a directory")
        raise DataError(data_dir, None, None, f"BARS split file(s) not found: {missing} (a BARS m1 split "
                                              f"directory holds train.txt and test.txt){where}")

    read = {split: _read_split_file(path, errors) for split, path in paths.items()}
    all_users = np.concatenate([read["train"][0], read["test"][0]])
    user_codes_all, user_values = pd.factorize(pd.Series(all_users, dtype=object), sort=False)
    n_train_users = len(read["train"][0])

    user_parts: List[np.ndarray] = []
    item_parts: List[np.ndarray] = []
    ts_parts: List[np.ndarray] = []
    split_parts: List[np.ndarray] = []
    train_count = np.zeros(len(user_values), dtype=np.int64)
    for split in ("train", "test"):
        users, items, owner, position = read[split]
        codes = user_codes_all[:n_train_users] if split == "train" else user_codes_all[n_train_users:]
        row_users = codes[owner]
        if split == "train":
            np.add.at(train_count, row_users, 1)
            ts = position
        else:
            ts = position + train_count[row_users]
        user_parts.append(row_users)
        item_parts.append(items)
        ts_parts.append(ts.astype(np.int64))
        split_parts.append(np.full(len(items), split, dtype=object))

    items_all = np.concatenate(item_parts)
    item_codes, item_values = pd.factorize(pd.Series(items_all, dtype=object), sort=False)
    user_codes = np.concatenate(user_parts)
    timestamps = np.concatenate(ts_parts)
    if len(timestamps) == 0:
        raise DataError(data_dir, None, None, "no interactions: no user line lists any valid item "
                                              f"({errors.summary()['rejected_by_reason']})")
    user_values = np.asarray(user_values, dtype=object)
    item_values = np.asarray(item_values, dtype=object)
    columns = {
        USER_ID: (user_codes, user_values),
        ITEM_ID: (item_codes, item_values),
        TIMESTAMP: timestamps,
        "split": np.concatenate(split_parts),
    }
    name = os.path.basename(os.path.normpath(data_dir)) or "bars"
    schema = bars_schema(name if name.startswith("bars") else f"bars-{name}", history_length)
    return RawDataset(
        schema=schema,
        users=pd.DataFrame({USER_ID: user_values}),
        items=pd.DataFrame({ITEM_ID: item_values}),
        interactions=user_grouped_chunks(user_codes, timestamps, columns),
        user_complete_chunks=True, predefined_split=True, errors=errors, source=f"bars:{data_dir}")
