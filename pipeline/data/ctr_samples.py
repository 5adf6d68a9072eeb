"""Readers for the small real CTR samples (Criteo, Avazu, Alimama/Taobao, MovieLens-1M).

Each reader returns ``(schema, frame)``: the feature schema and a pandas DataFrame of
labelled impressions with one column per schema feature (``str`` for categorical,
``list[str]`` for multi-valued and sequence features, ``float`` for numeric), a
``label`` column (0.0/1.0) and, when the source has a time, ``timestamp`` (int64 s).
``frame.attrs["read_report"]`` holds the rows read/rejected (`RowErrors.summary`).

Malformed rows raise `DataError` naming the file, the 1-based line and the field
(``bad_rows="fail"``, default) or are counted and dropped (``"skip"``). The files are
UTF-8 (a byte-order mark is allowed); a row with bytes that are not UTF-8 is malformed, and
so is a row with a (quoted) value spanning lines, which counts once per line it spans.

What the files hold, and how they map onto the schema (the schema needs ``user_id``
first on the user side and ``item_id`` first on the item side):

* **Criteo** (``criteo_sample.txt``: ``label, I1..I13, C1..C26``): anonymous — no user,
  no item, no time. ``user_id`` and ``item_id`` are the OOV token ``"[OOV]"`` (unknown,
  the project's convention for a missing categorical), so GAUC is the AUC; every
  ``I*`` is a numeric item-side feature (an empty value becomes 0.0: Criteo leaves many
  counts blank), every ``C*`` a categorical item-side feature (empty stays ``""``, the
  mask token: a zero embedding).
* **Avazu** (``avazu_sample.txt``: ``id, click, hour, C1, banner_pos, site_*, app_*,
  device_*, C14..C21``): no user column. ``user_id`` is ``device_id``, or
  ``device_ip + "-" + device_model`` when ``device_id`` is the placeholder ``a99f214a``
  (the user definition of the Avazu-winning FFM solution); the device columns are user
  features. There is no ad id either: ``item_id`` is the anonymized ``C14`` (the
  finest-grained ad-side column; its meaning is not published). The other columns are
  item-side (ad and placement context), plus ``hour_of_day``; ``hour`` (YYMMDDHH, UTC)
  becomes ``timestamp``. The impression ``id`` is dropped.
* **Alimama/Taobao display ads** (``alimama_sample.txt``: 50 × ``cont_btag``,
  ``his_cate``, ``his_brand``, ``mask``, ``match_mask``, then ``uid``, the user profile,
  ``mid`` (ad group), ``cate_id``, ``campaign_id``, ``customer``, ``brand``, ``price``,
  ``pid``, ``target``): the behaviour sequences hold *categories, brands and behaviour
  types*, not item ids, so they are multi-valued user features
  (``history_category``, ``history_brand``, ``history_behavior``, up to 50, in file
  order) rather than the schema's item-id ``history``. Positions with ``mask = 0`` are
  padding (left padding: in the sample one row has 22 padded steps, all others 50
  real ones) and are dropped; ``match_mask`` equals ``mask`` on every sample row and
  is only checked to be 0/1. The file has no timestamps, so that the sequences hold
  only behaviours before the impression is the data provider's claim and cannot be
  checked here. ``pid`` (ad slot) is an item-side context feature; ``price`` numeric.
* **MovieLens-1M sample** (``movielens_sample.txt``: ``user_id, movie_id, rating,
  timestamp, title, genres, gender, age, occupation, zip``): the same schema as the
  MovieLens readers (`pipeline.data.movielens.movielens_schema`); ``label = rating >=
  4``; ``history`` is built from the sample's own rows with
  `models.ranking.sequences.build_sequences` (movies the user rated strictly before,
  within this file — the 200 rows are a random sample, so most histories are empty).
"""

from __future__ import annotations

import calendar
import csv
import os
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from models.features import (HISTORY, ITEM_ID, LABEL, OOV_TOKEN, RATING, TIMESTAMP, USER_ID, Feature, Kind,
                             Schema)
from models.ranking.sequences import build_sequences
from pipeline.data.canonical import DataError, RowErrors
from pipeline.data.movielens import (OCCUPATIONS_1M, age_bucket, decade_of, movielens_schema, split_title,
                                     title_tokens)
from pipeline.data.tabular import MAX_SECONDS, timestamp_out_of_range

SAMPLE_FILES = {
    "criteo": "criteo_sample.txt",
    "avazu": "avazu_sample.txt",
    "alimama": "alimama_sample.txt",
    "movielens": "movielens_sample.txt",
}
AVAZU_MISSING_DEVICE_ID = "a99f214a"
ALIMAMA_SEQUENCE_LENGTH = 50
ML1M_AGE_CODES = ("1", "18", "25", "35", "45", "50", "56")

CRITEO_NUMERIC = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))
AVAZU_COLUMNS = ("id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
                 "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
                 "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21")
AVAZU_USER = ("device_id", "device_ip", "device_model", "device_type", "device_conn_type")
AVAZU_ITEM = ("C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain",
              "app_category", "C15", "C16", "C17", "C18", "C19", "C20", "C21")
ALIMAMA_SEQUENCES = ("cont_btag", "his_cate", "his_brand", "mask", "match_mask")
ALIMAMA_USER = ("cms_segid", "cms_group_id", "final_gender_code", "age_level", "pvalue_level", "shopping_level",
                "occupation", "new_user_class_level")
ALIMAMA_TAIL = ("uid",) + ALIMAMA_USER + ("mid", "cate_id", "campaign_id", "customer", "brand", "price", "pid",
                                          "target")
ALIMAMA_HISTORY = {"his_cate": "history_category", "his_brand": "history_brand", "cont_btag": "history_behavior"}
MOVIELENS_COLUMNS = ("user_id", "movie_id", "rating", "timestamp", "title", "genres", "gender", "age", "occupation",
                     "zip")


# ---------------------------------------------------------------------------------
# Row reading.
# ---------------------------------------------------------------------------------
class _Rows:
    """CSV rows of one file after the header check; bad rows go to `errors`."""

    def __init__(self, path: str, expected_header: Sequence[str], errors: RowErrors):
        self.path = path
        self.expected = list(expected_header)
        self.errors = errors

    def __iter__(self) -> Iterator[Tuple[int, List[str]]]:
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"CTR sample file not found: {self.path}")
        # Undecodable bytes become lone surrogates, found row by row below.
        with open(self.path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise DataError(self.path, None, None, "the file is empty; expected a header line and rows")
            header = [h.strip() for h in header]
            if header != self.expected:
                diff = next((j for j, (a, b) in enumerate(zip(header, self.expected)) if a != b),
                            min(len(header), len(self.expected)))
                raise DataError(self.path, 1, None,
                                f"unexpected header: {len(header)} columns, expected {len(self.expected)}; first "
                                f"difference at column {diff + 1}: found "
                                f"{header[diff] if diff < len(header) else None!r}, expected "
                                f"{self.expected[diff] if diff < len(self.expected) else None!r}")
            previous = reader.line_num
            while True:
                try:
                    fields = next(reader, None)
                except csv.Error as e:  # e.g. a quote still open at the end of the file
                    raise DataError(self.path, previous + 1, None, f"not a CSV row: {e}") from None
                if fields is None:
                    return
                # The row's first line (a quoted field may span several lines).
                line, previous = previous + 1, reader.line_num
                if not fields or all(not x.strip() for x in fields):
                    continue
                self.errors.rows_read += previous - line + 1
                if previous > line:
                    self.errors.reject(self.path, line, None, f"a quoted value spans lines {line}–{previous} "
                                                              "(unbalanced quote?)",
                                       kind="line break in value", rows=previous - line + 1)
                    continue
                try:
                    "".join(fields).encode("utf-8")
                except UnicodeEncodeError as e:
                    byte = ord(e.object[e.start]) - 0xDC00
                    self.errors.reject(self.path, line, None, f"not valid UTF-8 text (byte 0x{byte:02x})",
                                       kind="not UTF-8")
                    continue
                if len(fields) != len(self.expected):
                    self.errors.reject(self.path, line, None,
                                       f"expected {len(self.expected)} fields, found {len(fields)}",
                                       kind="wrong number of fields")
                    continue
                yield line, [x.strip() for x in fields]


class _BadField(Exception):
    def __init__(self, field: str, reason: str, kind: str):
        super().__init__(reason)
        self.field, self.reason, self.kind = field, reason, kind


def _parse_rows(rows: _Rows, parse: Callable[[Dict[str, str]], Dict]) -> List[Dict]:
    """Applies `parse` to each row (fields by header name); a `_BadField` rejects the row."""
    out = []
    names = rows.expected
    repeated = {n for n in names if names.count(n) > 1}
    for line, fields in rows:
        # Repeated header names (Alimama's sequences) map to lists.
        record: Dict[str, object] = {}
        for name, value in zip(names, fields):
            if name in repeated:
                record.setdefault(name, []).append(value)  # type: ignore[union-attr]
            else:
                record[name] = value
        try:
            out.append(parse(record))
        except _BadField as e:
            rows.errors.reject(rows.path, line, e.field, e.reason, kind=e.kind)
    return out


def _label(value: str, field: str) -> float:
    if value not in ("0", "1"):
        raise _BadField(field, f"label {value!r} is not 0 or 1", "bad label")
    return float(value)


def _number(value: str, field: str, missing: Optional[float] = None) -> float:
    if value == "" and missing is not None:
        return missing
    try:
        out = float(value)
    except ValueError:
        raise _BadField(field, f"{value!r} is not a number", f"bad {field}") from None
    if not np.isfinite(out):
        raise _BadField(field, f"{value!r} is not a finite number", f"bad {field}")
    return out


def _finish(schema: Schema, records: List[Dict], errors: RowErrors, path: str) -> Tuple[Schema, pd.DataFrame]:
    if not records:
        raise DataError(path, None, None, f"no valid rows: {errors.rows_read} read, all rejected "
                                          f"({dict(errors.rejected)})")
    columns = [f.name for f in schema.features] + [LABEL]
    extra = [c for c in (TIMESTAMP, RATING) if c in records[0]]
    frame = pd.DataFrame.from_records(records, columns=columns + extra)
    frame[LABEL] = frame[LABEL].astype(np.float32)
    if TIMESTAMP in frame:
        frame[TIMESTAMP] = frame[TIMESTAMP].astype(np.int64)
    for f in schema.features:
        if f.kind == Kind.NUMERIC:
            frame[f.name] = frame[f.name].astype(np.float64)
    frame.attrs["read_report"] = errors.summary()
    return schema, frame


# ---------------------------------------------------------------------------------
# Readers.
# ---------------------------------------------------------------------------------
def criteo_schema() -> Schema:
    return Schema(
        name="criteo-sample", has_label=True,
        user_features=(Feature(USER_ID, Kind.CATEGORICAL, "user", description="unknown: Criteo has no user id"),),
        item_features=(Feature(ITEM_ID, Kind.CATEGORICAL, "item", description="unknown: Criteo has no item id"),)
        + tuple(Feature(n, Kind.NUMERIC, "item", description="count feature, blank -> 0")
                for n in CRITEO_NUMERIC)
        + tuple(Feature(n, Kind.CATEGORICAL, "item", description="hashed category") for n in CRITEO_CATEGORICAL))


def read_criteo(path: str, bad_rows: str = "fail") -> Tuple[Schema, pd.DataFrame]:
    """Criteo display-ads rows (see the module docstring for the mapping)."""
    errors = RowErrors(bad_rows)
    header = ("label",) + CRITEO_NUMERIC + CRITEO_CATEGORICAL

    def parse(r):
        out = {USER_ID: OOV_TOKEN, ITEM_ID: OOV_TOKEN, LABEL: _label(r["label"], "label")}
        for n in CRITEO_NUMERIC:
            out[n] = _number(r[n], n, missing=0.0)
        for n in CRITEO_CATEGORICAL:
            out[n] = r[n]
        return out

    return _finish(criteo_schema(), _parse_rows(_Rows(path, header, errors), parse), errors, path)


def avazu_schema() -> Schema:
    return Schema(
        name="avazu-sample", has_label=True,
        user_features=(Feature(USER_ID, Kind.CATEGORICAL, "user",
                               description="device_id, or device_ip-device_model when device_id is missing"),)
        + tuple(Feature(n, Kind.CATEGORICAL, "user") for n in AVAZU_USER),
        item_features=(Feature(ITEM_ID, Kind.CATEGORICAL, "item", description="the anonymized C14 column"),)
        + tuple(Feature(n, Kind.CATEGORICAL, "item") for n in AVAZU_ITEM)
        + (Feature("hour_of_day", Kind.CATEGORICAL, "item", description="HH of the impression (UTC)"),))


def _avazu_timestamp(hour: str) -> int:
    if len(hour) != 8 or not hour.isdigit():
        raise _BadField("hour", f"hour {hour!r} is not YYMMDDHH", "bad hour")
    yy, mm, dd, hh = int(hour[:2]), int(hour[2:4]), int(hour[4:6]), int(hour[6:])
    if not (1 <= mm <= 12 and 1 <= dd <= calendar.monthrange(2000 + yy, mm)[1] and hh < 24):
        raise _BadField("hour", f"hour {hour!r} is not a valid YYMMDDHH date", "bad hour")
    return calendar.timegm((2000 + yy, mm, dd, hh, 0, 0))


def read_avazu(path: str, bad_rows: str = "fail") -> Tuple[Schema, pd.DataFrame]:
    """Avazu mobile-ads rows (see the module docstring for the mapping)."""
    errors = RowErrors(bad_rows)

    def parse(r):
        device = r["device_id"]
        if not device:
            raise _BadField("device_id", "missing device_id", "missing device_id")
        user = device if device != AVAZU_MISSING_DEVICE_ID else f"{r['device_ip']}-{r['device_model']}"
        if not r["C14"]:
            raise _BadField("C14", "missing C14 (the item id)", "missing item_id")
        out = {USER_ID: user, ITEM_ID: r["C14"], LABEL: _label(r["click"], "click"),
               TIMESTAMP: _avazu_timestamp(r["hour"]), "hour_of_day": r["hour"][6:]}
        for n in AVAZU_USER + AVAZU_ITEM:
            out[n] = r[n]
        return out

    return _finish(avazu_schema(), _parse_rows(_Rows(path, AVAZU_COLUMNS, errors), parse), errors, path)


def alimama_schema() -> Schema:
    seq = ALIMAMA_SEQUENCE_LENGTH
    return Schema(
        name="alimama-sample", has_label=True,
        user_features=(Feature(USER_ID, Kind.CATEGORICAL, "user"),)
        + tuple(Feature(n, Kind.CATEGORICAL, "user") for n in ALIMAMA_USER)
        + (Feature("history_category", Kind.MULTI_CATEGORICAL, "user", max_length=seq,
                   description="categories of the recent behaviours, file order"),
           Feature("history_brand", Kind.MULTI_CATEGORICAL, "user", max_length=seq,
                   description="brands of the recent behaviours, file order"),
           Feature("history_behavior", Kind.MULTI_CATEGORICAL, "user", max_length=seq,
                   description="behaviour types (cont_btag) of the recent behaviours")),
        item_features=(Feature(ITEM_ID, Kind.CATEGORICAL, "item", description="ad group id (mid)"),
                       Feature("cate_id", Kind.CATEGORICAL, "item"),
                       Feature("campaign_id", Kind.CATEGORICAL, "item"),
                       Feature("customer", Kind.CATEGORICAL, "item", description="advertiser"),
                       Feature("brand", Kind.CATEGORICAL, "item"),
                       Feature("price", Kind.NUMERIC, "item"),
                       Feature("pid", Kind.CATEGORICAL, "item", description="ad slot")))


def read_alimama(path: str, bad_rows: str = "fail") -> Tuple[Schema, pd.DataFrame]:
    """Taobao display-ads rows with behaviour sequences (see the module docstring)."""
    errors = RowErrors(bad_rows)
    header = tuple(n for n in ALIMAMA_SEQUENCES for _ in range(ALIMAMA_SEQUENCE_LENGTH)) + ALIMAMA_TAIL

    def parse(r):
        mask = r["mask"]
        for name in ("mask", "match_mask"):
            bad = next((j for j, v in enumerate(r[name]) if v not in ("0", "1")), None)
            if bad is not None:
                raise _BadField(f"{name}[{bad}]", f"{name} value {r[name][bad]!r} is not 0 or 1", f"bad {name}")
        out = {USER_ID: r["uid"], ITEM_ID: r["mid"], LABEL: _label(r["target"], "target"),
               "cate_id": r["cate_id"], "campaign_id": r["campaign_id"], "customer": r["customer"],
               "brand": r["brand"], "price": _number(r["price"], "price"), "pid": r["pid"]}
        for key, name in (("uid", USER_ID), ("mid", ITEM_ID), ("cate_id", "cate_id"), ("brand", "brand")):
            if not out[name]:
                raise _BadField(key, f"missing {key}", f"missing {key}")
        for n in ALIMAMA_USER:
            out[n] = r[n]
        for column, name in ALIMAMA_HISTORY.items():
            values = r[column]
            missing = next((j for j, (v, m) in enumerate(zip(values, mask)) if m == "1" and not v), None)
            if missing is not None:
                raise _BadField(f"{column}[{missing}]", f"{column} is empty at an unmasked step",
                                f"missing {column}")
            out[name] = [v for v, m in zip(values, mask) if m == "1"]
        return out

    return _finish(alimama_schema(), _parse_rows(_Rows(path, header, errors), parse), errors, path)


def read_movielens_sample(path: str, bad_rows: str = "fail", history_length: int = 50
                          ) -> Tuple[Schema, pd.DataFrame]:
    """MovieLens-1M impressions with user and movie features in one CSV (see the module docstring)."""
    errors = RowErrors(bad_rows)
    schema = movielens_schema("movielens-1m-sample", history_length)

    def parse(r):
        for key in ("user_id", "movie_id"):
            if not r[key]:
                raise _BadField(key, f"missing {key}", f"missing {key}")
        rating = _number(r["rating"], "rating")
        seconds = r["timestamp"]
        if not seconds.lstrip("-").isdigit():
            raise _BadField("timestamp", f"timestamp {seconds!r} is not a number of seconds", "bad timestamp")
        if abs(int(seconds)) > MAX_SECONDS:
            raise _BadField("timestamp", timestamp_out_of_range(seconds), "bad timestamp")
        if r["gender"] not in ("M", "F"):
            raise _BadField("gender", f"gender {r['gender']!r} is not M or F", "bad gender")
        if r["age"] not in ML1M_AGE_CODES:
            raise _BadField("age", f"age {r['age']!r} is not an ML-1M age code {ML1M_AGE_CODES}", "bad age")
        occupation = r["occupation"]
        if not occupation.isdigit() or int(occupation) >= len(OCCUPATIONS_1M):
            raise _BadField("occupation", f"occupation {occupation!r} is not an ML-1M code 0..20", "bad occupation")
        title, year = split_title(r["title"])
        year = year or "unknown"
        return {USER_ID: r["user_id"], "gender": r["gender"], "age": age_bucket(float(r["age"])),
                "occupation": OCCUPATIONS_1M[int(occupation)], "zip_prefix": (r["zip"][:1].upper() or "unknown"),
                ITEM_ID: r["movie_id"], "genres": [g for g in r["genres"].split("|") if g],
                "release_year": year, "decade": decade_of(year), "title_tokens": title_tokens(title),
                RATING: rating, TIMESTAMP: int(seconds), LABEL: float(rating >= 4.0)}

    records = _parse_rows(_Rows(path, MOVIELENS_COLUMNS, errors), parse)
    if records:
        histories = build_sequences([r[USER_ID] for r in records], [r[ITEM_ID] for r in records],
                                    np.asarray([r[TIMESTAMP] for r in records], np.int64), history_length)
        for r, h in zip(records, histories):
            r[HISTORY] = [x for x in h if x]
    return _finish(schema, records, errors, path)


READERS = {"criteo": read_criteo, "avazu": read_avazu, "alimama": read_alimama, "movielens": read_movielens_sample}


def read_ctr_sample(name: str, data_dir: str, bad_rows: str = "fail") -> Tuple[Schema, pd.DataFrame]:
    """Reads ``<data_dir>/<SAMPLE_FILES[name]>`` with its reader (`name` in `SAMPLE_FILES`)."""
    if name not in READERS:
        raise ValueError(f"`name` should be one of {tuple(READERS)}. Received: name={name!r}")
    return READERS[name](os.path.join(data_dir, SAMPLE_FILES[name]), bad_rows=bad_rows)
