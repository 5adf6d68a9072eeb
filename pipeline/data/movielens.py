"""MovieLens readers: RecBole atomic files, the GroupLens 100K and 1M layouts, and TFDS.

All four sources give the same schema, so a config written for one carries over:

* user side: ``user_id``, ``gender`` (``"M"``/``"F"``), ``age`` (the ML-1M age buckets
  ``"under 18"``, ``"18-24"``, ``"25-34"``, ``"35-44"``, ``"45-49"``, ``"50-55"``, ``"56+"``;
  100K's exact ages are bucketed the same way, as TFDS does), ``occupation`` (lower-cased
  text; the ML-1M codes are mapped to the ML-1M README labels as TFDS spells them), ``zip_prefix`` (first character of
  the zip code) and the ``history`` sequence;
* item side: ``item_id``, ``genres`` (multi-valued, up to 6), ``release_year`` (``"1995"``
  or ``"unknown"``), ``decade`` (``"1990s"`` or ``"unknown"``) and ``title_tokens``
  (lower-cased word tokens of the title without its year, distinct, up to 8);
* interactions carry ``rating`` and ``label`` = 1.0 if rating >= 4 else 0.0.

Missing demographic values become ``"unknown"``. Ids are the files' strings.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from models.features import HISTORY, ITEM_ID, LABEL, RATING, TIMESTAMP, USER_ID, Feature, Kind, Schema
from pipeline.data.canonical import DataError, RawDataset, RowErrors
from pipeline.data.tabular import (DelimitedRows, FileProblems, check_history_length, lookup_ids,
                                   parse_numbers, parse_seconds, read_delimited, timestamp_out_of_range,
                                   user_grouped_chunks)

LAYOUTS = ("auto", "atomic", "100k", "1m")
UNKNOWN = "unknown"
GENRES_MAX_LENGTH = 6
TITLE_TOKENS_MAX_LENGTH = 8
POSITIVE_RATING = 4.0

# u.item genre flag columns, in file order.
GENRES_100K = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
               "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
               "War", "Western")
# ML-1M README occupation codes 0..20, spelled (lower-cased) as TFDS's user_occupation_text.
OCCUPATIONS_1M = ("other/not specified", "academic/educator", "artist", "clerical/admin",
                  "college/grad student", "customer service", "doctor/health care", "executive/managerial",
                  "farmer", "homemaker", "k-12 student", "lawyer", "programmer", "retired", "sales/marketing",
                  "scientist", "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed",
                  "writer")
# Lower bound -> label of the ML-1M age buckets (the codes of users.dat are the lower bounds).
AGE_BUCKETS = ((56, "56+"), (50, "50-55"), (45, "45-49"), (35, "35-44"), (25, "25-34"), (18, "18-24"))
AGE_UNDER_18 = "under 18"
# TFDS spells some genres differently from the GroupLens files.
_TFDS_GENRES = {"Children": "Children's", "Unknown": "unknown", "(no genres listed)": None}

_LAYOUT_FILES = {
    "100k": ("u.data", "u.user", "u.item"),
    "1m": ("ratings.dat", "users.dat", "movies.dat"),
}
_TITLE_YEAR = re.compile(r"\s*\((\d{4})\)\s*$")
_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_YEAR = re.compile(r"^\d{4}$")


# ---------------------------------------------------------------------------------
# Schema and value helpers (pure).
# ---------------------------------------------------------------------------------
def movielens_schema(name: str = "movielens-100k", history_length: int = 50) -> Schema:
    """The schema every MovieLens reader produces."""
    return Schema(
        name=name,
        has_rating=True,
        has_label=True,
        user_features=(
            Feature(USER_ID, Kind.CATEGORICAL, "user"),
            Feature("gender", Kind.CATEGORICAL, "user"),
            Feature("age", Kind.CATEGORICAL, "user", description="ML-1M age bucket"),
            Feature("occupation", Kind.CATEGORICAL, "user"),
            Feature("zip_prefix", Kind.CATEGORICAL, "user", description="first character of the zip code"),
            Feature(HISTORY, Kind.SEQUENCE, "user", max_length=check_history_length(history_length),
                    description="positive movies (by default rated 4 or more) before the event, oldest first"),
        ),
        item_features=(
            Feature(ITEM_ID, Kind.CATEGORICAL, "item"),
            Feature("genres", Kind.MULTI_CATEGORICAL, "item", max_length=GENRES_MAX_LENGTH),
            Feature("release_year", Kind.CATEGORICAL, "item"),
            Feature("decade", Kind.CATEGORICAL, "item"),
            Feature("title_tokens", Kind.MULTI_CATEGORICAL, "item", max_length=TITLE_TOKENS_MAX_LENGTH,
                    description="lower-cased title words without the year"),
        ),
    )


def age_bucket(age: float) -> str:
    """ML-1M bucket label of an exact age or of an ML-1M age code (1, 18, 25, ...)."""
    for lower, label in AGE_BUCKETS:
        if age >= lower:
            return label
    return AGE_UNDER_18


def split_title(title: str) -> Tuple[str, Optional[str]]:
    """``"Toy Story (1995)"`` -> ``("Toy Story", "1995")``; no trailing year -> ``(title, None)``."""
    m = _TITLE_YEAR.search(title)
    if m is None:
        return title.strip(), None
    return title[:m.start()].strip(), m.group(1)


def title_tokens(title: str) -> List[str]:
    """Distinct lower-cased word tokens in order: ``"Children's Hour, The"`` -> ``["children's", "hour", "the"]``."""
    return list(dict.fromkeys(_TOKEN.findall(title.lower())))


def decade_of(year: str) -> str:
    """``"1995"`` -> ``"1990s"``; anything but a 4-digit year -> ``"unknown"``."""
    return f"{int(year) // 10 * 10}s" if _YEAR.match(year or "") else UNKNOWN


def _zip_prefix(zip_code: str) -> str:
    return zip_code[0].upper() if zip_code else UNKNOWN


# ---------------------------------------------------------------------------------
# Layout detection.
# ---------------------------------------------------------------------------------
def detect_layout(data_dir: str, layout: str = "auto") -> Tuple[str, Dict[str, str]]:
    """Finds which MovieLens layout `data_dir` holds.

    `data_dir` may also be the path of a RecBole ``.inter`` file (picks that prefix when a
    directory holds several).

    Returns:
      ``(layout, {"interactions": path, "users": path, "items": path})``.

    Raises:
      DataError: naming `data_dir` and the paths that were looked for: no MovieLens data,
        a layout missing one of its files, or several layouts/prefixes present with ``auto``.
      ValueError: unknown `layout`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` should be one of {LAYOUTS}. Received: layout={layout!r}")
    if os.path.isfile(data_dir) and data_dir.endswith(".inter"):
        if layout not in ("auto", "atomic"):
            raise ValueError(f"`data_dir` is a RecBole .inter file but layout={layout!r}; use 'atomic' or 'auto'.")
        return "atomic", _atomic_files(data_dir[:-len(".inter")])
    if not os.path.isdir(data_dir):
        what = "is a file, not a directory (nor a RecBole .inter file)" if os.path.exists(data_dir) else "was not found"
        raise DataError(data_dir, None, None, f"the MovieLens data directory {what}")
    inters = sorted(n for n in os.listdir(data_dir) if n.endswith(".inter"))
    present = {"atomic": bool(inters),
               "100k": os.path.isfile(os.path.join(data_dir, "u.data")),
               "1m": os.path.isfile(os.path.join(data_dir, "ratings.dat"))}
    if layout == "auto":
        found = [name for name, ok in present.items() if ok]
        if not found:
            listing = sorted(os.listdir(data_dir))
            hint = (" For ratings.csv (MovieLens 20M/25M/latest), use the csv source (read_tabular)."
                    if "ratings.csv" in listing else "")
            raise DataError(
                data_dir, None, None,
                f"no MovieLens data: looked for {os.path.join(data_dir, '<name>.inter')} "
                f"(RecBole atomic), {os.path.join(data_dir, 'u.data')} (GroupLens 100K) and "
                f"{os.path.join(data_dir, 'ratings.dat')} (MovieLens-1M). The directory holds "
                f"{listing[:20]}{' ...' if len(listing) > 20 else ''}.{hint}")
        if len(found) > 1:
            raise DataError(data_dir, None, None, f"the directory holds several MovieLens layouts {found}; "
                                                  "pass layout= one of them, or keep one layout per directory")
        layout = found[0]
    if layout == "atomic":
        if not inters:
            raise DataError(data_dir, None, None, "no RecBole atomic interaction file "
                                                  f"{os.path.join(data_dir, '<name>.inter')} in the directory")
        if len(inters) > 1:
            raise DataError(data_dir, None, None, f"the directory holds several RecBole datasets {inters}; "
                                                  "pass the path of one '.inter' file as data_dir (`data.path`)")
        return "atomic", _atomic_files(os.path.join(data_dir, inters[0][:-len(".inter")]))
    names = _LAYOUT_FILES[layout]
    files = dict(zip(("interactions", "users", "items"), (os.path.join(data_dir, n) for n in names)))
    missing = [p for p in files.values() if not os.path.isfile(p)]
    if missing:
        raise DataError(data_dir, None, None, f"the MovieLens {layout.upper()} layout is incomplete: missing "
                                              f"{missing} (the layout needs {list(names)})")
    return layout, files


def _atomic_files(prefix: str) -> Dict[str, str]:
    files = {"interactions": prefix + ".inter", "users": prefix + ".user", "items": prefix + ".item"}
    missing = [p for p in files.values() if not os.path.isfile(p)]
    if missing:
        raise DataError(prefix + ".inter", None, None, f"the RecBole atomic dataset is incomplete: missing "
                                                       f"{missing} (needs .inter, .user and .item files with "
                                                       "the same prefix)")
    return files


def _schema_name(layout: str, files: Dict[str, str]) -> str:
    if layout != "atomic":
        return f"movielens-{layout}"
    prefix = os.path.basename(files["interactions"])[:-len(".inter")].lower()
    for size in ("100k", "1m", "10m", "20m", "25m"):
        if prefix in (f"ml-{size}", f"ml{size}", f"movielens-{size}", f"movielens{size}"):
            return f"movielens-{size}"
    return f"movielens-{prefix[3:] if prefix.startswith('ml-') else prefix}"


# ---------------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------------
def _reject_bad_ids(rows: DelimitedRows, ids: np.ndarray, key: str) -> None:
    """Missing and duplicated ids of a user/item table are bad rows."""
    problems = rows.problems
    missing = ids == ""
    problems.reject(missing, key, f"missing {key}", lambda r: f"missing {key}")
    series = pd.Series(ids, dtype=object)
    dup = series.duplicated().to_numpy() & ~missing
    if dup.any():
        first = {}
        for i in np.flatnonzero(series.duplicated(keep=False).to_numpy() & ~missing):
            first.setdefault(ids[i], int(rows.lines[i]))
        problems.reject(dup, key, f"duplicate {key}",
                        lambda r: f"duplicate {key} {ids[r]!r} (first on line {first[ids[r]]})")


def _build_users(rows: DelimitedRows, fields: Dict[str, Optional[np.ndarray]],
                 occupation_codes: Optional[bool]) -> pd.DataFrame:
    """The user table from raw string columns (absent columns -> "unknown").

    `occupation_codes`: True for ML-1M codes, False for text, None to detect (all values
    integers in 0..20).
    """
    problems = rows.problems
    n = len(rows.lines)
    unknown = np.full(n, UNKNOWN, dtype=object)
    ids = fields[USER_ID]
    _reject_bad_ids(rows, ids, USER_ID)

    ages = unknown
    if fields.get("age") is not None:
        raw = fields["age"]
        numbers, bad = parse_numbers(raw)
        empty = raw == ""
        problems.reject(bad & ~empty, "age", "bad age", lambda r: f"age {raw[r]!r} is not a number")
        ages = np.asarray([UNKNOWN if b else age_bucket(a) for a, b in zip(numbers, bad)], dtype=object)

    genders = unknown
    if fields.get("gender") is not None:
        genders = np.asarray([g.upper() if g else UNKNOWN for g in fields["gender"]], dtype=object)

    occupations = unknown
    if fields.get("occupation") is not None:
        raw = fields["occupation"]
        empty = raw == ""
        numbers, bad = parse_numbers(raw)
        is_code = ~bad & (numbers == np.floor(numbers)) & (numbers >= 0) & (numbers < len(OCCUPATIONS_1M))
        if occupation_codes is None:
            occupation_codes = bool(is_code[~empty].all()) and bool((~empty).any())
        if occupation_codes:
            problems.reject(~is_code & ~empty, "occupation", "bad occupation",
                            lambda r: f"occupation {raw[r]!r} is not an ML-1M occupation code 0..20")
            occupations = np.asarray([OCCUPATIONS_1M[int(c)] if ok else UNKNOWN for c, ok in zip(numbers, is_code)],
                                     dtype=object)
        else:
            occupations = np.asarray([o.lower() if o else UNKNOWN for o in raw], dtype=object)

    zips = unknown
    if fields.get("zip_code") is not None:
        zips = np.asarray([_zip_prefix(z) for z in fields["zip_code"]], dtype=object)

    keep = problems.flush()
    return pd.DataFrame({USER_ID: ids, "gender": genders, "age": ages, "occupation": occupations,
                         "zip_prefix": zips})[keep].reset_index(drop=True)


def _build_items(rows: DelimitedRows, ids: np.ndarray, titles: Optional[np.ndarray], years: Optional[np.ndarray],
                 genres: List[List[str]]) -> pd.DataFrame:
    """The item table; `years` are candidate release years (else the title's "(1995)")."""
    n = len(ids)
    _reject_bad_ids(rows, ids, ITEM_ID)
    release, decades, tokens = [], [], []
    for i in range(n):
        title, title_year = split_title(titles[i]) if titles is not None else ("", None)
        year = years[i] if years is not None and _YEAR.match(years[i]) else title_year
        year = year or UNKNOWN
        release.append(year)
        decades.append(decade_of(year))
        tokens.append(title_tokens(title))
    keep = rows.problems.flush()
    return pd.DataFrame({ITEM_ID: ids, "genres": genres, "release_year": release, "decade": decades,
                         "title_tokens": tokens})[keep].reset_index(drop=True)


def _atomic_columns(rows: DelimitedRows, required: Sequence[str], optional: Sequence[str],
                    arrow: bool = False) -> Dict[str, Any]:
    """Columns of a RecBole atomic file by name (``name:type`` header fields)."""
    names = [h.split(":", 1)[0].strip() for h in rows.header]
    missing = [r for r in required if r not in names]
    if missing:
        raise DataError(rows.path, 1, None, f"the header has no {missing} column(s); found {rows.header}")
    out: Dict[str, Optional[np.ndarray]] = {}
    for name in list(required) + list(optional):
        source = rows.columns if arrow else rows.fields
        out[name] = source[names.index(name)] if name in names else None
    return out


def _read_atomic_users(path: str, errors: RowErrors) -> pd.DataFrame:
    rows = read_delimited(path, "\t", errors, header=True, what="user rows")
    cols = _atomic_columns(rows, [USER_ID], ["age", "gender", "occupation", "zip_code"])
    return _build_users(rows, cols, occupation_codes=None)


def _read_atomic_items(path: str, errors: RowErrors) -> pd.DataFrame:
    rows = read_delimited(path, "\t", errors, header=True, what="item rows")
    cols = _atomic_columns(rows, [ITEM_ID], ["movie_title", "title", "release_year", "class", "genre"])
    genre_col = cols["class"] if cols["class"] is not None else cols["genre"]
    genres = [g.split() for g in genre_col] if genre_col is not None else [[] for _ in rows.lines]
    titles = cols["movie_title"] if cols["movie_title"] is not None else cols["title"]
    return _build_items(rows, cols[ITEM_ID], titles, cols["release_year"], genres)


def _read_100k_users(path: str, errors: RowErrors) -> pd.DataFrame:
    names = (USER_ID, "age", "gender", "occupation", "zip_code")
    rows = read_delimited(path, "|", errors, num_fields=5, encoding="latin-1", field_names=names,
                          what="user rows 'id|age|gender|occupation|zip'")
    return _build_users(rows, dict(zip(names, rows.fields)), occupation_codes=False)


def _read_100k_items(path: str, errors: RowErrors) -> pd.DataFrame:
    names = (ITEM_ID, "title", "release_date", "video_release_date", "imdb_url") + GENRES_100K
    rows = read_delimited(path, "|", errors, num_fields=len(names), encoding="latin-1",
                          field_names=names[:5] + ("19 genre flags",),
                          what="item rows 'id|title|release date|video release date|IMDb URL|19 genre flags'")
    flags = np.stack(rows.fields[5:], axis=1) if len(rows.lines) else np.zeros((0, 19), dtype=object)
    bad = ~np.isin(flags, ["0", "1"])

    def describe(r: int) -> str:
        j = int(np.flatnonzero(bad[r])[0])
        return f"genre flag {GENRES_100K[j]!r} is {flags[r, j]!r}, expected 0 or 1"

    rows.problems.reject(bad.any(axis=1), "genres", "bad genre flag", describe)
    on = flags == "1"
    genres = [[GENRES_100K[j] for j in np.flatnonzero(row)] for row in on]
    dates = rows.fields[2]  # "01-Jan-1995"
    years = np.asarray([d[-4:] if len(d) >= 4 else "" for d in dates], dtype=object)
    return _build_items(rows, rows.fields[0], rows.fields[1], years, genres)


def _read_1m_users(path: str, errors: RowErrors) -> pd.DataFrame:
    names = (USER_ID, "gender", "age", "occupation", "zip_code")
    rows = read_delimited(path, "::", errors, num_fields=5, encoding="latin-1", field_names=names,
                          what="user rows 'UserID::Gender::Age::Occupation::Zip-code'")
    return _build_users(rows, dict(zip(names, rows.fields)), occupation_codes=True)


def _read_1m_items(path: str, errors: RowErrors) -> pd.DataFrame:
    rows = read_delimited(path, "::", errors, num_fields=3, encoding="latin-1",
                          field_names=(ITEM_ID, "title", "genres"), what="movie rows 'MovieID::Title::Genres'")
    genres = [[g for g in s.split("|") if g and g != "(no genres listed)"] for s in rows.fields[2]]
    return _build_items(rows, rows.fields[0], rows.fields[1], None, genres)


# The user and item table readers of each layout.
TABLE_READERS = {"atomic": (_read_atomic_users, _read_atomic_items), "100k": (_read_100k_users, _read_100k_items),
                 "1m": (_read_1m_users, _read_1m_items)}


# ---------------------------------------------------------------------------------
# Interactions.
# ---------------------------------------------------------------------------------
def _read_ratings(rows: DelimitedRows, cols: Dict[str, pa.Array], users: pd.Index, items: pd.Index,
                  paths: Dict[str, str], errors: RowErrors) -> Dict[str, np.ndarray]:
    """Checks and converts the rating rows; returns codes into the tables and values."""
    problems = rows.problems
    errors.rows_read += rows.lines_read
    codes = {}
    for key, side, table in ((USER_ID, "user", users), (ITEM_ID, "item", items)):
        values = cols[key]
        missing = pc.equal(values, "").to_numpy(zero_copy_only=False)
        problems.reject(missing, key, f"missing {key}", lambda r, k=key: f"missing {k}")
        codes[side] = lookup_ids(values, table)
        problems.reject((codes[side] < 0) & ~missing, key, f"unknown {side}",
                        lambda r, v=values, s=side: f"unknown {s} {v[r].as_py()!r} (not in {paths[s + 's']})")
    ratings, bad_rating = parse_numbers(cols[RATING])
    problems.reject(bad_rating, RATING, "bad rating",
                    lambda r: f"rating {cols[RATING][r].as_py()!r} is not a number")
    seconds, bad_ts, huge = parse_seconds(cols[TIMESTAMP])
    problems.reject(bad_ts, TIMESTAMP, "bad timestamp",
                    lambda r: f"timestamp {cols[TIMESTAMP][r].as_py()!r} is not a number of seconds")
    problems.reject(huge, TIMESTAMP, "bad timestamp",
                    lambda r: timestamp_out_of_range(cols[TIMESTAMP][r].as_py()))
    keep = problems.flush()
    return {"user": codes["user"][keep], "item": codes["item"][keep], TIMESTAMP: seconds[keep],
            RATING: ratings[keep].astype(np.float32)}


def _assemble(schema: Schema, users: pd.DataFrame, items: pd.DataFrame, ratings: Dict[str, np.ndarray],
              errors: RowErrors, source: str) -> RawDataset:
    if len(ratings[TIMESTAMP]) == 0:
        raise DataError(source, None, None, f"no valid ratings: all {errors.rows_read} rows were rejected "
                                            f"({dict(errors.rejected)})")
    rating = ratings[RATING]
    columns = {
        USER_ID: (ratings["user"], users[USER_ID].to_numpy(dtype=object)),
        ITEM_ID: (ratings["item"], items[ITEM_ID].to_numpy(dtype=object)),
        TIMESTAMP: ratings[TIMESTAMP].astype(np.int64),
        RATING: rating,
        LABEL: (rating >= POSITIVE_RATING).astype(np.float32),
    }
    return RawDataset(schema=schema, users=users[schema.table_columns("user")],
                      items=items[schema.table_columns("item")],
                      interactions=user_grouped_chunks(ratings["user"], columns[TIMESTAMP], columns),
                      user_complete_chunks=True, predefined_split=False, errors=errors, source=source)


def read_movielens(data_dir: str, bad_rows: str = "fail", history_length: int = 50,
                   layout: str = "auto") -> RawDataset:
    """Reads MovieLens from files, detecting the layout.

    Layouts:
      * ``atomic``: RecBole ``<name>.inter``/``.user``/``.item`` (tab-separated, a
        ``name:type`` header; genres in ``class`` or ``genre``, space-separated);
      * ``100k``: GroupLens ``u.data``, ``u.user``, ``u.item`` (latin-1);
      * ``1m``: ``ratings.dat``, ``users.dat``, ``movies.dat`` (``::``-separated, latin-1).

    Args:
      data_dir: the directory (or, for atomic, the ``.inter`` file).
      bad_rows: ``fail`` or ``skip`` (see `RowErrors`). Ratings whose user or movie is
        not in the user/movie table are bad rows ("unknown user"/"unknown item").
      history_length: max length of the ``history`` sequence feature.
      layout: ``auto`` or one of the layouts above.

    Raises:
      DataError: no MovieLens files, or a layout missing one of its files (see
        `detect_layout`); a malformed row under ``fail``, an empty file, a header lacking
        columns; no valid rating at all.
    """
    errors = RowErrors(bad_rows)
    history_length = check_history_length(history_length)
    layout, files = detect_layout(data_dir, layout)
    schema = movielens_schema(_schema_name(layout, files), history_length)
    paths = {"users": files["users"], "items": files["items"]}
    read_users, read_items = TABLE_READERS[layout]
    with errors.reading("users"):
        users = read_users(files["users"], errors)
    with errors.reading("items"):
        items = read_items(files["items"], errors)
    if layout == "atomic":
        rows = read_delimited(files["interactions"], "\t", errors, header=True,
                              what="rating rows 'user_id  item_id  rating  timestamp'")
        cols = _atomic_columns(rows, [USER_ID, ITEM_ID, RATING, TIMESTAMP], [], arrow=True)
    else:
        if layout == "100k":
            delimiter, what = "\t", "rating rows 'user id \\t item id \\t rating \\t timestamp'"
        else:
            delimiter, what = "::", "rating rows 'UserID::MovieID::Rating::Timestamp'"
        names = (USER_ID, ITEM_ID, RATING, TIMESTAMP)
        rows = read_delimited(files["interactions"], delimiter, errors, num_fields=4, encoding="latin-1",
                              field_names=names, what=what)
        cols = dict(zip(names, rows.columns))
    ratings = _read_ratings(rows, cols, pd.Index(users[USER_ID]), pd.Index(items[ITEM_ID]), paths, errors)
    return _assemble(schema, users, items, ratings, errors,
                     source=f"movielens[{layout}]:{files['interactions']}")


# ---------------------------------------------------------------------------------
# TFDS.
# ---------------------------------------------------------------------------------
def _tfds_schema_name(name: str) -> str:
    config = name.split("/", 1)[1] if "/" in name else name
    config = config.split(":", 1)[0]
    return "movielens-" + (config[:-len("-ratings")] if config.endswith("-ratings") else config)


def _not_prepared_message(builder: Any, name: str, data_dir: str) -> str:
    config_dir = os.path.dirname(str(builder.data_dir))
    found = sorted(v for v in os.listdir(config_dir)
                   if os.path.isfile(os.path.join(config_dir, v, "dataset_info.json"))) \
        if os.path.isdir(config_dir) else []
    other = (f" Prepared versions found there: {found}; select one with name='{name.split(':')[0]}:{found[-1]}'."
             if found else "")
    return (f"TFDS dataset {name!r} (version {builder.version}) is not prepared in data_dir {data_dir!r}: "
            f"looked for {os.path.join(str(builder.data_dir), 'dataset_info.json')}.{other} "
            f"recfunnel never downloads data. Prepare it once where the network is allowed, e.g. "
            f"`python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
            f"data_dir='{data_dir}').download_and_prepare()\"` (or `tfds build {name.split(':')[0]} "
            f"--data_dir={data_dir}`), or copy an already prepared TFDS data directory there.")


def _decode(values: np.ndarray) -> np.ndarray:
    return np.asarray([v.decode("utf-8", "replace").strip() if isinstance(v, bytes) else str(v).strip()
                       for v in values], dtype=object)


def _tfds_columns(builder: Any, wanted: Sequence[str]) -> Tuple[Dict[str, np.ndarray], List[List[int]]]:
    """All splits of the prepared dataset as numpy columns; genres as index lists."""
    import tensorflow_datasets as tfds

    parts: Dict[str, List[np.ndarray]] = {k: [] for k in wanted}
    genres: List[List[int]] = []
    for split in sorted(builder.info.splits):
        ds = builder.as_dataset(split=split, shuffle_files=False)
        ds = ds.map(lambda ex: {k: ex[k] for k in list(wanted) + (["movie_genres"] if "movie_genres" in ex else [])})
        for batch in tfds.as_numpy(ds.ragged_batch(65536)):
            for k in wanted:
                parts[k].append(np.asarray(batch[k]))
            if "movie_genres" in batch:
                g = batch["movie_genres"]
                if hasattr(g, "row_splits"):
                    flat, splits = g.flat_values.numpy(), g.row_splits.numpy()
                    genres.extend(flat[a:b].tolist() for a, b in zip(splits[:-1], splits[1:]))
                else:
                    genres.extend(list(row) for row in np.asarray(g))
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}, genres


def read_movielens_tfds(data_dir: str, name: str = "movielens/100k-ratings", bad_rows: str = "fail",
                        history_length: int = 50) -> RawDataset:
    """Reads a MovieLens ``*-ratings`` dataset already prepared in a TFDS data dir.

    Nothing is downloaded: an unprepared dataset raises `DataError` naming the
    directory and version looked for and how to prepare it. Users and movies tables are
    built from the first rating row of each id (TFDS repeats them on every rating);
    configs without demographics (20m, 25m, latest-small) get ``"unknown"`` user features.

    Args:
      data_dir: the TFDS data dir (holding ``movielens/<config>/<version>/``).
      name: the TFDS name, e.g. ``movielens/1m-ratings`` or ``movielens/100k-ratings:0.1.1``.
      bad_rows: ``fail`` or ``skip``: rows with an empty id or a non-finite rating.
      history_length: max length of the ``history`` sequence feature.
    """
    errors = RowErrors(bad_rows)
    history_length = check_history_length(history_length)
    if not isinstance(name, str) or not name.startswith(("movielens/", "movie_lens/")):
        raise ValueError("`name` should be a TFDS MovieLens ratings dataset such as 'movielens/100k-ratings'. "
                         f"Received: name={name!r}")
    import models.tf_compat  # noqa: F401  (selects Keras 2 before tensorflow_datasets imports TensorFlow)
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError, bad config or version
        raise ValueError(f"`name`={name!r} is not a TFDS dataset that tensorflow_datasets {tfds.__version__} "
                         f"knows: {e}") from None
    if not builder.is_prepared():
        raise DataError(data_dir, None, None, _not_prepared_message(builder, name, data_dir))
    feature_names = set(builder.info.features.keys())
    required = ("user_id", "movie_id", "user_rating", "timestamp")
    if not set(required) <= feature_names:
        raise ValueError(f"TFDS dataset {name!r} has no ratings (features: {sorted(feature_names)}); use a "
                         "'-ratings' config such as 'movielens/100k-ratings'.")
    optional = ("user_gender", "bucketized_user_age", "user_occupation_text", "user_zip_code", "movie_title")
    wanted = list(required) + [f for f in optional if f in feature_names]
    cols, genre_ids = _tfds_columns(builder, wanted)
    n = len(cols["user_id"])
    source = str(builder.data_dir)
    if n == 0:
        raise DataError(source, None, None, "the prepared dataset has no rows")
    errors.rows_read += n
    problems = FileProblems(source, errors, np.arange(n), location="row")
    user_ids, item_ids = _decode(cols["user_id"]), _decode(cols["movie_id"])
    problems.reject(user_ids == "", USER_ID, f"missing {USER_ID}", lambda r: "empty user_id")
    problems.reject(item_ids == "", ITEM_ID, f"missing {ITEM_ID}", lambda r: "empty movie_id")
    rating = cols["user_rating"].astype(np.float64)
    problems.reject(~np.isfinite(rating), RATING, "bad rating", lambda r: f"user_rating {rating[r]} is not finite")
    keep = problems.flush()
    if not keep.any():
        raise DataError(source, None, None, f"no valid ratings: all {n} rows were rejected ({dict(errors.rejected)})")

    unknown = np.full(n, UNKNOWN, dtype=object)
    gender = (np.where(cols["user_gender"].astype(bool), "M", "F").astype(object)
              if "user_gender" in cols else unknown)
    age = (np.asarray([age_bucket(a) for a in cols["bucketized_user_age"]], dtype=object)
           if "bucketized_user_age" in cols else unknown)
    occupation = (np.asarray([o.lower() if o else UNKNOWN for o in _decode(cols["user_occupation_text"])],
                             dtype=object) if "user_occupation_text" in cols else unknown)
    zips = (np.asarray([_zip_prefix(z) for z in _decode(cols["user_zip_code"])], dtype=object)
            if "user_zip_code" in cols else unknown)
    users = pd.DataFrame({USER_ID: user_ids, "gender": gender, "age": age, "occupation": occupation,
                          "zip_prefix": zips})[keep].drop_duplicates(USER_ID).reset_index(drop=True)

    label_names = builder.info.features["movie_genres"].feature.names if "movie_genres" in feature_names else []
    names = [_TFDS_GENRES.get(g, g) for g in label_names]
    kept = np.flatnonzero(keep)
    first_item = kept[~pd.Series(item_ids[kept], dtype=object).duplicated().to_numpy()]
    titles = _decode(cols["movie_title"][first_item]) if "movie_title" in cols else np.full(len(first_item), "")
    release, decades, tokens, genres = [], [], [], []
    for row, title in zip(first_item, titles):
        clean, year = split_title(title)
        release.append(year or UNKNOWN)
        decades.append(decade_of(year or UNKNOWN))
        tokens.append(title_tokens(clean))
        genres.append([names[g] for g in genre_ids[row] if names[g]] if genre_ids else [])
    items = pd.DataFrame({ITEM_ID: item_ids[first_item], "genres": genres, "release_year": release,
                          "decade": decades, "title_tokens": tokens})

    ratings = {
        "user": lookup_ids(user_ids[keep], pd.Index(users[USER_ID])),
        "item": lookup_ids(item_ids[keep], pd.Index(items[ITEM_ID])),
        TIMESTAMP: cols["timestamp"].astype(np.int64)[keep],
        RATING: rating[keep].astype(np.float32),
    }
    schema = movielens_schema(_tfds_schema_name(name), history_length)
    return _assemble(schema, users, items, ratings, errors, source=f"tfds:{name}@{data_dir}")
