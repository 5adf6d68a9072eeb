"""CAN co-acts only on real history positions: the padded ones (id 0) never reach the logits."""

import numpy as np
import pytest

from models.features import HISTORY, ITEM_ID, USER_ID
from models.ranking.co_action import SEQUENCE_POOLINGS
from models.ranking.models import CAN, RankingConfig
from models.tf_compat import keras, tf
from tiny_schema import SCHEMA, VOCABS


def _batch():
    # History lengths 2, 0, 1, 3 of max_length 3: padded positions in every row but the last.
    return {USER_ID: np.array(["u1", "u9", "u2", "u1"], object), "age": np.array(["a", "b", "a", "b"], object),
            HISTORY: np.array([["i1", "i2", ""], ["", "", ""], ["i3", "", ""], ["i1", "i2", "i3"]], object),
            ITEM_ID: np.array(["i1", "i3", "i2", "i2"], object), "category": np.array(["c1", "c2", "c1", "c2"], object),
            "tags": np.array([["t1", ""], ["t1", "t2"], ["t2", ""], ["t2", "t1"]], object),
            "price": np.array([1.0, 2.0, 0.5, 1.5], np.float32)}


def _set_row(table, row, values):
    weights = table.embeddings.numpy()
    weights[row] = values
    table.embeddings.assign(weights)


@pytest.mark.parametrize("sequence_pooling", SEQUENCE_POOLINGS)
def test_can_logits_ignore_the_feed_embedding_of_padded_history_positions(sequence_pooling):
    keras.utils.set_random_seed(0)
    config = RankingConfig(embedding_dim=4, hidden_units=(8,), coaction_feed_dim=3, coaction_layer_sizes=(2, 2),
                           coaction_orders=2, sequence_pooling=sequence_pooling)
    model = CAN(SCHEMA, VOCABS, config)
    inputs = {k: tf.constant(v) for k, v in _batch().items()}
    before = model(inputs).numpy()
    ids = model.lookup(inputs)[HISTORY].numpy()
    assert (ids[:3] == 0).any() and (ids[3] != 0).all()
    table = model.feed_embeddings[HISTORY]
    rng = np.random.default_rng(0)

    # The padding row (id 0) of the history's co-action feed table set to large values: same logits.
    _set_row(table, 0, 5.0 * rng.normal(size=3))
    np.testing.assert_allclose(model(inputs).numpy(), before, rtol=1e-6, atol=1e-6)

    # A real item's row does move the logits of exactly the rows whose history holds it (i3: rows 2 and 3).
    _set_row(table, int(ids[2, 0]), 5.0 * rng.normal(size=3))
    moved = ~np.isclose(model(inputs).numpy(), before, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(moved, [False, False, True, True])
