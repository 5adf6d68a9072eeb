"""Tests of the Beam transforms on hand-built batches (TestPipeline + assert_that)."""

import math

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import BeamAssertException, assert_that, equal_to

from beam_jobs import stats_math
from beam_jobs.feature_mi import FeatureMutualInformation
from beam_jobs.item_frequencies import ItemFrequencies
from beam_jobs.stats_job import METRICS_NAMESPACE, SplitByKind, ValidateInteractions
from beam_jobs.vocabularies import Vocabularies
from models.features import Feature, Schema

SCHEMA = Schema(
    user_features=(Feature("user_id", "categorical", "user"),
                   Feature("gender", "categorical", "user"),
                   Feature("history", "sequence", "user", max_length=4),
                   Feature("age", "numeric", "user")),
    item_features=(Feature("item_id", "categorical", "item"),
                   Feature("brand", "categorical", "item"),
                   Feature("tags", "multi_categorical", "item", max_length=3)),
    name="hand_built")


def interaction_batches():
    # item counts: a=3 (1+2), b=2 (1+1), c=2, d=1; total 8.
    return [
        pa.record_batch({"user_id": ["u1", "u2", "u1"], "item_id": ["a", "b", "c"]}),
        {"user_id": np.asarray(["u3", "u3"], dtype=object), "item_id": np.asarray(["a", "a"], dtype=object)},
        pa.table({"user_id": ["u1", "u2", "u4"], "item_id": ["c", "b", "d"]}),
    ]


def test_item_frequencies_counts_batches_of_every_supported_type():
    with TestPipeline() as p:
        # Probabilities are count / 8; ties (b, c with 2) ordered by id.
        table = p | beam.Create(interaction_batches(), reshuffle=False) | ItemFrequencies()
        assert_that(table, equal_to([[("a", 3, 0.375), ("b", 2, 0.25), ("c", 2, 0.25), ("d", 1, 0.125)]]))


def test_item_frequencies_of_nothing_is_one_empty_table():
    with TestPipeline() as p:
        table = p | beam.Create([], reshuffle=False) | ItemFrequencies()
        assert_that(table, equal_to([[]]))


def test_vocabularies_per_feature_with_min_count_and_item_order():
    users = [pa.table({"user_id": ["u2", "u1"], "gender": ["f", "m"]}),
             pa.table({"user_id": ["u3"], "gender": [None]})]
    items = [pa.table({"item_id": ["a", "b", "c"], "brand": ["x", "y", "x"],
                       "tags": [["p", "q"], ["q"], []]}),
             pa.table({"item_id": ["e", "d"], "brand": ["z", "x"],
                       "tags": pa.array([["q", ""], None], pa.list_(pa.string()))})]
    frequencies = [[("c", 5, 0.5), ("a", 3, 0.3), ("e", 2, 0.2)]]
    with TestPipeline() as p:
        vocabularies = ({"users": p | "U" >> beam.Create(users, reshuffle=False),
                         "items": p | "I" >> beam.Create(items, reshuffle=False),
                         "item_frequencies": p | "F" >> beam.Create(frequencies, reshuffle=False)}
                        | Vocabularies(SCHEMA, min_count=2))
        assert_that(vocabularies, equal_to([
            ("user_id", ["u1", "u2", "u3"]),      # every id, never pruned
            ("gender", []),                        # f and m once each < min_count; None dropped
            ("item_id", ["c", "a", "e", "b", "d"]),  # by frequency, then unseen b, d by id
            ("brand", ["x"]),                      # x=3; y, z once
            ("tags", ["q"]),                       # q=3 (pad "" dropped); p once
        ]))


def test_vocabularies_rejects_missing_inputs_and_bad_min_count():
    with pytest.raises(ValueError, match="min_count"):
        Vocabularies(SCHEMA, min_count=0)
    p = TestPipeline()
    with pytest.raises(ValueError, match="item_frequencies"):
        _ = {"users": p | "U" >> beam.Create([]), "items": p | "I" >> beam.Create([])} | Vocabularies(SCHEMA)


def _close_to(expected, rtol=1e-12):
    def check(actual):
        if len(actual) != 1:
            raise BeamAssertException(f"expected one element, got {len(actual)}")
        got = actual[0]
        if got["features"] != expected["features"] or got["num_items"] != expected["num_items"]:
            raise BeamAssertException(f"{got} != {expected}")
        for key in ("mi", "normalized_mi"):
            if not np.allclose(got[key], expected[key], rtol=rtol, atol=0):
                raise BeamAssertException(f"{key}: {got[key]} != {expected[key]}")
    return check


def test_feature_mutual_information_over_batches():
    # The hand-worked case of test_stats_math split over two batches of different types:
    # MI(brand; tags) = .375 ln 2 + .125 ln(2/3) + .25 ln 4 + .25 ln(8/3)
    batches = [pa.table({"item_id": ["1", "2"], "brand": ["x", "y"],
                         "tags": [["p", "q"], []]}),
               {"item_id": ["3", "4"], "brand": ["x", None], "tags": [["p"], ["q", "q"]]}]
    mi = .375 * math.log(2) + .125 * math.log(2 / 3) + .25 * math.log(4) + .25 * math.log(8 / 3)
    h_brand = 1.5 * math.log(2)
    h_tags = -(2 * .375 * math.log(.375) + .25 * math.log(.25))
    nmi = mi / math.sqrt(h_brand * h_tags)
    expected = {"features": ["brand", "tags"], "num_items": 4,
                "mi": [[h_brand, mi], [mi, h_tags]], "normalized_mi": [[1.0, nmi], [nmi, 1.0]]}
    with TestPipeline() as p:
        report = p | beam.Create(batches, reshuffle=False) | FeatureMutualInformation(["brand", "tags"])
        assert_that(report, _close_to(expected))


def test_feature_mutual_information_counts_the_items_of_a_catalogue_without_features():
    # Only the id (e.g. the BARS splits): an empty matrix, but the items are still counted.
    batches = [pa.table({"item_id": ["1", "2", "3"]}), {"item_id": ["4", "5"]},
               pa.table({"item_id": pa.array([], pa.string())})]
    with TestPipeline() as p:
        report = p | beam.Create(batches, reshuffle=False) | FeatureMutualInformation([])
        assert_that(report, equal_to([{"features": [], "mi": [], "normalized_mi": [], "num_items": 5}]))


@pytest.mark.parametrize("seed", [0, 1])
def test_feature_mutual_information_equals_single_process_result_exactly(seed):
    rng = np.random.default_rng(seed)
    n = 400
    brand = rng.choice(["x", "y", "z"], size=n).tolist()
    tags = [list(rng.choice(["p", "q", "r"], size=rng.integers(0, 3))) for _ in range(n)]
    features, mi, nmi = stats_math.feature_mutual_information({"brand": brand, "tags": tags})
    cuts = [0, 37, 150, 151, 400]
    batches = [pa.table({"brand": brand[lo:hi], "tags": pa.array(tags[lo:hi], pa.list_(pa.string()))})
               for lo, hi in zip(cuts, cuts[1:])]
    with TestPipeline() as p:
        report = p | beam.Create(batches) | FeatureMutualInformation(["brand", "tags"])
        assert_that(report, equal_to([{"features": features, "mi": mi.tolist(),
                                       "normalized_mi": nmi.tolist(), "num_items": n}]))


def test_validate_interactions_splits_rows_and_counts_metrics():
    table = pa.table({"user_id": ["u1", None, "", "u2", "u3", "u4"],
                      "item_id": ["a", "a", "b", None, "zz", "b"]})
    item_ids = np.asarray(["a", "b"])
    with TestPipeline() as p:
        outputs = (p
                   | beam.Create([("f.parquet", 10, table)], reshuffle=False)
                   | beam.ParDo(ValidateInteractions(), item_ids)
                   | SplitByKind())
        valid = outputs["valid"] | "Rows" >> beam.FlatMap(lambda t: list(zip(*t.to_pydict().values())))
        assert_that(valid, equal_to([("u1", "a"), ("u4", "b")]), label="Valid")
        dead = outputs["dead_letter"] | "Parse" >> beam.FlatMap(lambda lines: map(__import__("json").loads, lines))
        # Records are file rows: first_row 10 + index in the batch.
        assert_that(dead, equal_to([
            {"file": "f.parquet", "record": 11, "reason": "null_user_id", "user_id": None, "item_id": "a"},
            {"file": "f.parquet", "record": 12, "reason": "empty_user_id", "user_id": "", "item_id": "b"},
            {"file": "f.parquet", "record": 13, "reason": "null_item_id", "user_id": "u2", "item_id": None},
            {"file": "f.parquet", "record": 14, "reason": "unknown_item_id", "user_id": "u3", "item_id": "zz"},
        ]), label="DeadLetters")
        assert_that(outputs["counts"], equal_to([{
            "interactions/rows_read": 6, "interactions/positive_rows": 2, "interactions/null_user_id": 1,
            "interactions/empty_user_id": 1, "interactions/null_item_id": 1,
            "interactions/unknown_item_id": 1}]), label="Counts")
    result = p.result
    counters = {c.key.metric.name: c.committed
                for c in result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]}
    assert counters["interactions_read"] == 6
    assert counters["interactions_rejected_unknown_item_id"] == 1
    assert counters["interactions_rejected_null_user_id"] == 1


def test_validate_interactions_keeps_positives_and_rejects_null_labels():
    table = pa.table({"user_id": ["u1", "u2", "u3", "u4", "u5"], "item_id": ["a", "b", "a", "a", "b"],
                      "label": [1.0, 0.0, None, float("nan"), 2.0]})
    with TestPipeline() as p:
        outputs = (p
                   | beam.Create([("f.parquet", 0, table)], reshuffle=False)
                   | beam.ParDo(ValidateInteractions(positives_only=True), np.asarray(["a", "b"]))
                   | SplitByKind())
        valid = outputs["valid"] | "Rows" >> beam.FlatMap(lambda t: list(zip(*t.to_pydict().values())))
        # u2 is valid but a negative (label 0): not a training positive, not a dead letter.
        assert_that(valid, equal_to([("u1", "a"), ("u5", "b")]), label="Valid")
        assert_that(outputs["counts"], equal_to([{
            "interactions/rows_read": 5, "interactions/positive_rows": 2,
            "interactions/null_label": 2}]), label="Counts")
