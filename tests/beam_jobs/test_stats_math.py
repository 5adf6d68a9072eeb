"""Tests of the pure statistics math (no Beam)."""

import math

import numpy as np
import pytest

from beam_jobs import stats_math
from beam_jobs.stats_math import EMPTY_VALUE


# -- brute-force reference --------------------------------------------------------
def _value_set(cell):
    if cell is None:
        values = set()
    elif isinstance(cell, str):
        values = {cell}
    else:
        values = {v for v in cell if v is not None}
    values.discard("")
    return values or {EMPTY_VALUE}


def brute_force_mi(columns, features):
    """Expands each item into weighted rows and sums MI with a plain double loop."""
    n = len(columns[features[0]])
    sets = {f: [_value_set(c) for c in columns[f]] for f in features}
    marginal = {}
    for f in features:
        p = {}
        for s in sets[f]:
            for x in s:
                p[x] = p.get(x, 0.0) + 1.0 / len(s) / n
        marginal[f] = p
    k = len(features)
    mi = np.zeros((k, k))
    for i, fx in enumerate(features):
        mi[i, i] = -sum(p * math.log(p) for p in marginal[fx].values())
        for j, fy in enumerate(features):
            if j <= i:
                continue
            rows = []  # (x, y, weight): one weighted row per pair of values of an item
            for a, b in zip(sets[fx], sets[fy]):
                for x in a:
                    for y in b:
                        rows.append((x, y, 1.0 / (len(a) * len(b))))
            total = 0.0
            for x in marginal[fx]:
                for y in marginal[fy]:
                    pxy = sum(w for rx, ry, w in rows if rx == x and ry == y) / n
                    if pxy > 0:
                        total += pxy * math.log(pxy / (marginal[fx][x] * marginal[fy][y]))
            mi[i, j] = mi[j, i] = total
    return mi


def random_items(rng, n):
    """Three correlated item features: single-valued, multi-valued (with empties), with Nones."""
    genre = rng.choice(["g0", "g1", "g2", "g3"], size=n)
    tags = []
    for g in genre:
        size = rng.integers(0, 4)
        pool = ["t0", "t1", "t2", "t3", "t4"]
        if g in ("g0", "g1"):
            pool = pool[:3]
        tags.append(list(rng.choice(pool, size=size)))  # may repeat a tag, may be empty
    decade = [None if rng.random() < 0.1 else f"d{int(g[1]) // 2 + rng.integers(0, 2)}" for g in genre]
    return {"genre": genre.tolist(), "tags": tags, "decade": decade}


# -- mutual information: hand-worked case ---------------------------------------------
def test_mutual_information_hand_worked_multi_valued_and_empty():
    columns = {
        "brand": ["x", "y", "x", None],
        "tags": [["p", "q"], [], ["p"], ["q", "q"]],
    }
    # Items (brand; tags as a set):  1: x;{p,q}  2: y;{<empty>}  3: x;{p}  4: <empty>;{q}
    # Joint weights w(x,y) (item 1 spreads 1/(1*2) over (x,p),(x,q)):
    #   (x,p) = 1/2 + 1 = 1.5,  (x,q) = 0.5,  (y,<empty>) = 1,  (<empty>,q) = 1;  N = 4
    #   p(x,y): .375, .125, .25, .25
    # Marginals: brand x=.5 y=.25 <empty>=.25;  tags p=(.5+1)/4=.375 q=(.5+1)/4=.375 <empty>=.25
    # MI = .375 ln(.375/(.5*.375)) + .125 ln(.125/(.5*.375)) + .25 ln(.25/(.25*.25))
    #      + .25 ln(.25/(.25*.375))
    #    = .375 ln 2 + .125 ln(2/3) + .25 ln 4 + .25 ln(8/3) = 0.8010279577...
    # H(brand) = -(.5 ln .5 + 2 * .25 ln .25) = 1.5 ln 2 = 1.0397207708...
    # H(tags)  = -(2 * .375 ln .375 + .25 ln .25) = 1.0821955300...
    features, mi, nmi = stats_math.feature_mutual_information(columns)
    expected_mi = (.375 * math.log(2) + .125 * math.log(2 / 3) + .25 * math.log(4)
                   + .25 * math.log(8 / 3))
    h_brand = 1.5 * math.log(2)
    h_tags = -(2 * .375 * math.log(.375) + .25 * math.log(.25))
    assert features == ["brand", "tags"]
    np.testing.assert_allclose(mi, [[h_brand, expected_mi], [expected_mi, h_tags]], rtol=1e-12)
    nmi_off = expected_mi / math.sqrt(h_brand * h_tags)
    np.testing.assert_allclose(nmi, [[1.0, nmi_off], [nmi_off, 1.0]], rtol=1e-12)
    assert 0.755 < nmi_off < 0.756


def test_counts_are_integer_and_keyed_by_denominator():
    counts = stats_math.mutual_information_counts(
        {"brand": ["x", "y", "x", None], "tags": [["p", "q"], [], ["p"], ["q", "q"]]})
    assert counts.num_items == 4
    # Item 1 contributes (2, x, p) and (2, x, q); item 3 contributes (1, x, p).
    assert counts.joints[("brand", "tags")] == {
        (2, "x", "p"): 1, (2, "x", "q"): 1, (1, "x", "p"): 1,
        (1, "y", EMPTY_VALUE): 1, (1, EMPTY_VALUE, "q"): 1}
    assert counts.marginals["tags"] == {(2, "p"): 1, (2, "q"): 1, (1, "p"): 1,
                                        (1, "q"): 1, (1, EMPTY_VALUE): 1}


def test_counts_take_the_number_of_items_and_check_it_against_the_columns():
    assert stats_math.mutual_information_counts({}, [], num_items=7).num_items == 7
    assert stats_math.mutual_information_counts({}, []).num_items == 0
    assert stats_math.mutual_information_counts({"brand": ["x", "y"]}, num_items=2).num_items == 2
    with pytest.raises(ValueError, match="same number of items"):
        stats_math.mutual_information_counts({"brand": ["x", "y"]}, num_items=3)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_mutual_information_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    columns = random_items(rng, 60)
    features = ["genre", "tags", "decade"]
    _, mi, _ = stats_math.feature_mutual_information(columns, features)
    np.testing.assert_allclose(mi, brute_force_mi(columns, features), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mutual_information_invariants(seed):
    rng = np.random.default_rng(seed)
    columns = random_items(rng, 500)
    features, mi, nmi = stats_math.feature_mutual_information(columns)
    entropy = np.diag(mi)
    np.testing.assert_array_equal(mi, mi.T)
    np.testing.assert_array_equal(nmi, nmi.T)
    assert (mi >= -1e-12).all()
    assert (mi <= np.minimum.outer(entropy, entropy) + 1e-12).all()
    assert (nmi >= -1e-12).all() and (nmi <= 1 + 1e-12).all()
    np.testing.assert_array_equal(np.diag(nmi), 1.0)
    # The features were built dependent: every off-diagonal MI is clearly positive.
    assert (mi[~np.eye(3, dtype=bool)] > 0.01).all()
    # Diagonal = entropy of the marginal where an item spreads 1/|A| over its set.
    reference = brute_force_mi(columns, features)
    np.testing.assert_allclose(entropy, np.diag(reference), rtol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_mutual_information_of_independent_features_is_near_zero(seed):
    rng = np.random.default_rng(seed)
    n = 200_000
    columns = {"a": rng.choice(["a0", "a1", "a2", "a3", "a4"], size=n),
               "b": rng.choice(["b0", "b1", "b2", "b3", "b4", "b5", "b6"], size=n)}
    columns["copy_of_a"] = columns["a"].copy()
    _, mi, nmi = stats_math.feature_mutual_information(columns, ["a", "b", "copy_of_a"])
    # Plug-in MI of independent variables is biased by about (|A|-1)(|B|-1)/(2N) = 6e-5.
    assert mi[0, 1] < 5e-4
    np.testing.assert_allclose(mi[0, 2], mi[0, 0], rtol=1e-12)  # MI(X; X) = H(X)
    np.testing.assert_allclose(nmi[0, 2], 1.0, rtol=1e-12)


def test_constant_feature_has_zero_entropy_and_zero_normalized_mi():
    columns = {"constant": ["c"] * 5, "varying": ["a", "b", "a", "c", "d"]}
    _, mi, nmi = stats_math.feature_mutual_information(columns)
    assert mi[0, 0] == 0.0
    assert abs(mi[0, 1]) < 1e-15
    assert nmi[0, 0] == 0.0 and nmi[0, 1] == 0.0 and nmi[1, 1] == 1.0


def test_empty_string_and_missing_mean_empty_value_and_duplicates_count_once():
    a = stats_math.mutual_information_counts({"f": ["", None, np.nan, "x"], "g": [[], None, [""], ["y", "y"]]})
    assert a.marginals["f"] == {(1, EMPTY_VALUE): 3, (1, "x"): 1}
    assert a.marginals["g"] == {(1, EMPTY_VALUE): 3, (1, "y"): 1}


def test_all_string_columns_map_the_empty_string_to_empty_value():
    # Only str cells (no None): the single-valued fast path, which must agree with the general one.
    strings = stats_math.mutual_information_counts({"f": ["", "x"], "g": ["y", ""]})
    assert strings.marginals["f"] == {(1, EMPTY_VALUE): 1, (1, "x"): 1}
    assert strings.marginals["g"] == {(1, EMPTY_VALUE): 1, (1, "y"): 1}
    # Joint keys carry the feature values in feature order: (x, <empty>) and (<empty>, y).
    assert strings.joints[("f", "g")] == {(1, "x", EMPTY_VALUE): 1, (1, EMPTY_VALUE, "y"): 1}
    # A batch whose missing value is "" and one whose missing value is None count under the same key.
    with_none = stats_math.mutual_information_counts({"f": [None, "x"], "g": ["y", None]})
    assert with_none.marginals == strings.marginals and with_none.joints == strings.joints
    merged = stats_math.merge_mutual_information_counts([strings, with_none])
    assert merged.marginals["f"] == {(1, EMPTY_VALUE): 2, (1, "x"): 2}
    assert merged.joints[("f", "g")] == {(1, "x", EMPTY_VALUE): 2, (1, EMPTY_VALUE, "y"): 2}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merging_batches_gives_bit_identical_statistics(seed):
    rng = np.random.default_rng(seed)
    columns = random_items(rng, 300)
    features = ["genre", "tags", "decade"]
    whole = stats_math.feature_mutual_information(columns, features)
    cuts = np.sort(rng.choice(np.arange(1, 300), size=4, replace=False))
    bounds = [0, *cuts.tolist(), 300]
    parts = [stats_math.mutual_information_counts(
        {f: columns[f][lo:hi] for f in features}, features) for lo, hi in zip(bounds, bounds[1:])]
    for order in (parts, parts[::-1], [parts[2], parts[0], parts[4], parts[1], parts[3]]):
        merged = stats_math.merge_mutual_information_counts(
            [stats_math.mutual_information_counts({f: [] for f in features}, features)] + list(order))
        features_out, mi, nmi = stats_math.mutual_information_from_counts(merged)
        assert features_out == whole[0]
        np.testing.assert_array_equal(mi, whole[1])
        np.testing.assert_array_equal(nmi, whole[2])


def test_mutual_information_input_errors():
    with pytest.raises(ValueError, match="same number of items"):
        stats_math.mutual_information_counts({"a": ["x"], "b": ["x", "y"]})
    with pytest.raises(ValueError, match="lacks features"):
        stats_math.mutual_information_counts({"a": ["x"]}, ["a", "b"])
    with pytest.raises(ValueError, match="different features"):
        stats_math.MutualInformationCounts(("a",)).merge(stats_math.MutualInformationCounts(("b",)))
    features, mi, nmi = stats_math.feature_mutual_information({"a": [], "b": []})
    assert features == ["a", "b"] and not mi.any() and not nmi.any()


# -- frequencies and vocabularies --------------------------------------------------------
def test_item_frequency_table_orders_by_count_then_id():
    ids, counts, probability, log_q = stats_math.item_frequency_table(
        {"b": 2, "c": 5, "a": 2, "zero": 0, "d": 1})
    # total = 2 + 5 + 2 + 1 = 10; the zero-count item is left out.
    assert ids.tolist() == ["c", "a", "b", "d"]
    assert counts.tolist() == [5, 2, 2, 1]
    np.testing.assert_allclose(probability, [0.5, 0.2, 0.2, 0.1], rtol=1e-15)
    np.testing.assert_allclose(log_q, np.log([0.5, 0.2, 0.2, 0.1]), rtol=1e-15)
    pair = stats_math.item_frequency_table((["b", "c", "a", "d"], [2, 5, 2, 1]))
    for x, y in zip(pair, (ids, counts, probability, log_q)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_item_frequency_table_matches_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    interactions = np.char.add("i", (rng.zipf(1.5, 5000) % 300).astype(str))
    counts = stats_math.count_values(interactions)
    ids, values, probability, _ = stats_math.item_frequency_table(counts)
    assert values.sum() == 5000 and abs(probability.sum() - 1) < 1e-12
    for item, count in zip(ids.tolist(), values.tolist()):
        assert count == int(np.sum(interactions == item))
    # Non-increasing counts; within equal counts ids ascend.
    order = sorted(zip((-values).tolist(), ids.tolist()))
    assert [i for _, i in order] == ids.tolist()


def test_item_frequency_table_errors():
    with pytest.raises(ValueError, match="non-negative"):
        stats_math.item_frequency_table({"a": -1})
    with pytest.raises(ValueError, match="unique"):
        stats_math.item_frequency_table((["a", "a"], [1, 2]))
    with pytest.raises(TypeError, match="counts"):
        stats_math.item_frequency_table(["a", "b", "c"])
    ids, counts, probability, log_q = stats_math.item_frequency_table({})
    assert ids.size == counts.size == probability.size == log_q.size == 0


def test_build_vocabulary_order_min_count_and_excluded_tokens():
    counts = {"b": 3, "a": 3, "c": 7, "": 100, "[OOV]": 50, "rare": 1, "d": 2}
    assert stats_math.build_vocabulary(counts) == ["c", "a", "b", "d", "rare"]
    assert stats_math.build_vocabulary(counts, min_count=3) == ["c", "a", "b"]
    assert stats_math.build_vocabulary({}) == []
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="min_count"):
            stats_math.build_vocabulary(counts, min_count=bad)


def test_id_vocabulary_appends_unseen_ids_in_id_order():
    assert stats_math.id_vocabulary(["c", "a"], ["a", "b", "c", "e", "d", ""]) == ["c", "a", "b", "d", "e"]


def test_count_values_flatten_tokens_and_merge():
    assert stats_math.count_values(np.asarray(["b", "a", "b"], dtype=object)) == {"a": 1, "b": 2}
    assert stats_math.count_values([]) == {}
    tokens = stats_math.flatten_tokens(["x", None, "", ["p", "", "p"], [], np.nan])
    assert tokens.tolist() == ["x", "p", "p"]
    acc = {"a": 1}
    assert stats_math.merge_counts(acc, {"a": 2, "b": 1}) is acc and acc == {"a": 3, "b": 1}
    with pytest.raises(ValueError, match="1-D"):
        stats_math.count_values(np.zeros((2, 2), dtype=str))
