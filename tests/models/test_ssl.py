import math

import numpy as np
import pytest

from models import ssl
from models.tf_compat import keras, tf


def test_loss_identity_views_matches_hand_computed_softmax():
    # Two orthogonal unit rows, identical views, tau = 0.5:
    # logits = [[2, 0], [0, 2]] → loss = -log(e^2 / (e^2 + 1)) = log(1 + e^-2).
    x = tf.constant([[1.0, 0.0], [0.0, 3.0]])
    got = float(ssl.contrastive_loss(x, x, 0.5))
    assert got == pytest.approx(np.log1p(np.exp(-2.0)), rel=1e-6)


def test_loss_matches_numpy_reference():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    logits = an @ bn.T / 0.1
    ref = np.mean(np.log(np.exp(logits).sum(1)) - np.diag(logits))
    got = float(ssl.contrastive_loss(tf.constant(a, tf.float32), tf.constant(b, tf.float32), 0.1))
    assert got == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_loss_and_task_reject_a_temperature_that_is_not_finite_and_positive(temperature):
    message = rf"`temperature` should be a finite number > 0. Received: temperature={temperature}$"
    with pytest.raises(ValueError, match=message):
        ssl.contrastive_loss(tf.ones((2, 2)), tf.ones((2, 2)), temperature)
    with pytest.raises(ValueError, match=message):
        ssl.ItemSelfSupervision([4, 4], masking="independent", temperature=temperature)


def test_uniform_item_stream_is_uniform_chi_square():
    num_items = 10
    ds = ssl.uniform_item_dataset({"item_id": np.arange(num_items)}, batch_size=500, seed=7)
    draws = np.concatenate([b["item_id"].numpy() for b in ds.take(20)])
    counts = np.bincount(draws, minlength=num_items)
    expected = draws.size / num_items
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 27.88  # chi-square critical value, 9 dof, p = 0.001
    # A stream skewed toward item 0 (as interaction batches are) fails the same check.
    skewed = np.bincount(np.minimum(np.random.default_rng(0).zipf(2.0, draws.size) - 1, 9), minlength=10)
    assert float(np.sum((skewed - expected) ** 2 / expected)) > 27.88


def test_feature_masking_replaces_only_masked_slices_and_roundtrips():
    layer = ssl.FeatureMasking([2, 1, 3])
    assert ssl.FeatureMasking.from_config(layer.get_config()).feature_sizes == [2, 1, 3]
    layer.defaults.assign([10.0, 11.0, 12.0, 13.0, 14.0, 15.0])
    emb = tf.reshape(tf.range(12, dtype=tf.float32), (2, 6))
    out = layer(emb, tf.constant([False, True, True])).numpy()
    np.testing.assert_allclose(out, [[0, 1, 12, 13, 14, 15], [6, 7, 12, 13, 14, 15]])
    with pytest.raises(ValueError, match="feature_sizes"):
        ssl.FeatureMasking([2, 0])


@pytest.mark.parametrize("masking", ["random", "correlated"])
@pytest.mark.parametrize("k", [2, 5, 7, 8])
def test_in_graph_masks_are_complementary_and_redrawn(masking, k):
    mi = np.random.default_rng(k).random((k, k))
    draw = tf.function(lambda: ssl.draw_masks(masking, k, mi + mi.T))
    seen = set()
    for _ in range(40):
        a, b = (x.numpy() for x in draw())
        assert not np.any(a & b) and np.all(a | b)
        assert a.sum() == k // 2
        seen.add(tuple(a))
    assert len(seen) > 1  # a new pattern every call, also inside tf.function


def test_in_graph_cfm_masks_planted_group_together():
    mi = np.full((6, 6), 0.01)
    mi[:3, :3] = 1.0
    mi[3:, 3:] = 1.0
    for _ in range(50):
        a, b = (x.numpy() for x in ssl.draw_masks("correlated", 6, mi))
        assert not np.any(a & b) and np.all(a | b)
        assert sorted(np.flatnonzero(a)) in ([0, 1, 2], [3, 4, 5])


def test_in_graph_cfm_puts_the_seed_in_its_group_even_when_its_own_mi_is_not_the_largest():
    # Zero diagonal: the seed's own score is below its partners' and the other block's, so
    # only the forced seed keeps the group whole. Seed 0: partners 1, 2 (MI 1) + seed = [0, 1, 2];
    # ranked by MI alone it would be [1, 2, 3] (0.01 beats the diagonal's 0).
    mi = np.full((6, 6), 0.01)
    mi[:3, :3] = 1.0
    mi[3:, 3:] = 1.0
    np.fill_diagonal(mi, 0.0)
    groups = set()
    for _ in range(50):
        a, b = (x.numpy() for x in ssl.draw_masks("correlated", 6, mi))
        assert not np.any(a & b) and np.all(a | b)
        group = sorted(np.flatnonzero(a).tolist())
        assert group in ([0, 1, 2], [3, 4, 5])
        groups.add(tuple(group))
    assert len(groups) == 2  # seeds from both blocks were drawn


def test_independent_and_no_masking():
    pairs = [tuple(x.numpy() for x in ssl.draw_masks("independent", 6)) for _ in range(50)]
    assert any(np.any(a & b) for a, b in pairs)  # not complementary
    a, b = ssl.draw_masks("none", 4)
    assert not a.numpy().any() and not b.numpy().any()
    with pytest.raises(ValueError, match="mutual_information"):
        ssl.draw_masks("correlated", 4)
    with pytest.raises(ValueError, match="masking"):
        ssl.draw_masks("half", 4)


def test_mutual_information_matrix_adds_item_id_by_entropy():
    mi = [[1.5, 0.7], [0.7, 2.0]]  # entropies on the diagonal
    out = ssl.mutual_information_matrix(["item_id", "category", "price", "brand"], ["category", "brand"], mi)
    np.testing.assert_allclose(out, [[0.0, 1.5, 0.0, 2.0],
                                     [1.5, 1.5, 0.0, 0.7],
                                     [0.0, 0.0, 0.0, 0.0],
                                     [2.0, 0.7, 0.0, 2.0]])
    with pytest.raises(ValueError, match="2x2"):
        ssl.mutual_information_matrix(["category"], ["category", "brand"], [[1.0]])


def test_normalized_mutual_information_matrix_by_hand():
    mi = [[1.5, 0.7], [0.7, 2.0]]
    out = ssl.mutual_information_matrix(["item_id", "category", "price", "brand"], ["category", "brand"], mi,
                                        normalized=True, num_items=8)
    h_id = math.log(8)
    np.testing.assert_allclose(out, [[1.0, 1.5 / math.sqrt(h_id * 1.5), 0.0, 2.0 / math.sqrt(h_id * 2.0)],
                                     [1.5 / math.sqrt(h_id * 1.5), 1.0, 0.0, 0.7 / math.sqrt(3.0)],
                                     [0.0, 0.0, 0.0, 0.0],
                                     [2.0 / math.sqrt(h_id * 2.0), 0.7 / math.sqrt(3.0), 0.0, 1.0]])
    with pytest.raises(ValueError, match="num_items"):
        ssl.mutual_information_matrix(["item_id", "category"], ["category", "brand"], mi, normalized=True)


def test_normalized_mi_lets_cfm_group_a_hierarchy_without_the_id():
    # category ⊂ subcategory (MI = H(category)), color independent; 1,000 items. By MI the
    # id (MI(id; f) = H(f)) ties or beats every partner; normalized, category's closest
    # partner is subcategory, and color's is the id (it shares nothing with the others).
    names = ["item_id", "category", "subcategory", "color"]
    mi = [[2.3, 2.3, 0.0], [2.3, 3.9, 0.01], [0.0, 0.01, 1.6]]
    raw = ssl.mutual_information_matrix(names, names[1:], mi)
    nmi = ssl.mutual_information_matrix(names, names[1:], mi, normalized=True, num_items=1000)
    assert raw[2, 0] > raw[2, 1] and raw[1, 0] >= raw[1, 2]
    assert np.argmax(np.where(np.eye(4, dtype=bool), -1, nmi)[1]) == 2
    assert np.argmax(np.where(np.eye(4, dtype=bool), -1, nmi)[2]) == 1
    assert np.argmax(np.where(np.eye(4, dtype=bool), -1, nmi)[3]) == 0
    np.testing.assert_allclose(nmi, nmi.T)


def test_tf_value_dropout_keeps_one_and_rate():
    from models.towers import drop_values

    tf.random.set_seed(0)
    ids = tf.constant([[5, 6, 7, 0], [8, 0, 0, 0], [0, 0, 0, 0]] * 400)
    out = drop_values(ids, 0.9).numpy()
    assert np.all((out == 0) | (out == ids.numpy()))  # values only removed, never moved
    assert np.all((out != 0).sum(axis=1)[ids.numpy().any(axis=1)] >= 1)
    assert not out[2::3].any()
    kept = drop_values(ids, 0.3).numpy()
    frac = (kept[0::3] != 0).sum() / (3 * 400)
    assert 0.65 < frac < 0.76  # ~0.7 kept (the keep-one rescue adds ~1%)
    with pytest.raises(ValueError, match="rate"):
        drop_values(ids, 1.0)


def test_tf_value_dropout_at_a_high_rate_keeps_exactly_the_rescued_value():
    from models.towers import drop_values

    ids = tf.constant([[3, 4, 5, 0], [7, 0, 0, 0], [0, 0, 0, 0]])
    for seed in range(20):
        tf.random.set_seed(seed)
        out = drop_values(ids, 0.99).numpy()
        assert (out[0] != 0).sum() >= 1 and (out[1] != 0).sum() == 1
        assert np.all(out[2] == 0)
        assert np.all((out == 0) | (out == ids.numpy()))


def _tiny_two_tower(masking="none", value_dropout=0.0, share="full", ssl_weight=1.0):
    from models.features import ITEM_ID, USER_ID, Feature, Kind, Schema
    from models.towers import feature_sizes
    from models.two_tower import TwoTowerModel

    keras.utils.set_random_seed(0)
    schema = Schema(user_features=(Feature(USER_ID, Kind.CATEGORICAL, "user"),),
                    item_features=(Feature(ITEM_ID, Kind.CATEGORICAL, "item"),
                                   Feature("category", Kind.CATEGORICAL, "item"),
                                   Feature("tags", Kind.MULTI_CATEGORICAL, "item", max_length=3)))
    vocabs = {USER_ID: [f"u{k}" for k in range(6)], ITEM_ID: [f"i{k}" for k in range(12)],
              "category": ["c0", "c1", "c2"], "tags": ["t0", "t1", "t2", "t3"]}
    mi = np.eye(3) + 0.1
    task = ssl.ItemSelfSupervision(feature_sizes(schema.item_features, 4), masking=masking,
                                   mutual_information=mi if masking == "correlated" else None,
                                   value_dropout=value_dropout, temperature=0.5, share=share, output_dim=5)
    model = TwoTowerModel(schema, vocabs, embedding_dim=5, feature_dim=4, hidden_units=(6,), normalize=True,
                          temperature=0.5, ssl=task, ssl_weight=ssl_weight)
    batch = {USER_ID: tf.constant(["u0", "u1", "u2", "u3"]),
             ITEM_ID: tf.constant(["i0", "i3", "i5", "i7"]),
             "category": tf.constant(["c0", "c1", "c1", "c2"]),
             "tags": tf.constant([["t0", "t1", ""], ["t2", "", ""], ["t1", "t3", "t0"], ["t3", "", ""]])}
    return model, batch


def test_identity_views_give_the_softmax_spread_out_loss():
    model, batch = _tiny_two_tower(masking="none", value_dropout=0.0)
    items = {k: batch[k] for k in ("item_id", "category", "tags")}
    got = float(model.ssl(model.item_tower, items, training=True))
    z = model.item_tower(items).numpy()  # H = G and identity augmentations: both views are z
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    logits = z @ z.T / 0.5
    ref = -np.sum(np.diag(logits) - np.log(np.exp(logits).sum(axis=1)))  # Σ_i -log softmax_i(i)
    assert got == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("share", ["full", "partial"])
def test_gradients_reach_shared_tables_from_both_losses(share):
    model, batch = _tiny_two_tower(masking="random", value_dropout=0.3, share=share)
    model.compute_loss(batch, training=True)  # build
    items = {k: batch[k] for k in ("item_id", "category", "tags")}
    tables = [model.item_tower.item_embedding.embedding.embeddings,
              model.item_tower.embeddings["category"].embeddings, model.item_tower.embeddings["tags"].embeddings]
    with tf.GradientTape(persistent=True) as tape:
        main = model._main_loss(batch, training=True)
        self_loss = model.ssl(model.item_tower, items, training=True)
    for loss in (main, self_loss):
        for table in tables:
            g = tf.convert_to_tensor(tape.gradient(loss, table))
            assert float(tf.reduce_sum(tf.abs(g))) > 0, (table.name, loss)
    # The SSL loss trains the mask defaults; with partial sharing also its own head, not the tower output.
    assert tape.gradient(self_loss, model.ssl.feature_masking.defaults) is not None
    out_kernel = model.item_tower.mlp.layers[-1].kernel
    if share == "partial":
        assert tape.gradient(self_loss, out_kernel) is None
        assert tape.gradient(self_loss, model.ssl.head.kernel) is not None
    else:
        assert tape.gradient(self_loss, out_kernel) is not None


def test_total_loss_is_main_plus_weighted_ssl_and_uses_the_ssl_stream():
    model, batch = _tiny_two_tower(masking="none", ssl_weight=0.25)
    items = {k: batch[k] for k in ("item_id", "category", "tags")}
    total = float(model.compute_loss(batch, training=False))
    main = float(model._main_loss(batch, training=False))
    self_loss = float(model.ssl(model.item_tower, items, training=False))
    assert total == pytest.approx(main + 0.25 * self_loss, rel=1e-5)
    assert float(model.main_loss_tracker.result()) == pytest.approx(main, rel=1e-5)
    assert float(model.ssl_loss_tracker.result()) == pytest.approx(self_loss / 4, rel=1e-5)
    # With an ssl/ stream in the batch, the auxiliary task uses those items instead.
    other = {"item_id": tf.constant(["i9", "i10"]), "category": tf.constant(["c2", "c0"]),
             "tags": tf.constant([["t0", "", ""], ["t1", "t2", ""]])}
    streamed = dict(batch, **{ssl.SSL_PREFIX + k: v for k, v in other.items()})
    expected = main + 0.25 * float(model.ssl(model.item_tower, other, training=False))
    assert float(model.compute_loss(streamed, training=False)) == pytest.approx(expected, rel=1e-5)


def test_ssl_stream_with_a_repeated_item_does_not_use_its_copy_as_a_negative():
    model, batch = _tiny_two_tower(masking="none", ssl_weight=0.25)
    main = float(model._main_loss(batch, training=False))
    # "i9" twice: drawn with replacement, the stream repeats items.
    other = {"item_id": tf.constant(["i9", "i9", "i10"]), "category": tf.constant(["c2", "c2", "c0"]),
             "tags": tf.constant([["t0", "", ""], ["t0", "", ""], ["t1", "t2", ""]])}
    streamed = dict(batch, **{ssl.SSL_PREFIX + k: v for k, v in other.items()})
    total = float(model.compute_loss(streamed, training=False))
    z = model.item_tower(other)  # no masking, no dropout: both views are the tower's output
    with_ids = 3 * float(ssl.contrastive_loss(z, z, 0.5, ids=other["item_id"]))  # Σ over the 3 pairs
    without_ids = 3 * float(ssl.contrastive_loss(z, z, 0.5))
    assert total == pytest.approx(main + 0.25 * with_ids, rel=1e-5)
    assert with_ids < without_ids - 0.1  # the copy, as a negative, would tie with the positive


def test_value_dropout_drops_tags_in_each_view_by_brute_force():
    # No masking, value dropout 0.9: each view's row i is the tower's output on row i with a
    # non-empty subset of its tags kept, and under a fixed seed some views lose tags.
    from itertools import combinations

    model, batch = _tiny_two_tower(masking="none", value_dropout=0.9)
    items = {k: batch[k] for k in ("item_id", "category", "tags")}
    z = model.item_tower(items).numpy()
    tags = [[t for t in row if t] for row in batch["tags"].numpy().astype(str).tolist()]
    tf.random.set_seed(5)
    views = [v.numpy() for v in model.ssl.views(model.item_tower, items, training=True)]
    proper = 0
    for i, row in enumerate(tags):
        subsets = [list(c) for k in range(1, len(row) + 1) for c in combinations(row, k)]
        variants = {"item_id": tf.repeat(items["item_id"][i:i + 1], len(subsets)),
                    "category": tf.repeat(items["category"][i:i + 1], len(subsets)),
                    "tags": tf.constant([s + [""] * (3 - len(s)) for s in subsets])}
        outputs = model.item_tower(variants).numpy()
        for view in views:
            match = [k for k in range(len(subsets)) if np.allclose(view[i], outputs[k], atol=1e-5)]
            assert match, (i, view[i])
            proper += len(subsets[match[0]]) < len(row)
    assert proper >= 2  # rows with 2 and 3 tags keep all of them with probability 0.01 and 0.001
    assert not np.allclose(views[0], z, atol=1e-5) or not np.allclose(views[1], z, atol=1e-5)
    # Without training (or at rate 0) both views are the tower's output.
    for view in model.ssl.views(model.item_tower, items, training=False):
        np.testing.assert_allclose(view.numpy(), z, rtol=1e-5, atol=1e-6)


def test_fit_logs_both_loss_components():
    model, batch = _tiny_two_tower(masking="correlated", value_dropout=0.2)
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    ds = tf.data.Dataset.from_tensors(batch).repeat(3)
    stream = ssl.uniform_item_dataset({"item_id": np.array([f"i{k}" for k in range(12)]),
                                       "category": np.array(["c0", "c1", "c2"] * 4),
                                       "tags": np.array([["t0", "", ""]] * 12)}, batch_size=6, seed=0)
    hist = model.fit(ssl.with_ssl_items(ds, stream), epochs=2, verbose=0)
    assert {"loss", "main_loss", "ssl_loss"} <= set(hist.history)
    assert np.isfinite(hist.history["ssl_loss"]).all()


def test_self_supervision_config_round_trip_and_errors():
    task = ssl.ItemSelfSupervision([4, 4, 1], masking="correlated", mutual_information=np.eye(3),
                                   value_dropout=0.1, temperature=0.2, share="partial", output_dim=8)
    clone = ssl.ItemSelfSupervision.from_config(task.get_config())
    assert clone.get_config() == task.get_config()
    with pytest.raises(ValueError, match="mutual_information"):
        ssl.ItemSelfSupervision([4, 4], masking="correlated")
    with pytest.raises(ValueError, match="mutual_information"):
        ssl.ItemSelfSupervision([4, 4], masking="correlated", mutual_information=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="3x3"):
        ssl.ItemSelfSupervision([4, 4, 4], masking="correlated", mutual_information=np.eye(2))
    with pytest.raises(ValueError, match="output_dim"):
        ssl.ItemSelfSupervision([4, 4], masking="random", share="partial")
    with pytest.raises(ValueError, match="share"):
        ssl.ItemSelfSupervision([4, 4], masking="random", share="half")


def test_loss_does_not_use_copies_of_the_same_item_as_negatives():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    ids = tf.constant(["x", "y", "x", "z"])
    got = float(ssl.contrastive_loss(tf.constant(a), tf.constant(b), 0.5, ids=ids))
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    logits = an @ bn.T / 0.5
    keep = np.ones((4, 4), bool)
    keep[0, 2] = keep[2, 0] = False  # rows 0 and 2 are the same item
    ref = np.mean([np.log(np.exp(logits[i][keep[i]]).sum()) - logits[i, i] for i in range(4)])
    assert got == pytest.approx(ref, rel=1e-5)
    assert got < float(ssl.contrastive_loss(tf.constant(a), tf.constant(b), 0.5))


SSL_WITH_CBNS_ON_TWO_REPLICAS = r"""
import json, numpy as np
from models.tf_compat import keras, tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from models import ssl
from models.cross_batch_retrieval import CrossBatchRetrieval
from models.features import ITEM_ID, USER_ID, Feature, Kind, Schema
from models.towers import feature_sizes
from models.two_tower import TwoTowerModel

schema = Schema(user_features=(Feature(USER_ID, Kind.CATEGORICAL, "user"),),
                item_features=(Feature(ITEM_ID, Kind.CATEGORICAL, "item"),
                               Feature("category", Kind.CATEGORICAL, "item"),
                               Feature("tags", Kind.MULTI_CATEGORICAL, "item", max_length=2)))
items = np.array([f"i{k}" for k in range(30)])
cats = np.array([f"c{k % 3}" for k in range(30)])
tags = np.array([[f"t{k % 4}", ""] for k in range(30)])
vocabs = {USER_ID: [f"u{k}" for k in range(10)], ITEM_ID: list(items), "category": ["c0", "c1", "c2"],
          "tags": ["t0", "t1", "t2", "t3"]}
keras.utils.set_random_seed(0)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    task = ssl.ItemSelfSupervision(feature_sizes(schema.item_features, 4), masking="correlated",
                                   mutual_information=np.eye(3) + 0.1, value_dropout=0.3, temperature=0.2)
    model = TwoTowerModel(schema, vocabs, embedding_dim=4, feature_dim=4, hidden_units=(8,),
                          task=CrossBatchRetrieval(4, memory_size=16, warmup_steps=2), ssl=task, ssl_weight=0.5)
    model.compile(optimizer=keras.optimizers.Adam(0.01))
rng = np.random.default_rng(0)
pick = rng.integers(0, 30, 96)
train = tf.data.Dataset.from_tensor_slices({USER_ID: np.array([f"u{k}" for k in rng.integers(0, 10, 96)]),
                                            ITEM_ID: items[pick], "category": cats[pick], "tags": tags[pick]})
stream = ssl.uniform_item_dataset({ITEM_ID: items, "category": cats, "tags": tags}, batch_size=8, seed=0)
ds = ssl.with_ssl_items(train.batch(16, drop_remainder=True), stream)
hist = model.fit(ds, epochs=2, verbose=0)
print(json.dumps({"replicas": strategy.num_replicas_in_sync, "count": int(model.task.memory.count.numpy()),
                  **{k: [float(x) for x in v] for k, v in hist.history.items()}}))
"""


def test_ssl_trains_with_the_memory_bank_on_two_replicas():
    import json

    from conftest import python_subprocess

    proc = python_subprocess(SSL_WITH_CBNS_ON_TWO_REPLICAS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2 and out["count"] == 16
    assert np.isfinite(out["ssl_loss"]).all() and np.isfinite(out["main_loss"]).all()
    assert out["ssl_loss"][-1] > 0
