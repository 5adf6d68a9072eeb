"""`recfunnel stats` end to end on BARS and MovieLens files with malformed lines."""

import csv
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, recfunnel


def _bars(tmp_path, bad_lines):
    d = tmp_path / "bars"
    d.mkdir()
    lines = [f"{u} {u % 7} {(u + 1) % 7} {(u + 3) % 7}" for u in range(40)]
    lines[5:5] = bad_lines
    (d / "train.txt").write_text("\n".join(lines) + "\n")
    (d / "test.txt").write_text("\n".join(f"{u} {(u + 5) % 7}" for u in range(40)) + "\n")
    return str(d)


def test_stats_writes_outputs_and_dead_letters(tmp_path):
    data = _bars(tmp_path, ["99 4 x7"])
    out = str(tmp_path / "out")
    proc = recfunnel("stats", "--dataset", "bars", "--data-dir", data, "--output", out,
                     "--max-rejected-fraction", "0.5", "--direct_num_workers=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "item_frequencies.csv")) as f:
        rows = list(csv.DictReader(f))
    # 40 users x 3 training items over 7 item ids; the malformed line is not counted.
    assert sum(int(r["count"]) for r in rows) == 120
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["reader"]["rows_rejected"] == 1
    # Rows read from the input: 40 x 3 training + 40 test interactions + the rejected line.
    assert summary["rows_read"] == 161 and summary["rows_by_split"] == {"train": 120, "test": 40}
    assert summary["rejected_fraction"] == 1 / 161 and summary["source"] == data
    assert summary["data_dir"] is None  # the materialized copy was temporary: no path that no longer exists
    assert any(k.startswith("reader:") for k in summary["rejected_by_reason"])
    with open(os.path.join(out, "dead_letter.jsonl")) as f:
        letters = [json.loads(line) for line in f if line.strip()]
    assert any(d["file"].endswith("train.txt") and d["record"] == 6 and "x7" in d["reason"] for d in letters)
    assert sorted(os.listdir(os.path.join(out, "vocab"))) == ["item_id.txt", "user_id.txt"]


def test_stats_fails_above_the_threshold_without_writing(tmp_path):
    data = _bars(tmp_path, ["99 4 x7", "98 y", "97 z"])
    out = str(tmp_path / "out")
    proc = recfunnel("stats", "--dataset", "bars", "--data-dir", data, "--output", out)
    assert proc.returncode == 3, proc.stderr[-3000:]  # bad input data
    # 3 rejected lines of 120 training + 40 test interactions + 3 rejected = 163 rows read: 1.84% > 1%.
    assert f"bad input data: {data}: 3 of 163 interaction rows" in proc.stderr
    assert "max_rejected_fraction" in proc.stderr and "Traceback" not in proc.stderr
    assert "recfunnel-stats-" not in proc.stderr  # names the input, not a temporary directory
    assert not os.path.exists(out)


def _movielens(tmp_path, bad_rows):
    """20 users x 20 movies = 400 ratings in MovieLens-100K files; `bad_rows` of them with rating 'five'."""
    d = tmp_path / "ml"
    d.mkdir()
    flags = "|".join(["0"] * 18 + ["1"])
    (d / "u.user").write_text("".join(f"{u}|30|M|other|12345\n" for u in range(1, 21)))
    (d / "u.item").write_text("".join(f"{i}|Movie {i} (1995)|01-Jan-1995||http://x|{flags}\n"
                                      for i in range(1, 21)), encoding="latin-1")
    lines = [f"{u}\t{i}\t{(u + i) % 5 + 1}\t{881250000 + 100 * i + u}" for u in range(1, 21) for i in range(1, 21)]
    for k in bad_rows:
        user, item, _, timestamp = lines[k].split("\t")
        lines[k] = f"{user}\t{item}\tfive\t{timestamp}"
    (d / "u.data").write_text("\n".join(lines) + "\n")
    return str(d)


def test_movielens_rejected_fraction_counts_every_row_read_and_replaces_a_previous_output(tmp_path):
    data = _movielens(tmp_path, [3, 50, 170, 333])
    out = tmp_path / "out"  # an earlier statistics output: replaced
    (out / "vocab").mkdir(parents=True)
    (out / "vocab" / "old_feature.txt").write_text("x\n")
    (out / "summary.json").write_text(json.dumps({"rows_rejected": 0, "vocabulary_sizes": {}}))
    # 4 of 400 rows = 1%, not above the default 1% (only the training rows would give 4 of ~300).
    proc = recfunnel("stats", "--dataset", "movielens", "--data-dir", data, "--output", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_read"] == 400 and summary["rows_rejected"] == 4 and summary["rejected_fraction"] == 0.01
    assert sum(summary["rows_by_split"].values()) == 396 and summary["reader"] == {
        "rows_read": 400, "rows_rejected": 4, "table_rows_rejected": {}}
    assert not (out / "vocab" / "old_feature.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["ml", "out"]  # no backup or temporary sibling left


def test_run_statistics_stage_counts_every_row_read(tmp_path):
    """`recfunnel run` with data.bad_rows=skip: the statistics stage counts the same way."""
    from beam_jobs.stats_job import TooManyRejectedRows
    from pipeline.config import load_config
    from pipeline.job import stage_data, stage_stats

    data = _movielens(tmp_path, [3, 50, 170, 333])
    overrides = ["data.source=movielens", f"data.path={data}", "data.bad_rows=skip"]
    workdir = str(tmp_path / "work")
    stage_data(load_config(None, overrides), workdir)
    summary = stage_stats(load_config(None, overrides), workdir)
    assert (summary["rows_read"], summary["rows_rejected"], summary["rejected_fraction"]) == (400, 4, 0.01)
    with pytest.raises(TooManyRejectedRows, match=r"u\.data: 4 of 400 interaction rows .*\(1% > "):
        stage_stats(load_config(None, overrides + ["stats.max_rejected_fraction=0.0099"]), workdir)


@pytest.mark.parametrize("kind", ["file", "directory"])
def test_output_that_is_a_file_or_another_directory_is_refused_before_reading(tmp_path, kind):
    target = tmp_path / ("afile.txt" if kind == "file" else "mine")
    if kind == "file":
        target.write_text("mine\n")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("mine\n")
    missing = str(tmp_path / "no-such-data")  # reading it would fail with exit 1
    proc = recfunnel("stats", "--dataset", "bars", "--data-dir", missing, "--output", str(target))
    assert proc.returncode == 2, proc.stderr[-3000:]
    why = "is an existing file" if kind == "file" else "is a non-empty directory that is not a previous statistics"
    assert f"recfunnel: --output '{target}' {why}" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(os.listdir(tmp_path)) == [target.name]  # no .old-* or .tmp-* sibling
    assert (target if kind == "file" else target / "notes.txt").read_text() == "mine\n"


def test_output_under_a_file_is_refused_before_reading(tmp_path):
    (tmp_path / "afile").write_text("mine\n")
    target = tmp_path / "afile" / "sub" / "out"
    missing = str(tmp_path / "no-such-data")  # reading it would fail with exit 1
    proc = recfunnel("stats", "--dataset", "bars", "--data-dir", missing, "--output", str(target))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"recfunnel: --output '{target}' cannot be created: '{tmp_path / 'afile'}' is a file, not a directory"
            in proc.stderr) and "Traceback" not in proc.stderr


@pytest.mark.parametrize("value", ["2", "-0.1", "nan"])
def test_max_rejected_fraction_out_of_range_is_refused_at_once(tmp_path, value):
    missing = str(tmp_path / "no-such-data")  # reading it would fail with exit 1
    proc = recfunnel("stats", "--dataset", "bars", "--data-dir", missing, "--output", str(tmp_path / "out"),
                     "--max-rejected-fraction", value)
    assert proc.returncode == 2
    assert f"--max-rejected-fraction should be in [0, 1]. Received: {float(value)}" in proc.stderr
    assert "Traceback" not in proc.stderr and os.listdir(tmp_path) == []


def test_misspelled_beam_option_is_refused_before_any_work(tmp_path):
    data = _bars(tmp_path, [])
    out = str(tmp_path / "out")
    proc = recfunnel("stats", "--dataset", "bars", "--data-dir", data, "--output", out,
                     "--runner=DirectRunner", "--direct_num_workrs=2")
    assert proc.returncode == 2
    assert "--direct_num_workrs=2" in proc.stderr and "did you mean --direct_num_workers" in proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(out)


def test_every_rejected_line_reaches_the_dead_letters_with_output_dot(tmp_path):
    """25 malformed lines (the read report keeps 20 examples), statistics written to `--output .`."""
    data = _bars(tmp_path, [f"{100 + k} 4 x{k}" for k in range(25)])  # lines 6..30 of train.txt
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "stats", "--dataset", "bars", "--data-dir", data,
                           "--output", ".", "--max-rejected-fraction", "0.5", "--direct_num_workers=1"],
                          capture_output=True, text=True, timeout=600, cwd=str(out),
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["bars", "out"]  # no temporary directory left, inside or beside
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reader"]["rows_rejected"] == 25 and summary["rows_read"] == 160 + 25
    with open(out / "dead_letter.jsonl") as f:
        reader = [d for d in map(json.loads, f) if d.get("stage") == "reader"]
    assert [(d["record"], d["field"]) for d in reader] == [(line, "item") for line in range(6, 31)]
    assert all(d["file"] == os.path.join(data, "train.txt") for d in reader)
