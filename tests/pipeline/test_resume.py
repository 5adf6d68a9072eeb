"""The scheduled job's safety: skipping, the lock, quality gates, and SIGKILL at three points."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, recfunnel

TINY = os.path.join(REPO, "pipeline", "configs", "tiny.yaml")
pytestmark = pytest.mark.slow


def _versions(workdir, model):
    d = os.path.join(workdir, "export", model)
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def _assert_no_partial_exports(workdir):
    """Every visible version directory is complete and no temporary is visible as a version."""
    for model in ("query_tower", "item_tower", "index"):
        for name in _versions(workdir, model):
            assert name.isdigit(), f"{model}/{name} is not a clean version directory"
            path = os.path.join(workdir, "export", model, name)
            marker = "manifest.json" if model == "index" else "saved_model.pb"
            assert os.path.exists(os.path.join(path, marker)), f"{path} is incomplete"


def _kill_when(workdir, marker, extra=()):
    """Starts a run and SIGKILLs it as soon as `marker` appears on its stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "--config", TINY, "--workdir", workdir,
                             *extra], cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    seen = []
    deadline = time.time() + 300
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            proc.send_signal(signal.SIGKILL)
            break
        assert time.time() < deadline
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    return "".join(seen)


def _finish(workdir, extra=()):
    proc = recfunnel("run", "--config", TINY, "--workdir", workdir, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), proc.stderr


@pytest.mark.parametrize("marker", [
    "stage statistics: started",       # during the Beam job
    "retrieval epoch 2/",              # mid-training (after one checkpointed epoch)
    "stage export: started",           # mid-export
])
def test_sigkill_then_rerun_completes(tmp_path, marker):
    w = str(tmp_path / "w")
    extra = ("--set", "retrieval.epochs=4")
    _kill_when(w, marker, extra)
    _assert_no_partial_exports(w)
    assert not os.path.exists(os.path.join(w, "export", "promoted.json"))
    out, log = _finish(w, extra)
    _assert_no_partial_exports(w)
    assert out["promoted"] and out["version"] >= 1
    with open(os.path.join(w, "export", "promoted.json")) as f:
        assert json.load(f)["version"] == out["version"]
    if "epoch 2/" in marker:
        # BackupAndRestore resumed after the finished epoch(s) instead of starting over, and the report still
        # has the loss of every epoch, those before the kill included.
        assert "retrieval epoch 1/4" not in log and "must be built" not in log
        with open(os.path.join(w, "reports", "latest", "metrics.json")) as f:
            resumed = json.load(f)
        losses = resumed["retrieval_training"]["loss"]
        assert len(losses) == 4 and all(loss > 0 for loss in losses)
        # The resumed run trained the model an uninterrupted run trains: the same batches in every epoch
        # and the same optimizer state, so the same losses and the same retrieval metrics.
        uninterrupted, _ = _finish(str(tmp_path / "uninterrupted"), extra)
        with open(os.path.join(str(tmp_path / "uninterrupted"), "reports", "latest", "metrics.json")) as f:
            whole = json.load(f)
        assert whole["retrieval_training"]["loss"] == losses
        assert {k: v for k, v in whole.items() if k.startswith("retrieval.")} == \
            {k: v for k, v in resumed.items() if k.startswith("retrieval.")}
    q = recfunnel("query", "--workdir", w, "--user-id", "u1", "-k", "3")
    assert q.returncode == 0, q.stderr[-2000:]


def test_rerun_skips_unchanged_stages_and_gates_block_promotion(tmp_path):
    w = str(tmp_path / "w")
    first, _ = _finish(w)
    assert first["skipped_stages"] == []
    again, _ = _finish(w)
    # tiny.yaml trains the ranker and leaves the pre-ranker off: every stage that ran is skipped.
    assert again["skipped_stages"] == ["data", "statistics", "retrieval", "ranker", "export", "index", "evaluation"]
    assert again["version"] == first["version"]
    # A changed training config retrains, exports a new version, and an impossible gate blocks it.
    proc = recfunnel("run", "--config", TINY, "--workdir", w, "--set", "retrieval.epochs=1",
                     "--set", "promotion.min_value=0.99")
    assert proc.returncode == 5, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["version"] == first["version"] + 1 and not out["promoted"]
    assert "data" in out["skipped_stages"] and "retrieval" not in out["skipped_stages"]
    with open(os.path.join(w, "export", "promoted.json")) as f:
        assert json.load(f)["version"] == first["version"]
    q = json.loads(recfunnel("query", "--workdir", w, "--user-id", "u1", "-k", "2").stdout)
    assert q["version"] == first["version"]
    # New data (another synthetic draw: the same user ids, other histories) and a blocked gate: W/data is
    # rewritten, and the promoted version still answers as before, from its own copy of the tables.
    before = json.loads(recfunnel("query", "--workdir", w, "--user-id", "u1", "-k", "5").stdout)
    proc = recfunnel("run", "--config", TINY, "--workdir", w, "--set", "data.synthetic.seed=7",
                     "--set", "promotion.min_value=0.99")
    assert proc.returncode == 5, proc.stderr[-2000:]
    assert "data" not in json.loads(proc.stdout)["skipped_stages"]
    after = json.loads(recfunnel("query", "--workdir", w, "--user-id", "u1", "-k", "5").stdout)
    assert after["version"] == first["version"] and after["items"] == before["items"]
    # With the usual gate the refreshed version is promoted: the promoted version is measured again on the new
    # data before the max_regression comparison (its own figures came from other data).
    proc = recfunnel("run", "--config", TINY, "--workdir", w, "--set", "data.synthetic.seed=7")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(w, "reports", "latest", "metrics.json")) as f:
        promotion = json.load(f)["promotion"]
    assert promotion["promote"] and promotion["version"] == first["version"] + 2
    assert promotion["promoted_version"] == first["version"] and promotion["promoted_measured_on"] == "this run's data"
    # The report renders and links every plot it made.
    page = open(os.path.join(w, "reports", "latest", "index.html")).read()
    pngs = [f for f in os.listdir(os.path.join(w, "reports", "latest")) if f.endswith(".png")]
    assert len(pngs) >= 3 and all(f'src="{p}"' in page for p in pngs)


def test_a_first_version_turned_down_by_its_gate_is_not_served(tmp_path):
    w = str(tmp_path / "w")
    proc = recfunnel("run", "--config", TINY, "--workdir", w, "--set", "promotion.min_value=0.99")
    assert proc.returncode == 5, proc.stderr[-2000:]
    with open(os.path.join(w, "export", "rejected.json")) as f:
        assert list(json.load(f)) == ["1"]
    q = recfunnel("query", "--workdir", w, "--user-id", "u1")
    assert q.returncode == 2 and "no version" in q.stderr and "passed the quality gate" in q.stderr
    asked = recfunnel("query", "--workdir", w, "--user-id", "u1", "--version", "1")  # on purpose: it loads
    assert asked.returncode == 0 and json.loads(asked.stdout)["version"] == 1


def test_a_new_index_is_a_new_version_and_only_stage_stops_before_stale_stages(tmp_path):
    w = str(tmp_path / "w")
    first, _ = _finish(w)
    v = first["version"]
    # Other index settings: the built index of a version that may be served is never rewritten.
    out, _ = _finish(w, ("--set", "index.target_recall=0.9"))
    assert out["version"] == v + 1 and out["promoted"] and "retrieval" in out["skipped_stages"]
    assert _versions(w, "index") == [str(v), str(v + 1)]
    out, _ = _finish(w, ("--set", "index.target_recall=0.9", "--from-stage", "index"))
    assert out["version"] == v + 2 and out["promoted"]
    # An export alone leaves a version without an index: the run stops there, nothing is gated or served from it.
    proc = recfunnel("run", "--config", TINY, "--workdir", w, "--set", "index.target_recall=0.9",
                     "--only-stage", "export")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["version"] is None and out["promoted"] is None and "stage 'index' has not run yet" in proc.stderr
    with open(os.path.join(w, "export", "promoted.json")) as f:
        assert json.load(f)["version"] == v + 2
    q = recfunnel("query", "--workdir", w, "--user-id", "u1", "-k", "2")
    assert q.returncode == 0 and json.loads(q.stdout)["version"] == v + 2
    # The next run indexes, evaluates and gates that version (evaluation is per version, not reused).
    out, _ = _finish(w, ("--set", "index.target_recall=0.9"))
    assert out["version"] == v + 3 and out["promoted"] and "evaluation" not in out["skipped_stages"]


def test_a_ranker_gate_on_data_without_labels_stops_after_the_data_stage(tmp_path):
    path = tmp_path / "log.csv"
    rows = [f"u{u},i{(u * 7 + j * 3) % 40},{1000 + j}" for u in range(60) for j in range(8)]
    path.write_text("u,i,t\n" + "\n".join(rows) + "\n")
    w = str(tmp_path / "w")
    proc = recfunnel("run", "--workdir", w, "--set", "data.source=csv", "--set", f"data.path={path}",
                     "--set", "data.tabular.columns={user_id: u, item_id: i, timestamp: t}",
                     "--set", "promotion.metric=ranker.auc")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "`promotion.metric` 'ranker.auc' is written by a stage that needs labels, and the data have none" in (
        proc.stderr)
    assert not os.path.exists(os.path.join(w, "export"))


def test_lock_blocks_a_second_run(tmp_path):
    from pipeline.orchestration import WorkdirLock

    w = str(tmp_path / "w")
    os.makedirs(w)
    with WorkdirLock(w):
        proc = recfunnel("run", "--config", TINY, "--workdir", w)
    assert proc.returncode == 4 and "another recfunnel run holds" in proc.stderr


def test_training_data_that_no_longer_matches_its_read_report_is_named(tmp_path):
    """A resumable run declares the batches its read report counts; a data directory changed after it was written
    fails with a message naming it, not with tf.data's cardinality error."""
    from models import data_layout as layout
    from pipeline.config import load_config
    from pipeline.job import DATA_DIR, stage_data, stage_stats, stage_train

    config, workdir = load_config(TINY, []), str(tmp_path / "w")
    stage_data(config, workdir)
    stage_stats(config, workdir)
    data_dir = os.path.join(workdir, DATA_DIR)
    report = layout.read_report(data_dir)
    counts = report["positive_rows" if report["positives"] == "label" else "rows"]
    counts["train"] += 10 * config.retrieval.batch_size  # the report now promises ten batches the shards lack
    with open(os.path.join(data_dir, layout.READ_REPORT_FILE), "w") as f:
        json.dump(report, f)
    with pytest.raises(ValueError, match=r"The training examples of .*data do not hold the rows its "
                                         r"read_report\.json counts: \d+ batches of 128 expected, \d+ read\. "
                                         r"The directory changed after it was written"):
        stage_train(config, workdir, checkpoint_dir=str(tmp_path / "checkpoints"))
