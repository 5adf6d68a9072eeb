"""Every Keras object defined under `models/` round-trips through its config.

For each class: `get_config()` is JSON-serializable, `from_config(get_config())` gives
the same config, the object is registered (Keras rebuilds it by its registered name,
without `custom_objects`), and a clone given the original's weights computes the same
outputs on a small input (losses: the same value on a small batch).
"""

import importlib
import inspect
import json
import pkgutil
import types

import numpy as np
import pytest

import models
from models.features import HISTORY, ITEM_ID, USER_ID
from models.tf_compat import keras, tf
from tiny_schema import SCHEMA, VOCABS

ITEM_NAMES = [f.name for f in SCHEMA.item_features]
USER_NAMES = [f.name for f in SCHEMA.user_features]
KERAS_BASES = (keras.layers.Layer, keras.losses.Loss, keras.metrics.Metric, keras.callbacks.Callback,
               keras.initializers.Initializer, keras.regularizers.Regularizer, keras.constraints.Constraint)


def _batch():
    return {USER_ID: tf.constant(["u1", "u9", "u2"]), "age": tf.constant(["a", "b", ""]),
            HISTORY: tf.constant([["i1", "i2", ""], ["", "", ""], ["i3", "", ""]]),
            ITEM_ID: tf.constant(["i1", "i3", "zz"]), "category": tf.constant(["c1", "c2", "c1"]),
            "tags": tf.constant([["t1", ""], ["t1", "t2"], ["", ""]]),
            "price": tf.constant([1.0, 2.0, 0.5])}


def _side(side):
    names = USER_NAMES if side == "user" else ITEM_NAMES
    return {k: v for k, v in _batch().items() if k in names}


def _seeded(fn):
    """`fn` after resetting every random seed (for objects that draw in their call)."""
    keras.utils.set_random_seed(3)
    return fn()


# -- constructors and calls, one per class ---------------------------------------------
def _cross_batch_memory():
    from models.cross_batch_memory import CrossBatchMemory

    memory = CrossBatchMemory(5, 3, name="memory")
    memory.enqueue(tf.ones([2, 3]), tf.constant([-1.0, -2.0]), tf.constant([7, 8], tf.int64))
    return memory


def _cross_batch_retrieval():
    from models.cross_batch_retrieval import CrossBatchRetrieval

    task = CrossBatchRetrieval(3, memory_size=4, warmup_steps=0, temperature=0.5, drift_correction="none")
    _call_retrieval(task, training=True)  # fills the bank
    return task


def _call_retrieval(task, training=False):
    rng = np.random.default_rng(0)
    q = tf.constant(rng.normal(size=(3, 3)), tf.float32)
    c = tf.constant(rng.normal(size=(3, 3)), tf.float32)
    return task(q, c, tf.constant(["a", "b", "c"]), tf.math.log(tf.constant([0.2, 0.3, 0.5])), training=training)


def _item_tower():
    from models.towers import Tower

    return Tower(SCHEMA, "item", VOCABS, feature_dim=4, hidden_units=(6,), output_dim=5,
                 numeric_stats={"price": [1.0, 0.5]}, name="item_tower")


def _feature_drift():
    from models.feature_drift import FeatureDriftCallback

    items = {k: v.numpy() for k, v in _side("item").items()}
    return FeatureDriftCallback(_item_tower(), items, every_n_steps=5, deltas=(1, 3))


def _epoch_learning_rate():
    from models.learning_rate import EpochLearningRate

    return EpochLearningRate(0.5, "step", 4, decay=0.1, boundaries=(1, 3))


def _learning_rates(callback):
    callback.set_model(types.SimpleNamespace(optimizer=types.SimpleNamespace(learning_rate=tf.Variable(0.0))))
    for epoch in range(callback.epochs):
        callback.on_epoch_begin(epoch)
    return callback.history


_SSL_TOWER = []


def _ssl_tower():
    """One item tower shared by the original and the clone (the task does not own it)."""
    if not _SSL_TOWER:
        _SSL_TOWER.append(_item_tower())
    return _SSL_TOWER[0]


def _item_ssl(masking="correlated", share="partial"):
    from models.ssl import ItemSelfSupervision

    sizes = _ssl_tower().feature_sizes()
    return ItemSelfSupervision(sizes, masking=masking, mutual_information=np.eye(len(sizes)) + 0.1,
                               value_dropout=0.0, temperature=0.5, share=share, output_dim=5, name="item_ssl")


def _call_ssl(task):
    items = _side("item")
    return _seeded(lambda: task(_ssl_tower(), items, training=False, item_ids=items[ITEM_ID]))


def _ranking_config():
    from models.ranking.models import RankingConfig

    return RankingConfig(embedding_dim=4, hidden_units=(8,), coaction_feed_dim=3, coaction_layer_sizes=(2, 2),
                         coaction_orders=2, attention_units=(4,), cartesian_max_buckets=10)


def _ranker(name):
    from models.ranking import models as ranking

    return lambda: getattr(ranking, name)(SCHEMA, VOCABS, _ranking_config(), numeric_stats={"price": [1.0, 0.5]})


def _two_tower(full):
    from models.cross_batch_retrieval import CrossBatchRetrieval
    from models.features import padded_batch
    from models.logq import ItemLogQ
    from models.ssl import ItemSelfSupervision
    from models.towers import feature_sizes
    from models.two_tower import TwoTowerModel

    if not full:
        return TwoTowerModel(SCHEMA, VOCABS, embedding_dim=4, feature_dim=4, hidden_units=(6,), temperature=0.5)
    corpus = padded_batch(SCHEMA, "item", [{ITEM_ID: i, "category": "c1", "tags": ["t1"], "price": 1.0}
                                           for i in VOCABS[ITEM_ID]])
    ssl = ItemSelfSupervision(feature_sizes(SCHEMA.item_features, 4), masking="random", temperature=0.5,
                              share="partial", output_dim=4, name="item_ssl")
    return TwoTowerModel(SCHEMA, VOCABS, item_log_q=ItemLogQ(VOCABS[ITEM_ID], [0.2, 0.3, 0.5], name="item_log_q"),
                         embedding_dim=4, feature_dim=4, hidden_units=(6,), normalize=True, temperature=0.5,
                         numeric_stats={"price": [1.0, 0.5]}, dropout=0.1,
                         task=CrossBatchRetrieval(4, memory_size=6, temperature=0.5, name="task"),
                         corpus=corpus, num_mixed_negatives=2, ssl=ssl, ssl_weight=0.3,
                         history_pooling="attention", embedding_l2=0.01, query_dropout=0.2)


def _call_two_tower(model):
    batch = _batch()
    loss = _seeded(lambda: model.compute_loss(batch, training=False))
    return [model.query_tower(_side("user")), model.item_tower(_side("item")), loss]


def _loss_inputs():
    return tf.constant([1.0, 0.0, 1.0, 0.0]), tf.constant([0.5, -1.0, 2.0, 0.1])


def _cases():
    from models.preranking.autofas import AutoFASSearch, FeatureMask, MixOp
    from models.preranking.embedding import FeatureEmbedding
    from models.preranking.losses import DistillationLoss
    from models.preranking.preranker import PreRanker
    from models.ranking.co_action import CoActionUnit, induction_dim
    from models.ranking.losses import BinaryCrossEntropy, FocalLoss, GHMCLoss
    from models.ranking.models import TargetAttentionPooling
    from models.logq import ItemLogQ
    from models.ssl import FeatureMasking
    from models.towers import MaskedAttentionPooling, MaskedMeanPooling, SharedItemEmbedding, Tower

    rng = np.random.default_rng(1)
    emb = tf.constant(rng.normal(size=(2, 3, 4)), tf.float32)
    ids = tf.constant([[3, 4, 0], [0, 0, 0]])
    unit_dim = induction_dim(3, (2, 2), orders=2, num_feeds=2, combination_independent=True)
    p_induction = tf.constant(rng.normal(size=(2, unit_dim)), tf.float32)
    feeds = [tf.constant(rng.normal(size=(2, 3)), tf.float32), tf.constant(rng.normal(size=(2, 4, 3)), tf.float32)]
    feed_masks = [None, tf.constant([[True, True, False, False], [True, False, False, False]])]
    y, z = _loss_inputs()
    preranker_features = [USER_ID, HISTORY, ITEM_ID, "tags", "price"]
    # name → (constructor, call returning the outputs to compare)
    return {
        "CrossBatchMemory": (_cross_batch_memory, lambda m: m.read()),
        "CrossBatchRetrieval": (_cross_batch_retrieval, _call_retrieval),
        "FeatureDriftCallback": (_feature_drift, lambda cb: cb.item_model(cb.item_features)),
        "EpochLearningRate": (_epoch_learning_rate, _learning_rates),
        "ItemLogQ": (lambda: ItemLogQ(["i1", "i2", "i3"], [0.0, 0.3, 0.7], name="item_log_q"),
                     lambda layer: layer(tf.constant(["i1", "i3", "zz"]))),
        "FeatureMask": (lambda: FeatureMask(3, 0.7, 0.4, name="mask"),
                        lambda layer: layer([tf.ones([2, 2]), tf.ones([2, 1]), tf.ones([2, 3])])),
        "MixOp": (lambda: MixOp((0, 4), 6, name="mixop"), lambda layer: layer(emb[:, 0, :])),
        "AutoFASSearch": (lambda: AutoFASSearch(SCHEMA, VOCABS, embedding_dim=4, num_mixops=2, operator_widths=(0, 4),
                                                initial_probability=0.8, keep_threshold=0.4,
                                                numeric_stats={"price": [1.0, 0.5]}, name="search"),
                          lambda model: model(_batch())),
        "FeatureEmbedding": (lambda: FeatureEmbedding(SCHEMA, VOCABS, [USER_ID, HISTORY, "tags", "price"], 4,
                                                      {"price": [1.0, 0.5]}, name="features"),
                             lambda layer: layer(_batch())),
        "DistillationLoss": (lambda: DistillationLoss(0.25), lambda loss: loss(tf.stack([y, 2.0 * z], axis=1), z)),
        "PreRanker": (lambda: PreRanker(SCHEMA, VOCABS, preranker_features, (6, 3), embedding_dim=4,
                                        numeric_stats={"price": [1.0, 0.5]}, name="preranker"),
                      lambda model: model(_batch())),
        "CoActionUnit": (lambda: CoActionUnit(3, (2, 2), use_bias=True, activation="tanh", orders=2,
                                              order_independent=False, num_feeds=2, combination_independent=True,
                                              combine_orders="sum", sequence_pooling="coaction_then_mean"),
                         lambda unit: unit(p_induction, feeds, feed_masks)),
        "BinaryCrossEntropy": (lambda: BinaryCrossEntropy(name="bce"), lambda loss: loss(y, z)),
        "FocalLoss": (lambda: FocalLoss(alpha=0.4, gamma=1.5), lambda loss: loss(y, z)),
        "GHMCLoss": (lambda: GHMCLoss(num_bins=10, momentum=0.5, density_normalization="num_bins"),
                     lambda loss: loss(y, z)),
        "TargetAttentionPooling": (lambda: TargetAttentionPooling((4,), name="attention"),
                                   lambda layer: layer(emb[:, 0, :], emb, ids)),
        "RankingModel": (_ranker("RankingModel"), lambda model: model(_batch())),
        "DNN": (_ranker("DNN"), lambda model: model(_batch())),
        "DIN": (_ranker("DIN"), lambda model: model(_batch())),
        "CartesianDNN": (_ranker("CartesianDNN"), lambda model: model(_batch())),
        "CAN": (_ranker("CAN"), lambda model: model(_batch())),
        "FeatureMasking": (lambda: FeatureMasking([2, 1], name="masking"),
                           lambda layer: layer(emb[:, :, 0], tf.constant([True, False]))),
        "ItemSelfSupervision": (_item_ssl, _call_ssl),
        "MaskedMeanPooling": (lambda: MaskedMeanPooling(name="pool"), lambda layer: layer(emb, ids)),
        "MaskedAttentionPooling": (lambda: MaskedAttentionPooling(3, name="attention"), lambda layer: layer(emb, ids)),
        "SharedItemEmbedding": (lambda: SharedItemEmbedding(VOCABS[ITEM_ID], 3, name="shared"),
                                lambda layer: layer(tf.constant(["i1", "zz", ""]))),
        "Tower": (lambda: Tower(SCHEMA, "user", VOCABS, feature_dim=4, hidden_units=(6,), output_dim=5, normalize=True,
                                dropout=0.1, history_pooling="attention", name="query_tower"),
                  lambda model: model(_side("user"))),
        "Tower-item": (_item_tower, lambda model: model(_side("item"))),
        "TwoTowerModel": (lambda: _two_tower(full=True), _call_two_tower),
        "TwoTowerModel-default-task": (lambda: _two_tower(full=False), _call_two_tower),
    }


CASES = _cases()


def _holder(obj):
    """The Keras layer holding the object's weights (a callback's model), or None."""
    if isinstance(obj, keras.layers.Layer):
        return obj
    return getattr(obj, "item_model", None)


def _perturb(layer):
    """Moves every float weight off its initial value (zeros stay zeros in a fresh clone otherwise)."""
    rng = np.random.default_rng(2)
    layer.set_weights([w + rng.normal(scale=0.3, size=w.shape).astype(w.dtype) if w.dtype.kind == "f" else w
                       for w in layer.get_weights()])


def _numpy(outputs):
    return [np.asarray(x) for x in tf.nest.flatten(outputs)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_round_trip_gives_an_equivalent_object(case):
    make, call = CASES[case]
    keras.utils.set_random_seed(0)
    original = make()
    call(original)  # builds the weights created on first call
    holder = _holder(original)
    if holder is not None and holder.weights:
        _perturb(holder)
    expected = _numpy(call(original))

    config = original.get_config()
    json.dumps(config)
    clone = type(original).from_config(json.loads(json.dumps(config)))
    assert type(clone) is type(original)
    assert clone.get_config() == config
    call(clone)
    if holder is not None:
        assert len(_holder(clone).weights) == len(holder.weights)
        _holder(clone).set_weights(holder.get_weights())
    got = _numpy(call(clone))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        if a.dtype.kind in "fc":
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", sorted(CASES))
def test_registered_name_rebuilds_the_object(case):
    original = CASES[case][0]()
    serialized = keras.saving.serialize_keras_object(original)
    assert serialized["registered_name"] == f"recfunnel>{type(original).__name__}"
    rebuilt = keras.saving.deserialize_keras_object(json.loads(json.dumps(serialized)))
    assert type(rebuilt) is type(original) and rebuilt.get_config() == original.get_config()


def test_every_keras_class_under_models_is_covered():
    found = set()
    for info in pkgutil.walk_packages(models.__path__, "models."):
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == info.name and issubclass(cls, KERAS_BASES):
                found.add(name)
    covered = {case.split("-")[0] for case in CASES}
    assert found == covered


def test_a_config_names_what_it_cannot_describe():
    import tensorflow_recommenders as tfrs

    from models.feature_drift import FeatureDriftCallback
    from models.two_tower import TwoTowerModel

    drift = FeatureDriftCallback(lambda features, training=False: features["x"], {"x": np.ones((2, 2), np.float32)})
    with pytest.raises(ValueError, match="item_model"):
        drift.get_config()
    model = TwoTowerModel(SCHEMA, VOCABS, embedding_dim=4, feature_dim=4, hidden_units=(6,),
                          task=tfrs.tasks.Retrieval(num_hard_negatives=2))
    with pytest.raises(ValueError, match="A `tfrs.tasks.Retrieval` task passed in cannot be described"):
        model.get_config()
