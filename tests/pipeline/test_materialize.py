import glob
import json
import os

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import tiny_synthetic_config

from models import data_layout as layout
from models.examples import parse_examples
from models.features import HISTORY, ITEM_ID, USER_ID, Feature, Kind, Schema
from models.tf_compat import tf
from pipeline.data.canonical import DataError, RawDataset, RowErrors
from pipeline.data.materialize import materialize
from pipeline.data.splits import SplitConfig
from pipeline.data.synthetic import generate_synthetic

SCHEMA = Schema(user_features=(Feature(USER_ID, Kind.CATEGORICAL, "user"),
                               Feature(HISTORY, Kind.SEQUENCE, "user", max_length=3)),
                item_features=(Feature(ITEM_ID, Kind.CATEGORICAL, "item"),), has_label=True)


def _raw(interactions, policy="fail", complete=True):
    users = pd.DataFrame({USER_ID: sorted(set(interactions[USER_ID]) - {"ghost"})})
    items = pd.DataFrame({ITEM_ID: sorted(set(interactions[ITEM_ID]) - {"ghost"})})
    return RawDataset(schema=SCHEMA, users=users, items=items, interactions=lambda: iter([interactions]),
                      user_complete_chunks=complete, predefined_split=False, errors=RowErrors(policy),
                      source="test")


def _read_examples(data_dir, split):
    files = layout.example_files(data_dir, split)
    raw = list(tf.data.TFRecordDataset(files, compression_type="GZIP").as_numpy_iterator())
    out = parse_examples(SCHEMA, tf.constant(raw))
    return [
        {"user": u.decode(), "item": i.decode(), "ts": int(t), "label": float(l),
         "history": [h.decode() for h in hist if h]}
        for u, i, t, l, hist in zip(out[USER_ID].numpy(), out[ITEM_ID].numpy(), out["timestamp"].numpy(),
                                    out["label"].numpy(), out[HISTORY].numpy())
    ]


def test_histories_by_hand(tmp_path):
    df = pd.DataFrame({USER_ID: ["u"] * 6, ITEM_ID: ["a", "b", "c", "d", "e", "f"],
                       "timestamp": [1, 2, 2, 3, 4, 5], "label": [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]})
    out = str(tmp_path / "data")
    materialize(_raw(df), out, SplitConfig(method="leave_last_n", n=1))
    train = sorted(_read_examples(out, "train"), key=lambda r: (r["ts"], r["item"]))
    # a@1: nothing before. b@2, c@2: only a (same-second events do not see each other).
    # d@3 (negative): a, b, c. e@4: a, b, c (d is not a positive). f@5 is test: last 3 positives.
    assert [r["history"] for r in train] == [[], ["a"], ["a"], ["a", "b", "c"], ["a", "b", "c"]]
    test = _read_examples(out, "test")
    assert test[0]["item"] == "f" and test[0]["history"] == ["b", "c", "e"]
    hist = pq.read_table(os.path.join(out, layout.USER_HISTORY_FILE)).to_pydict()
    assert hist["history"] == [["b", "c", "e"]]
    assert hist["seen"] == [["a", "b", "c", "e"]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_leakage_with_shuffled_timestamps(tmp_path, seed):
    rng = np.random.default_rng(seed)
    n = 300  # distinct shuffled timestamps (same-second ties are covered by the hand case)
    df = pd.DataFrame({USER_ID: rng.integers(0, 8, n).astype(str), ITEM_ID: rng.integers(0, 40, n).astype(str),
                       "timestamp": rng.permutation(n), "label": (rng.random(n) < 0.6).astype(float)})
    df[USER_ID] = "u" + df[USER_ID]
    df[ITEM_ID] = "i" + df[ITEM_ID]
    out = str(tmp_path / "data")
    materialize(_raw(df.sample(frac=1.0, random_state=seed), complete=False), out,
                SplitConfig(method="random", test_fraction=0.3, seed=seed))
    train = _read_examples(out, "train")
    positives = {}
    for r in train:
        if r["label"] > 0:
            positives.setdefault(r["user"], []).append((r["ts"], r["item"]))
    for r in train + _read_examples(out, "test"):
        earlier = sorted(p for p in positives.get(r["user"], []) if p[0] < r["ts"])
        allowed = [it for _, it in earlier]
        # The history is a suffix of strictly earlier training positives of the same user.
        assert len(r["history"]) == min(3, len(allowed))
        assert r["history"] == (allowed[-len(r["history"]):] if r["history"] else [])


def test_unknown_ids_fail_or_are_counted(tmp_path):
    df = pd.DataFrame({USER_ID: ["u1", "u1", "u1", "u2", "u2"], ITEM_ID: ["a", "ghost", "b", "a", "b"],
                       "timestamp": [1, 2, 3, 1, 2], "label": [1.0] * 5})
    with pytest.raises(DataError, match="item_id.*unknown item 'ghost'"):
        materialize(_raw(df), str(tmp_path / "data"), SplitConfig(method="leave_last_n", n=1))
    assert not os.path.exists(tmp_path / "data")
    assert not glob.glob(str(tmp_path / ".data*"))  # no temporary left behind
    summary = materialize(_raw(df, policy="skip"), str(tmp_path / "data"), SplitConfig(method="leave_last_n", n=1))
    assert summary["read"]["rejected_by_reason"] == {"unknown item": 1}
    assert summary["rows"] == {"train": 2, "test": 2}


def test_empty_split_is_an_error_and_old_output_survives(tmp_path):
    out = str(tmp_path / "data")
    materialize(generate_synthetic(tiny_synthetic_config()), out, SplitConfig(method="leave_last_n", n=3))
    before = sorted(os.listdir(out))
    df = pd.DataFrame({USER_ID: ["u1"], ITEM_ID: ["a"], "timestamp": [1], "label": [1.0]})
    with pytest.raises(ValueError, match="test split is empty"):
        materialize(_raw(df), out, SplitConfig(method="leave_last_n", n=1))
    assert sorted(os.listdir(out)) == before


def test_materialized_layout(tiny_data_dir):
    with open(os.path.join(tiny_data_dir, layout.READ_REPORT_FILE)) as f:
        report = json.load(f)
    assert report["rows"]["train"] > 0 and report["rows"]["test"] > 0
    assert report["positives"] == "label"
    n_rows = sum(pq.read_metadata(p).num_rows for p in layout.interaction_files(tiny_data_dir, "train"))
    n_examples = sum(1 for _ in tf.data.TFRecordDataset(layout.example_files(tiny_data_dir, "train"),
                                                        compression_type="GZIP"))
    assert n_rows == n_examples == report["rows"]["train"]
    assert Schema.load(os.path.join(tiny_data_dir, layout.SCHEMA_FILE)).name == "synthetic"


def test_example_rows_are_shuffled_and_reproducible(tmp_path):
    # 40 users x 10 events: interaction shards stay sorted by user and time, example
    # shards hold the same rows (with the same histories) in a seeded random order.
    rng = np.random.default_rng(0)
    df = pd.DataFrame({USER_ID: np.repeat([f"u{i:02d}" for i in range(40)], 10),
                       ITEM_ID: [f"i{j}" for j in rng.integers(0, 30, 400)],
                       "timestamp": np.tile(np.arange(10), 40), "label": np.ones(400)})
    runs = []
    for name in ("a", "b"):
        materialize(_raw(df), str(tmp_path / name), SplitConfig(method="leave_last_n", n=1))
        runs.append(_read_examples(str(tmp_path / name), "train"))
    assert runs[0] == runs[1]
    rows = [(r["user"], r["ts"]) for r in runs[0]]
    assert len(rows) == 360 and sorted(rows) == [(f"u{i:02d}", t) for i in range(40) for t in range(9)]
    assert rows != sorted(rows)
    # Users are spread over the stream: the first 36 rows (a tenth) come from many users.
    assert len({u for u, _ in rows[:36]}) >= 20
    by_key = {(r["user"], r["ts"]): r["history"] for r in runs[0]}
    assert by_key[("u05", 3)] == list(df[(df[USER_ID] == "u05") & (df.timestamp < 3)][ITEM_ID])[-3:]
    interactions = pq.read_table(layout.interaction_files(str(tmp_path / "a"), "train")[0]).to_pandas()
    assert list(zip(interactions[USER_ID], interactions["timestamp"])) == sorted(rows)


def test_random_prefix_history_mode(tmp_path):
    # One user, 7 training positives (one repeated item), a negative and a test event.
    df = pd.DataFrame({USER_ID: ["u"] * 9, ITEM_ID: ["a", "b", "c", "a", "x", "d", "e", "f", "t"],
                       "timestamp": np.arange(9), "label": [1.0, 1, 1, 1, 0, 1, 1, 1, 1]})
    runs = []
    for name in ("one", "two"):
        out = str(tmp_path / name)
        materialize(_raw(df), out, SplitConfig(method="leave_last_n", n=1), history_mode="random_prefix")
        runs.append(sorted(_read_examples(out, "train"), key=lambda r: r["ts"]))
    assert runs[0] == runs[1]                                            # seeded
    positives = ["a", "b", "c", "a", "d", "e", "f"]
    rows = [r for r in runs[0] if r["item"] != "x"]
    # The histories are the last 3 (the schema's length) before each row in one random
    # order of the positives: rebuild that order row by row from the empty history on.
    order, left = [], list(rows)
    while left:
        nxt = [r for r in left if r["history"] == order[-3:]]
        assert nxt, (order, left)
        order.append(nxt[0]["item"])
        left.remove(nxt[0])
    assert sorted(order) == sorted(positives) and order != positives
    # The negative and the test event see the last training positives, never the test item.
    assert [r["history"] for r in runs[0] if r["item"] == "x"] == [positives[-3:]]
    assert _read_examples(str(tmp_path / "one"), "test")[0]["history"] == positives[-3:]


def test_all_other_history_mode(tmp_path):
    df = pd.DataFrame({USER_ID: ["u"] * 4, ITEM_ID: ["a", "b", "c", "d"], "timestamp": [1, 2, 3, 4],
                       "label": [1.0, 0.0, 1.0, 1.0]})
    out = str(tmp_path / "data")
    materialize(_raw(df), out, SplitConfig(method="leave_last_n", n=1), history_mode="all_other")
    train = sorted(_read_examples(out, "train"), key=lambda r: r["ts"])
    # Training positives are a and c; every event sees the others (never d, the test item).
    assert [r["history"] for r in train] == [["c"], ["a", "c"], ["a"]]
    assert _read_examples(out, "test")[0]["history"] == ["a", "c"]
    # `all`: every event sees all training positives, its own included, as the test event does
    materialize(_raw(df), str(tmp_path / "all"), SplitConfig(method="leave_last_n", n=1), history_mode="all")
    train = sorted(_read_examples(str(tmp_path / "all"), "train"), key=lambda r: r["ts"])
    assert [r["history"] for r in train] == [["a", "c"]] * 3
    assert _read_examples(str(tmp_path / "all"), "test")[0]["history"] == ["a", "c"]
    with pytest.raises(ValueError, match="history_mode"):
        materialize(_raw(df), out, SplitConfig(method="leave_last_n", n=1), history_mode="future")
