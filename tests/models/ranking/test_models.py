import json
import os

import numpy as np
import pytest

from conftest import python_subprocess
from models.features import HISTORY, ITEM_ID, USER_ID, Feature, Kind, Schema
from models.ranking.co_action import CoActionUnit, micro_mlp_param_count
from models.ranking.losses import GHMCLoss, make_loss
from models.ranking.models import (CAN, DIN, DNN, MODEL_TYPES, CartesianDNN, RankingConfig, TargetAttentionPooling,
                                   build_ranker, build_vocabularies, cartesian_ids, export_ranker, inputs_from_frame)
from models.tf_compat import keras, tf
from tiny_schema import SCHEMA, VOCABS

CONFIG = RankingConfig(embedding_dim=4, hidden_units=(8,), coaction_feed_dim=3, coaction_layer_sizes=(2, 2),
                       coaction_orders=2, attention_units=(4,))


def _batch():
    return {USER_ID: np.array(["u1", "u9", "u2"], object), "age": np.array(["a", "b", ""], object),
            HISTORY: np.array([["i1", "i2", ""], ["", "", ""], ["i3", "", ""]], object),
            ITEM_ID: np.array(["i1", "i3", "zz"], object), "category": np.array(["c1", "c2", "c1"], object),
            "tags": np.array([["t1", ""], ["t1", "t2"], ["", ""]], object),
            "price": np.array([1.0, 2.0, 0.5], np.float32)}


def _tensors(batch):
    return {k: tf.constant(v) for k, v in batch.items()}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_shapes_score_candidates_and_config_round_trip(model_type):
    model = build_ranker(model_type, SCHEMA, VOCABS, CONFIG)
    batch = _batch()
    logits = model(_tensors(batch))
    assert logits.shape == (3,) and np.isfinite(logits.numpy()).all()
    # One user's features against 3 candidates == the row-aligned batch with the user repeated.
    user = {USER_ID: "u1", "age": "a", HISTORY: ["i1", "i2", ""]}
    items = {k: batch[k] for k in (ITEM_ID, "category", "tags", "price")}
    scores = model.score_candidates(user, items).numpy()
    tiled = {**{k: np.array([v] * 3, object) for k, v in user.items()}, **items}
    tiled[HISTORY] = np.array([user[HISTORY]] * 3, object)
    np.testing.assert_allclose(scores, tf.sigmoid(model(_tensors(tiled))).numpy(), rtol=1e-5)
    batch1 = {k: np.asarray(v, object)[None] for k, v in user.items()}
    np.testing.assert_allclose(model.score_candidates(batch1, items).numpy(), scores, rtol=1e-6)
    # Two users for three candidates: neither one user nor one row per candidate.
    two = {k: np.asarray([v, v], object) for k, v in user.items()}
    with pytest.raises(ValueError, match=r"`user_features` should hold one user \(batch 1\) or one row per "
                                         r"candidate \(batch 3\). Received: user_features\['user_id'\] with "
                                         r"batch 2 for 3 candidates"):
        model.score_candidates(two, items)

    config = model.get_config()
    json.dumps(config)
    clone = type(model).from_config(config)
    assert clone.get_config() == config
    assert clone(_tensors(batch)).shape == (3,)


def test_can_tables_follow_the_co_action_layout():
    model = CAN(SCHEMA, VOCABS, CONFIG)
    model(_tensors(_batch()))
    # Induction: every categorical/multi item feature; feeds: age and the history (not user_id).
    assert model.induction_features == [ITEM_ID, "category", "tags"]
    assert model.feed_features == ["age", HISTORY]
    k = micro_mlp_param_count(3, (2, 2), use_bias=True)  # 3*2 + 2 + 2*2 + 2 = 14
    assert k == 14
    for name in model.induction_features:
        assert model.induction_embeddings[name].output_dim == k
    # item_id 3 tokens + mask + OOV = 5 rows; category 4; tags 4; feeds: age 4, history (item_id vocab) 5.
    assert model.coaction_parameter_count() == (5 + 4 + 4) * 14 + (4 + 5) * 3
    indep = CAN(SCHEMA, VOCABS, RankingConfig(**{**CONFIG.to_dict(), "order_independent": True,
                                                 "combination_independent": True}))
    assert indep.induction_embeddings[ITEM_ID].output_dim == 14 * 2 * 2  # × orders × feeds
    assert indep(_tensors(_batch())).shape == (3,)
    seq_first = CAN(SCHEMA, VOCABS, RankingConfig(**{**CONFIG.to_dict(), "sequence_pooling": "sum_then_coaction"}))
    assert seq_first(_tensors(_batch())).shape == (3,)
    # The unit of the model round-trips on its own.
    assert CoActionUnit.from_config(model.unit.get_config()).get_config() == model.unit.get_config()


def test_cartesian_ids_by_hand_and_table_sizes():
    # Lookup sizes 4 and 4 (mask, OOV, 2 tokens): cross = (u - 1) * 3 + (i - 1) + 1, 0 if a side is padding.
    # row 0: u=2 with i=2 -> 3 + 1 + 1 = 5, with i=3 -> 3 + 2 + 1 = 6; row 1: u=0 -> 0, 0.
    got = cartesian_ids(tf.constant([2, 0], tf.int64), tf.constant([[2, 3], [1, 0]], tf.int64), 4, 4, 100)
    np.testing.assert_array_equal(got.numpy(), [[5, 6], [0, 0]])
    # Sequence × categorical: one cross per position; padding positions give 0.
    got = cartesian_ids(tf.constant([[1, 3, 0]], tf.int64), tf.constant([2], tf.int64), 4, 4, 100)
    np.testing.assert_array_equal(got.numpy(), [[2, 8, 0]])
    # Product 9 > 5 buckets: cross index modulo 5, plus 1: (0*3 + 1) % 5 + 1 = 2, (2*3 + 1) % 5 + 1 = 3.
    folded = cartesian_ids(tf.constant([[1, 3, 0]], tf.int64), tf.constant([2], tf.int64), 4, 4, 5).numpy()
    np.testing.assert_array_equal(folded, [[2, 3, 0]])

    model = CartesianDNN(SCHEMA, VOCABS, RankingConfig(**{**CONFIG.to_dict(), "cartesian_max_buckets": 10}))
    assert len(model.pairs) == 2 * 3
    # age × item_id: (4-1)(5-1) = 12 > 10 buckets -> 11 rows; age × category: 3 * 3 = 9 -> 10 rows.
    assert model.cross_embeddings["age_x_item_id"].input_dim == 11
    assert model.cross_embeddings["age_x_category"].input_dim == 10
    assert model.coaction_parameter_count() == sum(e.input_dim * 4 for e in model.cross_embeddings.values())
    assert DNN(SCHEMA, VOCABS, CONFIG).coaction_parameter_count() == 0


def test_din_attention_ignores_padding():
    layer = TargetAttentionPooling((4,))
    keys = tf.constant(np.random.default_rng(0).normal(size=(2, 3, 5)), tf.float32)
    query = tf.ones([2, 5])
    a = layer(query, keys, tf.constant([[1, 2, 0], [1, 2, 3]]))
    changed = tf.concat([keys[:, :2], 100.0 * tf.ones([2, 1, 5])], axis=1)
    b = layer(query, changed, tf.constant([[1, 2, 0], [1, 2, 3]]))
    np.testing.assert_allclose(a.numpy()[0], b.numpy()[0], rtol=1e-6)  # padded position has no effect
    assert not np.allclose(a.numpy()[1], b.numpy()[1])
    assert TargetAttentionPooling.from_config(layer.get_config()).units == [4]


@pytest.mark.parametrize("loss", ["bce", "focal", "ghm"])
def test_one_step_fit_changes_weights(loss):
    model = CAN(SCHEMA, VOCABS, CONFIG)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=make_loss(loss))
    batch = _batch()
    model(_tensors(batch))
    before = [w.numpy().copy() for w in model.induction_embeddings[ITEM_ID].weights]
    history = model.fit(batch, np.array([1.0, 0.0, 1.0], np.float32), epochs=1, batch_size=3, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = model.induction_embeddings[ITEM_ID].weights[0].numpy()
    assert not np.allclose(before[0], after)
    if loss == "ghm":
        assert isinstance(model.loss, GHMCLoss) and model.loss.accumulated.numpy().sum() > 0


def test_vocabularies_and_inputs_from_frame():
    frame = {USER_ID: ["u1", "u2", "u1"], "age": ["a", "a", "b"], HISTORY: [["i1"], ["i1", "i2"], []],
             ITEM_ID: ["i2", "i2", "i3"], "category": ["c", "c", "d"], "tags": [["x"], [], ["x", "y", "z"]],
             "price": [1, 2, 3]}
    vocabs = build_vocabularies(SCHEMA, frame)
    # item_id counts history and item_id together: i2 x3, i1 x2, i3 x1.
    assert vocabs[ITEM_ID] == ["i2", "i1", "i3"]
    assert vocabs["age"] == ["a", "b"] and vocabs["tags"] == ["x", "y", "z"]
    assert HISTORY not in vocabs
    inputs = inputs_from_frame(SCHEMA, frame)
    assert inputs[HISTORY].tolist() == [["i1", "", ""], ["i1", "i2", ""], ["", "", ""]]
    assert inputs["tags"].tolist() == [["x", ""], ["", ""], ["x", "y"]]
    assert inputs["price"].dtype == np.float32
    assert DNN(SCHEMA, vocabs, CONFIG)({k: tf.constant(v) for k, v in inputs.items()}).shape == (3,)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_numeric_stats_standardize_as_x_minus_mean_over_std(model_type):
    # Stats [1, 0.5] on prices x give the logits stats [0, 1] give on (x - 1) / 0.5, same weights.
    keras.utils.set_random_seed(0)
    scaled = build_ranker(model_type, SCHEMA, VOCABS, CONFIG, numeric_stats={"price": [1.0, 0.5]})
    plain = build_ranker(model_type, SCHEMA, VOCABS, CONFIG)
    batch = _tensors(_batch())
    got = scaled(batch).numpy()
    plain(batch)
    plain.set_weights(scaled.get_weights())
    standardized = dict(batch, price=(batch["price"] - 1.0) / 0.5)  # prices 1, 2, 0.5 → 0, 2, -1
    np.testing.assert_allclose(got, plain(standardized).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scaled.lookup(batch)["price"].numpy(), [0.0, 2.0, -1.0], atol=1e-6)
    assert not np.allclose(got, plain(batch).numpy(), atol=1e-4)  # the logits depend on the price


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="lacks"):
        DNN(SCHEMA, {USER_ID: ["u1"]}, CONFIG)
    with pytest.raises(ValueError, match="coaction_item_features"):
        CAN(SCHEMA, VOCABS, RankingConfig(coaction_item_features=("age",)))
    with pytest.raises(ValueError, match="model_type"):
        build_ranker("xgboost", SCHEMA, VOCABS)
    with pytest.raises(ValueError, match="combine_orders"):
        RankingConfig(combine_orders="max")
    with pytest.raises(ValueError, match="coaction_initializer"):
        RankingConfig(coaction_initializer="golden")
    for bad in (-0.1, float("nan"), "0.1", True):
        with pytest.raises(ValueError, match=f"`coaction_l2` should be a finite number >= 0. Received: "
                                             f"coaction_l2={bad!r}"):
            RankingConfig(coaction_l2=bad)
    with pytest.raises(ValueError, match="Unknown ranking config"):
        RankingConfig.from_dict({"embedding_size": 3})
    with pytest.raises(ValueError, match="price"):
        DNN(SCHEMA, VOCABS, CONFIG)({k: v for k, v in _tensors(_batch()).items() if k != "price"})
    for stats in ([1.0, 0.0], [1.0, float("nan")], [float("nan"), 1.0], [1.0, float("inf")]):
        with pytest.raises(ValueError, match=rf"`numeric_stats\['price'\]` should be .* Received: "
                                             rf"numeric_stats\['price'\]=\[{stats[0]}, {stats[1]}\]"):
            DNN(SCHEMA, VOCABS, CONFIG, numeric_stats={"price": stats})
    no_seq = Schema(user_features=(Feature(USER_ID, Kind.CATEGORICAL, "user"),),
                    item_features=(Feature(ITEM_ID, Kind.CATEGORICAL, "item"),))
    with pytest.raises(ValueError, match="sequence"):
        DIN(no_seq, {USER_ID: ["u"], ITEM_ID: ["i"]}, CONFIG)
    with pytest.raises(ValueError, match="no user feature"):
        CAN(no_seq, {USER_ID: ["u"], ITEM_ID: ["i"]}, CONFIG)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_coaction_l2_penalizes_exactly_the_coaction_tables(model_type):
    """λ·Σw² over CAN's induction and feed tables or the Cartesian cross tables, in the
    training loss; nothing for DNN and DIN, and nothing at λ = 0."""
    config = RankingConfig(**{**CONFIG.to_dict(), "coaction_l2": 0.01})
    model = build_ranker(model_type, SCHEMA, VOCABS, config)
    x, y = _tensors(_batch()), tf.constant([1.0, 0.0, 1.0])
    logits = model(x)
    tables = {"can": lambda m: [*m.induction_embeddings.values(), *m.feed_embeddings.values()],
              "cartesian": lambda m: list(m.cross_embeddings.values())}.get(model_type, lambda m: [])(model)
    penalty = 0.01 * sum(float(np.sum(t.embeddings.numpy().astype(np.float64) ** 2)) for t in tables)
    assert sum(t.input_dim * t.output_dim for t in tables) == model.coaction_parameter_count()
    assert (float(tf.add_n(model.losses)) if model.losses else 0.0) == pytest.approx(penalty, rel=1e-5)
    if model_type in ("can", "cartesian"):
        assert penalty > 0
    bce = float(tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits)))
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=3, epochs=1, verbose=0)
    assert history.history["loss"][0] == pytest.approx(bce + penalty, rel=1e-5)
    unpenalized = build_ranker(model_type, SCHEMA, VOCABS, CONFIG)
    unpenalized(x)
    assert not unpenalized.losses


def test_export_then_load_in_a_fresh_process_gives_the_same_scores(tmp_path):
    model = CAN(SCHEMA, VOCABS, CONFIG)
    batch = _batch()
    model(_tensors(batch))
    user = {USER_ID: np.array(["u2"], object), "age": np.array(["b"], object),
            HISTORY: np.array([["i3", "i1", ""]], object)}
    items = {k: batch[k] for k in (ITEM_ID, "category", "tags", "price")}
    want = model.score_candidates(user, items).numpy()
    path = str(tmp_path / "ranker")
    export_ranker(model, path)
    inputs = {k: v.tolist() for k, v in {**user, **items}.items()}
    code = f"""
import json
from models.tf_compat import tf
fn = tf.saved_model.load({path!r}).signatures["serving_default"]
inputs = json.loads({json.dumps(json.dumps(inputs))})
out = fn(**{{k: tf.constant(v, tf.float32 if k == "price" else tf.string) for k, v in inputs.items()}})
many = tf.saved_model.load({path!r}).signatures["score_users"](
    **{{k: tf.constant(v, tf.float32 if k == "price" else tf.string) for k, v in inputs.items()}},
    user_index=tf.zeros([len(inputs["item_id"])], tf.int32))
loaded = tf.saved_model.load({path!r})
tensors = {{k: tf.constant(v, tf.float32 if k == "price" else tf.string) for k, v in inputs.items()}}
encoded = loaded.signatures["encode_items"](**{{k: tensors[k] for k in ("item_id", "category", "tags", "price")}})
by_ids = loaded.signatures["score_users_encoded"](**{{k: tensors[k] for k in ("user_id", "age", "history")}},
                                                  **encoded, user_index=tf.zeros([len(inputs["item_id"])], tf.int32))
print(json.dumps({{**{{k: v.numpy().tolist() for k, v in out.items()}}, "many": many["scores"].numpy().tolist(),
                  "encoded": by_ids["scores"].numpy().tolist()}}))
"""
    proc = python_subprocess(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(got["scores"], want, rtol=1e-6)
    np.testing.assert_allclose(got["many"], want, rtol=1e-6)
    np.testing.assert_allclose(got["encoded"], want, rtol=1e-6)
    np.testing.assert_allclose(got["logits"], np.log(want / (1 - want)), rtol=1e-4, atol=1e-5)
    assert os.path.exists(os.path.join(path, "saved_model.pb"))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_several_users_in_one_call_score_as_each_user_alone(model_type, tmp_path):
    """`candidate_logits(..., user_index)` and the exported ``score_users`` signature give
    every candidate the score it gets in its own user's one-user call."""
    model = build_ranker(model_type, SCHEMA, VOCABS, CONFIG)
    batch = _batch()
    model(_tensors(batch))
    users = {k: batch[k] for k in (USER_ID, "age", HISTORY)}  # 3 users
    items = {k: np.concatenate([batch[k], batch[k][::-1]]) for k in (ITEM_ID, "category", "tags", "price")}
    owner = np.array([2, 0, 0, 1, 2, 0], np.int32)  # any order, repeats, every user
    alone = np.array([model.candidate_logits({k: v[o:o + 1] for k, v in _tensors(users).items()},
                                             {k: v[i:i + 1] for k, v in _tensors(items).items()}).numpy()[0]
                      for i, o in enumerate(owner)])
    together = model.candidate_logits(_tensors(users), _tensors(items), user_index=tf.constant(owner)).numpy()
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    path = str(tmp_path / "ranker")
    export_ranker(model, path)
    loaded = tf.saved_model.load(path)
    assert set(loaded.signatures) == {"serving_default", "score_users", "encode_items", "score_users_encoded"}
    out = loaded.signatures["score_users"](**_tensors(users), **_tensors(items), user_index=tf.constant(owner))
    np.testing.assert_allclose(out["logits"].numpy(), alone, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["scores"].numpy(), 1 / (1 + np.exp(-alone)), rtol=1e-5)
    # Items encoded once (vocabulary ids, standardized numbers), then scored from the ids.
    encoded = loaded.signatures["encode_items"](**_tensors(items))
    assert set(encoded) == set(items)
    assert encoded[ITEM_ID].dtype == tf.int32 and encoded["tags"].shape == items["tags"].shape
    assert encoded["price"].dtype == tf.float32
    np.testing.assert_array_equal(encoded[ITEM_ID].numpy(), model.lookup(_tensors(items), "item")[ITEM_ID].numpy())
    # Rows of the encoded table are gathered in any order, as the server does.
    rows = np.array([5, 0, 3, 3, 1, 2])
    out = loaded.signatures["score_users_encoded"](**_tensors(users), **{k: tf.gather(v, rows) for k, v in
                                                                        encoded.items()},
                                                   user_index=tf.constant(owner[rows]))
    np.testing.assert_allclose(out["logits"].numpy(), alone[rows], rtol=1e-5, atol=1e-6)
