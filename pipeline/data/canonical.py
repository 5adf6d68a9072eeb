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
row; ``"skip"`` counts it by reason, keeps the first examples, and goes on.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from typing import Any, Callable, Dict, Iterator, List, Optional

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
               kind: Optional[str] = None) -> None:
        """Records one bad row; raises `DataError` under the ``fail`` policy.

        `kind` is the counter key (defaults to `reason`); keep it free of row values so
        counts aggregate.
        """
        err = DataError(path, line, field, reason)
        if self.policy == "fail":
            raise err
        self.rejected_by_table.setdefault(self._table, collections.Counter())[kind or reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append({"file": path, "line": line, "field": field, "reason": reason})

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
