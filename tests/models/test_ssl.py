import numpy as np
import pytest

from models import ssl
from models.tf_compat import keras, tf


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [2, 5, 8])
def test_rfm_masks_are_complementary_and_cover_all(seed, k):
    a, b = ssl.random_feature_masks(k, np.random.default_rng(seed))
    assert not np.any(a & b)
    assert np.all(a | b)
    assert a.sum() == k // 2


def test_cfm_masks_planted_correlated_group_together():
    # features 0,1,2 strongly correlated with each other; 3,4,5 with each other.
    mi = np.full((6, 6), 0.01)
    mi[:3, :3] = 1.0
    mi[3:, 3:] = 1.0
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = ssl.correlated_feature_masks(mi, rng)
        assert not np.any(a & b) and np.all(a | b)
        masked = set(np.flatnonzero(a))
        assert masked in ({0, 1, 2}, {3, 4, 5})


def test_cfm_rejects_non_square():
    with pytest.raises(ValueError, match="mutual_information"):
        ssl.correlated_feature_masks(np.zeros((2, 3)), np.random.default_rng(0))


def test_dropout_keeps_at_least_one_value():
    ids = np.array([[3, 4, 5, 0], [7, 0, 0, 0], [0, 0, 0, 0]])
    for seed in range(20):
        out = ssl.multi_value_dropout(ids, 0.99, np.random.default_rng(seed))
        assert (out[0] != 0).sum() >= 1 and (out[1] != 0).sum() == 1
        assert np.all(out[2] == 0)
        assert np.all((out == 0) | (out == ids))


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


def test_loss_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        ssl.contrastive_loss(tf.ones((2, 2)), tf.ones((2, 2)), 0.0)


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


def test_feature_masking_roundtrip_and_gradients_flow_from_both_losses():
    table = tf.Variable(np.random.default_rng(0).normal(size=(5, 3)).astype("float32"))
    layer = ssl.FeatureMasking(2, 3)
    clone = ssl.FeatureMasking.from_config(layer.get_config())
    assert clone.num_features == 2 and clone.dim == 3
    ids = tf.constant([[0, 1], [2, 3], [4, 0]])
    # The shared tower MLP mixes the features; without it the complementary views
    # live on disjoint coordinates and their cosine is identically 0.
    mlp = keras.layers.Dense(4, kernel_initializer=keras.initializers.GlorotUniform(seed=1))
    with tf.GradientTape(persistent=True) as tape:
        emb = tf.gather(table, ids)  # [B, F=2, D=3]
        mask_a = tf.constant([True, False])
        va = mlp(tf.reshape(layer(emb, mask_a), (3, 6)))
        vb = mlp(tf.reshape(layer(emb, tf.logical_not(mask_a)), (3, 6)))
        l_self = ssl.contrastive_loss(va, vb, 0.2)
        l_main = tf.reduce_sum(tf.reduce_mean(emb, axis=1) ** 2)
    for loss in (l_self, l_main):
        g = tf.convert_to_tensor(tape.gradient(loss, table))
        assert float(tf.reduce_sum(tf.abs(g))) > 0
    assert float(tf.reduce_sum(tf.abs(tape.gradient(l_self, layer.defaults)))) > 0
