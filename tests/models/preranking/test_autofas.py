import json

import numpy as np
import pytest

from preranking_helpers import FEATURES, batch, table
from tiny_schema import SCHEMA, VOCABS
from models.features import HISTORY, ITEM_ID, USER_ID
from models.preranking.autofas import (AutoFASSearch, FeatureMask, MixOp, derive_architecture, derive_from_model,
                                       straight_through_bernoulli)
from models.preranking.latency import (IDENTITY, expected_architecture_latency, expected_feature_latency,
                                       expected_input_width)
from models.preranking.preranker import PreRanker
from models.preranking.training import AutoFASSearchTrainer, PrerankerConfig
from models.tf_compat import keras, tf


def _tensors(b):
    return {k: tf.constant(v) for k, v in b.items()}


def _search(**overrides):
    keras.utils.set_random_seed(0)
    kwargs = dict(embedding_dim=4, num_mixops=2, operator_widths=(IDENTITY, 4, 8), initial_probability=0.6)
    kwargs.update(overrides)
    model = AutoFASSearch(SCHEMA, VOCABS, FEATURES, **kwargs)
    model(_tensors(batch()))
    return model


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_masks_at_theta_one_keep_everything_and_at_zero_drop_everything(seed):
    rng = np.random.default_rng(seed)
    blocks = [tf.constant(rng.normal(size=(5, d)).astype(np.float32)) for d in (3, 1, 4)]
    mask = FeatureMask(3)
    mask.theta.assign([1.0, 1.0, 1.0])
    for out, x in zip(mask(blocks, seed=[seed, 1], training=True), blocks):
        np.testing.assert_array_equal(out.numpy(), x.numpy())
    mask.theta.assign([0.0, 0.0, 0.0])
    for out in mask(blocks, seed=[seed, 2], training=True):
        np.testing.assert_array_equal(out.numpy(), np.zeros_like(out.numpy()))
    # Evaluation uses the threshold: θ = (0.7, 0.2, 0.5) keeps blocks 0 and 2.
    mask.theta.assign([0.7, 0.2, 0.5])
    np.testing.assert_array_equal(mask.masks(training=False).numpy(), [1.0, 0.0, 1.0])


def test_whole_model_with_every_mask_dropped_scores_every_row_alike():
    model = _search()
    model.mask.theta.assign(tf.zeros([len(FEATURES)]))
    logits = model(_tensors(batch()), seed=[0, 0], training=True).numpy()
    np.testing.assert_allclose(logits, np.full_like(logits, logits[0]), rtol=1e-6)
    model.mask.theta.assign(tf.ones([len(FEATURES)]))
    logits = model(_tensors(batch()), seed=[0, 0], training=True).numpy()
    assert np.ptp(logits) > 0


def test_straight_through_sample_is_hard_with_unit_gradient():
    p = tf.Variable([0.3, 0.8, 0.5])
    rates = []
    for s in range(400):
        with tf.GradientTape() as tape:
            m = straight_through_bernoulli(p, tf.constant([s, 7]))
            y = tf.reduce_sum(m * tf.constant([1.0, 2.0, 3.0]))
        assert set(np.unique(m.numpy())) <= {0.0, 1.0}
        np.testing.assert_allclose(tape.gradient(y, p).numpy(), [1.0, 2.0, 3.0])
        rates.append(m.numpy())
    np.testing.assert_allclose(np.mean(rates, axis=0), [0.3, 0.8, 0.5], atol=0.08)


def test_mixop_mixes_padded_operators_by_softmax_alpha():
    # α = (0, ln 3) over (identity, dense 2): weights (1/4, 3/4).
    op = MixOp((IDENTITY, 2), output_width=3)
    x = tf.constant([[1.0, -2.0], [0.5, 4.0]])
    op(x)
    op.alpha.assign([0.0, np.log(3.0)])
    dense = op.operators[2]
    dense.kernel.assign([[1.0, 0.0], [0.0, 1.0]])
    dense.bias.assign([0.0, 1.0])
    # identity → [x, 0]; dense → [relu(x + (0, 1)), 0].
    expected = 0.25 * np.array([[1.0, -2.0, 0.0], [0.5, 4.0, 0.0]]) + 0.75 * np.array([[1.0, 0.0, 0.0],
                                                                                        [0.5, 5.0, 0.0]])
    np.testing.assert_allclose(op(x).numpy(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="output_width"):
        MixOp((IDENTITY, 8), output_width=4)


def test_gradients_reach_theta_and_alpha():
    model = _search()
    trainer = AutoFASSearchTrainer(model, table(), PrerankerConfig(latency_weight=0.1))
    b = _tensors(batch())
    labels = tf.constant([1.0, 0.0, 0.0, 1.0])
    teacher = tf.constant([2.0, -1.0, 0.5, 1.0])
    _, g_mask, g_arch, g_weights = trainer.gradients(b, labels, teacher, tf.constant([3, 4]))
    assert g_mask[0].shape == (len(FEATURES),) and np.all(np.isfinite(g_mask[0].numpy()))
    assert np.count_nonzero(g_mask[0].numpy()) == len(FEATURES)  # at least the latency term reaches every θ_i
    for g in g_arch:
        assert g.shape == (3,) and np.abs(g.numpy()).sum() > 0
    assert all(g is not None for g in g_weights[:3])


def _loss1_theta_gradients(model, b, labels, seed, latency_weight):
    """∂Loss1/∂θ (mask objective "labels") from the latency formulas, and the same without T_arch."""
    assert model.feature_widths == [4, 4, 4, 4, 4, 4, 1]
    costs = [0.1 * (i + 1) for i in range(len(FEATURES))]
    grads = []
    for with_architecture in (True, False):
        with tf.GradientTape() as tape:
            logits = model(b, seed=seed, training=True)
            bce = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))
            theta = tf.clip_by_value(model.mask.theta, 0.0, 1.0)
            latency = expected_feature_latency(theta, costs)
            if with_architecture:
                alphas = [tf.stop_gradient(tf.nn.softmax(m.alpha)) for m in model.mixops]
                width = expected_input_width(theta, [4, 4, 4, 4, 4, 4, 1])
                latency += expected_architecture_latency(alphas, (IDENTITY, 4, 8), width, table())
            loss1 = bce + latency_weight * latency
        grads.append(tape.gradient(loss1, model.mask.theta).numpy())
    return grads


def test_gradient_block_loss1_moves_only_masks_and_loss2_only_architecture_and_weights():
    model = _search()
    lr = 0.01
    config = PrerankerConfig(latency_weight=0.2, architecture_latency_weight=0.3, mask_objective="labels")
    trainer = AutoFASSearchTrainer(model, table(), config,
                                   optimizers=(keras.optimizers.SGD(lr), keras.optimizers.SGD(lr),
                                               keras.optimizers.SGD(lr)))
    b = _tensors(batch())
    labels = tf.constant([1.0, 0.0, 0.0, 1.0])
    teacher = tf.constant([2.0, -1.0, 0.5, 1.0])
    seed = tf.constant([5, 9])
    variables = model.mask_variables + model.architecture_variables
    with tf.GradientTape(persistent=True) as tape:
        out = trainer.losses(b, labels, teacher, seed)
    d1_theta, *d1_alpha = tape.gradient(out["loss1"], variables)
    d2_theta, *d2_alpha = tape.gradient(out["loss2"], variables)
    # Without the block both losses would move both groups.
    assert np.abs(d2_theta.numpy()).sum() > 0 and all(np.abs(g.numpy()).sum() > 0 for g in d1_alpha)
    # ∂Loss1/∂θ built here from its parts: BCE + λ·(Σ θ_i L_i + T_arch(stop_gradient(softmax α), Σ θ_i d_i)),
    # L_i = 0.1·(i + 1) (`table`), d_i = 4 per embedded feature and 1 for the price.
    expected_d1_theta, without_architecture = _loss1_theta_gradients(model, b, labels, seed, latency_weight=0.2)
    np.testing.assert_allclose(d1_theta.numpy(), expected_d1_theta, rtol=1e-5, atol=1e-7)
    # The architecture's latency reaches θ through the input width: leaving it out is visibly different.
    assert np.abs(expected_d1_theta - without_architecture).min() > 1e-3
    before = [v.numpy().copy() for v in variables]
    trainer.train_step(b, labels, teacher, seed)
    np.testing.assert_allclose(model.mask.theta.numpy() - before[0], -lr * expected_d1_theta, atol=1e-6)
    for v, b0, g in zip(model.architecture_variables, before[1:], d2_alpha):
        np.testing.assert_allclose(v.numpy() - b0, -lr * g.numpy(), atol=1e-6)


def test_a_step_clips_theta_back_into_the_unit_interval():
    model = _search()
    # θ near 0 and a latency term 250× the default: one SGD step of lr 1 would take θ far below 0.
    trainer = AutoFASSearchTrainer(model, table(), PrerankerConfig(latency_weight=5.0),
                                   optimizers=(keras.optimizers.SGD(1.0), keras.optimizers.SGD(0.01),
                                               keras.optimizers.SGD(0.01)))
    model.mask.theta.assign(np.linspace(0.01, 0.07, len(FEATURES)))
    b, seed = _tensors(batch()), [5, 9]
    labels, teacher = tf.constant([1.0, 0.0, 0.0, 1.0]), tf.constant([2.0, -1.0, 0.5, 1.0])
    _, g_mask, _, _ = trainer.gradients(b, labels, teacher, tf.constant(seed))
    unclipped = model.mask.theta.numpy() - g_mask[0].numpy()
    assert np.all(unclipped < 0)
    trainer.train_step(b, labels, teacher, seed)
    np.testing.assert_array_equal(model.mask.theta.numpy(), np.zeros(len(FEATURES)))


def test_warmup_epochs_train_only_the_weights():
    model = _search()
    config = PrerankerConfig(batch_size=4, latency_weight=0.2)
    trainer = AutoFASSearchTrainer(model, table(), config)
    initial = [v.numpy().copy() for v in model.mask_variables + model.architecture_variables]
    weights = [v.numpy().copy() for v in model.weight_variables]
    after_epoch = []

    def on_epoch(epoch, record):
        after_epoch.append(([v.numpy().copy() for v in model.mask_variables + model.architecture_variables],
                            [v.numpy().copy() for v in model.weight_variables]))

    trainer.fit(batch(), [1.0, 0.0, 0.0, 1.0], [2.0, -1.0, 0.5, 1.0], epochs=2, warmup_epochs=1, on_epoch=on_epoch)
    (search_1, weights_1), (search_2, _) = after_epoch
    # Warm-up epoch (one batch of 4): θ and every α exactly as initialized, the weights moved.
    for got, want in zip(search_1, initial):
        np.testing.assert_array_equal(got, want)
    assert any(not np.array_equal(got, want) for got, want in zip(weights_1, weights))
    # The search epoch after it moves θ and every α.
    for got, want in zip(search_2, initial):
        assert not np.array_equal(got, want)


@pytest.mark.parametrize("objective", ["labels", "distillation"])
def test_loss1_task_term_is_the_configured_objective(objective):
    model = _search()
    config = PrerankerConfig(latency_weight=0.2, distillation_weight=0.25, architecture_latency_weight=0.1,
                             mask_objective=objective)
    trainer = AutoFASSearchTrainer(model, table(), config)
    labels = tf.constant([1.0, 0.0, 0.0, 1.0])
    teacher = tf.constant([2.0, -1.0, 0.5, 1.0])
    out = trainer.losses(_tensors(batch()), labels, teacher, tf.constant([5, 9]))
    # Loss1 − its latency part is the task term: BCE, or the distilled loss Loss2 uses.
    latency_part = float(out["loss1"]) - (float(out["bce"]) if objective == "labels"
                                          else 0.75 * float(out["bce"]) + 0.25 * float(out["distillation"]))
    expected_latency = 0.2 * (float(out["feature_latency_ms"]) + float(out["architecture_latency_ms"]))
    assert latency_part == pytest.approx(expected_latency, rel=1e-5)
    loss2_task = float(out["loss2"]) - 0.1 * float(out["architecture_latency_ms"])  # λ2
    assert loss2_task == pytest.approx(0.75 * float(out["bce"]) + 0.25 * float(out["distillation"]), rel=1e-5)
    with pytest.raises(ValueError, match="mask_objective"):
        PrerankerConfig(mask_objective="ranker")


def test_derive_rule_by_hand():
    # θ: u1 .9 kept, u2 .2, i1 .6 kept, i2 .1; α argmax per Mixop: 16, identity, 32.
    derived = derive_architecture([0.9, 0.2, 0.6, 0.1], ["u1", "u2", "i1", "i2"], ["user", "user", "item", "item"],
                                  [[0.1, 0.7, 0.2], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]], (IDENTITY, 16, 32))
    assert derived.features == ("u1", "i1")
    assert derived.operators == (16, IDENTITY, 32) and derived.hidden_units == (16, 32)
    # No item feature above the threshold: the strongest item feature is kept.
    derived = derive_architecture([0.9, 0.2, 0.3, 0.4], ["u1", "u2", "i1", "i2"], ["user", "user", "item", "item"],
                                  [[1.0, 0.0, 0.0]], (IDENTITY, 16, 32))
    assert derived.features == ("u1", "i2") and derived.hidden_units == ()
    with pytest.raises(ValueError, match="operator_probabilities"):
        derive_architecture([0.9], ["i"], ["item"], [[0.5, 0.5]], (IDENTITY, 16, 32))


def test_derived_network_has_exactly_the_chosen_features_and_operators():
    model = _search(num_mixops=3)
    # user_id .9, age .1, history .7, item_id .2, category .8, tags .3, price .6.
    model.mask.theta.assign([0.9, 0.1, 0.7, 0.2, 0.8, 0.3, 0.6])
    for mixop, alpha in zip(model.mixops, ([0.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0])):
        mixop.alpha.assign(alpha)
    derived = derive_from_model(model)
    assert derived.features == (USER_ID, HISTORY, "category", "price")
    assert derived.operators == (4, IDENTITY, 8) and derived.hidden_units == (4, 8)
    pre = PreRanker(SCHEMA, VOCABS, derived.features, derived.hidden_units, embedding_dim=4)
    pre(_tensors(batch()))
    assert pre.features == list(derived.features)
    # Only the chosen features' vocabularies exist (history uses item_id's), and the
    # layers are exactly input(4+4+4+1) → 4 → 8 → 1.
    assert sorted(pre.embedding.vocabularies) == sorted([USER_ID, ITEM_ID, "category"])
    kernels = [layer.kernel.shape.as_list() for layer in pre.mlp.layers]
    assert kernels == [[13, 4], [4, 8], [8, 1]]
    user_specs, item_specs = pre.tensor_specs()
    assert sorted(user_specs) == [HISTORY, USER_ID] and sorted(item_specs) == ["category", "price"]


def test_config_round_trips():
    model = _search()
    config = model.get_config()
    json.dumps(config)
    clone = AutoFASSearch.from_config(config)
    clone(_tensors(batch()))
    assert clone.get_config() == config
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(clone(_tensors(batch())).numpy(), model(_tensors(batch())).numpy(), rtol=1e-6)
    for layer in (FeatureMask(3, 0.7, 0.4), MixOp((IDENTITY, 4), 6)):
        assert type(layer).from_config(layer.get_config()).get_config() == layer.get_config()
    with pytest.raises(ValueError, match="num_mixops"):
        AutoFASSearch(SCHEMA, VOCABS, num_mixops=0)
    with pytest.raises(ValueError, match="initial_probability"):
        FeatureMask(2, initial_probability=1.5)
