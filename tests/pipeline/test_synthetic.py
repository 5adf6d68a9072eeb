import numpy as np
import pandas as pd
import pytest
from conftest import tiny_synthetic_config

from pipeline.data.synthetic import SyntheticConfig, generate_synthetic, synthetic_world


def _all(ds):
    return pd.concat(list(ds.interactions()), ignore_index=True)


def test_same_seed_same_data_other_seed_other_data():
    a = generate_synthetic(tiny_synthetic_config())
    b = generate_synthetic(tiny_synthetic_config())
    c = generate_synthetic(tiny_synthetic_config(seed=8))
    pd.testing.assert_frame_equal(_all(a), _all(b))
    pd.testing.assert_frame_equal(a.items, b.items)
    assert not _all(a).equals(_all(c))
    # Iterating twice gives the same chunks (the source is re-readable).
    pd.testing.assert_frame_equal(_all(a), _all(a))


def test_chunks_hold_complete_users_sorted_by_time():
    ds = generate_synthetic(tiny_synthetic_config())
    seen = set()
    for chunk in ds.interactions():
        users = set(chunk["user_id"])
        assert not users & seen
        seen |= users
        for _, g in chunk.groupby("user_id"):
            assert g["timestamp"].is_monotonic_increasing
    assert seen <= set(ds.users["user_id"])
    df = _all(ds)
    assert not df.duplicated(["user_id", "item_id"]).any()
    assert set(df["item_id"]) <= set(ds.items["item_id"])


def test_planted_structure():
    config = SyntheticConfig(num_users=3000, num_items=1000, seed=3)
    ds = generate_synthetic(config)
    df = _all(ds)
    items = ds.items.set_index("item_id")
    # Power-law popularity: the top 10% of items take a large share of impressions.
    counts = df["item_id"].value_counts().to_numpy()
    assert counts[: len(counts) // 10].sum() / counts.sum() > 0.3
    # Hierarchy: every subcategory has one category; brands mostly one subcategory.
    assert (items.groupby("subcategory")["category"].nunique() == 1).all()
    brand_purity = items.groupby("brand")["subcategory"].agg(lambda s: s.value_counts().iloc[0] / len(s))
    assert brand_purity.mean() > 0.8
    # Tags come mostly from the category's pool: a category's top tags cover most of its tags.
    ex = items.explode("tags")
    share = ex.groupby("category")["tags"].agg(lambda s: s.value_counts().iloc[:5].sum() / len(s))
    assert share.mean() > 0.6
    # Co-action: click rates differ across (age, category) cells far beyond noise.
    users = ds.users.set_index("user_id")
    df["age"] = users.loc[df["user_id"], "age"].to_numpy()
    df["category"] = items.loc[df["item_id"], "category"].to_numpy()
    cells = df.groupby(["age", "category"])["label"].agg(["mean", "size"])
    cells = cells[cells["size"] > 200]
    assert cells["mean"].max() - cells["mean"].min() > 0.2
    # Latent factors drive impressions: users see items closer to their vector than random.
    world = synthetic_world(config)
    u = df["user_id"].str[1:].astype(int).to_numpy()
    i = df["item_id"].str[1:].astype(int).to_numpy()
    seen_aff = np.einsum("nd,nd->n", world.user_vectors[u], world.item_vectors[i]).mean()
    rng = np.random.default_rng(0)
    rand_aff = np.einsum("nd,nd->n", world.user_vectors[u],
                         world.item_vectors[rng.integers(0, config.num_items, len(u))]).mean()
    assert seen_aff > rand_aff + 0.1


@pytest.mark.parametrize("field,value", [("num_users", 0), ("num_items", 5), ("popularity_exponent", -1.0),
                                         ("brand_noise", 2.0), ("mean_impressions_per_user", 1.0)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_synthetic_config(**{field: value})


def test_scales_by_chunks_without_changing_totals():
    ds = generate_synthetic(tiny_synthetic_config(num_users=1000, users_per_chunk=250))
    sizes = [len(c) for c in ds.interactions()]
    assert len(sizes) == 4 and sum(sizes) > 1000 * 5
