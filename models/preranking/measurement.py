"""Micro-benchmarks behind the AutoFAS latency table (the I/O edge of `latency.py`).

Every cost is the *marginal* time of one unit of work inside a compiled function,
which removes the fixed per-call overhead (Python → TF dispatch, output copies) that
would otherwise dominate sub-millisecond layers: a function doing the work ``k`` times
(on ``k`` independent weight sets, so no common-subexpression elimination can merge
them) is timed for ``k = 1`` and ``k = chain``; the cost is
``(median t_chain − median t_1) / (chain − 1)``. Medians over `repeats` calls (after
warm-up) because the serving machine may be shared and timings under load are noisy;
negative differences (noise) are clipped to 0.

* Feature cost L_i: the feature's input array made a tensor, embedding gather (+ masked
  mean for multi-valued and sequence features) — how the pre-ranker fetches features,
  each an input of its own — for one user row (user features, broadcast afterwards) or
  N candidate rows (item features), plus an externally configured cost for features a
  deployment fetches from a remote store. A user feature arrives as strings and is
  looked up (``StringLookup``) first. An item feature arrives as the vocabulary ids the
  serving cascade encoded once when it loaded the model (the ``score_users_encoded``
  signature, `models.signatures`), so its cost has no lookup; ``items_encoded=False``
  measures the ``serving_default`` path, where candidates arrive as strings and each is
  looked up per request.
* Operator cost T_{a×b}: one ReLU dense layer ``[N, a] → [N, b]``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import numpy as np

from models.features import Kind, Schema
from models.preranking.latency import LatencyTable
from models.tf_compat import keras, tf
from models.towers import make_lookup


def _median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def marginal_cost_ms(build: Callable[[int], Callable[[], Any]], chain: int, repeats: int) -> float:
    """``(median t(chain) − median t(1)) / (chain − 1)``, clipped at 0 (ms).

    Args:
      build: ``k`` → a zero-argument callable doing the unit of work ``k`` times.
    """
    if chain < 2:
        raise ValueError(f"`chain` should be >= 2. Received: chain={chain}")
    if repeats < 1:
        raise ValueError(f"`repeats` should be >= 1. Received: repeats={repeats}")
    one, many = build(1), build(chain)
    # Interleave the two timings so that a load change hits both alike.
    t_one, t_many = [], []
    for _ in range(3):
        t_one.append(_median_ms(one, max(1, repeats // 3)))
        t_many.append(_median_ms(many, max(1, repeats // 3)))
    return max(0.0, (float(np.median(t_many)) - float(np.median(t_one))) / (chain - 1))


def _dense_chain(inputs: tf.Tensor, output_width: int, k: int, seed: int) -> Callable[[], Any]:
    rng = np.random.default_rng(seed)
    a = int(inputs.shape[-1])
    # Variables, like a served model's weights (constants would be folded away).
    kernels = [tf.Variable((rng.normal(size=(a, output_width)) / np.sqrt(a)).astype(np.float32)) for _ in range(k)]
    biases = [tf.Variable(rng.normal(size=(output_width,)).astype(np.float32)) for _ in range(k)]

    @tf.function
    def run(x):
        return [tf.nn.relu(tf.matmul(x, w) + b) for w, b in zip(kernels, biases)]

    return lambda: [t.numpy() for t in run(inputs)][:0]


def measure_operator_costs(input_widths: Sequence[int], output_widths: Sequence[int], candidates: int = 1000,
                           repeats: int = 30, chain: int = 6, seed: int = 0) -> np.ndarray:
    """T_{a×b} (ms) for every ``a`` in `input_widths`, ``b`` in `output_widths`: ``[A, B]``."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(input_widths), len(output_widths)))
    for i, a in enumerate(input_widths):
        x = tf.constant(rng.normal(size=(int(candidates), int(a))).astype(np.float32))
        for j, b in enumerate(output_widths):
            out[i, j] = marginal_cost_ms(lambda k: _dense_chain(x, int(b), k, seed + i * 101 + j), chain, repeats)
    return out


def _feature_chain(feature, vocabulary: Sequence[str], values: np.ndarray, embedding_dim: int,
                   k: int, encoded: bool = False) -> Callable[[], Any]:
    """``k`` independent fetches of one feature, each from its own input as a served call
    receives it: array → tensor, (lookup +) gather (+ masked mean). With `encoded`, the
    input is already vocabulary ids (int32) and nothing is looked up."""
    lookups = [make_lookup(vocabulary, f"{feature.name}_{c}") for c in range(k)]
    width = 1 if feature.kind == Kind.NUMERIC else embedding_dim
    tables = [keras.layers.Embedding(int(lookups[0].vocabulary_size()), width) for _ in range(k)]
    if encoded:
        values = lookups[0](tf.constant(values)).numpy().astype(np.int32)
        lookups = [None] * k
    arrays = [values.copy() for _ in range(k)]  # one request input per fetch

    @tf.function
    def run(xs):
        outs = []
        for x, lookup, table in zip(xs, lookups, tables):
            ids = x if lookup is None else lookup(x)
            emb = table(ids)
            if feature.kind in (Kind.MULTI_CATEGORICAL, Kind.SEQUENCE):
                mask = tf.cast(tf.not_equal(ids, 0), emb.dtype)[..., tf.newaxis]
                emb = tf.math.divide_no_nan(tf.reduce_sum(emb * mask, 1), tf.reduce_sum(mask, 1))
            outs.append(emb)
        return outs

    return lambda: [t.numpy() for t in run([tf.convert_to_tensor(a) for a in arrays])][:0]


def _numeric_chain(values: np.ndarray, k: int) -> Callable[[], Any]:
    arrays = [values.astype(np.float32) for _ in range(k)]
    shifts = [tf.Variable(float(c)) for c in range(k)]

    @tf.function
    def run(xs):
        return [((x - s) / 1.5)[:, tf.newaxis] for x, s in zip(xs, shifts)]

    return lambda: [t.numpy() for t in run([tf.convert_to_tensor(a) for a in arrays])][:0]


def measure_feature_costs(schema: Schema, vocabularies: Mapping[str, Sequence[str]],
                          samples: Mapping[str, np.ndarray], features: Sequence[str], embedding_dim: int,
                          candidates: int = 1000, repeats: int = 30, chain: int = 4,
                          items_encoded: bool = True) -> Dict[str, float]:
    """L_i (ms) of fetching and embedding each feature for one request.

    Args:
      samples: feature → model-input rows (`inputs_from_frame` layout, at least one
        row); item features are tiled to `candidates` rows, user features take one row.
      features: the features to measure.
      items_encoded: item features arrive as vocabulary ids encoded in advance (the
        serving cascade's path), not as strings (see the module docstring).
    """
    out = {}
    for name in features:
        feature = schema.feature(name)
        if name not in samples or len(samples[name]) == 0:
            raise ValueError(f"`samples` should hold at least one row of {name!r}")
        rows = 1 if feature.side == "user" else int(candidates)
        values = np.asarray(samples[name])
        values = values[np.arange(rows) % len(values)]
        if feature.kind == Kind.NUMERIC:
            out[name] = marginal_cost_ms(lambda k: _numeric_chain(values, k), chain, repeats)
        else:
            vocab = vocabularies[feature.vocabulary_name]
            encoded = items_encoded and feature.side == "item"
            out[name] = marginal_cost_ms(lambda k: _feature_chain(feature, vocab, values, embedding_dim, k, encoded),
                                         chain, repeats)
    return out


def measure_latency_table(schema: Schema, vocabularies: Mapping[str, Sequence[str]],
                          samples: Mapping[str, np.ndarray], features: Sequence[str], embedding_dim: int,
                          operator_widths: Sequence[int], input_widths: Sequence[int], candidates: int = 1000,
                          external_costs: Optional[Mapping[str, float]] = None, repeats: int = 30,
                          seed: int = 0, items_encoded: bool = True) -> LatencyTable:
    """Measures L_i and T_{a×b} on this machine and returns the `LatencyTable`.

    ``output_widths`` = the dense operator widths and 1 (the logit head);
    `input_widths` should cover the full input width and every operator width.
    `external_costs` (ms) are added to the measured cost of the named features;
    `items_encoded` as in `measure_feature_costs`.
    """
    external = dict(external_costs or {})
    unknown = sorted(set(external) - set(features))
    if unknown:
        raise ValueError(f"`external_costs` names features that are not searched: {unknown}; "
                         f"searched: {list(features)}")
    start = time.perf_counter()
    feature_costs = measure_feature_costs(schema, vocabularies, samples, features, embedding_dim, candidates,
                                          repeats, items_encoded=items_encoded)
    measured = dict(feature_costs)
    for name, cost in external.items():
        feature_costs[name] += float(cost)
    grid = sorted({int(w) for w in input_widths})
    outputs = sorted({int(w) for w in operator_widths if int(w) > 0} | {1})
    costs = measure_operator_costs(grid, outputs, candidates, repeats, seed=seed)
    # A wider layer never costs less: take the running maximum over the input grid to
    # remove inversions that are measurement noise.
    costs = np.maximum.accumulate(costs, axis=0)
    details = {"method": "marginal cost in a compiled chain, median over repeats", "repeats": int(repeats),
               "item_features": "encoded ids" if items_encoded else "strings",
               "measured_feature_costs": measured, "external_feature_costs": external,
               "seconds": round(time.perf_counter() - start, 2)}
    return LatencyTable(candidates=int(candidates), feature_costs=feature_costs, input_widths=tuple(grid),
                        output_widths=tuple(outputs), operator_costs=costs, details=details)


__all__ = ["marginal_cost_ms", "measure_feature_costs", "measure_latency_table", "measure_operator_costs"]
