import os

import pytest

from conftest import SHARED_DATA
from models.features import HISTORY, ITEM_ID, LABEL, OOV_TOKEN, TIMESTAMP, USER_ID, Kind
from models.ranking.models import inputs_from_frame
from pipeline.data.canonical import DataError
from pipeline.data.ctr_samples import (ALIMAMA_SEQUENCE_LENGTH, ALIMAMA_SEQUENCES, ALIMAMA_TAIL, AVAZU_COLUMNS,
                                       CRITEO_CATEGORICAL, CRITEO_NUMERIC, MOVIELENS_COLUMNS, SAMPLE_FILES,
                                       read_alimama, read_avazu, read_criteo, read_ctr_sample,
                                       read_movielens_sample)

SAMPLES = os.path.join(SHARED_DATA, "ctr-samples")
needs_data = pytest.mark.skipif(not os.path.isdir(SAMPLES), reason="shared CTR samples not present")


def _check_frame(schema, frame, rows):
    assert len(frame) == rows
    assert [c for c in frame.columns if c not in (LABEL, TIMESTAMP, "rating")] == [f.name for f in schema.features]
    assert set(frame[LABEL].unique()) <= {0.0, 1.0}
    inputs = inputs_from_frame(schema, frame)
    for name, spec in schema.tensor_specs("user").items() | schema.tensor_specs("item").items():
        assert inputs[name].shape[1:] == tuple(spec.shape[1:]), name


@needs_data
@pytest.mark.parametrize("name,rows,clicks", [("criteo", 200, 49), ("avazu", 100, 20), ("alimama", 99, 2),
                                              ("movielens", 200, 113)])
def test_every_sample_reads_into_its_schema(name, rows, clicks):
    schema, frame = read_ctr_sample(name, SAMPLES)
    _check_frame(schema, frame, rows)
    assert int(frame[LABEL].sum()) == clicks
    assert frame.attrs["read_report"] == {"policy": "fail", "rows_read": rows, "rows_rejected": 0,
                                          "rejected_by_reason": {}, "rejected_by_table": {},
                                          "examples": []}


@needs_data
@pytest.mark.parametrize("name,models,refused", [
    ("criteo", ["dnn"], {"can": "no user feature to form co-action pairs", "din": "DIN needs a sequence feature"}),
    ("avazu", ["dnn", "can"], {"din": "DIN needs a sequence feature"}),
    ("alimama", ["can"], {}),
    ("movielens", ["can", "din"], {}),
])
def test_every_sample_trains_the_rankers_that_fit_its_schema(name, models, refused):
    """The readers feed the ranking models: one epoch on each sample gives finite probabilities and metrics
    (anonymous Criteo: a user id that is always unknown, so GAUC is the AUC); a model the schema cannot
    support says why."""
    import math

    import numpy as np

    from models.ranking.metrics import ctr_metrics
    from models.features import numeric_stats
    from models.ranking.models import RankingConfig, build_ranker, build_vocabularies
    from models.ranking.training import fit_ranker, predict_probabilities
    from models.tf_compat import keras, tf

    schema, frame = read_ctr_sample(name, SAMPLES)
    vocabs = build_vocabularies(schema, frame)
    stats = numeric_stats(schema, frame)  # Criteo's counts reach the thousands: standardized, as the job does
    x = {k: tf.constant(v) for k, v in inputs_from_frame(schema, frame).items()}
    y = frame[LABEL].to_numpy(np.float32)
    for model_type in models:
        keras.utils.set_random_seed(0)
        model = build_ranker(model_type, schema, vocabs, RankingConfig(), stats)
        model.compile(optimizer=keras.optimizers.Adam(0.003), loss="binary_crossentropy")
        fit_ranker(model, (x, y), None, epochs=1, batch_size=64, seed=0)
        p = predict_probabilities(model, x)
        assert p.shape == (len(frame),) and np.isfinite(p).all() and ((p > 0) & (p < 1)).all(), model_type
        metrics = ctr_metrics(frame[USER_ID].to_numpy(), y, p)
        assert 0.0 <= metrics["auc"] <= 1.0
        if name == "criteo":  # every impression has the unknown user: one group, GAUC is the AUC
            assert metrics["gauc"] == pytest.approx(metrics["auc"])
        else:  # undefined (nan) when no user of the sample has both a click and a non-click
            assert math.isnan(metrics["gauc"]) or 0.0 <= metrics["gauc"] <= 1.0
    for model_type, message in refused.items():
        with pytest.raises(ValueError, match=message):
            build_ranker(model_type, schema, vocabs, RankingConfig())


@needs_data
def test_criteo_avazu_mapping():
    _, criteo = read_criteo(os.path.join(SAMPLES, SAMPLE_FILES["criteo"]))
    assert (criteo[USER_ID] == OOV_TOKEN).all() and (criteo[ITEM_ID] == OOV_TOKEN).all()
    # First data row: label 0, I1 blank -> 0.0, I2 = 3, I3 = 260, C1 = 05db9164, C19 blank.
    first = criteo.iloc[0]
    assert (first["I1"], first["I2"], first["I3"], first["C1"], first["C19"]) == (0.0, 3.0, 260.0, "05db9164", "")
    _, avazu = read_avazu(os.path.join(SAMPLES, SAMPLE_FILES["avazu"]))
    first = avazu.iloc[0]
    # device_id a99f214a is the placeholder -> user = device_ip-device_model; hour 14102100 = 2014-10-21 00:00 UTC.
    assert first[USER_ID] == "ddd2926e-44956a24" and first[ITEM_ID] == "15706"
    assert first[TIMESTAMP] == 1413849600 and first["hour_of_day"] == "00"


@needs_data
def test_alimama_sequences_drop_the_masked_padding():
    schema, frame = read_alimama(os.path.join(SAMPLES, SAMPLE_FILES["alimama"]))
    assert schema.sequence_feature is None
    assert schema.feature("history_category").kind == Kind.MULTI_CATEGORICAL
    lengths = frame["history_category"].map(len)
    # One row has 22 padded steps (mask 0), the others 50 real ones.
    assert sorted(lengths.unique()) == [28, 50] and (lengths == 28).sum() == 1
    assert (frame["history_brand"].map(len) == lengths).all()
    assert not any("0" == v for seq in frame["history_category"] for v in seq)
    first = frame.iloc[0]
    assert first[USER_ID] == "1000017" and first[ITEM_ID] == "716752" and first["cate_id"] == "6426"
    assert first["history_category"][:2] == ["5510", "384"] and first["price"] == pytest.approx(0.998295616895959)


@needs_data
def test_movielens_sample_histories_hold_only_earlier_ratings():
    _, frame = read_movielens_sample(os.path.join(SAMPLES, SAMPLE_FILES["movielens"]))
    assert (frame[LABEL] == (frame["rating"] >= 4)).all()
    by_key = {(u, i): t for u, i, t in zip(frame[USER_ID], frame[ITEM_ID], frame[TIMESTAMP])}
    non_empty = 0
    for u, t, hist in zip(frame[USER_ID], frame[TIMESTAMP], frame[HISTORY]):
        non_empty += bool(hist)
        for item in hist:
            assert by_key[(u, item)] < t
    # Users with two rows: the later row sees the earlier one.
    repeated = frame[USER_ID].value_counts()
    assert non_empty == int((repeated - 1).clip(lower=0).sum())
    first = frame.iloc[0]
    assert (first["age"], first["occupation"], first["genres"], first["release_year"], first["decade"]) == \
        ("25-34", "college/grad student", ["Comedy", "Drama"], "1994", "1990s")


def _write(path, header, rows):
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for r in rows:
            f.write(",".join(r) + "\n")
    return str(path)


def test_malformed_rows_name_file_line_and_field(tmp_path):
    good = ["0"] + ["1"] * 13 + ["ab"] * 26
    path = _write(tmp_path / "criteo.txt", ("label",) + CRITEO_NUMERIC + CRITEO_CATEGORICAL,
                  [good, good[:-1], ["2"] + good[1:], good[:3] + ["x"] + good[4:]])
    with pytest.raises(DataError, match=r"criteo.txt, line 3: expected 40 fields, found 39"):
        read_criteo(path)
    _, frame = read_criteo(path, bad_rows="skip")
    assert len(frame) == 1
    report = frame.attrs["read_report"]
    assert report["rejected_by_reason"] == {"wrong number of fields": 1, "bad label": 1, "bad I3": 1}
    assert report["examples"][1] == {"file": path, "line": 4, "field": "label", "reason": "label '2' is not 0 or 1"}
    assert report["examples"][2]["field"] == "I3" and report["examples"][2]["line"] == 5

    row = ["1", "0", "14102100", "1005", "0"] + ["s"] * 6 + ["d1", "ip", "m", "1", "0"] + ["7"] * 8
    bad_hour = list(row)
    bad_hour[2] = "14133100"
    path = _write(tmp_path / "avazu.txt", AVAZU_COLUMNS, [row, bad_hour])
    with pytest.raises(DataError, match=r"avazu.txt, line 3, field 'hour': hour '14133100' is not a valid"):
        read_avazu(path)

    seq = ALIMAMA_SEQUENCE_LENGTH
    tail = ["u", "0", "1", "1", "1", "1", "1", "0", "1", "m", "c", "k", "cu", "b", "1.5", "1", "0"]
    ok = ["1"] * seq + ["7"] * seq + ["9"] * seq + ["1"] * seq + ["1"] * seq + tail
    bad_mask = list(ok)
    bad_mask[3 * seq + 4] = "2"
    header = tuple(n for n in ALIMAMA_SEQUENCES for _ in range(seq)) + ALIMAMA_TAIL
    path = _write(tmp_path / "alimama.txt", header, [ok, bad_mask])
    with pytest.raises(DataError, match=r"line 3, field 'mask\[4\]': mask value '2' is not 0 or 1"):
        read_alimama(path)
    with pytest.raises(DataError, match=r"line 1: unexpected header"):
        read_alimama(_write(tmp_path / "h.txt", header[:-1] + ("label",), [ok]))

    ml = ["1", "10", "4", "978300760", '"Foo, The (1995)"', "Comedy", "F", "25", "4", "02139"]
    path = _write(tmp_path / "ml.txt", MOVIELENS_COLUMNS, [ml, ml[:7] + ["30"] + ml[8:]])
    with pytest.raises(DataError, match=r"ml.txt, line 3, field 'age'"):
        read_movielens_sample(path)
    _, frame = read_movielens_sample(path, bad_rows="skip")
    assert frame["title_tokens"].iloc[0] == ["foo", "the"] and frame["release_year"].iloc[0] == "1995"
    with pytest.raises(ValueError, match="name"):
        read_ctr_sample("kdd12", str(tmp_path))
    with pytest.raises(FileNotFoundError):
        read_criteo(str(tmp_path / "absent.txt"))
    with pytest.raises(DataError, match="no valid rows"):
        read_criteo(_write(tmp_path / "c2.txt", ("label",) + CRITEO_NUMERIC + CRITEO_CATEGORICAL,
                           [good[:-1]]), bad_rows="skip")


def test_byte_order_mark_undecodable_bytes_line_breaks_and_huge_timestamps(tmp_path):
    ml = ["1", "10", "4", "978300760", "Foo (1995)", "Comedy", "F", "25", "4", "02139"]
    lines = [",".join(MOVIELENS_COLUMNS).encode(), ",".join(ml).encode(),          # 1, 2
             ",".join(ml[:4] + ['"Bar\nBaz (1996)"'] + ml[5:]).encode(),           # 3-4: one row over two lines
             ",".join(ml[:3] + ["9000000000000000000"] + ml[4:]).encode(),         # 5: > 2**62 seconds
             ",".join(ml[:4] + ["Café (1990)"] + ml[5:]).encode("latin-1")]        # 6: byte 0xe9 is not UTF-8
    path = tmp_path / "ml.txt"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # the header starts with a byte-order mark
    with pytest.raises(DataError, match=r"ml.txt, line 3: a quoted value spans lines 3–4 \(unbalanced quote\?\)"):
        read_movielens_sample(str(path))
    _, frame = read_movielens_sample(str(path), bad_rows="skip")
    assert frame[USER_ID].tolist() == ["1"]
    report = frame.attrs["read_report"]
    # 5 data lines = 1 kept + 2 (the two-line row) + 1 + 1.
    assert report["rows_read"] == 5 and report["rows_rejected"] == 4
    assert report["rejected_by_reason"] == {"line break in value": 2, "bad timestamp": 1, "not UTF-8": 1}
    assert [(e["line"], e["field"], e["reason"]) for e in report["examples"]] == [
        (3, None, "a quoted value spans lines 3–4 (unbalanced quote?)"),
        (5, "timestamp", "timestamp '9000000000000000000' is out of range: more than 2**62 seconds from 1970"),
        (6, None, "not valid UTF-8 text (byte 0xe9)")]
