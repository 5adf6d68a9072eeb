"""Tests of the dataset readers: MovieLens (files and TFDS), BARS and generic CSV/Parquet.

Tiny fixture files are written into tmp_path; the checks on the real datasets skip when
`<repo>/../shared/data` is absent.
"""

import os
import socket

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.features import ITEM_ID, USER_ID
from pipeline.data.bars import read_bars
from pipeline.data.canonical import DataError
from pipeline.data.movielens import (age_bucket, decade_of, read_movielens, read_movielens_tfds, split_title,
                                     title_tokens)
from pipeline.data.tabular import read_tabular, user_grouped_chunks

SHARED_DATA = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data"))


def _write(path, text, encoding="utf-8"):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w", encoding=encoding, newline="") as f:
        f.write(text)
    return str(path)


def _all(ds):
    chunks = list(ds.interactions())
    return pd.concat(chunks, ignore_index=True) if chunks else pd.DataFrame()


def _check_user_complete(ds):
    """Every user in exactly one chunk; rows sorted by (user, timestamp) inside chunks."""
    owner = {}
    for i, chunk in enumerate(ds.interactions()):
        for u, group in chunk.groupby(USER_ID, sort=False):
            assert owner.setdefault(u, i) == i, f"user {u} split across chunks"
            assert group["timestamp"].is_monotonic_increasing
    return owner


# ---------------------------------------------------------------------------------
# MovieLens fixtures: the same three users, three movies and five ratings in every layout.
# ---------------------------------------------------------------------------------
def _flags(*genres_on):
    names = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
             "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
             "War", "Western"]
    return "|".join("1" if n in genres_on else "0" for n in names)


U_USER = "1|24|M|technician|85711\n2|53|F|other|94043\n3|17|M|student|T8H1N\n"
_TOY_FLAGS = _flags("Animation", "Children's", "Comedy")
U_ITEM = (f"1|Toy Story (1995)|01-Jan-1995||http://x|{_TOY_FLAGS}\n"
          f"2|Misérables, Les (1995)|01-Jan-1995||http://y|{_flags('Drama', 'Musical')}\n"
          f"3|unknown||||{_flags('unknown')}\n")
U_DATA = ("1\t1\t5\t881250949\n1\t2\t3\t881250900\n2\t1\t4\t881251000\n"
          "3\t3\t1\t881250000\n2\t2\t2\t881250500\n")


def _ml100k(tmp_path, data=U_DATA, user=U_USER, item=U_ITEM, sub="ml-100k"):
    d = tmp_path / sub
    _write(d / "u.data", data)
    _write(d / "u.user", user)
    _write(d / "u.item", item, encoding="latin-1")
    return str(d)


def _atomic(tmp_path, inter=None, prefix="ml-100k", sub="atomic"):
    d = tmp_path / sub
    _write(d / f"{prefix}.inter", inter if inter is not None else
           "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + U_DATA)
    _write(d / f"{prefix}.user", "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
           + U_USER.replace("|", "\t"))
    _write(d / f"{prefix}.item", "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
           "1\tToy Story\t1995\tAnimation Children's Comedy\n"
           "2\tMisérables, Les\t1995\tDrama Musical\n"
           "3\tunknown\tunkonwn\tunknown\n")
    return str(d)


def _ml1m(tmp_path, ratings=None):
    d = tmp_path / "ml-1m"
    _write(d / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::12::55117\n")
    _write(d / "movies.dat", "1::Toy Story (1995)::Animation|Children's|Comedy\n"
           "2::Jumanji (1995)::Adventure|Children's|Fantasy\n"
           "3::City of Lost Children, The (Cité des enfants perdus, La) (1995)::Adventure|Sci-Fi\n",
           encoding="latin-1")
    _write(d / "ratings.dat", ratings if ratings is not None else
           "1::1::5::978300760\n1::2::3::978302109\n2::3::4::978301968\n3::1::2::978300275\n")
    return str(d)


# Sorted by (user, timestamp); label = rating >= 4.
EXPECTED_100K = pd.DataFrame({
    USER_ID: ["1", "1", "2", "2", "3"],
    ITEM_ID: ["2", "1", "2", "1", "3"],
    "timestamp": np.array([881250900, 881250949, 881250500, 881251000, 881250000], np.int64),
    "rating": np.array([3, 5, 2, 4, 1], np.float32),
    "label": np.array([0, 1, 0, 1, 0], np.float32),
})


def _sorted(df, key):
    return df.sort_values(key).reset_index(drop=True)


def test_value_helpers_by_hand():
    # ML-1M buckets: lower bounds 1/18/25/35/45/50/56; exact 100K ages fall in the same ones.
    assert [age_bucket(a) for a in (1, 7, 17, 18, 24, 25, 35, 44, 45, 50, 55, 56, 73)] == [
        "under 18", "under 18", "under 18", "18-24", "18-24", "25-34", "35-44", "35-44", "45-49", "50-55",
        "50-55", "56+", "56+"]
    assert split_title("Toy Story (1995)") == ("Toy Story", "1995")
    assert split_title("City of Lost Children, The (Cité des enfants perdus, La) (1995)") == (
        "City of Lost Children, The (Cité des enfants perdus, La)", "1995")
    assert split_title("unknown") == ("unknown", None)
    assert title_tokens("Children's Hour, The") == ["children's", "hour", "the"]
    assert title_tokens("Tora! Tora! Tora!") == ["tora"]
    assert title_tokens("Misérables, Les") == ["misérables", "les"]
    assert decade_of("1995") == "1990s" and decade_of("1900") == "1900s" and decade_of("unkonwn") == "unknown"


def test_grouplens_100k_layout_tables_and_interactions(tmp_path):
    ds = read_movielens(_ml100k(tmp_path))
    ds.validate_tables()
    assert ds.schema.name == "movielens-100k"
    assert ds.schema.has_rating and ds.schema.has_label and ds.user_complete_chunks and not ds.predefined_split
    assert [f.name for f in ds.schema.user_features] == [USER_ID, "gender", "age", "occupation", "zip_prefix",
                                                         "history"]
    assert [f.name for f in ds.schema.item_features] == [ITEM_ID, "genres", "release_year", "decade",
                                                         "title_tokens"]
    assert ds.users.to_dict("records") == [
        {USER_ID: "1", "gender": "M", "age": "18-24", "occupation": "technician", "zip_prefix": "8"},
        {USER_ID: "2", "gender": "F", "age": "50-55", "occupation": "other", "zip_prefix": "9"},
        {USER_ID: "3", "gender": "M", "age": "under 18", "occupation": "student", "zip_prefix": "T"},
    ]
    assert ds.items.to_dict("records") == [
        {ITEM_ID: "1", "genres": ["Animation", "Children's", "Comedy"], "release_year": "1995",
         "decade": "1990s", "title_tokens": ["toy", "story"]},
        {ITEM_ID: "2", "genres": ["Drama", "Musical"], "release_year": "1995", "decade": "1990s",
         "title_tokens": ["misérables", "les"]},  # latin-1 decoded
        {ITEM_ID: "3", "genres": ["unknown"], "release_year": "unknown", "decade": "unknown",
         "title_tokens": ["unknown"]},
    ]
    got = _all(ds)
    pd.testing.assert_frame_equal(got, EXPECTED_100K, check_dtype=False)
    assert got["timestamp"].dtype == np.int64
    assert ds.errors.rows_read == 5 and ds.errors.num_rejected == 0


def test_atomic_layout_matches_the_grouplens_layout(tmp_path):
    atomic = read_movielens(_atomic(tmp_path))
    grouplens = read_movielens(_ml100k(tmp_path))
    assert atomic.schema == grouplens.schema
    pd.testing.assert_frame_equal(atomic.users, grouplens.users)
    pd.testing.assert_frame_equal(atomic.items, grouplens.items)  # incl. "unkonwn" year -> "unknown"
    pd.testing.assert_frame_equal(_all(atomic), _all(grouplens))


def test_atomic_layout_any_prefix_and_inter_file_path(tmp_path):
    d = _atomic(tmp_path, prefix="my-movies")
    ds = read_movielens(d)
    assert ds.schema.name == "movielens-my-movies"
    assert len(_all(ds)) == 5
    d2 = _atomic(tmp_path, prefix="ml-1m", sub="two")
    _atomic(tmp_path, prefix="other", sub="two")
    with pytest.raises(ValueError, match="several RecBole datasets"):
        read_movielens(d2)
    assert read_movielens(os.path.join(d2, "ml-1m.inter")).schema.name == "movielens-1m"


def test_ml1m_layout(tmp_path):
    ds = read_movielens(_ml1m(tmp_path))
    ds.validate_tables()
    assert ds.schema.name == "movielens-1m"
    assert ds.schema.to_dict()["user_features"] == read_movielens(_ml100k(tmp_path)).schema.to_dict()[
        "user_features"]
    assert ds.users.to_dict("records") == [
        {USER_ID: "1", "gender": "F", "age": "under 18", "occupation": "k-12 student", "zip_prefix": "4"},
        {USER_ID: "2", "gender": "M", "age": "56+", "occupation": "self-employed", "zip_prefix": "7"},
        {USER_ID: "3", "gender": "M", "age": "25-34", "occupation": "programmer", "zip_prefix": "5"},
    ]
    item3 = ds.items.iloc[2].to_dict()
    assert item3["genres"] == ["Adventure", "Sci-Fi"] and item3["release_year"] == "1995"
    assert item3["title_tokens"] == ["city", "of", "lost", "children", "the", "cité", "des", "enfants",
                                     "perdus", "la"]  # the schema pads/truncates to 8 downstream
    got = _all(ds)
    assert got[[USER_ID, ITEM_ID]].values.tolist() == [["1", "1"], ["1", "2"], ["2", "3"], ["3", "1"]]
    assert got["label"].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_history_length_reaches_the_schema_and_is_validated(tmp_path):
    d = _ml100k(tmp_path)
    assert read_movielens(d, history_length=7).schema.sequence_feature.max_length == 7
    with pytest.raises(ValueError, match="history_length"):
        read_movielens(d, history_length=0)
    with pytest.raises(ValueError, match="bad_rows"):
        read_movielens(d, bad_rows="ignore")
    with pytest.raises(ValueError, match="layout"):
        read_movielens(d, layout="10m")


def test_movielens_bad_rows_fail_names_file_line_and_field(tmp_path):
    d = _ml100k(tmp_path, data="1\t1\t5\t881250949\n1\t2\tfive\t881250900\n")
    with pytest.raises(DataError) as e:
        read_movielens(d)
    assert e.value.path == os.path.join(d, "u.data") and e.value.line == 2 and e.value.field == "rating"
    assert "'five' is not a number" in str(e.value) and "u.data, line 2" in str(e.value)

    d = _ml100k(tmp_path, data="1\t1\t5\t881250949\n\n1\t99\t5\t881250900\n", sub="unknown")
    with pytest.raises(DataError, match=r"line 3, field 'item_id': unknown item '99' \(not in .*u.item\)"):
        read_movielens(d)

    d = _ml100k(tmp_path, data="1\t1\t5\t881250949\n1\t2\t5\n", sub="short")
    with pytest.raises(DataError, match=r"line 2: expected 4 fields \(user_id, item_id, rating, timestamp\) "
                                        r"separated by '\\t', found 3"):
        read_movielens(d)


def test_movielens_fail_reports_the_first_bad_line_whatever_check_finds_it(tmp_path):
    # Line 2 has a bad timestamp (checked last), line 3 an unknown user (checked first).
    d = _ml100k(tmp_path, data="1\t1\t5\t881250949\n1\t2\t5\tyesterday\n42\t1\t5\t881250900\n")
    with pytest.raises(DataError) as e:
        read_movielens(d)
    assert (e.value.line, e.value.field) == (2, "timestamp")


def test_movielens_skip_counts_by_reason_and_keeps_the_rest(tmp_path):
    data = U_DATA + "1\t2\tfive\t1\n42\t1\t5\t1\n1\t99\t5\t1\n1\t1\t5\n42\t1\tx\ty\n"
    ds = read_movielens(_ml100k(tmp_path, data=data), bad_rows="skip")
    summary = ds.errors.summary()
    # The last line has three problems; it counts once, under its first field (user_id).
    assert summary["rows_read"] == 10 and summary["rows_rejected"] == 5
    assert summary["rejected_by_reason"] == {"bad rating": 1, "unknown user": 2, "unknown item": 1,
                                             "wrong number of fields": 1}
    assert [ex["line"] for ex in summary["examples"]] == [6, 7, 8, 9, 10]
    pd.testing.assert_frame_equal(_all(ds), EXPECTED_100K, check_dtype=False)


def test_movielens_bad_table_rows(tmp_path):
    d = _ml100k(tmp_path, user=U_USER + "1|30|F|writer|11111\n")
    with pytest.raises(DataError, match=r"u.user, line 4, field 'user_id': duplicate user_id '1' \(first on line 1\)"):
        read_movielens(d)
    d = _ml100k(tmp_path, item=U_ITEM.replace("|0|0|0|1|1|1|", "|0|0|0|1|x|1|", 1), sub="flags")
    with pytest.raises(DataError, match=r"u.item, line 1, field 'genres': genre flag \"Children's\" is 'x'"):
        read_movielens(d)
    ds = read_movielens(_ml1m(tmp_path), bad_rows="skip")
    assert ds.errors.num_rejected == 0
    d = _ml1m(tmp_path)
    _write(os.path.join(d, "users.dat"), "1::F::1::10::48067\n2::M::56::99::70072\n3::M::25::12::55117\n")
    with pytest.raises(DataError, match="users.dat, line 2, field 'occupation': occupation '99' is not an ML-1M"):
        read_movielens(d)
    # Under skip, user 2 is dropped and so are its ratings.
    ds = read_movielens(d, bad_rows="skip")
    assert ds.errors.rejected == {"bad occupation": 1, "unknown user": 1}
    # The bad user row counts for the users table, the rating it orphans for the interactions.
    assert ds.errors.summary()["rejected_by_table"] == {"interactions": {"unknown user": 1},
                                                        "users": {"bad occupation": 1}}
    assert "2" not in set(ds.users[USER_ID]) and "2" not in set(_all(ds)[USER_ID])


def test_movielens_empty_and_missing_files(tmp_path):
    d = _ml100k(tmp_path, data="")
    with pytest.raises(DataError, match=r"u.data: the file has no data rows"):
        read_movielens(d)
    d = _atomic(tmp_path, inter="user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
    with pytest.raises(DataError, match=r"ml-100k.inter: the file has no data rows.*after the header"):
        read_movielens(d)
    d = _atomic(tmp_path, inter="user_id:token\titem_id:token\trating:float\n1\t1\t5\n", sub="nots")
    with pytest.raises(DataError, match=r"ml-100k.inter, line 1: the header has no \['timestamp'\] column"):
        read_movielens(d)

    # Missing input is bad input data (`DataError`, exit code 3), naming the path.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        read_movielens(str(empty))
    for expected in ("<name>.inter", "u.data", "ratings.dat", str(empty)):
        assert expected in str(e.value)
    assert e.value.path == str(empty)
    with pytest.raises(DataError, match="nowhere: the MovieLens data directory was not found"):
        read_movielens(str(tmp_path / "nowhere"))
    d = _ml100k(tmp_path, sub="partial")
    os.remove(os.path.join(d, "u.item"))
    with pytest.raises(DataError, match=r"partial: the MovieLens 100K layout is incomplete: missing "
                                        r"\['.*partial/u.item'\]"):
        read_movielens(d)
    d = _atomic(tmp_path, sub="no-user")
    os.remove(os.path.join(d, "ml-100k.user"))
    with pytest.raises(DataError, match=r"ml-100k.inter: the RecBole atomic dataset is incomplete"):
        read_movielens(d)


def test_movielens_layout_detection_and_choice(tmp_path):
    d = _ml100k(tmp_path)
    _ml1m(tmp_path)
    for name in ("ratings.dat", "users.dat", "movies.dat"):
        os.rename(os.path.join(tmp_path, "ml-1m", name), os.path.join(d, name))
    with pytest.raises(ValueError, match=r"several MovieLens layouts \['100k', '1m'\]"):
        read_movielens(d)
    assert read_movielens(d, layout="1m").schema.name == "movielens-1m"
    assert read_movielens(d, layout="100k").schema.name == "movielens-100k"
    with pytest.raises(DataError, match="RecBole"):
        read_movielens(d, layout="atomic")


# ---------------------------------------------------------------------------------
# Chunking.
# ---------------------------------------------------------------------------------
def test_user_grouped_chunks_by_hand():
    # Users [1,0,1,2,0] with timestamps [5,3,1,2,4] sort to u0:(3,4) u1:(1,5) u2:(2); user
    # starts at rows 0,2,4; chunk_rows=2 cuts at 2 and 4 -> sizes [2, 2, 1].
    codes = np.array([1, 0, 1, 2, 0])
    ts = np.array([5, 3, 1, 2, 4], np.int64)
    values = np.array(["a", "b", "c"], dtype=object)
    make = user_grouped_chunks(codes, ts, {USER_ID: (codes, values), "timestamp": ts, "row": np.arange(5)},
                               chunk_rows=2)
    chunks = list(make())
    assert [len(c) for c in chunks] == [2, 2, 1]
    assert [c[USER_ID].tolist() for c in chunks] == [["a", "a"], ["b", "b"], ["c"]]
    assert [c["timestamp"].tolist() for c in chunks] == [[3, 4], [1, 5], [2]]
    assert [len(c) for c in make()] == [2, 2, 1]  # a fresh iterator each call
    # A user larger than chunk_rows gets one chunk of their own; ties keep input order.
    big = user_grouped_chunks(np.array([0, 0, 0, 1]), np.array([7, 7, 1, 0]),
                              {"row": np.arange(4)}, chunk_rows=1)
    assert [c["row"].tolist() for c in big()] == [[2, 0, 1], [3]]
    with pytest.raises(ValueError, match="chunk_rows"):
        user_grouped_chunks(codes, ts, {}, chunk_rows=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_user_grouped_chunks_invariants(seed):
    rng = np.random.default_rng(seed)
    n = 500
    codes = rng.integers(0, 40, size=n)
    ts = rng.integers(0, 50, size=n)
    chunks = list(user_grouped_chunks(codes, ts, {"u": codes, "t": ts, "row": np.arange(n)},
                                      chunk_rows=int(rng.integers(1, 80)))())
    allrows = pd.concat(chunks, ignore_index=True)
    assert sorted(allrows["row"]) == list(range(n))
    assert (allrows["u"].to_numpy() == codes[allrows["row"]]).all()
    expected = np.lexsort((ts, codes))
    assert (allrows["row"].to_numpy() == expected).all()
    owners = [set(c["u"]) for c in chunks]
    for i in range(len(owners)):
        for j in range(i + 1, len(owners)):
            assert not owners[i] & owners[j]


# ---------------------------------------------------------------------------------
# BARS.
# ---------------------------------------------------------------------------------
def _bars(tmp_path, train="0 5 6\n1 7\n2\n", test="0 8\n1 5 5\n3 9\n", sub="bars"):
    d = tmp_path / sub
    if train is not None:
        _write(d / "train.txt", train)
    if test is not None:
        _write(d / "test.txt", test)
    return str(d)


def test_bars_by_hand(tmp_path):
    ds = read_bars(_bars(tmp_path), history_length=4)
    ds.validate_tables()
    assert ds.predefined_split and ds.user_complete_chunks and not ds.schema.has_rating
    assert [f.name for f in ds.schema.user_features] == [USER_ID, "history"]
    assert ds.schema.table_columns("item") == [ITEM_ID]
    assert sorted(ds.users[USER_ID]) == ["0", "1", "2", "3"]  # user 2 has no items but a line
    assert sorted(ds.items[ITEM_ID]) == ["5", "6", "7", "8", "9"]
    got = _sorted(_all(ds), [USER_ID, "timestamp"])
    # Timestamps count the user's items in file order, train first: user 1 has 1 training
    # item (7 -> 0), so its test items 5, 5 get 1, 2.
    assert got.values.tolist() == [
        ["0", "5", 0, "train"], ["0", "6", 1, "train"], ["0", "8", 2, "test"],
        ["1", "7", 0, "train"], ["1", "5", 1, "test"], ["1", "5", 2, "test"],
        ["3", "9", 0, "test"]]
    assert ds.errors.rows_read == 6
    _check_user_complete(ds)


def test_bars_normalises_integer_ids_and_whitespace(tmp_path):
    ds = read_bars(_bars(tmp_path, train="007\t05  6 \r\n\n1 7\n", test="7 8\n"))
    got = _all(ds)
    assert sorted(set(got[USER_ID])) == ["1", "7"] and sorted(set(got[ITEM_ID])) == ["5", "6", "7", "8"]
    assert got[got[USER_ID] == "7"]["timestamp"].tolist() == [0, 1, 2]


def test_bars_bad_rows(tmp_path):
    with pytest.raises(DataError) as e:
        read_bars(_bars(tmp_path, train="0 5 6\n1 7 x8 y\n"))
    assert e.value.path.endswith("train.txt") and (e.value.line, e.value.field) == (2, "item")
    assert "item 'x8' (token 3 of the line) is not an integer" in str(e.value)
    with pytest.raises(DataError, match=r"test.txt, line 1, field 'user_id': user id 'u0' is not an integer"):
        read_bars(_bars(tmp_path, test="u0 5\n", sub="b2"))
    with pytest.raises(DataError, match=r"train.txt, line 3, field 'user_id': user 0 already has a line in "
                                        r"this file \(line 1\)"):
        read_bars(_bars(tmp_path, train="0 5\n1 6\n0 7\n", sub="b3"))
    ds = read_bars(_bars(tmp_path, train="0 5 6\n1 7 x8\n0 9\n2 6\n", test="0 8\n", sub="b4"), bad_rows="skip")
    assert ds.errors.rejected == {"non-integer item": 1, "duplicate user": 1}
    assert ds.errors.rows_read == 5
    got = _all(ds)
    assert set(got[USER_ID]) == {"0", "2"} and "1" not in set(ds.users[USER_ID])
    assert got[got[USER_ID] == "0"]["timestamp"].tolist() == [0, 1, 2]


def test_bars_missing_and_empty_files(tmp_path):
    d = _bars(tmp_path, test=None)
    with pytest.raises(DataError) as e:
        read_bars(d)
    assert f"not found: [{os.path.join(d, 'test.txt')!r}]" in str(e.value) and e.value.path == d
    assert "holds train.txt and test.txt" in str(e.value)
    with pytest.raises(DataError, match=r"train.txt: the file has no data rows"):
        read_bars(_bars(tmp_path, train="\n\n", sub="empty"))


# ---------------------------------------------------------------------------------
# Generic CSV / Parquet.
# ---------------------------------------------------------------------------------
LOG_CSV = ('uid,iid,ts,stars,clicked,comment\n'
           '007,a,100,4.5,1,"Hello, world"\n'
           '008,b,50,3,0,x\n'
           '007,b,90,2,0,"multi ""quoted"""\n')
COLUMNS = {"user_id": "uid", "item_id": "iid", "timestamp": "ts", "rating": "stars", "label": "clicked"}


def test_tabular_csv_ids_stay_strings_and_tables_are_derived(tmp_path):
    ds = read_tabular(_write(tmp_path / "log.csv", LOG_CSV), COLUMNS, history_length=3)
    ds.validate_tables()
    assert ds.schema.name == "log" and ds.schema.has_rating and ds.schema.has_label
    assert ds.schema.sequence_feature.max_length == 3
    assert ds.users[USER_ID].tolist() == ["007", "008"] and ds.items[ITEM_ID].tolist() == ["a", "b"]
    got = _all(ds)
    assert got.values.tolist() == [["007", "b", 90, 2.0, 0.0], ["007", "a", 100, 4.5, 1.0],
                                   ["008", "b", 50, 3.0, 0.0]]
    assert got["timestamp"].dtype == np.int64
    no_extras = read_tabular(str(tmp_path / "log.csv"), {"user_id": "uid", "item_id": "iid", "timestamp": "ts"})
    assert list(_all(no_extras).columns) == [USER_ID, ITEM_ID, "timestamp"]
    assert not no_extras.schema.has_rating and not no_extras.schema.has_label


def test_tabular_timestamp_formats(tmp_path):
    cols = {"user_id": "u", "item_id": "i", "timestamp": "t"}
    p = _write(tmp_path / "dates.csv", "u,i,t\n1,a,2020-01-02 00:00:10\n1,b,1970-01-01T00:01:00Z\n")
    # 2020-01-02 = 18263 days after the epoch -> 18263 * 86400 + 10 = 1577923210.
    ds = read_tabular(p, cols, timestamp_format="%Y-%m-%d %H:%M:%S", bad_rows="skip")
    assert _all(ds)["timestamp"].tolist() == [1577923210] and ds.errors.rejected == {"bad timestamp": 1}
    p = _write(tmp_path / "iso.csv", "u,i,t\n1,a,2020-01-02T00:00:10\n1,b,1970-01-01T00:01:00\n")
    assert _all(read_tabular(p, cols))["timestamp"].tolist() == [60, 1577923210]
    p = _write(tmp_path / "ms.csv", "u,i,t\n1,a,1500\n1,b,-1\n")
    assert _all(read_tabular(p, cols, timestamp_format="ms"))["timestamp"].tolist() == [-1, 1]  # floor(-0.001)
    with pytest.raises(ValueError, match="timestamp_format"):
        read_tabular(p, cols, timestamp_format="yyyy-mm-dd")


def test_tabular_csv_bad_rows_name_the_line(tmp_path):
    text = ("uid,iid,ts,stars,clicked,comment\n"  # line 1
            "1,a,10,4,1,x\n"                      # 2
            "1,a,11,4\n"                          # 3: ragged
            '2,"b,c",12,3,0,"two\nlines"\n'     # 4-5: one record (the comment column is not read)
            ",a,13,4,1,x\n"                       # 6: missing user
            "3,a,soon,4,1,x\n"                    # 7: bad timestamp
            "\n"                                  # 8: blank, ignored
            "4,a,15,4,maybe,x\n")                 # 9: bad label
    p = _write(tmp_path / "bad.csv", text)
    with pytest.raises(DataError) as e:
        read_tabular(p, COLUMNS)
    assert (e.value.path, e.value.line, e.value.field) == (p, 3, None)
    assert "expected 6 fields separated by ',', found 4" in str(e.value)
    ds = read_tabular(p, COLUMNS, bad_rows="skip")
    assert [(x["line"], x["field"]) for x in ds.errors.examples] == [
        (3, None), (6, "user_id"), (7, "timestamp"), (9, "label")]  # physical lines
    assert ds.errors.rejected == {"wrong number of fields": 1, "missing user_id": 1, "bad timestamp": 1,
                                  "bad label": 1}
    assert ds.errors.rows_read == 6  # data records; the blank line is not one
    assert _all(ds)[[USER_ID, ITEM_ID]].values.tolist() == [["1", "a"], ["2", "b,c"]]
    p2 = _write(tmp_path / "bad2.csv", "uid,iid,ts,stars,clicked\n1,a,10,4,1\n1,a,11,lots,1\n")
    with pytest.raises(DataError, match=r"bad2.csv, line 3, field 'rating': rating 'lots' is not a finite number"):
        read_tabular(p2, COLUMNS)


def test_tabular_parquet_types_and_row_errors(tmp_path):
    table = pa.table({
        "uid": pa.array([7, 8, 7, None], pa.int64()),
        "iid": ["a", "b", "b", "a"],
        "when": pa.array([pd.Timestamp("2020-01-02 00:00:10", tz="UTC"), pd.Timestamp("1970-01-01 00:01:00"),
                          pd.Timestamp("1970-01-01 00:00:05"), pd.Timestamp("1970-01-01")], pa.timestamp("ms")),
        "clicked": [True, False, True, True],
    })
    p = str(tmp_path / "log.parquet")
    pq.write_table(table, p)
    cols = {"user_id": "uid", "item_id": "iid", "timestamp": "when", "label": "clicked"}
    with pytest.raises(DataError) as e:
        read_tabular(p, cols)
    assert e.value.line is None and e.value.field == "user_id" and "row 3 (0-based): missing user_id" in str(e.value)
    ds = read_tabular(p, cols, bad_rows="skip")
    assert _all(ds).values.tolist() == [["7", "b", 5, 1.0], ["7", "a", 1577923210, 1.0], ["8", "b", 60, 0.0]]
    assert ds.errors.summary()["rows_rejected"] == 1 and ds.schema.name == "log"


def test_tabular_feature_tables(tmp_path):
    log = _write(tmp_path / "log.csv", "uid,iid,ts\n1,a,1\n2,b,2\n1,c,3\n2,zz,4\n")
    users = _write(tmp_path / "users.csv", "uid,age,country\n1,31.5,fr\n2,40,\n3,22,de\n")
    items = str(tmp_path / "items.parquet")
    pq.write_table(pa.table({"item": ["a", "b", "c"], "tags": [["x", "y"], [], ["y", "z", "w"]],
                             "brand": ["p", "q", None], "genres": ["g1|g2", "", "g3"]}), items)
    cols = {"user_id": "uid", "item_id": "iid", "timestamp": "ts"}
    kw = dict(user_table=users, item_table=items,
              user_features=[{"name": "age", "kind": "numeric"}, {"name": "country", "kind": "categorical"}],
              item_features=[{"name": "item_id", "column": "item"},
                             {"name": "tags", "kind": "multi_categorical"},
                             {"name": "maker", "kind": "categorical", "column": "brand"},
                             {"name": "genres", "kind": "multi_categorical", "max_length": 5}])
    with pytest.raises(DataError, match=r"log.csv, line 5, field 'item_id': unknown item 'zz' \(not in the item "
                                        r"table .*items.parquet\)"):
        read_tabular(log, cols, **kw)
    ds = read_tabular(log, cols, bad_rows="skip", **kw)
    ds.validate_tables()
    assert ds.errors.rejected == {"unknown item": 1}
    assert ds.schema.feature("tags").max_length == 3  # the longest list
    assert ds.schema.feature("genres").max_length == 5
    assert ds.users.to_dict("records") == [{USER_ID: "1", "age": 31.5, "country": "fr"},
                                           {USER_ID: "2", "age": 40.0, "country": "[OOV]"},
                                           {USER_ID: "3", "age": 22.0, "country": "de"}]
    assert ds.items.to_dict("records") == [
        {ITEM_ID: "a", "tags": ["x", "y"], "maker": "p", "genres": ["g1", "g2"]},
        {ITEM_ID: "b", "tags": [], "maker": "q", "genres": []},
        {ITEM_ID: "c", "tags": ["y", "z", "w"], "maker": "[OOV]", "genres": ["g3"]}]
    assert len(_all(ds)) == 3

    bad_users = _write(tmp_path / "users_bad.csv", "uid,age,country\n1,31,fr\n2,old,fr\n1,3,fr\n")
    with pytest.raises(DataError, match=r"users_bad.csv, line 3, field 'age': age 'old' is not a finite number"):
        read_tabular(log, cols, **{**kw, "user_table": bad_users})
    ds = read_tabular(log, cols, bad_rows="skip", **{**kw, "user_table": bad_users})
    # User 2 is dropped with its bad age; line 5 (user 2, item zz) counts once, as its first field.
    assert ds.errors.rejected == {"bad age": 1, "duplicate user_id": 1, "unknown user": 2}
    assert ds.errors.summary()["rejected_by_table"] == {"interactions": {"unknown user": 2},
                                                        "users": {"bad age": 1, "duplicate user_id": 1}}
    assert ds.errors.examples[1]["reason"] == "duplicate user_id '1' (first on line 2)"


def test_tabular_directory_glob_and_argument_errors(tmp_path):
    d = tmp_path / "logs"
    _write(d / "part-0.csv", "uid,iid,ts\n1,a,5\n2,a,1\n")
    _write(d / "part-1.csv", "uid,iid,ts\n1,b,3\n")
    _write(d / "_SUCCESS", "")
    cols = {"user_id": "uid", "item_id": "iid", "timestamp": "ts"}
    got = _all(read_tabular(str(d), cols))
    assert got[[USER_ID, ITEM_ID, "timestamp"]].values.tolist() == [["1", "b", 3], ["1", "a", 5], ["2", "a", 1]]
    assert len(_all(read_tabular(str(d / "part-*.csv"), cols))) == 3
    pq.write_table(pa.table({"uid": ["1"], "iid": ["a"], "ts": [1]}), str(d / "part-2.parquet"))
    with pytest.raises(ValueError, match="mixes formats"):
        read_tabular(str(d), cols)
    assert len(_all(read_tabular(str(d), cols, format="parquet"))) == 1

    with pytest.raises(DataError, match=r"no column 'when' \(for timestamp\); the file has columns \['uid', "
                                        r"'iid', 'ts'\]"):
        read_tabular(str(d / "part-0.csv"), {**cols, "timestamp": "when"})
    with pytest.raises(DataError, match=r"empty.csv: the file has no data rows"):
        read_tabular(_write(tmp_path / "empty.csv", "uid,iid,ts\n"), cols)
    with pytest.raises(DataError, match=r"empty2.csv: the file is empty"):
        read_tabular(_write(tmp_path / "empty2.csv", ""), cols)
    with pytest.raises(DataError, match="nowhere.csv: the interaction log was not found"):
        read_tabular(str(tmp_path / "nowhere.csv"), cols)
    with pytest.raises(DataError, match=r"nowhere-\*.csv: no file matches this interaction log pattern"):
        read_tabular(str(tmp_path / "nowhere-*.csv"), cols)
    (tmp_path / "void").mkdir()
    with pytest.raises(DataError, match=r"void: no interaction log files in this directory.*found \[\]"):
        read_tabular(str(tmp_path / "void"), cols)
    with pytest.raises(ValueError, match=r"`columns` should name the file columns of \['timestamp'\]"):
        read_tabular(str(d / "part-0.csv"), {"user_id": "uid", "item_id": "iid"})
    with pytest.raises(ValueError, match=r"`columns` has unknown keys \['when'\]"):
        read_tabular(str(d / "part-0.csv"), {**cols, "when": "ts"})
    with pytest.raises(ValueError, match=r"`user_features\[0\]\['kind'\]` should be one of"):
        read_tabular(str(d / "part-0.csv"), cols, user_table=str(d / "part-0.csv"),
                     user_features=[{"name": "x", "kind": "sequence"}])
    with pytest.raises(ValueError, match="`item_features` needs `item_table`"):
        read_tabular(str(d / "part-0.csv"), cols, item_features=[{"name": "x", "kind": "categorical"}])
    with pytest.raises(ValueError, match=r"unknown keys \['sep'\]"):
        read_tabular(str(d / "part-0.csv"), cols, item_table=str(d / "part-0.csv"),
                     item_features=[{"name": "x", "kind": "multi_categorical", "sep": ","}])


def test_tabular_timestamps_beyond_int64_seconds_are_bad_rows(tmp_path):
    cols = {"user_id": "u", "item_id": "i", "timestamp": "t"}
    p = _write(tmp_path / "huge.csv", "u,i,t\n1,a,10\n1,b,1e30\n2,a,5\n")
    with pytest.raises(DataError, match=r"huge.csv, line 3, field 'timestamp': timestamp '1e30' is out of range"):
        read_tabular(p, cols)
    ds = read_tabular(p, cols, bad_rows="skip")
    assert _all(ds)["timestamp"].tolist() == [10, 5] and ds.errors.rejected == {"bad timestamp": 1}
    # integers past int64 (pandas reads them as uint64), and in another unit
    p = _write(tmp_path / "ints.csv", "u,i,t\n1,a,10\n1,b,9223372036854775808\n2,a,-99999999999999999999\n")
    ds = read_tabular(p, cols, bad_rows="skip")
    assert _all(ds)["timestamp"].tolist() == [10] and ds.errors.rejected == {"bad timestamp": 2}
    assert [e["line"] for e in ds.errors.examples] == [3, 4]
    assert _all(read_tabular(p, cols, bad_rows="skip", timestamp_format="ns"))["timestamp"].tolist() == [
        0, 9223372036, -100000000000]
    # Parquet columns of numbers
    for values in ([10.0, 1e30, 5.0], [10, 2 ** 63 + 1, 5]):
        path = str(tmp_path / "huge.parquet")
        pq.write_table(pa.table({"u": ["1", "1", "2"], "i": ["a", "b", "a"],
                                 "t": pa.array(values, pa.uint64() if isinstance(values[0], int) else None)}), path)
        with pytest.raises(DataError, match=r"huge.parquet, field 'timestamp': row 1 \(0-based\): timestamp .* is "
                                            r"out of range"):
            read_tabular(path, cols)
        assert _all(read_tabular(path, cols, bad_rows="skip"))["timestamp"].tolist() == [10, 5]


# The defects of the input-handling review: each test writes the smallest file showing one.
CSV_COLS = {"user_id": "u", "item_id": "i", "timestamp": "t"}


def test_tabular_unbalanced_quote_names_the_lines_it_swallowed_and_counts_them(tmp_path):
    text = ("u,i,t\n"        # 1
            "1,a,10\n"       # 2
            "2,b,20\n"       # 3
            '3,"c,30\n'      # 4: the quote never closes and takes in lines 4-7 as one record of 2 fields
            "4,d,40\n"       # 5
            "5,e,50\n"       # 6
            "6,f,60\n")      # 7
    p = _write(tmp_path / "stray.csv", text)
    with pytest.raises(DataError) as e:
        read_tabular(p, CSV_COLS)
    assert (e.value.path, e.value.line, e.value.field) == (p, 4, None)
    assert "the record spans lines 4–7 (unbalanced quote?); expected 3 fields separated by ',', found 2" in str(
        e.value)
    ds = read_tabular(p, CSV_COLS, bad_rows="skip")
    # Every data line is accounted for: 6 read = 2 kept + 4 rejected (lines 4-7).
    assert _all(ds)[[USER_ID, ITEM_ID]].values.tolist() == [["1", "a"], ["2", "b"]]
    assert (ds.errors.rows_read, ds.errors.num_rejected) == (6, 4)
    assert ds.errors.rejected == {"wrong number of fields": 4} and len(ds.errors.examples) == 1
    # TSV has no quoting: a quote is an ordinary character.
    p = _write(tmp_path / "q.tsv", 'u\ti\tt\n1\t12" vinyl\t10\n2\t"open\t20\n3\tc\t30\n')
    assert _all(read_tabular(p, CSV_COLS))[ITEM_ID].tolist() == ['12" vinyl', '"open', "c"]


def test_tabular_quoted_line_break_in_a_read_value_is_a_bad_row(tmp_path):
    # Lines: 1 header, 2-3 one record whose item id holds a line break, 4 good, 5 bad timestamp.
    p = _write(tmp_path / "nl.csv", 'u,i,t\n1,"a\nb",10\n2,c,20\n3,d,zz\n')
    with pytest.raises(DataError, match=r"nl.csv, line 2, field 'item_id': the quoted item_id value spans lines "
                                        r"2–3 \(unbalanced quote\?\)"):
        read_tabular(p, CSV_COLS)
    ds = read_tabular(p, CSV_COLS, bad_rows="skip")
    assert _all(ds)[[USER_ID, ITEM_ID]].values.tolist() == [["2", "c"]]
    assert [(x["line"], x["field"]) for x in ds.errors.examples] == [(2, "item_id"), (5, "timestamp")]
    # 4 data lines = 1 kept + 2 (the two-line record) + 1 (bad timestamp).
    assert ds.errors.rows_read == 4 and ds.errors.rejected == {"line break in value": 2, "bad timestamp": 1}
    # A quote left open in the last record runs to the end of the file (lines 3-4), not past it.
    p = _write(tmp_path / "end.csv", 'u,i,t\n1,a,10\n2,b,"20\n3,c,30\n')
    ds = read_tabular(p, CSV_COLS, bad_rows="skip")
    assert ds.errors.examples[0]["reason"] == "the quoted timestamp value spans lines 3–4 (unbalanced quote?)"
    assert (ds.errors.rows_read, ds.errors.num_rejected) == (3, 2)


def test_tabular_line_breaks_inside_parquet_ids_and_table_values_are_bad_rows(tmp_path):
    p = str(tmp_path / "log.parquet")
    pq.write_table(pa.table({"u": ["1", "2\n3", " 4\n"], "i": ["a", "a", "b"], "t": [1, 2, 3]}), p)
    with pytest.raises(DataError, match=r"log.parquet, field 'user_id': row 1 \(0-based\): user_id '2\\n3' holds "
                                        r"a line break"):
        read_tabular(p, CSV_COLS)
    ds = read_tabular(p, CSV_COLS, bad_rows="skip")
    assert _all(ds)[USER_ID].tolist() == ["1", "4"]  # a line break at the end is trimmed like a space
    items = str(tmp_path / "items.parquet")
    pq.write_table(pa.table({"i": ["a", "b"], "brand": ["p", "q"], "tags": [["x"], ["y\nz"]]}), items)
    kw = dict(item_table=items, item_features=[{"name": "brand", "kind": "categorical"},
                                               {"name": "tags", "kind": "multi_categorical"}])
    with pytest.raises(DataError, match=r"items.parquet, field 'tags': row 1 \(0-based\): tags \['y\\nz'\] holds"):
        read_tabular(p, CSV_COLS, **kw)
    csv_items = _write(tmp_path / "items.csv", 'i,brand\na,p\nb,"q\nr"\n')
    with pytest.raises(DataError, match=r"items.csv, line 3, field 'brand': the quoted brand value spans lines 3–4"):
        read_tabular(p, CSV_COLS, **{**kw, "item_table": csv_items, "item_features": kw["item_features"][:1]})


def test_tabular_unreadable_files_are_data_errors_naming_the_file(tmp_path):
    import gzip

    # Spaces around the header's names, CR-only line ends, a leading blank line: all read.
    p = _write(tmp_path / "spaces.csv", "u, i , t \n1,a,10\n")
    assert _all(read_tabular(p, CSV_COLS)).values.tolist() == [["1", "a", 10]]
    p = _write(tmp_path / "cr.csv", "u,i,t\r1,a,10\r2,b,zz\r")
    with pytest.raises(DataError, match=r"cr.csv, line 3, field 'timestamp': timestamp 'zz'"):
        read_tabular(p, CSV_COLS)
    p = _write(tmp_path / "lead.csv", "\n \nu,i,t\n1,a,10\n2,b,zz\n")
    with pytest.raises(DataError, match=r"lead.csv, line 5, field 'timestamp'"):
        read_tabular(p, CSV_COLS)
    with pytest.raises(DataError, match=r"blank.csv: the file is empty; expected a header line"):
        read_tabular(_write(tmp_path / "blank.csv", "\n\n"), CSV_COLS)
    # Bytes that are not UTF-8: a bad row naming the line and field.
    p = str(tmp_path / "latin.csv")
    with open(p, "wb") as f:
        f.write(b"u,i,t\n1,a,10\n2,caf\xe9,20\n")
    with pytest.raises(DataError, match=r"latin.csv, line 3, field 'item_id': item_id b'caf\\xe9' is not UTF-8"):
        read_tabular(p, CSV_COLS)
    ds = read_tabular(p, CSV_COLS, bad_rows="skip")
    assert len(_all(ds)) == 1 and ds.errors.rejected == {"not UTF-8": 1}
    # A truncated gzip stream.
    p = str(tmp_path / "cut.csv.gz")
    with open(p, "wb") as f:
        f.write(gzip.compress(b"u,i,t\n" + b"1,a,10\n" * 1000)[:-12])  # cut inside the deflate data
    with pytest.raises(DataError, match=r"cut.csv.gz: cannot read the file: .*[Tt]runcated"):
        read_tabular(p, CSV_COLS)
    # Parquet: a corrupt feature table, a column name given twice.
    log = _write(tmp_path / "log.csv", "u,i,t\n1,a,10\n")
    bad = _write(tmp_path / "items.parquet", "not parquet")
    with pytest.raises(DataError, match=r"items.parquet: not a readable Parquet file"):
        read_tabular(log, CSV_COLS, item_table=bad, item_features=[{"name": "b", "kind": "categorical"}])
    dup = str(tmp_path / "dup.parquet")
    pq.write_table(pa.Table.from_arrays([pa.array(["1"]), pa.array(["a"]), pa.array([1]), pa.array(["b"])],
                                        names=["u", "i", "t", "i"]), dup)
    with pytest.raises(DataError, match=r"dup.parquet: the file names column\(s\) \['i'\] more than once"):
        read_tabular(dup, CSV_COLS)


def test_tabular_row_of_empty_read_columns_is_a_bad_row_and_only_empty_lines_are_blank(tmp_path):
    p = _write(tmp_path / "empty_ids.csv", "u,i,t,note\n1,a,100,x\n,,,hello\n,,,\n\n3,c,300,y\n")
    with pytest.raises(DataError, match=r"empty_ids.csv, line 3, field 'user_id': missing user_id"):
        read_tabular(p, CSV_COLS)
    ds = read_tabular(p, CSV_COLS, bad_rows="skip")
    assert [(x["line"], x["field"]) for x in ds.errors.examples] == [(3, "user_id"), (4, "user_id")]
    assert ds.errors.rows_read == 4 and len(_all(ds)) == 2  # line 5 is blank: not a row


def test_tabular_parquet_id_column_of_lists_is_an_error(tmp_path):
    p = str(tmp_path / "lists.parquet")
    pq.write_table(pa.table({"u": ["1", "2"], "i": [[1], [2]], "t": [1, 2]}), p)
    with pytest.raises(DataError) as e:
        read_tabular(p, CSV_COLS, bad_rows="skip")
    assert (e.value.path, e.value.field) == (p, "item_id")
    assert "the id column 'i' has type list<element: int64>; expected string or integer" in str(e.value)


def test_atomic_empty_last_field_is_a_missing_value_not_a_short_line(tmp_path):
    d = _atomic(tmp_path)
    # User 3 without zip code, movie 2 without genres: the line ends with the tab before the empty field.
    _write(os.path.join(d, "ml-100k.user"),
           "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
           "1\t24\tM\ttechnician\t85711\n2\t53\tF\tother\t94043\n\t\t\t\t\n3\t17\tM\tstudent\t\n")
    _write(os.path.join(d, "ml-100k.item"),
           "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
           "1\tToy Story\t1995\tAnimation\n2\tUntitled\t1996\t\n3\tunknown\tunkonwn\tunknown\n")
    ds = read_movielens(d)  # "fail": a short line would raise
    assert ds.errors.num_rejected == 0 and ds.errors.rows_read == 5  # the line of tabs alone is blank
    assert ds.users.iloc[2].to_dict() == {USER_ID: "3", "gender": "M", "age": "under 18", "occupation": "student",
                                          "zip_prefix": "unknown"}
    assert ds.items.iloc[1].to_dict() == {ITEM_ID: "2", "genres": [], "release_year": "1996", "decade": "1990s",
                                          "title_tokens": ["untitled"]}


def test_parse_seconds_bounds_both_paths_and_movielens_says_out_of_range(tmp_path):
    from pipeline.data.tabular import MAX_SECONDS, parse_seconds

    # Integer path: 2**62 is the largest magnitude allowed.
    secs, bad, huge = parse_seconds(pa.array(["10", "-9000000000000000000", str(MAX_SECONDS)]))
    assert secs.tolist() == [10, 0, MAX_SECONDS] and bad.tolist() == [False] * 3
    assert huge.tolist() == [False, True, False]
    # Float path (a value that is no integer): floor(1.5) = 1, 9e18 > 2**62 ~ 4.6e18.
    secs, bad, huge = parse_seconds(pa.array(["10", "9000000000000000000", "1.5", "9e18", "x"]))
    assert secs.tolist() == [10, 0, 1, 0, 0]
    assert bad.tolist() == [False, False, False, False, True] and huge.tolist() == [False, True, False, True, False]
    d = _ml100k(tmp_path, data=U_DATA + "1\t3\t4\t9000000000000000000\n2\t3\t4\t9e18\n")
    with pytest.raises(DataError, match=r"u.data, line 6, field 'timestamp': timestamp '9000000000000000000' is out "
                                        r"of range: more than 2\*\*62 seconds from 1970"):
        read_movielens(d)
    ds = read_movielens(d, bad_rows="skip")
    assert ds.errors.rejected == {"bad timestamp": 2} and "'9e18' is out of range" in ds.errors.examples[1]["reason"]


def test_materialize_keeps_every_rejection_for_the_dead_letters(tmp_path):
    import json

    from pipeline.data.materialize import REJECTIONS_FILE, materialize
    from pipeline.data.splits import SplitConfig

    # Lines 2-5 good, 6-35 bad timestamps: 30 rejections, more than the 20 examples the report keeps.
    text = "u,i,t\n" + "".join(f"{u},a,{10 + u}\n" for u in range(1, 5)) + "".join(f"9,b,x{k}\n" for k in range(30))
    ds = read_tabular(_write(tmp_path / "log.csv", text), CSV_COLS, bad_rows="skip")
    summary = materialize(ds, str(tmp_path / "data"), SplitConfig(method="time", cutoff=13))
    assert len(summary["read"]["examples"]) == 20 and summary["read"]["rejections_file"] == REJECTIONS_FILE
    with open(tmp_path / "data" / REJECTIONS_FILE) as f:
        letters = [json.loads(line) for line in f]
    assert [x["line"] for x in letters] == list(range(6, 36))
    assert letters[-1] == {"file": str(tmp_path / "log.csv"), "line": 35, "field": "timestamp",
                           "reason": "timestamp 'x29' is not a number of seconds"}


def test_tabular_options_are_checked_without_reading(tmp_path):
    from pipeline.data.tabular import TabularOptions

    cols = {"user_id": "u", "item_id": "i", "timestamp": "t"}
    assert TabularOptions(cols).columns == cols
    for kwargs, message in (({"format": "xlsx"}, r"`format` should be one of auto, csv, tsv, parquet"),
                            ({"timestamp_format": "bogus"}, "`timestamp_format` should be None"),
                            ({"user_table": 3}, "`user_table` should be the path"),
                            ({"item_features": [{"name": "x", "kind": "categorical"}]},
                             "`item_features` needs `item_table`")):
        with pytest.raises(ValueError, match=message):
            TabularOptions(cols, **kwargs)
    with pytest.raises(ValueError, match=r"`columns` should name the file columns of \['timestamp'\]"):
        TabularOptions({"user_id": "u", "item_id": "i"})
    # read_tabular checks its options before touching the path
    with pytest.raises(ValueError, match="`format` should be one of"):
        read_tabular(str(tmp_path / "nowhere.csv"), cols, format="xlsx")


def test_tabular_format_from_the_file_name_and_mismatches_name_the_key(tmp_path):
    from pipeline.data.tabular import format_from_name

    assert [format_from_name(p) for p in ("a/x.tsv", "x.TSV.gz", "logs/*.csv", "d.parquet/", "logs", "x.txt")] == [
        "tsv", "tsv", "csv", "parquet", None, None]
    cols = {"user_id": "u", "item_id": "i", "timestamp": "t"}
    p = _write(tmp_path / "x.tsv", "u\ti\tt\n1\ta\t10\n")
    assert _all(read_tabular(p, cols))["timestamp"].tolist() == [10]
    with pytest.raises(DataError, match=r"x.tsv: the interaction log file looks like tsv from its name but "
                                        r"format='csv'; set `format` \(`data.tabular.format` in a run config\) "
                                        r"to 'tsv'"):
        read_tabular(p, cols, format="csv")
    with pytest.raises(DataError, match=r"expected names ending in \.csv, \.csv\.bz2, \.csv\.gz, \.csv\.zst "
                                        r"\(format='csv'\); found \['x.tsv'\]; it holds tsv files: set `format` "
                                        r"\(`data.tabular.format`"):
        read_tabular(str(tmp_path), cols, format="csv")


def test_materialize_names_the_split_setting_that_left_a_split_empty(tmp_path):
    from pipeline.data.materialize import materialize
    from pipeline.data.splits import SplitConfig

    cols = {"user_id": "u", "item_id": "i", "timestamp": "t"}
    p = _write(tmp_path / "log.csv", "u,i,t\n1,a,10\n1,b,20\n2,a,5\n")
    out = str(tmp_path / "data")
    with pytest.raises(DataError, match=r"log.csv: the test split is empty: `data.split.cutoff`=100000 "
                                        r"\(method=time\), and no interaction is at or after it: the timestamps "
                                        r"run from 5 to 20"):
        materialize(read_tabular(p, cols), out, SplitConfig(method="time", cutoff=100000))
    with pytest.raises(DataError, match=r"the train split is empty: `data.split.cutoff`=0 .* no interaction is "
                                        r"before it"):
        materialize(read_tabular(p, cols), out, SplitConfig(method="time", cutoff=0))
    with pytest.raises(DataError, match=r"the test split is empty: `data.split.n`=5"):
        materialize(read_tabular(p, cols), out, SplitConfig(method="leave_last_n", n=5))
    assert not os.path.exists(out)


# ---------------------------------------------------------------------------------
# TFDS.
# ---------------------------------------------------------------------------------
@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_tfds_not_prepared_is_a_clear_error_and_downloads_nothing(tmp_path, no_network, monkeypatch):
    import models.tf_compat  # noqa: F401
    import tensorflow_datasets as tfds

    def no_download(*args, **kwargs):
        raise AssertionError("download_and_prepare must not be called")
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    with pytest.raises(DataError) as e:
        read_movielens_tfds(str(tmp_path), name="movielens/1m-ratings")
    msg = str(e.value)
    assert "'movielens/1m-ratings' (version 0.1.1) is not prepared" in msg
    assert os.path.join(str(tmp_path), "movielens", "1m-ratings", "0.1.1", "dataset_info.json") in msg
    assert "never downloads" in msg and "download_and_prepare()" in msg
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="not a TFDS dataset"):
        read_movielens_tfds(str(tmp_path), name="movielens/3k-ratings")
    with pytest.raises(ValueError, match="MovieLens ratings dataset"):
        read_movielens_tfds(str(tmp_path), name="mnist")


def _prepare_tfds_movielens_100k(source_dir, data_dir):
    """Prepares the real TFDS MovieLens 100K builder from local GroupLens files (test only).

    The download is replaced by the local directory; `url_infos` is blanked because this
    environment lacks the optional package TFDS uses to locate its checksum files.
    """
    from unittest import mock

    import models.tf_compat  # noqa: F401
    import tensorflow_datasets as tfds

    builder = tfds.builder("movielens/100k-ratings", data_dir=data_dir)
    cls = type(builder)
    cls.url_infos = None
    try:
        with mock.patch.object(tfds.download.DownloadManager, "download_and_extract", return_value=source_dir):
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    finally:
        del cls.url_infos


def test_tfds_prepared_dataset_reads_like_the_grouplens_files(tmp_path, no_network):
    source = _ml100k(tmp_path / "src")  # .../src/ml-100k, the layout of the GroupLens zip
    data_dir = str(tmp_path / "tfds")
    _prepare_tfds_movielens_100k(os.path.dirname(source), data_dir)
    ds = read_movielens_tfds(data_dir, name="movielens/100k-ratings", history_length=9)
    files = read_movielens(source, history_length=9)
    ds.validate_tables()
    assert ds.schema == files.schema and ds.user_complete_chunks
    pd.testing.assert_frame_equal(_sorted(ds.users, USER_ID), _sorted(files.users, USER_ID))
    # TFDS spells "Children"/"Unknown"; the reader maps them back to the GroupLens names.
    pd.testing.assert_frame_equal(_sorted(ds.items, ITEM_ID), _sorted(files.items, ITEM_ID))
    # TFDS shuffles examples when preparing: users come in first-seen order.
    pd.testing.assert_frame_equal(_sorted(_all(ds), [USER_ID, "timestamp"]), EXPECTED_100K, check_dtype=False)
    _check_user_complete(ds)
    assert ds.errors.rows_read == 5


# ---------------------------------------------------------------------------------
# The real datasets (skipped when ../shared/data is absent).
# ---------------------------------------------------------------------------------
def _real(name):
    path = os.path.join(SHARED_DATA, name)
    if not os.path.isdir(path):
        pytest.skip(f"real data not available: {path}")
    return path


def test_real_movielens_100k_atomic():
    ds = read_movielens(_real("movielens-100k"))
    ds.validate_tables()
    assert ds.schema.name == "movielens-100k"
    assert (len(ds.users), len(ds.items)) == (943, 1682)
    got = _all(ds)
    assert len(got) == 100_000 and ds.errors.summary()["rows_rejected"] == 0
    assert got[USER_ID].nunique() == 943 and got[ITEM_ID].nunique() == 1682
    assert int(got["label"].sum()) == 55_375  # ratings 4 and 5
    assert ds.users["age"].nunique() == 7 and ds.users["gender"].isin(["M", "F"]).all()
    assert ds.items.set_index(ITEM_ID).loc["267", "release_year"] == "unknown"  # "unkonwn" in the file
    assert ds.items["genres"].map(len).max() <= 6
    _check_user_complete(ds)


@pytest.mark.parametrize("name, users, items, train, test", [
    ("bars-movielens1m-m1", 6022, 3043, 796_244, 99_455),
    ("bars-amazonelectronics-m1", 1435, 1522, 31_887, 4_044),
])
def test_real_bars(name, users, items, train, test):
    ds = read_bars(_real(name))
    ds.validate_tables()
    assert (len(ds.users), len(ds.items)) == (users, items)
    counts = {"train": 0, "test": 0}
    for chunk in ds.interactions():
        for split, n in chunk["split"].value_counts().items():
            counts[split] += int(n)
    assert counts == {"train": train, "test": test}
    assert ds.errors.num_rejected == 0
