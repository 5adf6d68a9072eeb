import json
import os

import numpy as np
import pytest
from conftest import python_subprocess

from serving.index import IndexConfig, build_index, load_index, save_index


def _clustered(n, d, seed):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, d))
    x = centers[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _exact_scores(q, db, k):
    s = q @ db.T
    return -np.sort(-s, axis=1)[:, :k]


@pytest.mark.parametrize("kind", ["brute_force", "scann"])
def test_index_scores_match_brute_force(kind, tmp_path):
    db = _clustered(3000, 16, 0)
    q = _clustered(50, 16, 1)
    ids = [f"i{j}" for j in range(len(db))]
    module, params = build_index(db, ids, IndexConfig(kind=kind))
    path = str(tmp_path / "index")
    save_index(module, params, path, item_tower_version="7", embedding_dim=16, num_items=len(db))
    index = load_index(path, expected_item_tower_version="7")
    scores, got_ids = index.search(q, 10)
    exact = _exact_scores(q, db, 10)
    # Compare scores, not ids (ties may flip): the returned items' true scores.
    true = np.array([[q[r] @ db[int(i[1:])] for i in row] for r, row in enumerate(got_ids)])
    np.testing.assert_allclose(true, scores, atol=1e-2 if kind == "scann" else 1e-5)
    recall = np.mean(true >= exact[:, -1:] - 1e-5) if kind == "scann" else None
    if kind == "brute_force":
        np.testing.assert_allclose(scores, exact, atol=1e-5)
    else:
        # Untuned defaults (a third of the partitions); tuning is tested below.
        assert recall >= 0.9


def test_resolved_config_is_side_effect_free_and_validated():
    cfg = IndexConfig()
    assert cfg.resolved(500)["kind"] == "brute_force"
    p = cfg.resolved(10000)
    assert p["kind"] == "scann" and p["num_leaves"] == 100 and p["leaves_to_search"] == 33
    assert cfg.resolved(10000) == p
    with pytest.raises(ValueError, match="index.kind"):
        IndexConfig(kind="hnsw")
    with pytest.raises(ValueError, match="empty corpus"):
        cfg.resolved(0)
    with pytest.raises(ValueError, match="NaN"):
        build_index(np.array([[np.nan, 1.0]], np.float32), ["a"])


def test_manifest_mismatch_is_refused(tmp_path):
    db = _clustered(100, 8, 2)
    module, params = build_index(db, [str(i) for i in range(100)], IndexConfig(kind="brute_force"))
    path = str(tmp_path / "index")
    save_index(module, params, path, item_tower_version="3", embedding_dim=8, num_items=100)
    with pytest.raises(ValueError, match="item tower version '3', not '4'"):
        load_index(path, expected_item_tower_version="4")
    with pytest.raises(ValueError, match="8-dim"):
        load_index(path, expected_embedding_dim=16)
    with open(os.path.join(path, "manifest.json")) as f:
        assert json.load(f)["num_items"] == 100


def test_scann_index_loads_in_a_fresh_process_with_identical_answers(tmp_path):
    db = _clustered(2000, 16, 3)
    q = _clustered(5, 16, 4)
    module, params = build_index(db, [f"i{j}" for j in range(len(db))], IndexConfig(kind="scann"))
    path = str(tmp_path / "index")
    save_index(module, params, path, item_tower_version="1", embedding_dim=16, num_items=len(db))
    here_scores, here_ids = load_index(path).search(q, 10)
    np.save(tmp_path / "q.npy", q)
    code = f"""
import json, numpy as np
from serving.index import load_index
s, i = load_index({path!r}).search(np.load({str(tmp_path / 'q.npy')!r}), 10)
print(json.dumps({{"scores": s.tolist(), "ids": i.tolist()}}))
"""
    proc = python_subprocess(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["scores"], here_scores, rtol=1e-6)
    assert out["ids"] == here_ids.tolist()


def test_tuning_reaches_the_target_recall_with_fewer_leaves_than_all():
    db = _clustered(5000, 16, 5)
    q = _clustered(200, 16, 6)
    module, params = build_index(db, [f"i{j}" for j in range(len(db))], IndexConfig(kind="scann", target_recall=0.98),
                                 tuning_queries=q)
    assert params["leaves_to_search"] <= params["num_leaves"]
    curve = params["tuning"]["curve"]
    assert curve[-1][0] == params["leaves_to_search"] and curve[-1][1] >= 0.98
    got = module.search(q, 10)["item_ids"].numpy()
    true = np.array([[q[r] @ db[int(i.decode()[1:])] for i in row] for r, row in enumerate(got)])
    exact = _exact_scores(q, db, 10)
    assert np.mean(true >= exact[:, -1:] - 1e-4) >= 0.98


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_top_k_matches_a_full_sort(seed):
    from serving.index import exact_top_k

    rng = np.random.default_rng(seed)
    db = rng.normal(size=(300, 8)).astype(np.float32)
    q = rng.normal(size=(37, 8)).astype(np.float32)
    full = q @ db.T
    for k, block in ((5, 10), (300, 64), (400, 1)):  # blocks smaller than Q; k beyond N is capped
        scores, idx = exact_top_k(q, db, k, block_size=block)
        want = -np.sort(-full, axis=1)[:, :min(k, 300)]
        np.testing.assert_allclose(scores, want, atol=1e-5)  # blocked BLAS sums in another order
        np.testing.assert_allclose(np.take_along_axis(full, idx, axis=1), want, atol=1e-5)
    # Tiny hand case: scores [1, 3, 2] -> top-2 = [3, 2] at [1, 2].
    s, i = exact_top_k(np.array([[1.0]], np.float32), np.array([[1.0], [3.0], [2.0]], np.float32), 2)
    assert s.tolist() == [[3.0, 2.0]] and i.tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="`block_size` should be positive"):
        exact_top_k(q, db, 3, block_size=0)


def test_tuning_picks_the_fastest_pair_reaching_the_target():
    from serving.index import tune_search

    db = _clustered(5000, 16, 7)
    q = _clustered(300, 16, 8)
    module, params = build_index(db, [f"i{j}" for j in range(len(db))], IndexConfig(kind="scann", target_recall=0.95),
                                 tuning_queries=q)
    grid = params["tuning"]["grid"]
    chosen = [row for row in grid if row[0] == params["leaves_to_search"] and row[1] == params["reorder"]]
    assert len(chosen) == 1 and chosen[0][2] >= 0.95
    assert chosen[0][3] == min(row[3] for row in grid)  # the fastest of the measured pairs
    assert all(row[2] >= 0.95 for row in grid)
    # Deeper re-scoring never needs more partitions.
    by_depth = sorted(grid, key=lambda row: row[1])
    assert [row[0] for row in by_depth] == sorted([row[0] for row in by_depth], reverse=True)
    got = module.search(q, 10)["item_ids"].numpy()
    true = np.array([[q[r] @ db[int(i.decode()[1:])] for i in row] for r, row in enumerate(got)])
    assert np.mean(true >= _exact_scores(q, db, 10)[:, -1:] - 1e-4) >= 0.95
    # Unreachable target: all partitions and the deepest re-scoring.
    from scann import scann_ops

    searcher = scann_ops.builder(db, 10, "dot_product").tree(num_leaves=20, num_leaves_to_search=5,
                                                             training_sample_size=5000).score_ah(
        2, anisotropic_quantization_threshold=0.2).reorder(50).build()
    from serving.index import _recall_at, exact_top_k

    exact, _ = exact_top_k(q, db, 10)
    ceiling = _recall_at(searcher, db, q, exact, 10, 20, 20)  # all partitions, the deepest re-scoring
    assert ceiling < 1.0
    leaves, reorder, report = tune_search(searcher, db, q, 20, 1.0, reorder_candidates=(10, 20),
                                          deep_reorder_candidates=(), unreachable_tolerance=0.02)
    assert report["target_reached"] is False and report["ceiling"] == round(ceiling, 4)
    assert report["tuned_for"] == round(ceiling - 0.02, 4)
    chosen = [row for row in report["grid"] if row[:2] == [leaves, reorder]]
    assert len(chosen) == 1 and chosen[0][2] >= round(ceiling - 0.02, 4)  # the grid's recalls are rounded
    # the fewest partitions for that recall at the chosen depth: one fewer misses it
    assert leaves == 1 or _recall_at(searcher, db, q, exact, 10, leaves - 1, reorder) < ceiling - 0.02
    # no tolerance: every partition is searched
    leaves, reorder, report = tune_search(searcher, db, q, 20, 1.0, reorder_candidates=(10, 20),
                                          deep_reorder_candidates=(), unreachable_tolerance=0.0)
    chosen = [row for row in report["grid"] if row[:2] == [leaves, reorder]]
    assert chosen[0][2] >= round(ceiling, 4)
    # Searching partitions only (a fixed depth): the same rule.
    from serving.index import tune_leaves_to_search

    leaves, curve, report = tune_leaves_to_search(searcher, db, q, 20, 1.0, reorder=20, unreachable_tolerance=0.02)
    assert report == {"target_reached": False, "ceiling": round(_recall_at(searcher, db, q, exact, 10, 20, 20), 4),
                      "tuned_for": round(_recall_at(searcher, db, q, exact, 10, 20, 20) - 0.02, 4)}
    assert curve[-1] == (leaves, _recall_at(searcher, db, q, exact, 10, leaves, 20))
    assert curve[-1][1] >= ceiling - 0.02 and all(r < ceiling - 0.02 for n, r in curve[:-1] if n == leaves - 1)
    # When the usual depths miss, deeper re-scoring is tried (here up to all 5,000 items: exact).
    leaves, reorder, report = tune_search(searcher, db, q, 20, 1.0, reorder_candidates=(10, 20),
                                          deep_reorder_candidates=(2000, 5000, 10000))
    assert reorder in (2000, 5000) and all(row[2] >= 1.0 for row in report["grid"])
    assert report["target_reached"] is True


def test_deep_queries_are_not_cut_short_by_the_tuned_depth():
    db = _clustered(3000, 16, 9)
    q = _clustered(4, 16, 10)
    module, params = build_index(db, [f"i{j}" for j in range(len(db))],
                                 IndexConfig(kind="scann", num_leaves=60, leaves_to_search=1, reorder=20))
    for k in (1000, 5000):
        out = module.search(q, k)
        ids, scores = out["indices"].numpy(), out["scores"].numpy()
        assert ids.shape == (4, min(k, 3000)) and np.all(np.isfinite(scores))
        assert all(len(set(row)) == len(row) for row in ids.tolist())
        # re-scored exactly: the returned scores are the true inner products, descending
        np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, db[ids]), atol=1e-5)
        assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_queries_whose_partitions_hold_fewer_than_k_points_search_more_of_them():
    """k-means leaves some partitions small (it varies between builds): with one partition
    searched, ScaNN pads such rows with NaN scores. The index searches those rows again,
    deeper, and leaves the other rows of the batch as they were."""
    from scann import scann_ops

    db = _clustered(3000, 16, 9)
    q = _clustered(200, 16, 10)
    module, _ = build_index(db, [f"i{j}" for j in range(len(db))],
                            IndexConfig(kind="scann", num_leaves=60, leaves_to_search=1, reorder=20))
    raw_ids, raw_scores = scann_ops.searcher_from_module(module.state).search_batched_parallel(
        q, final_num_neighbors=10, pre_reorder_num_neighbors=20, leaves_to_search=1)
    full = np.isfinite(raw_scores.numpy()).all(axis=1)  # typically all but a few rows
    out = module.search(q, 10)
    ids, scores = out["indices"].numpy(), out["scores"].numpy()
    assert np.all(np.isfinite(scores)) and all(len(set(row)) == 10 for row in ids.tolist())
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, db[ids]), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    np.testing.assert_array_equal(ids[full], raw_ids.numpy()[full])


@pytest.mark.parametrize("num_items", [1, 5, 15])
@pytest.mark.parametrize("config", [IndexConfig(kind="scann"), IndexConfig(kind="auto", brute_force_max_items=0)],
                         ids=["scann", "auto"])
def test_a_corpus_too_small_for_scann_is_searched_exactly(num_items, config, tmp_path, caplog):
    """ScaNN's hashing trains 16 clusters per block and refuses fewer items: below that the
    index is brute force, and the manifest says why."""
    # Item j = [j, 1]: the query [1, 0] scores item j at j, the query [-1, 0] at -j.
    db = np.stack([np.arange(num_items), np.ones(num_items)], axis=1).astype(np.float32)
    q = np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32)
    with caplog.at_level("WARNING", logger="recfunnel.serving"):
        module, params = build_index(db, [f"i{j}" for j in range(num_items)], config, tuning_queries=q)
    assert params["kind"] == "brute_force"
    assert f"at least 16 items, the corpus has {num_items}" in params["brute_force_reason"]
    assert params["brute_force_reason"] in caplog.text
    path = str(tmp_path / "index")
    save_index(module, params, path, item_tower_version="1", embedding_dim=2, num_items=num_items)
    index = load_index(path)
    assert index.manifest["params"]["brute_force_reason"] == params["brute_force_reason"]
    scores, ids = index.search(q, 10)
    k = min(10, num_items)  # e.g. N=5: [4, 3, 2, 1, 0] and [0, -1, -2, -3, -4]
    np.testing.assert_allclose(scores[0], np.arange(num_items - 1, num_items - 1 - k, -1), atol=1e-6)
    np.testing.assert_allclose(scores[1], -np.arange(k), atol=1e-6)
    assert ids[0].tolist() == [f"i{j}" for j in range(num_items - 1, num_items - 1 - k, -1)]
    assert ids[1].tolist() == [f"i{j}" for j in range(k)]


def test_sixteen_items_are_enough_for_scann():
    db = _clustered(16, 8, 11)
    q = _clustered(20, 8, 12)
    module, params = build_index(db, [f"i{j}" for j in range(16)], IndexConfig(kind="scann"), tuning_queries=q)
    assert params["kind"] == "scann" and "brute_force_reason" not in params
    scores = module.search(q, 10)["scores"].numpy()
    assert scores.shape == (20, 10) and np.all(np.isfinite(scores))


def test_a_training_sample_smaller_than_the_partitions_is_rejected():
    # 2,000 items: about sqrt(2000) = 44.7 -> 45 partitions; 10 points cannot seed 45 clusters.
    with pytest.raises(ValueError, match=r"`index.training_sample_size` should be 0 \(all items\) or at least the 45 "
                                         r"partitions.*Received: training_sample_size=10"):
        IndexConfig(kind="scann", training_sample_size=10).resolved(2000)
    with pytest.raises(ValueError, match=r"at least `index.num_leaves`=50. Received: training_sample_size=49"):
        IndexConfig(num_leaves=50, training_sample_size=49)
    # Too small a corpus for ScaNN: brute force, the sample is irrelevant.
    assert IndexConfig(kind="scann", training_sample_size=1).resolved(15)["kind"] == "brute_force"
    # Exactly one point per partition is enough.
    db = _clustered(2000, 8, 13)
    module, params = build_index(db, [f"i{j}" for j in range(2000)], IndexConfig(kind="scann", training_sample_size=45))
    assert params["num_leaves"] == 45 and params["training_sample_size"] == 45
    assert np.all(np.isfinite(module.search(db[:3], 10)["scores"].numpy()))


def test_an_unreachable_target_at_a_fixed_depth_is_reported_in_the_manifest(tmp_path):
    from scann import scann_ops

    from serving.index import _recall_at, exact_top_k

    db = _clustered(3000, 16, 5)
    q = _clustered(200, 16, 6)
    ids = [f"i{j}" for j in range(3000)]
    # Re-scoring only 10 candidates: quantization errors cap recall@10 well below 1.
    module, params = build_index(db, ids, IndexConfig(kind="scann", num_leaves=20, reorder=10, target_recall=1.0),
                                 tuning_queries=q)
    path = str(tmp_path / "index")
    save_index(module, params, path, item_tower_version="1", embedding_dim=16, num_items=3000)
    tuning = load_index(path).manifest["params"]["tuning"]
    assert tuning["target_reached"] is False
    assert isinstance(tuning["ceiling"], float) and tuning["ceiling"] < 1.0
    # the ceiling is the recall of searching all 20 partitions at that depth
    exact, _ = exact_top_k(q, db, 10)
    searcher = scann_ops.searcher_from_module(module.state)
    assert tuning["ceiling"] == round(_recall_at(searcher, db, q, exact, 10, 20, 10), 4)
    assert tuning["tuned_for"] == pytest.approx(tuning["ceiling"] - 0.005, abs=1e-4)  # both rounded to 4 places
    assert tuning["curve"][-1][1] >= tuning["tuned_for"]
    # A reachable target at a fixed depth: reported as reached, no ceiling.
    _, params = build_index(db, ids, IndexConfig(kind="scann", num_leaves=20, reorder=3000, target_recall=0.9),
                            tuning_queries=q)
    assert params["tuning"]["target_reached"] is True and "ceiling" not in params["tuning"]
