import numpy as np
import pytest

from models.features import HISTORY, ITEM_ID, USER_ID, Feature, Kind, Schema, padded_batch
from models.logq import ItemLogQ, log_q_with_floor
from models.tf_compat import keras, tf
from models.towers import HISTORY_POOLINGS, MaskedAttentionPooling, MaskedMeanPooling, Tower
from models.two_tower import TwoTowerModel

SCHEMA = Schema(
    user_features=(Feature(USER_ID, Kind.CATEGORICAL, "user"), Feature("age", Kind.NUMERIC, "user"),
                   Feature(HISTORY, Kind.SEQUENCE, "user", max_length=3)),
    item_features=(Feature(ITEM_ID, Kind.CATEGORICAL, "item"),
                   Feature("tags", Kind.MULTI_CATEGORICAL, "item", max_length=2)),
    has_label=True)
VOCABS = {USER_ID: ["u1", "u2", "u3"], ITEM_ID: ["i1", "i2", "i3", "i4"], "tags": ["a", "b"]}


def _users():
    return padded_batch(SCHEMA, "user", [{USER_ID: "u1", "age": 30.0, HISTORY: ["i1", "i2"]},
                                         {USER_ID: "zz", "age": 50.0, HISTORY: []}])


def _items():
    return padded_batch(SCHEMA, "item", [{ITEM_ID: "i1", "tags": ["a"]}, {ITEM_ID: "i3", "tags": ["a", "b"]}])


def test_masked_mean_pooling_by_hand():
    emb = tf.constant([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]], [[5.0, 5.0], [7.0, 7.0], [7.0, 7.0]]])
    ids = tf.constant([[3, 4, 0], [0, 0, 0]])
    # Row 1: mean of the first two = (2, 3); row 2: all padding -> zeros.
    np.testing.assert_allclose(MaskedMeanPooling()(emb, ids).numpy(), [[2.0, 3.0], [0.0, 0.0]])


def test_masked_attention_pooling_by_hand():
    emb = tf.constant([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]], [[5.0, 5.0], [7.0, 7.0], [7.0, 7.0]]])
    ids = tf.constant([[3, 4, 0], [0, 0, 0]])
    layer = MaskedAttentionPooling(units=2)
    # The query starts at zero: exactly the masked mean.
    np.testing.assert_allclose(layer(emb, ids).numpy(), [[2.0, 3.0], [0.0, 0.0]], rtol=1e-6)
    w = np.array([[1.0, 0.0], [0.0, -1.0]])
    b = np.array([0.0, 0.5])
    v = np.array([[2.0], [1.0]])
    layer.hidden.set_weights([w, b])
    layer.query.set_weights([v])
    # Scores vᵀ tanh(W e + b) of the two present positions; the padded one gets no weight.
    scores = [float(v[:, 0] @ np.tanh(e @ w + b)) for e in ([1.0, 2.0], [3.0, 4.0])]
    a = np.exp(scores) / np.sum(np.exp(scores))
    want = a[0] * np.array([1.0, 2.0]) + a[1] * np.array([3.0, 4.0])
    np.testing.assert_allclose(layer(emb, ids).numpy(), [want, [0.0, 0.0]], rtol=1e-5)
    # The padded position's embedding does not matter.
    other = tf.tensor_scatter_nd_update(emb, [[0, 2]], [[-50.0, 80.0]])
    np.testing.assert_allclose(layer(other, ids).numpy(), layer(emb, ids).numpy(), rtol=1e-6)
    assert MaskedAttentionPooling.from_config(layer.get_config()).units == 2
    with pytest.raises(ValueError, match="units"):
        MaskedAttentionPooling(units=0)


def test_masked_attention_pooling_in_float16_and_with_large_scores():
    emb = np.array([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]], [[5.0, 5.0], [7.0, 7.0], [7.0, 7.0]]])
    ids = tf.constant([[3, 4, 0], [0, 0, 0]])
    w, b, v = np.array([[1.0, 0.0], [0.0, -1.0]]), np.array([0.0, 0.5]), np.array([[2.0], [1.0]])
    outputs = {}
    for dtype in ("float32", "float16"):
        layer = MaskedAttentionPooling(units=2, dtype=dtype)
        x = tf.constant(emb, dtype)
        layer(x, ids)
        layer.hidden.set_weights([w, b])
        layer.query.set_weights([v])
        outputs[dtype] = layer(x, ids).numpy().astype(np.float64)
    # No NaN from the all-padding row (its weights are all zero), and float16 agrees with float32.
    np.testing.assert_array_equal(outputs["float16"][1], [0.0, 0.0])
    np.testing.assert_allclose(outputs["float16"], outputs["float32"], rtol=2e-3)
    # Scores far apart (a softmax of 0 and 1000): all the weight on the larger, no overflow.
    layer = MaskedAttentionPooling(units=1)
    layer(tf.constant(emb, tf.float32), ids)
    layer.hidden.set_weights([np.array([[1.0], [0.0]]), np.array([0.0])])
    layer.query.set_weights([np.array([[1000.0]])])
    # tanh(1) and tanh(3): scores 761.6 and 995.1.
    np.testing.assert_allclose(layer(tf.constant(emb, tf.float32), ids).numpy(), [[3.0, 4.0], [0.0, 0.0]])


def test_tower_with_attention_pooling_trains_the_query_and_round_trips():
    keras.utils.set_random_seed(1)
    assert HISTORY_POOLINGS == ("mean", "attention")
    users = {k: tf.constant(v) for k, v in _users().items()}
    tower = Tower(SCHEMA, "user", VOCABS, feature_dim=4, hidden_units=(8,), output_dim=5, history_pooling="attention")
    tower(users)
    attention = tower.sequence_pool
    assert isinstance(attention, MaskedAttentionPooling)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tower(users) ** 2)
    grad = tape.gradient(loss, attention.query.kernel)
    assert grad is not None and float(tf.reduce_sum(tf.abs(grad))) > 0
    clone = Tower.from_config(tower.get_config())
    assert clone.get_config() == tower.get_config() and clone.history_pooling == "attention"
    # The item side has no sequence: it keeps the mean for its multi-valued feature.
    items = Tower(SCHEMA, "item", VOCABS, feature_dim=4, history_pooling="attention")
    assert isinstance(items.sequence_pool, MaskedMeanPooling)
    with pytest.raises(ValueError, match="history_pooling"):
        Tower(SCHEMA, "user", VOCABS, history_pooling="max")


def test_tower_shapes_normalization_and_config_round_trip():
    tower = Tower(SCHEMA, "user", VOCABS, feature_dim=4, hidden_units=(8,), output_dim=5, normalize=True,
                  numeric_stats={"age": [40.0, 10.0]})
    out = tower({k: tf.constant(v) for k, v in _users().items()})
    assert out.shape == (2, 5)
    np.testing.assert_allclose(np.linalg.norm(out.numpy(), axis=1), 1.0, rtol=1e-5)
    clone = Tower.from_config(tower.get_config())
    assert clone.get_config() == tower.get_config()
    assert clone({k: tf.constant(v) for k, v in _users().items()}).shape == (2, 5)


def test_numeric_stats_standardize_as_x_minus_mean_over_std():
    # Stats [40, 10] on ages x give the tower stats [0, 1] gives on (x - 40) / 10, same weights.
    users = {k: tf.constant(v) for k, v in _users().items()}
    keras.utils.set_random_seed(0)
    scaled = Tower(SCHEMA, "user", VOCABS, feature_dim=4, hidden_units=(8,), output_dim=5,
                   numeric_stats={"age": [40.0, 10.0]})
    plain = Tower(SCHEMA, "user", VOCABS, feature_dim=4, hidden_units=(8,), output_dim=5)
    got = scaled(users).numpy()
    plain(users)
    plain.set_weights(scaled.get_weights())
    standardized = dict(users, age=(users["age"] - 40.0) / 10.0)  # ages 30, 50 → -1, 1
    np.testing.assert_allclose(got, plain(standardized).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scaled.embed_features(users).numpy()[:, 4], [-1.0, 1.0], rtol=1e-6)
    assert not np.allclose(got, plain(users).numpy(), atol=1e-3)  # the output depends on the age


def test_tower_errors_name_the_problem():
    with pytest.raises(ValueError, match="no vocabulary for feature 'tags'"):
        Tower(SCHEMA, "item", {ITEM_ID: ["i1"]})
    with pytest.raises(ValueError, match="output_dim"):
        Tower(SCHEMA, "item", VOCABS, output_dim=0)
    for std in (-1.0, 0.0, float("nan")):
        with pytest.raises(ValueError, match=rf"`numeric_stats\['age'\]` should be .*finite std > 0. "
                                             rf"Received: numeric_stats\['age'\]=\[40.0, {std}\]"):
            Tower(SCHEMA, "user", VOCABS, numeric_stats={"age": [40.0, std]})


def test_item_log_q_lookup_and_floor():
    layer = ItemLogQ(["i1", "i2", "i3"], [0.5, 0.5, 0.0])
    got = layer(tf.constant(["i2", "i3", "unknown"])).numpy()
    # floor = half the smallest positive probability = 0.25 for zero-count and unknown items.
    np.testing.assert_allclose(got, np.log([0.5, 0.25, 0.25]), rtol=1e-6)
    assert ItemLogQ.from_config(layer.get_config()).floor == 0.25
    np.testing.assert_allclose(log_q_with_floor(np.array([0.0, 0.1]), 0.01), np.log([0.01, 0.1]))
    with pytest.raises(ValueError, match="same length"):
        ItemLogQ(["i1"], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"`probabilities` should be in \[0, 1\]. Received: probabilities\[1\]=nan "
                                         r"\(1 of 2 values are not\)"):
        ItemLogQ(["i1", "i2"], [0.5, float("nan")])
    with pytest.raises(ValueError, match=r"Received: probabilities\[1\]=1.5 \(2 of 3 values are not\)"):
        ItemLogQ(["i1", "i2", "i3"], [0.5, 1.5, -0.1])


@pytest.mark.parametrize("name, value, message", [
    ("temperature", float("nan"), "`temperature` should be a finite number > 0. Received: temperature=nan"),
    ("temperature", float("inf"), "`temperature` should be a finite number > 0. Received: temperature=inf"),
    ("temperature", 0.0, "`temperature` should be a finite number > 0. Received: temperature=0.0"),
    ("ssl_weight", float("nan"), "`ssl_weight` should be a finite number >= 0. Received: ssl_weight=nan"),
    ("ssl_weight", float("inf"), "`ssl_weight` should be a finite number >= 0. Received: ssl_weight=inf"),
    ("ssl_weight", -0.5, "`ssl_weight` should be a finite number >= 0. Received: ssl_weight=-0.5"),
    ("embedding_l2", float("nan"), "`embedding_l2` should be a finite number >= 0. Received: embedding_l2=nan"),
    ("embedding_l2", float("inf"), "`embedding_l2` should be a finite number >= 0. Received: embedding_l2=inf"),
    ("embedding_l2", -1e-3, "`embedding_l2` should be a finite number >= 0. Received: embedding_l2=-0.001"),
    ("num_mixed_negatives", -3, "`num_mixed_negatives` should be >= 0. Received: num_mixed_negatives=-3"),
])
def test_two_tower_rejects_bad_hyper_parameters_by_name(name, value, message):
    with pytest.raises(ValueError) as err:
        TwoTowerModel(SCHEMA, VOCABS, embedding_dim=4, feature_dim=4, hidden_units=(8,), **{name: value})
    assert str(err.value) == message


def test_two_tower_loss_matches_hand_computed_softmax_and_one_step_fit():
    keras.utils.set_random_seed(0)
    model = TwoTowerModel(SCHEMA, VOCABS, item_log_q=ItemLogQ(["i1", "i3"], [0.75, 0.25]), embedding_dim=4,
                          feature_dim=4, hidden_units=(8,), remove_accidental_hits=True)
    feats = {**{k: tf.constant(v) for k, v in _users().items()}, **{k: tf.constant(v) for k, v in _items().items()}}
    loss = float(model.compute_loss(feats))
    q = model.query_tower({k: feats[k] for k in _users()}).numpy()
    c = model.item_tower({k: feats[k] for k in _items()}).numpy()
    logits = q @ c.T - np.log([0.75, 0.25])[None, :]
    ref = -np.sum(np.diag(logits) - np.log(np.exp(logits).sum(axis=1)))  # tfrs sums over the batch
    assert loss == pytest.approx(ref, rel=1e-4)
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    hist = model.fit(tf.data.Dataset.from_tensors(feats).repeat(20), epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"]).all()
    # Twenty Adam steps on one batch fit it better than the initial weights did.
    assert float(model.compute_loss(feats)) < loss


def test_embedding_l2_adds_the_penalty_of_every_table_once_while_training():
    keras.utils.set_random_seed(0)
    feats = {**{k: tf.constant(v) for k, v in _users().items()}, **{k: tf.constant(v) for k, v in _items().items()}}
    plain = TwoTowerModel(SCHEMA, VOCABS, embedding_dim=4, feature_dim=4, hidden_units=(8,))
    model = TwoTowerModel(SCHEMA, VOCABS, embedding_dim=4, feature_dim=4, hidden_units=(8,), embedding_l2=0.3)
    base = float(model.compute_loss(feats))  # builds the tables
    plain.compute_loss(feats)
    # user id, tags and the item-id table shared by the item tower and the history: three tables
    tables = {v.name: v.numpy() for t in (model.query_tower, model.item_tower) for v in t.embedding_tables()}
    assert len(tables) == 3
    by_hand = 0.3 * sum(float(np.square(t).sum()) for t in tables.values())
    assert float(model.embedding_penalty()) == pytest.approx(by_hand, rel=1e-5)
    assert float(model.compute_loss(feats, training=True)) == pytest.approx(base + by_hand, rel=1e-5)
    # the logged retrieval loss leaves it out
    assert float(model.main_loss_tracker.result()) == pytest.approx(base, rel=1e-5)
    assert plain.embedding_l2 == 0.0 and float(plain.compute_loss(feats, training=True)) == pytest.approx(
        float(plain.compute_loss(feats)), rel=1e-6)
    # its gradient reaches rows the batch does not use (item i4), scaled by 2λ
    item_table = model.item_tower.item_embedding.embedding.embeddings
    with tf.GradientTape() as tape:
        penalty = model.embedding_penalty()
    grad = tf.convert_to_tensor(tape.gradient(penalty, item_table)).numpy()
    row = model.item_tower.item_embedding.ids(tf.constant(["i4"])).numpy()[0]
    np.testing.assert_allclose(grad[row], 2 * 0.3 * item_table.numpy()[row], rtol=1e-5)
    with pytest.raises(ValueError, match="embedding_l2"):
        TwoTowerModel(SCHEMA, VOCABS, embedding_l2=-1.0)



def test_query_dropout_applies_to_the_query_embedding_in_training_only():
    keras.utils.set_random_seed(0)
    feats = {**{k: tf.constant(v) for k, v in _users().items()}, **{k: tf.constant(v) for k, v in _items().items()}}
    model = TwoTowerModel(SCHEMA, VOCABS, embedding_dim=4, feature_dim=4, hidden_units=(8,), query_dropout=0.5)
    evaluation = float(model.compute_loss(feats))
    assert model.query_dropout_layer.rate == 0.5
    # The loss sees what the dropout layer makes of the query embeddings, in training only: a layer that
    # drops everything leaves logits of 0, so each of the B rows costs log B.
    model.query_dropout_layer = keras.layers.Lambda(lambda x: x * 0.0)
    batch = len(_items()[ITEM_ID])
    assert float(model.compute_loss(feats, training=True)) == pytest.approx(batch * np.log(batch), rel=1e-6)
    assert float(model.compute_loss(feats)) == pytest.approx(evaluation, rel=1e-6)
    with pytest.raises(ValueError, match="query_dropout"):
        TwoTowerModel(SCHEMA, VOCABS, query_dropout=1.0)

EMBEDDING_L2_ON_TWO_REPLICAS = r"""
import json, numpy as np
from models.tf_compat import keras, tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from models.features import ITEM_ID, USER_ID, Feature, Kind, Schema
from models.two_tower import TwoTowerModel

schema = Schema(user_features=(Feature(USER_ID, Kind.CATEGORICAL, "user"),),
                item_features=(Feature(ITEM_ID, Kind.CATEGORICAL, "item"),))
vocabs = {USER_ID: ["u0", "u1", "u2", "u3"], ITEM_ID: ["i0", "i1", "i2", "i3", "unused"]}
batch = {USER_ID: np.array(["u0", "u1", "u2", "u3"]), ITEM_ID: np.array(["i0", "i1", "i2", "i3"])}
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    model = TwoTowerModel(schema, vocabs, embedding_dim=4, feature_dim=4, hidden_units=(8,), embedding_l2=0.25)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.query_tower({USER_ID: tf.constant(batch[USER_ID])})
    model.item_tower({ITEM_ID: tf.constant(batch[ITEM_ID])})
table = model.item_tower.item_embedding.embedding.embeddings
row = int(model.item_tower.item_embedding.ids(tf.constant(["unused"])).numpy()[0])
before = table.numpy()[row].tolist()
model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0)
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "before": before, "after": table.numpy()[row].tolist()}))
"""


def test_embedding_l2_counts_once_over_two_replicas():
    """A row no example touches moves by the penalty alone: one SGD step scales it by
    1 − lr·2λ with two replicas as with one (each replica adds half of the penalty)."""
    import json

    from conftest import python_subprocess

    proc = python_subprocess(EMBEDDING_L2_ON_TWO_REPLICAS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    np.testing.assert_allclose(out["after"], np.asarray(out["before"]) * (1 - 0.1 * 2 * 0.25), rtol=1e-5)


def test_in_batch_task_removes_accidental_hits():
    keras.utils.set_random_seed(0)
    feats = {**{k: tf.constant(v) for k, v in _users().items()},
             **{k: tf.constant(v) for k, v in padded_batch(SCHEMA, "item", [{ITEM_ID: "i1", "tags": ["a"]},
                                                                            {ITEM_ID: "i1", "tags": ["a"]}]).items()}}
    on = TwoTowerModel(SCHEMA, VOCABS, embedding_dim=4, feature_dim=4, hidden_units=(8,))
    # Both rows have the same positive: with removal each row's softmax has one column -> loss 0.
    assert float(on.compute_loss(feats)) == pytest.approx(0.0, abs=1e-6)
    off = TwoTowerModel(SCHEMA, VOCABS, embedding_dim=4, feature_dim=4, hidden_units=(8,),
                        remove_accidental_hits=False)
    assert float(off.compute_loss(feats)) == pytest.approx(2 * np.log(2), rel=1e-4)  # identical columns


def test_tower_serving_function_signature():
    tower = Tower(SCHEMA, "item", VOCABS, feature_dim=4, hidden_units=(), output_dim=3)
    fn = tower.serving_function()
    out = fn(**{k: tf.constant(v) for k, v in _items().items()})
    assert out["embedding"].shape == (2, 3)
    assert sorted(fn.structured_input_signature[1]) == [ITEM_ID, "tags"]


def test_attention_query_tower_saves_and_loads(tmp_path):
    keras.utils.set_random_seed(2)
    tower = Tower(SCHEMA, "user", VOCABS, feature_dim=4, hidden_units=(8,), output_dim=3, history_pooling="attention")
    users = {k: tf.constant(v) for k, v in _users().items()}
    tower(users)
    tower.sequence_pool.query.set_weights([np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)])
    want = tower(users).numpy()
    tf.saved_model.save(tower, str(tmp_path / "q"), signatures={"serving_default": tower.serving_function()})
    loaded = tf.saved_model.load(str(tmp_path / "q"))
    np.testing.assert_allclose(loaded.signatures["serving_default"](**users)["embedding"].numpy(), want, rtol=1e-5)
