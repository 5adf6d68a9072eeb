"""Writes a `RawDataset` as a materialized dataset directory (see `models.data_layout`).

The directory is built under a temporary sibling and renamed into place only when
everything was written, so a failure never leaves a half-written dataset behind.

Interaction shards keep the rows sorted by user and time. Example shards (what
training reads) hold the same rows in a seeded random order: readers sort by user to
build behaviour sequences, and a user-sorted training stream would give a bounded
`tf.data` shuffle buffer batches of a few hundred users each, many rows per user (the
in-batch and cross-batch negatives would then be mostly the same users' other
positives, and the stream would sweep through the users in order).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zlib
from typing import Any, Dict, List

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from models import data_layout as layout
from models.examples import encode_event, encode_side, join_example
from models.features import ITEM_ID, LABEL, RATING, USER_ID, Schema
from models.tf_compat import tf
from pipeline.data.canonical import DataError, RawDataset
from pipeline.data.splits import SplitConfig, assign_split

log = logging.getLogger(__name__)

POSITIVES = ("auto", "all", "label")
HISTORY_MODES = ("past", "all_other", "random_prefix", "all")
# Recorded in the read report: the order of the rows in the example shards.
EXAMPLE_ORDER = "random"
# Every row the reader rejected, one JSON object per line (the read report keeps only the
# first examples); named by the report's ``read.rejections_file`` when written.
REJECTIONS_FILE = "read_rejections.jsonl"


def positives_mode(schema: Schema, positives: str) -> str:
    """``label`` (rows with label > 0 are positives) or ``all`` (every row is)."""
    if positives not in POSITIVES:
        raise ValueError(f"`positives` should be one of {POSITIVES}. Received: positives={positives!r}")
    if positives == "auto":
        return "label" if schema.has_label else "all"
    if positives == "label" and not schema.has_label:
        raise ValueError(f"`positives` is 'label' but dataset {schema.name!r} has no label column.")
    return positives


def _check_ids(chunk: pd.DataFrame, raw: RawDataset, known_users, known_items) -> pd.DataFrame:
    """Rejects rows whose ids are not in the user/item tables (policy of `raw.errors`)."""
    bad_user = ~chunk[USER_ID].isin(known_users)
    bad_item = ~chunk[ITEM_ID].isin(known_items)
    bad = bad_user | bad_item
    if bad.any():
        for idx in np.flatnonzero(bad.to_numpy()):
            row = chunk.iloc[idx]
            field = USER_ID if bad_user.iloc[idx] else ITEM_ID
            raw.errors.reject(raw.source, None, field,
                              f"unknown {field.split('_')[0]} {row[field]!r} (not in the {field.split('_')[0]} table)",
                              kind=f"unknown {field.split('_')[0]}")
        chunk = chunk[~bad]
    return chunk


def materialize(raw: RawDataset, out_dir: str, split: SplitConfig = SplitConfig(),
                positives: str = "auto", history_mode: str = "past") -> Dict[str, Any]:
    """Splits, joins and writes `raw` to `out_dir`.

    Each example's behaviour sequence holds the user's positive *training*
    interactions, never test ones:

    * ``history_mode="past"`` (default): those strictly before the event's timestamp
      (no leakage from the event itself or from events at the same second);
    * ``history_mode="all_other"``: all of them except the event's own item, for data
      whose order carries no time (e.g. the BARS splits, where a user is a bag of
      items);
    * ``history_mode="random_prefix"``: those before the event in a seeded random order
      of the user's training positives, for the same data: every event of a user sees
      a different random subset of the others (of random size), where ``all_other``
      gives all of them nearly the same sequence;
    * ``history_mode="all"``: all of them, the event's own item included, for the same
      data: every event of a user sees the sequence its test events see, so the query
      carries nothing about which of the user's items is the target (with ``all_other``
      the one item missing from a user's sequence names it).

    Test events see all training positives in every mode.

    Returns:
      a summary dict (rows per split, users, items, rejected rows, seconds). When the
      reader rejected rows, all of them are written to `REJECTIONS_FILE` in `out_dir`
      (``read.rejections_file`` names it; ``read.examples`` keeps the first ones).
    """
    if history_mode not in HISTORY_MODES:
        raise ValueError(f"`history_mode` should be one of {HISTORY_MODES}. Received: history_mode={history_mode!r}")
    start = time.time()
    raw.validate_tables()
    schema = raw.schema
    split = split.resolve(raw.predefined_split)
    mode = positives_mode(schema, positives)
    seq = schema.sequence_feature
    history_length = seq.max_length if seq is not None else 0

    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out_dir))}.tmp-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(os.path.join(tmp, layout.INTERACTIONS_DIR))
    os.makedirs(os.path.join(tmp, layout.EXAMPLES_DIR))
    try:
        summary = _write(raw, tmp, split, mode, history_length, history_mode)
        if raw.errors.num_rejected:
            with open(os.path.join(tmp, REJECTIONS_FILE), "w", encoding="utf-8") as f:
                raw.errors.copy_rejections(f)
            summary["read"]["rejections_file"] = REJECTIONS_FILE
        summary["seconds"] = round(time.time() - start, 3)
        with open(os.path.join(tmp, layout.READ_REPORT_FILE), "w") as f:
            json.dump(summary, f, indent=2)
        if os.path.exists(out_dir):
            old = f"{tmp}.old"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _chunks(raw: RawDataset):
    if raw.user_complete_chunks:
        yield from raw.interactions()
    else:
        chunks = list(raw.interactions())
        yield pd.concat(chunks, ignore_index=True) if chunks else pd.DataFrame()


def _write(raw: RawDataset, tmp: str, split: SplitConfig, mode: str, history_length: int,
           history_mode: str = "past") -> Dict[str, Any]:
    schema = raw.schema
    schema.save(os.path.join(tmp, layout.SCHEMA_FILE))
    users = raw.users[schema.table_columns("user")].reset_index(drop=True)
    items = raw.items[schema.table_columns("item")].reset_index(drop=True)
    pq.write_table(pa.Table.from_pandas(users, preserve_index=False), os.path.join(tmp, layout.USERS_FILE))
    pq.write_table(pa.Table.from_pandas(items, preserve_index=False), os.path.join(tmp, layout.ITEMS_FILE))

    # Static features are serialized once per user and per item (see join_example).
    user_bytes = dict(zip(users[USER_ID], (encode_side(schema, "user", r) for r in users.to_dict("records"))))
    item_bytes = dict(zip(items[ITEM_ID], (encode_side(schema, "item", r) for r in items.to_dict("records"))))

    cutoff = split.cutoff
    if split.method == "time" and cutoff is None:
        ts = np.concatenate([c["timestamp"].to_numpy() for c in _chunks(raw)] or [np.zeros(0)])
        if len(ts) == 0:
            raise DataError(raw.source, None, None, "no interactions")
        cutoff = int(np.quantile(ts, split.time_quantile))

    counts = {"train": 0, "test": 0}
    positives = {"train": 0, "test": 0}
    shard_files: Dict[str, List[str]] = {"train": [], "test": []}
    last_history: Dict[str, List[str]] = {}
    seen: Dict[str, List[str]] = {}
    columns = [USER_ID, ITEM_ID, "timestamp"] + ([RATING] if schema.has_rating else []) + (
        [LABEL] if schema.has_label else [])
    t0 = time.time()
    time_range = [None, None]  # first and last timestamp
    for chunk_index, chunk in enumerate(_chunks(raw)):
        if len(chunk) == 0:
            continue
        chunk = _check_ids(chunk, raw, user_bytes.keys(), item_bytes.keys())
        if len(chunk):
            first, last = int(chunk["timestamp"].min()), int(chunk["timestamp"].max())
            time_range = [first if time_range[0] is None else min(time_range[0], first),
                          last if time_range[1] is None else max(time_range[1], last)]
        chunk = chunk.sort_values([USER_ID, "timestamp"], kind="stable").reset_index(drop=True)
        is_test = assign_split(chunk, split, cutoff)
        is_pos = (chunk[LABEL].to_numpy() > 0) if mode == "label" else np.ones(len(chunk), dtype=bool)
        histories = _histories(chunk[USER_ID].to_numpy(), chunk[ITEM_ID].to_numpy(),
                               chunk["timestamp"].to_numpy(), is_pos & ~is_test, history_length,
                               last_history, seen)
        if history_mode in ("all_other", "all"):
            # `all`: no row leaves its own item out
            leaves_out = is_pos & ~is_test if history_mode == "all_other" else np.zeros(len(chunk), dtype=bool)
            histories = _all_other_histories(chunk[USER_ID].to_numpy(), chunk[ITEM_ID].to_numpy(),
                                             leaves_out, history_length, seen)
        elif history_mode == "random_prefix":
            histories = _random_prefix_histories(chunk[USER_ID].to_numpy(), is_pos & ~is_test, history_length,
                                                 seen, split.seed)
        for name, mask in (("train", ~is_test), ("test", is_test)):
            part = chunk[mask]
            if len(part) == 0:
                continue
            base = f"{name}-{len(shard_files[name]):05d}"
            pq.write_table(pa.Table.from_pandas(part[columns], preserve_index=False),
                           os.path.join(tmp, layout.INTERACTIONS_DIR, base + ".parquet"))
            ex_path = os.path.join(tmp, layout.EXAMPLES_DIR, base + ".tfrecord.gz")
            rows = np.flatnonzero(mask)
            order = np.random.default_rng([split.seed, chunk_index, int(name == "test")]).permutation(len(rows))
            _write_examples(ex_path, schema, part.iloc[order], [histories[i] for i in rows[order]],
                            user_bytes, item_bytes)
            shard_files[name].append(base)
            counts[name] += len(part)
            positives[name] += int(is_pos[mask].sum())
        log.info("materialized chunk %d: %d rows so far (%.0f rows/s)", chunk_index,
                 counts["train"] + counts["test"], (counts["train"] + counts["test"]) / max(time.time() - t0, 1e-9))

    for name in ("train", "test"):
        if counts[name] == 0:
            raise DataError(raw.source, None, None, f"the {name} split is empty: "
                                                    f"{_split_settings(split, cutoff, time_range, name)}")
        total = len(shard_files[name])
        for i, base in enumerate(shard_files[name]):
            final = layout.shard_name(name, i, total, "")
            os.rename(os.path.join(tmp, layout.INTERACTIONS_DIR, base + ".parquet"),
                      os.path.join(tmp, layout.INTERACTIONS_DIR, final + ".parquet"))
            os.rename(os.path.join(tmp, layout.EXAMPLES_DIR, base + ".tfrecord.gz"),
                      os.path.join(tmp, layout.EXAMPLES_DIR, final + ".tfrecord.gz"))

    user_list = sorted(seen)
    pq.write_table(pa.table({
        USER_ID: user_list,
        "history": [last_history.get(u, []) for u in user_list],
        "seen": [seen[u] for u in user_list],
    }), os.path.join(tmp, layout.USER_HISTORY_FILE))
    return {
        "source": raw.source,
        "schema": schema.name,
        "split": {"method": split.method, "n": split.n, "cutoff": cutoff,
                  "test_fraction": split.test_fraction, "seed": split.seed},
        "positives": mode,
        "history_mode": history_mode,
        "example_order": EXAMPLE_ORDER,
        "rows": counts,
        "positive_rows": positives,
        "users": int(len(users)),
        "items": int(len(items)),
        "read": raw.errors.summary(),
    }


def _split_settings(split: SplitConfig, cutoff, time_range, empty: str) -> str:
    """What in the split settings left the `empty` split without rows, with the values."""
    if split.method == "time":
        span = (f"the timestamps run from {time_range[0]} to {time_range[1]}" if time_range[0] is not None
                else "no interaction was kept")
        where = "before" if empty == "train" else "at or after"
        if split.cutoff is None:
            setting = f"`data.split.time_quantile`={split.time_quantile} gives the cutoff {cutoff}"
        else:
            setting = f"`data.split.cutoff`={split.cutoff}"
        return f"{setting} (method=time), and no interaction is {where} it: {span}"
    if split.method == "leave_last_n":
        return (f"`data.split.n`={split.n} (method=leave_last_n) holds out the last n interactions of users who "
                "have more than n, and no user has")
    if split.method == "random":
        return (f"`data.split.test_fraction`={split.test_fraction} (method=random, seed={split.seed}) sent "
                f"{'every' if empty == 'train' else 'no'} interaction to test")
    return f"the data's own split (`data.split.method`={split.method}) has no {empty} rows"


def _histories(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray, contributes: np.ndarray,
               history_length: int, last_history: Dict[str, List[str]],
               seen: Dict[str, List[str]]) -> List[List[str]]:
    """Behaviour sequence of every row (rows sorted by user, timestamp).

    A row's sequence is the last `history_length` contributing rows of the same
    user with a strictly smaller timestamp. Updates `last_history` (the sequence after
    the user's last row) and `seen` (all contributing items) per user.
    """
    out: List[List[str]] = []
    current_user = None
    hist: List[str] = []
    pending: List[str] = []
    pending_ts = None
    user_seen: List[str] = []
    for u, it, ts, c in zip(users, items, timestamps, contributes):
        if u != current_user:
            if current_user is not None:
                hist.extend(pending)
                last_history[current_user] = hist[-history_length:] if history_length else []
                seen[current_user] = user_seen
            current_user, pending, pending_ts = u, [], None
            hist = list(last_history.get(u, []))
            user_seen = list(seen.get(u, []))
        if ts != pending_ts:
            hist.extend(pending)
            if len(hist) > 2 * history_length:
                hist = hist[-history_length:]
            pending, pending_ts = [], ts
        out.append(hist[-history_length:] if history_length else [])
        if c:
            pending.append(it)
            user_seen.append(it)
    if current_user is not None:
        hist.extend(pending)
        last_history[current_user] = hist[-history_length:] if history_length else []
        seen[current_user] = user_seen
    return out


def _random_prefix_histories(users: np.ndarray, contributes: np.ndarray, history_length: int,
                             seen: Dict[str, List[str]], seed: int) -> List[List[str]]:
    """Each contributing row's sequence: the user's training positives before it in a seeded
    random order of them (the last `history_length`); other rows get all of them.

    Rows are sorted by user, and a user's contributing rows are the last entries of
    `seen[user]` in row order, so the k-th contributing row is entry ``offset + k``.
    """
    out: List[List[str]] = []
    start = 0
    while start < len(users):
        u = users[start]
        end = start
        while end < len(users) and users[end] == u:
            end += 1
        mine = seen.get(u, [])
        offset = len(mine) - int(contributes[start:end].sum())
        rng = np.random.default_rng([seed, zlib.crc32(str(u).encode())])
        order = rng.permutation(len(mine))
        position = np.empty(len(mine), dtype=np.int64)
        position[order] = np.arange(len(mine))
        everything = mine[-history_length:] if history_length else []
        k = 0
        for row in range(start, end):
            if contributes[row]:
                p = int(position[offset + k])
                k += 1
                before = order[max(0, p - history_length):p] if history_length else []
                out.append([mine[j] for j in before])
            else:
                out.append(list(everything))
        start = end
    return out


def _all_other_histories(users: np.ndarray, items: np.ndarray, contributes: np.ndarray, history_length: int,
                         seen: Dict[str, List[str]]) -> List[List[str]]:
    """Each row's sequence: the user's training positives (the last `history_length`), without the
    row's own item when the row `contributes` one of them."""
    out: List[List[str]] = []
    for u, it, c in zip(users, items, contributes):
        mine = seen.get(u, [])
        if c:
            # Drop the row's own occurrence, keep the order of the others.
            idx = len(mine) - 1 - mine[::-1].index(it) if it in mine else None
            others = mine[:idx] + mine[idx + 1:] if idx is not None else mine
        else:
            others = mine
        out.append(others[-history_length:] if history_length else [])
    return out


def _write_examples(path: str, schema: Schema, part: pd.DataFrame, histories: List[List[str]],
                    user_bytes: Dict[str, bytes], item_bytes: Dict[str, bytes]) -> None:
    ratings = part[RATING].to_numpy() if schema.has_rating else [None] * len(part)
    labels = part[LABEL].to_numpy() if schema.has_label else [None] * len(part)
    options = tf.io.TFRecordOptions(compression_type="GZIP")
    with tf.io.TFRecordWriter(path, options) as writer:
        for u, it, ts, r, lab, h in zip(part[USER_ID].to_numpy(), part[ITEM_ID].to_numpy(),
                                        part["timestamp"].to_numpy(), ratings, labels, histories):
            writer.write(join_example(user_bytes[u], item_bytes[it], encode_event(schema, h, ts, r, lab)))
