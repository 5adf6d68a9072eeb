"""`CombineToSingleton` and `JoinSingletons` on the DirectRunner (the Dask run is in test_dask_runner)."""

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_jobs.item_frequencies import SumCountsFn
from beam_jobs.singletons import CombineToSingleton, JoinSingletons


def test_combine_to_singleton_matches_combine_globally_including_empty_input():
    with TestPipeline() as p:
        counts = p | "Counts" >> beam.Create([{"a": 1}, {"a": 2, "b": 1}, {"c": 4}])
        empty = p | "Empty" >> beam.Create([])
        # {"a": 1 + 2, "b": 1, "c": 4}
        assert_that(counts | "Mine" >> CombineToSingleton(SumCountsFn()), equal_to([{"a": 3, "b": 1, "c": 4}]),
                    label="Sum")
        assert_that(counts | "Beam" >> beam.CombineGlobally(SumCountsFn()), equal_to([{"a": 3, "b": 1, "c": 4}]),
                    label="BeamSum")
        # An empty input still gives exactly one element: the combination of nothing.
        assert_that(empty | "EmptySum" >> CombineToSingleton(SumCountsFn()), equal_to([{}]), label="EmptyDict")
        assert_that(empty | "EmptyList" >> CombineToSingleton(beam.combiners.ToListCombineFn()), equal_to([[]]),
                    label="EmptyListOut")
        numbers = p | "Numbers" >> beam.Create(list(range(10)))
        # Ten elements: the marker is never counted.
        assert_that(numbers | "Count" >> CombineToSingleton(beam.combiners.CountCombineFn()), equal_to([10]),
                    label="CountOut")


def test_combine_to_singleton_needs_a_combine_fn():
    with pytest.raises(TypeError, match="`fn` should be a beam.CombineFn"):
        CombineToSingleton(sum)


def test_join_singletons():
    with TestPipeline() as p:
        a = p | "A" >> beam.Create([{"x": 1}])
        b = p | "B" >> beam.Create([7])
        assert_that({"counts": a, "num_items": b} | JoinSingletons(),
                    equal_to([{"counts": {"x": 1}, "num_items": 7}]))


@pytest.mark.parametrize("values, received", [([], "0 elements"), ([1, 2], "2 elements")])
def test_join_singletons_rejects_other_sizes(values, received):
    with pytest.raises(Exception, match=f"'b' should hold exactly one element. Received: {received}"):
        with TestPipeline() as p:
            _ = {"a": p | "A" >> beam.Create([0]), "b": p | "B" >> beam.Create(values)} | JoinSingletons()
