"""The pre-ranking stage's latency table option: a given table is checked before any work."""

import json

import pytest

from models.preranking.latency import LatencyTable
from pipeline.config import ConfigError, load_config
from pipeline.data.synthetic import SyntheticConfig, synthetic_schema
from pipeline.preranker_stage import load_latency_table


@pytest.fixture(scope="module")
def schema():
    return synthetic_schema(SyntheticConfig())


def _table(schema, candidates=1000, widths=(1, 16, 32, 64, 128), drop=()):
    names = [f.name for f in schema.features if f.name not in drop]
    return LatencyTable(candidates=candidates, feature_costs={n: 0.05 for n in names}, input_widths=(1, 200),
                        output_widths=widths, operator_costs=[[0.01] * len(widths), [0.2] * len(widths)])


def test_no_table_means_measure(schema):
    assert load_latency_table(load_config(None, []), schema) is None


def test_a_table_that_fits_is_loaded(schema, tmp_path):
    path = _table(schema).save(str(tmp_path / "t.json"))
    table = load_latency_table(load_config(None, [f"preranker.latency_table={path}"]), schema)
    assert table == _table(schema)


def test_a_table_that_does_not_fit_is_a_config_error_naming_the_file_and_what_is_missing(schema, tmp_path):
    path = _table(schema, candidates=300, widths=(1, 16, 32, 64), drop=("brand",)).save(str(tmp_path / "t.json"))
    with pytest.raises(ConfigError) as err:
        load_latency_table(load_config(None, [f"preranker.latency_table={path}"]), schema)
    assert str(err.value) == (f"`preranker.latency_table`: {path}: The latency table does not fit this search: it was "
                              f"measured for 300 candidates per request, not 1000; it has no cost for the features "
                              f"['brand']; it has no layer of output width [128] (measured: [1, 16, 32, 64]).")


def test_missing_and_malformed_tables_are_config_errors_naming_the_file(schema, tmp_path):
    missing = str(tmp_path / "none.json")
    with pytest.raises(ConfigError, match=f"`preranker.latency_table`: {missing} was not found"):
        load_latency_table(load_config(None, [f"preranker.latency_table={missing}"]), schema)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=f"`preranker.latency_table`: {bad} is not a latency table: Expecting"):
        load_latency_table(load_config(None, [f"preranker.latency_table={bad}"]), schema)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"candidates": 1000, "costs": {}}))
    with pytest.raises(ConfigError, match=f"{wrong} is not a latency table: Unknown latency table keys \\['costs'\\]"):
        load_latency_table(load_config(None, [f"preranker.latency_table={wrong}"]), schema)


def test_a_table_with_external_costs_is_refused_when_the_config_is_loaded():
    with pytest.raises(ConfigError, match=r"`preranker.latency_table` \(t.json\) is used as it is: leave "
                                          r"`preranker.external_feature_costs` empty"):
        load_config(None, ["preranker.latency_table=t.json", "preranker.external_feature_costs={geo: 1.5}"])


def test_a_missing_table_fails_the_run_before_any_stage(tmp_path):
    from pipeline.job import run

    missing = str(tmp_path / "none.json")
    with pytest.raises(ConfigError, match=f"`preranker.latency_table`: {missing} was not found"):
        run(load_config(None, [f"preranker.latency_table={missing}"]), str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


def test_the_benchmark_reads_a_table_or_an_earlier_output_holding_one(schema, tmp_path):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "benchmarks", "preranker.py")
    spec = importlib.util.spec_from_file_location("preranker_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    names = [f.name for f in schema.features]
    table = _table(schema)
    plain = table.save(str(tmp_path / "table.json"))
    output = tmp_path / "out.json"
    output.write_text(json.dumps({"dataset": "synthetic", "latency_table": table.to_dict()}))
    for given in (plain, str(output)):
        assert bench._given_latency_table(given, names, (16, 32, 64, 128), 1000) == table
    with pytest.raises(SystemExit, match=f"--latency-table {plain}: .*not 300; .*output width \\[256\\]"):
        bench._given_latency_table(plain, names, (16, 256), 300)
