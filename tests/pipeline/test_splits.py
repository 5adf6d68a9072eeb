import numpy as np
import pandas as pd
import pytest

from pipeline.data.splits import SplitConfig, assign_split


def _chunk():
    # u1 has 4 events, u2 has 2, u3 has 1 (sorted by user, timestamp).
    return pd.DataFrame({"user_id": ["u1"] * 4 + ["u2"] * 2 + ["u3"],
                         "item_id": ["a", "b", "c", "d", "a", "e", "f"],
                         "timestamp": [1, 2, 3, 4, 5, 6, 7]})


def test_leave_last_n_by_hand():
    got = assign_split(_chunk(), SplitConfig(method="leave_last_n", n=2))
    # u1: last two to test; u2 has exactly n events -> all train; u3 -> train.
    assert got.tolist() == [False, False, True, True, False, False, False]
    got1 = assign_split(_chunk(), SplitConfig(method="leave_last_n", n=1))
    assert got1.tolist() == [False, False, False, True, False, True, False]


def test_time_split():
    got = assign_split(_chunk(), SplitConfig(method="time"), cutoff=5)
    assert got.tolist() == [False] * 4 + [True] * 3
    with pytest.raises(ValueError, match="cutoff"):
        assign_split(_chunk(), SplitConfig(method="time"))


def test_random_split_is_deterministic_and_has_the_right_fraction():
    rng = np.random.default_rng(0)
    n = 20000
    df = pd.DataFrame({"user_id": rng.integers(0, 500, n).astype(str), "item_id": rng.integers(0, 900, n).astype(str),
                       "timestamp": np.arange(n)})
    cfg = SplitConfig(method="random", test_fraction=0.2, seed=3)
    a = assign_split(df, cfg)
    assert abs(a.mean() - 0.2) < 0.015
    # Independent of chunking: splitting halves gives the same answer.
    halves = np.concatenate([assign_split(df.iloc[: n // 2], cfg), assign_split(df.iloc[n // 2:], cfg)])
    np.testing.assert_array_equal(a, halves)
    b = assign_split(df, SplitConfig(method="random", test_fraction=0.2, seed=4))
    assert (a != b).mean() > 0.2


def test_predefined_and_config_validation():
    df = _chunk().assign(split=["train"] * 6 + ["test"])
    assert assign_split(df, SplitConfig(method="predefined")).tolist() == [False] * 6 + [True]
    with pytest.raises(ValueError, match="unexpected split value 'dev'"):
        assign_split(df.assign(split="dev"), SplitConfig(method="predefined"))
    with pytest.raises(ValueError, match="split.method"):
        SplitConfig(method="kfold")
    with pytest.raises(ValueError, match="brings no split"):
        SplitConfig(method="predefined").resolve(predefined_available=False)
    assert SplitConfig().resolve(True).method == "predefined"
    assert SplitConfig().resolve(False).method == "leave_last_n"
