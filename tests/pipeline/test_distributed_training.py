"""Retrieval training under tf.distribute, through the scheduled job.

* ``multi_worker``: two `recfunnel run` processes on loopback, one per TF_CONFIG task,
  train one model synchronously (a MultiWorkerMirroredStrategy over 2 workers), with
  the cross-batch memory bank enabled. Synchronous training means both workers end
  with the same weights, so their evaluation metrics must be equal to the digit; and
  the model must be about as good as a one-replica run of the same config (within
  0.1 Recall@10 on this tiny dataset, whose seed-to-seed spread is a few hundredths).
* ``mirrored``: one process split into 2 logical CPU devices.

The quality comparison against one replica over several seeds is
`benchmarks/distributed_training.py`; these tests check the mechanics.
"""

import filecmp
import glob
import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import REPO, python_subprocess, recfunnel

TINY = os.path.join(REPO, "pipeline", "configs", "tiny.yaml")
CBNS = ("--set", "retrieval.negatives=cbns", "--set", "retrieval.memory_size=256",
        "--set", "retrieval.warmup_steps=2", "--set", "retrieval.normalize=false",
        "--set", "retrieval.temperature=1.0")
pytestmark = pytest.mark.slow


def _free_ports(n):
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _metrics(workdir):
    with open(os.path.join(workdir, "reports", "latest", "metrics.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def one_replica(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("one_replica"))
    proc = recfunnel("run", "--config", TINY, "--workdir", workdir, *CBNS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = _metrics(workdir)
    assert m["retrieval_training"]["replicas"] == 1
    return m


def test_two_worker_processes_train_one_model(tmp_path, one_replica):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs, logs = [], [tmp_path / f"worker{index}.log" for index in range(2)]
    try:
        for index in range(2):
            env = dict(os.environ,
                       TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
            with open(logs[index], "w") as log:  # files, not pipes: a full pipe would stall a worker
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "pipeline.cli", "run", "--config", TINY, "--workdir",
                     str(tmp_path / f"w{index}"), "--set", "retrieval.distribution=multi_worker", *CBNS],
                    cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
        for p in procs:
            p.wait(timeout=900)
    finally:
        for p in procs:  # a worker left waiting for its peer after a failure or a timeout
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log.read_text()[-3000:]
    m0, m1 = _metrics(str(tmp_path / "w0")), _metrics(str(tmp_path / "w1"))
    assert m0["retrieval_training"]["replicas"] == m1["retrieval_training"]["replicas"] == 2
    # Both workers trained the same model: the same losses, byte-identical exports and
    # the same exact-search metrics.
    assert m0["retrieval_training"]["loss"] == m1["retrieval_training"]["loss"]
    # Logged values are global, not summed over the workers: the bank's share is a share.
    shares = m0["retrieval_training"]["bank_share"]
    assert shares == m1["retrieval_training"]["bank_share"] and all(0 < s <= 1 for s in shares)
    for tower in ("query_tower", "item_tower"):
        files = [sorted(glob.glob(str(tmp_path / w / "export" / tower / "*" / "variables" / "variables.data*")))
                 for w in ("w0", "w1")]
        assert files[0] and len(files[0]) == len(files[1])
        assert all(filecmp.cmp(a, b, shallow=False) for a, b in zip(*files))
    keys = [k for k in m0 if k.startswith("retrieval.")]
    assert "retrieval.recall@10" in keys
    assert {k: m0[k] for k in keys} == {k: m1[k] for k in keys}
    # ScaNN's partitioning is not reproducible from one build to the next (even in one
    # process), so each worker's index is only as good as the other's.
    for m in (m0, m1):
        assert m["index.recall_vs_exact@10"] >= 0.9
    assert abs(m0["retrieval.recall@10"] - one_replica["retrieval.recall@10"]) < 0.1


def test_mirrored_on_two_logical_cpus(tmp_path, one_replica):
    workdir = str(tmp_path / "w")
    code = f"""
import json, sys
import models.tf_compat
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from pipeline.cli import main
sys.exit(main(["run", "--config", {TINY!r}, "--workdir", {workdir!r},
               "--set", "retrieval.distribution=mirrored", *{list(CBNS)!r}]))
"""
    proc = python_subprocess(code, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = _metrics(workdir)
    assert m["retrieval_training"]["replicas"] == 2
    assert abs(m["retrieval.recall@10"] - one_replica["retrieval.recall@10"]) < 0.1
