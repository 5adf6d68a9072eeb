"""Cross-batch negatives: the logits chain, the memory bank and the task."""

import json

import numpy as np
import pytest
import tensorflow_recommenders as tfrs
from conftest import python_subprocess

from models.cross_batch_memory import CrossBatchMemory
from models.cross_batch_retrieval import CrossBatchRetrieval
from models.sampled_softmax import (MASKED_LOGIT, hard_negative_logits, id_hashes, mixed_log_q,
                                    sampled_softmax_logits, sampled_softmax_loss, softmax_cross_entropy)
from models.tf_compat import keras, tf


def _np_loss(logits):
    logits = np.asarray(logits, np.float64)
    m = logits.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    return lse - np.diag(logits[:, : logits.shape[0]])


def test_hand_computed_case_with_bank_logq_and_an_accidental_hit():
    q = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    c = tf.constant([[1.0, 0.0], [0.0, 2.0]])          # positives: items "a", "b"
    bank = tf.constant([[0.5, 0.5], [1.0, 1.0]])        # bank items: "b", "c"
    ids = id_hashes(tf.constant(["a", "b", "b", "c"]))
    log_q = tf.math.log(tf.constant([0.5, 0.25, 0.25, 0.125]))
    logits = sampled_softmax_logits(q, tf.concat([c, bank], 0), positive_ids=ids[:2], candidate_ids=ids,
                                    candidate_log_q=log_q).numpy()
    # Row 0 (query [1,0], positive a): scores [1, 0, .5, 1] - log q = [1+ln2, 0+ln4, .5+ln4, 1+ln8].
    np.testing.assert_allclose(logits[0], [1 + np.log(2), np.log(4), 0.5 + np.log(4), 1 + np.log(8)], rtol=1e-6)
    # Row 1 (positive b): the bank's copy of b (column 2) is an accidental hit and is masked.
    np.testing.assert_allclose(logits[1, [0, 1, 3]], [np.log(2), 2 + np.log(4), 1 + np.log(8)], rtol=1e-6)
    assert logits[1, 2] == MASKED_LOGIT
    # loss_1 = -log(e^{2+ln4} / (e^{ln2} + e^{2+ln4} + e^{1+ln8})) = -log(4e^2 / (2 + 4e^2 + 8e)).
    expected = -np.log(4 * np.e ** 2 / (2 + 4 * np.e ** 2 + 8 * np.e))
    assert _np_loss(logits)[1] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logits_against_a_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    b, n, d = 6, 15, 4
    q, cands = rng.normal(size=(b, d)), rng.normal(size=(n, d))
    raw_ids = rng.integers(0, 5, n)
    log_q = np.log(rng.uniform(0.01, 0.5, n))
    valid = rng.random(n) < 0.8
    valid[:b] = True
    got = sampled_softmax_logits(tf.constant(q), tf.constant(cands), positive_ids=tf.constant(raw_ids[:b]),
                                 candidate_ids=tf.constant(raw_ids), candidate_log_q=tf.constant(log_q),
                                 candidate_valid=tf.constant(valid), temperature=0.5).numpy()
    ref = q @ cands.T / 0.5 - log_q[None, :]
    for i in range(b):
        for j in range(n):
            if (raw_ids[j] == raw_ids[i] and j != i) or not valid[j]:
                ref[i, j] = MASKED_LOGIT
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def _unfused_reference(q, c, ids, log_q, valid, weights, temperature, num_fresh, fresh_item_softmax):
    """Loss and gradients by automatic differentiation of the unfused logits chain."""
    b = q.shape[0]
    qv, cv = tf.Variable(q), tf.Variable(c)

    def chain(query, cands, n):
        logits = sampled_softmax_logits(query, cands, positive_ids=tf.constant(ids[:b]),
                                        candidate_ids=tf.constant(ids[:n]), candidate_log_q=tf.constant(log_q[:n]),
                                        candidate_valid=tf.constant(valid[:n]), temperature=temperature)
        return softmax_cross_entropy(logits) * tf.constant(weights)

    with tf.GradientTape() as tape:
        f = num_fresh or c.shape[0]
        cands = tf.concat([cv[:f], tf.stop_gradient(cv[f:])], axis=0)
        if fresh_item_softmax:
            query_side = chain(qv, tf.stop_gradient(cands), c.shape[0])
            item_side = chain(tf.stop_gradient(qv), cands[:f], f)
            loss = query_side + item_side - tf.stop_gradient(item_side)
        else:
            loss = chain(qv, cands, c.shape[0])
        total = tf.reduce_sum(loss)
    dq, dc = tape.gradient(total, [qv, cv])
    return loss.numpy(), dq.numpy(), dc.numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_fresh,fresh_item_softmax", [(None, False), (None, True), (9, False), (9, True),
                                                          (6, True)])
def test_fused_loss_equals_autodiff_of_the_unfused_chain(seed, num_fresh, fresh_item_softmax):
    rng = np.random.default_rng(seed)
    b, n, d, tau = 6, 15, 4, 0.7
    q, c = rng.normal(size=(b, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)
    ids = rng.integers(0, 7, n)                   # repeated ids: accidental hits in every part
    log_q = np.log(rng.uniform(0.01, 0.5, n)).astype(np.float32)
    valid = rng.random(n) < 0.7
    valid[:num_fresh or n] = True                 # only stale entries may be empty slots
    weights = rng.uniform(0.5, 2.0, b).astype(np.float32)
    qv, cv = tf.Variable(q), tf.Variable(c)
    with tf.GradientTape() as tape:
        loss, stale = sampled_softmax_loss(
            qv, cv, positive_ids=tf.constant(ids[:b]), candidate_ids=tf.constant(ids),
            candidate_bias=tf.constant(np.where(valid, -log_q, MASKED_LOGIT).astype(np.float32)),
            temperature=tau, num_fresh=num_fresh, fresh_item_softmax=fresh_item_softmax,
            sample_weight=tf.constant(weights))
        total = tf.reduce_sum(loss)
    dq, dc = tape.gradient(total, [qv, cv])
    want_loss, want_dq, want_dc = _unfused_reference(q, c, ids, log_q, valid, weights, tau, num_fresh,
                                                     fresh_item_softmax)
    np.testing.assert_allclose(loss.numpy(), want_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dq.numpy(), want_dq, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dc.numpy(), want_dc, rtol=1e-4, atol=1e-5)
    if num_fresh is not None:
        assert np.abs(dc.numpy()[num_fresh:]).max() == 0.0   # stale entries are constants
        logits = sampled_softmax_logits(tf.constant(q), tf.constant(c), positive_ids=tf.constant(ids[:b]),
                                        candidate_ids=tf.constant(ids), candidate_log_q=tf.constant(log_q),
                                        candidate_valid=tf.constant(valid), temperature=tau).numpy()
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(stale.numpy(), p[:, num_fresh:].sum(axis=1), rtol=1e-4, atol=1e-6)
    else:
        assert not stale.numpy().any()


def test_fused_loss_stays_finite_for_far_outscored_positives():
    # Scores 200 apart: the positive's softmax probability underflows in float32, its loss must not.
    q = tf.constant([[10.0, 0.0]])
    c = tf.constant([[-10.0, 0.0], [10.0, 0.0]])
    loss, _ = sampled_softmax_loss(q, c, positive_ids=tf.constant([0], tf.int64),
                                   candidate_ids=tf.constant([0, 1], tf.int64))
    assert float(loss[0]) == pytest.approx(200.0, rel=1e-6)


def test_fresh_item_softmax_when_the_fresh_mass_underflows():
    # The stale column outscores the fresh ones by ~150: their softmax mass underflows in
    # float32, and the items' gradient must still be the softmax over the fresh columns.
    q = np.array([[10.0, 0.0]], np.float32)
    c = np.array([[-5.0, 0.0], [-6.0, 1.0], [10.0, 0.0]], np.float32)
    ids, log_q, valid, weights = np.arange(3), np.zeros(3, np.float32), np.ones(3, bool), np.ones(1, np.float32)
    qv, cv = tf.Variable(q), tf.Variable(c)
    with tf.GradientTape() as tape:
        loss, stale = sampled_softmax_loss(qv, cv, positive_ids=tf.constant(ids[:1]), candidate_ids=tf.constant(ids),
                                           num_fresh=2, fresh_item_softmax=True)
        total = tf.reduce_sum(loss)
    dq, dc = tape.gradient(total, [qv, cv])
    want_loss, want_dq, want_dc = _unfused_reference(q, c, ids, log_q, valid, weights, 1.0, 2, True)
    np.testing.assert_allclose(loss.numpy(), want_loss, rtol=1e-5)
    np.testing.assert_allclose(dq.numpy(), want_dq, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dc.numpy(), want_dc, rtol=1e-5, atol=1e-5)
    assert float(stale[0]) == pytest.approx(1.0) and np.isfinite(dc.numpy()).all()


def test_memory_size_zero_is_exactly_the_tfrs_in_batch_loss():
    rng = np.random.default_rng(0)
    q = tf.constant(rng.normal(size=(8, 4)), tf.float32)
    c = tf.constant(rng.normal(size=(8, 4)), tf.float32)
    ids = tf.constant(["a", "b", "a", "c", "d", "e", "b", "f"])
    probs = tf.constant(rng.uniform(0.05, 0.5, 8), tf.float32)
    ours = CrossBatchRetrieval(4, memory_size=0, temperature=0.2)(q, c, ids, tf.math.log(probs))
    theirs = tfrs.tasks.Retrieval(temperature=0.2, remove_accidental_hits=True)(
        q, c, candidate_sampling_probability=probs, candidate_ids=ids, compute_metrics=False,
        compute_batch_metrics=False)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)


def test_fifo_order_wrap_around_and_large_batches():
    mem = CrossBatchMemory(5, 2)
    def batch(start, n):
        v = np.arange(start, start + n, dtype=np.float32)
        return tf.constant(np.stack([v, -v], 1)), tf.constant(v / 100), tf.constant(np.arange(start, start + n))
    mem.enqueue(*batch(0, 3))                      # slots 0-2 = items 0,1,2
    emb, _, ids, valid = mem.read()
    assert valid.numpy().tolist() == [True] * 3 + [False] * 2
    mem.enqueue(*batch(3, 3))                      # items 3,4 fill slots 3-4; item 5 overwrites slot 0
    emb, log_q, ids, valid = mem.read()
    assert ids.numpy().tolist() == [5, 1, 2, 3, 4] and valid.numpy().all()
    np.testing.assert_allclose(emb.numpy()[0], [5, -5])
    np.testing.assert_allclose(log_q.numpy()[0], 0.05)
    assert int(mem.pointer.numpy()) == 1
    mem.enqueue(*batch(10, 7))                     # larger than the bank: the newest 5 (12..16) are kept
    _, _, ids, _ = mem.read()
    assert sorted(ids.numpy().tolist()) == [12, 13, 14, 15, 16]
    with pytest.raises(ValueError, match="memory_size"):
        CrossBatchMemory(0, 2)


def test_bank_gets_no_gradient_and_survives_checkpoints(tmp_path):
    task = CrossBatchRetrieval(2, memory_size=4)
    w = tf.Variable([[1.0, 0.5], [0.2, 1.0]])
    items = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    q = tf.constant([[1.0, 1.0], [0.5, -1.0]])
    task(q, items @ w, tf.constant(["a", "b"]), None)        # fills the bank from w
    with tf.GradientTape() as tape:
        loss = task(q, items @ w, tf.constant(["c", "d"]), None)
    grads = tape.gradient(loss, [w, task.memory.embeddings])
    assert grads[0] is not None and grads[1] is None
    assert not task.memory.trainable_weights
    ckpt = tf.train.Checkpoint(task=task)
    path = ckpt.write(str(tmp_path / "ckpt"))
    saved = task.memory.read()[0].numpy().copy()
    task(q, items * 9.0, tf.constant(["e", "f"]), None)       # changes the bank
    ckpt.read(path)
    np.testing.assert_allclose(task.memory.read()[0].numpy(), saved)


@pytest.mark.parametrize("correction", ["none", "mean"])
def test_warmup_switch_and_logq_applies_to_bank_entries(correction):
    rng = np.random.default_rng(1)
    q = tf.constant(rng.normal(size=(3, 4)), tf.float32)
    c = tf.constant(rng.normal(size=(3, 4)), tf.float32)
    log_q = tf.math.log(tf.constant([0.2, 0.3, 0.5]))
    task = CrossBatchRetrieval(4, memory_size=6, warmup_steps=10, drift_correction=correction)
    task(q, c * 2.0, tf.constant(["x", "y", "z"]), log_q, step=0)       # bank now holds x, y, z
    in_batch = CrossBatchRetrieval(4, memory_size=0)(q, c, tf.constant(["a", "b", "c"]), log_q)
    before = task(q, c, tf.constant(["a", "b", "c"]), log_q, step=5, training=False)
    assert float(before) == pytest.approx(float(in_batch), rel=1e-6)     # warm-up: bank ignored
    after = task(q, c, tf.constant(["a", "b", "c"]), log_q, step=10, training=False)
    # After warm-up: batch + the three bank rows, each corrected by its stored log q.
    bank = 2 * c.numpy()
    if correction == "mean":
        # Stored centred on their own batch's mean, read back around the current one.
        bank = bank - bank.mean(axis=0) + c.numpy().mean(axis=0)
    cands = np.concatenate([c.numpy(), bank])
    logits = q.numpy() @ cands.T - np.log(np.concatenate([[0.2, 0.3, 0.5]] * 2))[None, :]
    assert float(after) == pytest.approx(_np_loss(logits).sum(), rel=1e-5)


def test_mean_correction_cancels_a_common_drift():
    # The encoder moved every item by the same vector d since the bank was filled: with
    # the mean correction the bank reads back exactly the items' current embeddings.
    rng = np.random.default_rng(2)
    q = tf.constant(rng.normal(size=(4, 3)), tf.float32)
    old = rng.normal(size=(4, 3)).astype(np.float32)
    drift = np.array([3.0, -1.0, 0.5], np.float32)
    ids = tf.constant(["a", "b", "c", "d"])
    fresh_ids = tf.constant(["e", "f", "g", "h"])
    corrected = CrossBatchRetrieval(3, memory_size=4, drift_correction="mean")
    corrected(q, tf.constant(old), ids, None)
    corrected(q, tf.constant(old + drift), fresh_ids, None, training=False)
    bank = corrected.memory.read()[0].numpy() + (old + drift).mean(axis=0)
    np.testing.assert_allclose(bank, old + drift, atol=1e-5)
    # The loss is the one of a bank refilled by the current encoder ...
    refreshed = CrossBatchRetrieval(3, memory_size=4, drift_correction="none")
    refreshed(q, tf.constant(old + drift), ids, None)
    want = refreshed(q, tf.constant(old + drift), fresh_ids, None, training=False)
    got = corrected(q, tf.constant(old + drift), fresh_ids, None, training=False)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    # ... and not the one of the stale bank.
    stale = CrossBatchRetrieval(3, memory_size=4, drift_correction="none")
    stale(q, tf.constant(old), ids, None)
    assert float(stale(q, tf.constant(old + drift), fresh_ids, None, training=False)) != pytest.approx(float(want))


def _bank_gradients(item_gradient, correction="none"):
    rng = np.random.default_rng(3)
    q = tf.Variable(rng.normal(size=(4, 3)), dtype=tf.float32)
    c = tf.Variable(rng.normal(size=(4, 3)), dtype=tf.float32)
    log_q = tf.math.log(tf.constant([0.1, 0.2, 0.3, 0.4]))
    task = CrossBatchRetrieval(3, memory_size=8, drift_correction=correction, item_gradient=item_gradient)
    task(q, tf.constant(rng.normal(size=(4, 3)), tf.float32), tf.constant(["w", "x", "y", "a"]), log_q)
    with tf.GradientTape() as tape:
        loss, share = task(q, c, tf.constant(["a", "b", "c", "d"]), log_q, training=False, return_bank_share=True)
    dq, dc = tape.gradient(loss, [q, c])
    return q, c, log_q, task, float(loss), float(share), dq.numpy(), dc.numpy()


def test_item_gradient_batch_keeps_the_item_gradients_balanced():
    q, c, log_q, task, loss_b, share_b, dq_b, dc_b = _bank_gradients("batch")
    _, _, _, _, loss_a, share_a, dq_a, dc_a = _bank_gradients("all")
    # The same loss value and bank share, and the same query gradient (the full softmax).
    assert loss_b == pytest.approx(loss_a, rel=1e-6) and share_b == pytest.approx(share_a, rel=1e-6)
    np.testing.assert_allclose(dq_b, dq_a, rtol=1e-5, atol=1e-6)
    # Items: the gradient of the in-batch softmax alone, which sums to zero over the
    # batch; with the bank's share of the mass in their softmax they get a net pull.
    with tf.GradientTape() as tape:
        in_batch = CrossBatchRetrieval(3, memory_size=0)(q, c, tf.constant(["a", "b", "c", "d"]), log_q)
    np.testing.assert_allclose(dc_b, tape.gradient(in_batch, c).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dc_b.sum(axis=0), 0.0, atol=1e-5)
    assert np.abs(dc_a.sum(axis=0)).max() > 0.1
    # The bank's share by hand: the softmax mass of the bank's columns, averaged over rows.
    bank_emb, bank_log_q, bank_ids, valid = task.memory.read()
    cands = np.concatenate([c.numpy(), bank_emb.numpy()[valid.numpy()]])
    logits = q.numpy() @ cands.T - np.concatenate([log_q.numpy(), bank_log_q.numpy()[valid.numpy()]])[None, :]
    logits[0, 4 + 3] = -np.inf                     # the bank's "a" is row 0's accidental hit
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    assert share_b == pytest.approx(p[:, 4:].sum(axis=1).mean(), rel=1e-5)


def test_hard_negatives_with_a_bank_split_the_gradient_as_the_two_losses_do():
    # item_gradient="batch" with hard negatives: the queries get the gradient of the loss over every
    # candidate, the fresh (batch and uniform) items that of the loss over the fresh ones, by hand.
    rng = np.random.default_rng(4)
    q = tf.Variable(rng.normal(size=(4, 3)), dtype=tf.float32)
    c = tf.Variable(rng.normal(size=(4, 3)), dtype=tf.float32)
    u = tf.Variable(rng.normal(size=(2, 3)), dtype=tf.float32)
    log_q = tf.math.log(tf.constant([0.1, 0.2, 0.3, 0.4]))
    uniform_ids, uniform_log_q = tf.constant(["u", "b"]), tf.fill([2], float(np.log(1 / 10)))
    task = CrossBatchRetrieval(3, memory_size=8, temperature=0.5, num_hard_negatives=3, drift_correction="none")
    task(q, tf.constant(rng.normal(size=(4, 3)), tf.float32), tf.constant(["w", "x", "y", "a"]), log_q)
    bank_emb, bank_log_q, bank_ids, bank_valid = task.memory.read()
    ids = tf.constant(["a", "b", "c", "d"])
    with tf.GradientTape(persistent=True) as tape:
        loss = task(q, c, ids, log_q, extra_negatives=(u, uniform_ids, uniform_log_q, 10), training=False)
        positive = id_hashes(ids)

        def reference(query, items, bank):
            cands = [items, tf.stop_gradient(u) if bank else u] + ([bank_emb] if bank else [])
            cand_ids = tf.concat([positive, id_hashes(uniform_ids)] + ([bank_ids] if bank else []), axis=0)
            unigram = tf.concat([log_q] + ([bank_log_q] if bank else []), axis=0)
            num_unigram = 4.0 + (float(tf.reduce_sum(tf.cast(bank_valid, tf.float32))) if bank else 0.0)
            cand_log_q = mixed_log_q(tf.concat([unigram[:4], uniform_log_q, unigram[4:]], axis=0), num_unigram,
                                     2.0, 10)
            valid = tf.concat([tf.ones([6], tf.bool)] + ([bank_valid] if bank else []), axis=0)
            logits = sampled_softmax_logits(query, tf.concat(cands, axis=0), positive_ids=positive,
                                            candidate_ids=cand_ids, candidate_log_q=cand_log_q,
                                            candidate_valid=valid, temperature=0.5)
            return tf.reduce_sum(softmax_cross_entropy(hard_negative_logits(logits, 3), tf.zeros([4], tf.int32)))

        to_queries = reference(q, tf.stop_gradient(c), bank=True)
        to_items = reference(tf.stop_gradient(q), c, bank=False)
    assert float(loss) == pytest.approx(float(to_queries), rel=1e-6)
    np.testing.assert_allclose(tape.gradient(loss, q).numpy(), tape.gradient(to_queries, q).numpy(), rtol=1e-5,
                               atol=1e-6)
    for x in (c, u):
        np.testing.assert_allclose(tape.gradient(loss, x).numpy(), tape.gradient(to_items, x).numpy(), rtol=1e-5,
                                   atol=1e-6)
    assert np.abs(tape.gradient(loss, u).numpy()).max() > 1e-4


@pytest.mark.parametrize("hard", [0, 3])
def test_logq_weight_scales_every_candidates_correction(hard):
    rng = np.random.default_rng(6)
    q, c, old = (tf.constant(rng.normal(size=(4, 3)), tf.float32) for _ in range(3))
    u = tf.constant(rng.normal(size=(2, 3)), tf.float32)
    log_q = tf.math.log(tf.constant([0.1, 0.2, 0.3, 0.4]))
    ids, extra_ids = tf.constant(["a", "b", "c", "d"]), tf.constant(["u", "v"])

    def loss(weight):
        task = CrossBatchRetrieval(3, memory_size=8, temperature=0.5, num_hard_negatives=hard, logq_weight=weight,
                                   drift_correction="none")
        task(q, old, tf.constant(["w", "x", "y", "z"]), log_q)
        return float(task(q, c, ids, log_q, extra_negatives=(u, extra_ids, tf.fill([2], float(np.log(0.1))), 10),
                          training=False))

    # By hand: the logits of every row over batch, uniform items and bank, less a·log Q of the mixture.
    cands = np.concatenate([c.numpy(), u.numpy(), old.numpy()])
    unigram = np.concatenate([log_q.numpy(), np.log([0.1, 0.2, 0.3, 0.4])])
    mixture = np.log((8 * np.exp(np.concatenate([unigram[:4], [0, 0], unigram[4:]])) + 2 / 10) / 10)
    mixture[4:6] = np.log((8 * np.exp(np.log(0.1)) + 2 / 10) / 10)
    for weight in (0.0, 1.0, 2.5):
        logits = q.numpy() @ cands.T / 0.5 - weight * mixture[None, :]
        if hard:
            keep = np.full(logits.shape, False)
            for i in range(4):
                negatives = np.delete(np.arange(logits.shape[1]), i)
                keep[i, negatives[np.argsort(-logits[i, negatives])[:hard]]] = True
                keep[i, i] = True
            logits = np.where(keep, logits, -np.inf)
        assert loss(weight) == pytest.approx(_np_loss(logits).sum(), rel=1e-5), weight
    with pytest.raises(ValueError, match="logq_weight=-1"):
        CrossBatchRetrieval(3, logq_weight=-1)
    assert CrossBatchRetrieval.from_config(CrossBatchRetrieval(3, logq_weight=1.5).get_config()).logq_weight == 1.5


def test_mixed_log_q_and_hard_negatives_by_hand():
    # 2 unigram draws with q = 0.5, 2 uniform draws over 4 items: Q = (2*0.5 + 2/4) / 4 = 0.375.
    got = mixed_log_q(tf.math.log(tf.constant([0.5])), 2, 2, 4).numpy()
    assert got[0] == pytest.approx(np.log(0.375), rel=1e-6)
    logits = tf.constant([[5.0, 1.0, 3.0, 2.0], [0.0, 4.0, 1.0, 9.0]])
    hard = hard_negative_logits(logits, 2).numpy()
    # Positive first, then the two largest negatives of each row.
    np.testing.assert_allclose(hard, [[5.0, 3.0, 2.0], [4.0, 9.0, 1.0]])


def test_one_step_fit_with_bank_hard_and_mixed_negatives():
    from models.features import ITEM_ID, USER_ID, Feature, Kind, Schema, padded_batch
    from models.logq import ItemLogQ
    from models.two_tower import TwoTowerModel

    keras.utils.set_random_seed(0)
    schema = Schema(user_features=(Feature(USER_ID, Kind.CATEGORICAL, "user"),),
                    item_features=(Feature(ITEM_ID, Kind.CATEGORICAL, "item"),))
    items = [f"i{k}" for k in range(20)]
    vocabs = {USER_ID: [f"u{k}" for k in range(10)], ITEM_ID: items}
    corpus = padded_batch(schema, "item", [{ITEM_ID: i} for i in items])
    model = TwoTowerModel(schema, vocabs, item_log_q=ItemLogQ(items, [0.05] * 20), embedding_dim=8, feature_dim=8,
                          task=CrossBatchRetrieval(8, memory_size=16, warmup_steps=1, num_hard_negatives=5),
                          corpus=corpus, num_mixed_negatives=6)
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    rng = np.random.default_rng(0)
    feats = {USER_ID: tf.constant([f"u{k}" for k in rng.integers(0, 10, 64)]),
             ITEM_ID: tf.constant([f"i{k}" for k in rng.integers(0, 20, 64)])}
    hist = model.fit(tf.data.Dataset.from_tensor_slices(feats).batch(8), epochs=2, verbose=0)
    assert np.isfinite(hist.history["loss"]).all()
    assert int(model.task.memory.count.numpy()) == 16
    # The trackers hold global values, so under a strategy they are logged once, not summed.
    assert model.distribute_reduction_method == "first"
    assert 0 < hist.history["bank_share"][-1] <= 1
    with pytest.raises(ValueError, match="CrossBatchRetrieval"):
        TwoTowerModel(schema, vocabs, corpus=corpus, num_mixed_negatives=3)


def test_mixed_negatives_are_corrected_by_the_mixture_of_their_unigram_q():
    # The model draws U uniform corpus items; every column (batch and uniform) is corrected by
    # Q(i) = (B·q(i) + U/N) / (B + U) with q(i) from `item_log_q`, the uniform items' own q too.
    from models.features import ITEM_ID, USER_ID, Feature, Kind, Schema, padded_batch
    from models.logq import ItemLogQ
    from models.two_tower import TwoTowerModel

    keras.utils.set_random_seed(0)
    schema = Schema(user_features=(Feature(USER_ID, Kind.CATEGORICAL, "user"),),
                    item_features=(Feature(ITEM_ID, Kind.CATEGORICAL, "item"),))
    items = [f"i{k}" for k in range(10)]
    probs = np.arange(1, 11) / 55.0
    corpus = padded_batch(schema, "item", [{ITEM_ID: i} for i in items])
    model = TwoTowerModel(schema, {USER_ID: ["u0", "u1", "u2", "u3"], ITEM_ID: items},
                          item_log_q=ItemLogQ(items, probs), embedding_dim=4, feature_dim=4, hidden_units=(6,),
                          task=CrossBatchRetrieval(4, temperature=0.5), corpus=corpus, num_mixed_negatives=5)
    positives = np.array([0, 3, 3, 8])
    batch = {USER_ID: tf.constant(["u0", "u1", "u2", "u3"]), ITEM_ID: tf.constant([items[k] for k in positives])}
    model._main_loss(batch, training=False)  # build (initializers draw random numbers)
    tf.random.set_seed(11)
    got = float(model._main_loss(batch, training=False))
    tf.random.set_seed(11)
    drawn = tf.random.uniform([5], 0, 10, dtype=tf.int32).numpy()  # the model's draw, replayed
    q = model.query_tower({USER_ID: batch[USER_ID]}).numpy()
    c = model.item_tower({ITEM_ID: batch[ITEM_ID]}).numpy()
    u = model.item_tower({ITEM_ID: tf.constant([items[k] for k in drawn])}).numpy()
    cand_items = np.concatenate([positives, drawn])
    mixture = np.log((4 * probs[cand_items] + 5 / 10) / 9)

    def loss(log_q):
        logits = q @ np.concatenate([c, u]).T / 0.5 - log_q[None, :]
        for i in range(4):  # accidental hits: other columns with row i's item
            logits[i, (cand_items == positives[i]) & (np.arange(9) != i)] = -np.inf
        return _np_loss(logits).sum()

    assert got == pytest.approx(loss(mixture), rel=1e-5)
    # Had the uniform items come with q = 1 (log q = 0), the loss would differ.
    wrong = mixture.copy()
    wrong[4:] = np.log((4 * 1.0 + 5 / 10) / 9)
    assert abs(loss(wrong) - loss(mixture)) > 1e-2


def test_config_round_trip():
    task = CrossBatchRetrieval(8, memory_size=16, warmup_steps=3, temperature=0.1, num_hard_negatives=4,
                               drift_correction="none", item_gradient="all")
    clone = CrossBatchRetrieval.from_config(task.get_config())
    assert clone.get_config() == task.get_config()
    assert (clone.drift_correction, clone.item_gradient) == ("none", "all")
    mem = CrossBatchMemory(7, 3)
    assert CrossBatchMemory.from_config(mem.get_config()).memory_size == 7
    for temperature in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"`temperature` should be a finite number > 0. "
                                             rf"Received: temperature={temperature}$"):
            CrossBatchRetrieval(8, temperature=temperature)
        q, ids = tf.ones((2, 3)), tf.constant([1, 2], tf.int64)
        for fn in (sampled_softmax_loss, sampled_softmax_logits):
            with pytest.raises(ValueError, match=rf"Received: temperature={temperature}$"):
                fn(q, q, positive_ids=ids, candidate_ids=ids, temperature=temperature)
    with pytest.raises(ValueError, match="drift_correction='median'"):
        CrossBatchRetrieval(8, drift_correction="median")
    with pytest.raises(ValueError, match="item_gradient='bank'"):
        CrossBatchRetrieval(8, item_gradient="bank")


TWO_REPLICAS = r"""
import json, numpy as np
from models.tf_compat import tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from models.cross_batch_retrieval import CrossBatchRetrieval

rng = np.random.default_rng(0)
steps = [(rng.normal(size=(8, 4)).astype("float32"), rng.normal(size=(8, 4)).astype("float32"),
          np.array([f"i{k}" for k in rng.integers(0, 30, 8)]), np.log(rng.uniform(.01, .1, 8)).astype("float32"))
         for _ in range(3)]

def run(strategy):
    with strategy.scope():
        task = CrossBatchRetrieval(4, memory_size=12)
    losses = []
    for q, c, ids, lq in steps:
        def fn(q, c, ids, lq):
            return task(q, c, ids, lq, step=100)
        if strategy.num_replicas_in_sync > 1:
            ds = tf.data.Dataset.from_tensors((q, c, ids, lq)).unbatch().batch(8)
            batch = next(iter(strategy.experimental_distribute_dataset(ds)))
            per = strategy.run(fn, args=batch)
            losses.append(float(strategy.reduce("SUM", per, axis=None)))
        else:
            losses.append(float(strategy.run(fn, args=(q, c, ids, lq))))
    emb, log_q, ids, valid = task.memory.read()
    return {"loss": losses, "emb": emb.numpy().tolist(), "ids": ids.numpy().tolist(),
            "count": int(task.memory.count.numpy())}

one = run(tf.distribute.OneDeviceStrategy("/cpu:0"))
two = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
print(json.dumps({"one": one, "two": two}))
"""


def test_two_replica_bank_equals_the_single_replica_bank():
    proc = python_subprocess(TWO_REPLICAS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    one, two = out["one"], out["two"]
    assert two["count"] == one["count"] == 12
    assert two["ids"] == one["ids"]
    # Centred on the global batch mean: summed per replica, then across (float rounding).
    np.testing.assert_allclose(two["emb"], one["emb"], rtol=1e-6, atol=1e-6)
    # Step 1 has an empty bank: each replica's softmax over its local half-batch differs
    # from the global one; from step 2 on both read the same bank.
    assert len(two["loss"]) == 3


def test_feature_drift_by_hand_and_callback(tmp_path):
    from models.feature_drift import FeatureDriftCallback, feature_drift

    # ‖(3,4)‖ + ‖(0,0)‖ = 5.
    assert feature_drift(np.array([[3.0, 4.0], [1.0, 1.0]]), np.array([[0.0, 0.0], [1.0, 1.0]])) == 5.0
    with pytest.raises(ValueError, match="same shape"):
        feature_drift(np.zeros((2, 2)), np.zeros((3, 2)))
    scale = tf.Variable(1.0)
    cb = FeatureDriftCallback(lambda f, training=False: f["x"] * scale, {"x": np.ones((4, 2), np.float32)},
                              every_n_steps=2, deltas=(1, 2), log_dir=str(tmp_path / "tb"))
    cb.on_train_begin()
    for step in range(6):
        scale.assign_add(1.0)
        cb.on_train_batch_end(step)
    # Measurements at steps 0, 2, 4, 6 with scales 1, 3, 5, 7: Δt=1 drift = 4 items × ‖(2,2)‖.
    d1 = [r["drift"] for r in cb.history if r["delta"] == 1]
    np.testing.assert_allclose(d1, [4 * np.sqrt(8)] * 3, rtol=1e-6)
    d2 = [r["drift"] for r in cb.history if r["delta"] == 2]
    np.testing.assert_allclose(d2, [4 * np.sqrt(32)] * 2, rtol=1e-6)
    cb.save_plot(str(tmp_path / "drift.png"))
    assert (tmp_path / "drift.png").stat().st_size > 0


def test_cosine_contrastive_loss_by_hand():
    from models.cosine_contrastive import cosine_contrastive_loss

    q = tf.constant([[1.0, 0.0], [0.0, 2.0]])
    # positives a, b; then a copy of "a" (row 0's accidental hit) and an invalid entry.
    c = tf.constant([[3.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    ids = tf.constant([0, 1, 2, 0, 3], tf.int64)
    valid = tf.constant([True, True, True, True, False])
    got = cosine_contrastive_loss(q, c, positive_ids=ids[:2], candidate_ids=ids, margin=0.5, negative_weight=2.0,
                                  candidate_valid=valid, sample_weight=tf.constant([1.0, 3.0])).numpy()
    # Row 0: cos(pos) = 1; negatives b (cos 1/√2) and c (cos 0): hinge (0.7071 - 0.5) + 0 over 2.
    row0 = (1 - 1.0) + 2.0 * ((1 / np.sqrt(2) - 0.5) + 0.0) / 2
    # Row 1: cos(pos) = 1/√2; negatives a (0), c (1), the second a (0): hinge 0.5 over 3; weight 3.
    row1 = 3.0 * ((1 - 1 / np.sqrt(2)) + 2.0 * 0.5 / 3)
    np.testing.assert_allclose(got, [row0, row1], rtol=1e-6)
    with pytest.raises(ValueError, match="margin"):
        cosine_contrastive_loss(q, c, positive_ids=ids[:2], candidate_ids=ids, margin=1.0, negative_weight=1.0)


def test_ccl_task_uses_batch_uniform_and_bank_candidates():
    from models.cosine_contrastive import cosine_contrastive_loss

    rng = np.random.default_rng(4)
    q = tf.constant(rng.normal(size=(3, 4)), tf.float32)
    c = tf.constant(rng.normal(size=(3, 4)), tf.float32)
    extra = tf.constant(rng.normal(size=(2, 4)), tf.float32)
    task = CrossBatchRetrieval(4, memory_size=4, loss="ccl", margin=0.2, negative_weight=5.0,
                               drift_correction="none")
    task(q, c * 2.0, tf.constant(["x", "y", "a"]), None)                 # bank: x, y, a (one slot empty)
    got = task(q, c, tf.constant(["a", "b", "c"]), tf.zeros([3]), training=False,
               extra_negatives=(extra, tf.constant(["u", "v"]), tf.zeros([2]), 10))
    bank_emb, _, bank_ids, valid = task.memory.read()
    cands = tf.concat([c, extra, bank_emb], 0)
    ids = tf.concat([id_hashes(tf.constant(["a", "b", "c", "u", "v"])), bank_ids], 0)   # the bank's "a" is a hit
    want = cosine_contrastive_loss(q, cands, positive_ids=ids[:3], candidate_ids=ids, margin=0.2, negative_weight=5.0,
                                   candidate_valid=tf.concat([tf.ones([5], tf.bool), valid], 0))
    assert float(got) == pytest.approx(float(tf.reduce_sum(want)), rel=1e-6)
    with pytest.raises(ValueError, match="num_hard_negatives"):
        CrossBatchRetrieval(4, loss="ccl", num_hard_negatives=3)
    clone = CrossBatchRetrieval.from_config(task.get_config())
    assert clone.get_config() == task.get_config()


def test_ccl_with_uniform_negatives_ignores_the_batch_and_the_bank():
    rng = np.random.default_rng(5)
    q = tf.constant(rng.normal(size=(3, 4)), tf.float32)
    c = tf.constant(rng.normal(size=(3, 4)), tf.float32)
    extra = tf.constant(rng.normal(size=(3, 4)), tf.float32)
    task = CrossBatchRetrieval(4, memory_size=4, loss="ccl", margin=-0.5, negative_weight=5.0,
                               drift_correction="none", ccl_negatives="uniform")
    task(q, c * 2.0, tf.constant(["x", "y", "z"]), None, extra_negatives=(extra, tf.constant(["u", "v", "w"]),
                                                                          tf.zeros([3]), 10))
    # The uniform draw holds "b", row 1's positive: an accidental hit, dropped for that row only.
    got = task(q, c, tf.constant(["a", "b", "c"]), tf.zeros([3]), training=False,
               extra_negatives=(extra, tf.constant(["u", "b", "w"]), tf.zeros([3]), 10))
    qn, cn, en = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (q.numpy(), c.numpy(), extra.numpy()))
    want = 0.0
    for i in range(3):
        negatives = [j for j in range(3) if not (i == 1 and j == 1)]
        hinge = sum(max(0.0, float(qn[i] @ en[j]) + 0.5) for j in negatives)
        want += (1 - float(qn[i] @ cn[i])) + 5.0 * hinge / len(negatives)
    assert float(got) == pytest.approx(want, rel=1e-5)
    # With every candidate as a negative the loss differs (margin -0.5: every negative counts).
    everything = CrossBatchRetrieval(4, loss="ccl", margin=-0.5, negative_weight=5.0)
    other = everything(q, c, tf.constant(["a", "b", "c"]), tf.zeros([3]), training=False,
                       extra_negatives=(extra, tf.constant(["u", "b", "w"]), tf.zeros([3]), 10))
    assert float(other) != pytest.approx(want, rel=1e-3)
    with pytest.raises(ValueError, match="extra_negatives"):
        task(q, c, tf.constant(["a", "b", "c"]), tf.zeros([3]), training=False)
    with pytest.raises(ValueError, match="applies to loss='ccl'"):
        CrossBatchRetrieval(4, ccl_negatives="uniform")
    with pytest.raises(ValueError, match="ccl_negatives"):
        CrossBatchRetrieval(4, loss="ccl", ccl_negatives="batch")
    assert CrossBatchRetrieval.from_config(task.get_config()).get_config() == task.get_config()


def test_an_embedding_dim_other_than_the_towers_is_named():
    q = tf.ones((4, 8))
    ids = tf.constant(["a", "b", "c", "d"])
    for memory_size in (0, 32):
        task = CrossBatchRetrieval(embedding_dim=16, memory_size=memory_size)
        with pytest.raises(ValueError, match=r"`embedding_dim` should be the size of the towers' embeddings. "
                                             r"Received: embedding_dim=16, query_embeddings of size 8"):
            task(q, q, ids)
    task = CrossBatchRetrieval(embedding_dim=8)
    with pytest.raises(ValueError, match="embedding_dim=8, candidate_embeddings of size 5"):
        task(q, tf.ones((4, 5)), ids)
