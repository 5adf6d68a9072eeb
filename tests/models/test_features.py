import numpy as np
import pytest

from models.features import (HISTORY, ITEM_ID, OOV_TOKEN, USER_ID, Feature, Kind, Schema, checked_numeric_stats,
                             feature_lists, normalize_value, numeric_stats, pad_values, padded_batch)


def _schema(**kw):
    return Schema(
        user_features=(Feature(USER_ID, Kind.CATEGORICAL, "user"), Feature("age", Kind.NUMERIC, "user"),
                       Feature(HISTORY, Kind.SEQUENCE, "user", max_length=3)),
        item_features=(Feature(ITEM_ID, Kind.CATEGORICAL, "item"),
                       Feature("tags", Kind.MULTI_CATEGORICAL, "item", max_length=2),
                       Feature("brand", Kind.CATEGORICAL, "item")),
        **kw)


def test_schema_round_trips_through_dict_and_file(tmp_path):
    s = _schema(has_label=True, name="x")
    assert Schema.from_dict(s.to_dict()) == s
    s.save(tmp_path / "schema.json")
    assert Schema.load(str(tmp_path / "schema.json")) == s


def test_schema_invariants_are_enforced():
    with pytest.raises(ValueError, match="first user feature must be 'user_id'"):
        Schema(user_features=(Feature("age", Kind.NUMERIC, "user"),),
               item_features=(Feature(ITEM_ID, Kind.CATEGORICAL, "item"),))
    with pytest.raises(ValueError, match="unique"):
        Schema(user_features=(Feature(USER_ID, Kind.CATEGORICAL, "user"), Feature("x", Kind.NUMERIC, "user")),
               item_features=(Feature(ITEM_ID, Kind.CATEGORICAL, "item"), Feature("x", Kind.NUMERIC, "item")))
    with pytest.raises(ValueError, match="reserved"):
        Schema(user_features=(Feature(USER_ID, Kind.CATEGORICAL, "user"), Feature("label", Kind.NUMERIC, "user")),
               item_features=(Feature(ITEM_ID, Kind.CATEGORICAL, "item"),))
    with pytest.raises(ValueError, match="side"):
        Schema(user_features=(Feature(USER_ID, Kind.CATEGORICAL, "user"),),
               item_features=(Feature(ITEM_ID, Kind.CATEGORICAL, "item"), Feature("a", Kind.NUMERIC, "user")))
    with pytest.raises(ValueError, match="max_length"):
        Feature("tags", Kind.MULTI_CATEGORICAL, "item", max_length=0)
    with pytest.raises(ValueError, match="max_length"):
        Feature("brand", Kind.CATEGORICAL, "item", max_length=3)
    with pytest.raises(ValueError, match="user side"):
        Feature("h", Kind.SEQUENCE, "item", max_length=3)
    with pytest.raises(ValueError, match="Unknown schema keys"):
        Schema.from_dict({**_schema().to_dict(), "extra": 1})


def test_derived_views():
    s = _schema()
    assert s.sequence_feature.name == HISTORY
    assert s.table_columns("user") == [USER_ID, "age"]
    assert s.vocabulary_names() == [USER_ID, ITEM_ID, "tags", "brand"]
    assert s.categorical_item_features() == ["tags", "brand"]
    specs = s.tensor_specs("user")
    assert specs[USER_ID].shape.as_list() == [None]
    assert specs[HISTORY].shape.as_list() == [None, 3]
    assert specs["age"].dtype.name == "float32"


def test_normalize_and_pad_values():
    s = _schema()
    assert normalize_value(s.feature("age"), "3.5") == 3.5
    with pytest.raises(ValueError, match="'age'.*number"):
        normalize_value(s.feature("age"), "abc")
    with pytest.raises(ValueError, match="finite"):
        normalize_value(s.feature("age"), float("nan"))
    assert normalize_value(s.feature("brand"), None) == OOV_TOKEN
    assert normalize_value(s.feature("tags"), ["a", "", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match="list"):
        normalize_value(s.feature("tags"), "a b")
    assert pad_values(["a", "b", "c"], 2) == ["a", "b"]
    assert pad_values(["a", "b", "c"], 2, keep="last") == ["b", "c"]
    assert pad_values(["a"], 3) == ["a", "", ""]


def test_padded_batch_layout():
    s = _schema()
    batch = padded_batch(s, "user", [{USER_ID: "u1", "age": 2.0, HISTORY: ["i1", "i2", "i3", "i4"]},
                                     {USER_ID: "u2", "age": 1.0, HISTORY: []}])
    assert batch[HISTORY].shape == (2, 3)
    assert list(batch[HISTORY][0]) == ["i2", "i3", "i4"]  # most recent kept
    assert list(batch[HISTORY][1]) == ["", "", ""]
    assert batch["age"].dtype.name == "float32"


def test_numeric_stats_standardize_numeric_features_only():
    schema = Schema(user_features=(Feature(USER_ID, Kind.CATEGORICAL, "user"),),
                    item_features=(Feature(ITEM_ID, Kind.CATEGORICAL, "item"), Feature("price", Kind.NUMERIC, "item"),
                                   Feature("flag", Kind.NUMERIC, "item")))
    columns = {USER_ID: ["u", "v", "u"], ITEM_ID: ["a", "b", "c"], "price": [1.0, 2.0, 6.0], "flag": [1.0, 1.0, 1.0]}
    stats = numeric_stats(schema, columns)
    # mean 3, population std sqrt(((1-3)^2 + (2-3)^2 + (6-3)^2) / 3) = sqrt(14/3); a constant feature: std 1
    assert stats == {"price": [3.0, pytest.approx(np.sqrt(14 / 3))], "flag": [1.0, 1.0]}
    with pytest.raises(ValueError, match="numeric feature 'price' should have finite values.*1 not finite"):
        numeric_stats(schema, {**columns, "price": [1.0, float("nan"), 2.0]})
    with pytest.raises(ValueError, match="lacks the numeric feature 'flag'"):
        numeric_stats(schema, {k: v for k, v in columns.items() if k != "flag"})


def test_checked_numeric_stats_keeps_good_stats_and_names_bad_ones():
    assert checked_numeric_stats(None) == {}
    assert checked_numeric_stats({"price": (1, 0.5)}) == {"price": [1.0, 0.5]}
    for stats in ([5.0, 0.0], [5.0, -1.0], [5.0, float("nan")], [5.0, float("inf")], [float("nan"), 1.0],
                  [5.0]):
        with pytest.raises(ValueError) as err:
            checked_numeric_stats({"price": stats})
        assert str(err.value) == ("`numeric_stats['price']` should be (mean, std) with a finite mean and a finite "
                                  f"std > 0. Received: numeric_stats['price']={[float(x) for x in stats]}")


def test_feature_lists_decodes_bytes_and_keeps_any_str():
    from models.tf_compat import tf

    columns = {"brand": np.array(["café", "東京"], object), "tags": tf.constant([["ü", ""], ["a", "b"]]),
               "price": np.array([1.5, 2.0], np.float32), "ascii": np.array([b"x", b"y"])}
    assert feature_lists(columns) == {"brand": ["café", "東京"], "tags": [["ü", ""], ["a", "b"]],
                                      "price": [1.5, 2.0], "ascii": ["x", "y"]}
