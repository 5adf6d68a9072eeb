"""`recfunnel serve` in a fresh process: binds loopback, answers, shuts down on SIGINT."""

import contextlib
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from conftest import REPO, recfunnel


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@contextlib.contextmanager
def _serving(workdir, *args, stop_timeout=30):
    """`recfunnel serve` on a free port in a fresh process: yields ``(process, port)``;
    then SIGINT, and the process must exit with 0."""
    port = _free_port()
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--workdir", workdir,
                                 "--port", str(port), "--poll-interval", "0", *args],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            yield proc, port
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.seek(0)
        assert proc.returncode == 0, log.read()[-2000:]


def test_serve_answers_over_http_and_stops_cleanly(ranked_workdir):
    with _serving(ranked_workdir, "--max-k", "20") as (proc, port):
        base = f"http://127.0.0.1:{port}"
        deadline, ready = time.time() + 120, None
        while time.time() < deadline and proc.poll() is None:
            try:
                ready = _get(base + "/readyz")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        assert ready == (200, {"status": "ready", "version": 1, "stages": ["retrieval", "preranker", "ranker"]})
        status, out = _get(base + "/v1/recommend", {"user_id": "u1", "k": 3})
        assert status == 200 and len(out["items"]) == 3 and out["stages"][-1] == "ranker"
        status, out = _get(base + "/v1/recommend", {"user_id": "u1", "k": 21})
        assert status == 422 and "less than or equal to 20" in out["detail"]
        status, out = _get(base + "/v1/retrieve", {"user_id": "nobody"})
        assert status == 404 and "unknown user id 'nobody'" in out["detail"]
        # loopback only by default
        with socket.socket() as s:
            s.settimeout(2)
            other = socket.gethostbyname(socket.gethostname())
            if not other.startswith("127."):
                assert s.connect_ex((other, port)) != 0


def test_serve_usage_errors_exit_2(tmp_path, ranked_workdir):
    (tmp_path / "afile").write_text("")
    proc = recfunnel("serve", "--workdir", str(tmp_path / "afile"))
    assert proc.returncode == 2 and "is a file, not a directory" in proc.stderr
    proc = recfunnel("serve", "--workdir", ranked_workdir, "--retrieval-candidates", "10",
                     "--preranker-candidates", "20")
    assert proc.returncode == 2 and ("`--preranker-candidates` should not exceed `--retrieval-candidates`. "
                                     "Received: --preranker-candidates=20, --retrieval-candidates=10") in proc.stderr
    for value in ("nan", "inf", "1e12", "-1"):
        proc = recfunnel("serve", "--workdir", ranked_workdir, "--poll-interval", value)
        assert proc.returncode == 2 and "`--poll-interval` should be in [0, 86400.0] seconds" in proc.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = recfunnel("serve", "--workdir", ranked_workdir, "--port", str(port))
    assert proc.returncode == 2 and f"cannot listen on 127.0.0.1:{port}: Address already in use" in proc.stderr
    assert "Traceback" not in proc.stderr and "loaded" not in proc.stderr  # refused before loading a model
    proc = recfunnel("serve", "--workdir", ranked_workdir, "--follow", "sometimes")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = recfunnel("serve", "--workdir", ranked_workdir, "--max-concurrent", "-1")
    assert proc.returncode == 2 and "`--max-concurrent` should be >= 0" in proc.stderr
    proc = recfunnel("serve", "--workdir", ranked_workdir, "--max-concurrent", "2")
    assert proc.returncode == 2
    assert "`--max-concurrent` applies when batching is off (--max-batch-size=1)" in proc.stderr
    proc = recfunnel("serve", "--workdir", ranked_workdir, "--max-batch-size", "0")
    assert proc.returncode == 2 and "`--max-batch-size` should be a positive integer" in proc.stderr
    proc = recfunnel("serve", "--workdir", ranked_workdir, "--tf-threads", "-2")
    assert proc.returncode == 2 and "--tf-threads should be >= 0" in proc.stderr
    proc = recfunnel("serve", "--workdir", ranked_workdir, "--processes", "0")
    assert proc.returncode == 2 and "--processes should be >= 1" in proc.stderr


def test_service_config_round_trips_through_json():
    from serving.cascade import CascadeConfig
    from serving.service import ServiceConfig, config_from_json, config_to_json

    config = ServiceConfig(workdir="/w", version=3, follow="latest", poll_interval=0.5, max_k=20,
                           cascade=CascadeConfig(retrieval_candidates=500, preranker_candidates=50, use_ranker=False),
                           max_batch_size=4, batch_workers=1, batch_wait_ms=2.5)
    assert config_from_json(config_to_json(config)) == config


@pytest.mark.slow
def test_serve_with_two_processes_answers_from_both(ranked_workdir):
    # Two worker processes share the port: every answer is the same whichever process
    # gives it, both processes answer, and SIGINT stops them all.
    with _serving(ranked_workdir, "--processes", "2", stop_timeout=60) as (proc, port):
        base = f"http://127.0.0.1:{port}"
        deadline, pids, answers = time.time() + 180, set(), set()
        while time.time() < deadline and proc.poll() is None and len(pids) < 2:
            try:
                status, models = _get(base + "/v1/models")
                if status != 200 or not models["ready"]:
                    time.sleep(0.2)
                    continue
                pids.add(models["process"])
                status, out = _get(base + "/v1/recommend", {"user_id": "u1", "k": 5})
                assert status == 200
                answers.add(tuple((item["item_id"], round(item["score"], 5)) for item in out["items"]))
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        assert len(pids) == 2, f"one process answered: {pids}"
        assert len(answers) == 1
