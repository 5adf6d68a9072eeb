"""`FeatureMutualInformation`: MI between the categorical item features of the catalogue.

A thin adapter over `stats_math.mutual_information_counts` (per batch of items) and
`stats_math.mutual_information_from_counts` (once, after merging); the estimator, its
multi-valued weighting and the normalization are documented in `beam_jobs.stats_math`.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Sequence

import apache_beam as beam

from beam_jobs import stats_math
from beam_jobs.singletons import CombineToSingleton
from beam_jobs.item_frequencies import batch_columns, batch_rows


class CountFeatureCooccurrences(beam.DoFn):
    """Item batch -> `MutualInformationCounts` of the batch."""

    def __init__(self, features: Sequence[str]):
        super().__init__()
        self._features = tuple(features)

    def process(self, batch) -> Iterable[stats_math.MutualInformationCounts]:
        columns = batch_columns(batch, self._features)
        yield stats_math.mutual_information_counts(columns, self._features, num_items=batch_rows(batch))


class MergeMutualInformationCountsFn(beam.CombineFn):
    """Adds `MutualInformationCounts` (exact integer counts, any order)."""

    def __init__(self, features: Sequence[str]):
        super().__init__()
        self._features = tuple(features)

    def create_accumulator(self):
        return stats_math.MutualInformationCounts(self._features)

    def add_input(self, accumulator, counts):
        return accumulator.merge(counts)

    def merge_accumulators(self, accumulators):
        # Only the first accumulator may be mutated (Beam's CombineFn contract).
        accumulators = iter(accumulators)
        out = next(accumulators, None)
        out = self.create_accumulator() if out is None else out
        for other in accumulators:
            out.merge(other)
        return out

    def extract_output(self, accumulator):
        return accumulator


def mutual_information_report(counts: stats_math.MutualInformationCounts) -> Dict[str, Any]:
    """``{"features", "mi", "normalized_mi", "num_items"}`` with JSON-ready lists."""
    features, mi, nmi = stats_math.mutual_information_from_counts(counts)
    return {"features": features, "mi": mi.tolist(), "normalized_mi": nmi.tolist(),
            "num_items": int(counts.num_items)}


class FeatureMutualInformation(beam.PTransform):
    """Item-table batches -> one element: the MI report of the categorical item features.

    Input: PCollection of item-table batches (`pyarrow.RecordBatch`/`Table` or dicts of
    columns) with the columns `features` (strings, or lists of strings for
    multi-valued features).
    Output: PCollection with exactly one element
    ``{"features": [f], "mi": [f][f], "normalized_mi": [f][f], "num_items": n}``
    (MI in nats; see `beam_jobs.stats_math`).
    """

    def __init__(self, features: Sequence[str], label: str = None):
        super().__init__(label)
        features = tuple(features)
        if len(set(features)) != len(features):
            raise ValueError(f"`features` should be unique. Received: features={list(features)}")
        self._features = features

    def expand(self, batches):
        return (
            batches
            # item batch -> MutualInformationCounts of the batch
            | "CountCooccurrences" >> beam.ParDo(CountFeatureCooccurrences(self._features))
            # MutualInformationCounts per batch -> one merged MutualInformationCounts
            | "MergeCounts" >> CombineToSingleton(MergeMutualInformationCountsFn(self._features))
            # merged counts -> {"features", "mi", "normalized_mi", "num_items"}
            | "ComputeMutualInformation" >> beam.Map(mutual_information_report))
