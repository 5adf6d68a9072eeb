"""End to end: `recfunnel run` on the tiny config, then `recfunnel query`, in fresh processes."""

import csv
import json
import os

import pytest
from conftest import REPO, python_subprocess, recfunnel

TINY = os.path.join(REPO, "pipeline", "configs", "tiny.yaml")


OVERRIDES = ("preranker.enabled=true", "retrieval.ssl_weight=0.3", "preranker.search_epochs=2",
             "preranker.retrain_epochs=2", "retrieval.learning_rate_schedule=cosine", "preranker.candidates=300")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    w = str(tmp_path_factory.mktemp("run") / "w")
    proc = recfunnel("run", "--config", TINY, "--workdir", w, *[a for o in OVERRIDES for a in ("--set", o)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # tiny.yaml trains with Adam: the self-supervised task on corpus items is flagged
    assert "self-supervised task on corpus items with Adam" in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["workdir"] == os.path.abspath(w)
    return w


def test_help():
    proc = recfunnel("--help")
    assert proc.returncode == 0 and "run" in proc.stdout and "query" in proc.stdout


def test_run_help_names_every_stage():
    from pipeline.job import STAGES

    proc = recfunnel("run", "--help")
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0 and f"({', '.join(STAGES)})" in text


def test_run_writes_the_public_contract(workdir):
    with open(os.path.join(workdir, "stats", "item_frequencies.csv")) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["item_id", "count", "probability"]
    total = sum(int(r["count"]) for r in rows)
    assert all(abs(float(r["probability"]) - int(r["count"]) / total) < 1e-9 for r in rows)
    for model in ("query_tower", "item_tower", "index"):
        assert os.listdir(os.path.join(workdir, "export", model)) == ["1"]
    with open(os.path.join(workdir, "reports", "latest", "metrics.json")) as f:
        metrics = json.load(f)
    for key in ("retrieval.recall@10", "retrieval.ndcg@10", "baseline.popularity.recall@10",
                "index.recall_vs_exact@10"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["index_build"]["kind"] == "scann"
    for key in ("retrieval.tail.recall@10", "retrieval.tail.ndcg@10"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["evaluation"]["tail_users"] > 0
    # the self-supervised task ran alongside the main loss, and both are logged
    training = metrics["retrieval_training"]
    assert len(training["ssl_loss"]) == len(training["loss"]) > 0
    assert all(x > 0 for x in training["ssl_loss"])
    # the cosine schedule: tiny.yaml's 2 epochs at Adam 0.01 and 0.01 * learning_rate_decay 0.1
    assert training["learning_rate"] == pytest.approx([0.01, 0.001])
    # the ranker stage: trained on the labelled clicks, measured on the test split, exported with the towers
    assert os.listdir(os.path.join(workdir, "export", "ranker")) == ["1"]
    assert metrics["ranker"]["model"] == "can"
    for key in ("ranker.auc", "ranker.gauc", "ranker.ece"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["ranker.log_loss"] > 0 and metrics["ranker.latency_ms_median"] > 0
    assert os.path.exists(os.path.join(workdir, "reports", "latest", "ranker_calibration.png"))
    # the pre-ranker stage: AutoFAS distilled from that ranker, exported with it
    assert os.listdir(os.path.join(workdir, "export", "preranker")) == ["1"]
    assert metrics["preranker"]["features"] and 0.0 <= metrics["preranker.auc"] <= 1.0
    assert metrics["preranker.latency_ms_median"] > 0 and metrics["preranker.expected_latency_ms"] > 0
    # each timed for the candidates it scores when serving, as the pre-ranker's latency model is
    assert metrics["preranker"]["latency"]["candidates"] == 300 and metrics["ranker"]["latency"]["candidates"] == 1000
    page = open(os.path.join(workdir, "reports", "latest", "index.html")).read()
    assert 'src="preranker_tradeoff.png"' in page
    # the latency table it searched against, written for reuse (`preranker.latency_table`)
    from models.features import Schema
    from models.preranking.latency import LatencyTable

    used = metrics["preranker"]["latency_table"]
    assert used["source"] == "measured"
    schema = Schema.load(os.path.join(workdir, "data", "schema.json"))
    LatencyTable.load(used["path"]).check_covers([f.name for f in schema.features], (16, 32, 64, 128), 300)
    # the version's own copy of the tables it serves with; no version turned down
    copy = os.path.join(workdir, "export", "serving_data", "1")
    assert sorted(os.listdir(copy)) == sorted(["schema.json", "users.parquet", "user_history.parquet", "items.parquet"])
    for name in os.listdir(copy):
        with open(os.path.join(copy, name), "rb") as a, open(os.path.join(workdir, "data", name), "rb") as b:
            assert a.read() == b.read(), name
    with open(os.path.join(workdir, "export", "rejected.json")) as f:
        assert json.load(f) == {}


def test_in_memory_evaluation_gives_the_reported_metrics(workdir):
    """`ExactEvaluator` on the trained towers (restored from the run's checkpoint) gives the
    exact figures the run reported through its exported towers."""
    import glob

    from pipeline import job
    from pipeline.config import load_config
    from pipeline.evaluation import ExactEvaluator

    config = load_config(TINY, OVERRIDES)
    [ckpt] = glob.glob(os.path.join(workdir, "checkpoints", "retrieval", "*"))
    model = job.restore_retrieval_model(config, workdir, ckpt)
    got = ExactEvaluator(os.path.join(workdir, job.DATA_DIR), config.evaluation)(model.query_tower, model.item_tower)
    with open(os.path.join(workdir, "reports", "latest", "metrics.json")) as f:
        reported = json.load(f)
    assert sorted(got) == sorted(f"{m}@{k}" for k in config.evaluation.ks for m in ("recall", "ndcg"))
    for name, value in got.items():
        assert value == pytest.approx(reported[f"retrieval.{name}"], abs=1e-6), name


def test_query_prints_k_distinct_unseen_items(workdir):
    import pyarrow.parquet as pq

    hist = pq.read_table(os.path.join(workdir, "data", "user_history.parquet")).to_pydict()
    user, seen = next((u, s) for u, s in zip(hist["user_id"], hist["seen"]) if s)
    proc = recfunnel("query", "--workdir", workdir, "--user-id", user, "-k", "7")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["user_id"] == user
    ids = [i["item_id"] for i in out["items"]]
    assert len(ids) == 7 == len(set(ids))
    assert not set(ids) & set(seen)
    scores = [i["score"] for i in out["items"]]
    assert scores == sorted(scores, reverse=True)
    assert out["stages"] == ["retrieval", "preranker", "ranker"]
    assert all(0.0 <= v <= 1.0 for v in scores)  # click probabilities of the ranker
    with_seen = json.loads(recfunnel("query", "--workdir", workdir, "--user-id", user, "-k", "50",
                                     "--include-seen").stdout)
    assert len(with_seen["items"]) == 50


def test_query_errors_are_clear(workdir):
    proc = recfunnel("query", "--workdir", workdir, "--user-id", "nobody")
    assert proc.returncode == 2
    assert "unknown user id 'nobody'" in proc.stderr and "Traceback" not in proc.stderr
    cold = recfunnel("query", "--workdir", workdir, "--user-id", "nobody", "--cold-start", "-k", "3")
    assert cold.returncode == 0 and len(json.loads(cold.stdout)["items"]) == 3
    proc = recfunnel("query", "--workdir", workdir, "--user-id", "u1", "-k", "0")
    assert proc.returncode == 2 and "-k should be a positive integer" in proc.stderr
    proc = recfunnel("query", "--workdir", workdir + "-missing", "--user-id", "u1")
    assert proc.returncode == 2 and "workdir not found" in proc.stderr
    proc = recfunnel("query", "--workdir", workdir, "--user-id", "u1", "--version", "9")
    assert proc.returncode == 2 and "export query_tower version 9 is missing" in proc.stderr
    proc = recfunnel("serve", "--workdir", workdir, "--version", "9")
    assert proc.returncode == 2 and "--version 9 is not a complete export" in proc.stderr
    proc = recfunnel("query", "--workdir", workdir, "--user-id", "", "--cold-start")
    assert proc.returncode == 2 and "--user-id should be a non-empty id. Received: ''" in proc.stderr


def test_query_on_a_damaged_export_names_what_is_missing(workdir, tmp_path):
    import shutil

    w = str(tmp_path / "w")
    shutil.copytree(workdir, w)
    ranker = os.path.join(w, "export", "ranker", "1")
    for name in os.listdir(ranker):
        path = os.path.join(ranker, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    proc = recfunnel("query", "--workdir", w, "--user-id", "u1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"cannot load the export of {w}: " in proc.stderr and "SavedModel file does not exist" in proc.stderr
    os.rename(os.path.join(w, "export", "ranker"), os.path.join(w, "export", "ranker-away"))
    users = os.path.join(w, "export", "serving_data", "1", "users.parquet")
    os.remove(users)
    proc = recfunnel("query", "--workdir", w, "--user-id", "u1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"cannot load the export of {w}: file not found: {users}" in proc.stderr


def test_a_reader_that_closes_the_output_early_is_not_an_error(workdir):
    import subprocess
    import sys

    # As `recfunnel query ... | head -1`, with the pipe closed before anything is written.
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "query", "--workdir", workdir, "--user-id", "u1",
                             "-k", "3"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0 and "Traceback" not in err and "BrokenPipe" not in err


def test_only_stage_needs_the_earlier_stages_and_ends_where_later_ones_never_ran(tmp_path):
    w = str(tmp_path / "fresh")
    proc = recfunnel("run", "--config", TINY, "--workdir", w, "--only-stage", "index")
    assert proc.returncode == 2 and "--only-stage index needs the earlier stages' outputs" in proc.stderr
    assert not os.path.exists(w)
    proc = recfunnel("run", "--config", TINY, "--workdir", w, "--only-stage", "data")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["version"] is None and out["promoted"] is None
    assert sorted(f for f in os.listdir(os.path.join(w, "state")) if f.endswith(".json")) == ["data.json"]
    proc = recfunnel("run", "--config", TINY, "--workdir", w, "--only-stage", "retrieval")
    assert proc.returncode == 2 and "needs the output of stage 'statistics'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_config_is_rejected_before_any_work(tmp_path):
    w = str(tmp_path / "w")
    proc = recfunnel("run", "--workdir", w, "--set", "retrieval.epochs=zero")
    assert proc.returncode == 2
    assert "`retrieval.epochs` should be an integer" in proc.stderr
    assert not os.path.exists(w)
    proc = recfunnel("run", "--workdir", w, "--set", 'stats.pipeline_args=["--temp_locaton=x"]')
    assert proc.returncode == 2 and "`stats.pipeline_args`" in proc.stderr and "--temp_locaton" in proc.stderr
    assert "did you mean --temp_location" in proc.stderr and not os.path.exists(w)
    proc = recfunnel("run", "--workdir", w, "--set", "retrieval.distribution=multi_worker",
                     env={**os.environ, "TF_CONFIG": ""})
    assert proc.returncode == 2 and "`retrieval.distribution=multi_worker`: " in proc.stderr
    assert "needs the TF_CONFIG environment variable" in proc.stderr and not os.path.exists(w)
    proc = recfunnel("config", "--set", "stats.pipeline_args=[--runner=Bogus]")
    assert proc.returncode == 2 and "Unknown Beam runner: --runner=Bogus" in proc.stderr
    (tmp_path / "afile").write_text("")
    for workdir, message in ((tmp_path / "afile", "is a file, not a directory"),
                             (tmp_path / "afile" / "sub", "cannot create workdir")):
        proc = recfunnel("run", "--workdir", str(workdir))
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_saved_models_load_in_a_fresh_process(workdir):
    code = f"""
import json
import numpy as np
from models.tf_compat import tf
from serving.user_store import UserStore
store = UserStore({os.path.join(workdir, 'data')!r})
q = tf.saved_model.load({os.path.join(workdir, 'export', 'query_tower', '1')!r}).signatures["serving_default"]
i = tf.saved_model.load({os.path.join(workdir, 'export', 'item_tower', '1')!r})
feats = store.features(store.user_ids()[:3])
emb = q(**{{k: tf.constant(v) for k, v in feats.items()}})["embedding"].numpy()
logq = i.signatures["log_q"](item_id=tf.constant(["i0", "nope"]))["log_q"].numpy()
print(json.dumps({{"q_inputs": sorted(q.structured_input_signature[1]), "shape": list(emb.shape),
                  "i_inputs": sorted(i.signatures["serving_default"].structured_input_signature[1]),
                  "logq": logq.tolist()}}))
"""
    proc = python_subprocess(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["q_inputs"] == sorted(["user_id", "age", "gender", "region", "history"])
    assert out["i_inputs"] == sorted(["item_id", "category", "subcategory", "brand", "price_bucket", "color", "tags"])
    assert out["shape"] == [3, 16]
    assert all(v < 0 for v in out["logq"])


def test_a_run_searches_against_a_given_latency_table(workdir, tmp_path):
    """`preranker.latency_table`: the stage runs again (the fingerprint holds the table), measures nothing and
    searches against the given costs; the table it writes is a copy of them."""
    import shutil

    from pipeline.orchestration import StageState

    w = str(tmp_path / "w")
    shutil.copytree(workdir, w)
    with open(os.path.join(w, "reports", "latest", "metrics.json")) as f:
        measured = json.load(f)["preranker"]["latency_table"]["path"].replace(workdir, w)
    given = str(tmp_path / "serving_cpu_table.json")
    with open(measured) as f:
        table = json.load(f)
    table["feature_costs"] = {name: 0.5 for name in table["feature_costs"]}  # as if measured on another machine
    with open(given, "w") as f:
        json.dump(table, f)
    overrides = [*OVERRIDES, f"preranker.latency_table={given}"]
    proc = recfunnel("run", "--config", TINY, "--workdir", w, "--only-stage", "preranker",
                     *[a for o in overrides for a in ("--set", o)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "latency of every feature and layer shape measured" not in proc.stderr
    assert f"a copy of {given}" in proc.stderr
    pre = StageState(w).load("preranker")["summary"]  # the run stops before the stale export: no report
    assert pre["latency_table"]["source"] == given
    with open(pre["latency_table"]["path"]) as f:
        assert json.load(f) == table
    assert pre["search"]["feature_costs_ms"] == table["feature_costs"]
    assert pre["search"]["seconds"]["latency_measurement"] == 0.0
