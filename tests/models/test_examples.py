import numpy as np

from models.examples import encode_event, encode_example, encode_side, join_example, parse_examples
from models.features import HISTORY, ITEM_ID, USER_ID, Feature, Kind, Schema
from models.tf_compat import tf

SCHEMA = Schema(
    user_features=(Feature(USER_ID, Kind.CATEGORICAL, "user"), Feature("age", Kind.NUMERIC, "user"),
                   Feature(HISTORY, Kind.SEQUENCE, "user", max_length=3)),
    item_features=(Feature(ITEM_ID, Kind.CATEGORICAL, "item"),
                   Feature("tags", Kind.MULTI_CATEGORICAL, "item", max_length=2)),
    has_rating=True, has_label=True)


def test_join_example_equals_protobuf_serialization():
    user = {USER_ID: "u1", "age": 31.0}
    item = {ITEM_ID: "i9", "tags": ["a", "b", "c"]}
    joined = join_example(encode_side(SCHEMA, "user", user), encode_side(SCHEMA, "item", item),
                          encode_event(SCHEMA, ["i1", "i2"], 1234, 4.0, 1.0))
    proto = tf.train.Example.FromString(joined)
    direct = tf.train.Example()
    direct.ParseFromString(encode_example(SCHEMA, user, item, ["i1", "i2"], 1234, 4.0, 1.0))
    assert proto == direct
    assert sorted(proto.features.feature) == sorted([USER_ID, "age", HISTORY, ITEM_ID, "tags", "timestamp",
                                                     "rating", "label"])


def test_join_example_handles_long_bodies():
    # A body over 127 bytes needs a multi-byte varint length.
    history = [f"item{i}" for i in range(100)]
    sch = Schema(user_features=(Feature(USER_ID, Kind.CATEGORICAL, "user"),
                                Feature(HISTORY, Kind.SEQUENCE, "user", max_length=100)),
                 item_features=(Feature(ITEM_ID, Kind.CATEGORICAL, "item"),))
    raw = encode_example(sch, {USER_ID: "u"}, {ITEM_ID: "i"}, history, 1)
    parsed = parse_examples(sch, tf.constant([raw]))
    assert [v.decode() for v in parsed[HISTORY].numpy()[0]] == history


def test_parse_pads_and_truncates():
    rows = [encode_example(SCHEMA, {USER_ID: "u1", "age": 30.0}, {ITEM_ID: "i1", "tags": ["a", "b", "c"]},
                           ["h1", "h2", "h3", "h4"], 10, 5.0, 1.0),
            encode_example(SCHEMA, {USER_ID: "u2", "age": 40.0}, {ITEM_ID: "i2", "tags": []}, [], 11, 1.0, 0.0)]
    out = parse_examples(SCHEMA, tf.constant(rows))
    assert out[HISTORY].shape == (2, 3)
    # encode keeps the last max_length history items; tags keep the first ones.
    assert [v.decode() for v in out[HISTORY].numpy()[0]] == ["h2", "h3", "h4"]
    assert [v.decode() for v in out[HISTORY].numpy()[1]] == ["", "", ""]
    assert [v.decode() for v in out["tags"].numpy()[0]] == ["a", "b"]
    np.testing.assert_allclose(out["label"].numpy(), [1.0, 0.0])
    np.testing.assert_array_equal(out["timestamp"].numpy(), [10, 11])
