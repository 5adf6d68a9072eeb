"""Item features for scoring candidates at serving time.

The item table is read once into the tower/ranker input layout of
`models.features.padded_batch` and kept dictionary-encoded (one int32 code per cell
and one small vocabulary per feature), so a batch of N candidates is a few numpy
gathers rather than N Python rows (`features_at`: numpy; `tensors_at`: TensorFlow
string tensors, for the scoring models, with no per-string Python work).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from models import data_layout as layout
from models.features import ITEM_ID, OOV_TOKEN, Kind, Schema, padded_batch


class ItemStore:
    """The item table of a materialized dataset, gathered as padded batches.

    Row ``len(store)`` (index ``-1``) is a placeholder for items missing from the
    table: OOV for categorical features, ``""`` padding for multi-valued ones, 0 for
    numeric ones; its ``item_id`` is replaced by the requested id.

    Args:
      data_dir: a materialized dataset directory (``schema.json``, ``items.parquet``).
      chunk_size: rows converted per `padded_batch` call while loading.
    """

    def __init__(self, data_dir: str, chunk_size: int = 65536):
        if chunk_size < 1:
            raise ValueError(f"`chunk_size` should be positive. Received: chunk_size={chunk_size}")
        self.data_dir = data_dir
        self.schema = Schema.load(os.path.join(data_dir, layout.SCHEMA_FILE))
        table = pq.read_table(os.path.join(data_dir, layout.ITEMS_FILE),
                              columns=[f.name for f in self.schema.item_features])
        ids = [str(v) for v in table.column(ITEM_ID).to_pylist()]
        self._index = pd.Index(ids)
        if not self._index.is_unique:
            dupes = self._index[self._index.duplicated()].unique()[:5].tolist()
            raise ValueError(f"{os.path.join(data_dir, layout.ITEMS_FILE)} repeats item ids, e.g. {dupes}")
        parts = [padded_batch(self.schema, "item", table.slice(start, chunk_size).to_pylist())
                 for start in range(0, table.num_rows, chunk_size)]
        placeholder = padded_batch(self.schema, "item", [self._placeholder_row()])
        self._codes: Dict[str, np.ndarray] = {}
        self._vocab: Dict[str, np.ndarray] = {}
        self._numeric: Dict[str, np.ndarray] = {}
        for f in self.schema.item_features:
            column = np.concatenate([p[f.name] for p in parts] + [placeholder[f.name]], axis=0)
            if f.kind == Kind.NUMERIC:
                self._numeric[f.name] = column.astype(np.float32)
            else:
                codes, uniques = pd.factorize(column.ravel())
                self._codes[f.name] = codes.astype(np.int32).reshape(column.shape)
                self._vocab[f.name] = np.asarray(uniques, dtype=object)
        self._vocab_tensors = None  # string tensors of the vocabularies, made on first use

    def _checked(self, positions) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        if positions.ndim != 1:
            raise ValueError(f"`positions` should be 1-D. Received shape {positions.shape}")
        if len(positions) and (positions.max() >= len(self) or positions.min() < -1):
            raise ValueError(f"`positions` should be in [-1, {len(self)}). "
                             f"Received values in [{positions.min()}, {positions.max()}]")
        return positions

    def _placeholder_row(self) -> dict:
        row = {}
        for f in self.schema.item_features:
            row[f.name] = OOV_TOKEN if f.kind == Kind.CATEGORICAL else 0.0 if f.kind == Kind.NUMERIC else []
        return row

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, item_id: str) -> bool:
        return str(item_id) in self._index

    def item_ids(self) -> np.ndarray:
        return self._index.to_numpy(dtype=object)

    def positions(self, item_ids: Sequence[str]) -> np.ndarray:
        """``[N]`` int64 rows of `item_ids` in the table, ``-1`` for unknown ids."""
        return self._index.get_indexer(pd.Index([str(i) for i in item_ids]))

    def features_at(self, positions: np.ndarray, item_ids: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
        """Ranker/tower inputs of the rows at `positions` (``-1`` = the placeholder).

        Returns the layout of ``padded_batch(schema, "item", rows)``: categorical
        ``[N]`` and multi-valued ``[N, L]`` object arrays of str, numeric ``[N]``
        float32. `item_ids`, when given, replace the ``item_id`` column (so missing
        items keep their own id).
        """
        positions = self._checked(positions)
        out: Dict[str, np.ndarray] = {}
        for f in self.schema.item_features:
            if f.kind == Kind.NUMERIC:
                out[f.name] = self._numeric[f.name][positions]
            else:
                out[f.name] = self._vocab[f.name][self._codes[f.name][positions]]
        if item_ids is not None:
            if len(item_ids) != len(positions):
                raise ValueError(f"`item_ids` has {len(item_ids)} entries for {len(positions)} positions")
            out[ITEM_ID] = np.asarray([str(i) for i in item_ids], dtype=object)
        return out

    def tensors_at(self, positions: np.ndarray, item_ids: Any = None,
                   names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """`features_at` as TensorFlow tensors, gathered without Python strings.

        Each categorical or multi-valued feature is a gather of its int codes (numpy)
        followed by a gather of its small string vocabulary (TensorFlow), so N
        candidates cost no per-string Python work. `item_ids` (a ``[N]`` string
        tensor or sequence), when given, replace the ``item_id`` column; `names` limits
        the features gathered (default: all).
        """
        from models.tf_compat import tf

        positions = self._checked(positions)
        if self._vocab_tensors is None:
            self._vocab_tensors = {n: tf.constant(v.astype(str).astype(object)) for n, v in self._vocab.items()}
        wanted = None if names is None else set(names)
        if wanted is not None and wanted - {f.name for f in self.schema.item_features}:
            raise ValueError(f"unknown item feature(s) {sorted(wanted - {f.name for f in self.schema.item_features})}"
                             f"; the schema's item features are {[f.name for f in self.schema.item_features]}")
        out: Dict[str, Any] = {}
        for f in self.schema.item_features:
            if wanted is not None and f.name not in wanted:
                continue
            if f.kind == Kind.NUMERIC:
                out[f.name] = tf.constant(self._numeric[f.name][positions])
            elif f.name == ITEM_ID and item_ids is not None:
                ids = tf.convert_to_tensor(item_ids, dtype=tf.string) if not tf.is_tensor(item_ids) else item_ids
                if ids.shape.rank != 1 or ids.shape[0] != len(positions):
                    raise ValueError(f"`item_ids` should hold {len(positions)} ids. Received shape {ids.shape}")
                out[f.name] = ids
            else:
                out[f.name] = tf.gather(self._vocab_tensors[f.name], self._codes[f.name][positions])
        return out

    def features(self, item_ids: Sequence[str]) -> Dict[str, np.ndarray]:
        """Inputs for a list of item ids (unknown ids get the placeholder features)."""
        return self.features_at(self.positions(item_ids), item_ids)


class EncodedItems:
    """A model's encoded features of a list of items (one row per item), gathered by row.

    The columns of every feature share one C-ordered int32 matrix (float32 values are
    kept bit for bit), so gathering N rows is one numpy gather of N short contiguous rows
    rather than one random gather per feature.

    Args:
      arrays: feature name → ``[rows]`` or ``[rows, L]`` int32 or float32 array, all with
        the same number of rows.
    """

    def __init__(self, arrays: Dict[str, np.ndarray]):
        if not arrays:
            raise ValueError("`arrays` should hold at least one feature")
        rows = {name: a.shape[0] for name, a in arrays.items()}
        if len(set(rows.values())) != 1:
            raise ValueError(f"every encoded feature should have one row per item. Received rows {rows}")
        self._layout = []  # (name, first column, shape of one row, dtype)
        columns, start = [], 0
        for name, a in arrays.items():
            if a.dtype not in (np.int32, np.float32):
                raise ValueError(f"encoded feature {name!r} should be int32 or float32. Received {a.dtype}")
            flat = np.ascontiguousarray(a).reshape(a.shape[0], -1)
            columns.append(flat.view(np.int32))
            self._layout.append((name, start, a.shape[1:], a.dtype))
            start += flat.shape[1]
        self._matrix = np.ascontiguousarray(np.concatenate(columns, axis=1))

    def __len__(self) -> int:
        return self._matrix.shape[0]

    @property
    def nbytes(self) -> int:
        return self._matrix.nbytes

    @property
    def names(self):
        return [name for name, _, _, _ in self._layout]

    def at(self, rows: np.ndarray) -> Dict[str, np.ndarray]:
        """Each feature's values at `rows` (``[N]`` int), as contiguous arrays."""
        block = self._matrix[np.asarray(rows)]
        out = {}
        for name, start, shape, dtype in self._layout:
            width = int(np.prod(shape)) if shape else 1
            part = np.ascontiguousarray(block[:, start:start + width]).view(dtype)
            out[name] = part.reshape((block.shape[0],) + tuple(shape))
        return out


__all__ = ["ItemStore", "EncodedItems"]
