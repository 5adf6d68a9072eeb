import numpy as np
import pytest

from models.ranking.co_action import (CoActionUnit, co_action, co_action_feeds, coaction_output_dim, feed_orders,
                                      induction_dim, micro_mlp, micro_mlp_param_count, split_induction)
from models.tf_compat import tf


def _np_co_action(p_ind, p_feed, d, sizes, use_bias, act, orders, order_independent, combine):
    """Brute-force reference for one example: p_feed [D] (a single position)."""
    per = micro_mlp_param_count(d, sizes, use_bias)
    outs = []
    for c in range(1, orders + 1):
        vec = p_ind[(c - 1) * per:c * per] if order_independent else p_ind[:per]
        h, off, fan_in, layers = p_feed ** c, 0, d, []
        for i, s in enumerate(sizes):
            w = vec[off:off + fan_in * s].reshape(fan_in, s)
            off += fan_in * s
            h = h @ w
            if use_bias:
                h = h + vec[off:off + s]
                off += s
            if act and i < len(sizes) - 1:
                h = np.tanh(h)
            layers.append(h)
            fan_in = s
        outs.append(np.concatenate(layers))
    return np.concatenate(outs) if combine == "concat" else np.sum(outs, axis=0)


@pytest.mark.parametrize("d,sizes,use_bias,expected", [
    (4, (3,), True, 4 * 3 + 3),
    (16, (8, 4), True, 16 * 8 + 8 + 8 * 4 + 4),   # 172
    (16, (8, 4), False, 16 * 8 + 8 * 4),          # 160, the authors' configuration
    (3, (2, 2, 1), True, 6 + 2 + 4 + 2 + 2 + 1),  # 17
])
def test_induction_length_is_the_micro_mlp_parameter_count(d, sizes, use_bias, expected):
    assert micro_mlp_param_count(d, sizes, use_bias) == expected
    assert induction_dim(d, sizes, use_bias) == expected
    # split_induction consumes exactly Σ(|w_i|+|b_i|) values, in shapes [d_{i-1}, d_i] and [d_i].
    params = split_induction(tf.zeros([2, expected]), d, sizes, use_bias)
    total = 0
    fan_in = d
    for (w, b), s in zip(params, sizes):
        assert w.shape == (2, fan_in, s)
        assert (b is None) == (not use_bias)
        total += w.shape[1] * w.shape[2] + (b.shape[1] if b is not None else 0)
        fan_in = s
    assert total == expected
    with pytest.raises(ValueError, match="Σ"):
        split_induction(tf.zeros([2, expected + 1]), d, sizes, use_bias)


def test_independence_multiplies_the_induction_length():
    k = micro_mlp_param_count(8, (4, 2))
    assert induction_dim(8, (4, 2), orders=3, order_independent=True) == 3 * k
    assert induction_dim(8, (4, 2), orders=3, order_independent=False) == k
    assert induction_dim(8, (4, 2), orders=3, order_independent=True, num_feeds=5,
                         combination_independent=True) == 15 * k
    assert coaction_output_dim((4, 2), orders=3) == 18
    assert coaction_output_dim((4, 2), orders=3, combine_orders="sum") == 6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_linear_layer_without_bias_is_the_dot_product(seed):
    # The FM special case: a 1×D micro-MLP without bias or activation gives <P_induction, P_feed>.
    rng = np.random.default_rng(seed)
    p_ind, p_feed = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    got = co_action(tf.constant(p_ind), tf.constant(p_feed), input_dim=5, layer_sizes=(1,), use_bias=False,
                    activation=None).numpy()
    np.testing.assert_allclose(got[:, 0], (p_ind * p_feed).sum(axis=1), rtol=1e-10)


def test_two_orders_by_hand():
    # D = 2, layers (2, 1) with biases, tanh between the layers, C = 2 orders sharing one MLP.
    # P_induction = [w1 (row-major) | b1 | w2 | b2]:
    #   w1 = [[0.5, 0], [0, -0.25]], b1 = [0, 0.5], w2 = [[2], [3]], b2 = [-1].
    # order 1, h0 = (1, 2):  h0 w1 + b1 = (0.5, -0.5 + 0.5) = (0.5, 0) -> tanh -> (0.46211716, 0)
    #                        h2 = 2 * 0.46211716 + 3 * 0 - 1 = -0.07576568
    # order 2, h0 = (1, 4):  (0.5, -1 + 0.5) = (0.5, -0.5) -> tanh -> (0.46211716, -0.46211716)
    #                        h2 = 0.92423431 - 1.38635147 - 1 = -1.46211716
    p_ind = tf.constant([[0.5, 0.0, 0.0, -0.25, 0.0, 0.5, 2.0, 3.0, -1.0]], tf.float64)
    p_feed = tf.constant([[1.0, 2.0]], tf.float64)
    kwargs = dict(input_dim=2, layer_sizes=(2, 1), use_bias=True, activation="tanh", orders=2)
    concat = co_action(p_ind, p_feed, combine_orders="concat", **kwargs).numpy()[0]
    np.testing.assert_allclose(concat, [0.46211716, 0.0, -0.07576568, 0.46211716, -0.46211716, -1.46211716],
                               atol=1e-8)
    summed = co_action(p_ind, p_feed, combine_orders="sum", **kwargs).numpy()[0]
    np.testing.assert_allclose(summed, [0.92423431, -0.46211716, -1.53788284], atol=1e-8)
    powers = feed_orders(p_feed, 3)
    np.testing.assert_allclose(powers[2].numpy(), [[1.0, 8.0]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_orders_and_order_independence_against_numpy(seed):
    rng = np.random.default_rng(seed)
    d, sizes, orders = 4, (3, 2), 3
    k = micro_mlp_param_count(d, sizes)
    for order_independent in (False, True):
        width = k * (orders if order_independent else 1)
        p_ind, p_feed = rng.normal(size=(5, width)), rng.normal(size=(5, d))
        for combine in ("concat", "sum"):
            got = co_action(tf.constant(p_ind), tf.constant(p_feed), input_dim=d, layer_sizes=sizes, orders=orders,
                            order_independent=order_independent, combine_orders=combine).numpy()
            want = np.stack([_np_co_action(p_ind[b], p_feed[b], d, sizes, True, True, orders, order_independent,
                                           combine) for b in range(5)])
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    # Order independence with identical per-order slices equals a shared MLP.
    p_ind = rng.normal(size=(5, k))
    p_feed = rng.normal(size=(5, d))
    shared = co_action(tf.constant(p_ind), tf.constant(p_feed), input_dim=d, layer_sizes=sizes, orders=orders)
    separate = co_action(tf.constant(np.tile(p_ind, (1, orders))), tf.constant(p_feed), input_dim=d,
                         layer_sizes=sizes, orders=orders, order_independent=True)
    np.testing.assert_allclose(shared.numpy(), separate.numpy(), rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_sequence_pooling_switch_against_numpy(seed):
    rng = np.random.default_rng(seed)
    d, sizes = 3, (2,)
    k = micro_mlp_param_count(d, sizes)
    p_ind = rng.normal(size=(4, k))
    seq = rng.normal(size=(4, 5, d))
    mask = rng.random((4, 5)) < 0.6
    per_item = co_action(tf.constant(p_ind), tf.constant(seq), input_dim=d, layer_sizes=sizes, orders=2,
                         mask=tf.constant(mask), sequence_pooling="coaction_then_sum").numpy()
    pooled_first = co_action(tf.constant(p_ind), tf.constant(seq), input_dim=d, layer_sizes=sizes, orders=2,
                             mask=tf.constant(mask), sequence_pooling="sum_then_coaction").numpy()
    for b in range(4):
        items = [_np_co_action(p_ind[b], seq[b, t], d, sizes, True, True, 2, False, "concat")
                 for t in range(5) if mask[b, t]]
        want = np.sum(items, axis=0) if items else np.zeros(2 * sum(sizes))
        np.testing.assert_allclose(per_item[b], want, rtol=1e-9, atol=1e-12)
        summed = (seq[b] * mask[b][:, None]).sum(axis=0)
        np.testing.assert_allclose(pooled_first[b],
                                   _np_co_action(p_ind[b], summed, d, sizes, True, True, 2, False, "concat"),
                                   rtol=1e-9, atol=1e-12)


def test_mean_pooling_divides_by_the_real_positions():
    # Mean pooling: coaction_then_mean is coaction_then_sum / count, and mean_then_coaction
    # feeds the mean of the real positions; an empty sequence gives zeros, as with sums.
    rng = np.random.default_rng(3)
    d, sizes = 3, (4, 2)
    p_ind = rng.normal(size=(4, micro_mlp_param_count(d, sizes)))
    seq = rng.normal(size=(4, 6, d))
    mask = rng.random((4, 6)) < 0.5
    mask[0], mask[1] = False, True
    args = dict(input_dim=d, layer_sizes=sizes, orders=2, mask=tf.constant(mask))
    summed = co_action(tf.constant(p_ind), tf.constant(seq), sequence_pooling="coaction_then_sum", **args).numpy()
    mean = co_action(tf.constant(p_ind), tf.constant(seq), sequence_pooling="coaction_then_mean", **args).numpy()
    count = np.maximum(mask.sum(axis=1), 1)[:, None]
    np.testing.assert_allclose(mean, summed / count, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(mean[0], 0.0)
    mean_first = co_action(tf.constant(p_ind), tf.constant(seq), sequence_pooling="mean_then_coaction", **args)
    for b in range(4):
        centre = seq[b][mask[b]].mean(axis=0) if mask[b].any() else np.zeros(d)
        np.testing.assert_allclose(mean_first.numpy()[b],
                                   _np_co_action(p_ind[b], centre, d, sizes, True, True, 2, False, "concat"),
                                   rtol=1e-9, atol=1e-12)


def test_unit_combination_independence_and_config_round_trip():
    rng = np.random.default_rng(3)
    d, sizes = 3, (2, 2)
    k = micro_mlp_param_count(d, sizes)
    # Keras layers compute in float32.
    f1, f2 = tf.constant(rng.normal(size=(4, d)), tf.float32), tf.constant(rng.normal(size=(4, 6, d)), tf.float32)
    mask = tf.constant(rng.random((4, 6)) < 0.5)
    unit = CoActionUnit(feed_dim=d, layer_sizes=sizes, orders=2, num_feeds=2, combination_independent=True)
    assert unit.induction_dim == 2 * k
    p = tf.constant(rng.normal(size=(4, 2 * k)), tf.float32)
    got = unit(p, [f1, f2], [None, mask]).numpy()
    one = co_action(p[:, :k], f1, input_dim=d, layer_sizes=sizes, orders=2)
    two = co_action(p[:, k:], f2, input_dim=d, layer_sizes=sizes, orders=2, mask=mask)
    np.testing.assert_allclose(got, np.concatenate([one.numpy(), two.numpy()], axis=1), rtol=1e-6)
    shared = CoActionUnit(feed_dim=d, layer_sizes=sizes, orders=2, num_feeds=2)
    got_shared = shared(p[:, :k], [f1, f2], [None, mask]).numpy()
    two_shared = co_action(p[:, :k], f2, input_dim=d, layer_sizes=sizes, orders=2, mask=mask)
    np.testing.assert_allclose(got_shared[:, got.shape[1] // 2:], two_shared.numpy(), rtol=1e-6)

    config = unit.get_config()
    clone = CoActionUnit.from_config(config)
    assert clone.get_config() == config
    np.testing.assert_allclose(clone(p, [f1, f2], [None, mask]).numpy(), got)


def test_micro_mlp_returns_every_layer():
    params = split_induction(tf.ones([1, micro_mlp_param_count(2, (3, 1), use_bias=False)]), 2, (3, 1), False)
    # h1 = (1 + 1) per unit = 2 -> tanh(2); h2 = 3 * tanh(2) (last layer linear).
    outs = micro_mlp(tf.constant([[[1.0, 1.0]]]), params)  # [B=1, N=1, D=2]
    np.testing.assert_allclose(outs[0].numpy(), [[[np.tanh(2.0)] * 3]], rtol=1e-6)
    np.testing.assert_allclose(outs[1].numpy(), [[[3 * np.tanh(2.0)]]], rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_several_induction_features_at_once_equal_separate_calls(seed):
    rng = np.random.default_rng(seed)
    d, sizes, orders = 3, (2, 2), 2
    k = micro_mlp_param_count(d, sizes)
    seq, mask = tf.constant(rng.normal(size=(4, 5, d))), tf.constant(rng.random((4, 5)) < 0.7)
    flat = tf.constant(rng.normal(size=(4, d)))
    for order_independent in (False, True):
        p = tf.constant(rng.normal(size=(4, 3, k * (orders if order_independent else 1))))
        for feed, m in ((seq, mask), (flat, None)):
            kwargs = dict(input_dim=d, layer_sizes=sizes, orders=orders, order_independent=order_independent,
                          mask=m)
            together = co_action(p, feed, **kwargs).numpy()
            assert together.shape == (4, 3, coaction_output_dim(sizes, orders))
            for i in range(3):
                np.testing.assert_allclose(together[:, i], co_action(p[:, i], feed, **kwargs).numpy(), rtol=1e-12)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="layer_sizes"):
        micro_mlp_param_count(4, ())
    with pytest.raises(ValueError, match="input_dim"):
        micro_mlp_param_count(0, (2,))
    with pytest.raises(ValueError, match="sequence_pooling"):
        CoActionUnit(sequence_pooling="mean")
    with pytest.raises(ValueError, match="orders"):
        CoActionUnit(orders=0)
    with pytest.raises(ValueError, match="activation"):
        CoActionUnit(activation="wiggle")
    unit = CoActionUnit(feed_dim=2, layer_sizes=(1,), num_feeds=1)
    with pytest.raises(ValueError, match="induction_dim"):
        unit(tf.zeros([1, 5]), [tf.zeros([1, 2])])
    with pytest.raises(ValueError, match="num_feeds"):
        unit(tf.zeros([1, 3]), [tf.zeros([1, 2]), tf.zeros([1, 2])])


@pytest.mark.parametrize("seed", [0, 1])
def test_stacked_feeds_equal_one_call_per_feed(seed):
    rng = np.random.default_rng(seed)
    d, sizes = 3, (2, 2)
    k = micro_mlp_param_count(d, sizes)
    feeds = [tf.constant(rng.normal(size=(4, d))), tf.constant(rng.normal(size=(4, 5, d))),
             tf.constant(rng.normal(size=(4, d))), tf.constant(rng.normal(size=(4, 2, d)))]
    masks = [None, tf.constant(rng.random((4, 5)) < 0.6), None, None]
    for order_independent, combine, pooling, several in [(False, "concat", "coaction_then_sum", True),
                                                         (True, "concat", "coaction_then_sum", False),
                                                         (False, "sum", "sum_then_coaction", True)]:
        shape = (4, 3, 2 * k) if several else (4, 2 * k)
        p = tf.constant(rng.normal(size=shape)[..., :k * (2 if order_independent else 1)])
        kwargs = dict(input_dim=d, layer_sizes=sizes, orders=2, order_independent=order_independent,
                      combine_orders=combine, sequence_pooling=pooling)
        got = co_action_feeds(p, feeds, masks, **kwargs).numpy()
        want = np.concatenate([co_action(p, f, mask=m, **kwargs).numpy() for f, m in zip(feeds, masks)], axis=-1)
        np.testing.assert_allclose(got, want, rtol=1e-12)


def _np_feeds(p_ind, feeds, masks, d, sizes, use_bias, act, orders, order_independent, combine, pooling):
    """Brute force for one example: each feed's per-position co-actions, pooled as the paper says."""
    out = []
    for feed, mask in zip(feeds, masks):
        if feed.ndim == 1:
            out.append(_np_co_action(p_ind, feed, d, sizes, use_bias, act, orders, order_independent, combine))
            continue
        m = np.ones(len(feed)) if mask is None else mask.astype(float)
        if "mean" in pooling:  # weights 1/count over the real positions (an empty sequence: all 0)
            m = m / max(m.sum(), 1.0)
        if pooling.endswith("then_coaction"):
            out.append(_np_co_action(p_ind, (feed * m[:, None]).sum(axis=0), d, sizes, use_bias, act, orders,
                                     order_independent, combine))
        else:
            out.append(sum(m[t] * _np_co_action(p_ind, feed[t], d, sizes, use_bias, act, orders, order_independent,
                                                combine) for t in range(len(feed))))
    return np.concatenate(out)


@pytest.mark.parametrize("sizes,use_bias,activation", [
    ((1,), False, None), ((3,), True, "tanh"), ((2, 2), True, "tanh"), ((2, 2), False, "tanh"),
    ((3, 2, 2), True, "tanh"), ((2, 3), True, None), ((4, 1, 2), False, "relu")])
def test_feeds_against_brute_force_for_many_layouts(sizes, use_bias, activation):
    # The fast path (first layer for all induction features at once, last linear layer
    # after pooling, pooling as a matmul) against the formula applied position by position.
    rng = np.random.default_rng(len(sizes) * 7 + use_bias)
    d, b = 3, 4
    feeds = [rng.normal(size=(b, d)), rng.normal(size=(b, 5, d)), rng.normal(size=(b, 2, d))]
    mask = rng.random((b, 5)) < 0.6
    mask[0] = False  # an empty history pools to zeros
    masks = [None, mask, None]
    k = micro_mlp_param_count(d, sizes, use_bias)
    for orders, order_independent, combine, pooling, several in [
            (1, False, "concat", "coaction_then_sum", False), (2, False, "concat", "coaction_then_sum", True),
            (3, True, "concat", "coaction_then_sum", True), (2, False, "sum", "sum_then_coaction", False),
            (2, True, "sum", "coaction_then_sum", True), (2, False, "concat", "coaction_then_mean", True),
            (1, True, "sum", "mean_then_coaction", False)]:
        width = k * (orders if order_independent else 1)
        p = rng.normal(size=(b, 3, width) if several else (b, width))
        got = co_action_feeds(tf.constant(p), [tf.constant(f) for f in feeds],
                              [None if m is None else tf.constant(m) for m in masks], input_dim=d,
                              layer_sizes=sizes, use_bias=use_bias, activation=activation, orders=orders,
                              order_independent=order_independent, combine_orders=combine,
                              sequence_pooling=pooling).numpy()
        act = {None: None, "tanh": np.tanh, "relu": lambda v: np.maximum(v, 0.0)}[activation]
        for e in range(b):
            inds = p[e] if several else p[e][None]
            want = [_np_feeds_act(ind, [f[e] for f in feeds], [None if m is None else m[e] for m in masks], d, sizes,
                                  use_bias, act, orders, order_independent, combine, pooling) for ind in inds]
            np.testing.assert_allclose(got[e] if several else got[e][None], np.stack(want), rtol=1e-9, atol=1e-12)


def _np_feeds_act(p_ind, feeds, masks, d, sizes, use_bias, act, orders, order_independent, combine, pooling):
    # _np_co_action applies tanh when `act` is truthy; other activations are applied by hand here.
    if act is None or act is np.tanh:
        return _np_feeds(p_ind, feeds, masks, d, sizes, use_bias, act is not None, orders, order_independent,
                         combine, pooling)
    per = micro_mlp_param_count(d, sizes, use_bias)

    def one(vec_all, x):
        outs = []
        for c in range(1, orders + 1):
            vec = vec_all[(c - 1) * per:c * per] if order_independent else vec_all[:per]
            h, off, fan_in, layers = x ** c, 0, d, []
            for i, s in enumerate(sizes):
                h = h @ vec[off:off + fan_in * s].reshape(fan_in, s)
                off += fan_in * s
                if use_bias:
                    h, off = h + vec[off:off + s], off + s
                if i < len(sizes) - 1:
                    h = act(h)
                layers.append(h)
                fan_in = s
            outs.append(np.concatenate(layers))
        return np.concatenate(outs) if combine == "concat" else np.sum(outs, axis=0)

    out = []
    for feed, mask in zip(feeds, masks):
        if feed.ndim == 1:
            out.append(one(p_ind, feed))
            continue
        m = np.ones(len(feed)) if mask is None else mask.astype(float)
        if "mean" in pooling:  # weights 1/count over the real positions (an empty sequence: all 0)
            m = m / max(m.sum(), 1.0)
        if pooling.endswith("then_coaction"):
            out.append(one(p_ind, (feed * m[:, None]).sum(axis=0)))
        else:
            out.append(sum(m[t] * one(p_ind, feed[t]) for t in range(len(feed))))
    return np.concatenate(out)


def test_fast_path_gradients_equal_the_per_position_formula():
    # Gradients w.r.t. P_induction and the feeds match those of the literal formula
    # (split_induction + micro_mlp on every position, then masked sums).
    rng = np.random.default_rng(5)
    d, sizes, orders = 3, (4, 2), 2
    k = micro_mlp_param_count(d, sizes)
    p = tf.Variable(rng.normal(size=(4, 3, k)))
    flat, seq = tf.Variable(rng.normal(size=(4, d))), tf.Variable(rng.normal(size=(4, 5, d)))
    mask = tf.constant(rng.random((4, 5)) < 0.6, tf.float64)
    upstream = tf.constant(rng.normal(size=(4, 3, 2 * orders * sum(sizes))))

    def literal():
        params = split_induction(p, d, sizes)
        per_feed = []
        for x, m in ((flat[:, None], tf.ones([4, 1], tf.float64)), (seq, mask)):
            per_order = []
            for h in feed_orders(x, orders):
                layers = micro_mlp(h[:, None], params)  # [B, I, L, size] each
                per_order.append(tf.concat([tf.reduce_sum(o * m[:, None, :, None], axis=2) for o in layers], -1))
            per_feed.append(tf.concat(per_order, axis=-1))
        return tf.concat(per_feed, axis=-1)

    grads = []
    for fn in (literal, lambda: co_action_feeds(p, [flat, seq], [None, mask], input_dim=d, layer_sizes=sizes,
                                                orders=orders)):
        with tf.GradientTape() as tape:
            out = fn()
            loss = tf.reduce_sum(out * upstream)
        grads.append([g.numpy() for g in tape.gradient(loss, [p, flat, seq])] + [out.numpy()])
    for want, got in zip(*grads):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
