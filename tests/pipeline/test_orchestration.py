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
