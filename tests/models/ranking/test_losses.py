import numpy as np
import pytest

from models.ranking.losses import (BinaryCrossEntropy, FocalLoss, GHMCLoss, binary_cross_entropy, focal_loss,
                                   ghm_bin_index, ghm_c_weights, ghm_gradient_norm, make_loss)
from models.tf_compat import keras, tf


def _logit(p):
    return np.log(p / (1.0 - p))


def test_bce_by_hand():
    # y=1, z=0: log 2; y=0, z=log 3 (p=3/4): -log(1/4) = log 4.
    got = binary_cross_entropy([1.0, 0.0], [0.0, np.log(3.0)]).numpy()
    np.testing.assert_allclose(got, [np.log(2.0), np.log(4.0)], rtol=1e-6)
    assert BinaryCrossEntropy()(tf.constant([1.0, 0.0]), tf.constant([0.0, np.log(3.0)])).numpy() == \
        pytest.approx((np.log(2.0) + np.log(4.0)) / 2, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_focal_with_gamma_zero_is_bce(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(50) < 0.3).astype(np.float32)
    z = rng.normal(scale=3.0, size=50).astype(np.float32)
    bce = binary_cross_entropy(y, z).numpy()
    np.testing.assert_allclose(focal_loss(y, z, alpha=None, gamma=0.0).numpy(), bce, rtol=1e-6)
    # alpha = 0.5 weighs both classes by 1/2.
    np.testing.assert_allclose(focal_loss(y, z, alpha=0.5, gamma=0.0).numpy(), bce / 2, rtol=1e-6)
    assert FocalLoss(alpha=None, gamma=0.0)(y, z).numpy() == pytest.approx(bce.mean(), rel=1e-5)


def test_focal_by_hand():
    # y=1, p=3/4: p_t=3/4, (1-p_t)^2 = 1/16, BCE = log(4/3), alpha_t = 0.25 -> 0.25 * log(4/3) / 16.
    # y=0, p=3/4: p_t=1/4, (3/4)^2 = 9/16, BCE = log 4, alpha_t = 0.75 -> 0.75 * 9/16 * log 4.
    got = focal_loss([1.0, 0.0], [np.log(3.0), np.log(3.0)], alpha=0.25, gamma=2.0).numpy()
    np.testing.assert_allclose(got, [0.25 * np.log(4 / 3) / 16, 0.75 * 9 / 16 * np.log(4.0)], rtol=1e-5)


def test_ghm_bins_follow_the_reference_edges():
    # M = 4: edges 0, .25, .5, .75, 1 + 1e-6; a value on an edge goes to the bin above it.
    got = ghm_bin_index(tf.constant([0.0, 0.2499, 0.25, 0.5, 0.74, 0.75, 1.0]), 4).numpy()
    np.testing.assert_array_equal(got, [0, 0, 1, 2, 2, 3, 3])


def test_ghm_weights_by_hand_without_momentum():
    # g = (.1, .2, .3, .9, 1.0), M = 4 -> bins (0, 0, 1, 3, 3), counts R = (2, 1, 0, 2), N = 5,
    # n = 3 non-empty bins.
    # nonempty_bins (reference implementation): beta = N / (R n) = 5/6, 5/6, 5/3, 5/6, 5/6 (mean 1).
    # num_bins (paper, GD = R / (1/M)):        beta = N / (R M) = 5/8, 5/8, 5/4, 5/8, 5/8.
    g = tf.constant([0.1, 0.2, 0.3, 0.9, 1.0])
    w, acc = ghm_c_weights(g, tf.zeros([4]), num_bins=4, momentum=0.0)
    np.testing.assert_allclose(w.numpy(), [5 / 6, 5 / 6, 5 / 3, 5 / 6, 5 / 6], rtol=1e-6)
    np.testing.assert_allclose(acc.numpy(), [2, 1, 0, 2])
    assert w.numpy().mean() == pytest.approx(1.0)
    w, _ = ghm_c_weights(g, tf.zeros([4]), num_bins=4, momentum=0.0, density_normalization="num_bins")
    np.testing.assert_allclose(w.numpy(), [5 / 8, 5 / 8, 5 / 4, 5 / 8, 5 / 8], rtol=1e-6)


def test_ghm_momentum_over_two_batches():
    # alpha = 0.75, S starts at 0 and moves only in non-empty bins.
    # batch 1: R = (2, 1, 0, 2) -> S = 0.25 R = (.5, .25, 0, .5); N = 5, n = 3:
    #          beta = 5 / (S n) = 10/3, 10/3, 20/3, 10/3, 10/3.
    # batch 2: g = (.05, .6, .7, .8) -> bins (0, 2, 2, 3), R = (1, 0, 2, 1);
    #          S = (.75*.5 + .25*1, .25 (empty: kept), .75*0 + .25*2, .75*.5 + .25*1) = (.625, .25, .5, .625);
    #          N = 4, n = 3: beta = 4/(.625*3), 4/(.5*3), 4/(.5*3), 4/(.625*3) = 2.1333, 2.6667, 2.6667, 2.1333.
    loss = GHMCLoss(num_bins=4, momentum=0.75)
    g1 = np.array([0.1, 0.2, 0.3, 0.9, 1.0])
    y1 = np.array([1.0, 0.0, 1.0, 0.0, 1.0])
    # Logits with |sigmoid(z) - y| = g (g = 1 by a large logit on the wrong side).
    p1 = np.clip(np.where(y1 == 1, 1 - g1, g1), 1e-7, 1 - 1e-7)
    z1 = _logit(p1).astype(np.float32)
    bce1 = binary_cross_entropy(y1, z1).numpy()
    v1 = loss(tf.constant(y1, tf.float32), tf.constant(z1)).numpy()
    w1 = np.array([10 / 3, 10 / 3, 20 / 3, 10 / 3, 10 / 3])
    assert v1 == pytest.approx((w1 * bce1).sum() / 5, rel=1e-4)
    np.testing.assert_allclose(loss.accumulated.numpy(), [0.5, 0.25, 0.0, 0.5], rtol=1e-6)

    g2 = np.array([0.05, 0.6, 0.7, 0.8])
    y2 = np.array([0.0, 1.0, 0.0, 1.0])
    z2 = _logit(np.where(y2 == 1, 1 - g2, g2)).astype(np.float32)
    np.testing.assert_allclose(ghm_gradient_norm(y2, z2).numpy(), g2, rtol=1e-5)
    bce2 = binary_cross_entropy(y2, z2).numpy()
    v2 = loss(tf.constant(y2, tf.float32), tf.constant(z2)).numpy()
    w2 = np.array([4 / 1.875, 4 / 1.5, 4 / 1.5, 4 / 1.875])
    assert v2 == pytest.approx((w2 * bce2).sum() / 4, rel=1e-4)
    np.testing.assert_allclose(loss.accumulated.numpy(), [0.625, 0.25, 0.5, 0.625], rtol=1e-6)
    loss.reset_state()
    assert loss.accumulated.numpy().sum() == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ghm_without_momentum_has_mean_weight_one_and_no_weight_gradient(seed):
    rng = np.random.default_rng(seed)
    y = tf.constant((rng.random(64) < 0.2).astype(np.float32))
    z = tf.Variable(rng.normal(size=64).astype(np.float32))
    w, _ = ghm_c_weights(ghm_gradient_norm(y, z), tf.zeros([30]), momentum=0.0)
    assert w.numpy().mean() == pytest.approx(1.0, rel=1e-5)
    # The weights are constants: d(loss)/dz = beta (sigmoid(z) - y) / N.
    loss = GHMCLoss(momentum=0.0)
    with tf.GradientTape() as tape:
        value = loss(y, z)
    grad = tape.gradient(value, z).numpy()
    np.testing.assert_allclose(grad, w.numpy() * (tf.sigmoid(z).numpy() - y.numpy()) / 64, rtol=1e-4, atol=1e-7)


def test_losses_config_round_trip_and_errors():
    for loss in (BinaryCrossEntropy(), FocalLoss(alpha=0.4, gamma=1.5),
                 GHMCLoss(num_bins=10, momentum=0.5, density_normalization="num_bins")):
        config = loss.get_config()
        clone = type(loss).from_config(config)
        assert clone.get_config() == config
    assert make_loss("ghm", num_bins=7).num_bins == 7
    assert isinstance(keras.losses.deserialize(keras.losses.serialize(FocalLoss(gamma=1.0)),
                                                custom_objects={"FocalLoss": FocalLoss}), FocalLoss)
    with pytest.raises(ValueError, match="momentum"):
        GHMCLoss(momentum=1.0)
    with pytest.raises(ValueError, match="density_normalization"):
        GHMCLoss(density_normalization="width")
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=-1.0)
    with pytest.raises(ValueError, match="alpha"):
        focal_loss([1.0], [0.0], alpha=2.0)
    with pytest.raises(ValueError, match="loss"):
        make_loss("hinge")
