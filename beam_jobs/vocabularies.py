"""`Vocabularies`: one frequency-ordered vocabulary per categorical feature of the schema.

Training (lookup layers) and serving read the same files, so a token gets the same id
everywhere. Side features are counted in their own table (user features in
``users.parquet``, item features in ``items.parquet``); ``item_id`` is ordered by its
frequency in the *training interactions* (the order the logQ table and frequency-based
samplers use), followed by catalogue items never seen in training in id order, so every
candidate item has an id. Sequence features share the ``item_id`` vocabulary.

`min_count` prunes side-feature vocabularies only: ``user_id`` and ``item_id`` always
list every id of their table (serving must be able to embed every user and candidate).
The padding token ``""`` and the OOV token are never listed; the lookup layers add them.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa

from beam_jobs import stats_math
from beam_jobs.item_frequencies import FrequencyRow, batch_columns
from beam_jobs.singletons import CombineToSingleton, JoinSingletons
from models.features import ITEM_ID, USER_ID, Kind, Schema

ID_FEATURES = (USER_ID, ITEM_ID)


def table_vocabulary_features(schema: Schema, side: str) -> List[str]:
    """Columns of one table that get their own vocabulary (ids included)."""
    return [f.name for f in schema.side(side)
            if f.kind in (Kind.CATEGORICAL, Kind.MULTI_CATEGORICAL)]


def _column_tokens(batch: Any, name: str) -> np.ndarray:
    if isinstance(batch, (pa.RecordBatch, pa.Table)) and name in batch.schema.names:
        column = batch.column(name)
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            # Single-valued string column: vectorized, nulls and padding dropped.
            values = column.drop_null().to_numpy(zero_copy_only=False).astype(str)
            return values[values != ""]
    return stats_math.flatten_tokens(batch_columns(batch, [name])[name])


class CountTableTokens(beam.DoFn):
    """Table batch -> ``{feature: {token: count}}`` for the given columns."""

    def __init__(self, features: Sequence[str]):
        super().__init__()
        self._features = tuple(features)

    def process(self, batch) -> Iterable[Dict[str, Dict[str, int]]]:
        yield {f: stats_math.count_values(_column_tokens(batch, f)) for f in self._features}


class SumNestedCountsFn(beam.CombineFn):
    """Merges ``{feature: {token: count}}`` dicts."""

    def create_accumulator(self):
        return {}

    def add_input(self, accumulator, counts):
        for feature, table in counts.items():
            stats_math.merge_counts(accumulator.setdefault(feature, {}), table)
        return accumulator

    def merge_accumulators(self, accumulators):
        # Only the first accumulator may be mutated (Beam's CombineFn contract).
        accumulators = iter(accumulators)
        out = next(accumulators, None)
        out = {} if out is None else out
        for acc in accumulators:
            self.add_input(out, acc)
        return out

    def extract_output(self, accumulator):
        return accumulator


def build_table_vocabularies(counts: Mapping[str, Mapping[str, int]], features: Sequence[str],
                             min_count: int, frequencies: Sequence[FrequencyRow] = None
                             ) -> Iterable[Tuple[str, List[str]]]:
    """``(feature, tokens)`` for every feature of one table.

    Args:
      counts: ``{feature: {token: count}}`` over the table.
      features: the table's vocabulary features.
      min_count: pruning threshold for non-id features.
      frequencies: the item frequency table, required to order ``item_id``.
    """
    for feature in features:
        table = counts.get(feature, {})
        if feature == ITEM_ID:
            if frequencies is None:
                raise ValueError("`frequencies` is required to build the item_id vocabulary.")
            yield feature, stats_math.id_vocabulary([row[0] for row in frequencies], table.keys())
        elif feature in ID_FEATURES:
            yield feature, stats_math.build_vocabulary(table, min_count=1)
        else:
            yield feature, stats_math.build_vocabulary(table, min_count=min_count)


class Vocabularies(beam.PTransform):
    """Tables + item frequencies -> one ``(vocabulary_name, [token, ...])`` per vocabulary.

    Input: a dict of PCollections
      ``{"users": batches of the user table, "items": batches of the item table,
      "item_frequencies": the single element of `ItemFrequencies`}``
    (batches: `pyarrow.RecordBatch`/`Table` or dicts of columns, rows with a valid id).
    Output: PCollection of ``(name, tokens)``, one per name of
    ``schema.vocabulary_names()``, tokens most frequent first.
    """

    def __init__(self, schema: Schema, min_count: int = 1, label: str = None):
        super().__init__(label)
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"`min_count` should be a positive integer. Received: min_count={min_count!r}")
        self._schema = schema
        self._min_count = min_count

    def expand(self, pcolls):
        missing = {"users", "items", "item_frequencies"} - set(pcolls)
        if missing:
            raise ValueError(f"Vocabularies needs PCollections {sorted(missing)}. Received: {sorted(pcolls)}")
        user_features = table_vocabulary_features(self._schema, "user")
        item_features = table_vocabulary_features(self._schema, "item")

        user_vocabularies = (
            pcolls["users"]
            # user-table batch -> {feature: {token: count}}
            | "CountUserTokens" >> beam.ParDo(CountTableTokens(user_features))
            # per batch -> one {feature: {token: count}}
            | "SumUserCounts" >> CombineToSingleton(SumNestedCountsFn())
            # {feature: {token: count}} -> (feature, [token, ...]) per user feature
            | "BuildUserVocabularies" >> beam.FlatMap(
                build_table_vocabularies, user_features, self._min_count))

        item_counts = (
            pcolls["items"]
            # item-table batch -> {feature: {token: count}}
            | "CountItemTokens" >> beam.ParDo(CountTableTokens(item_features))
            # per batch -> one {feature: {token: count}}
            | "SumItemCounts" >> CombineToSingleton(SumNestedCountsFn()))
        item_vocabularies = (
            {"counts": item_counts, "frequencies": pcolls["item_frequencies"]}
            # -> {"counts": {feature: {token: count}}, "frequencies": [(item_id, count, p)]}
            | "JoinItemCountsAndFrequencies" >> JoinSingletons()
            # -> (feature, [token, ...]) per item feature
            | "BuildItemVocabularies" >> beam.FlatMap(
                lambda joined, features, min_count: build_table_vocabularies(
                    joined["counts"], features, min_count, joined["frequencies"]),
                item_features, self._min_count))

        # (feature, [token, ...]) from both tables
        return (user_vocabularies, item_vocabularies) | "FlattenVocabularies" >> beam.Flatten()
