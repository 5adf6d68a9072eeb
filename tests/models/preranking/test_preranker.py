import json
import os

import numpy as np
import pytest

from conftest import python_subprocess
from preranking_helpers import batch
from tiny_schema import SCHEMA, VOCABS
from models.features import HISTORY, ITEM_ID, USER_ID
from models.preranking.losses import DistillationLoss, distillation_loss
from models.preranking.preranker import PreRanker, export_preranker
from models.tf_compat import keras, tf

CHOSEN = (USER_ID, HISTORY, ITEM_ID, "tags", "price")


def _model():
    keras.utils.set_random_seed(1)
    model = PreRanker(SCHEMA, VOCABS, CHOSEN, (6, 3), embedding_dim=4, numeric_stats={"price": [1.0, 0.5]})
    model({k: tf.constant(v) for k, v in batch().items()})
    return model


def test_distillation_loss_by_hand():
    # y = 1, r = 2, p = 0, λ1 = .25: .75·ln 2 + .25·(2 − 0)² = 0.519860 + 1 = 1.519860.
    value = distillation_loss([1.0], [2.0], [0.0], 0.25)
    assert float(value[0]) == pytest.approx(0.75 * np.log(2.0) + 1.0, rel=1e-6)
    # λ1 = 0 is plain BCE, λ1 = 1 the squared logit gap.
    assert float(distillation_loss([0.0], [3.0], [1.0], 0.0)[0]) == pytest.approx(np.log1p(np.e), rel=1e-6)
    assert float(distillation_loss([0.0], [3.0], [1.0], 1.0)[0]) == pytest.approx(4.0)
    loss = DistillationLoss(0.25)
    assert float(loss(tf.constant([[1.0, 2.0]]), tf.constant([0.0]))) == pytest.approx(1.519860, rel=1e-5)
    assert DistillationLoss.from_config(loss.get_config()).get_config() == loss.get_config()
    with pytest.raises(ValueError, match="distillation_weight"):
        DistillationLoss(1.5)


def test_candidate_scores_equal_the_row_aligned_batch_and_config_round_trips():
    model = _model()
    b = batch()
    items = {k: tf.constant(b[k]) for k in (ITEM_ID, "tags", "price")}
    user = {USER_ID: tf.constant(b[USER_ID][:1]), HISTORY: tf.constant(b[HISTORY][:1])}
    tiled = {**{k: tf.constant(np.repeat(v.numpy(), 4, axis=0)) for k, v in user.items()}, **items}
    np.testing.assert_allclose(model.candidate_logits(user, items).numpy(), model(tiled).numpy(), rtol=1e-5)
    config = model.get_config()
    json.dumps(config)
    clone = PreRanker.from_config(config)
    clone({k: tf.constant(v) for k, v in b.items()})
    assert clone.get_config() == config
    with pytest.raises(ValueError, match="item feature"):
        PreRanker(SCHEMA, VOCABS, (USER_ID, "age"), (4,))
    with pytest.raises(ValueError, match="hidden_units"):
        PreRanker(SCHEMA, VOCABS, (ITEM_ID,), (0,))


@pytest.mark.parametrize("stats", [[5.0, 0.0], [5.0, -1.0], [5.0, float("nan")], [float("nan"), 1.0]])
def test_preranker_and_search_reject_numeric_stats_that_would_give_nan_logits(stats):
    from models.preranking.autofas import AutoFASSearch

    message = (r"`numeric_stats\['price'\]` should be \(mean, std\) with a finite mean and a finite std > 0. "
               rf"Received: numeric_stats\['price'\]=\[{stats[0]}, {stats[1]}\]")
    with pytest.raises(ValueError, match=message):
        PreRanker(SCHEMA, VOCABS, CHOSEN, (4,), numeric_stats={"price": stats})
    with pytest.raises(ValueError, match=message):
        AutoFASSearch(SCHEMA, VOCABS, numeric_stats={"price": stats})


def test_numeric_stats_standardize_as_x_minus_mean_over_std():
    # Stats [1, 0.5] on prices x give the logits stats [0, 1] give on (x - 1) / 0.5, same weights.
    model = _model()
    plain = PreRanker(SCHEMA, VOCABS, CHOSEN, (6, 3), embedding_dim=4)
    b = {k: tf.constant(v) for k, v in batch().items()}
    plain(b)
    plain.set_weights(model.get_weights())
    got = model(b).numpy()
    standardized = dict(b, price=(b["price"] - 1.0) / 0.5)  # prices 1, 2, 0.5, 1.5 → 0, 2, -1, 1
    np.testing.assert_allclose(got, plain(standardized).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.embedding.encode_one("price", b["price"]).numpy(), [0.0, 2.0, -1.0, 1.0],
                               atol=1e-6)
    assert not np.allclose(got, plain(b).numpy(), atol=1e-4)  # the logits depend on the price


def test_export_takes_only_the_chosen_features_and_loads_in_a_fresh_process(tmp_path):
    model = _model()
    path = export_preranker(model, str(tmp_path / "preranker"))
    b = batch()
    user = {USER_ID: b[USER_ID][:1], HISTORY: b[HISTORY][:1]}
    items = {k: b[k] for k in (ITEM_ID, "tags", "price")}
    expected = tf.sigmoid(model.candidate_logits({k: tf.constant(v) for k, v in user.items()},
                                                 {k: tf.constant(v) for k, v in items.items()})).numpy()
    np.save(os.path.join(str(tmp_path), "inputs.npy"), {**user, **items}, allow_pickle=True)
    code = f"""
import json, numpy as np
from models.tf_compat import tf
fn = tf.saved_model.load({path!r}).signatures["serving_default"]
inputs = np.load({os.path.join(str(tmp_path), "inputs.npy")!r}, allow_pickle=True).item()
out = fn(**{{k: tf.constant(v) for k, v in inputs.items()}})
print(json.dumps({{"inputs": sorted(fn.structured_input_signature[1]), "outputs": sorted(out),
                  "scores": out["scores"].numpy().tolist()}}))
"""
    proc = python_subprocess(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["inputs"] == sorted(CHOSEN)
    assert result["outputs"] == ["logits", "scores"]
    np.testing.assert_allclose(result["scores"], expected, rtol=1e-5)


def test_export_is_accepted_by_the_serving_cascade_scorer(tmp_path):
    from serving.cascade import CandidateScorer

    model = _model()
    path = export_preranker(model, str(tmp_path / "preranker"))
    scorer = CandidateScorer(path, SCHEMA, "preranker")
    assert scorer.user_inputs == [HISTORY, USER_ID] and scorer.item_inputs == [ITEM_ID, "price", "tags"]
    b = batch()
    # The cascade passes every user feature; the scorer keeps the export's inputs.
    user_tensors = {k: tf.constant(b[k][:1]) for k in (USER_ID, "age", HISTORY)}
    scores = scorer.score(user_tensors, {k: b[k] for k in (ITEM_ID, "category", "tags", "price")})
    assert scores.shape == (4,) and np.all((scores > 0) & (scores < 1))


def test_several_users_in_one_call_score_as_each_user_alone(tmp_path):
    from serving.cascade import CandidateScorer

    model = _model()
    path = export_preranker(model, str(tmp_path / "preranker"))
    scorer = CandidateScorer(path, SCHEMA, "preranker")
    b = batch()
    users = {k: tf.constant(b[k]) for k in (USER_ID, "age", HISTORY)}  # 4 users
    items = {k: b[k] for k in (ITEM_ID, "category", "tags", "price")}
    owner = np.array([3, 0, 3, 1], np.int32)
    alone = np.array([scorer.score({k: v[o:o + 1] for k, v in users.items()},
                                   {k: v[i:i + 1] for k, v in items.items()})[0] for i, o in enumerate(owner)])
    np.testing.assert_allclose(scorer.score(users, items, owner), alone, rtol=1e-5)  # the score_users signature
    # Items encoded once (the export's own ids), then scored from gathered rows.
    assert scorer.encodes_items
    encoded = scorer.encode(items)
    assert sorted(encoded) == scorer.item_inputs and encoded[ITEM_ID].dtype == np.int32
    rows, row_owner = np.array([2, 2, 0, 3, 1]), np.array([3, 0, 3, 1, 0], np.int32)
    want = [scorer.score({k: v[o:o + 1] for k, v in users.items()}, {k: v[i:i + 1] for k, v in items.items()})[0]
            for i, o in zip(rows, row_owner)]
    got = scorer.score(users, {k: v[rows] for k, v in encoded.items()}, row_owner, encoded=True)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    scorer._multi = None  # an export without it: each candidate gets its user's row
    np.testing.assert_allclose(scorer.score(users, items, owner), alone, rtol=1e-5)


@pytest.mark.parametrize("features,hidden", [
    ((ITEM_ID, USER_ID, "price", HISTORY, "tags"), (5, 2)),  # user and item blocks interleaved
    ((USER_ID, "age", ITEM_ID), ()),                         # no hidden layer: the logit layer is split
    ((ITEM_ID, "category", "price"), (3,)),                  # item features only: no user part
])
def test_split_first_layer_equals_the_concatenated_input(features, hidden):
    # Scoring candidates splits the first layer into a per-user and a per-item product;
    # the logits equal the model's own call on row-aligned inputs, for one or several users.
    keras.utils.set_random_seed(2)
    model = PreRanker(SCHEMA, VOCABS, features, hidden, embedding_dim=3, numeric_stats={"price": [1.0, 0.5]})
    b = batch()
    model({k: tf.constant(v) for k, v in b.items()})
    rng = np.random.default_rng(0)
    for v in model.mlp.weights:  # biases too (they start at zero)
        v.assign(rng.normal(size=v.shape).astype(np.float32))
    users = {k: tf.constant(b[k]) for k in (USER_ID, "age", HISTORY)}
    items = {k: tf.constant(b[k]) for k in (ITEM_ID, "category", "tags", "price")}
    owner = np.array([1, 3, 0, 1], np.int32)
    aligned = {**{k: tf.gather(v, owner) for k, v in users.items()}, **items}
    want = model(aligned).numpy()
    np.testing.assert_allclose(model.candidate_logits(users, items, tf.constant(owner)).numpy(), want, rtol=1e-5,
                               atol=1e-6)
    one = {k: v[1:2] for k, v in users.items()}
    want_one = model({**{k: tf.repeat(v, 4, axis=0) for k, v in one.items()}, **items}).numpy()
    np.testing.assert_allclose(model.candidate_logits(one, items).numpy(), want_one, rtol=1e-5, atol=1e-6)
    encoded = model.encode_items(items)
    np.testing.assert_allclose(model.candidate_logits(users, encoded, tf.constant(owner), items_encoded=True).numpy(),
                               want, rtol=1e-5, atol=1e-6)


def test_fit_distilled_can_select_the_epoch_on_the_validation_distillation_loss():
    from models.preranking.training import fit_distilled, predict_logits

    rng = np.random.default_rng(0)
    rows = {k: np.concatenate([v] * 16) for k, v in batch().items()}  # 64 rows
    labels = rng.integers(0, 2, 64).astype(np.float32)
    labels[:2] = [0.0, 1.0]
    teacher = rng.normal(size=64).astype(np.float32)
    model = _model()
    fit = fit_distilled(model, (rows, labels, teacher), (rows, labels, teacher), epochs=4, batch_size=16,
                        learning_rate=0.01, distillation_weight=0.25, patience=4, select_on="distillation")
    curve = fit["validation_distillation_loss"]
    assert len(curve) == len(fit["validation_auc"]) == 4
    assert fit["epochs"] == int(np.argmin(curve)) + 1
    # The restored weights are the kept epoch's: their validation loss, computed by hand.
    logits = predict_logits(model, rows)
    bce = np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits)))
    by_hand = np.mean(0.75 * bce + 0.25 * (teacher - logits) ** 2)
    assert by_hand == pytest.approx(min(curve), abs=1e-4)
    with pytest.raises(ValueError, match="teacher logits"):
        fit_distilled(_model(), (rows, labels, teacher), (rows, labels), epochs=1, batch_size=16,
                      learning_rate=0.01, distillation_weight=0.25, select_on="distillation")
    with pytest.raises(ValueError, match="64 labels but 63 teacher logits"):
        fit_distilled(_model(), (rows, labels, teacher), (rows, labels, teacher[:63]), epochs=1, batch_size=16,
                      learning_rate=0.01, distillation_weight=0.25, select_on="distillation")
    with pytest.raises(ValueError, match="select_on"):
        fit_distilled(_model(), (rows, labels, teacher), None, epochs=1, batch_size=16, learning_rate=0.01,
                      distillation_weight=0.25, select_on="recall")
