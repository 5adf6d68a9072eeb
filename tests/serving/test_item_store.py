import os

import numpy as np
import pandas as pd
import pytest

from models.features import ITEM_ID, OOV_TOKEN, Kind, Schema, padded_batch
from serving.item_store import ItemStore


@pytest.fixture(scope="module")
def store(tiny_data_dir):
    return ItemStore(tiny_data_dir, chunk_size=64)  # several chunks for 200 items


def _rows(data_dir):
    return pd.read_parquet(os.path.join(data_dir, "items.parquet")).to_dict("records")


def _assert_same(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert got[name].tolist() == want[name].tolist(), name


def test_features_equal_padded_batch_of_the_rows(store, tiny_data_dir):
    schema = Schema.load(os.path.join(tiny_data_dir, "schema.json"))
    rows = [dict(r, tags=list(r["tags"])) for r in _rows(tiny_data_dir)]
    assert len(store) == len(rows)
    for seed in (0, 1, 2):
        pick = np.random.default_rng(seed).choice(len(rows), 37, replace=True)  # repeats allowed
        ids = [rows[i]["item_id"] for i in pick]
        _assert_same(store.features(ids), padded_batch(schema, "item", [rows[i] for i in pick]))
    assert any(f.kind == Kind.MULTI_CATEGORICAL for f in schema.item_features)


def test_unknown_items_get_the_placeholder_but_keep_their_id(store, tiny_data_dir):
    schema = Schema.load(os.path.join(tiny_data_dir, "schema.json"))
    first = _rows(tiny_data_dir)[0]["item_id"]
    assert store.positions([first, "nope"]).tolist() == [0, -1]
    feats = store.features(["nope", first])
    assert feats[ITEM_ID].tolist() == ["nope", first]
    for f in schema.item_features[1:]:
        if f.kind == Kind.CATEGORICAL:
            assert feats[f.name][0] == OOV_TOKEN
        elif f.kind == Kind.MULTI_CATEGORICAL:
            assert feats[f.name][0].tolist() == [""] * f.max_length
    assert "nope" not in store and first in store


def test_features_at_validates_positions(store):
    with pytest.raises(ValueError, match="positions"):
        store.features_at(np.array([len(store)]))
    with pytest.raises(ValueError, match="1-D"):
        store.features_at(np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="`item_ids` has 1 entries for 2 positions"):
        store.features_at(np.array([0, 1]), ["a"])
    assert store.features_at(np.array([], np.int64))[ITEM_ID].shape == (0,)


def test_duplicate_item_ids_are_refused(tmp_path, tiny_data_dir):
    import shutil

    d = str(tmp_path / "data")
    shutil.copytree(tiny_data_dir, d)
    df = pd.read_parquet(os.path.join(d, "items.parquet"))
    pd.concat([df, df.iloc[:2]]).to_parquet(os.path.join(d, "items.parquet"), index=False)
    with pytest.raises(ValueError, match="repeats item ids"):
        ItemStore(d)


def test_tensors_at_equal_features_at(store, tiny_data_dir):
    positions = np.array([3, -1, 0, 199, 3, 57])
    ids = [f"id{i}" for i in range(len(positions))]
    for given in (None, ids):
        want = store.features_at(positions, given)
        got = store.tensors_at(positions, given)
        assert sorted(got) == sorted(want)
        for name, value in want.items():
            t = got[name].numpy()
            t = t.astype(str) if t.dtype == object else t
            np.testing.assert_array_equal(t, value.astype(str) if value.dtype == object else value, err_msg=name)
    with pytest.raises(ValueError, match="should be in"):
        store.tensors_at(np.array([len(store)]))
    with pytest.raises(ValueError, match="should hold 6 ids"):
        store.tensors_at(positions, ids[:2])


def test_tensors_at_gathers_only_the_named_features(store):
    got = store.tensors_at(np.array([0, 1]), names=["tags", ITEM_ID])
    assert sorted(got) == sorted(["tags", ITEM_ID]) and got["tags"].shape[0] == 2
    with pytest.raises(ValueError, match=r"unknown item feature\(s\) \['nope'\]"):
        store.tensors_at(np.array([0]), names=["nope"])


def test_encoded_items_gather_every_feature_by_row():
    from serving.item_store import EncodedItems

    rng = np.random.default_rng(0)
    arrays = {"item_id": rng.integers(0, 1000, 50).astype(np.int32),
              "tags": rng.integers(0, 9, (50, 3)).astype(np.int32),
              "price": rng.normal(size=50).astype(np.float32)}  # kept bit for bit in the int32 matrix
    table = EncodedItems(arrays)
    assert len(table) == 50 and table.names == ["item_id", "tags", "price"] and table.nbytes == 50 * 5 * 4
    rows = np.array([7, 0, 49, 7])
    got = table.at(rows)
    for name, a in arrays.items():
        assert got[name].dtype == a.dtype and got[name].flags.c_contiguous
        np.testing.assert_array_equal(got[name], a[rows])
    assert table.at(np.array([], np.int64))["tags"].shape == (0, 3)
    with pytest.raises(ValueError, match="one row per item"):
        EncodedItems({"a": np.zeros(3, np.int32), "b": np.zeros(4, np.int32)})
    with pytest.raises(ValueError, match="int32 or float32"):
        EncodedItems({"a": np.zeros(3, np.int64)})
