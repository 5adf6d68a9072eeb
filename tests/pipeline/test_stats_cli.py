"""`recfunnel stats` end to end on BARS-format files with a malformed line."""

import csv
import json
import os

from conftest import recfunnel


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
    assert any(k.startswith("reader:") for k in summary["rejected_by_reason"])
    with open(os.path.join(out, "dead_letter.jsonl")) as f:
        letters = [json.loads(line) for line in f if line.strip()]
    assert any(d["file"].endswith("train.txt") and d["record"] == 6 and "x7" in d["reason"] for d in letters)
    assert sorted(os.listdir(os.path.join(out, "vocab"))) == ["item_id.txt", "user_id.txt"]


def test_stats_fails_above_the_threshold_without_writing(tmp_path):
    data = _bars(tmp_path, ["99 4 x7", "98 y", "97 z"])
    out = str(tmp_path / "out")
    proc = recfunnel("stats", "--dataset", "bars", "--data-dir", data, "--output", out)
    assert proc.returncode == 1
    assert "max_rejected_fraction" in proc.stderr and "Traceback" not in proc.stderr
    assert not os.path.exists(out)


def test_misspelled_beam_option_is_refused_before_any_work(tmp_path):
    data = _bars(tmp_path, [])
    out = str(tmp_path / "out")
    proc = recfunnel("stats", "--dataset", "bars", "--data-dir", data, "--output", out,
                     "--runner=DirectRunner", "--direct_num_workrs=2")
    assert proc.returncode == 2
    assert "--direct_num_workrs=2" in proc.stderr and "did you mean --direct_num_workers" in proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(out)
