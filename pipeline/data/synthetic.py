"""The embedded default dataset: a deterministic synthetic generator with planted structure.

What is planted, so that every stage has something real to find:

* **Popularity**: item popularity follows a Zipf law (`popularity_exponent`), so a few
  items take most impressions and a long tail gets few (logQ correction, SSL for tail
  items).
* **Latent factors**: users and items have latent vectors; an item's vector is its
  category centroid plus a sub-category offset plus noise, a user's vector is a mix of
  one or two favourite categories plus an age-bucket offset. Impressions are sampled
  ∝ popularity × exp(`affinity_strength` · p_u·q_i) (two-tower retrieval).
* **Correlated item features**: ``category → subcategory → brand`` is a hierarchy
  (each brand belongs to one sub-category, each sub-category to one category; with
  `brand_noise` a brand is drawn from anywhere), ``tags`` (multi-valued) come mostly
  from the category's tag pool, while ``price_bucket`` and ``color`` are independent
  of everything (feature mutual information, correlated feature masking).
* **Co-action clicks**: every impression has a click ``label`` drawn from
  ``sigmoid(bias + a·p_u·q_i + W1[age, category] + W2[gender, price_bucket]
  + W3[region, subcategory] + γ·share of the history in the target's category)``:
  user-feature × item-feature interactions a CAN ranker can learn and a plain DNN
  struggles with.

Scale: users are generated in chunks of `users_per_chunk`, each chunk from its own
seeded generator, so 10M+ interactions stream without being held in memory at once.
The same config always yields the same data.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterator

import numpy as np
import pandas as pd

from models.features import HISTORY, ITEM_ID, USER_ID, Feature, Kind, Schema
from pipeline.data.canonical import RawDataset, RowErrors

AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
GENDERS = ("f", "m")
COLORS = ("black", "white", "red", "blue", "green", "grey")
NUM_PRICE_BUCKETS = 5
NUM_REGIONS = 8


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Size and structure of the synthetic dataset.

    Attributes:
      num_users: number of users.
      num_items: number of items.
      mean_impressions_per_user: mean impressions per user (geometric-like spread, min 3).
      latent_dim: dimension of the planted latent factors.
      popularity_exponent: Zipf exponent s of item popularity (weight ∝ 1/rank^s).
      affinity_strength: β in exp(β·p_u·q_i); 0 makes impressions popularity-only.
      num_categories, subcategories_per_category, brands_per_subcategory: the hierarchy.
      num_tags: size of the tag vocabulary (multi-valued feature, 1–4 tags per item).
      brand_noise: probability that an item's brand is drawn from all brands.
      coaction_strength: scale of the planted user×item co-action click effects.
      history_length: length of the behaviour sequence feature (`recfunnel run` sets
        it from ``data.history_length``).
      users_per_chunk: users generated per chunk (memory bound).
      seed: everything derives from it.
    """

    num_users: int = 6000
    num_items: int = 3000
    mean_impressions_per_user: float = 30.0
    latent_dim: int = 16
    popularity_exponent: float = 0.9
    affinity_strength: float = 8.0
    num_categories: int = 12
    subcategories_per_category: int = 4
    brands_per_subcategory: int = 5
    num_tags: int = 60
    brand_noise: float = 0.1
    coaction_strength: float = 1.5
    history_length: int = 20
    users_per_chunk: int = 20000
    seed: int = 0

    def __post_init__(self):
        positive_ints = ("num_users", "num_items", "latent_dim", "num_categories",
                         "subcategories_per_category", "brands_per_subcategory", "num_tags",
                         "history_length", "users_per_chunk")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` should be a positive integer. Received: {name}={value!r}")
        if self.num_items < 10:
            raise ValueError(f"`num_items` should be at least 10. Received: num_items={self.num_items}")
        if not self.mean_impressions_per_user >= 3:
            raise ValueError("`mean_impressions_per_user` should be >= 3. "
                             f"Received: mean_impressions_per_user={self.mean_impressions_per_user}")
        if self.mean_impressions_per_user > self.num_items / 2:
            raise ValueError("`mean_impressions_per_user` should be at most half of `num_items`. Received: "
                             f"mean_impressions_per_user={self.mean_impressions_per_user}, num_items={self.num_items}")
        for name in ("popularity_exponent", "affinity_strength", "coaction_strength"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` should be >= 0. Received: {name}={getattr(self, name)}")
        if not 0 <= self.brand_noise <= 1:
            raise ValueError(f"`brand_noise` should be in [0, 1]. Received: brand_noise={self.brand_noise}")


def synthetic_schema(config: SyntheticConfig) -> Schema:
    return Schema(
        name="synthetic",
        has_label=True,
        user_features=(
            Feature(USER_ID, Kind.CATEGORICAL, "user"),
            Feature("age", Kind.CATEGORICAL, "user", description="age bucket"),
            Feature("gender", Kind.CATEGORICAL, "user"),
            Feature("region", Kind.CATEGORICAL, "user"),
            Feature(HISTORY, Kind.SEQUENCE, "user", max_length=config.history_length,
                    description="items clicked before the event, oldest first"),
        ),
        item_features=(
            Feature(ITEM_ID, Kind.CATEGORICAL, "item"),
            Feature("category", Kind.CATEGORICAL, "item"),
            Feature("subcategory", Kind.CATEGORICAL, "item", description="child of category"),
            Feature("brand", Kind.CATEGORICAL, "item", description="child of subcategory"),
            Feature("price_bucket", Kind.CATEGORICAL, "item", description="independent"),
            Feature("color", Kind.CATEGORICAL, "item", description="independent"),
            Feature("tags", Kind.MULTI_CATEGORICAL, "item", max_length=4,
                    description="1-4 tags, mostly from the category's pool"),
        ),
    )


@dataclasses.dataclass(frozen=True)
class _World:
    """The hidden parameters of the generator (kept for tests and diagnostics)."""

    item_vectors: np.ndarray        # [num_items, latent_dim]
    item_log_popularity: np.ndarray  # [num_items]
    item_category: np.ndarray
    item_subcategory: np.ndarray
    item_price: np.ndarray
    user_vectors: np.ndarray        # [num_users, latent_dim]
    user_age: np.ndarray
    user_gender: np.ndarray
    user_region: np.ndarray
    w_age_category: np.ndarray      # [6, num_categories]
    w_gender_price: np.ndarray      # [2, NUM_PRICE_BUCKETS]
    w_region_subcategory: np.ndarray  # [NUM_REGIONS, num_subcategories]
    click_bias: float
    history_weight: float


def _build_world(config: SyntheticConfig):
    rng = np.random.default_rng([config.seed, 1])
    c, d = config.num_categories, config.latent_dim
    n_sub = c * config.subcategories_per_category
    n_brand = n_sub * config.brands_per_subcategory

    centroids = rng.normal(size=(c, d))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    sub_offsets = rng.normal(scale=0.45 / np.sqrt(d), size=(n_sub, d))

    # Items.
    n = config.num_items
    cat_weights = 1.0 / np.arange(1, c + 1) ** 0.5
    category = rng.choice(c, size=n, p=cat_weights / cat_weights.sum())
    subcategory = category * config.subcategories_per_category + rng.integers(
        0, config.subcategories_per_category, size=n)
    brand = subcategory * config.brands_per_subcategory + rng.integers(
        0, config.brands_per_subcategory, size=n)
    noisy = rng.random(n) < config.brand_noise
    brand[noisy] = rng.integers(0, n_brand, size=int(noisy.sum()))
    price = rng.integers(0, NUM_PRICE_BUCKETS, size=n)
    color = rng.integers(0, len(COLORS), size=n)
    item_vectors = centroids[category] + sub_offsets[subcategory] + rng.normal(scale=0.35 / np.sqrt(d), size=(n, d))
    rank = rng.permutation(n)
    item_log_pop = -config.popularity_exponent * np.log1p(rank)

    tags_per_category = max(2, config.num_tags // c)
    tags = []
    num_tags = rng.integers(1, 5, size=n)
    for i in range(n):
        pool = (category[i] * tags_per_category + np.arange(tags_per_category)) % config.num_tags
        own = rng.random(num_tags[i]) < 0.8
        chosen = np.where(own, rng.choice(pool, size=num_tags[i]), rng.integers(0, config.num_tags, size=num_tags[i]))
        tags.append(sorted({f"t{t}" for t in chosen}))

    items = pd.DataFrame({
        ITEM_ID: [f"i{i}" for i in range(n)],
        "category": [f"c{x}" for x in category],
        "subcategory": [f"s{x}" for x in subcategory],
        "brand": [f"b{x}" for x in brand],
        "price_bucket": [f"p{x}" for x in price],
        "color": [COLORS[x] for x in color],
        "tags": tags,
    })

    # Users.
    m = config.num_users
    age = rng.integers(0, len(AGE_BUCKETS), size=m)
    gender = rng.integers(0, len(GENDERS), size=m)
    region = rng.integers(0, NUM_REGIONS, size=m)
    age_offsets = rng.normal(size=(len(AGE_BUCKETS), d)) * (0.5 / np.sqrt(d))
    fav1 = rng.integers(0, c, size=m)
    fav2 = rng.integers(0, c, size=m)
    mix = rng.uniform(0.5, 1.0, size=(m, 1))
    user_vectors = (mix * centroids[fav1] + (1 - mix) * centroids[fav2] + age_offsets[age]
                    + rng.normal(scale=0.3 / np.sqrt(d), size=(m, d)))
    users = pd.DataFrame({
        USER_ID: [f"u{u}" for u in range(m)],
        "age": [AGE_BUCKETS[x] for x in age],
        "gender": [GENDERS[x] for x in gender],
        "region": [f"r{x}" for x in region],
    })

    s = config.coaction_strength
    world = _World(
        item_vectors=item_vectors, item_log_popularity=item_log_pop, item_category=category,
        item_subcategory=subcategory, item_price=price, user_vectors=user_vectors, user_age=age,
        user_gender=gender, user_region=region,
        w_age_category=rng.normal(scale=s, size=(len(AGE_BUCKETS), c)),
        w_gender_price=rng.normal(scale=s, size=(len(GENDERS), NUM_PRICE_BUCKETS)),
        w_region_subcategory=rng.normal(scale=s, size=(NUM_REGIONS, n_sub)),
        click_bias=-0.5, history_weight=1.0 * (s > 0),
    )
    return world, users, items


def _impressions_for_users(config: SyntheticConfig, world: _World, users: np.ndarray,
                           rng: np.random.Generator) -> Dict[str, np.ndarray]:
    """Impressions of a block of users, sorted by (user, timestamp)."""
    n_users = len(users)
    mean = config.mean_impressions_per_user
    counts = 3 + rng.geometric(1.0 / max(mean - 2.0, 1.0), size=n_users) - 1
    counts = np.minimum(counts, config.num_items // 2)
    max_count = int(counts.max())
    pool_size = int(min(config.num_items, max(4 * max_count, 200)))

    # Candidate pool per user from the popularity law, then a Gumbel top-k draw
    # ∝ exp(β·p_u·q_i) within it: impressions ∝ popularity × affinity.
    pop = np.exp(world.item_log_popularity - world.item_log_popularity.max())
    pop /= pop.sum()
    pool = rng.choice(config.num_items, size=(n_users, pool_size), p=pop)
    pool.sort(axis=1)
    duplicate = np.zeros_like(pool, dtype=bool)
    duplicate[:, 1:] = pool[:, 1:] == pool[:, :-1]
    # An item drawn m times into the pool keeps weight m (importance weight of the
    # popularity draw), so deduplication does not flatten popularity.
    multiplicity = _run_lengths(pool)
    affinity = np.einsum("ud,upd->up", world.user_vectors[users], world.item_vectors[pool])
    keys = config.affinity_strength * affinity + np.log(multiplicity) + rng.gumbel(size=pool.shape)
    keys[duplicate] = -np.inf
    order = np.argsort(-keys, axis=1)[:, :max_count]
    chosen = np.take_along_axis(pool, order, axis=1)
    valid = np.take_along_axis(~duplicate, order, axis=1) & (np.arange(max_count)[None, :] < counts[:, None])

    user_rep = np.repeat(users[:, None], max_count, axis=1)[valid]
    item_idx = chosen[valid]
    # Timestamps: each user starts somewhere in a 180-day window, exponential gaps.
    start = rng.integers(1_600_000_000, 1_600_000_000 + 180 * 86400, size=n_users)
    gaps = rng.exponential(3600.0, size=(n_users, max_count)).astype(np.int64) + 1
    ts = (start[:, None] + np.cumsum(gaps, axis=1))[valid]

    # Click labels with planted co-action, including the share of the recent
    # history (previous impressions of the same user) in the target's category.
    cat = world.item_category[item_idx]
    same_user_prev = np.zeros(len(item_idx))
    window = config.history_length
    for lag in range(1, window + 1):
        prev_same_user = np.zeros(len(item_idx), dtype=bool)
        prev_same_user[lag:] = user_rep[lag:] == user_rep[:-lag]
        match = np.zeros(len(item_idx), dtype=bool)
        match[lag:] = cat[lag:] == cat[:-lag]
        same_user_prev += prev_same_user & match
    num_prev = np.minimum(_position_within_user(user_rep), window)
    history_share = np.where(num_prev > 0, same_user_prev / np.maximum(num_prev, 1), 0.0)
    logit = (world.click_bias
             + 0.5 * np.einsum("nd,nd->n", world.user_vectors[user_rep], world.item_vectors[item_idx])
             + world.w_age_category[world.user_age[user_rep], cat]
             + world.w_gender_price[world.user_gender[user_rep], world.item_price[item_idx]]
             + world.w_region_subcategory[world.user_region[user_rep], world.item_subcategory[item_idx]]
             + world.history_weight * (history_share - 0.3))
    label = (rng.random(len(logit)) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return {"user": user_rep, "item": item_idx, "timestamp": ts, "label": label}


def _run_lengths(sorted_rows: np.ndarray) -> np.ndarray:
    """For each row-sorted entry, how many times its value occurs in its row."""
    out = np.empty(sorted_rows.shape, dtype=np.float64)
    for r, row in enumerate(sorted_rows):
        _, inverse, counts = np.unique(row, return_inverse=True, return_counts=True)
        out[r] = counts[inverse]
    return out


def _position_within_user(sorted_users: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal values of a sorted array."""
    n = len(sorted_users)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.ones(n, dtype=bool)
    starts[1:] = sorted_users[1:] != sorted_users[:-1]
    idx = np.arange(n)
    run_start = np.maximum.accumulate(np.where(starts, idx, 0))
    return idx - run_start


def generate_synthetic(config: SyntheticConfig = SyntheticConfig()) -> RawDataset:
    """Builds the synthetic dataset lazily: tables now, interactions chunk by chunk.

    Every chunk holds complete users (so per-user splits stream), sorted by user and
    timestamp. Interactions carry a click ``label``; impressions with label 0 are
    negatives for the ranker, clicks are positives for retrieval.
    """
    world, users, items = _build_world(config)
    schema = synthetic_schema(config)
    user_ids = users[USER_ID].to_numpy()
    item_ids = items[ITEM_ID].to_numpy()
    errors = RowErrors("fail")

    def interactions() -> Iterator[pd.DataFrame]:
        for chunk, start in enumerate(range(0, config.num_users, config.users_per_chunk)):
            block = np.arange(start, min(start + config.users_per_chunk, config.num_users))
            rng = np.random.default_rng([config.seed, 2, chunk])
            # Sub-blocks bound the [users, pool, dim] gather in memory.
            for sub in range(0, len(block), 2000):
                imp = _impressions_for_users(config, world, block[sub:sub + 2000], rng)
                errors.rows_read += len(imp["user"])
                yield pd.DataFrame({
                    USER_ID: user_ids[imp["user"]],
                    ITEM_ID: item_ids[imp["item"]],
                    "timestamp": imp["timestamp"].astype(np.int64),
                    "label": imp["label"],
                })

    return RawDataset(schema=schema, users=users, items=items, interactions=interactions,
                      user_complete_chunks=True, predefined_split=False, errors=errors,
                      source=f"synthetic(seed={config.seed}, users={config.num_users}, items={config.num_items})")


def synthetic_world(config: SyntheticConfig) -> _World:
    """The hidden parameters the generator plants (for tests and diagnostics)."""
    return _build_world(config)[0]
