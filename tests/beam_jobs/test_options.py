"""`validate_pipeline_args`: Beam flags checked before submission (no runner is started)."""

import pytest
from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

from beam_jobs.options import DASK_RUNNER, resolve_runner, runner_family, validate_pipeline_args
from beam_jobs.stats_job import run_statistics

DATAFLOW = ["--runner=DataflowRunner", "--project=proj", "--region=europe-west1", "--temp_location=gs://b/tmp"]
GCS_PATHS = {"data_dir": "gs://b/data", "output_dir": "gs://b/stats"}


@pytest.mark.parametrize("flags", [
    [],
    ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    ["--direct_num_workers", "2"],                     # space-separated value
    ["--runner=direct"],                               # Beam's short names resolve too
    ["--runner=FlinkRunner", "--flink_master=localhost:8081", "--environment_type=LOOPBACK"],
    ["--runner=SparkRunner", "--spark_master_url=spark://localhost:7077"],
    [f"--runner={DASK_RUNNER}", "--dask_client_address=127.0.0.1:8786", "--dask_partition_size=1"],
    [f"--runner={DASK_RUNNER}", "--dask_scheduler_file=/tmp/scheduler.json"],
    ["--experiments=beam_fn_api", "--experiments=use_runner_v2"],  # repeatable flags
    ["--environment_options=docker_container_image=x", "--sdk_harness_container_image_overrides=a,b"],
    ["--job_name=dask-vs-direct"],                    # a value that mentions dask: not the Dask runner
])
def test_accepted_flags_parse_to_the_same_options_as_beam(flags):
    options = validate_pipeline_args(flags)
    assert options.get_all_options() == type(options)(flags).get_all_options()


def test_dataflow_with_every_requirement_is_accepted():
    options = validate_pipeline_args(DATAFLOW + ["--staging_location=gs://b/staging"], GCS_PATHS)
    assert options.view_as(StandardOptions).runner == "DataflowRunner"


def test_options_keep_their_values():
    options = validate_pipeline_args(["--direct_running_mode=multi_processing", "--direct_num_workers=3"])
    direct = options.view_as(DirectOptions)
    assert (direct.direct_running_mode, direct.direct_num_workers) == ("multi_processing", 3)


@pytest.mark.parametrize("flags, match", [
    # Beam itself would silently ignore all of these.
    (["--runer=DataflowRunner"], r"--runer=DataflowRunner \(did you mean --runner\?\)"),
    (["--temp_locaton", "gs://b/tmp"], r"--temp_locaton \(did you mean --temp_location\?\)"),
    (["--direct_num_workers=2", "--no_such_flag"], r"--no_such_flag"),
    (["--foo", "bar", "baz"], r"--foo, baz"),                      # bar is --foo's value; baz is stray
    # Malformed values: argparse would exit the process.
    (["--direct_running_mode=bogus"], r"--direct_running_mode: invalid choice: 'bogus'"),
    (["--direct_num_workers=two"], r"--direct_num_workers: invalid int value: 'two'"),
    # Runners.
    (["--runner=DaskRunner"], r"Unknown Beam runner: --runner=DaskRunner.*" + DASK_RUNNER.replace(".", r"\.")),
    (["--runner=DataflowRuner"], r"Unknown Beam runner.*Did you mean DataflowRunner\?"),
    (["--runner=no_such_module.Runner"], r"Cannot import the Beam runner --runner=no_such_module\.Runner"),
    (["--runner=apache_beam.runners.NoSuchRunner"], r"has no NoSuchRunner"),
    # Runner-specific requirements.
    (["--runner=DataflowRunner"], r"DataflowRunner needs --project, --region, --temp_location"),
    (["--runner=DataflowRunner", "--project=p", "--region=r"], r"DataflowRunner needs --temp_location\."),
    (DATAFLOW[:3] + ["--temp_location=/tmp/beam"], r"--temp_location on Cloud Storage.*Received: --temp_location=/tmp/beam"),
    (DATAFLOW + ["--staging_location=/tmp/s"], r"--staging_location on Cloud Storage"),
    (["--runner=FlinkRunner"], r"FlinkRunner needs --flink_master"),
    (["--runner=SparkRunner"], r"SparkRunner needs --spark_master_url"),
    ([f"--runner={DASK_RUNNER}"], r"DaskRunner needs --dask_client_address or --dask_scheduler_file"),
    # A runner's own flags with another runner: Beam would ignore them.
    (["--dask_client_address=127.0.0.1:8786"], r"--dask_client_address is an option of the DaskRunner only, "
                                               r"and the runner is DirectRunner"),
    (["--runner=FlinkRunner", "--flink_master=h:8081", "--spark_master_url=spark://h:7077"],
     r"--spark_master_url is an option of the SparkRunner only"),
])
def test_rejected_flags_name_the_problem(flags, match):
    with pytest.raises(ValueError, match=match):
        validate_pipeline_args(flags)


def test_dataflow_paths_must_be_on_cloud_storage():
    with pytest.raises(ValueError, match=r"`output_dir`, so it should be a gs:// path. Received: output_dir='/tmp/o'"):
        validate_pipeline_args(DATAFLOW, {"data_dir": "gs://b/data", "output_dir": "/tmp/o"})
    with pytest.raises(ValueError, match=r"`data_dir`"):
        validate_pipeline_args(DATAFLOW, {"data_dir": "/local/data", "output_dir": "gs://b/o"})
    # Paths are not constrained on the other runners.
    validate_pipeline_args(["--runner=DirectRunner"], {"data_dir": "/local/data", "output_dir": "/tmp/o"})


def test_a_single_string_is_a_type_error():
    with pytest.raises(TypeError, match="pipeline_args"):
        validate_pipeline_args("--runner=DirectRunner")


def test_resolve_runner_and_family():
    assert resolve_runner(None).endswith("direct_runner.DirectRunner")
    assert resolve_runner("dataflow") == resolve_runner("DataflowRunner")
    assert resolve_runner(DASK_RUNNER) == DASK_RUNNER
    assert [runner_family(resolve_runner(r)) for r in ("DirectRunner", "DataflowRunner", "FlinkRunner",
                                                       "SparkRunner", DASK_RUNNER, "PrismRunner")] == [
        "direct", "dataflow", "flink", "spark", "dask", "other"]


def test_run_statistics_validates_before_any_work(tmp_path):
    # The data directory does not even exist: the flag is rejected first, nothing is written.
    with pytest.raises(ValueError, match="--direct_num_workrs"):
        run_statistics(str(tmp_path / "missing"), str(tmp_path / "out"), pipeline_args=["--direct_num_workrs=2"])
    with pytest.raises(ValueError, match="DataflowRunner needs --project"):
        run_statistics(str(tmp_path / "missing"), str(tmp_path / "out"), pipeline_args=["--runner=DataflowRunner"])
    assert list(tmp_path.iterdir()) == []


def test_only_dask_flags_or_a_dask_runner_ask_for_dask():
    from beam_jobs.options import _wants_dask

    assert _wants_dask(["--dask_client_address=tcp://127.0.0.1:8786"])
    assert _wants_dask(["--runner", DASK_RUNNER]) and _wants_dask([f"--runner={DASK_RUNNER}"])
    assert not _wants_dask(["--job_name=dask-vs-direct", "--temp_location=gs://dask-team/tmp"])
