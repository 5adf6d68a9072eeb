"""End-to-end tests of `run_statistics` on a tiny materialized dataset."""

import json
import os
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_jobs import stats_math
from beam_jobs.stats_job import OutputNotReplaceable, TooManyRejectedRows, check_output_dir, run_statistics
from models import data_layout
from models.features import Feature, Schema
from pipeline.data.canonical import DataError

SCHEMA = Schema(
    user_features=(Feature("user_id", "categorical", "user"),
                   Feature("gender", "categorical", "user"),
                   Feature("history", "sequence", "user", max_length=4)),
    item_features=(Feature("item_id", "categorical", "item"),
                   Feature("brand", "categorical", "item"),
                   Feature("tags", "multi_categorical", "item", max_length=3),
                   Feature("price", "numeric", "item")),
    name="tiny")

ITEMS = pd.DataFrame({
    "item_id": ["a", "b", "c", "d", "e", None],   # the last row is malformed (null id)
    "brand": ["x", "y", "x", None, "z", "w"],
    "tags": [["p", "q"], [], ["p"], ["q"], ["r"], ["s"]],
    "price": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
})
USERS = pd.DataFrame({"user_id": ["u1", "u2", "u3", "u4"], "gender": ["f", "m", "f", None]})
# Two shards of interactions; rows marked # bad are malformed.
SHARDS = [
    [("u1", "a"), ("u2", "a"), ("u1", "c"), ("u3", "a"), (None, "b"),  # bad: record 4
     ("u2", "c")],
    [("u4", "a"), ("u1", "zz"),  # bad: record 1
     ("u3", "b"), ("u2", ""),    # bad: record 3
     ("u1", "a")],
]


def write_dataset(root, shards, items=ITEMS, users=USERS, schema=SCHEMA, row_group_size=2, test_shards=()):
    """Writes a materialized dataset following `models.data_layout`; returns its path.

    Small row groups make every shard span several batches, so record indices must
    be offset by the row group's first row. `test_shards` are written as the test split.
    """
    root = str(root)
    os.makedirs(os.path.join(root, data_layout.INTERACTIONS_DIR), exist_ok=True)
    schema.save(os.path.join(root, data_layout.SCHEMA_FILE))
    pq.write_table(pa.Table.from_pandas(items, preserve_index=False),
                   os.path.join(root, data_layout.ITEMS_FILE), row_group_size=row_group_size)
    pq.write_table(pa.Table.from_pandas(users, preserve_index=False),
                   os.path.join(root, data_layout.USERS_FILE), row_group_size=row_group_size)
    for split, split_shards in (("train", shards), ("test", test_shards)):
        for i, rows in enumerate(split_shards):
            table = pa.table({"user_id": pa.array([r[0] for r in rows], pa.string()),
                              "item_id": pa.array([r[1] for r in rows], pa.string()),
                              "timestamp": pa.array(np.arange(len(rows)), pa.int64())})
            name = data_layout.shard_name(split, i, len(split_shards), ".parquet")
            pq.write_table(table, os.path.join(root, data_layout.INTERACTIONS_DIR, name),
                           row_group_size=row_group_size)
    return root


def write_previous_output(out):
    """A stand-in for an earlier run's output: the job's own file names, its summary keys."""
    os.makedirs(os.path.join(out, "vocab"), exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"rows_read": 1, "rows_rejected": 0, "vocabulary_sizes": {}}, f)
    for name in ("item_frequencies.csv", os.path.join("vocab", "old_feature.txt")):
        with open(os.path.join(out, name), "w") as f:
            f.write("from an earlier run\n")


def read_outputs(out):
    """Every output file's text (dead letters sorted: their order is the runner's)."""
    files = {}
    for dirpath, _, names in os.walk(out):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path) as f:
                files[os.path.relpath(path, out)] = f.read()
    files["dead_letter.jsonl"] = sorted(files["dead_letter.jsonl"].splitlines())
    summary = json.loads(files.pop("summary.json"))
    for key in ("runtime_seconds", "runner", "pipeline_args", "output_dir"):
        summary.pop(key)
    files["summary.json"] = summary
    return files


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), SHARDS)


@pytest.fixture(scope="module")
def in_memory_run(dataset, tmp_path_factory):
    out = os.path.join(str(tmp_path_factory.mktemp("stats")), "out")
    write_previous_output(out)
    summary = run_statistics(dataset, out, max_rejected_fraction=0.3)
    return out, summary


def test_end_to_end_outputs(in_memory_run, dataset):
    out, summary = in_memory_run
    assert not os.path.exists(os.path.join(out, "vocab", "old_feature.txt"))  # a previous output: replaced
    assert sorted(os.listdir(os.path.dirname(out))) == ["out"]  # no temporary sibling left
    # Valid interactions: a = 3 (shard 0) + 2 (shard 1) = 5, c = 2, b = 1; total 8.
    with open(os.path.join(out, "item_frequencies.csv")) as f:
        assert f.read() == "item_id,count,probability\na,5,0.625\nc,2,0.25\nb,1,0.125\n"
    vocab = {}
    for name in sorted(os.listdir(os.path.join(out, "vocab"))):
        with open(os.path.join(out, "vocab", name)) as f:
            vocab[name] = f.read().splitlines()
    assert vocab == {
        "item_id.txt": ["a", "c", "b", "d", "e"],  # by frequency, then never-seen d, e
        "user_id.txt": ["u1", "u2", "u3", "u4"],
        "gender.txt": ["f", "m"],                  # f twice; u4's missing value dropped
        "brand.txt": ["x", "y", "z"],              # w belongs to the rejected item row
        "tags.txt": ["p", "q", "r"],
    }
    with open(os.path.join(out, "feature_mi.json")) as f:
        report = json.load(f)
    valid_items = ITEMS.iloc[:5]
    features, mi, nmi = stats_math.feature_mutual_information(
        {"brand": valid_items["brand"].tolist(), "tags": valid_items["tags"].tolist()})
    assert report["features"] == features == ["brand", "tags"] and report["num_items"] == 5
    np.testing.assert_allclose(report["mi"], mi, rtol=1e-12)
    np.testing.assert_allclose(report["normalized_mi"], nmi, rtol=1e-12)

    shard = os.path.join(dataset, "interactions", "train-0000{}-of-00002.parquet")
    with open(os.path.join(out, "dead_letter.jsonl")) as f:
        dead = sorted((json.loads(line) for line in f), key=lambda d: (d["file"], d["record"]))
    assert dead == [
        {"file": shard.format(0), "record": 4, "reason": "null_user_id", "user_id": None, "item_id": "b"},
        {"file": shard.format(1), "record": 1, "reason": "unknown_item_id", "user_id": "u1", "item_id": "zz"},
        {"file": shard.format(1), "record": 3, "reason": "empty_item_id", "user_id": "u2", "item_id": ""},
        {"file": os.path.join(dataset, "items.parquet"), "record": 5, "reason": "null_item_id",
         "item_id": None},
    ]
    with open(os.path.join(out, "summary.json")) as f:
        assert json.load(f) == summary
    assert summary["rows_read"] == 11 and summary["rows_rejected"] == 3
    assert summary["validated_rows"] == 11 and summary["rows_by_split"] == {"train": 11}
    assert summary["source"] == summary["data_dir"] == dataset  # no read report to name another source
    assert summary["positives"] == "all" and summary["positive_rows"] == 8  # no label column
    assert summary["rejected_by_reason"] == {"empty_item_id": 1, "null_user_id": 1, "unknown_item_id": 1}
    assert summary["rejected_fraction"] == 3 / 11
    assert summary["tables"] == {
        "items": {"rows_read": 6, "rows_rejected": 1, "rejected_by_reason": {"null_item_id": 1}},
        "users": {"rows_read": 4, "rows_rejected": 0, "rejected_by_reason": {}}}
    assert summary["vocabulary_sizes"] == {"brand": 3, "gender": 2, "item_id": 5, "tags": 3, "user_id": 4}
    assert summary["distinct_items_in_interactions"] == 3
    assert summary["runner"] == "DirectRunner" and summary["runtime_seconds"] > 0


def test_too_many_rejected_rows_fails_and_leaves_output_untouched(dataset, tmp_path):
    out = tmp_path / "out"
    write_previous_output(str(out))
    before = sorted(os.listdir(out))
    # 3 of 11 rows are malformed: 27% > the default 1%.
    with pytest.raises(TooManyRejectedRows, match="3 of 11 interaction rows") as info:
        run_statistics(dataset, str(out))
    assert info.value.rejected_by_reason == {"empty_item_id": 1, "null_user_id": 1, "unknown_item_id": 1}
    assert isinstance(info.value, DataError) and info.value.path == dataset  # bad input data: exit 3
    assert os.listdir(tmp_path) == ["out"]  # the temporary directory is gone
    assert sorted(os.listdir(out)) == before and (out / "item_frequencies.csv").read_text() == "from an earlier run\n"


def test_rejected_fraction_is_over_every_row_read_from_the_input(tmp_path):
    """Denominator: rows of every split plus the reader's rejections, not the training rows alone."""
    data = write_dataset(tmp_path / "data", SHARDS, test_shards=[[("u1", "b"), ("u2", "b"), ("u3", "c")],
                                                                 [("u4", "b"), ("u4", "c")]])
    upstream = {"rows_read": 18, "rejected_by_reason": {"bad rating": 2}, "examples": []}
    # 11 training rows (3 malformed) + 5 test rows + 2 rows the reader rejected = 18 read, 5 rejected.
    with pytest.raises(TooManyRejectedRows) as info:
        run_statistics(data, str(tmp_path / "out"), max_rejected_fraction=0.27, upstream_rejections=upstream,
                       source="/input/ratings.csv")
    assert (info.value.rows_read, info.value.rows_rejected) == (18, 5)
    message = str(info.value)
    assert message.startswith("/input/ratings.csv: 5 of 18 interaction rows") and str(tmp_path) not in message
    assert not os.path.exists(tmp_path / "out")
    summary = run_statistics(data, str(tmp_path / "out"), max_rejected_fraction=0.28, upstream_rejections=upstream,
                             source="/input/ratings.csv")
    assert summary["rows_read"] == 18 and summary["rows_rejected"] == 5 and summary["rejected_fraction"] == 5 / 18
    assert summary["rows_by_split"] == {"train": 11, "test": 5} and summary["validated_rows"] == 11
    assert summary["reader"] == {"rows_read": 18, "rows_rejected": 2, "table_rows_rejected": {}}
    assert summary["rejected_by_reason"] == {"empty_item_id": 1, "null_user_id": 1, "reader: bad rating": 2,
                                             "unknown_item_id": 1}
    assert summary["source"] == "/input/ratings.csv"


def test_rejected_user_and_item_rows_count_for_their_tables_not_the_interactions(tmp_path):
    data = write_dataset(tmp_path / "data", SHARDS, test_shards=[[("u1", "b"), ("u2", "b"), ("u3", "c")],
                                                                 [("u4", "b"), ("u4", "c")]])
    upstream = {"rows_read": 18, "rejected_by_reason": {"bad rating": 2, "missing user_id": 4, "bad price": 1},
                "rejected_by_table": {"interactions": {"bad rating": 2}, "users": {"missing user_id": 4},
                                      "items": {"bad price": 1}}, "examples": []}
    # The 5 rejected table rows would lift the fraction from 5/18 to 10/23 if they counted as interactions.
    summary = run_statistics(data, str(tmp_path / "out"), max_rejected_fraction=0.28, upstream_rejections=upstream)
    assert summary["rows_read"] == 18 and summary["rows_rejected"] == 5 and summary["rejected_fraction"] == 5 / 18
    assert summary["reader"] == {"rows_read": 18, "rows_rejected": 2,
                                 "table_rows_rejected": {"items": 1, "users": 4}}
    assert "reader: missing user_id" not in summary["rejected_by_reason"]
    # The tables' rows read are the input's: the rows written plus the ones the reader rejected.
    assert summary["tables"] == {
        "items": {"rejected_by_reason": {"null_item_id": 1, "reader: bad price": 1}, "rows_read": 7,
                  "rows_rejected": 2},
        "users": {"rejected_by_reason": {"reader: missing user_id": 4}, "rows_read": 8, "rows_rejected": 4}}


def test_every_reader_rejection_reaches_the_dead_letter_file(tmp_path):
    """The read report keeps 20 examples; the reader's rejections file in the dataset has them all."""
    data = write_dataset(tmp_path / "data", SHARDS)
    letters = [{"file": "/in/log.csv", "line": k + 2, "field": "timestamp", "reason": f"timestamp 'x{k}' is bad"}
               for k in range(25)]
    with open(os.path.join(data, "read_rejections.jsonl"), "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in letters)
    upstream = {"rows_read": 36, "rejected_by_reason": {"bad timestamp": 25}, "examples": letters[:20],
                "rejections_file": "read_rejections.jsonl"}
    # 11 training rows + 25 rejected by the reader = 36 read; 3 + 25 = 28 rejected.
    summary = run_statistics(data, str(tmp_path / "out"), max_rejected_fraction=0.8, upstream_rejections=upstream)
    assert (summary["rows_read"], summary["rows_rejected"]) == (36, 28)
    with open(tmp_path / "out" / "dead_letter.jsonl") as f:
        dead = [json.loads(line) for line in f]
    reader = [d for d in dead if d.get("stage") == "reader"]
    assert len(dead) == 4 + 25  # 3 interaction rows and 1 item row rejected by the job
    assert reader == [{"file": "/in/log.csv", "record": k + 2, "field": "timestamp",
                       "reason": f"timestamp 'x{k}' is bad", "stage": "reader"} for k in range(25)]
    assert sorted(os.listdir(tmp_path / "out")) == ["dead_letter.jsonl", "feature_mi.json", "item_frequencies.csv",
                                                    "summary.json", "vocab"]


def test_output_dot_is_the_current_directory(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "data", SHARDS)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)
    summary = run_statistics(data, ".", max_rejected_fraction=0.3)
    # The temporary directory was a sibling of `out`, not `out/..tmp-*`.
    assert summary["output_dir"] == str(out) and sorted(os.listdir(tmp_path)) == ["data", "out"]
    assert (out / "item_frequencies.csv").read_text().startswith("item_id,count,probability\na,5,")


def test_output_that_is_a_file_or_holds_other_files_is_refused_before_any_work(tmp_path):
    afile = tmp_path / "afile.txt"
    afile.write_text("mine\n")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine\n")
    mixed = tmp_path / "mixed"  # a previous output the user added a file to
    write_previous_output(str(mixed))
    (mixed / "notes.txt").write_text("mine\n")
    foreign_summary = tmp_path / "other"  # a summary.json the job did not write
    foreign_summary.mkdir()
    (foreign_summary / "summary.json").write_text('{"accuracy": 0.9}\n')
    cases = {afile: "is an existing file", notes: "no statistics summary.json",
             mixed: "besides the statistics it holds ['notes.txt']", foreign_summary: "no statistics summary.json"}
    before = sorted(os.listdir(tmp_path))
    for path, why in cases.items():
        with pytest.raises(OutputNotReplaceable, match=f"output_dir {re.escape(repr(str(path)))} .*{re.escape(why)}"):
            check_output_dir(str(path))
        # No dataset at all: the output is refused before the job looks at its input.
        with pytest.raises(OutputNotReplaceable, match="output_dir"):
            run_statistics(str(tmp_path / "no-such-data"), str(path))
        with pytest.raises(OutputNotReplaceable, match=f"--output {re.escape(repr(str(path)))}"):
            check_output_dir(str(path), name="--output")
    assert sorted(os.listdir(tmp_path)) == before and afile.read_text() == "mine\n"
    assert (notes / "notes.txt").read_text() == (mixed / "notes.txt").read_text() == "mine\n"
    # Allowed: nothing there, an empty directory, a previous statistics output.
    (tmp_path / "empty").mkdir()
    write_previous_output(str(tmp_path / "previous"))
    for allowed in ("absent", "empty", "previous"):
        check_output_dir(str(tmp_path / allowed))


def test_clean_dataset_has_empty_dead_letter_file_and_min_count(tmp_path):
    clean = [[("u1", "a"), ("u2", "b"), ("u1", "a")], [("u3", "c"), ("u4", "a")]]
    data = write_dataset(tmp_path / "data", clean, items=ITEMS.iloc[:5])
    out = str(tmp_path / "out")  # does not exist yet
    summary = run_statistics(data, out, min_count=2, max_rejected_fraction=0.0)
    assert summary["rows_read"] == 5 and summary["rows_rejected"] == 0
    assert (tmp_path / "out" / "dead_letter.jsonl").read_text() == ""
    assert (tmp_path / "out" / "vocab" / "brand.txt").read_text() == "x\n"  # y, z below min_count 2
    assert (tmp_path / "out" / "vocab" / "item_id.txt").read_text() == "a\nb\nc\nd\ne\n"  # ids never pruned


def test_multi_processing_runner_gives_identical_outputs(in_memory_run, dataset, tmp_path):
    # About 4 s on 2 cores (two SDK worker processes), so it stays in the default run.
    out, _ = in_memory_run
    other = str(tmp_path / "out")
    summary = run_statistics(dataset, other, max_rejected_fraction=0.3, pipeline_args=[
        "--direct_running_mode=multi_processing", "--direct_num_workers=2"])
    assert summary["pipeline_args"] == ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]
    assert read_outputs(other) == read_outputs(out)


def test_a_staged_copy_of_the_dataset_gives_the_same_statistics(in_memory_run, dataset, tmp_path):
    from beam_jobs.stats_job import stage_dataset, staging_dir

    out, _ = in_memory_run
    staged = str(tmp_path / "bucket" / "recfunnel-stats-x" / "data")
    stage_dataset(dataset, staged)
    copied = sorted(os.path.relpath(os.path.join(r, n), staged) for r, _, names in os.walk(staged) for n in names)
    assert copied == sorted(os.path.relpath(os.path.join(r, n), dataset) for r, _, names in os.walk(dataset)
                            for n in names)
    other = str(tmp_path / "out")
    run_statistics(staged, other, max_rejected_fraction=0.3)
    got, want = read_outputs(other), read_outputs(out)
    got["dead_letter.jsonl"] = [line.replace(staged, dataset) for line in got["dead_letter.jsonl"]]
    for summary in (got, want):
        del summary["summary.json"]  # names its data_dir and times the run
    assert got == want
    # Only Dataflow's workers need a copy, under its --temp_location.
    dataflow = ["--runner=DataflowRunner", "--project=p", "--region=r", "--temp_location=gs://b/tmp"]
    assert staging_dir(dataflow).startswith("gs://b/tmp/recfunnel-stats-")
    assert staging_dir([]) is None and staging_dir(["--runner=FlinkRunner", "--flink_master=h:8081"]) is None


def test_argument_and_layout_errors(tmp_path):
    with pytest.raises(ValueError, match="min_count"):
        run_statistics(str(tmp_path), str(tmp_path / "out"), min_count=0)
    with pytest.raises(ValueError, match="max_rejected_fraction"):
        run_statistics(str(tmp_path), str(tmp_path / "out"), max_rejected_fraction=1.5)
    with pytest.raises(TypeError, match="pipeline_args"):
        run_statistics(str(tmp_path), str(tmp_path / "out"), pipeline_args="--runner=DirectRunner")
    with pytest.raises(FileNotFoundError, match="schema.json"):
        run_statistics(str(tmp_path), str(tmp_path / "out"))
    SCHEMA.save(str(tmp_path / "schema.json"))
    with pytest.raises(FileNotFoundError, match="train interaction shards"):
        run_statistics(str(tmp_path), str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["schema.json"]


def test_statistics_of_the_materialized_synthetic_dataset(tiny_data_dir, tmp_path):
    """The job on the project's own materialized data: positives only, nothing rejected."""
    out = str(tmp_path / "out")
    summary = run_statistics(tiny_data_dir, out)
    train = pd.concat([pd.read_parquet(f) for f in data_layout.interaction_files(tiny_data_dir, "train")])
    test = pd.concat([pd.read_parquet(f) for f in data_layout.interaction_files(tiny_data_dir, "test")])
    assert summary["rows_read"] == len(train) + len(test) and summary["rows_rejected"] == 0
    assert summary["rows_by_split"] == {"train": len(train), "test": len(test)}
    assert summary["validated_rows"] == len(train)
    assert summary["source"].startswith("synthetic(")  # the source the read report records
    assert summary["positives"] == "label"
    positives = train[train["label"] > 0]
    assert summary["positive_rows"] == len(positives)
    frequencies = pd.read_csv(os.path.join(out, "item_frequencies.csv"), dtype={"item_id": str})
    expected = positives["item_id"].value_counts()
    assert dict(zip(frequencies["item_id"], frequencies["count"])) == expected.to_dict()
    np.testing.assert_allclose(frequencies["probability"], frequencies["count"] / len(positives), rtol=1e-15)
    items = pd.read_parquet(os.path.join(tiny_data_dir, "items.parquet"))
    with open(os.path.join(out, "vocab", "item_id.txt")) as f:
        item_vocab = f.read().splitlines()
    assert sorted(item_vocab) == sorted(items["item_id"]) and item_vocab[:len(frequencies)] == list(
        frequencies["item_id"])
    with open(os.path.join(out, "feature_mi.json")) as f:
        report = json.load(f)
    schema = Schema.load(os.path.join(tiny_data_dir, "schema.json"))
    assert report["features"] == schema.categorical_item_features()
    _, mi, _ = stats_math.feature_mutual_information(
        {f: [list(v) if isinstance(v, np.ndarray) else v for v in items[f]] for f in report["features"]},
        report["features"])
    np.testing.assert_allclose(report["mi"], mi, rtol=1e-12)


def test_the_direct_runner_does_not_try_to_download_prism(dataset, tmp_path, caplog):
    import logging

    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_jobs.stats_job import DirectRunnerWithoutPrism, pipeline_runner

    with caplog.at_level(logging.INFO):
        run_statistics(dataset, str(tmp_path / "out"), max_rejected_fraction=0.3)
    assert "Prism" not in caplog.text and "prism" not in caplog.text
    assert isinstance(pipeline_runner(PipelineOptions(["--runner=DirectRunner"])), DirectRunnerWithoutPrism)
    assert pipeline_runner(PipelineOptions(["--runner=PrismRunner"])) is None  # asked for: left to Beam
    assert pipeline_runner(PipelineOptions(["--runner=apache_beam.runners.dask.dask_runner.DaskRunner"])) is None
