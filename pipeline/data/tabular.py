"""Generic CSV/Parquet interaction logs, and the parsing helpers every file reader shares.

`read_tabular` reads an interaction log (one file, a directory of files or a glob) whose
columns are named by a mapping, plus optional user/item feature tables, into the
canonical `RawDataset`.

The helpers below it are shared with the MovieLens and BARS readers:

* `read_text_lines` / `read_delimited`: vectorised splitting of line-oriented files
  (pyarrow string kernels), with exact 1-based line numbers and every line that has the
  wrong number of fields reported as a bad row.
* `FileProblems`: collects the bad rows of one file, then hands them to the `RowErrors`
  policy in line order, so ``bad_rows="fail"`` always names the *first* malformed line
  whatever check found it, and a row with several problems counts once.
* `user_grouped_chunks`: sorts interactions by (user, timestamp) once and yields chunks
  of about `CHUNK_ROWS` rows cut at user boundaries (``user_complete_chunks=True``).
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import glob as globlib
import io
import os
from typing import (Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union)

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from models.features import (HISTORY, ITEM_ID, LABEL, OOV_TOKEN, RATING, TIMESTAMP, USER_ID, Feature,
                             Kind, Schema)
from pipeline.data.canonical import DataError, RawDataset, RowErrors

CHUNK_ROWS = 1_000_000
FORMATS = ("auto", "csv", "tsv", "parquet")
TIMESTAMP_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
COLUMN_KEYS = (USER_ID, ITEM_ID, TIMESTAMP, RATING, LABEL)
REQUIRED_COLUMN_KEYS = (USER_ID, ITEM_ID, TIMESTAMP)
FEATURE_SPEC_KEYS = ("name", "kind", "column", "separator", "max_length")
TABLE_KINDS = (Kind.CATEGORICAL.value, Kind.MULTI_CATEGORICAL.value, Kind.NUMERIC.value)
# Timestamps are int64 seconds; larger magnitudes are bad rows (they would overflow later arithmetic).
MAX_SECONDS = 2 ** 62

_EXTENSIONS = {
    ".csv": "csv", ".csv.gz": "csv", ".csv.bz2": "csv", ".csv.zst": "csv",
    ".tsv": "tsv", ".tsv.gz": "tsv", ".tsv.bz2": "tsv", ".tsv.zst": "tsv",
    ".parquet": "parquet", ".pq": "parquet", ".parq": "parquet",
}


# ---------------------------------------------------------------------------------
# Shared helpers: bad rows, line splitting, numbers, chunking.
# ---------------------------------------------------------------------------------
def check_history_length(history_length: Any) -> int:
    if (not isinstance(history_length, (int, np.integer)) or isinstance(history_length, bool)
            or history_length < 1):
        raise ValueError("`history_length` should be a positive integer. "
                         f"Received: history_length={history_length!r}")
    return int(history_length)


def empty_file_error(path: str, what: str) -> DataError:
    """The error for a file without data rows (`what` says what rows were expected)."""
    return DataError(path, None, None, f"the file has no data rows; expected {what}")


class FileProblems:
    """The bad rows of one file, reported to a `RowErrors` in line order.

    Checks run column by column over whole arrays, so problems are found out of line
    order; `flush` sorts them, keeps the first problem of each line (a row counts
    once), and forwards them to the policy, which under ``fail`` raises at the first.

    Args:
      path: the file, as it appears in messages.
      errors: the policy and counters.
      lines: ``[rows]`` 1-based line (or row) number of each parsed row.
      location: ``"line"`` for text files; ``"row"`` for Parquet, whose row index (0-based)
        then goes into the message instead of a line number.
    """

    def __init__(self, path: str, errors: RowErrors, lines: np.ndarray, location: str = "line"):
        self.path = path
        self.errors = errors
        self.lines = np.asarray(lines, dtype=np.int64)
        self.location = location
        self.bad = np.zeros(len(self.lines), dtype=bool)
        self._entries: List[Tuple[int, int, Optional[str], str, str, int]] = []
        self._seq = 0

    @property
    def only_first(self) -> bool:
        # Under "fail" only the earliest problem of each check can be the one raised.
        return self.errors.policy == "fail"

    def add_line(self, line: int, field: Optional[str], reason: str, kind: str, count: int = 1) -> None:
        """A problem on a line that produced no row (e.g. a wrong number of fields); it counts
        as `count` rejected rows (see `RowErrors.reject`)."""
        self._entries.append((int(line), self._seq, field, reason, kind, int(count)))
        self._seq += 1

    def reject(self, mask: np.ndarray, field: Optional[str], kind: str,
               describe: Callable[[int], str], counts: Optional[np.ndarray] = None) -> None:
        """Marks the rows where `mask` is True as bad; `describe(row)` gives the reason.

        `counts`: ``[rows]`` how many rejected rows each counts as (default 1 each).
        """
        rows = np.flatnonzero(np.asarray(mask, dtype=bool))
        if len(rows) == 0:
            return
        self.bad[rows] = True
        if self.only_first:
            rows = rows[:1]
        seq = self._seq
        self._seq += 1
        self._entries.extend((int(self.lines[r]), seq, field, describe(int(r)), kind,
                              1 if counts is None else int(counts[r])) for r in rows)

    def flush(self) -> np.ndarray:
        """Reports the problems in line order; returns the ``[rows]`` mask of good rows."""
        self._entries.sort(key=lambda e: (e[0], e[1]))
        last_line = None
        for line, _, field, reason, kind, count in self._entries:
            if line == last_line:
                continue
            last_line = line
            if self.only_first:
                reason += " (bad_rows='skip' drops such rows and counts them)"
            if self.location == "row":
                self.errors.reject(self.path, None, field, f"row {line} (0-based): {reason}", kind=kind, rows=count)
            else:
                self.errors.reject(self.path, line, field, reason, kind=kind, rows=count)
        self._entries = []
        return ~self.bad


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_text_lines(path: str, encoding: str = "utf-8", header: bool = False, delimiter: Optional[str] = None
                    ) -> Tuple[Optional[str], pa.Array, np.ndarray]:
    """The non-blank lines of a text file, whitespace-trimmed, with their line numbers.

    ``\\n``, ``\\r\\n`` and ``\\r`` each end a line, so no line holds a line break. With a tab
    `delimiter` only spaces are trimmed: a trailing tab is an empty last field, not padding.
    A line of nothing but whitespace is blank either way.

    Returns:
      ``(header, lines, numbers)``: the first line when `header` (else None), a pyarrow
      string array ``[rows]`` of the remaining non-blank lines, and ``[rows]`` int64
      1-based line numbers.

    Raises:
      DataError: the file is not valid `encoding` text (names the line), or has no data
        line (empty, blank or only a header).
    """
    raw = _read_bytes(path)
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = _line_break_count(raw[:e.start]) + 1
        raise DataError(path, line, None,
                        f"not valid {encoding} text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n")
    head = None
    first = 0
    if header:
        while first < len(lines) and not lines[first].strip():
            first += 1
        if first == len(lines):
            raise DataError(path, None, None, "the file is empty; expected a header line and data rows")
        head = lines[first].strip()
        first += 1
    array = pa.array(lines[first:], pa.string())
    nonblank = pc.not_equal(pc.utf8_trim_whitespace(array), "")
    array = pc.utf8_trim(array, " ") if delimiter == "\t" else pc.utf8_trim_whitespace(array)
    numbers = np.arange(first + 1, len(lines) + 1, dtype=np.int64)[nonblank.to_numpy(zero_copy_only=False)]
    return head, array.filter(nonblank), numbers


@dataclasses.dataclass
class DelimitedRows:
    """The rows of a delimited text file that have the expected number of fields.

    Attributes:
      path: the file.
      header: the header line split into fields (None without header).
      lines: ``[rows]`` 1-based line numbers.
      columns: one ``[rows]`` pyarrow string array per field, whitespace-stripped.
      problems: lines with a wrong field count are already in it; add value checks and
        `flush` it to get the rows to keep.
      lines_read: data lines read, good or bad (for `RowErrors.rows_read`).
    """

    path: str
    header: Optional[List[str]]
    lines: np.ndarray
    columns: List[pa.Array]
    problems: FileProblems
    lines_read: int

    @property
    def fields(self) -> List[np.ndarray]:
        """The columns as ``[rows]`` object arrays of str (converted on first use)."""
        if not hasattr(self, "_fields"):
            self._fields = [c.to_numpy(zero_copy_only=False) for c in self.columns]
        return self._fields


def read_delimited(path: str, delimiter: str, errors: RowErrors, *, num_fields: Optional[int] = None,
                   header: bool = False, encoding: str = "utf-8",
                   field_names: Optional[Sequence[str]] = None, what: str = "data rows") -> DelimitedRows:
    """Splits a delimited text file without quoting (MovieLens, RecBole atomic files).

    Args:
      path: the file.
      delimiter: the field separator (may be several characters, e.g. ``"::"``).
      errors: the bad-row policy; lines with a field count other than `num_fields` are
        recorded in the returned `problems`.
      num_fields: expected fields per line; with `header`, defaults to the header's count.
      header: the first non-blank line is a header.
      encoding: text encoding of the file.
      field_names: names used in the wrong-field-count message.
      what: description of the expected rows, for the empty-file message.
    """
    head, lines, numbers = read_text_lines(path, encoding, header, delimiter)
    head_fields = [h.strip() for h in head.split(delimiter)] if head is not None else None
    if num_fields is None:
        if head_fields is None:
            raise ValueError("`num_fields` is required for a file without header")
        num_fields = len(head_fields)
    if len(lines) == 0:
        raise empty_file_error(path, what + (" after the header line" if header else ""))
    parts = pc.split_pattern(lines, delimiter)
    counts = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    good = counts == num_fields
    problems = FileProblems(path, errors, numbers[good])
    bad_lines = np.flatnonzero(~good)
    if problems.only_first:
        bad_lines = bad_lines[:1]
    names = field_names or head_fields
    shown = f" ({', '.join(names)})" if names else ""
    for i in bad_lines:
        problems.add_line(numbers[i], None,
                          f"expected {num_fields} fields{shown} separated by {delimiter!r}, found {counts[i]}",
                          kind="wrong number of fields")
    flat = pc.utf8_trim_whitespace(pc.list_flatten(parts.filter(pa.array(good))))
    n_good = int(good.sum())
    columns = [flat.take(pa.array(np.arange(j, n_good * num_fields, num_fields))) for j in range(num_fields)]
    return DelimitedRows(path=path, header=head_fields, lines=numbers[good], columns=columns,
                         problems=problems, lines_read=len(numbers))


Strings = Union[np.ndarray, pa.Array]


def _arrow_cast(values: Strings, target: pa.DataType) -> Optional[np.ndarray]:
    """Fast path: the whole column cast by pyarrow, or None when any value does not parse."""
    try:
        array = values if isinstance(values, pa.Array) else pa.array(values, pa.string())
        return pc.cast(array, target).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError):
        return None


def _objects(values: Strings) -> np.ndarray:
    return values.to_numpy(zero_copy_only=False) if isinstance(values, pa.Array) else values


def parse_numbers(values: Strings) -> Tuple[np.ndarray, np.ndarray]:
    """``[n]`` strings -> (``[n]`` float64, ``[n]`` bool mask of unparsable/non-finite)."""
    numbers = _arrow_cast(values, pa.float64())
    if numbers is None:
        numbers = pd.to_numeric(pd.Series(_objects(values), dtype=object), errors="coerce").to_numpy(
            dtype=np.float64, na_value=np.nan)
    return numbers, ~np.isfinite(numbers)


def timestamp_out_of_range(value: Any) -> str:
    """The message of a timestamp more than `MAX_SECONDS` from 1970 (every reader's)."""
    return f"timestamp {value!r} is out of range: more than 2**62 seconds from 1970"


def _line_break_count(text: Union[str, bytes]) -> int:
    """Line breaks in `text`: ``\\n``, ``\\r`` and ``\\r\\n`` (one) each end a line, as the readers split them
    (`_line_breaks` counts them in a whole column)."""
    nl, cr, crlf = ("\n", "\r", "\r\n") if isinstance(text, str) else (b"\n", b"\r", b"\r\n")
    return text.count(nl) + text.count(cr) - text.count(crlf)


def parse_seconds(values: Strings) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[n]`` strings of (possibly fractional) seconds -> (``[n]`` int64 floored, ``[n]`` unparsable,
    ``[n]`` out of range: more than `MAX_SECONDS` from 1970). The masks do not overlap; masked rows get 0."""
    ints = _arrow_cast(values, pa.int64())
    if ints is not None:
        ints = ints.astype(np.int64)
        huge = (ints > MAX_SECONDS) | (ints < -MAX_SECONDS)
        return np.where(huge, 0, ints), np.zeros(len(values), dtype=bool), huge
    floats, bad = parse_numbers(values)
    huge = ~bad & (np.abs(np.where(bad, 0.0, floats)) > MAX_SECONDS)
    return np.floor(np.where(bad | huge, 0.0, floats)).astype(np.int64), bad, huge


def lookup_ids(values: Strings, table_ids: pd.Index) -> np.ndarray:
    """``[n]`` position of each id in `table_ids` (unique strings), -1 where absent."""
    if isinstance(values, pa.Array):
        index = pc.index_in(values, value_set=pa.array(table_ids.to_numpy(dtype=object), pa.string()))
        return pc.fill_null(index, -1).to_numpy(zero_copy_only=False).astype(np.int64)
    return table_ids.get_indexer(pd.Index(values, dtype=object))


def user_grouped_chunks(user_codes: np.ndarray, timestamps: np.ndarray,
                        columns: Mapping[str, Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]],
                        chunk_rows: int = CHUNK_ROWS) -> Callable[[], Iterator[pd.DataFrame]]:
    """Sorts interactions by (user, timestamp) and cuts them into user-complete chunks.

    Args:
      user_codes: ``[n]`` integer code of each row's user (any code order).
      timestamps: ``[n]`` int64 seconds.
      columns: output columns in order; a value is either an ``[n]`` array or a
        ``(codes [n], values [k])`` pair decoded per chunk (keeps ids compact in memory).
      chunk_rows: target rows per chunk; a chunk ends at the first user boundary at or
        after it (a single user larger than that gets a chunk of their own).

    Returns:
      a callable returning a fresh iterator of DataFrames; rows sorted by user then
      timestamp (ties keep input order); every user's rows in exactly one chunk.
    """
    if chunk_rows < 1:
        raise ValueError(f"`chunk_rows` should be positive. Received: chunk_rows={chunk_rows}")
    user_codes = np.asarray(user_codes)
    order = np.lexsort((np.asarray(timestamps), user_codes))  # stable
    sorted_codes = user_codes[order]
    stored: Dict[str, Any] = {}
    for name, col in columns.items():
        if isinstance(col, tuple):
            stored[name] = (np.asarray(col[0])[order], np.asarray(col[1], dtype=object))
        else:
            stored[name] = np.asarray(col)[order]
    n = len(order)
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]) if n else np.zeros(0, np.int64)
    cuts = [0]
    while cuts[-1] < n:
        k = np.searchsorted(starts, cuts[-1] + chunk_rows, side="left")
        cuts.append(int(starts[k]) if k < len(starts) else n)

    def interactions() -> Iterator[pd.DataFrame]:
        for a, b in zip(cuts[:-1], cuts[1:]):
            data = {}
            for name, col in stored.items():
                data[name] = col[1][col[0][a:b]] if isinstance(col, tuple) else col[a:b].copy()
            yield pd.DataFrame(data)

    return interactions


# ---------------------------------------------------------------------------------
# The generic reader.
# ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _TableFeature:
    feature: Feature
    column: str
    separator: str
    auto_length: bool = False


def _extension_format(path: str) -> Optional[str]:
    name = os.path.basename(path).lower()
    for ext, kind in sorted(_EXTENSIONS.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(ext):
            return kind
    return None


def format_from_name(path: str) -> Optional[str]:
    """``csv``, ``tsv`` or ``parquet`` from the extension of a file name or glob pattern, else None."""
    return _extension_format(path.rstrip("/" + os.sep))


def resolve_files(path: str, fmt: str = "auto", what: str = "interaction log") -> List[Tuple[str, str]]:
    """``[(file, format)]`` for a file, a directory (its data files) or a glob pattern.

    The format comes from the extension (``.csv[.gz|.bz2|.zst]``, ``.tsv[...]``,
    ``.parquet``/``.pq``); files without a known extension take `fmt` when it is not
    ``auto``. In a directory, names starting with ``.`` or ``_`` are ignored, and so are
    files of another format than an explicit `fmt`.

    Raises:
      DataError: naming `path` (or the file) when nothing can be read there: no such
        file, directory or matching glob, no data file in the directory, a file whose
        format cannot be told or contradicts `fmt`, or files of several formats.
    """
    if fmt not in FORMATS:
        raise ValueError(f"`format` should be one of {FORMATS}. Received: format={fmt!r}")
    key_hint = "`format`" + (" (`data.tabular.format` in a run config)" if what == "interaction log" else "")
    if any(ch in path for ch in "*?["):
        candidates = sorted(p for p in globlib.glob(path) if os.path.isfile(p))
        if not candidates:
            raise DataError(path, None, None, f"no file matches this {what} pattern")
        explicit = True
    elif os.path.isdir(path):
        candidates = sorted(os.path.join(path, n) for n in os.listdir(path)
                            if not n.startswith((".", "_")) and os.path.isfile(os.path.join(path, n)))
        explicit = False
    elif os.path.isfile(path):
        candidates, explicit = [path], True
    else:
        raise DataError(path, None, None, f"the {what} was not found: this is neither a file, a directory nor a "
                                          "glob pattern matching files")
    out = []
    other = set()
    for p in candidates:
        kind = _extension_format(p)
        if kind is None:
            if fmt != "auto":
                kind = fmt
            elif explicit:
                raise DataError(p, None, None, f"cannot tell the format of the {what} file from its name; use a "
                                               ".csv, .tsv or .parquet extension" +
                                               (f" or set {key_hint} to csv, tsv or parquet"
                                                if what == "interaction log" else ""))
            else:
                continue
        elif fmt != "auto" and kind != fmt:
            if explicit:
                raise DataError(p, None, None, f"the {what} file looks like {kind} from its name but "
                                               f"format={fmt!r}; set {key_hint} to {kind!r} (or leave it out: "
                                               "the file name decides), or rename the file")
            other.add(kind)
            continue
        out.append((p, kind))
    if not out:
        listing = sorted(os.listdir(path))
        hint = (f"; it holds {' and '.join(sorted(other))} files: set {key_hint} to read them"
                if other else "")
        expected = sorted(e for e, kind in _EXTENSIONS.items() if fmt == "auto" or kind == fmt)
        raise DataError(path, None, None, f"no {what} files in this directory: expected names ending in "
                                          f"{', '.join(expected)}"
                                          + (f" (format={fmt!r})" if fmt != "auto" else "")
                                          + f"; found {listing[:20]}{' ...' if len(listing) > 20 else ''}{hint}")
    kinds = {k for _, k in out}
    if len(kinds) > 1:
        raise DataError(path, None, None, f"the {what} mixes formats {sorted(kinds)}; set {key_hint} "
                                          "or point to one kind")
    return out


def _physical_lines(path: str) -> Iterator[Tuple[int, bytes]]:
    """``(1-based number, bytes without the line break)`` of each line of a (possibly compressed) file.

    ``\\n``, ``\\r\\n`` and ``\\r`` each end a line, as for the CSV parser.
    """
    with pa.input_stream(path, compression="detect") as stream:
        # latin-1 maps each byte to one character: this splits the bytes themselves.
        for number, line in enumerate(io.TextIOWrapper(stream, encoding="latin-1", newline=""), 1):
            yield number, line.rstrip("\r\n").encode("latin-1")


def _unreadable(path: str, e: BaseException) -> DataError:
    return DataError(path, None, None, f"cannot read the file: {e}")


def _csv_header(path: str, delimiter: str) -> Tuple[List[str], int]:
    """The column names of a CSV (names may be quoted) or TSV file, stripped, and the line they are on.

    Blank lines before the header are skipped.
    """
    try:
        for number, raw in _physical_lines(path):
            raw = raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw
            if raw.strip():
                break
        else:
            raise DataError(path, None, None, "the file is empty; expected a header line naming the columns")
    except (pa.ArrowException, OSError) as e:
        raise _unreadable(path, e) from None
    try:
        text = raw.decode("utf-8")
        names = next(csv.reader([text])) if delimiter == "," else text.split(delimiter)
    except UnicodeDecodeError:
        raise DataError(path, number, None, "the header line is not valid UTF-8 text") from None
    except csv.Error as e:
        raise DataError(path, number, None, f"the header line is not a CSV line: {e}") from None
    return [c.strip() for c in names], number


def _parquet_columns(path: str) -> List[str]:
    try:
        return pq.read_schema(path).names
    except (pa.ArrowException, OSError) as e:
        raise DataError(path, None, None, f"not a readable Parquet file: {e}") from None


def _require_columns(path: str, available: Sequence[str], wanted: Mapping[str, str], line: Optional[int]) -> None:
    """Every wanted column is in `available` exactly once (`line`: the header's, None for Parquet)."""
    missing = {key: col for key, col in wanted.items() if col not in available}
    if missing:
        shown = ", ".join(f"{col!r} (for {key})" for key, col in missing.items())
        raise DataError(path, line, None, f"no column {shown}; the file has columns {list(available)}")
    dupes = sorted({c for c in wanted.values() if list(available).count(c) > 1})
    if dupes:
        raise DataError(path, line, None, f"the file names column(s) {dupes} more than once")


@dataclasses.dataclass
class _Columns:
    """The wanted columns of one file as pyarrow arrays, with line/row numbers."""

    path: str
    arrays: Dict[str, pa.Array]
    problems: FileProblems
    lines_read: int


def _read_columns(path: str, fmt: str, wanted: Mapping[str, str], errors: RowErrors, what: str) -> _Columns:
    """Reads the columns `wanted` (key -> file column) of one CSV/TSV/Parquet file."""
    if fmt != "parquet":
        return _read_text_columns(path, fmt, wanted, errors, what)
    _require_columns(path, _parquet_columns(path), wanted, None)
    try:
        table = pq.read_table(path, columns=sorted(set(wanted.values())))
    except (pa.ArrowException, OSError) as e:
        raise DataError(path, None, None, f"not a readable Parquet file: {e}") from None
    for key in (USER_ID, ITEM_ID):
        if key in wanted and pa.types.is_nested(table.schema.field(wanted[key]).type):
            raise DataError(path, None, key, f"the id column {wanted[key]!r} has type "
                                             f"{table.schema.field(wanted[key]).type}; expected string or integer")
    if table.num_rows == 0:
        raise empty_file_error(path, what)
    n = table.num_rows
    problems = FileProblems(path, errors, np.arange(n, dtype=np.int64), location="row")
    arrays = {key: table.column(col).combine_chunks() for key, col in wanted.items()}
    for key, array in arrays.items():
        problems.reject(_inner_line_breaks(array), key, "line break in value",
                        lambda r, k=key, a=array: f"{k} {a[r].as_py()!r} holds a line break")
    return _Columns(path, arrays, problems, n)


def _inner_line_breaks(array: pa.Array) -> np.ndarray:
    """``[n]`` True where a text value, or an element of a list value, still holds a line break
    once trimmed (a vocabulary file holds one value per line)."""
    values, rows = array, None
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        values, rows = pc.list_flatten(array), pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        return np.zeros(len(array), dtype=bool)
    found = pc.fill_null(pc.match_substring_regex(pc.utf8_trim_whitespace(values), "[\r\n]"), False)
    found = found.to_numpy(zero_copy_only=False)
    if rows is None:
        return found
    out = np.zeros(len(array), dtype=bool)
    out[rows[found]] = True
    return out


def _line_breaks(values: pa.Array) -> np.ndarray:
    """``[n]`` line breaks in each (binary or string) value; ``\\r\\n`` counts one."""
    count = pc.count_substring(values, "\n").to_numpy(zero_copy_only=False).astype(np.int64)
    cr = pc.count_substring(values, "\r").to_numpy(zero_copy_only=False)
    if cr.any():
        count += cr - pc.count_substring(values, "\r\n").to_numpy(zero_copy_only=False)
    return count


def _spans(first: int, extra: int) -> str:
    return f"spans lines {first}–{first + extra} (unbalanced quote?)"


def _read_text_columns(path: str, fmt: str, wanted: Mapping[str, str], errors: RowErrors, what: str) -> _Columns:
    """The `wanted` columns of a CSV (quoted values allowed) or TSV (no quoting) file as strings.

    Line numbers are physical: every column is parsed (as bytes, a block at a time) to count
    the line breaks inside quoted values, and only the wanted columns are kept. Bad rows:
    a wrong number of fields, a wanted value holding a line break or not UTF-8. A rejected
    record that spans several lines counts as that many rows read and rejected: an
    unbalanced quote swallows the lines after it, which may have been rows.
    """
    delimiter = "," if fmt == "csv" else "\t"
    header, header_line = _csv_header(path, delimiter)
    _require_columns(path, header, wanted, header_line)
    position = {key: header.index(col) for key, col in wanted.items()}
    names = [str(j) for j in range(len(header))]  # the file's names may be empty or repeat unwanted ones
    ragged: List[Tuple[int, int, Optional[str]]] = []  # (record number, fields, text or None if not UTF-8)

    def on_invalid(row) -> str:
        try:
            text = row.text
        except UnicodeDecodeError:
            text = None
        ragged.append((row.number, row.actual_columns, text))
        return "skip"

    parts: Dict[str, List[pa.Array]] = {key: [] for key in wanted}
    part_breaks: Dict[str, List[np.ndarray]] = {key: [] for key in wanted}
    all_breaks: List[np.ndarray] = []  # per record, in every value
    all_empty: List[np.ndarray] = []
    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(use_threads=False, column_names=names, skip_rows=header_line),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if fmt == "csv" else False,
                                             newlines_in_values=fmt == "csv", invalid_row_handler=on_invalid,
                                             ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.binary()),
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False))
        for batch in reader:
            breaks = [_line_breaks(column) for column in batch.columns]
            all_breaks.append(np.sum(breaks, axis=0))
            all_empty.append(np.logical_and.reduce([pc.equal(pc.binary_length(column), 0).to_numpy(
                zero_copy_only=False) for column in batch.columns]))
            for key, j in position.items():
                parts[key].append(batch.column(j))
                part_breaks[key].append(breaks[j])
    except (pa.ArrowException, OSError) as e:
        raise _unreadable(path, e) from None

    # Records (rows and ragged lines) in file order, with the line each starts on.
    first = header_line + 1
    is_ragged = np.zeros(sum(map(len, all_breaks)) + len(ragged), dtype=bool)
    ragged_at = np.asarray([number - first for number, _, _ in ragged], dtype=np.int64)
    is_ragged[ragged_at] = True
    extra = np.zeros(len(is_ragged), dtype=np.int64)  # line breaks inside the record
    extra[~is_ragged] = _concat(all_breaks, np.int64)
    extra[ragged_at] = [_line_break_count(text) if text else 0 for _, _, text in ragged]
    starts = first + np.arange(len(extra)) + np.cumsum(extra) - extra
    # Blank lines come back as rows of empty values, and so do lines of bare delimiters: those are rows.
    row_at = np.flatnonzero(~is_ragged)
    blank = np.zeros(len(row_at), dtype=bool)
    candidates = row_at[_concat(all_empty, bool)]
    if len(candidates):
        wanted_lines = set(starts[candidates].tolist())
        empty_lines = set()
        for number, raw in _physical_lines(path):
            if number in wanted_lines and not raw:
                empty_lines.add(number)
            if number >= starts[candidates[-1]]:
                break
        blank = np.isin(starts[row_at], list(empty_lines))
    row_at = row_at[~blank]
    lines, row_extra = starts[row_at], extra[row_at]
    if len(lines) == 0 and not ragged:
        raise empty_file_error(path, what + " after the header line")

    problems = FileProblems(path, errors, lines)
    for number, found, text in (ragged[:1] if problems.only_first else ragged):
        i = number - first
        reason = f"expected {len(header)} fields separated by {delimiter!r}, found {found}"
        if text is None:
            reason = f"not valid UTF-8 text; {reason}"
        if extra[i]:
            reason = f"the record {_spans(starts[i], extra[i])}; {reason}"
        problems.add_line(starts[i], None, reason, kind="wrong number of fields", count=extra[i] + 1)
    values = {key: pa.chunked_array(parts[key], pa.binary()).combine_chunks().filter(pa.array(~blank))
              for key in wanted}
    in_value = {key: _concat(part_breaks[key], np.int64)[~blank] > 0 for key in wanted}
    split = np.logical_or.reduce(list(in_value.values()))
    if len(split) and split[-1] and row_at[-1] == len(extra) - 1:
        # A quote still open at the end of the file took in its last line break too.
        row_extra[-1] = min(row_extra[-1], max(n for n, _ in _physical_lines(path)) - lines[-1])
    for key in wanted:
        problems.reject(in_value[key], key, "line break in value",
                        lambda r, k=key: f"the quoted {k} value {_spans(lines[r], row_extra[r])}",
                        counts=row_extra + 1)
    arrays = {}
    for key, raw in values.items():
        try:
            arrays[key] = raw.cast(pa.string())
        except pa.ArrowInvalid:  # not UTF-8: find the values
            bad = np.asarray([not _is_utf8(v) for v in raw.to_pylist()], dtype=bool)
            problems.reject(bad, key, "not UTF-8", lambda r, k=key, v=raw: f"{k} {v[r].as_py()!r} is not UTF-8 text")
            arrays[key] = pc.if_else(pa.array(bad), pa.scalar(b"", pa.binary()), raw).cast(pa.string())
    lines_read = len(lines) + len(ragged) + int(extra[ragged_at].sum()) + int(row_extra[split].sum())
    return _Columns(path, arrays, problems, lines_read)


def _concat(parts: List[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _strings(array: pa.Array) -> Tuple[np.ndarray, np.ndarray]:
    """A column as ``[n]`` object array of stripped str, and the ``[n]`` missing mask."""
    t = array.type
    if pa.types.is_dictionary(t):
        array = array.dictionary_decode()
        t = array.type
    if pa.types.is_floating(t):
        values = array.to_numpy(zero_copy_only=False).astype(np.float64)
        missing = ~np.isfinite(values)
        integral = ~missing & (values == np.floor(values)) & (np.abs(values) < 2.0 ** 53)
        out = np.asarray([str(int(v)) if ok else ("" if m else repr(float(v)))
                          for v, ok, m in zip(values, integral, missing)], dtype=object)
        return out, missing
    if pa.types.is_boolean(t):
        array = pc.cast(array, pa.string())  # "true"/"false"
    elif not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        try:
            array = pc.cast(array, pa.string())
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
            values = array.to_pylist()
            return (np.asarray(["" if v is None else str(v).strip() for v in values], dtype=object),
                    np.asarray([v is None or str(v).strip() == "" for v in values], dtype=bool))
    array = pc.utf8_trim_whitespace(array)
    array = pc.fill_null(array, "")
    values = array.to_numpy(zero_copy_only=False)
    missing = pc.equal(array, "").to_numpy(zero_copy_only=False)
    return values, missing


def _numbers(array: pa.Array) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(``[n]`` float64, ``[n]`` missing, ``[n]`` unparsable) of a numeric or text column."""
    if pa.types.is_boolean(array.type):
        array = pc.cast(array, pa.int8())
    if pa.types.is_integer(array.type) or pa.types.is_floating(array.type) or pa.types.is_decimal(array.type):
        values = pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False)
        missing = np.asarray(array.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        return values, missing, ~missing & ~np.isfinite(values)
    text, missing = _strings(array)
    values, bad = parse_numbers(text)
    for i in np.flatnonzero(bad & ~missing):
        word = text[i].lower()
        if word in ("true", "false"):
            values[i], bad[i] = float(word == "true"), False
    return values, missing, bad & ~missing


def _seconds(array: pa.Array, timestamp_format: Optional[str]
             ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, str, np.ndarray]:
    """(``[n]`` int64 seconds, missing, unparsable, what was expected, out of range) of a timestamp column.

    Numbers whose magnitude in seconds exceeds `MAX_SECONDS` are out of range (their
    seconds are 0); the masks do not overlap.
    """
    n = len(array)
    t = array.type
    no_rows = np.zeros(n, dtype=bool)
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        series = array.to_pandas()
        if pa.types.is_date(t):
            series = pd.to_datetime(series)
        dt = pd.to_datetime(series, utc=True)
        missing = dt.isna().to_numpy()
        secs = np.zeros(n, dtype=np.int64)
        valid = dt[~missing]
        secs[~missing] = (valid - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
        return secs, missing, no_rows, "a timestamp", no_rows
    unit = 1
    fmt = timestamp_format
    if fmt in TIMESTAMP_UNITS:
        unit, fmt = TIMESTAMP_UNITS[fmt], None
        numeric_only = True
    else:
        numeric_only = False

    def out_of_range(floats: np.ndarray, ok: np.ndarray) -> np.ndarray:
        return ok & (np.abs(np.where(ok, floats, 0.0)) / unit > MAX_SECONDS)

    if pa.types.is_integer(t) or pa.types.is_floating(t):
        if fmt is not None:
            raise ValueError(f"`timestamp_format`={timestamp_format!r} is a date format but the timestamp "
                             f"column holds numbers ({t}); use None or one of {sorted(TIMESTAMP_UNITS)}.")
        values = pc.cast(array, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
        missing = np.asarray(array.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        bad = ~missing & ~np.isfinite(values)
        huge = out_of_range(values, ~missing & ~bad)
        if pa.types.is_integer(t):
            kept = pc.if_else(pa.array(huge), pa.scalar(0, t), array)
            ints = pc.fill_null(kept, 0).cast(pa.int64()).to_numpy(zero_copy_only=False)
            return ints // unit, missing, bad, "a number of seconds", huge
        secs = np.floor(np.where(bad | missing | huge, 0.0, values) / unit).astype(np.int64)
        return secs, missing, bad, "a number of seconds", huge
    text, missing = _strings(array)
    if fmt is None:
        numbers = pd.to_numeric(pd.Series(text, dtype=object), errors="coerce")
        numeric = numbers.notna().to_numpy()
        if numeric_only or numeric[~missing].any() or (~missing).sum() == 0:
            floats = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
            bad = ~missing & ~np.isfinite(floats)
            huge = out_of_range(floats, ~missing & ~bad)
            if numbers.dtype.kind in "iu":
                secs = np.where(huge, 0, numbers.to_numpy()).astype(np.int64) // unit
            else:
                secs = np.floor(np.where(bad | missing | huge, 0.0, floats) / unit).astype(np.int64)
            expected = "a number of seconds" if unit == 1 else f"a number of {timestamp_format}"
            return secs, missing, bad, expected, huge
        expected = "a date/time string (format inferred from the first value; pass timestamp_format)"
        dt = pd.to_datetime(pd.Series(np.where(missing, None, text)), errors="coerce", utc=True)
    else:
        expected = f"a date/time string in the format {fmt!r}"
        dt = pd.to_datetime(pd.Series(np.where(missing, None, text)), format=fmt, errors="coerce", utc=True)
    nat = dt.isna().to_numpy()
    secs = np.zeros(n, dtype=np.int64)
    secs[~nat] = (dt[~nat] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    return secs, missing, nat & ~missing, expected, no_rows


def _parse_feature_specs(specs: Sequence[Mapping[str, Any]], side: str, id_key: str, default_id_column: str
                         ) -> Tuple[str, List[_TableFeature], bool]:
    """(id column, features, id column given explicitly) from the `{side}_features` argument."""
    arg = f"{side}_features"
    if isinstance(specs, (str, bytes)) or not isinstance(specs, Sequence):
        raise TypeError(f"`{arg}` should be a list of dicts. Received: {arg}={specs!r}")
    id_column, explicit = default_id_column, False
    out: List[_TableFeature] = []
    names = set()
    for i, spec in enumerate(specs):
        if not isinstance(spec, Mapping):
            raise TypeError(f"`{arg}[{i}]` should be a dict with keys {FEATURE_SPEC_KEYS}. Received: {spec!r}")
        unknown = sorted(set(spec) - set(FEATURE_SPEC_KEYS))
        if unknown:
            raise ValueError(f"`{arg}[{i}]` has unknown keys {unknown}; allowed: {list(FEATURE_SPEC_KEYS)}. "
                             f"Received: {dict(spec)!r}")
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"`{arg}[{i}]['name']` should be a non-empty string. Received: name={name!r}")
        column = spec.get("column", name)
        if not isinstance(column, str) or not column:
            raise ValueError(f"`{arg}[{i}]['column']` should be a non-empty string. Received: column={column!r}")
        if name == id_key:
            if spec.get("kind", "categorical") != "categorical":
                raise ValueError(f"`{arg}[{i}]`: {id_key!r} is always categorical. Received: kind={spec['kind']!r}")
            id_column, explicit = column, True
            continue
        if name in names:
            raise ValueError(f"`{arg}` names feature {name!r} twice")
        names.add(name)
        kind = spec.get("kind")
        if kind not in TABLE_KINDS:
            hint = " (the behaviour sequence 'history' is derived from the interactions)" if kind == "sequence" else ""
            raise ValueError(f"`{arg}[{i}]['kind']` should be one of {TABLE_KINDS}{hint}. "
                             f"Received: kind={kind!r} for feature {name!r}")
        if name in (HISTORY, TIMESTAMP, RATING, LABEL, USER_ID, ITEM_ID):
            raise ValueError(f"`{arg}[{i}]`: the feature name {name!r} is reserved. Received: name={name!r}")
        separator = spec.get("separator", "|")
        if not isinstance(separator, str) or not separator:
            raise ValueError(f"`{arg}[{i}]['separator']` should be a non-empty string. Received: {separator!r}")
        max_length = spec.get("max_length")
        if kind == "multi_categorical":
            if max_length is not None and (not isinstance(max_length, (int, np.integer)) or max_length < 1):
                raise ValueError(f"`{arg}[{i}]['max_length']` should be a positive integer. "
                                 f"Received: max_length={max_length!r} for feature {name!r}")
        elif max_length not in (None, 1):
            raise ValueError(f"`{arg}[{i}]['max_length']` only applies to multi_categorical features; "
                             f"{name!r} is {kind}. Received: max_length={max_length!r}")
        feature = Feature(name, Kind(kind), side, max_length=int(max_length or 1))
        out.append(_TableFeature(feature, column, separator,
                                 auto_length=kind == "multi_categorical" and max_length is None))
    return id_column, out, explicit


def _multi_values(array: pa.Array, separator: str) -> List[List[str]]:
    """Lists of stripped non-empty tokens (list columns as they are, text split on `separator`)."""
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        return [[str(v).strip() for v in (row or []) if v is not None and str(v).strip()]
                for row in array.to_pylist()]
    text, missing = _strings(array)
    out = []
    for value, m in zip(text, missing):
        out.append([] if m else [t.strip() for t in value.split(separator) if t.strip()])
    return out


def _read_feature_table(path: str, fmt: str, side: str, id_key: str, id_column: str, id_explicit: bool,
                        default_id_column: str, specs: List[_TableFeature], errors: RowErrors
                        ) -> Tuple[pd.DataFrame, List[Feature]]:
    """A user or item table with one row per id; returns it and the final features."""
    files = resolve_files(path, fmt, what=f"{side} table")
    frames = []
    lengths: Dict[str, int] = {s.feature.name: 1 for s in specs if s.feature.kind == Kind.MULTI_CATEGORICAL}
    seen: Dict[str, str] = {}
    for file, kind in files:
        available, header_line = (_parquet_columns(file), None) if kind == "parquet" else _csv_header(
            file, "\t" if kind == "tsv" else ",")
        column = id_column
        if not id_explicit and column not in available and id_key in available:
            column = id_key
        if column not in available:
            raise DataError(file, header_line, None,
                            f"no id column {column!r} in the {side} table (columns: {available}); name it with "
                            f"a {{'name': {id_key!r}, 'column': ...}} entry in `{side}_features`")
        wanted = {id_key: column}
        wanted.update({s.feature.name: s.column for s in specs})
        cols = _read_columns(file, kind, wanted, errors, what=f"{side} rows")
        problems = cols.problems
        ids, missing = _strings(cols.arrays[id_key])
        problems.reject(missing, id_key, f"missing {id_key}", lambda r: f"missing {id_key}")
        dup_in_file = pd.Series(ids).duplicated().to_numpy() & ~missing
        first_line: Dict[str, int] = {}
        for i in np.flatnonzero(pd.Series(ids).duplicated(keep=False).to_numpy() & ~missing):
            first_line.setdefault(ids[i], int(problems.lines[i]))
        earlier = pd.Index(ids, dtype=object).isin(list(seen)) & ~missing
        where = "row" if kind == "parquet" else "line"
        problems.reject(dup_in_file, id_key, f"duplicate {id_key}",
                        lambda r: f"duplicate {id_key} {ids[r]!r} (first on {where} {first_line[ids[r]]})")
        problems.reject(earlier, id_key, f"duplicate {id_key}",
                        lambda r: f"duplicate {id_key} {ids[r]!r} (already in {seen[ids[r]]})")
        data: Dict[str, Any] = {id_key: ids}
        for s in specs:
            f = s.feature
            array = cols.arrays[f.name]
            if f.kind == Kind.NUMERIC:
                values, miss, bad = _numbers(array)
                problems.reject(miss, f.name, f"missing {f.name}", lambda r, n=f.name: f"missing numeric {n}")
                problems.reject(bad, f.name, f"bad {f.name}",
                                lambda r, a=array, n=f.name: f"{n} {a[r].as_py()!r} is not a finite number")
                data[f.name] = values
            elif f.kind == Kind.CATEGORICAL:
                values, miss = _strings(array)
                data[f.name] = np.where(miss, OOV_TOKEN, values)
            else:
                lists = _multi_values(array, s.separator)
                lengths[f.name] = max([lengths[f.name]] + [len(v) for v in lists])
                data[f.name] = lists
        keep = problems.flush()
        frame = pd.DataFrame({k: (list(v) if isinstance(v, list) else v) for k, v in data.items()})[keep]
        for i in frame[id_key]:
            seen[i] = file
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    features = [Feature(id_key, Kind.CATEGORICAL, side)]
    for s in specs:
        f = s.feature
        if s.auto_length and lengths[f.name] > 1:
            f = dataclasses.replace(f, max_length=lengths[f.name])
        features.append(f)
    return table, features


def _dataset_name(path: str) -> str:
    """A schema name from the path: file stem, directory name, or a glob's directory."""
    if any(ch in path for ch in "*?["):
        path = os.path.dirname(path)
    name = os.path.basename(os.path.normpath(path)) if path else ""
    for ext in sorted(_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[:-len(ext)] or "tabular"
    return name or "tabular"


def _check_columns_arg(columns: Mapping[str, str]) -> Dict[str, str]:
    if not isinstance(columns, Mapping):
        raise TypeError(f"`columns` should map canonical names {COLUMN_KEYS} to column names. "
                        f"Received: columns={columns!r}")
    unknown = sorted(str(k) for k in set(columns) - set(COLUMN_KEYS))
    if unknown:
        raise ValueError(f"`columns` has unknown keys {unknown}; allowed: {list(COLUMN_KEYS)}. "
                         f"Received: columns={dict(columns)!r}")
    missing = [k for k in REQUIRED_COLUMN_KEYS if not columns.get(k)]
    if missing:
        raise ValueError(f"`columns` should name the file columns of {missing}. Received: columns={dict(columns)!r}")
    for k, v in columns.items():
        if not isinstance(v, str) or not v:
            raise ValueError(f"`columns[{k!r}]` should be a non-empty column name. Received: {v!r}")
    return {k: columns[k] for k in COLUMN_KEYS if columns.get(k)}


def _check_timestamp_format(timestamp_format: Optional[str]) -> None:
    if timestamp_format is None or timestamp_format in TIMESTAMP_UNITS:
        return
    if not isinstance(timestamp_format, str) or "%" not in timestamp_format:
        raise ValueError("`timestamp_format` should be None (numbers of seconds, or dates with an inferred "
                         f"format), one of {sorted(TIMESTAMP_UNITS)} (numbers in that unit), or a strftime "
                         f"format such as '%Y-%m-%d %H:%M:%S'. Received: timestamp_format={timestamp_format!r}")


@dataclasses.dataclass(frozen=True)
class TabularOptions:
    """The options of `read_tabular` besides the path and the bad-row and history settings.

    Constructing it checks them all (without reading a file), which is how a run config
    checks its ``data.tabular`` section: its keys are these fields. See `read_tabular`
    for their meaning.
    """

    columns: Mapping[str, str]
    user_table: Optional[str] = None
    item_table: Optional[str] = None
    user_features: Sequence[Mapping[str, Any]] = ()
    item_features: Sequence[Mapping[str, Any]] = ()
    format: str = "auto"
    timestamp_format: Optional[str] = None

    def __post_init__(self):
        object.__setattr__(self, "columns", _check_columns_arg(self.columns))
        if self.format not in FORMATS:
            raise ValueError(f"`format` should be one of {', '.join(FORMATS)}. Received: format={self.format!r}")
        _check_timestamp_format(self.timestamp_format)
        for side in ("user", "item"):
            table = getattr(self, f"{side}_table")
            if table is not None and (not isinstance(table, str) or not table):
                raise ValueError(f"`{side}_table` should be the path of a file, directory or glob. "
                                 f"Received: {side}_table={table!r}")
            _, specs, explicit = self.feature_specs(side)
            if table is None and (specs or explicit):
                raise ValueError(f"`{side}_features` needs `{side}_table` (the file holding those columns). "
                                 f"Received: {side}_table=None")

    def feature_specs(self, side: str) -> Tuple[str, List[_TableFeature], bool]:
        """(id column, features, id column given explicitly) of the ``user`` or ``item`` table."""
        id_key = USER_ID if side == "user" else ITEM_ID
        return _parse_feature_specs(getattr(self, f"{side}_features"), side, id_key, self.columns[id_key])


def read_tabular(path: str, columns: Mapping[str, str], user_table: Optional[str] = None,
                 item_table: Optional[str] = None, user_features: Sequence[Mapping[str, Any]] = (),
                 item_features: Sequence[Mapping[str, Any]] = (), format: str = "auto", bad_rows: str = "fail",
                 history_length: int = 50, timestamp_format: Optional[str] = None) -> RawDataset:
    """Reads a CSV/TSV/Parquet interaction log and optional feature tables.

    Args:
      path: a file, a directory (its ``.csv``/``.tsv``/``.parquet`` files, optionally
        compressed ``.csv.gz``; names starting with ``.`` or ``_`` are ignored) or a glob.
      columns: canonical name -> file column, for ``user_id``, ``item_id``,
        ``timestamp`` (required) and ``rating``, ``label`` (optional).
      user_table, item_table: optional feature tables (file, directory or glob; format
        from the extension). When given, interactions whose user (item) is not in the
        table are bad rows ("unknown user"/"unknown item"); without, the table is derived
        from the interaction ids.
      user_features, item_features: the table columns to use, each a dict
        ``{name, kind, column?, separator?, max_length?}``: `kind` is ``categorical``,
        ``multi_categorical`` or ``numeric``; `column` defaults to `name`; `separator`
        splits multi-valued text cells (default ``"|"``; Parquet list columns are used
        as they are); `max_length` of a multi-valued feature defaults to the longest
        list in the table. A dict named ``user_id``/``item_id`` only sets the table's id
        column (default: the interaction log's id column name, else ``user_id``/``item_id``).
      format: ``auto`` (from the file extension), ``csv``, ``tsv`` or ``parquet``.
      bad_rows: ``fail`` or ``skip`` (see `RowErrors`).
      history_length: max length of the ``history`` sequence feature.
      timestamp_format: None: numbers are seconds since the epoch, text is parsed as
        dates with a format pandas infers from the first value; ``"s"``, ``"ms"``,
        ``"us"``, ``"ns"``: numbers in that unit; a strftime format (``"%Y-%m-%d"``):
        dates in that format. Dates without a time zone are taken as UTC.

    Missing ids, unparsable timestamps, ratings or labels, timestamps of more than
    `MAX_SECONDS` seconds from 1970, lines with a wrong field count, values that are not
    UTF-8 and ids or categorical values holding a line break (CSV: a quoted value over
    several lines, likely an unbalanced quote; such a record counts once per line) are bad
    rows: the `DataError` names the file, the line (CSV/TSV: 1-based physical lines, the
    header's included) or, for Parquet, the 0-based row, and the field. Only empty lines are
    blank; a line of empty values is a row. CSV values may be quoted; TSV has no quoting.
    Missing categorical feature values become the OOV token, missing multi-valued ones
    ``[]``. Everything is held in memory (ids are stored as integer codes).

    Raises:
      ValueError: an invalid option (see `TabularOptions`).
      DataError: a bad row under ``fail``; a path with nothing to read, a file of
        another format than `format`, a missing or repeated column (see `resolve_files`),
        an unreadable file (corrupt Parquet, truncated compressed data), an id column of
        lists; no valid row at all.
    """
    errors = RowErrors(bad_rows)
    history_length = check_history_length(history_length)
    options = TabularOptions(columns=columns, user_table=user_table, item_table=item_table,
                             user_features=user_features, item_features=item_features, format=format,
                             timestamp_format=timestamp_format)
    cols = dict(options.columns)
    user_id_col, user_specs, user_explicit = options.feature_specs("user")
    item_id_col, item_specs, item_explicit = options.feature_specs("item")
    files = resolve_files(path, format)

    tables: Dict[str, Optional[pd.DataFrame]] = {"user": None, "item": None}
    features: Dict[str, List[Feature]] = {"user": [Feature(USER_ID, Kind.CATEGORICAL, "user")],
                                          "item": [Feature(ITEM_ID, Kind.CATEGORICAL, "item")]}
    table_paths = {"user": user_table, "item": item_table}
    for side, id_key, id_col, explicit, specs in (("user", USER_ID, user_id_col, user_explicit, user_specs),
                                                  ("item", ITEM_ID, item_id_col, item_explicit, item_specs)):
        if table_paths[side] is not None:
            with errors.reading(f"{side}s"):
                tables[side], features[side] = _read_feature_table(
                    table_paths[side], "auto", side, id_key, id_col, explicit, cols[id_key], specs, errors)
    known = {side: (pd.Index(t[USER_ID if side == "user" else ITEM_ID]) if t is not None else None)
             for side, t in tables.items()}

    parts: Dict[str, List[np.ndarray]] = {k: [] for k in ("user", "item", "ts", RATING, LABEL)}
    for file, kind in files:
        read = _read_columns(file, kind, cols, errors, what="interaction rows")
        errors.rows_read += read.lines_read
        problems, arrays = read.problems, read.arrays
        ids = {}
        for key, side in ((USER_ID, "user"), (ITEM_ID, "item")):
            values, missing = _strings(arrays[key])
            problems.reject(missing, key, f"missing {key}", lambda r, k=key: f"missing {k}")
            if known[side] is not None:
                unknown = (lookup_ids(values, known[side]) < 0) & ~missing
                problems.reject(unknown, key, f"unknown {side}",
                                lambda r, v=values, s=side: f"unknown {s} {v[r]!r} (not in the {s} table "
                                                            f"{table_paths[s]})")
            ids[side] = values
        try:
            secs, missing, bad, expected, huge = _seconds(arrays[TIMESTAMP], timestamp_format)
        except ValueError as e:  # a date format for a column of numbers
            raise DataError(file, None, TIMESTAMP, str(e)) from None
        ts_array = arrays[TIMESTAMP]
        problems.reject(missing, TIMESTAMP, "missing timestamp", lambda r: "missing timestamp")
        problems.reject(bad, TIMESTAMP, "bad timestamp",
                        lambda r: f"timestamp {ts_array[r].as_py()!r} is not {expected}")
        problems.reject(huge, TIMESTAMP, "bad timestamp",
                        lambda r: timestamp_out_of_range(ts_array[r].as_py()))
        extra = {}
        for key in (RATING, LABEL):
            if key in cols:
                values, missing, bad = _numbers(arrays[key])
                problems.reject(missing, key, f"missing {key}", lambda r, k=key: f"missing {k}")
                problems.reject(bad, key, f"bad {key}",
                                lambda r, a=arrays[key], k=key: f"{k} {a[r].as_py()!r} is not a finite number")
                extra[key] = values
        keep = problems.flush()
        parts["user"].append(ids["user"][keep])
        parts["item"].append(ids["item"][keep])
        parts["ts"].append(secs[keep])
        for key, values in extra.items():
            parts[key].append(values[keep].astype(np.float32))

    users_all = np.concatenate(parts["user"])
    if len(users_all) == 0:
        raise DataError(path, None, None, f"no valid interactions: all {errors.rows_read} rows were rejected "
                                          f"({dict(errors.rejected)})")
    items_all = np.concatenate(parts["item"])
    timestamps = np.concatenate(parts["ts"])

    codes = {}
    for side, values in (("user", users_all), ("item", items_all)):
        key = USER_ID if side == "user" else ITEM_ID
        if known[side] is not None:
            codes[side], uniques = lookup_ids(values, known[side]), known[side].to_numpy(dtype=object)
        else:
            codes[side], uniques = pd.factorize(pd.Series(values, dtype=object), sort=False)
            uniques = np.asarray(uniques, dtype=object)
            tables[side] = pd.DataFrame({key: uniques})
        codes[side] = (codes[side], uniques)

    out_columns: Dict[str, Any] = {USER_ID: codes["user"], ITEM_ID: codes["item"], TIMESTAMP: timestamps}
    for key in (RATING, LABEL):
        if key in cols:
            out_columns[key] = np.concatenate(parts[key])
    schema = Schema(
        name=_dataset_name(path),
        user_features=tuple(features["user"]) + (
            Feature(HISTORY, Kind.SEQUENCE, "user", max_length=history_length,
                    description="items interacted with before the event, oldest first"),),
        item_features=tuple(features["item"]),
        has_rating=RATING in cols,
        has_label=LABEL in cols,
    )
    users = tables["user"][schema.table_columns("user")].reset_index(drop=True)
    items = tables["item"][schema.table_columns("item")].reset_index(drop=True)
    return RawDataset(
        schema=schema, users=users, items=items,
        interactions=user_grouped_chunks(codes["user"][0], timestamps, out_columns),
        user_complete_chunks=True, predefined_split=False, errors=errors,
        source=f"{format if format != 'auto' else files[0][1]}:{path}")
