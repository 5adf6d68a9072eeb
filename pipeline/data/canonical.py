"""The canonical in-memory form every reader produces, and how bad rows are handled.

A reader returns a `RawDataset`: the schema, the user and item tables as pandas
DataFrames (one row per id, columns = `Schema.table_columns(side)`, categorical
values as ``str``, multi-valued ones as ``list[str]``, numeric as ``float``) and a
callable yielding interaction chunks (DataFrames with ``user_id`` (str),
``item_id`` (str), ``timestamp`` (int64) and, as the schema announces, ``rating``
and ``label`` (float); readers whose data bring their own split add ``split`` with
values ``"train"``/``"test"``).

Malformed input is reported through a `RowErrors` collector that knows the policy:
``"fail"`` (default) raises `DataError` naming file, line and field at the first bad
row; ``"skip"`` counts it by reason, keeps the first examples, and goes on (every
rejection is also spooled to a temporary file, for the statistics job's dead letters).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import shutil
import tempfile
from typing import IO, Any, Callable, Dict, Iterator, List, Optional

import pandas as pd

from models.data_layout import DataError  # defined low, so that beam_jobs raises it too
from models.features import Schema

BAD_ROW_POLICIES = ("fail", "skip")
INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
# What `RowErrors` counts rejections for (the statistics job's table names).
INTERACTIONS_TABLE = "interactions"
TABLES = (INTERACTIONS_TABLE, "users", "items")


class RowErrors:
    """Collects bad rows under a policy; `summary()` goes into the run report.

    Rejections count for the interactions unless they happen inside `reading(table)`
    (the user and item tables): ``rows_read`` counts interaction rows, so only their
    rejections are comparable with it.

    Under ``skip``, `examples` keeps the first `max_examples` rejections and every one is
    written, as a JSON line, to a temporary file (`copy_rejections`), so that millions of
    them cost disk, not memory.
    """

    def __init__(self, policy: str = "fail", max_examples: int = 20):
        if policy not in BAD_ROW_POLICIES:
            raise ValueError(f"`bad_rows` should be one of {BAD_ROW_POLICIES}. Received: bad_rows={policy!r}")
        self.policy = policy
        self.max_examples = max_examples
        self.rows_read = 0
        self.rejected_by_table: Dict[str, collections.Counter] = {}
        self.examples: List[Dict[str, Any]] = []
        self._table = INTERACTIONS_TABLE
        self._spool: Optional[IO[str]] = None

    @contextlib.contextmanager
    def reading(self, table: str) -> Iterator["RowErrors"]:
        """Counts the rejections inside the block for `table` (``users`` or ``items``)."""
        if table not in TABLES:
            raise ValueError(f"`table` should be one of {TABLES}. Received: table={table!r}")
        previous, self._table = self._table, table
        try:
            yield self
        finally:
            self._table = previous

    def reject(self, path: str, line: Optional[int], field: Optional[str], reason: str,
               kind: Optional[str] = None, rows: int = 1) -> None:
        """Records one bad row; raises `DataError` under the ``fail`` policy.

        `kind` is the counter key (defaults to `reason`); keep it free of row values so
        counts aggregate. `rows` is how many rows the rejection counts for (a record whose
        quoted value swallowed the lines after it counts once per line).
        """
        err = DataError(path, line, field, reason)
        if self.policy == "fail":
            raise err
        self.rejected_by_table.setdefault(self._table, collections.Counter())[kind or reason] += rows
        example = {"file": path, "line": line, "field": field, "reason": reason}
        if len(self.examples) < self.max_examples:
            self.examples.append(example)
        if self._spool is None:
            self._spool = tempfile.TemporaryFile("w+", encoding="utf-8")
        self._spool.write(json.dumps(example) + "\n")

    def copy_rejections(self, out: IO[str]) -> None:
        """Writes every rejection so far to `out`, one JSON object per line, in the order
        recorded: ``{"file", "line", "field", "reason"}`` (`line` None where the row has
        no line, e.g. Parquet, whose reason names the row)."""
        if self._spool is None:
            return
        self._spool.flush()
        self._spool.seek(0)
        shutil.copyfileobj(self._spool, out)
        self._spool.seek(0, 2)  # back to the end: later rejections append

    @property
    def rejected(self) -> collections.Counter:
        """Rejections by reason over every table."""
        return sum(self.rejected_by_table.values(), collections.Counter())

    @property
    def num_rejected(self) -> int:
        return int(sum(self.rejected.values()))

    def summary(self) -> Dict[str, Any]:
        """``rows_read`` (interaction rows), ``rows_rejected`` and ``rejected_by_reason`` (every
        table), ``rejected_by_table`` (``{table: {reason: n}}``), ``examples``."""
        return {
            "policy": self.policy,
            "rows_read": int(self.rows_read),
            "rows_rejected": self.num_rejected,
            "rejected_by_reason": dict(self.rejected),
            "rejected_by_table": {t: dict(c) for t, c in sorted(self.rejected_by_table.items())},
            "examples": list(self.examples),
        }


@dataclasses.dataclass
class RawDataset:
    """A dataset in canonical form, before splitting and materialization.

    Attributes:
      schema: the feature schema.
      users: one row per user, columns `schema.table_columns("user")`.
      items: one row per item, columns `schema.table_columns("item")`.
      interactions: returns a fresh iterator of interaction chunks each call.
      user_complete_chunks: every user's interactions are inside one chunk (lets
        per-user splits and histories stream chunk by chunk).
      predefined_split: chunks carry a ``split`` column.
      errors: the bad-row collector used while reading.
      source: human-readable description of where the data came from.
    """

    schema: Schema
    users: pd.DataFrame
    items: pd.DataFrame
    interactions: Callable[[], Iterator[pd.DataFrame]]
    user_complete_chunks: bool
    predefined_split: bool
    errors: RowErrors
    source: str

    def validate_tables(self) -> None:
        """Checks the tables against the schema; raises naming the offending column."""
        for side, table in (("user", self.users), ("item", self.items)):
            expected = self.schema.table_columns(side)
            missing = [c for c in expected if c not in table.columns]
            if missing:
                raise ValueError(f"{self.source}: {side} table lacks columns {missing} required by the schema")
            key = expected[0]
            dup = table[key][table[key].duplicated()]
            if len(dup):
                raise ValueError(f"{self.source}: duplicated {key} in the {side} table, e.g. {dup.iloc[0]!r}")
