import itertools

import numpy as np
import pytest

from models.preranking.latency import (IDENTITY, LatencyTable, architecture_latency, expected_architecture_latency,
                                       expected_feature_latency, expected_input_width)
from models.preranking.measurement import marginal_cost_ms, measure_operator_costs
from models.tf_compat import tf


def _linear_table():
    # T(a, b) = a·b / 20 on the grid a ∈ {2, 4, 8}, b ∈ {1, 2, 4}.
    widths_in, widths_out = (2, 4, 8), (1, 2, 4)
    costs = [[a * b / 20.0 for b in widths_out] for a in widths_in]
    return LatencyTable(candidates=1000, feature_costs={"u": 0.1, "i": 0.3}, input_widths=widths_in,
                        output_widths=widths_out, operator_costs=costs)


def test_expected_latency_of_a_mixop_chain_by_hand():
    # Operators (identity, dense 2, dense 4); input width 8; T(a, b) = a·b/20.
    # Mixop 1, α = (.5, .25, .25): .25·T(8,2) + .25·T(8,4) = .25·.8 + .25·1.6 = 0.6
    #   → P(width 8) = .5, P(2) = .25, P(4) = .25
    # Mixop 2, α = (.2, .3, .5):
    #   dense 2: .3·(.5·.8 + .25·.2 + .25·.4) = .3·.55 = .165
    #   dense 4: .5·(.5·1.6 + .25·.4 + .25·.8) = .5·1.1 = .55          → 0.715
    #   → P(8) = .2·.5 = .1, P(2) = .3 + .2·.25 = .35, P(4) = .5 + .2·.25 = .55
    # Head (b = 1): .1·.4 + .35·.1 + .55·.2 = .185.   Total 0.6 + 0.715 + 0.185 = 1.5.
    table = _linear_table()
    probs = [tf.constant([0.5, 0.25, 0.25]), tf.constant([0.2, 0.3, 0.5])]
    value = expected_architecture_latency(probs, (IDENTITY, 2, 4), 8.0, table)
    assert float(value) == pytest.approx(1.5, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expected_latency_matches_brute_force_over_paths(seed):
    rng = np.random.default_rng(seed)
    widths_in, widths_out = (1, 3, 6, 10, 16), (1, 3, 6)
    costs = rng.uniform(0.01, 1.0, size=(5, 3))
    table = LatencyTable(candidates=10, feature_costs={}, input_widths=widths_in, output_widths=widths_out,
                         operator_costs=costs)
    ops = (IDENTITY, 3, 6)
    layers = [rng.dirichlet(np.ones(3)) for _ in range(3)]
    input_width = 10
    expected = 0.0
    for path in itertools.product(range(3), repeat=3):
        prob, width, cost = 1.0, input_width, 0.0
        for layer, j in zip(layers, path):
            prob *= layer[j]
            if ops[j] != IDENTITY:
                cost += costs[widths_in.index(width), widths_out.index(ops[j])]
                width = ops[j]
        cost += costs[widths_in.index(width), widths_out.index(1)]
        expected += prob * cost
    value = expected_architecture_latency([tf.constant(p, tf.float32) for p in layers], ops, input_width, table)
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_interpolation_and_gradient_in_the_input_width():
    table = LatencyTable(candidates=1, feature_costs={}, input_widths=(4, 8), output_widths=(1,),
                         operator_costs=[[1.0], [3.0]])
    a = tf.Variable(6.0)
    with tf.GradientTape() as tape:
        cost = table.operator_cost(a, 1)
    assert float(cost) == pytest.approx(2.0)  # halfway between 1 and 3
    assert float(tape.gradient(cost, a)) == pytest.approx(0.5)  # slope (3 − 1) / (8 − 4)
    assert float(table.operator_cost(2.0, 1)) == pytest.approx(1.0)  # clamped below the grid
    assert float(table.operator_cost(20.0, 1)) == pytest.approx(3.0)  # and above it
    with pytest.raises(ValueError, match="output_width"):
        table.operator_cost(4, 7)


def test_feature_latency_and_input_width_are_the_weighted_sums():
    # Eq. 3: .5·2 + 1·.25 + 0·4 = 1.25 ms; width .5·8 + 1·8 + 0·1 = 12.
    assert float(expected_feature_latency([0.5, 1.0, 0.0], [2.0, 0.25, 4.0])) == pytest.approx(1.25)
    assert float(expected_input_width([0.5, 1.0, 0.0], [8, 8, 1])) == pytest.approx(12.0)
    with pytest.raises(ValueError, match="same shape"):
        expected_feature_latency([0.5], [1.0, 2.0])


def test_architecture_latency_of_a_derived_mlp():
    # 8 → 4 → 2 → 1: T(8,4) + T(4,2) + T(2,1) = 1.6 + .4 + .1 = 2.1.
    assert architecture_latency((4, 2), 8, _linear_table()) == pytest.approx(2.1)
    assert architecture_latency((), 8, _linear_table()) == pytest.approx(0.4)


def test_table_round_trip_and_validation(tmp_path):
    table = _linear_table()
    assert LatencyTable.from_dict(table.to_dict()) == table
    assert LatencyTable.load(table.save(str(tmp_path / "t.json"))) == table
    with pytest.raises(ValueError, match="operator_costs"):
        LatencyTable(candidates=1, feature_costs={}, input_widths=(1, 2), output_widths=(1,), operator_costs=[[1.0]])
    with pytest.raises(ValueError, match="input_widths"):
        LatencyTable(candidates=1, feature_costs={}, input_widths=(2, 1), output_widths=(1,),
                     operator_costs=[[1.0], [1.0]])
    with pytest.raises(ValueError, match="feature_costs"):
        LatencyTable(candidates=1, feature_costs={"x": -1}, input_widths=(1,), output_widths=(1,),
                     operator_costs=[[1.0]])
    with pytest.raises(ValueError, match="Unknown latency table keys"):
        LatencyTable.from_dict({**table.to_dict(), "extra": 1})


def test_marginal_cost_removes_the_fixed_overhead(monkeypatch):
    # A unit of 2 ms with 5 ms of fixed overhead per call, timed on a fake clock that each
    # call advances: marginal = 2 ms; a chain measured cheaper than one unit (noise) gives 0.
    import types

    from models.preranking import measurement

    clock = [0.0]
    monkeypatch.setattr(measurement, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def build(k, unit=0.002):
        def call():
            clock[0] += 0.005 + unit * k
        return call

    assert marginal_cost_ms(build, chain=3, repeats=6) == pytest.approx(2.0, rel=1e-6)
    assert marginal_cost_ms(lambda k: build(k, unit=-0.001), chain=3, repeats=6) == 0.0
    with pytest.raises(ValueError, match="chain"):
        marginal_cost_ms(build, chain=1, repeats=3)


def test_measured_operator_costs_grow_with_the_layer_size():
    costs = measure_operator_costs([8, 256], [1, 256], candidates=1000, repeats=6, chain=4)
    assert costs.shape == (2, 2) and np.all(costs >= 0)
    # 1000×256×256 multiply-adds cost far more than 1000×8×1.
    assert costs[1, 1] > costs[0, 0]


@pytest.mark.parametrize("items_encoded", [True, False])
def test_item_features_are_looked_up_only_on_the_strings_path(monkeypatch, items_encoded):
    """The cascade scores candidates on ids encoded when the model was loaded: with
    `items_encoded` an item feature's cost has no string lookup; a user feature always has one."""
    from models.preranking import measurement
    from preranking_helpers import batch
    from tiny_schema import SCHEMA, VOCABS

    calls, make_lookup = [], measurement.make_lookup

    def counting_lookup(vocabulary, name):
        layer = make_lookup(vocabulary, name)

        def lookup(x):
            calls.append((name, x.dtype.name))
            return layer(x)
        lookup.vocabulary_size = layer.vocabulary_size
        return lookup

    monkeypatch.setattr(measurement, "make_lookup", counting_lookup)
    costs = measurement.measure_feature_costs(SCHEMA, VOCABS, batch(), ["age", "tags"], 4, candidates=8, repeats=3,
                                              items_encoded=items_encoded)
    assert set(costs) == {"age", "tags"} and all(c >= 0 for c in costs.values())
    tags = [dtype for name, dtype in calls if name.startswith("tags")]
    ages = [dtype for name, dtype in calls if name.startswith("age")]
    # Each chain (1 and 4 fetches) is traced twice (the first trace builds the embedding tables):
    # 2 × (1 + 4) lookups of a string feature; the encoded path looks the tags up once per chain,
    # outside the timed function, to make its ids.
    assert ages and all(d == "string" for d in ages) and len(ages) == 2 * (1 + 4)
    assert len(tags) == (2 if items_encoded else 2 * (1 + 4))
