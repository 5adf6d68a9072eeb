"""The AutoFAS latency model: a measured cost table and the expected latency of a search state.

Costs are milliseconds to score one request of ``candidates`` candidates (the serving
unit of the pre-ranker) and come from micro-benchmarks on the serving machine
(`models.preranking.measurement`), never from FLOP counts:

* ``feature_costs[i]`` = L_i, the cost of fetching and embedding feature i (embedding
  gather + pooling, once for the user after a string lookup, N times for an item
  feature on ids the server encoded in advance), plus the configured cost of features a
  deployment fetches from an external store;
* ``operator_costs[a][b]`` = T_{a×b}, the cost of one ReLU dense layer ``a → b`` on the
  N candidate rows, for ``a`` on the grid ``input_widths`` (linear interpolation
  between grid points, clamped at its ends) and ``b`` in ``output_widths`` (exact:
  the candidate operators' widths and 1 for the logit head).

Expected latency of a search state (Li et al., Eq. 3-4 and Fig. 3):

    E[latency]  = Σ_i θ_i L_i                                  (features, Eq. 3)
    E[latency'] = Σ_l Σ_j α_{l,j} E_{d ~ q_{l-1}}[T_{d×w_j}] + E_{d ~ q_L}[T_{d×1}]   (Eq. 4)

where θ_i is the keep probability of feature i, α_l the softmax architecture weights
of Mixop l, w_j the width of its operator j, and q_l the distribution of the width
of Mixop l's output, computed recursively: q_0 = the input width a_0 (the expected
width of the masked input, Σ_i θ_i d_i), and Mixop l moves mass α_{l,j} to w_j for a
dense operator while the identity operator (width 0 below, cost 0: the "zero" layer
that lets the network get shallower) keeps q_{l-1}. The identity's mass on the raw
input is tracked separately because that width is a (differentiable) tensor.

References:
  Li et al., "AutoFAS: Automatic Feature and Architecture Selection for Pre-Ranking
  System", KDD 2022.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Mapping, Sequence, Tuple

import numpy as np

from models.tf_compat import tf

IDENTITY = 0  # operator width that stands for the identity (skip) operator


@dataclasses.dataclass(frozen=True)
class LatencyTable:
    """Measured costs (ms per request of `candidates` candidates).

    Attributes:
      candidates: N, the number of candidates of the measured request.
      feature_costs: feature name → L_i.
      input_widths: increasing grid of layer input widths ``a``.
      output_widths: layer output widths ``b`` (operator widths and 1).
      operator_costs: ``[len(input_widths)][len(output_widths)]`` T_{a×b}.
      details: how the costs were measured (free-form, reported).
    """

    candidates: int
    feature_costs: Mapping[str, float]
    input_widths: Tuple[int, ...]
    output_widths: Tuple[int, ...]
    operator_costs: Tuple[Tuple[float, ...], ...]
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.candidates, bool) or int(self.candidates) != self.candidates or self.candidates < 1:
            raise ValueError(f"`candidates` should be a positive integer. Received: candidates={self.candidates!r}")
        object.__setattr__(self, "feature_costs", {str(k): float(v) for k, v in dict(self.feature_costs).items()})
        for name, cost in self.feature_costs.items():
            if not np.isfinite(cost) or cost < 0:
                raise ValueError(f"`feature_costs[{name!r}]` should be a finite cost >= 0. Received: {cost!r}")
        object.__setattr__(self, "input_widths", tuple(int(w) for w in self.input_widths))
        object.__setattr__(self, "output_widths", tuple(int(w) for w in self.output_widths))
        if not self.input_widths or any(b <= a for a, b in zip(self.input_widths, self.input_widths[1:])):
            raise ValueError(f"`input_widths` should be a non-empty increasing grid. "
                             f"Received: input_widths={self.input_widths}")
        if not self.output_widths or len(set(self.output_widths)) != len(self.output_widths) or \
                min(self.output_widths) < 1:
            raise ValueError(f"`output_widths` should be distinct positive widths. "
                             f"Received: output_widths={self.output_widths}")
        costs = np.asarray(self.operator_costs, dtype=np.float64)
        if costs.shape != (len(self.input_widths), len(self.output_widths)):
            raise ValueError(f"`operator_costs` should have shape {(len(self.input_widths), len(self.output_widths))} "
                             f"(input_widths × output_widths). Received: shape {costs.shape}")
        if not np.all(np.isfinite(costs)) or np.any(costs < 0):
            raise ValueError(f"`operator_costs` should be finite and >= 0. Received: {costs.tolist()}")
        object.__setattr__(self, "operator_costs", tuple(tuple(float(v) for v in row) for row in costs))
        object.__setattr__(self, "details", dict(self.details))

    # -- look-ups ----------------------------------------------------------------------
    def feature_cost(self, name: str) -> float:
        if name not in self.feature_costs:
            raise KeyError(f"no measured cost for feature {name!r}; the table has {sorted(self.feature_costs)}")
        return self.feature_costs[name]

    def operator_cost(self, input_width, output_width: int):
        """T_{a×b}: ``a`` a number or a float tensor (interpolated), ``b`` one of `output_widths`.

        Piecewise-linear in ``a`` (written as a sum of clipped ramps so that it is
        differentiable in ``a``), constant beyond the grid's ends.
        """
        if int(output_width) not in self.output_widths:
            raise ValueError(f"`output_width` should be one of the measured widths {self.output_widths}. "
                             f"Received: output_width={output_width!r}")
        column = [row[self.output_widths.index(int(output_width))] for row in self.operator_costs]
        a = tf.cast(input_width, tf.float32)
        out = tf.constant(column[0], tf.float32)
        for k in range(len(self.input_widths) - 1):
            lo, hi = float(self.input_widths[k]), float(self.input_widths[k + 1])
            slope = (column[k + 1] - column[k]) / (hi - lo)
            out = out + slope * (tf.clip_by_value(a, lo, hi) - lo)
        return out

    def check_covers(self, features: Sequence[str], operator_widths: Sequence[int], candidates: int) -> None:
        """Raises ValueError unless the table prices a search over `features` and dense
        operators of `operator_widths` for requests of `candidates` candidates."""
        problems = []
        if int(candidates) != self.candidates:
            problems.append(f"it was measured for {self.candidates} candidates per request, not {int(candidates)}")
        missing = [n for n in features if n not in self.feature_costs]
        if missing:
            problems.append(f"it has no cost for the features {missing}")
        widths = sorted(set(int(w) for w in operator_widths) | {1})
        unmeasured = [w for w in widths if w not in self.output_widths]
        if unmeasured:
            problems.append(f"it has no layer of output width {unmeasured} (measured: {list(self.output_widths)})")
        if problems:
            raise ValueError("The latency table does not fit this search: " + "; ".join(problems) + ".")

    # -- persistence -------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {"candidates": int(self.candidates), "feature_costs": dict(self.feature_costs),
                "input_widths": list(self.input_widths), "output_widths": list(self.output_widths),
                "operator_costs": [list(r) for r in self.operator_costs], "details": dict(self.details)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LatencyTable":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown latency table keys {sorted(unknown)}; expected {sorted(known)}.")
        return cls(**d)

    def save(self, path: str) -> str:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        return path

    @classmethod
    def load(cls, path: str) -> "LatencyTable":
        with open(path) as f:
            return cls.from_dict(json.load(f))


# ---------------------------------------------------------------------------------
# Expected latency (pure TensorFlow, differentiable in θ and α).
# ---------------------------------------------------------------------------------
def expected_feature_latency(keep_probabilities, feature_costs) -> tf.Tensor:
    """Eq. 3: ``Σ_i θ_i L_i``.

    Args:
      keep_probabilities: ``[F]`` θ_i in [0, 1].
      feature_costs: ``[F]`` L_i (ms).
    """
    p = tf.convert_to_tensor(keep_probabilities, tf.float32)
    costs = tf.convert_to_tensor(feature_costs, tf.float32)
    if p.shape != costs.shape:
        raise ValueError(f"`keep_probabilities` and `feature_costs` should have the same shape. "
                         f"Received: {p.shape} and {costs.shape}")
    return tf.reduce_sum(p * costs)


def expected_input_width(keep_probabilities, feature_widths) -> tf.Tensor:
    """``Σ_i θ_i d_i``: the expected width of the masked input (the first layer's ``a``)."""
    p = tf.convert_to_tensor(keep_probabilities, tf.float32)
    return tf.reduce_sum(p * tf.constant([float(w) for w in feature_widths], tf.float32))


def expected_architecture_latency(operator_probabilities: Sequence, operator_widths: Sequence[int],
                                  input_width, table: LatencyTable, head_width: int = 1) -> tf.Tensor:
    """Eq. 4 / Fig. 3: expected cost of a chain of Mixops plus the logit head.

    Args:
      operator_probabilities: one ``[N]`` tensor per Mixop, softmax(α_l).
      operator_widths: ``[N]`` output width of each candidate operator; `IDENTITY`
        (0) marks the identity operator (cost 0, output width = input width).
      input_width: scalar (tensor) width of the Mixop chain's input.
      table: the measured costs.
      head_width: output width of the final layer (1: the logit).

    Returns:
      Scalar ms: ``Σ_l Σ_j α_{l,j} E_{d~q_{l-1}}[T_{d×w_j}] + E_{d~q_L}[T_{d×head}]``.
    """
    widths = [int(w) for w in operator_widths]
    if any(w < 0 for w in widths):
        raise ValueError(f"`operator_widths` should be >= 0 (0 = identity). Received: {widths}")
    dense = sorted({w for w in widths if w != IDENTITY})
    # Cost of every measured a→b transition between hidden widths (Python floats).
    hidden_cost = {(a, b): table.operator_cost(a, b) for a in dense for b in dense + [head_width]}
    input_cost = {b: table.operator_cost(input_width, b) for b in dense + [head_width]}
    p_input = tf.constant(1.0)  # P(current width = the raw input width)
    p_hidden = [tf.constant(0.0)] * len(dense)  # P(current width = dense[m])
    total = tf.constant(0.0)
    for l, probs in enumerate(operator_probabilities):
        probs = tf.convert_to_tensor(probs, tf.float32)
        if probs.shape.rank != 1 or probs.shape[0] != len(widths):
            raise ValueError(f"`operator_probabilities[{l}]` should have shape [{len(widths)}]. "
                             f"Received: {probs.shape}")
        p_identity = tf.constant(0.0)
        new_hidden = [tf.constant(0.0)] * len(dense)
        for j, w in enumerate(widths):
            if w == IDENTITY:
                p_identity = p_identity + probs[j]
                continue
            from_input = p_input * input_cost[w]
            from_hidden = tf.add_n([p_hidden[m] * hidden_cost[(a, w)] for m, a in enumerate(dense)])
            total = total + probs[j] * (from_input + from_hidden)
            k = dense.index(w)
            new_hidden[k] = new_hidden[k] + probs[j]
        p_hidden = [new_hidden[m] + p_identity * p_hidden[m] for m in range(len(dense))]
        p_input = p_identity * p_input
    head = p_input * input_cost[head_width]
    if dense:
        head = head + tf.add_n([p_hidden[m] * hidden_cost[(a, head_width)] for m, a in enumerate(dense)])
    return total + head


def architecture_latency(hidden_units: Sequence[int], input_width: int, table: LatencyTable,
                         head_width: int = 1) -> float:
    """Cost of one derived MLP ``input_width → hidden_units… → head_width`` (ms)."""
    a, total = int(input_width), 0.0
    for b in list(hidden_units) + [head_width]:
        total += float(table.operator_cost(a, b))
        a = int(b)
    return total


__all__ = ["IDENTITY", "LatencyTable", "architecture_latency", "expected_architecture_latency",
           "expected_feature_latency", "expected_input_width"]
