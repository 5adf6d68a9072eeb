"""`recfunnel serve` in a fresh process: binds loopback, answers, shuts down on SIGINT."""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

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


def test_serve_answers_over_http_and_stops_cleanly(ranked_workdir):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--workdir", ranked_workdir,
                             "--port", str(port), "--max-k", "20", "--poll-interval", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
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
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read()[-2000:]


def test_serve_usage_errors_exit_2(tmp_path, ranked_workdir):
    proc = recfunnel("serve", "--workdir", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "workdir not found" in proc.stderr
    proc = recfunnel("serve", "--workdir", ranked_workdir, "--retrieval-candidates", "10",
                     "--preranker-candidates", "20")
    assert proc.returncode == 2 and "`preranker_candidates` should not exceed `retrieval_candidates`" in proc.stderr
    proc = recfunnel("serve", "--workdir", ranked_workdir, "--follow", "sometimes")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = recfunnel("serve", "--workdir", ranked_workdir, "--max-concurrent", "-1")
    assert proc.returncode == 2 and "`max_concurrent` should be >= 0" in proc.stderr
    proc = recfunnel("serve", "--workdir", ranked_workdir, "--max-concurrent", "2")
    assert proc.returncode == 2 and "`max_concurrent` applies when batching is off (max_batch_size=1)" in proc.stderr
    proc = recfunnel("serve", "--workdir", ranked_workdir, "--max-batch-size", "0")
    assert proc.returncode == 2 and "`max_batch_size` should be a positive integer" in proc.stderr
    proc = recfunnel("serve", "--workdir", ranked_workdir, "--tf-threads", "-2")
    assert proc.returncode == 2 and "--tf-threads should be >= 0" in proc.stderr
