"""Transforms over one-element PCollections that need no side input.

Two statistics need a value computed elsewhere in the pipeline: the item vocabulary
(ordered by the item frequencies) and the summary (counts, vocabulary sizes). The usual
Beam idioms pass such values as *side inputs*, and ``beam.CombineGlobally(fn)`` itself
uses one to guarantee an output for an empty input (the combined value is read back as
a side input of a one-element ``Create``). Most runners evaluate a side input once;
Beam's DaskRunner (2.77) evaluates it again inside every task that reads it, together
with everything upstream of it: with side inputs, one run of the statistics job on
Dask read each interaction row group six times and each item-table row group eleven
times (once each on the DirectRunner). These transforms give the same results through
main inputs only:

- `CombineToSingleton(fn)`: ``CombineGlobally(fn)`` that always yields exactly one
  element (``fn`` over nothing for an empty input): a one-element ``Create`` of an
  "empty" marker is flattened with the input and skipped by the combine, so the input
  is never empty and ``without_defaults`` suffices.
- `JoinSingletons()`: ``{name: one-element PCollection}`` -> one dict ``{name: element}``
  (a ``CoGroupByKey`` on a constant key).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Tuple

import apache_beam as beam


class _Empty:
    """The marker element; compared by type, so it survives pickling."""

    def __repr__(self):
        return "<CombineToSingleton empty marker>"


class _SkipEmptyFn(beam.CombineFn):
    """`fn`, ignoring `_Empty` inputs."""

    def __init__(self, fn: beam.CombineFn):
        super().__init__()
        self._fn = fn

    def setup(self, *args, **kwargs):
        self._fn.setup(*args, **kwargs)

    def create_accumulator(self, *args, **kwargs):
        return self._fn.create_accumulator(*args, **kwargs)

    def add_input(self, accumulator, element, *args, **kwargs):
        if isinstance(element, _Empty):
            return accumulator
        return self._fn.add_input(accumulator, element, *args, **kwargs)

    def merge_accumulators(self, accumulators, *args, **kwargs):
        return self._fn.merge_accumulators(accumulators, *args, **kwargs)

    def compact(self, accumulator, *args, **kwargs):
        return self._fn.compact(accumulator, *args, **kwargs)

    def extract_output(self, accumulator, *args, **kwargs):
        return self._fn.extract_output(accumulator, *args, **kwargs)

    def teardown(self, *args, **kwargs):
        self._fn.teardown(*args, **kwargs)


class CombineToSingleton(beam.PTransform):
    """All elements -> one element combined by `fn` (a `beam.CombineFn`), main inputs only."""

    def __init__(self, fn: beam.CombineFn, label: str = None):
        super().__init__(label)
        if not isinstance(fn, beam.CombineFn):
            raise TypeError(f"`fn` should be a beam.CombineFn. Received: fn={fn!r}")
        self._fn = fn

    def expand(self, pcoll):
        # one marker, so the combined input is never empty
        marker = pcoll.pipeline | "EmptyMarker" >> beam.Create([_Empty()], reshuffle=False)
        return ((pcoll, marker)
                # elements + marker
                | "AddEmptyMarker" >> beam.Flatten()
                # -> fn over the elements (the marker skipped)
                | "Combine" >> beam.CombineGlobally(_SkipEmptyFn(self._fn)).without_defaults())


def _one_each(key: Any, grouped: Dict[str, Iterable[Any]]) -> Dict[str, Any]:
    del key
    out = {}
    for name, values in grouped.items():
        values = list(values)
        if len(values) != 1:
            raise ValueError(f"JoinSingletons: PCollection {name!r} should hold exactly one element. "
                             f"Received: {len(values)} elements")
        out[name] = values[0]
    return out


def _with_constant_key(element: Any) -> Tuple[None, Any]:
    return None, element


class JoinSingletons(beam.PTransform):
    """``{name: PCollection with one element}`` -> one element ``{name: element}``.

    Fails (at run time) if an input does not hold exactly one element.
    """

    def expand(self, pcolls):
        if not isinstance(pcolls, dict) or not pcolls:
            raise TypeError(f"JoinSingletons takes a non-empty dict of PCollections. Received: {pcolls!r}")
        keyed = {name: pcoll | f"Key{''.join(w.capitalize() for w in name.split('_'))}" >> beam.Map(
            _with_constant_key) for name, pcoll in pcolls.items()}
        return (keyed
                # (None, {name: [element]})
                | "Group" >> beam.CoGroupByKey()
                # -> {name: element}
                | "OneEach" >> beam.MapTuple(_one_each))
