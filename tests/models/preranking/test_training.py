import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from conftest import tiny_synthetic_config
from models.features import HISTORY, ITEM_ID, LABEL, TIMESTAMP, USER_ID
from models.preranking.latency import IDENTITY, LatencyTable
from models.preranking.preranker import PreRanker
from models.preranking.training import (PrerankerConfig, derived_latency, flat_metrics, latency_grid,
                                        teacher_logits, train_preranker)
from models.ranking.models import RankingConfig, build_ranker, build_vocabularies, inputs_from_frame
from models.ranking.sequences import build_sequences
from models.tf_compat import keras


def test_config_validation_names_the_field_and_value():
    for kwargs, field in [({"latency_weight": -1.0}, "latency_weight"),
                          ({"distillation_weight": 1.5}, "distillation_weight"),
                          ({"operator_widths": (16, 16)}, "operator_widths"),
                          ({"operator_widths": (0, 16)}, "operator_widths"),
                          ({"num_mixops": 0}, "num_mixops"),
                          ({"search_epochs": 2, "search_warmup_epochs": 2}, "search_warmup_epochs"),
                          ({"external_feature_costs": {"brand": -0.5}}, "external_feature_costs"),
                          ({"candidate_features": "item_id"}, "candidate_features"),
                          ({"mask_learning_rate": 0.0}, "mask_learning_rate"),
                          ({"retrain_patience": 0}, "retrain_patience"),
                          ({"retrain_selection": "recall"}, "retrain_selection")]:
        with pytest.raises((ValueError, TypeError), match=field):
            PrerankerConfig(**kwargs)
    config = PrerankerConfig(external_feature_costs={"brand": 0.5}, operator_widths=[8, 4])
    assert config.external_feature_costs == (("brand", 0.5),)
    assert config.mixop_operators == (IDENTITY, 8, 4)
    assert PrerankerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="Unknown preranker config keys"):
        PrerankerConfig.from_dict({"lambda": 1})


def test_latency_helpers():
    assert latency_grid(40, (16, 64)) == [1, 5, 10, 16, 20, 30, 40, 64]
    table = LatencyTable(candidates=10, feature_costs={"a": 0.5, "b": 0.25}, input_widths=(1, 9),
                         output_widths=(1, 4), operator_costs=[[0.1, 0.2], [0.9, 1.8]])
    # features .5 + .25; network 9 → 4: 1.8, 4 → 1: .1 + (.9 − .1)·3/8 = .4.
    out = derived_latency(table, ["a", "b"], (4,), [8, 1])
    assert out == {"features_ms": 0.75, "network_ms": pytest.approx(2.2), "total_ms": pytest.approx(2.95)}
    table.check_covers(["a", "b"], (4,), 10)  # fits: nothing raised
    with pytest.raises(ValueError) as err:
        table.check_covers(["a", "c", "d"], (4, 8), 1000)
    assert str(err.value) == ("The latency table does not fit this search: it was measured for 10 candidates per "
                              "request, not 1000; it has no cost for the features ['c', 'd']; it has no layer of "
                              "output width [8] (measured: [1, 4]).")


def _impressions():
    from pipeline.data.synthetic import generate_synthetic

    raw = generate_synthetic(tiny_synthetic_config(num_users=120, num_items=80))
    events = pd.concat(list(raw.interactions()), ignore_index=True)
    frame = events.merge(raw.users, on=USER_ID).merge(raw.items, on=ITEM_ID)
    frame[HISTORY] = list(build_sequences(frame[USER_ID].to_numpy(), frame[ITEM_ID].to_numpy(),
                                          frame[TIMESTAMP].to_numpy(), raw.schema.feature(HISTORY).max_length))
    frame[LABEL] = frame[LABEL].astype(np.float32)
    return raw.schema, frame


def test_train_preranker_end_to_end_on_tiny_synthetic_data():
    schema, frame = _impressions()
    valid_mask = np.arange(len(frame)) % 5 == 0
    train, valid = frame[~valid_mask], frame[valid_mask]
    vocabs = build_vocabularies(schema, train)
    keras.utils.set_random_seed(0)
    teacher = build_ranker("dnn", schema, vocabs, RankingConfig(embedding_dim=4, hidden_units=(8,)))
    teacher.compile(optimizer=keras.optimizers.Adam(0.01), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    teacher.fit(inputs_from_frame(schema, train), train[LABEL].to_numpy(), batch_size=256, epochs=1, verbose=0)
    config = PrerankerConfig(embedding_dim=4, num_mixops=2, operator_widths=(8, 16), search_epochs=2,
                             retrain_epochs=2, retrain_selection="distillation", batch_size=128, candidates=50,
                             latency_repeats=3, external_feature_costs={"brand": 2.0})
    events = []
    model, metrics = train_preranker(schema, vocabs, train, valid, teacher, config,
                                     progress=lambda event, info: events.append((event, info)))
    assert isinstance(model, PreRanker)
    # Progress: the latency table, every search epoch, the derived network, every retraining epoch, in order.
    names = [e for e, _ in events]
    retrained = len(metrics["retrain"]["train_loss"])
    assert names == ["latency_table", "search_epoch", "search_epoch", "derived"] + ["retrain_epoch"] * retrained
    search = [info for e, info in events if e == "search_epoch"]
    assert [(i["epoch"], i["epochs"], i["loss2"]) for i in search] == \
        [(k, 2, metrics["search"][k]["loss2"]) for k in range(2)]
    assert search[-1]["kept"] == sum(t >= config.keep_threshold for t in metrics["search"][-1]["keep_probabilities"])
    assert events[3][1] == {"features": metrics["features"], "hidden_units": metrics["hidden_units"]}
    assert [round(i["validation_distillation_loss"], 5) for e, i in events if e == "retrain_epoch"] == \
        metrics["retrain"]["validation_distillation_loss"]
    assert model.features == metrics["features"] and model.hidden_units == metrics["hidden_units"]
    assert len(metrics["operators"]) == 2 and set(metrics["operators"]) <= {"identity", 8, 16}
    assert any(schema.feature(n).side == "item" for n in metrics["features"])
    assert 0.0 <= metrics["validation_auc"] <= 1.0
    # The retraining epoch was chosen on the validation distillation loss (the ranker's logits of those rows).
    curve = metrics["retrain"]["validation_distillation_loss"]
    assert len(curve) >= 1 and metrics["retrain"]["epochs"] == int(np.argmin(curve)) + 1
    assert metrics["validation_auc"] == metrics["retrain"]["validation_auc"][metrics["retrain"]["epochs"] - 1]
    assert len(metrics["search"]) == 2 and all(np.isfinite(r["loss1"]) for r in metrics["search"])
    # The external cost is added on top of the measured lookup cost.
    assert metrics["feature_costs_ms"]["brand"] >= 2.0
    assert metrics["expected_latency_ms"]["total_ms"] > 0
    json.dumps(metrics)
    flat = flat_metrics(metrics)
    assert flat["preranker.features"] == metrics["features"]
    assert flat["preranker.expected_latency_ms"] == metrics["expected_latency_ms"]["total_ms"]
    logits = model.predict({n: v for n, v in inputs_from_frame(schema, valid, model.features).items()}, verbose=0)
    assert np.all(np.isfinite(logits))

    # The teacher's logits computed once can be passed in (a sweep over one teacher): the teacher is not called.
    outputs = (teacher_logits(teacher, inputs_from_frame(schema, train)),
               teacher_logits(teacher, inputs_from_frame(schema, valid)))
    # The table searched against is returned whole, and a search can reuse it instead of measuring again.
    table = LatencyTable.from_dict(json.loads(json.dumps(metrics["latency_table"])))
    assert {k: round(v, 5) for k, v in table.feature_costs.items()} == metrics["feature_costs_ms"]
    # Given the table it measured, the same search searches the same way (measuring does not move the start).
    _, same = train_preranker(schema, vocabs, train, valid, None, config, latency_table=table,
                              teacher_outputs=outputs)
    assert same["search"] == metrics["search"] and same["features"] == metrics["features"]
    quick = dataclasses.replace(config, search_epochs=1, search_warmup_epochs=0, retrain_epochs=1)
    reused = []
    again, again_metrics = train_preranker(schema, vocabs, train, valid, None, quick, teacher_outputs=outputs,
                                           latency_table=table, progress=lambda event, info: reused.append(event))
    assert "latency_table" not in reused and again_metrics["seconds"]["latency_measurement"] == 0.0
    assert again_metrics["latency_table"] == table.to_dict()  # used as it is: the external cost is not added twice
    with pytest.raises(ValueError, match=r"measured for 50 candidates per request, not 60"):
        train_preranker(schema, vocabs, train, valid, None, dataclasses.replace(quick, candidates=60),
                        teacher_outputs=outputs, latency_table=table)
    retrain = again_metrics["retrain"]
    assert retrain["epochs"] == 1 and len(retrain["validation_distillation_loss"]) == 1
    with pytest.raises(ValueError, match=f"one logit per train row \\({len(train)}\\).*per validation row "
                                         f"\\({len(valid)}\\).*\\[{len(train)}, {len(valid) - 1}\\]"):
        train_preranker(schema, vocabs, train, valid, None, quick, teacher_outputs=(outputs[0], outputs[1][1:]))


def test_candidate_features_without_an_item_feature_are_rejected_before_any_work():
    schema, frame = _impressions()
    config = PrerankerConfig(candidate_features=(USER_ID, HISTORY))

    def teacher(batch):  # never called: the check comes before any work
        raise AssertionError("the teacher was called")

    item_names = [f.name for f in schema.item_features]
    with pytest.raises(ValueError) as err:
        train_preranker(schema, {}, frame, None, teacher, config)
    assert str(err.value) == (f"`candidate_features` should hold at least one item feature of {item_names}. "
                              f"Received: candidate_features=['user_id', 'history']")
