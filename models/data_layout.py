"""Where a materialized dataset keeps its files (read by Beam, training and serving).

A materialized dataset directory holds::

    schema.json                      the `Schema`
    users.parquet                    one row per user (schema.table_columns("user"))
    items.parquet                    one row per item (schema.table_columns("item"))
    interactions/train-00000-of-0000N.parquet   user_id, item_id, timestamp[, rating][, label]
    interactions/test-...parquet
    examples/train-00000-of-0000N.tfrecord.gz   denormalized tf.Examples for training
    examples/test-...tfrecord.gz
    user_history.parquet             user_id, history (list of the last training items)
    read_report.json                 rows read / rejected by reason while reading

Interactions are stored columnar (Parquet) so statistics jobs read them in batches;
training examples are stored as tf.Example so tf.data parses them in parallel.
"""

from __future__ import annotations

import glob
import json
import os
from typing import List, Optional

SCHEMA_FILE = "schema.json"
USERS_FILE = "users.parquet"
ITEMS_FILE = "items.parquet"
USER_HISTORY_FILE = "user_history.parquet"
READ_REPORT_FILE = "read_report.json"
INTERACTIONS_DIR = "interactions"
EXAMPLES_DIR = "examples"
SPLITS = ("train", "test")


class DataError(ValueError):
    """Bad input data: names the file (or input), the 1-based line and the field where known.

    Raised by the readers for a malformed row and by the statistics job when too many
    rows were rejected; `recfunnel` exits with code 3 on it.
    """

    def __init__(self, path: str, line: Optional[int], field: Optional[str], reason: str):
        self.path, self.line, self.field, self.reason = path, line, field, reason
        where = path if line is None else f"{path}, line {line}"
        what = f", field {field!r}" if field else ""
        super().__init__(f"{where}{what}: {reason}")


def shard_name(split: str, index: int, num_shards: int, suffix: str) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}{suffix}"


def interaction_files(data_dir: str, split: str) -> List[str]:
    """Sorted Parquet shards of one split; raises if there are none."""
    _check_split(split)
    files = sorted(glob.glob(os.path.join(data_dir, INTERACTIONS_DIR, f"{split}-*.parquet")))
    if not files:
        raise FileNotFoundError(
            f"No {split} interaction shards in {os.path.join(data_dir, INTERACTIONS_DIR)} "
            f"(expected {split}-00000-of-0000N.parquet)")
    return files


def example_files(data_dir: str, split: str) -> List[str]:
    """Sorted TFRecord shards of one split; raises if there are none."""
    _check_split(split)
    files = sorted(glob.glob(os.path.join(data_dir, EXAMPLES_DIR, f"{split}-*.tfrecord.gz")))
    if not files:
        raise FileNotFoundError(
            f"No {split} example shards in {os.path.join(data_dir, EXAMPLES_DIR)} "
            f"(expected {split}-00000-of-0000N.tfrecord.gz)")
    return files


def read_report(data_dir: str) -> dict:
    """The read report `materialize` wrote in `data_dir` (`READ_REPORT_FILE`)."""
    with open(os.path.join(data_dir, READ_REPORT_FILE)) as f:
        return json.load(f)


def positives_mode(data_dir: str) -> str:
    """The read report's ``positives``: ``label`` (events with label > 0 are positives) or
    ``all`` (every event is)."""
    return read_report(data_dir)["positives"]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"`split` should be one of {SPLITS}. Received: split={split!r}")
