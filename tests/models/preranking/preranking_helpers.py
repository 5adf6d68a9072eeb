"""A batch and a latency table over the tiny schema (`tiny_schema`), shared by the pre-ranking tests."""

import numpy as np

from models.features import HISTORY, ITEM_ID, USER_ID
from models.preranking.latency import LatencyTable
from tiny_schema import SCHEMA

FEATURES = [f.name for f in SCHEMA.features]


def batch():
    return {USER_ID: np.array(["u1", "u9", "u2", "u1"], object), "age": np.array(["a", "b", "", "b"], object),
            HISTORY: np.array([["i1", "i2", ""], ["", "", ""], ["i3", "", ""], ["i2", "", ""]], object),
            ITEM_ID: np.array(["i1", "i3", "zz", "i2"], object),
            "category": np.array(["c1", "c2", "c1", "c2"], object),
            "tags": np.array([["t1", ""], ["t1", "t2"], ["", ""], ["t2", ""]], object),
            "price": np.array([1.0, 2.0, 0.5, 1.5], np.float32)}


def table(features=FEATURES, embedding_dim=4, widths=(4, 8)):
    """A linear cost table: L_i = 0.1·(i + 1), T(a, b) = a·b / 100."""
    input_width = embedding_dim * (len(features) - 1) + 1
    grid = sorted({1, *widths, input_width})
    outputs = sorted({1, *widths})
    return LatencyTable(candidates=1000, feature_costs={n: 0.1 * (i + 1) for i, n in enumerate(features)},
                        input_widths=grid, output_widths=outputs,
                        operator_costs=[[a * b / 100.0 for b in outputs] for a in grid])
