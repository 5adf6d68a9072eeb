"""The statistics job on Beam's DaskRunner against a real `dask.distributed` cluster.

The cluster (a scheduler and two worker processes, one thread each) listens on the
loopback interface only and lives for this module. Each test runs `run_statistics` on
Dask and on the DirectRunner over the same dataset and compares every output file
(dead letters as a sorted set of lines: their order is the runner's; the summary
without its run-specific fields).
"""

import importlib.util
import os

import pytest

distributed = pytest.importorskip(
    "distributed", reason="dask.distributed is not installed: pip install -e '.[dask]' (apache-beam[dask])")

from beam_jobs.options import DASK_RUNNER  # noqa: E402
from beam_jobs.stats_job import run_statistics  # noqa: E402

pytestmark = pytest.mark.slow


def _stats_job_tests():
    """`tests/beam_jobs/test_stats_job.py` (its dataset writer and output reader)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_stats_job.py")
    spec = importlib.util.spec_from_file_location("stats_job_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STATS_JOB_TESTS = _stats_job_tests()


@pytest.fixture(scope="module")
def dask_address():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                       dashboard_address=None)
    try:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        yield cluster.scheduler_address
    finally:
        cluster.close()


def _listing(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, names in os.walk(root)
                  for n in names + dirs)


def _run_both(data_dir, tmp_path, address, extra_args=(), **kwargs):
    direct_out, dask_out = str(tmp_path / "direct"), str(tmp_path / "dask")
    direct = run_statistics(data_dir, direct_out, **kwargs)
    args = [f"--runner={DASK_RUNNER}", f"--dask_client_address={address}", *extra_args]
    on_dask = run_statistics(data_dir, dask_out, pipeline_args=args, **kwargs)
    assert on_dask["runner"] == DASK_RUNNER and direct["runner"] == "DirectRunner"
    assert sorted(os.listdir(tmp_path)) == ["dask", "direct"]  # no temporary sibling left
    return direct_out, dask_out


@pytest.mark.parametrize("extra_args", [(), ("--dask_partition_size=1",)], ids=["default", "partition_size_1"])
def test_dask_matches_direct_runner_with_malformed_rows(dask_address, tmp_path, extra_args):
    # Two shards of row groups of 2 rows with 3 malformed interactions and a malformed
    # item row: every output kind (valid tables, dead letters, counts) is exercised.
    # With --dask_partition_size=1 each interaction shard is its own Dask partition, so
    # the two workers read them in parallel and partial counts cross a shuffle.
    data = STATS_JOB_TESTS.write_dataset(tmp_path / "data", STATS_JOB_TESTS.SHARDS)
    out = tmp_path / "out"
    out.mkdir()
    direct_out, dask_out = _run_both(data, out, dask_address, extra_args, max_rejected_fraction=0.3)
    assert _listing(dask_out) == _listing(direct_out)  # no temporary file or directory left behind
    assert STATS_JOB_TESTS.read_outputs(dask_out) == STATS_JOB_TESTS.read_outputs(direct_out)
    with open(os.path.join(dask_out, "item_frequencies.csv")) as f:
        assert f.read() == "item_id,count,probability\na,5,0.625\nc,2,0.25\nb,1,0.125\n"
    with open(os.path.join(dask_out, "dead_letter.jsonl")) as f:
        assert len(f.read().splitlines()) == 4  # 3 interactions + 1 item row


def test_dask_matches_direct_runner_on_the_materialized_synthetic_dataset(dask_address, tiny_data_dir, tmp_path):
    direct_out, dask_out = _run_both(tiny_data_dir, tmp_path, dask_address)
    assert _listing(dask_out) == _listing(direct_out)
    outputs = STATS_JOB_TESTS.read_outputs(dask_out)
    assert outputs == STATS_JOB_TESTS.read_outputs(direct_out)
    assert outputs["summary.json"]["rows_read"] > 0 and outputs["dead_letter.jsonl"] == []
