"""The statistics stage: one Beam pipeline over a materialized dataset.

Reads ``<data_dir>`` (layout in `models.data_layout`: ``interactions/train-*.parquet``,
``items.parquet``, ``users.parquet``, ``schema.json``) and writes into ``<output_dir>``::

    item_frequencies.csv   item_id,count,probability (count desc, then item_id)
    feature_mi.json        {"features", "mi", "normalized_mi", "num_items"}
    vocab/<name>.txt       one token per line, most frequent first
    dead_letter.jsonl      one JSON object per malformed record (no particular order):
                           {"file", "record" (0-based row in the file), "reason",
                            "user_id", "item_id"}, then one per row the reader rejected:
                           {"file", "record" (its line), "field", "reason", "stage": "reader"}
    summary.json           rows read/rejected by reason, runtime, runner, sizes (its presence,
                           next to nothing but these files, marks a statistics output)

Rejection reasons for interactions, checked in this order (a row gets the first):
``null_user_id``, ``empty_user_id``, ``null_item_id``, ``empty_item_id``,
``unknown_item_id`` (absent from the item table), ``null_label`` (null/NaN label, only
when frequencies count positives). Item/user table rows with a null or empty id are
rejected too (``summary["tables"]``) and left out of every statistic.

Item frequencies count the valid training rows that retrieval trains on: rows with
``label > 0`` when the schema has a label (`positives`), every row otherwise.

Parquet files are read one row group per element by `ReadParquetRowGroups` (instead
of ``beam.io.ReadFromParquetBatched``, which yields bare tables and so cannot say which
file and row a malformed record came from). Everything else flows through Beam: counts
are computed per batch with numpy and merged by CombineFns; only the small final
tables are written by single-element steps; the dead letters of each row group are
written by a worker to a part file, and the parts are concatenated at the end (a
stream copy: they are never collected in memory).

The same pipeline runs on every runner, including Beam's DaskRunner, whose
translation (Beam 2.77) supports only a subset of the model; so the job keeps to it:

- no multi-output ParDo: the DaskRunner puts every tagged output of a ParDo into one
  bag, so each consumer would receive all of them (valid rows, dead letters and count
  dicts mixed). The validation steps emit ``(kind, payload)`` pairs on their single
  output instead, and `SplitByKind` selects each kind in its own step.
- one sink at the end: the DaskRunner computes only the last transform of the graph
  (and what it depends on through main inputs), so a step with no consumer never runs.
  Every write step outputs the paths it wrote, and ``CheckWrittenFiles``, applied last,
  consumes them all (and fails the job unless each file was written exactly once).
- side inputs only where a value must be broadcast: the DaskRunner recomputes a side
  input, and everything upstream of it, inside every task that reads it. Global
  combines use `beam_jobs.singletons.CombineToSingleton` and values meet through
  `JoinSingletons` (main inputs only); the one side input left is the sorted item ids
  that validate each interaction row group (the item table is read once more per Dask
  partition of interactions). ``WriteToText`` is not used either: it takes its
  temporary directory (a fresh name per call) from a side input, which left an empty
  ``beam-temp-*`` directory in the output on Dask. Dead letters are written as
  content-named part files (a retried task rewrites the same file) and concatenated
  by one step.

On Dask a Beam bundle is a Dask partition: ``beam.Create`` puts up to 128 elements in
one (``--dask_partition_size`` / ``--dask_npartitions`` change that), and the steps
after it keep its partitioning (``Reshuffle`` is a no-op there). The job creates one
element per Parquet *file*, so ``--dask_partition_size=1`` lets the workers read the
interaction shards in parallel.

The rejected fraction is rejected interaction rows / interaction rows read from the
input: the rows of every split in ``<data_dir>`` plus the interaction rows the reader
rejected before writing it (``upstream_rejections``); rejected rows are those plus the
training rows this job rejects. User and item rows the reader rejected are counted
under their table in the summary's ``tables``, not in that fraction.

The pipeline writes into a temporary sibling of ``output_dir``; only after the
pipeline succeeded and the rejected fraction is within bounds is it moved into place,
so a failed run leaves nothing half-written. An existing ``output_dir`` is replaced
only when it is empty or a previous statistics output (`check_output_dir`): an existing
file, or a directory holding anything else, is refused before any work.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import time
import uuid
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.runners.direct.direct_runner import DirectRunner

from beam_jobs.feature_mi import FeatureMutualInformation
from beam_jobs.item_frequencies import ItemFrequencies, SumCountsFn
from beam_jobs.options import resolve_runner, runner_family, validate_pipeline_args
from beam_jobs.singletons import CombineToSingleton, JoinSingletons
from beam_jobs.vocabularies import Vocabularies, table_vocabulary_features
from models import data_layout
from models.data_layout import DataError
from models.features import ITEM_ID, LABEL, USER_ID, Schema

FREQUENCIES_FILE = "item_frequencies.csv"
FEATURE_MI_FILE = "feature_mi.json"
VOCAB_DIR = "vocab"
DEAD_LETTER_FILE = "dead_letter.jsonl"
DEAD_LETTER_PARTS_DIR = "dead_letter.parts"
SUMMARY_FILE = "summary.json"
# Everything a finished run leaves in its output directory.
OUTPUT_ENTRIES = frozenset((FREQUENCIES_FILE, FEATURE_MI_FILE, VOCAB_DIR, DEAD_LETTER_FILE, SUMMARY_FILE))

METRICS_NAMESPACE = "recfunnel.stats"
# Kinds of the validation steps' (kind, payload) outputs, split by `SplitByKind`.
VALID, DEAD_LETTER, COUNTS = "valid", "dead_letter", "counts"
OUTPUT_KINDS = (VALID, DEAD_LETTER, COUNTS)
INTERACTION_REASONS = ("null_user_id", "empty_user_id", "null_item_id", "empty_item_id",
                       "unknown_item_id", "null_label")
POSITIVES = ("auto", "all", "label")

# (file, first_row, table): one Parquet row group and the file row of its first record.
LocatedBatch = Tuple[str, int, pa.Table]


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.6g}%"


class TooManyRejectedRows(DataError):
    """More rows were rejected than `max_rejected_fraction` allows (bad input data).

    `rows_read` counts every row read from the input (all splits plus the rejected
    rows); `source` names that input.
    """

    def __init__(self, rows_read: int, rows_rejected: int, rejected_by_reason: Dict[str, int],
                 max_rejected_fraction: float, source: str):
        self.rows_read = rows_read
        self.rows_rejected = rows_rejected
        self.rejected_by_reason = dict(rejected_by_reason)
        self.max_rejected_fraction = max_rejected_fraction
        fraction = rows_rejected / rows_read if rows_read else 1.0
        super().__init__(
            source, None, None,
            f"{rows_rejected} of {rows_read} interaction rows read were rejected as malformed "
            f"({_percent(fraction)} > max_rejected_fraction={_percent(max_rejected_fraction)}); "
            f"by reason: {self.rejected_by_reason}. No statistics were written.")


class OutputNotReplaceable(ValueError):
    """The output path is an existing file, or a directory the job did not write."""


# -- reading --------------------------------------------------------------------
def _match(pattern: str) -> List[str]:
    result = FileSystems.match([pattern])[0]
    return sorted(m.path for m in result.metadata_list)


def _list_row_groups(path: str) -> Iterable[Tuple[str, int, int]]:
    """``(file, row_group, first_row)`` for each row group of a Parquet file."""
    with FileSystems.open(path, compression_type="uncompressed") as f:
        metadata = pq.ParquetFile(f).metadata
    first_row = 0
    for index in range(metadata.num_row_groups):
        yield path, index, first_row
        first_row += metadata.row_group(index).num_rows


class _ReadRowGroup(beam.DoFn):
    def __init__(self, columns: Sequence[str]):
        super().__init__()
        self._columns = list(columns)

    def process(self, element) -> Iterable[LocatedBatch]:
        path, index, first_row = element
        with FileSystems.open(path, compression_type="uncompressed") as f:
            parquet = pq.ParquetFile(f)
            missing = [c for c in self._columns if c not in parquet.schema_arrow.names]
            if missing:
                raise ValueError(f"{path} lacks columns {missing}; it has {parquet.schema_arrow.names}")
            table = parquet.read_row_group(index, columns=self._columns)
        yield path, first_row, table


class ReadParquetRowGroups(beam.PTransform):
    """Parquet files -> one ``(file, first_row, pyarrow.Table)`` per row group.

    Row groups are spread over workers by a reshuffle of their (small) descriptors;
    each worker then reads only its row group's `columns`. (On Dask, where
    ``Reshuffle`` is a no-op, files are spread by the partitioning of the ``Create``:
    see the module docstring.)
    """

    def __init__(self, files: Sequence[str], columns: Sequence[str], label: str = None):
        super().__init__(label)
        if not files:
            raise ValueError("`files` should list at least one Parquet file. Received: files=[]")
        self._files = list(files)
        self._columns = list(columns)

    def expand(self, pbegin):
        return (
            pbegin
            # file path
            | "ListFiles" >> beam.Create(self._files)
            # (file, row_group, first_row)
            | "ListRowGroups" >> beam.FlatMap(_list_row_groups)
            | "SpreadRowGroups" >> beam.Reshuffle()
            # (file, first_row, table)
            | "ReadRowGroup" >> beam.ParDo(_ReadRowGroup(self._columns)))


# -- validation -----------------------------------------------------------------
def _as_string_column(table: pa.Table, name: str) -> pa.ChunkedArray:
    column = table.column(name)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        column = pc.cast(column, pa.string())
    return column


def _null_and_empty(column: pa.ChunkedArray) -> Tuple[np.ndarray, np.ndarray]:
    null = column.is_null().to_numpy(zero_copy_only=False)
    empty = pc.fill_null(pc.equal(column, ""), False).to_numpy(zero_copy_only=False)
    return np.asarray(null, bool), np.asarray(empty, bool)


def _dead_letters(path: str, first_row: int, rows: np.ndarray, reasons: np.ndarray,
                  table: pa.Table, id_columns: Sequence[str]) -> Iterable[str]:
    values = {c: table.column(c).take(pa.array(rows)).to_pylist() for c in id_columns}
    for k, (row, reason) in enumerate(zip(rows.tolist(), reasons.tolist())):
        record = {"file": path, "record": first_row + int(row), "reason": reason}
        record.update({c: values[c][k] for c in id_columns})
        yield json.dumps(record, sort_keys=True, default=str)


def _select_kind(element: Tuple[str, Any], kind: str) -> Iterable[Any]:
    if element[0] == kind:
        yield element[1]


class SplitByKind(beam.PTransform):
    """``(kind, payload)`` pairs -> ``{kind: PCollection of its payloads}``.

    Stands in for a multi-output ParDo (``with_outputs``), which the DaskRunner does
    not keep apart (see the module docstring): one ``Select<Kind>`` step per kind reads
    the single output. Payloads of a kind not in `kinds` are dropped.
    """

    def __init__(self, kinds: Sequence[str] = OUTPUT_KINDS, label: str = None):
        super().__init__(label)
        if not kinds or len(set(kinds)) != len(kinds):
            raise ValueError(f"`kinds` should be distinct and not empty. Received: kinds={list(kinds)}")
        self._kinds = tuple(kinds)

    def expand(self, pairs):
        step = lambda kind: "Select" + "".join(w.capitalize() for w in kind.split("_"))  # noqa: E731
        # (kind, payload) -> payload, one PCollection per kind
        return {kind: pairs | step(kind) >> beam.FlatMap(_select_kind, kind) for kind in self._kinds}


class ValidateInteractions(beam.DoFn):
    """Splits a row group into valid training rows, dead letters and counts.

    With `positives_only`, the row group must carry a ``label`` column: a null/NaN label
    is malformed, and only rows with ``label > 0`` are training positives (retrieval
    trains on positives, so q(i) counts them).

    Output: ``(kind, payload)`` pairs (split them with `SplitByKind`):
      ``("valid", pyarrow.Table)``: ``user_id``, ``item_id`` (strings) of the valid rows,
        restricted to positives under `positives_only` (none when no row is kept);
      ``("dead_letter", [str, ...])``: one per row group with rejected rows, a JSON line
        per rejected row;
      ``("counts", dict)``: exactly one per row group, ``{"interactions/rows_read": n,
        "interactions/positive_rows": m, "interactions/<reason>": k}``.
    """

    VALID = VALID
    DEAD_LETTER = DEAD_LETTER
    COUNTS = COUNTS

    def __init__(self, positives_only: bool = False):
        super().__init__()
        self._positives_only = bool(positives_only)
        self._rows_read = Metrics.counter(METRICS_NAMESPACE, "interactions_read")
        self._rejected = {r: Metrics.counter(METRICS_NAMESPACE, f"interactions_rejected_{r}")
                          for r in INTERACTION_REASONS}

    def process(self, element: LocatedBatch, item_ids: np.ndarray):
        path, first_row, table = element
        user = _as_string_column(table, USER_ID)
        item = _as_string_column(table, ITEM_ID)
        user_null, user_empty = _null_and_empty(user)
        item_null, item_empty = _null_and_empty(item)
        item_str = item.fill_null("").to_numpy(zero_copy_only=False).astype(str)
        uniques, inverse = np.unique(item_str, return_inverse=True)
        position = np.minimum(np.searchsorted(item_ids, uniques), max(len(item_ids) - 1, 0))
        known = (item_ids[position] == uniques) if len(item_ids) else np.zeros(len(uniques), bool)
        unknown = ~known[inverse.reshape(-1)]

        if self._positives_only:
            label = table.column(LABEL)
            label_null = np.asarray(pc.is_null(label, nan_is_null=True).to_numpy(zero_copy_only=False), bool)
            positive = np.asarray(pc.fill_null(pc.greater(label, 0), False).to_numpy(zero_copy_only=False),
                                  bool)
        else:
            label_null = np.zeros(table.num_rows, bool)
            positive = np.ones(table.num_rows, bool)
        conditions = [user_null, user_empty, item_null, item_empty, unknown, label_null]
        bad = np.logical_or.reduce(conditions)
        n = table.num_rows
        keep = ~bad & positive
        self._rows_read.inc(n)
        counts = {"interactions/rows_read": n, "interactions/positive_rows": int(keep.sum())}
        if bad.any():
            reasons = np.select(conditions, INTERACTION_REASONS, default="")
            rows = np.flatnonzero(bad)
            for reason in INTERACTION_REASONS:
                k = int(np.count_nonzero(reasons[rows] == reason))
                if k:
                    counts[f"interactions/{reason}"] = k
                    self._rejected[reason].inc(k)
            yield DEAD_LETTER, list(_dead_letters(path, first_row, rows, reasons[rows], table,
                                                  (USER_ID, ITEM_ID)))
        yield COUNTS, counts
        if keep.any():
            valid = pa.table({USER_ID: user, ITEM_ID: item})
            yield VALID, (valid if keep.all() else valid.filter(pa.array(keep)))


class ValidateTable(beam.DoFn):
    """Drops user/item table rows whose id is null or empty.

    Output: ``(kind, payload)`` pairs as `ValidateInteractions`: ``("valid", table)``
    with the id column as strings, ``("dead_letter", [line, ...])``, ``("counts",
    {"<table_name>/rows_read": n, "<table_name>/<reason>": k})``.
    """

    def __init__(self, table_name: str, id_column: str):
        super().__init__()
        self._name = table_name
        self._id = id_column
        self._rows_read = Metrics.counter(METRICS_NAMESPACE, f"{table_name}_read")
        self._rejected = Metrics.counter(METRICS_NAMESPACE, f"{table_name}_rejected")

    def process(self, element: LocatedBatch):
        path, first_row, table = element
        ids = _as_string_column(table, self._id)
        null, empty = _null_and_empty(ids)
        bad = null | empty
        table = table.set_column(table.schema.get_field_index(self._id), self._id, ids)
        counts = {f"{self._name}/rows_read": table.num_rows}
        self._rows_read.inc(table.num_rows)
        if bad.any():
            reason_names = (f"null_{self._id}", f"empty_{self._id}")
            reasons = np.select([null, empty], reason_names, default="")
            rows = np.flatnonzero(bad)
            for reason in reason_names:
                k = int(np.count_nonzero(reasons[rows] == reason))
                if k:
                    counts[f"{self._name}/{reason}"] = k
            self._rejected.inc(int(bad.sum()))
            yield DEAD_LETTER, list(_dead_letters(path, first_row, rows, reasons[rows], table, (self._id,)))
            table = table.filter(pa.array(~bad))
        yield COUNTS, counts
        if table.num_rows:
            yield VALID, table


class SortedIdsFn(beam.CombineFn):
    """Tables -> sorted unique array of one string column (the item-id side input)."""

    def __init__(self, column: str):
        super().__init__()
        self._column = column

    def create_accumulator(self):
        return []

    def add_input(self, accumulator, table):
        accumulator.append(table.column(self._column).to_numpy(zero_copy_only=False).astype(str))
        return accumulator

    def merge_accumulators(self, accumulators):
        accumulators = iter(accumulators)
        out = next(accumulators, None)
        out = [] if out is None else out
        for other in accumulators:
            out.extend(other)
        return out

    def extract_output(self, accumulator):
        if not accumulator:
            return np.zeros(0, dtype=str)
        return np.unique(np.concatenate(accumulator))


# -- writing --------------------------------------------------------------------
def _write_text(path: str, text: str) -> None:
    with FileSystems.create(path, compression_type="uncompressed") as f:
        f.write(text.encode("utf-8"))


def write_frequencies(rows: Sequence[Tuple[str, int, float]], path: str) -> str:
    """Writes the frequency table as CSV; returns `path`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["item_id", "count", "probability"])
    for item_id, count, probability in rows:
        writer.writerow([item_id, int(count), repr(float(probability))])
    _write_text(path, buffer.getvalue())
    return path


def write_vocabulary(element: Tuple[str, List[str]], vocab_dir: str) -> str:
    """Writes ``vocab_dir/<name>.txt``, one token per line; returns its path."""
    name, tokens = element
    bad = [t for t in tokens if "\n" in t or "\r" in t]
    if bad:
        raise ValueError(f"Vocabulary {name!r} has tokens with line breaks, which a vocabulary "
                         f"file cannot hold, e.g. {bad[0]!r}")
    path = FileSystems.join(vocab_dir, f"{name}.txt")
    _write_text(path, "".join(t + "\n" for t in tokens))
    return path


def write_json(obj: Any, path: str) -> str:
    """Writes `obj` as indented, key-sorted JSON; returns `path`."""
    _write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
    return path


def write_lines_part(lines: Sequence[str], parts_dir: str) -> str:
    """Writes `lines` to ``parts_dir/<sha1 of the content>.txt``; returns its path.

    Named by content, so a retried task rewrites the same file instead of adding one.
    """
    text = "".join(line + "\n" for line in lines).encode("utf-8")
    path = FileSystems.join(parts_dir, hashlib.sha1(text).hexdigest() + ".txt")
    with FileSystems.create(path, compression_type="uncompressed") as f:
        f.write(text)
    return path


def concatenate_parts(parts: Sequence[str], path: str) -> str:
    """Concatenates the part files (in name order, duplicates once) into `path`, then
    deletes them and their directory; returns `path`."""
    parts = sorted(set(parts))
    if parts and not FileSystems.exists(parts[0]) and FileSystems.exists(path):
        return path  # a retry after a finished concatenation
    with FileSystems.create(path, compression_type="uncompressed") as out:
        for part in parts:
            with FileSystems.open(part, compression_type="uncompressed") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    if parts:
        FileSystems.delete(parts)
        parts_dir = FileSystems.split(parts[0])[0]
        if _is_local(parts_dir):
            shutil.rmtree(parts_dir, ignore_errors=True)
    return path


def check_written_files(paths: Sequence[str], expected: Sequence[str]) -> List[str]:
    """Fails unless `paths` (what the write steps report) is `expected`, each once.

    Returns the sorted paths.
    """
    written = sorted(paths)
    if written != sorted(expected):
        missing = sorted(set(expected) - set(written))
        extra = sorted(set(written) - set(expected))
        repeated = sorted({p for p in written if written.count(p) > 1})
        raise RuntimeError(f"The statistics pipeline did not write each output exactly once: missing "
                           f"{missing}, unexpected {extra}, written more than once {repeated}.")
    return written


def summarize_counts(counts: Dict[str, int], num_frequent_items: int,
                     vocabulary_sizes: Dict[str, int]) -> Dict[str, Any]:
    """Nests ``{"<table>/<key>": n}`` into the summary's counting part.

    ``validated_rows`` counts the interaction rows this job read and checked (one
    split); `run_statistics` adds ``rows_read``, the rows read from the input.
    """
    tables: Dict[str, Dict[str, Any]] = {}
    for key, value in counts.items():
        table, name = key.split("/", 1)
        entry = tables.setdefault(table, {"rows_read": 0, "rejected_by_reason": {}})
        if name in ("rows_read", "positive_rows"):
            entry[name] = int(value)
        else:
            entry["rejected_by_reason"][name] = int(value)
    for entry in tables.values():
        entry["rows_rejected"] = int(sum(entry["rejected_by_reason"].values()))
        entry["rejected_by_reason"] = dict(sorted(entry["rejected_by_reason"].items()))
    interactions = tables.pop("interactions", {"rows_read": 0, "rows_rejected": 0,
                                               "rejected_by_reason": {}})
    return {
        "validated_rows": interactions["rows_read"],
        "positive_rows": interactions.get("positive_rows", 0),
        "rows_rejected": interactions["rows_rejected"],
        "rejected_by_reason": interactions["rejected_by_reason"],
        "tables": dict(sorted(tables.items())),
        "distinct_items_in_interactions": int(num_frequent_items),
        "vocabulary_sizes": dict(sorted(vocabulary_sizes.items())),
    }


def positives_only(schema: Schema, positives: str) -> bool:
    """Whether item frequencies count only ``label > 0`` rows (``auto``: iff a label exists)."""
    if positives not in POSITIVES:
        raise ValueError(f"`positives` should be one of {POSITIVES}. Received: positives={positives!r}")
    if positives == "label" and not schema.has_label:
        raise ValueError(f"`positives` is 'label' but dataset {schema.name!r} has no label column.")
    return positives == "label" or (positives == "auto" and schema.has_label)


def build_statistics_pipeline(pipeline: beam.Pipeline, data_dir: str, write_dir: str,
                              schema: Schema, min_count: int = 1, split: str = "train",
                              positives: str = "auto") -> None:
    """Adds every step of the statistics job to `pipeline`, writing into `write_dir`."""
    only_positives = positives_only(schema, positives)
    interaction_files = _match(FileSystems.join(data_dir, data_layout.INTERACTIONS_DIR,
                                                f"{split}-*.parquet"))
    if not interaction_files:
        raise FileNotFoundError(
            f"No {split} interaction shards in {FileSystems.join(data_dir, data_layout.INTERACTIONS_DIR)} "
            f"(expected {split}-00000-of-0000N.parquet)")
    items_file = FileSystems.join(data_dir, data_layout.ITEMS_FILE)
    users_file = FileSystems.join(data_dir, data_layout.USERS_FILE)
    for path in (items_file, users_file):
        if not FileSystems.exists(path):
            raise FileNotFoundError(f"Missing table {path}")
    item_columns = table_vocabulary_features(schema, "item")
    mi_features = schema.categorical_item_features()
    item_columns += [f for f in mi_features if f not in item_columns]
    user_columns = table_vocabulary_features(schema, "user")

    # items.parquet -> (file, first_row, row group) -> ("valid", item table), ("dead_letter",
    #   JSON line), ("counts", {"items/<key>": n}) -> {kind: PCollection}
    item_batches = (pipeline
                    | "ReadItems" >> ReadParquetRowGroups([items_file], item_columns)
                    | "ValidateItems" >> beam.ParDo(ValidateTable("items", ITEM_ID))
                    | "SplitItems" >> SplitByKind())
    # users.parquet -> (file, first_row, row group) -> (kind, payload) -> {kind: PCollection}
    user_batches = (pipeline
                    | "ReadUsers" >> ReadParquetRowGroups([users_file], user_columns)
                    | "ValidateUsers" >> beam.ParDo(ValidateTable("users", USER_ID))
                    | "SplitUsers" >> SplitByKind())
    # item table -> sorted array of every item id (side input of the validation)
    item_ids = item_batches[VALID] | "CollectItemIds" >> CombineToSingleton(SortedIdsFn(ITEM_ID))

    # train-*.parquet -> (file, first_row, row group) -> ("valid", (positive) interaction table
    #   with user_id, item_id), dead letters, {"interactions/<key>": n} -> {kind: PCollection}
    interactions = (pipeline
                    | "ReadInteractions" >> ReadParquetRowGroups(
                        interaction_files, [USER_ID, ITEM_ID] + ([LABEL] if only_positives else []))
                    | "ValidateInteractions" >> beam.ParDo(
                        ValidateInteractions(only_positives), beam.pvalue.AsSingleton(item_ids))
                    | "SplitInteractions" >> SplitByKind())

    # valid (positive) interaction table -> [(item_id, count, probability)]
    frequencies = interactions[VALID] | "ItemFrequencies" >> ItemFrequencies()
    # tables + frequencies -> (vocabulary name, [token, ...])
    vocabularies = ({"users": user_batches[VALID], "items": item_batches[VALID],
                     "item_frequencies": frequencies}
                    | "Vocabularies" >> Vocabularies(schema, min_count=min_count))
    # valid item table -> {"features", "mi", "normalized_mi", "num_items"}
    mutual_information = item_batches[VALID] | "FeatureMutualInformation" >> FeatureMutualInformation(
        mi_features)
    # {"<table>/<key>": n} per row group -> one dict
    counts = ((interactions[COUNTS], item_batches[COUNTS], user_batches[COUNTS])
              | "FlattenCounts" >> beam.Flatten()
              | "SumCounts" >> CombineToSingleton(SumCountsFn()))
    # [JSON line per malformed record] per row group with malformed records
    dead_letters = ((interactions[DEAD_LETTER], item_batches[DEAD_LETTER], user_batches[DEAD_LETTER])
                    | "FlattenDeadLetters" >> beam.Flatten())

    # Every write step outputs the path(s) it wrote.
    frequencies_file = FileSystems.join(write_dir, FREQUENCIES_FILE)
    written_frequencies = frequencies | "WriteFrequencies" >> beam.Map(write_frequencies, frequencies_file)
    vocab_dir = FileSystems.join(write_dir, VOCAB_DIR)
    written_vocabularies = vocabularies | "WriteVocabularies" >> beam.Map(write_vocabulary, vocab_dir)
    mi_file = FileSystems.join(write_dir, FEATURE_MI_FILE)
    written_mi = mutual_information | "WriteMutualInformation" >> beam.Map(write_json, mi_file)
    dead_letter_file = FileSystems.join(write_dir, DEAD_LETTER_FILE)
    written_dead_letters = (dead_letters
                            # [line, ...] -> path of a part file holding them
                            | "WriteDeadLetterParts" >> beam.Map(
                                write_lines_part, FileSystems.join(write_dir, DEAD_LETTER_PARTS_DIR))
                            # -> [part path, ...]
                            | "ListDeadLetterParts" >> CombineToSingleton(beam.combiners.ToListCombineFn())
                            # -> the concatenation's path (parts deleted)
                            | "ConcatenateDeadLetters" >> beam.Map(concatenate_parts, dead_letter_file))
    # {name: size} of the vocabularies
    vocabulary_sizes = (vocabularies
                        | "VocabularySizes" >> beam.MapTuple(lambda name, tokens: (name, len(tokens)))
                        | "CollectVocabularySizes" >> CombineToSingleton(beam.combiners.ToDictCombineFn()))
    # number of distinct items in the valid interactions
    num_frequent_items = frequencies | "CountDistinctItems" >> beam.Map(len)
    summary_file = FileSystems.join(write_dir, SUMMARY_FILE)
    written_summary = (
        {"counts": counts, "num_frequent_items": num_frequent_items, "vocabulary_sizes": vocabulary_sizes}
        # -> {"counts": {"<table>/<key>": n}, "num_frequent_items": n, "vocabulary_sizes": {name: n}}
        | "JoinSummaryParts" >> JoinSingletons()
        # -> summary dict (runtime and runner are added by the driver)
        | "SummarizeCounts" >> beam.Map(lambda parts: summarize_counts(
            parts["counts"], parts["num_frequent_items"], parts["vocabulary_sizes"]))
        | "WriteSummary" >> beam.Map(write_json, summary_file))

    # Applied last, and fed by every write: a runner that executes only what the final
    # step depends on (the DaskRunner) still runs every write.
    expected = [frequencies_file, mi_file, dead_letter_file, summary_file] + [
        FileSystems.join(vocab_dir, f"{name}.txt") for name in user_columns + table_vocabulary_features(
            schema, "item")]
    _ = ((written_frequencies, written_vocabularies, written_mi, written_dead_letters, written_summary)
         # path of each written file
         | "FlattenWrittenFiles" >> beam.Flatten()
         # -> [path, ...]
         | "ListWrittenFiles" >> CombineToSingleton(beam.combiners.ToListCombineFn())
         # -> sorted paths, or a failure unless every output was written exactly once
         | "CheckWrittenFiles" >> beam.Map(check_written_files, expected))


# -- publishing -----------------------------------------------------------------
def _is_local(path: str) -> bool:
    return "://" not in path


def stage_dataset(local_dir: str, target_dir: str) -> None:
    """Copies a dataset materialized on this machine to `target_dir`, on any filesystem Beam
    knows (e.g. ``gs://`` for Dataflow, whose workers cannot read this machine's disk)."""
    for root, _, names in os.walk(local_dir):
        for name in sorted(names):
            source = os.path.join(root, name)
            parts = os.path.relpath(source, local_dir).split(os.sep)
            target = FileSystems.join(target_dir, *parts)
            if _is_local(target):
                os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(source, "rb") as fin, FileSystems.create(target, compression_type="uncompressed") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)


def staging_dir(pipeline_args: Sequence[str]) -> Optional[str]:
    """Where the dataset must be copied for the workers of the runner `pipeline_args` name: a new
    directory under Dataflow's ``--temp_location``; None for runners that read this machine's disk
    (Direct, and Flink, Spark or Dask with workers here)."""
    options = PipelineOptions(list(pipeline_args))
    if runner_family(resolve_runner(options.view_as(StandardOptions).runner)) != "dataflow":
        return None
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    return f"{options.view_as(GoogleCloudOptions).temp_location.rstrip('/')}/recfunnel-stats-{uuid.uuid4().hex}"


def _remove(path: str) -> None:
    if _is_local(path):
        shutil.rmtree(path, ignore_errors=True)
    elif FileSystems.exists(path):
        FileSystems.delete([path])


def _is_statistics_summary(path: str) -> bool:
    try:
        summary = _read_json(path)
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and {"rows_rejected", "vocabulary_sizes"} <= summary.keys()


def _existing(output_dir: str) -> Tuple[str, List[str]]:
    """``("absent", [])``, ``("file", [])`` or ``("dir", [names directly inside])``."""
    if _is_local(output_dir):
        if os.path.isdir(output_dir):
            return "dir", sorted(os.listdir(output_dir))
        return ("file" if os.path.lexists(output_dir) else "absent"), []
    # Object stores: a "directory" is the prefix of the objects under it.
    prefix = output_dir.rstrip("/") + "/"
    names = sorted({p[len(prefix):].split("/", 1)[0] for p in _match(prefix + "**") if p.startswith(prefix)})
    if names:
        return "dir", names
    return ("file" if FileSystems.exists(output_dir) else "absent"), []


def check_output_dir(output_dir: str, name: str = "output_dir") -> None:
    """Raises `OutputNotReplaceable` unless the job may write `output_dir`.

    It may when nothing is there, when it is an empty directory, or when it is a
    previous statistics output: a directory with this job's ``summary.json`` and
    nothing but the files the job writes (`OUTPUT_ENTRIES`). Those are replaced as a
    whole on success; anything else (a file, a directory with other files) would be
    lost, so it is refused. `name` is how messages call the path (e.g. ``--output``).
    """
    kind, entries = _existing(output_dir)
    if kind == "absent" and _is_local(output_dir):  # its parent must be (or become) a writable directory
        parent = os.path.dirname(os.path.abspath(output_dir))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise OutputNotReplaceable(
                f"{name} {output_dir!r} cannot be created: {parent!r} is "
                + ("a file, not a directory" if not os.path.isdir(parent) else "not writable"))
    if kind == "absent" or (kind == "dir" and not entries):
        return
    if kind == "file":
        raise OutputNotReplaceable(
            f"{name} {output_dir!r} is an existing file, not a directory; the statistics job writes a "
            "directory there. Choose a new or empty directory.")
    foreign = [e for e in entries if e not in OUTPUT_ENTRIES]
    if SUMMARY_FILE not in entries or not _is_statistics_summary(FileSystems.join(output_dir, SUMMARY_FILE)):
        why = f"it has no statistics {SUMMARY_FILE}"
    elif foreign:
        why = f"besides the statistics it holds {foreign[:5]}" + (" ..." if len(foreign) > 5 else "")
    else:
        return
    raise OutputNotReplaceable(
        f"{name} {output_dir!r} is a non-empty directory that is not a previous statistics output "
        f"({why}; it holds {entries[:5]}{' ...' if len(entries) > 5 else ''}). The job replaces its output "
        "directory as a whole, which would delete these files. Choose a new or empty directory.")


def _publish(write_dir: str, output_dir: str) -> None:
    """Moves the finished `write_dir` to `output_dir`, replacing what was there
    (`check_output_dir` has allowed it)."""
    if _is_local(output_dir):
        backup = None
        if os.path.exists(output_dir):
            backup = f"{output_dir}.old-{uuid.uuid4().hex[:8]}"
            os.rename(output_dir, backup)
        os.rename(write_dir, output_dir)
        if backup:
            shutil.rmtree(backup, ignore_errors=True)
        return
    # Object stores have no directory rename: replace file by file (not atomic, but
    # only reached after the whole pipeline succeeded).
    if FileSystems.exists(output_dir):
        FileSystems.delete([output_dir])
    sources = sorted(m.path for m in FileSystems.match([FileSystems.join(write_dir, "**")])[0].metadata_list)
    destinations = [output_dir.rstrip("/") + s[len(write_dir.rstrip("/")):] for s in sources]
    FileSystems.rename(sources, destinations)
    _remove(write_dir)


def _read_json(path: str) -> Dict[str, Any]:
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return json.loads(f.read().decode("utf-8"))


def _rows_by_split(data_dir: str, split: str) -> Dict[str, int]:
    """Interaction rows of each split in `data_dir` (from the Parquet footers)."""
    rows = {}
    for name in dict.fromkeys(data_layout.SPLITS + (split,)):
        files = _match(FileSystems.join(data_dir, data_layout.INTERACTIONS_DIR, f"{name}-*.parquet"))
        if files:
            rows[name] = 0
            for path in files:
                with FileSystems.open(path, compression_type="uncompressed") as f:
                    rows[name] += pq.ParquetFile(f).metadata.num_rows
    return rows


def _recorded_source(data_dir: str) -> Optional[str]:
    """The ``source`` the reader recorded in `data_dir`'s read report, if any."""
    path = FileSystems.join(data_dir, data_layout.READ_REPORT_FILE)
    try:
        source = _read_json(path).get("source") if FileSystems.exists(path) else None
    except (OSError, ValueError, AttributeError):
        return None
    return source if isinstance(source, str) and source else None


def _reader_rejections(upstream: Dict[str, Any], data_dir: str) -> Iterable[Dict[str, Any]]:
    """Every rejection of the reader, streamed from the file in `data_dir` that the report names
    (``rejections_file``); a report without one gives only its ``examples``."""
    name = upstream.get("rejections_file")
    if not name:
        yield from upstream.get("examples", [])
        return
    with FileSystems.open(FileSystems.join(data_dir, name), compression_type="uncompressed") as f:
        for line in f:
            yield json.loads(line)


def _merge_upstream(summary: Dict[str, Any], upstream: Dict[str, Any], write_dir: str, data_dir: str) -> None:
    """Adds the reader's rejections to the summary (each to its table's counts) and the dead-letter file.

    Rejected interaction rows join the interaction rows read and rejected, which the
    rejection threshold compares; rejected user and item rows join the ``tables``
    entry of their table. A report without ``rejected_by_table`` counts everything for
    the interactions. The dead letters are streamed, never held in memory.
    """
    by_table = upstream.get("rejected_by_table")
    if by_table is None:
        by_table = {"interactions": upstream.get("rejected_by_reason", {})}
    interactions, reader_tables = 0, {}
    for table, reasons in sorted(by_table.items()):
        by_reason = {f"reader: {k}": int(v) for k, v in reasons.items()}
        rejected = sum(by_reason.values())
        if table == "interactions":
            entry, interactions = summary, rejected
        else:
            entry = summary.setdefault("tables", {}).setdefault(
                table, {"rows_read": 0, "rows_rejected": 0, "rejected_by_reason": {}})
            entry["rows_read"] = int(entry.get("rows_read", 0)) + rejected   # rows in the input
            reader_tables[table] = rejected
        entry["rows_rejected"] = int(entry.get("rows_rejected", 0)) + rejected
        entry["rejected_by_reason"] = {**entry.get("rejected_by_reason", {}), **by_reason}
    summary["reader"] = {"rows_read": int(upstream.get("rows_read", 0)), "rows_rejected": interactions,
                         "table_rows_rejected": reader_tables}
    if upstream.get("rejections_file") or upstream.get("examples"):
        path = FileSystems.join(write_dir, DEAD_LETTER_FILE)
        merged = path + ".merging"
        with FileSystems.create(merged, compression_type="uncompressed") as f:
            if FileSystems.exists(path):
                with FileSystems.open(path, compression_type="uncompressed") as existing:
                    shutil.copyfileobj(existing, f)
            for e in _reader_rejections(upstream, data_dir):
                f.write((json.dumps({"file": e.get("file"), "record": e.get("line"), "field": e.get("field"),
                                     "reason": e.get("reason"), "stage": "reader"}) + "\n").encode("utf-8"))
        FileSystems.rename([merged], [path])


class DirectRunnerWithoutPrism(DirectRunner):
    """Beam's DirectRunner, without its first attempt at the Prism runner.

    Beam's DirectRunner first tries Prism, which downloads its binary from GitHub at
    run time: offline it fails, logs the error and falls back to the in-process
    runner, online it runs the job on another engine than the one tested here, and
    either way it leaves a ``beam-temp*`` directory in the temporary folder. Beam skips
    Prism for interactive pipelines, and that flag is read nowhere else, so this runner
    sets it and goes straight to the in-process (FnApi) runner with the same options
    (``--direct_num_workers``, ``--direct_running_mode``).
    """

    _is_interactive = True


def pipeline_runner(options: PipelineOptions):
    """The runner object to use, or None to let Beam resolve ``--runner`` itself."""
    chosen = options.view_as(StandardOptions).runner
    if chosen is None or (isinstance(chosen, str) and resolve_runner(chosen) == resolve_runner(None)):
        return DirectRunnerWithoutPrism()
    return None


def runner_name(pipeline_args: Sequence[str]) -> str:
    """The runner the options select (Beam's default is the DirectRunner)."""
    runner = PipelineOptions(list(pipeline_args)).view_as(StandardOptions).runner
    if runner is None:
        return "DirectRunner"
    return runner if isinstance(runner, str) else type(runner).__name__


def run_statistics(data_dir: str, output_dir: str, pipeline_args: Sequence[str] = (),
                   min_count: int = 1, max_rejected_fraction: float = 0.01,
                   split: str = "train", positives: str = "auto",
                   upstream_rejections: Optional[Dict[str, Any]] = None,
                   source: Optional[str] = None, data_dir_is_temporary: bool = False) -> Dict[str, Any]:
    """Runs the statistics pipeline over a materialized dataset.

    Args:
      data_dir: the materialized dataset (see `models.data_layout`).
      output_dir: where the statistics go; replaced only if the run succeeds.
      pipeline_args: Beam pipeline options, passed through unchanged (e.g.
        ``["--runner=DirectRunner", "--direct_running_mode=multi_processing",
        "--direct_num_workers=2"]`` or Dataflow/Flink/Spark/Dask flags); validated
        first by `beam_jobs.options.validate_pipeline_args` (unknown flags and missing
        runner settings are errors).
      min_count: vocabulary pruning threshold for side features (ids are never pruned).
      max_rejected_fraction: fail when rejected rows / rows read exceeds this, where
        rows read are the rows of every split in `data_dir` plus the upstream
        rejections, and rejected rows are the upstream rejections plus the `split` rows
        this job rejects.
      split: which interaction shards to count (``"train"``).
      upstream_rejections: rows rejected before the data reached this job (by the
        reader that built `data_dir`): ``{"rows_read", "rejected_by_reason",
        "examples": [{"file", "line", "field", "reason"}], "rejections_file"?}``. They
        count toward the threshold (as rejected rows and as rows read), appear in the
        summary and are written to the dead-letter file: every one from
        ``rejections_file`` (a JSON-lines file in `data_dir` with the same fields as the
        examples), else the examples.
      source: the input the data was read from (a path), named in messages and in the
        summary; default: the ``source`` recorded in `data_dir`'s read report, else
        `data_dir`.
      data_dir_is_temporary: `data_dir` is a scratch copy deleted after the run (the
        summary records ``data_dir: null`` rather than a path that will not exist).
      positives: which valid rows the item frequencies (and so the ``item_id`` order)
        count: ``"label"`` rows with ``label > 0`` (the retrieval positives), ``"all"``
        every row, ``"auto"`` (default) ``"label"`` when the schema has a label.

    Returns:
      The summary written to ``summary.json``: ``rows_read`` (rows read from the input,
      as above), ``rows_by_split``, ``validated_rows`` (the `split` rows this job
      checked), ``rows_rejected``, ``rejected_by_reason``, ``rejected_fraction``, ...

    Raises:
      TooManyRejectedRows: too many malformed rows (a `DataError`; nothing is written).
      OutputNotReplaceable: `output_dir` is a file or a directory that is neither empty
        nor a previous statistics output (checked before any work).
      ValueError: no interaction was read, or an argument (or pipeline option) is invalid.
      FileNotFoundError: the dataset is incomplete.
    """
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"`min_count` should be a positive integer. Received: min_count={min_count!r}")
    if not 0.0 <= float(max_rejected_fraction) <= 1.0:
        raise ValueError("`max_rejected_fraction` should be in [0, 1]. "
                         f"Received: max_rejected_fraction={max_rejected_fraction!r}")
    output_dir = output_dir.rstrip("/") or output_dir
    if _is_local(output_dir):  # `.` must name its parent's entry: the temporary sibling goes there
        output_dir = os.path.abspath(output_dir)
    options = validate_pipeline_args(pipeline_args, {"data_dir": data_dir, "output_dir": output_dir})
    check_output_dir(output_dir)
    schema_path = FileSystems.join(data_dir, data_layout.SCHEMA_FILE)
    if not FileSystems.exists(schema_path):
        raise FileNotFoundError(f"Schema file not found: {schema_path}")
    schema = Schema.from_dict(_read_json(schema_path))
    positives_only(schema, positives)  # validates `positives` before anything runs

    write_dir = f"{output_dir}.tmp-{uuid.uuid4().hex[:8]}"
    start = time.time()
    try:
        pipeline = beam.Pipeline(runner=pipeline_runner(options), options=options)
        build_statistics_pipeline(pipeline, data_dir, write_dir, schema, min_count, split, positives)
        result = pipeline.run()
        try:
            result.wait_until_finish()
        finally:
            # The DaskRunner opens a client to the cluster per run and leaves it open.
            client = getattr(result, "client", None)
            if client is not None and hasattr(client, "close"):
                client.close()
        summary = _read_json(FileSystems.join(write_dir, SUMMARY_FILE))
        source = source or _recorded_source(data_dir) or data_dir
        if upstream_rejections:
            _merge_upstream(summary, upstream_rejections, write_dir, data_dir)
        if summary["validated_rows"] == 0:
            raise ValueError(f"No {split} interactions were read from {source} (dataset {data_dir}).")
        summary["rows_by_split"] = _rows_by_split(data_dir, split)
        # Rows the reader rejected never reached the shards: add them to the rows read.
        summary["rows_read"] = sum(summary["rows_by_split"].values()) + summary.get("reader", {}).get(
            "rows_rejected", 0)
        rows_read, rows_rejected = summary["rows_read"], summary["rows_rejected"]
        if rows_rejected / rows_read > max_rejected_fraction:
            raise TooManyRejectedRows(rows_read, rows_rejected, summary["rejected_by_reason"],
                                      max_rejected_fraction, source)
        summary.update({
            "source": source,
            "data_dir": None if data_dir_is_temporary else data_dir,
            "output_dir": output_dir,
            "split": split,
            "min_count": min_count,
            "positives": "label" if positives_only(schema, positives) else "all",
            "rejected_fraction": rows_rejected / rows_read,
            "max_rejected_fraction": max_rejected_fraction,
            "runner": runner_name(pipeline_args),
            "pipeline_args": list(pipeline_args),
            "runtime_seconds": round(time.time() - start, 3),
        })
        write_json(summary, FileSystems.join(write_dir, SUMMARY_FILE))
        check_output_dir(output_dir)  # again: something may have appeared there meanwhile
        _publish(write_dir, output_dir)
    finally:
        _remove(write_dir)
    return summary
