"""`ItemFrequencies`: how often each item occurs in the training interactions.

The table feeds the logQ correction of sampled-softmax retrieval (q(i) = count/total) and
orders the ``item_id`` vocabulary. Counting happens per batch with numpy inside a DoFn
(one element per batch, never one per interaction); the per-batch ``{item_id: count}``
dicts are merged by a `CombineFn`, so a runner combines them on the workers and only
one dict per worker crosses the shuffle (`CombineToSingleton`: one result, even for no
input, without a side input).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa

from beam_jobs import stats_math
from beam_jobs.singletons import CombineToSingleton
from models.features import ITEM_ID

# (item_id, count, probability), sorted by count descending then item_id ascending.
FrequencyRow = Tuple[str, int, float]


def _is_arrow(batch: Any) -> bool:
    return isinstance(batch, (pa.RecordBatch, pa.Table))


def batch_column(batch: Any, name: str) -> np.ndarray:
    """One column of a batch as a 1-D numpy array (strings as ``object``, nulls as None).

    Args:
      batch: a `pyarrow.RecordBatch`, a `pyarrow.Table`, a pandas DataFrame or a dict of
        columns (numpy arrays or lists).
      name: the column.
    """
    if _is_arrow(batch):
        if name not in batch.schema.names:
            raise ValueError(f"Batch lacks column {name!r}. Received columns: {batch.schema.names}")
        return np.asarray(batch.column(name).to_numpy(zero_copy_only=False))
    if isinstance(batch, Mapping) or hasattr(batch, "columns"):
        if name not in batch:
            raise ValueError(f"Batch lacks column {name!r}. Received columns: {list(batch.keys())}")
        column = batch[name]
        return column.to_numpy() if hasattr(column, "to_numpy") else np.asarray(column, dtype=object)
    raise TypeError("A batch should be a pyarrow RecordBatch/Table, a DataFrame or a dict of "
                    f"columns. Received: {type(batch).__name__}")


def batch_columns(batch: Any, names: Iterable[str]) -> Dict[str, Any]:
    """Several columns of a batch; list-valued Arrow columns become lists of lists."""
    out: Dict[str, Any] = {}
    for name in names:
        if _is_arrow(batch) and name in batch.schema.names:
            column = batch.column(name)
            if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                out[name] = column.to_pylist()
                continue
        out[name] = batch_column(batch, name)
    return out


def batch_rows(batch: Any) -> int:
    """The number of rows of a batch (any type `batch_column` takes)."""
    if _is_arrow(batch):
        return int(batch.num_rows)
    if hasattr(batch, "columns"):
        return len(batch)
    if isinstance(batch, Mapping):
        return len(next(iter(batch.values()))) if batch else 0
    raise TypeError("A batch should be a pyarrow RecordBatch/Table, a DataFrame or a dict of "
                    f"columns. Received: {type(batch).__name__}")


class CountBatchValues(beam.DoFn):
    """Counts the distinct values of one column of each batch with `np.unique`."""

    def __init__(self, column: str = ITEM_ID):
        super().__init__()
        self._column = column

    def process(self, batch) -> Iterable[Dict[str, int]]:
        values = batch_column(batch, self._column)
        if values.size:
            yield stats_math.count_values(values)


class SumCountsFn(beam.CombineFn):
    """Merges ``{key: count}`` dicts by adding counts (associative and commutative)."""

    def create_accumulator(self) -> Dict[Any, int]:
        return {}

    def add_input(self, accumulator, counts):
        return stats_math.merge_counts(accumulator, counts)

    def merge_accumulators(self, accumulators):
        # Only the first accumulator may be mutated (Beam's CombineFn contract).
        accumulators = iter(accumulators)
        out = next(accumulators, None)
        out = {} if out is None else out
        for other in accumulators:
            stats_math.merge_counts(out, other)
        return out

    def extract_output(self, accumulator):
        return accumulator


def frequency_rows(counts: Mapping[str, int]) -> List[FrequencyRow]:
    """The frequency table as rows ``(item_id, count, probability)``."""
    ids, values, probability, _ = stats_math.item_frequency_table(dict(counts))
    return list(zip(ids.tolist(), values.tolist(), probability.tolist()))


class ItemFrequencies(beam.PTransform):
    """Interaction batches -> one element: the item frequency table.

    Input: PCollection of batches (`pyarrow.RecordBatch`/`Table` or dict of numpy
    columns) holding an ``item_id`` column of valid (non-null) ids.
    Output: PCollection with exactly one element, a list of
    ``(item_id, count, probability)`` sorted by count descending, then item_id
    (an empty list when there is no interaction).
    """

    def __init__(self, column: str = ITEM_ID, label: str = None):
        super().__init__(label)
        self._column = column

    def expand(self, batches):
        return (
            batches
            # batch -> {item_id: count}
            | "CountPerBatch" >> beam.ParDo(CountBatchValues(self._column))
            # {item_id: count} per batch -> one {item_id: count}
            | "SumCounts" >> CombineToSingleton(SumCountsFn())
            # {item_id: count} -> [(item_id, count, probability)]
            | "ToFrequencyTable" >> beam.Map(frequency_rows))
