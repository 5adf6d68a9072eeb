"""Pure numpy statistics behind the Beam jobs: counts, frequency tables, vocabularies, MI.

Everything here takes arrays (or plain dicts) and returns arrays; nothing reads files or
knows about Beam. The Beam transforms in this package compute *partial* structures per
batch with these functions and merge them with the ``merge_*`` functions, which are
associative and commutative, so any runner may combine batches in any order.

Partial structures are integer counters so merging is exact: the merged result does not
depend on how a runner grouped the batches, and the final floats are computed once,
in a fixed (sorted) order, from the merged integers. Two runs on the same data therefore
produce bit-identical statistics whatever the runner and the number of workers.

Frequencies and vocabularies are ordered by descending count, ties broken by the token
(id) ascending, so the order is deterministic too. Vocabularies never list the padding
token ``""`` nor the OOV token (the lookup layers add both).

Strings are compared as numpy fixed-width unicode (sorting is several times faster than
on Python objects); such arrays drop trailing NUL characters, so ids must not end in one.

Mutual information between categorical item features
----------------------------------------------------
Every item is one sample of weight 1 (items are *not* weighted by popularity: the MI
describes the catalogue, not the traffic). An item whose values for features X and Y
are the sets A and B spreads its weight uniformly over A×B, i.e. contributes
``1/(|A|·|B|)`` to every pair (x, y) in A×B. Single-valued features have |A| = 1. A
missing value or an empty set counts as the value ``EMPTY_VALUE`` ("<empty>"); the
padding token ``""`` is never a value. Duplicates inside one item's list are counted
once (the values form a set).

With N items, p(x, y) = w(x, y) / N; the marginals of this joint are
p(x) = (1/N) Σ_items [x ∈ A] / |A|, the same for every partner Y. Then

    MI(X; Y) = Σ_{x,y} p(x, y) · log(p(x, y) / (p(x) · p(y)))      (nats)
    H(X)     = -Σ_x p(x) · log p(x)

The MI matrix is symmetric with H(X) on the diagonal (for a multi-valued feature the
diagonal is H(X) of the marginal above, not the MI of the A×A spread with itself).
Since each off-diagonal MI is the MI of a proper joint distribution whose marginals
are p(x) and p(y), 0 ≤ MI(X; Y) ≤ min(H(X), H(Y)).

Normalized MI (the second matrix) uses the geometric mean of the entropies:

    NMI(X; Y) = MI(X; Y) / sqrt(H(X) · H(Y))

which lies in [0, 1], is 1 on the diagonal, and is defined as 0 whenever H(X) or H(Y)
is 0 (a constant feature carries no information; this includes its diagonal entry).

References:
  Strehl & Ghosh, "Cluster Ensembles — A Knowledge Reuse Framework for Combining
  Multiple Partitions", JMLR 2002 (the sqrt(H(X)·H(Y)) normalization).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from models.features import OOV_TOKEN, PAD_TOKEN

EMPTY_VALUE = "<empty>"

Counts = Dict[str, int]


# -- plain value counts ---------------------------------------------------------
def count_values(values: Union[np.ndarray, Sequence[str]]) -> Counts:
    """Counts each distinct string of a 1-D array.

    Args:
      values: ``[n]`` strings (``str``/``object``/``U`` dtype). Callers drop missing
        values first.

    Returns:
      ``{value: count}`` with Python ``int`` counts.
    """
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"`values` should be 1-D. Received: shape={arr.shape}")
    if arr.size == 0:
        return {}
    if arr.dtype.kind not in "US":
        # np.unique sorts; fixed-width unicode sorts several times faster than objects.
        arr = arr.astype(str)
    uniques, counts = np.unique(arr, return_counts=True)
    return dict(zip(uniques.tolist(), counts.tolist()))


def merge_counts(accumulator: Counts, other: Mapping[str, int]) -> Counts:
    """Adds `other` into `accumulator` (mutated and returned)."""
    for key, value in other.items():
        accumulator[key] = accumulator.get(key, 0) + value
    return accumulator


def _as_ids_and_counts(counts: Union[Mapping[str, int], Tuple[Sequence[str], Sequence[int]]]
                       ) -> Tuple[np.ndarray, np.ndarray]:
    if isinstance(counts, Mapping):
        ids = np.asarray(list(counts.keys()), dtype=object)
        values = np.asarray(list(counts.values()), dtype=np.int64)
    elif isinstance(counts, (tuple, list)) and len(counts) == 2:
        ids = np.asarray(counts[0], dtype=object)
        values = np.asarray(counts[1], dtype=np.int64)
    else:
        raise TypeError("`counts` should be a dict {id: count} or a pair (ids, counts). "
                        f"Received: counts of type {type(counts).__name__}")
    if ids.ndim != 1 or values.shape != ids.shape:
        raise ValueError(f"`counts` ids and counts should be 1-D of equal length. "
                         f"Received: shapes {ids.shape} and {values.shape}")
    if values.size and values.min() < 0:
        raise ValueError(f"`counts` should be non-negative. Received: min count={values.min()}")
    if len(set(ids.tolist())) != ids.size:
        raise ValueError("`counts` ids should be unique. Received duplicated ids.")
    return ids, values


def _order_by_count(ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Permutation sorting by count descending, then id (as a string) ascending."""
    if ids.size == 0:
        return np.zeros(0, np.int64)
    keys = ids.astype(str)
    # lexsort sorts by the last key first.
    return np.lexsort((keys, -counts))


def item_frequency_table(counts: Union[Mapping[str, int], Tuple[Sequence[str], Sequence[int]]]
                         ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The sampling distribution q(i) of items in the training interactions.

    Formula: q(i) = count(i) / Σ_j count(j);  log_q(i) = log q(i).

    Items with a zero count are left out (log q would be -inf).

    Args:
      counts: ``{item_id: count}`` or ``(ids [n], counts [n])``.

    Returns:
      ``(ids [m] object, counts [m] int64, probability [m] float64, log_q [m] float64)``
      sorted by count descending, then id ascending.
    """
    ids, values = _as_ids_and_counts(counts)
    keep = values > 0
    ids, values = ids[keep], values[keep]
    order = _order_by_count(ids, values)
    ids, values = ids[order], values[order]
    total = int(values.sum())
    if total == 0:
        empty = np.zeros(0, np.float64)
        return ids, values, empty, empty.copy()
    probability = values / float(total)
    return ids, values, probability, np.log(probability)


def build_vocabulary(counts: Union[Mapping[str, int], Tuple[Sequence[str], Sequence[int]]],
                     min_count: int = 1,
                     exclude: Iterable[str] = (PAD_TOKEN, OOV_TOKEN)) -> List[str]:
    """Tokens ordered by descending count, ties broken by token ascending.

    Args:
      counts: ``{token: count}`` or ``(tokens, counts)``.
      min_count: tokens seen fewer times are dropped (they map to the OOV bucket).
      exclude: tokens never listed: the padding token ``""`` and the OOV token, which
        the lookup layers add themselves.

    Returns:
      The vocabulary as a list of ``str``.
    """
    if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) or min_count < 1:
        raise ValueError(f"`min_count` should be a positive integer. Received: min_count={min_count!r}")
    ids, values = _as_ids_and_counts(counts)
    excluded = set(exclude)
    keep = np.fromiter(((v >= min_count) and (str(t) not in excluded)
                        for t, v in zip(ids.tolist(), values.tolist())), dtype=bool, count=ids.size)
    ids, values = ids[keep], values[keep]
    order = _order_by_count(ids, values)
    return [str(t) for t in ids[order].tolist()]


def flatten_tokens(column: Sequence[Any]) -> np.ndarray:
    """All tokens of a column whose cells are strings or lists of strings.

    Missing cells (``None``/NaN) and the padding token ``""`` are dropped; a list
    contributes each of its tokens (repeats included).

    Returns:
      ``[m]`` array of ``str``.
    """
    arr = column if isinstance(column, np.ndarray) else None
    if arr is None and isinstance(column, (list, tuple)) and all(type(v) is str for v in column):
        arr = np.asarray(column, dtype=str) if column else np.zeros(0, dtype=str)
    if arr is not None and arr.ndim == 1 and (
            arr.dtype.kind in "US" or (arr.dtype == object and all(type(v) is str for v in arr))):
        # Fast path: single-valued strings.
        arr = arr.astype(str)
        return arr[arr != PAD_TOKEN]
    tokens: List[str] = []
    for value in column:
        if _is_missing(value):
            continue
        if isinstance(value, (str, bytes, np.str_)):
            value = (value,)
        elif not isinstance(value, (list, tuple, set, frozenset, np.ndarray)):
            value = (value,)
        for t in value:
            if _is_missing(t):
                continue
            t = t.decode() if isinstance(t, bytes) else str(t)
            if t != PAD_TOKEN:
                tokens.append(t)
    return np.asarray(tokens, dtype=str) if tokens else np.zeros(0, dtype=str)


def id_vocabulary(frequency_ids: Sequence[str], all_ids: Iterable[str]) -> List[str]:
    """An id vocabulary covering a whole table, most frequent first.

    Args:
      frequency_ids: ids ordered by training frequency (e.g. the first column of
        `item_frequency_table`).
      all_ids: every id of the table (order irrelevant).

    Returns:
      `frequency_ids`, then the ids never seen in training in ascending order; the
      padding and OOV tokens are left out.
    """
    seen = set()
    out: List[str] = []
    for i in frequency_ids:
        i = str(i)
        if i not in seen and i not in (PAD_TOKEN, OOV_TOKEN):
            seen.add(i)
            out.append(i)
    rest = sorted({str(i) for i in all_ids} - seen - {PAD_TOKEN, OOV_TOKEN})
    return out + rest


# -- mutual information between categorical item features -----------------------
@dataclasses.dataclass
class MutualInformationCounts:
    """Mergeable integer counts from which feature MI is computed.

    Attributes:
      features: feature names, in matrix order.
      num_items: number of items counted.
      marginals: ``{feature: {(|A|, x): n}}``: n items had value x in a set of size |A|.
      joints: ``{(feature_i, feature_j): {(|A|·|B|, x, y): n}}`` for i < j: n items had
        x ∈ A (values of feature_i) and y ∈ B (values of feature_j).
    """

    features: Tuple[str, ...]
    num_items: int = 0
    marginals: Dict[str, Dict[Tuple[int, str], int]] = dataclasses.field(default_factory=dict)
    joints: Dict[Tuple[str, str], Dict[Tuple[int, str, str], int]] = dataclasses.field(
        default_factory=dict)

    def __post_init__(self):
        self.features = tuple(self.features)
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"`features` should be unique. Received: features={list(self.features)}")
        for f in self.features:
            self.marginals.setdefault(f, {})
        for fx, fy in itertools.combinations(self.features, 2):
            self.joints.setdefault((fx, fy), {})

    def merge(self, other: "MutualInformationCounts") -> "MutualInformationCounts":
        """Adds `other` into this object (mutated and returned)."""
        if tuple(other.features) != self.features:
            raise ValueError(f"Cannot merge MI counts over different features: "
                             f"{list(self.features)} vs {list(other.features)}")
        self.num_items += other.num_items
        for f in self.features:
            merge_counts(self.marginals[f], other.marginals[f])
        for key in self.joints:
            merge_counts(self.joints[key], other.joints[key])
        return self


def merge_mutual_information_counts(parts: Iterable[MutualInformationCounts],
                                    features: Optional[Sequence[str]] = None
                                    ) -> MutualInformationCounts:
    """Merges partial counts into a new object (`features` needed only if `parts` is empty)."""
    parts = list(parts)
    if not parts:
        if features is None:
            raise ValueError("`features` is required when there is nothing to merge.")
        return MutualInformationCounts(tuple(features))
    out = MutualInformationCounts(parts[0].features)
    for part in parts:
        out.merge(part)
    return out


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _value_set(value: Any) -> Tuple[str, ...]:
    """The set of tokens of one cell (a scalar or a list), ``(EMPTY_VALUE,)`` if none."""
    if _is_missing(value):
        tokens: Iterable[str] = ()
    elif isinstance(value, (str, bytes, np.str_)):
        tokens = (value.decode() if isinstance(value, bytes) else str(value),)
    elif isinstance(value, (list, tuple, set, frozenset, np.ndarray)):
        tokens = {t.decode() if isinstance(t, bytes) else str(t)
                  for t in value if not _is_missing(t)}
    else:
        tokens = (str(value),)
    tokens = tuple(sorted(t for t in tokens if t != PAD_TOKEN))
    return tokens if tokens else (EMPTY_VALUE,)


def _item_value_pairs(column: Sequence[Any]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flattens one feature column into (item index, value) pairs.

    Returns:
      ``(item [m] int64, values [m] str, set_size [n] int64)`` with one pair per distinct
      value of each item's set.
    """
    arr = np.asarray(column, dtype=object) if not isinstance(column, np.ndarray) else column
    if arr.ndim == 1 and arr.dtype == object and all(type(v) is str for v in arr):
        arr = arr.astype(str)
    if arr.ndim == 1 and arr.dtype.kind in "US":
        # Fast path: single-valued strings; "" means missing.
        values = arr.astype(str)
        values = np.where(values == PAD_TOKEN, EMPTY_VALUE, values)
        n = values.size
        return np.arange(n, dtype=np.int64), values, np.ones(n, np.int64)
    sets = [_value_set(v) for v in column]
    sizes = np.fromiter((len(s) for s in sets), dtype=np.int64, count=len(sets))
    items = np.repeat(np.arange(len(sets), dtype=np.int64), sizes)
    flat = [t for s in sets for t in s]
    values = np.asarray(flat, dtype=str) if flat else np.zeros(0, dtype=str)
    return items, values, sizes


def _count_rows(*columns: np.ndarray) -> Tuple[List[np.ndarray], np.ndarray]:
    """Distinct rows of equally long 1-D non-negative integer columns and their counts."""
    if columns[0].size == 0:
        return [c[:0] for c in columns], np.zeros(0, np.int64)
    radices = [int(c.max()) + 1 for c in columns]
    if math.prod(radices) < 2 ** 62:
        # Mixed-radix code of each row: a 1-D unique is much faster than unique(axis=0).
        key = np.zeros(columns[0].size, np.int64)
        for c, radix in zip(columns, radices):
            key = key * radix + c
        uniques, counts = np.unique(key, return_counts=True)
        out = []
        for radix in reversed(radices):
            out.append(uniques % radix)
            uniques = uniques // radix
        return out[::-1], counts
    stacked = np.stack(columns, axis=1)
    uniques, counts = np.unique(stacked, axis=0, return_counts=True)
    return [uniques[:, k] for k in range(uniques.shape[1])], counts


def mutual_information_counts(columns: Mapping[str, Sequence[Any]],
                              features: Optional[Sequence[str]] = None,
                              num_items: Optional[int] = None) -> MutualInformationCounts:
    """Partial MI counts of one batch of items.

    Args:
      columns: ``{feature: [n_items]}``; each cell is a string (single-valued; ``None``
        or ``""`` = missing) or a list of strings (multi-valued; empty = missing).
      features: which columns, in matrix order (default: all, in mapping order).
      num_items: the batch's number of items, which the columns must have; needed to
        count the items of a catalogue without features (default: the columns' length,
        0 without columns).

    Returns:
      A `MutualInformationCounts` to merge with the other batches'.
    """
    features = tuple(columns.keys()) if features is None else tuple(features)
    missing = [f for f in features if f not in columns]
    if missing:
        raise ValueError(f"`columns` lacks features {missing}. Received columns: {sorted(columns)}")
    lengths = {f: len(columns[f]) for f in features}
    if num_items is not None:
        lengths = {**lengths, "num_items": int(num_items)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"All `columns` should have the same number of items. Received: {lengths}")
    n = next(iter(lengths.values())) if lengths else 0
    out = MutualInformationCounts(features, num_items=n)
    if n == 0:
        return out

    flat = {}
    for f in features:
        items, values, sizes = _item_value_pairs(columns[f])
        vocab, codes = np.unique(values, return_inverse=True)
        starts = np.cumsum(sizes) - sizes
        flat[f] = (items, codes.astype(np.int64).reshape(-1), vocab, sizes, starts)
        (size_u, code_u), cnt = _count_rows(sizes[items], codes.astype(np.int64).reshape(-1))
        out.marginals[f] = {(int(s), str(vocab[c])): int(k)
                            for s, c, k in zip(size_u.tolist(), code_u.tolist(), cnt.tolist())}

    for fx, fy in itertools.combinations(features, 2):
        x_items, x_codes, x_vocab, x_sizes, _ = flat[fx]
        _, y_codes, y_vocab, y_sizes, y_starts = flat[fy]
        # Every (x, item) entry pairs with each of the item's |B| y-values.
        reps = y_sizes[x_items]
        pair_items = np.repeat(x_items, reps)
        pair_x = np.repeat(x_codes, reps)
        group_starts = np.repeat(np.cumsum(reps) - reps, reps)
        offset_in_b = np.arange(pair_items.size, dtype=np.int64) - group_starts
        pair_y = y_codes[y_starts[pair_items] + offset_in_b]
        denominators = x_sizes[pair_items] * y_sizes[pair_items]
        (d_u, x_u, y_u), cnt = _count_rows(denominators, pair_x, pair_y)
        out.joints[(fx, fy)] = {
            (int(d), str(x_vocab[x]), str(y_vocab[y])): int(k)
            for d, x, y, k in zip(d_u.tolist(), x_u.tolist(), y_u.tolist(), cnt.tolist())}
    return out


def _weights(table: Mapping[Tuple, int]) -> Tuple[List[Tuple[str, ...]], np.ndarray]:
    """Collapses ``{(denominator, *key): n}`` into sorted keys and weights Σ n/denominator.

    The sum runs in a fixed order (key, then denominator), so the result does not
    depend on the dict's insertion order.
    """
    if not table:
        return [], np.zeros(0, np.float64)
    entries = sorted(((tuple(k[1:]), k[0], v) for k, v in table.items()))
    keys: List[Tuple[str, ...]] = []
    weights: List[float] = []
    for key, group in itertools.groupby(entries, key=lambda e: e[0]):
        parts = np.asarray([n / d for _, d, n in group], np.float64)
        keys.append(key)
        weights.append(float(np.sum(parts)))
    return keys, np.asarray(weights, np.float64)


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)))


def mutual_information_from_counts(counts: MutualInformationCounts
                                   ) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """MI and normalized MI matrices from merged counts (see the module docstring).

    Returns:
      ``(features, mi [f, f], normalized_mi [f, f])``, float64, symmetric, in nats.
    """
    features = list(counts.features)
    k = len(features)
    mi = np.zeros((k, k), np.float64)
    nmi = np.zeros((k, k), np.float64)
    n = float(counts.num_items)
    if counts.num_items == 0:
        return features, mi, nmi
    log_marginal: Dict[str, Dict[str, float]] = {}
    entropy = np.zeros(k, np.float64)
    for i, f in enumerate(features):
        keys, w = _weights(counts.marginals[f])
        p = w / n
        entropy[i] = _entropy(p)
        log_marginal[f] = dict(zip((key[0] for key in keys), np.log(p).tolist()))
        mi[i, i] = entropy[i]
    for (i, fx), (j, fy) in itertools.combinations(enumerate(features), 2):
        keys, w = _weights(counts.joints[(fx, fy)])
        if not keys:
            continue
        p = w / n
        log_px = np.asarray([log_marginal[fx][x] for x, _ in keys], np.float64)
        log_py = np.asarray([log_marginal[fy][y] for _, y in keys], np.float64)
        value = float(np.sum(p * (np.log(p) - log_px - log_py)))
        mi[i, j] = mi[j, i] = value
    for i in range(k):
        for j in range(k):
            denominator = np.sqrt(entropy[i] * entropy[j])
            nmi[i, j] = mi[i, j] / denominator if entropy[i] > 0 and entropy[j] > 0 else 0.0
        if entropy[i] > 0:
            nmi[i, i] = 1.0
    return features, mi, nmi


def feature_mutual_information(columns: Mapping[str, Sequence[Any]],
                               features: Optional[Sequence[str]] = None
                               ) -> Tuple[List[str], np.ndarray, np.ndarray]:
    """MI between categorical item features of a whole item table, in one process.

    Args:
      columns: ``{feature: [n_items]}`` as for `mutual_information_counts`.
      features: which columns, in matrix order (default: all).

    Returns:
      ``(features, mi [f, f], normalized_mi [f, f])``.
    """
    return mutual_information_from_counts(mutual_information_counts(columns, features))
