import os

import pytest

from pipeline.orchestration import StageState, WorkdirLock, WorkdirLocked, content_hash, digest
from pipeline.promotion import PromotionConfig, gate


def test_lock_is_exclusive_and_released(tmp_path):
    with WorkdirLock(str(tmp_path)):
        with pytest.raises(WorkdirLocked, match="another recfunnel run holds"):
            with WorkdirLock(str(tmp_path)):
                pass
    with WorkdirLock(str(tmp_path)):  # released on exit
        pass


def test_stage_state_current_invalidate(tmp_path):
    state = StageState(str(tmp_path))
    out = tmp_path / "out.txt"
    out.write_text("x")
    assert not state.is_current("data", "fp1")
    state.record("data", "fp1", {"rows": 3})
    assert state.is_current("data", "fp1", [str(out)])
    assert not state.is_current("data", "fp2", [str(out)])
    assert not state.is_current("data", "fp1", [str(tmp_path / "missing")])
    state.invalidate(["data"])
    assert state.load("data") is None


def test_fingerprints_follow_content(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.txt").write_text("1")
    h1 = content_hash([str(d)])
    (d / "a.txt").write_text("2")
    assert content_hash([str(d)]) != h1
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert content_hash([str(tmp_path / "nope")]) != content_hash([str(d)])


def test_gate_decisions():
    cfg = PromotionConfig(metric="retrieval.recall@10", min_value=0.1, max_regression=0.01)
    assert gate({"retrieval.recall@10": 0.2}, None, cfg)["promote"]
    low = gate({"retrieval.recall@10": 0.05}, None, cfg)
    assert not low["promote"] and "min_value" in low["reason"]
    worse = gate({"retrieval.recall@10": 0.18}, {"retrieval.recall@10": 0.2}, cfg)
    assert not worse["promote"] and "worse than the promoted" in worse["reason"]
    # Within the tolerance: promoted.
    assert gate({"retrieval.recall@10": 0.195}, {"retrieval.recall@10": 0.2}, cfg)["promote"]
    with pytest.raises(ValueError, match="not among the run's metrics"):
        gate({"x@1": 1.0}, None, cfg)
    with pytest.raises(ValueError, match="keep_versions"):
        PromotionConfig(keep_versions=0)


def test_cleanup_removes_killed_exports_of_every_model(tmp_path):
    from pipeline.job import _cleanup_incomplete_exports
    from serving import exports

    w = str(tmp_path)

    def make(model, version):
        os.makedirs(exports.version_path(w, model, version))

    for model in exports.REQUIRED_MODELS + (exports.RANKER,):
        make(model, 1)  # a complete version
    make(exports.QUERY_TOWER, 2)  # an export killed after the query tower...
    make(exports.ITEM_TOWER, 2)
    make(exports.RANKER, 2)  # ...and the ranker, before the index
    os.makedirs(exports.version_path(w, exports.RANKER, 3) + ".tmp")  # a half-written SavedModel
    _cleanup_incomplete_exports(w)
    for model in exports.REQUIRED_MODELS + (exports.RANKER,):
        assert exports.versions(w, model) == [1], model
    assert os.listdir(exports.model_dir(w, exports.RANKER)) == ["1"]


def _data_dir(workdir, users=b"users-1", items=b"items-1"):
    from models import data_layout as layout

    d = os.path.join(workdir, "data")
    os.makedirs(d, exist_ok=True)
    for name, content in ((layout.SCHEMA_FILE, b"{}"), (layout.USERS_FILE, users),
                          (layout.USER_HISTORY_FILE, b"history-1"), (layout.ITEMS_FILE, items)):
        with open(os.path.join(d, name), "wb") as f:
            f.write(content)
    return d


def test_a_version_keeps_its_own_copy_of_the_data_tables(tmp_path):
    from models import data_layout as layout
    from pipeline.job import _cleanup_incomplete_exports, export_serving_data
    from serving import exports

    w = str(tmp_path)
    _data_dir(w)
    first = export_serving_data(w, 1)
    assert first == exports.version_path(w, exports.SERVING_DATA, 1) == exports.serving_data_dir(w, 1)
    _data_dir(w, users=b"users-2")  # the next run rewrites the users, not the items
    second = export_serving_data(w, 2)
    with open(os.path.join(first, layout.USERS_FILE), "rb") as f:
        assert f.read() == b"users-1"  # version 1 still serves with its own users
    with open(os.path.join(second, layout.USERS_FILE), "rb") as f:
        assert f.read() == b"users-2"
    same = os.stat(os.path.join(first, layout.ITEMS_FILE)), os.stat(os.path.join(second, layout.ITEMS_FILE))
    assert same[0].st_ino == same[1].st_ino  # an unchanged table is one file, linked
    assert os.stat(os.path.join(first, layout.USERS_FILE)).st_ino != os.stat(os.path.join(second,
                                                                                          layout.USERS_FILE)).st_ino
    assert sorted(os.listdir(exports.model_dir(w, exports.SERVING_DATA))) == ["1", "2"]  # no temporary left
    # A version without a copy (exported before copies existed) serves with <workdir>/data.
    assert exports.serving_data_dir(w, 7) == os.path.join(w, "data")
    # Copies belong to their version: without complete models they are removed like the models.
    for model in exports.REQUIRED_MODELS:
        os.makedirs(exports.version_path(w, model, 1))
    _cleanup_incomplete_exports(w)
    assert exports.versions(w, exports.SERVING_DATA) == [1]


def test_a_rejected_version_is_recorded_and_never_served_by_default(tmp_path):
    from pipeline.promotion import promote_if_better
    from serving import exports

    w = str(tmp_path)
    for v in (1, 2, 3):
        for model in exports.REQUIRED_MODELS + (exports.SERVING_DATA,):
            os.makedirs(exports.version_path(w, model, v))
    assert exports.serving_version(w) == 3  # nothing gated yet: the newest complete version
    cfg = PromotionConfig(min_value=0.5)
    low = promote_if_better(w, 1, {"retrieval.recall@10": 0.1}, cfg)
    assert not low["promote"]
    assert exports.rejected_versions(w) == {1: low["reason"]} and "min_value" in low["reason"]
    assert exports.promoted_version(w) is None
    # Version 1 is the only one gated, and it is not served; 3 (not gated yet) is.
    assert exports.serving_version(w) == 3
    promote_if_better(w, 3, {"retrieval.recall@10": 0.1}, cfg)
    assert exports.serving_version(w) == 2
    # A promotion wins over everything; pruning (keep 2: versions 2 and 3) forgets pruned rejections.
    assert promote_if_better(w, 2, {"retrieval.recall@10": 0.9}, PromotionConfig(keep_versions=2))["promote"]
    assert exports.serving_version(w) == 2
    for model in exports.REQUIRED_MODELS + (exports.SERVING_DATA,):
        assert exports.versions(w, model) == [2, 3], model
    assert list(exports.rejected_versions(w)) == [3]


def test_the_promoted_version_is_measured_again_when_the_data_changed(tmp_path):
    from pipeline.promotion import promote_if_better
    from serving import exports

    w = str(tmp_path)
    for v in (1, 2, 3):
        for model in exports.REQUIRED_MODELS:
            os.makedirs(exports.version_path(w, model, v))
    cfg = PromotionConfig(max_regression=0.01)
    calls = []

    def reevaluate(v):
        calls.append(v)
        return {"retrieval.recall@10": 0.27}  # the old version on the new data: worse than on its own

    assert promote_if_better(w, 1, {"retrieval.recall@10": 0.33}, cfg, "data-a", reevaluate)["promote"]
    assert calls == [] and exports.promoted(w)["data_fingerprint"] == "data-a"
    # Same data: the recorded 0.33 is the comparison, and 0.30 is a regression beyond 0.01.
    same = promote_if_better(w, 2, {"retrieval.recall@10": 0.30}, cfg, "data-a", reevaluate)
    assert not same["promote"] and calls == [] and same["promoted_measured_on"] == "its own run's data"
    # New data: every metric moved; version 1 is measured again on it (0.27), and 0.30 is better.
    fresh = promote_if_better(w, 3, {"retrieval.recall@10": 0.30}, cfg, "data-b", reevaluate)
    assert fresh["promote"] and calls == [1] and fresh["promoted_value"] == 0.27
    assert fresh["promoted_version"] == 1 and fresh["promoted_measured_on"] == "this run's data"
    assert exports.promoted(w)["version"] == 3 and exports.promoted(w)["data_fingerprint"] == "data-b"
    # Without a way to measure again (or with the old exports gone) the recorded metrics are used.
    assert not promote_if_better(w, 2, {"retrieval.recall@10": 0.20}, cfg, "data-c")["promote"]


def test_a_glob_source_changes_its_hash_when_a_matching_file_appears(tmp_path):
    from pipeline.orchestration import content_hash

    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "day1.csv").write_text("u,i,t\n1,a,1\n")
    pattern = str(tmp_path / "logs" / "*.csv")
    first = content_hash([pattern])
    assert content_hash([pattern]) == first
    (tmp_path / "logs" / "day2.csv").write_text("u,i,t\n2,b,2\n")
    second = content_hash([pattern])
    assert second != first
    (tmp_path / "logs" / "day2.csv").write_text("u,i,t\n2,b,3\n")
    assert content_hash([pattern]) != second
    (tmp_path / "logs" / "notes.txt").write_text("not matched")
    assert content_hash([pattern]) == content_hash([pattern])


def test_a_ranker_metric_gate_compares_with_the_promoted_figure(tmp_path):
    from pipeline.promotion import promote_if_better
    from serving import exports

    w = str(tmp_path)
    for v in (1, 2):
        for model in exports.REQUIRED_MODELS:
            os.makedirs(exports.version_path(w, model, v))
    cfg = PromotionConfig(metric="ranker.auc", max_regression=0.0)
    assert promote_if_better(w, 1, {"ranker.auc": 0.59, "retrieval.recall@10": 0.3}, cfg)["promote"]
    assert exports.promoted(w)["metrics"] == {"ranker.auc": 0.59, "retrieval.recall@10": 0.3}
    worse = promote_if_better(w, 2, {"ranker.auc": 0.51, "retrieval.recall@10": 0.3}, cfg)
    assert not worse["promote"] and worse["promoted_value"] == 0.59 and "worse than the promoted" in worse["reason"]


def test_pruning_keeps_the_optional_models_the_promoted_version_serves_with(tmp_path):
    from pipeline.promotion import promote_if_better
    from serving import exports

    w = str(tmp_path)

    def export(v, preranker):
        for model in exports.REQUIRED_MODELS + (exports.SERVING_DATA,) + (("preranker",) if preranker else ()):
            os.makedirs(exports.version_path(w, model, v))

    keep_one = PromotionConfig(keep_versions=1)
    export(1, preranker=True)
    assert promote_if_better(w, 1, {"retrieval.recall@10": 0.3}, keep_one)["promote"]
    export(2, preranker=False)  # served with version 1's pre-ranker
    assert promote_if_better(w, 2, {"retrieval.recall@10": 0.3}, keep_one)["promote"]
    assert exports.stage_version(w, "preranker", 2) == 1
    export(3, preranker=True)
    assert not promote_if_better(w, 3, {"retrieval.recall@10": 0.1}, PromotionConfig(keep_versions=1,
                                                                                         min_value=0.2))["promote"]
    assert exports.versions(w, "preranker") == [1, 3] and exports.stage_version(w, "preranker", 2) == 1
    assert exports.versions(w, "index") == [2, 3]


def test_the_epoch_log_gives_every_epoch_the_last_figures_written(tmp_path):
    from pipeline.job import _read_epoch_log

    path = tmp_path / "epochs.jsonl"
    # Epoch 1 ran twice (killed after logging it, before its backup), and only epoch 2 logged a rate.
    path.write_text('{"epoch": 0, "loss": 9.0, "main_loss": 5.0}\n{"epoch": 1, "loss": 8.0, "main_loss": 4.0}\n'
                    '{"epoch": 1, "loss": 7.5, "main_loss": 3.5}\n'
                    '{"epoch": 2, "loss": 7.0, "main_loss": 3.0, "learning_rate": 0.1}\n')
    fallback = {"main_loss": [3.0]}
    assert _read_epoch_log(str(path), 3, fallback) == {"loss": [9.0, 7.5, 7.0], "main_loss": [5.0, 3.5, 3.0]}
    assert _read_epoch_log(str(path), 4, fallback) is fallback  # an epoch missing: what Keras saw
