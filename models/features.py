"""The feature schema: the single source of truth for Beam jobs, training and serving.

A dataset is three tables (interactions, users, items) whose columns are described
once here. Readers produce them, the statistics jobs count them, the input pipeline
parses them and the serving signatures are derived from them.

Kinds of feature:

* ``categorical``: one string value per row (``user_id``, ``gender``, ``brand``).
* ``multi_categorical``: zero or more string values (``tags``, ``genres``); padded
  with ``""`` to ``max_length`` in tensors.
* ``numeric``: one float.
* ``sequence``: the user's behaviour sequence, item ids before the event, oldest
  first, the most recent ``max_length`` kept; padded with ``""`` in tensors.

Every categorical feature is looked up through a vocabulary ordered by frequency;
``""`` is the padding/mask token and unknown values map to one OOV bucket.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

USER_ID = "user_id"
ITEM_ID = "item_id"
TIMESTAMP = "timestamp"
RATING = "rating"
LABEL = "label"
HISTORY = "history"

PAD_TOKEN = ""
OOV_TOKEN = "[OOV]"

SIDES = ("user", "item")


class Kind(str, enum.Enum):
    CATEGORICAL = "categorical"
    MULTI_CATEGORICAL = "multi_categorical"
    NUMERIC = "numeric"
    SEQUENCE = "sequence"


@dataclasses.dataclass(frozen=True)
class Feature:
    """One column of the user or item table.

    Attributes:
      name: column name; unique across the schema.
      kind: a `Kind`.
      side: ``"user"`` or ``"item"``.
      max_length: for multi-valued and sequence features, the padded length.
      description: free text shown in reports.
    """

    name: str
    kind: Kind
    side: str
    max_length: int = 1
    description: str = ""

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"`name` should be a non-empty string. Received: name={self.name!r}")
        object.__setattr__(self, "kind", Kind(self.kind))
        if self.side not in SIDES:
            raise ValueError(
                f"`side` of feature {self.name!r} should be one of {SIDES}. Received: side={self.side!r}")
        if self.kind in (Kind.MULTI_CATEGORICAL, Kind.SEQUENCE):
            if int(self.max_length) < 1:
                raise ValueError(
                    f"`max_length` of feature {self.name!r} should be >= 1. "
                    f"Received: max_length={self.max_length}")
        elif self.max_length != 1:
            raise ValueError(
                f"`max_length` only applies to multi-valued and sequence features; "
                f"feature {self.name!r} is {self.kind.value}. Received: max_length={self.max_length}")
        if self.kind == Kind.SEQUENCE and self.side != "user":
            raise ValueError(f"Sequence feature {self.name!r} must be on the user side.")

    @property
    def is_categorical(self) -> bool:
        return self.kind in (Kind.CATEGORICAL, Kind.MULTI_CATEGORICAL, Kind.SEQUENCE)

    @property
    def vocabulary_name(self) -> str:
        """The vocabulary this feature is looked up in (sequences share ``item_id``'s)."""
        return ITEM_ID if self.kind == Kind.SEQUENCE else self.name

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "kind": self.kind.value, "side": self.side,
                "max_length": self.max_length, "description": self.description}


@dataclasses.dataclass(frozen=True)
class Schema:
    """User and item features of one dataset.

    ``user_id`` must be the first user feature and ``item_id`` the first item
    feature. Interactions always carry ``user_id``, ``item_id`` and ``timestamp``;
    ``rating`` and ``label`` are optional and announced by `has_rating`/`has_label`.
    """

    user_features: Tuple[Feature, ...]
    item_features: Tuple[Feature, ...]
    has_rating: bool = False
    has_label: bool = False
    name: str = "dataset"

    def __post_init__(self):
        object.__setattr__(self, "user_features", tuple(self.user_features))
        object.__setattr__(self, "item_features", tuple(self.item_features))
        if not self.user_features or self.user_features[0].name != USER_ID:
            raise ValueError(f"The first user feature must be {USER_ID!r}. "
                             f"Received: {[f.name for f in self.user_features]}")
        if not self.item_features or self.item_features[0].name != ITEM_ID:
            raise ValueError(f"The first item feature must be {ITEM_ID!r}. "
                             f"Received: {[f.name for f in self.item_features]}")
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"Feature names must be unique. Duplicated: {dupes}")
        reserved = {TIMESTAMP, RATING, LABEL} & set(names)
        if reserved:
            raise ValueError(f"Feature names {sorted(reserved)} are reserved for interaction columns.")
        for f in self.user_features:
            if f.side != "user":
                raise ValueError(f"Feature {f.name!r} is listed as a user feature but has side={f.side!r}.")
        for f in self.item_features:
            if f.side != "item":
                raise ValueError(f"Feature {f.name!r} is listed as an item feature but has side={f.side!r}.")

    # -- access ---------------------------------------------------------------
    @property
    def features(self) -> Tuple[Feature, ...]:
        return self.user_features + self.item_features

    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"No feature named {name!r}. Known: {[f.name for f in self.features]}")

    def side(self, side: str) -> Tuple[Feature, ...]:
        if side not in SIDES:
            raise ValueError(f"`side` should be one of {SIDES}. Received: side={side!r}")
        return self.user_features if side == "user" else self.item_features

    @property
    def sequence_feature(self) -> Optional[Feature]:
        seqs = [f for f in self.user_features if f.kind == Kind.SEQUENCE]
        return seqs[0] if seqs else None

    def table_columns(self, side: str) -> List[str]:
        """Columns of the stored user or item table (sequences are derived, not stored)."""
        return [f.name for f in self.side(side) if f.kind != Kind.SEQUENCE]

    def vocabulary_names(self) -> List[str]:
        """Names of all vocabularies the schema needs, in a stable order."""
        out: List[str] = []
        for f in self.features:
            if f.is_categorical and f.vocabulary_name not in out:
                out.append(f.vocabulary_name)
        return out

    def categorical_item_features(self) -> List[str]:
        """Categorical item features other than the id (the inputs of feature MI)."""
        return [f.name for f in self.item_features
                if f.kind in (Kind.CATEGORICAL, Kind.MULTI_CATEGORICAL) and f.name != ITEM_ID]

    # -- tensors --------------------------------------------------------------
    def tensor_specs(self, side: str) -> Dict[str, Any]:
        """`tf.TensorSpec`s of the tower inputs for one side (the serving signature).

        categorical: ``[batch]`` string; multi-valued/sequence: ``[batch, max_length]``
        string padded with ``""``; numeric: ``[batch]`` float32.
        """
        from models.tf_compat import tf

        specs = {}
        for f in self.side(side):
            if f.kind == Kind.CATEGORICAL:
                specs[f.name] = tf.TensorSpec([None], tf.string, name=f.name)
            elif f.kind == Kind.NUMERIC:
                specs[f.name] = tf.TensorSpec([None], tf.float32, name=f.name)
            else:
                specs[f.name] = tf.TensorSpec([None, f.max_length], tf.string, name=f.name)
        return specs

    # -- persistence ----------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "has_rating": self.has_rating,
            "has_label": self.has_label,
            "user_features": [f.to_dict() for f in self.user_features],
            "item_features": [f.to_dict() for f in self.item_features],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Schema":
        known = {"name", "has_rating", "has_label", "user_features", "item_features"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"Unknown schema keys {sorted(unknown)}; expected {sorted(known)}.")
        return cls(
            user_features=tuple(Feature(**f) for f in d["user_features"]),
            item_features=tuple(Feature(**f) for f in d["item_features"]),
            has_rating=bool(d.get("has_rating", False)),
            has_label=bool(d.get("has_label", False)),
            name=d.get("name", "dataset"),
        )

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str) -> "Schema":
        if not os.path.exists(path):
            raise FileNotFoundError(f"Schema file not found: {path}")
        with open(path) as f:
            return cls.from_dict(json.load(f))


# -- value normalisation shared by every reader and by serving ------------------
def normalize_value(feature: Feature, value: Any) -> Any:
    """Canonical Python value of one cell: str, list[str] or float.

    Raises:
      ValueError: naming the feature and the value when it cannot be converted.
    """
    if feature.kind == Kind.NUMERIC:
        if value is None or value == "":
            raise ValueError(f"feature {feature.name!r}: missing numeric value")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"feature {feature.name!r}: expected a number, got {value!r}") from None
        if out != out or out in (float("inf"), float("-inf")):
            raise ValueError(f"feature {feature.name!r}: expected a finite number, got {value!r}")
        return out
    if feature.kind == Kind.CATEGORICAL:
        if value is None:
            return OOV_TOKEN
        return str(value)
    # multi-valued / sequence
    if value is None:
        return []
    if isinstance(value, str):
        raise ValueError(f"feature {feature.name!r}: expected a list of values, got the string {value!r}")
    return [str(v) for v in value if str(v) != PAD_TOKEN]


def pad_values(values: Sequence[str], max_length: int, keep: str = "first") -> List[str]:
    """Pads/truncates a list of tokens to `max_length` (``keep='last'`` for sequences)."""
    values = list(values)
    if len(values) > max_length:
        values = values[-max_length:] if keep == "last" else values[:max_length]
    return values + [PAD_TOKEN] * (max_length - len(values))


def padded_batch(schema: Schema, side: str, rows: Iterable[Mapping[str, Any]]) -> Dict[str, Any]:
    """Numpy arrays in the tower's input layout for a list of table rows (serving helper)."""
    rows = list(rows)
    out: Dict[str, Any] = {}
    for f in schema.side(side):
        if f.kind == Kind.NUMERIC:
            out[f.name] = np.asarray([float(r.get(f.name, 0.0)) for r in rows], np.float32)
        elif f.kind == Kind.CATEGORICAL:
            out[f.name] = np.asarray([str(r.get(f.name, OOV_TOKEN)) for r in rows], object)
        else:
            keep = "last" if f.kind == Kind.SEQUENCE else "first"
            out[f.name] = np.asarray(
                [pad_values(list(r.get(f.name, []) or []), f.max_length, keep) for r in rows], object
            ).reshape(len(rows), f.max_length)
    return out


def feature_lists(columns: Mapping[str, Any]) -> Dict[str, list]:
    """Feature columns (arrays or eager tensors, such as `padded_batch` gives) as nested Python
    lists, strings decoded: the JSON form a Keras object's config keeps them in."""
    out = {}
    for name, values in columns.items():
        array = np.asarray(values)
        # Strings: TensorFlow hands them back as bytes; an object array may hold str (any Unicode).
        out[name] = _decoded(array.tolist()) if array.dtype.kind in "OS" else array.tolist()
    return out


def _decoded(values):
    """Nested lists with every bytes value decoded as UTF-8 (str values kept)."""
    if isinstance(values, list):
        return [_decoded(v) for v in values]
    return values.decode("utf-8") if isinstance(values, bytes) else values


def checked_numeric_stats(numeric_stats: Optional[Mapping[str, Sequence[float]]]) -> Dict[str, List[float]]:
    """``numeric_stats`` (feature → (mean, std), or None) as ``{feature: [mean, std]}`` floats, checked
    as every model that standardizes needs them: a finite mean and a finite std > 0.

    Raises:
      ValueError: naming the feature and its stats when they are not so.
    """
    out = {}
    for name, stats in (numeric_stats or {}).items():
        values = [float(x) for x in stats]
        if len(values) != 2 or not (math.isfinite(values[0]) and math.isfinite(values[1]) and values[1] > 0):
            raise ValueError(f"`numeric_stats[{name!r}]` should be (mean, std) with a finite mean and a finite "
                             f"std > 0. Received: numeric_stats[{name!r}]={values}")
        out[name] = values
    return out


def numeric_stats(schema: Schema, columns: Mapping[str, Sequence]) -> Dict[str, List[float]]:
    """Numeric feature → ``[mean, std]`` (population std; 1.0 when the feature is constant) over training
    columns: the standardization every model applies (the towers, the rankers, the pre-ranker).

    `columns` maps each numeric feature of the schema to its values: the entity tables' rows for the
    retrieval towers (`pipeline.job.numeric_stats`), the training events' for the rankers.
    """
    out = {}
    for f in schema.features:
        if f.kind != Kind.NUMERIC:
            continue
        if f.name not in columns:
            raise ValueError(f"`columns` lacks the numeric feature {f.name!r}")
        values = np.asarray(columns[f.name], dtype=np.float64).reshape(-1)
        if not len(values) or not np.isfinite(values).all():
            raise ValueError(f"numeric feature {f.name!r} should have finite values. Received {len(values)} values, "
                             f"{int((~np.isfinite(values)).sum())} not finite")
        std = float(values.std())
        out[f.name] = [float(values.mean()), std if std > 0 else 1.0]
    return out
