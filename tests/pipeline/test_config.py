import pytest

from pipeline.config import ConfigError, RetrievalConfig, RunConfig, dump_config, load_config, parse_override


def test_defaults_and_overrides():
    cfg = load_config(None, ["retrieval.epochs=3", "retrieval.hidden_units=[64, 32]", "data.split.n=2",
                             "evaluation.ks=[5]", "promotion.metric=retrieval.recall@5"])
    assert cfg.retrieval.epochs == 3
    assert cfg.retrieval.hidden_units == (64, 32)
    assert cfg.data.split.n == 2
    assert cfg.evaluation.ks == (5,)
    assert load_config() == RunConfig()


def test_yaml_file_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(load_config(None, ["retrieval.epochs=2"])))
    assert load_config(str(path)).retrieval.epochs == 2


@pytest.mark.parametrize("override,message", [
    ("retrieval.epoch=3", "unknown key.*`retrieval.epoch`"),
    ("retrieval.epochs=three", "`retrieval.epochs` should be an integer. Received: 'three'"),
    ("retrieval.epochs=0", "`retrieval.epochs` should be >= 1"),
    ("retrieval.normalize=2", "`retrieval.normalize` should be true or false"),
    ("data.source=hive", "`data.source` should be one of"),
    ("data.source=movielens", "`data.path` is required"),
    ("index.kind=hnsw", "index.kind"),
    ("data.split.method=kfold", "split.method"),
    ("data.synthetic.num_users=-1", "num_users"),
    ("bogus=1", "unknown key.*`bogus`"),
    ("retrieval=3", "`retrieval` should be a mapping"),
    ("retrieval.ssl_masking=cfm", "`retrieval.ssl_masking` should be one of random, correlated"),
    ("retrieval.ssl_weight=-1", "`retrieval.ssl_weight` should be >= 0"),
    ("retrieval.ssl_correlation=nmi", "`retrieval.ssl_correlation` should be one of mi, normalized_mi"),
    ("retrieval.ssl_items=train", "`retrieval.ssl_items` should be one of corpus, batch. Received: 'train'"),
    ("retrieval.ssl_share=half", "`retrieval.ssl_share` should be one of full, partial"),
    ("retrieval.negatives=hard", "`retrieval.negatives` should be one of inbatch, cbns, mixed"),
    ("retrieval.optimizer=sgd", "`retrieval.optimizer` should be one of adam, adagrad"),
    ("retrieval.ssl_value_dropout=1.0", "`retrieval.ssl_value_dropout` should be in"),
    ("retrieval.shuffle_buffer=0", "`retrieval.shuffle_buffer` should be >= 1"),
    ("retrieval.drift_correction=median", "`retrieval.drift_correction` should be one of mean, none"),
    ("retrieval.item_gradient=bank", "`retrieval.item_gradient` should be one of batch, all"),
    ("evaluation.head_fraction=1.0", "`evaluation.head_fraction` should be in"),
    ("retrieval.loss=bpr", "`retrieval.loss` should be one of softmax, ccl"),
    ("retrieval.ccl_margin=1.5", "`retrieval.ccl_margin` should be in"),
    ("retrieval.ccl_negative_weight=-1", "`retrieval.ccl_negative_weight` should be >= 0"),
    ("retrieval.embedding_l2=-0.1", "`retrieval.embedding_l2` should be >= 0"),
    ("retrieval.query_dropout=1.0", "`retrieval.query_dropout` should be in \\[0, 1\\)"),
    ("retrieval.logq_weight=-0.5", "`retrieval.logq_weight` should be a finite number >= 0. Received: -0.5"),
    ("retrieval.learning_rate_schedule=exponential", "`retrieval.learning_rate_schedule` should be one of constant"),
    ("retrieval.learning_rate_decay=1.5", r"`retrieval.learning_rate_decay` should be in \(0, 1\]"),
    ("retrieval.learning_rate_schedule=step", "used by, and needed by, learning_rate_schedule=step"),
    ("retrieval.learning_rate_boundaries=[3]", "used by, and needed by.*schedule=constant, boundaries=\\[3\\]"),
    ("data.history_mode=future", "`data.history_mode` should be one of past, all_other, random_prefix, all"),
    ("ranker.coaction_l2=-0.01", "`ranker.coaction_l2` should be a finite number >= 0. Received: -0.01"),
    ("ranker.coaction_l2=.inf", "`ranker.coaction_l2` should be a finite number >= 0. Received: inf"),
    ("preranker.mask_objective=ranker", "`preranker.mask_objective` should be one of labels, distillation"),
    ("preranker.retrain_selection=recall", "`preranker.retrain_selection` should be one of auc, distillation"),
])
def test_bad_values_are_rejected_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_memory_bank_needs_negatives_that_use_it():
    with pytest.raises(ConfigError, match="negatives=inbatch does not use.*memory_size=1024"):
        load_config(None, ["retrieval.memory_size=1024"])
    with pytest.raises(ConfigError, match="memory_size` should be >= 1 with negatives=cbns"):
        load_config(None, ["retrieval.negatives=cbns"])
    assert load_config(None, ["retrieval.negatives=cbns", "retrieval.memory_size=64"]).retrieval.memory_size == 64
    mixed = load_config(None, ["retrieval.negatives=mixed", "retrieval.num_mixed_negatives=8",
                               "retrieval.memory_size=64"])
    assert mixed.retrieval.memory_size == 64


def test_ccl_needs_normalized_towers_and_no_hard_negatives():
    with pytest.raises(ConfigError, match="retrieval.normalize=true"):
        load_config(None, ["retrieval.loss=ccl", "retrieval.normalize=false"])
    with pytest.raises(ConfigError, match="num_hard_negatives"):
        load_config(None, ["retrieval.loss=ccl", "retrieval.num_hard_negatives=5"])
    assert load_config(None, ["retrieval.loss=ccl"]).retrieval.loss == "ccl"
    with pytest.raises(ConfigError, match="ccl_negatives` should be one of all, uniform"):
        load_config(None, ["retrieval.loss=ccl", "retrieval.ccl_negatives=batch"])
    with pytest.raises(ConfigError, match="Received: loss=softmax"):
        load_config(None, ["retrieval.ccl_negatives=uniform", "retrieval.negatives=mixed",
                           "retrieval.num_mixed_negatives=8"])
    with pytest.raises(ConfigError, match="num_mixed_negatives=0"):
        load_config(None, ["retrieval.loss=ccl", "retrieval.ccl_negatives=uniform"])
    config = load_config(None, ["retrieval.loss=ccl", "retrieval.ccl_negatives=uniform", "retrieval.negatives=mixed",
                                "retrieval.num_mixed_negatives=8"])
    assert config.retrieval.ccl_negatives == "uniform"


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("retrieval: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(str(listy))
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("retrieval.epochs")


def test_shipped_configs_are_valid():
    import glob
    import os

    import pipeline

    files = glob.glob(os.path.join(os.path.dirname(pipeline.__file__), "configs", "*.yaml"))
    assert files
    for f in files:
        load_config(f)


def test_default_yaml_states_the_built_in_defaults():
    """`pipeline/configs/default.yaml` is what `recfunnel run` uses without --config, key for key."""
    import os

    import yaml

    import pipeline
    from pipeline.config import config_to_dict

    path = os.path.join(os.path.dirname(pipeline.__file__), "configs", "default.yaml")
    with open(path) as f:
        shipped = yaml.safe_load(f)
    assert shipped == config_to_dict(RunConfig()), "regenerate it with `recfunnel config`"


def _flat_keys(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _flat_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_readme_configuration_reference_lists_every_key():
    """Each row of README's "Configuration reference" names keys as `section.key` / `other` (same section);
    `x.*` stands for every key under x. The rows and the config's keys are the same set."""
    import os
    import re

    import pipeline
    from pipeline.config import config_to_dict

    readme = os.path.join(os.path.dirname(os.path.dirname(pipeline.__file__)), "README.md")
    with open(readme, encoding="utf-8") as f:
        section = f.read().split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    listed = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        names = re.findall(r"`([^`]+)`", line.split("|")[1])
        prefix = names[0].rsplit(".", 1)[0] + "."
        listed.update([names[0]] + [prefix + n for n in names[1:]])
    keys = set(_flat_keys(config_to_dict(RunConfig())))
    wildcards = [n[:-1] for n in listed if n.endswith(".*")]
    covered = {k for k in keys if k in listed or any(k.startswith(w) for w in wildcards)}
    assert sorted(keys - covered) == [], "config keys missing from the README reference"
    assert sorted(n for n in listed if not n.endswith(".*") and n not in keys) == [], "README keys not in the config"


def test_ssl_maskings_match_the_model():
    from models.ssl import MASKINGS
    from pipeline.config import SSL_MASKINGS

    assert SSL_MASKINGS == MASKINGS


def test_ssl_correlation_picks_the_matrix_cfm_ranks_partners_by():
    import numpy as np

    from models.ssl import mutual_information_matrix
    from pipeline import job
    from pipeline.config import load_config
    from pipeline.data.synthetic import SyntheticConfig, synthetic_schema

    schema = synthetic_schema(SyntheticConfig())
    names = [f.name for f in schema.item_features]
    mi_features = [n for n in names if n in ("category", "subcategory", "brand")]
    stats = {"features": mi_features, "mi": [[2.4, 2.4, 2.1], [2.4, 3.8, 3.5], [2.1, 3.5, 5.4]], "num_items": 3000}
    for correlation, normalized in (("mi", False), ("normalized_mi", True)):
        config = load_config(None, ["retrieval.ssl_weight=1.0", f"retrieval.ssl_correlation={correlation}"])
        task = job.build_ssl_task(config, schema, stats)
        expected = mutual_information_matrix(names, mi_features, stats["mi"], normalized=normalized, num_items=3000)
        np.testing.assert_allclose(task.get_config()["mutual_information"], expected, rtol=1e-6)


def test_drift_corrections_match_the_model():
    from models.cross_batch_retrieval import DRIFT_CORRECTIONS as MODEL
    from pipeline.config import DRIFT_CORRECTIONS

    assert DRIFT_CORRECTIONS == MODEL


def test_history_modes_match_the_materialization():
    from pipeline.config import HISTORY_MODES
    from pipeline.data.materialize import HISTORY_MODES as WRITER

    assert HISTORY_MODES == WRITER


def test_history_poolings_match_the_towers():
    from models.towers import HISTORY_POOLINGS as MODEL
    from pipeline.config import HISTORY_POOLINGS, ConfigError as Error

    assert HISTORY_POOLINGS == MODEL
    with pytest.raises(Error, match="`retrieval.history_pooling` should be one of mean, attention"):
        load_config(None, ["retrieval.history_pooling=max"])


def test_retrieval_losses_match_the_model():
    from models.cross_batch_retrieval import CCL_NEGATIVES as MODEL_CCL_NEGATIVES, LOSSES
    from pipeline.config import CCL_NEGATIVES, RETRIEVAL_LOSSES

    assert RETRIEVAL_LOSSES == LOSSES
    assert CCL_NEGATIVES == MODEL_CCL_NEGATIVES


def test_preranker_choices_match_the_model():
    from models.preranking.training import MASK_OBJECTIVES, RETRAIN_SELECTIONS
    from pipeline.config import PRERANKER_MASK_OBJECTIVES, PRERANKER_RETRAIN_SELECTIONS

    assert PRERANKER_MASK_OBJECTIVES == MASK_OBJECTIVES
    assert PRERANKER_RETRAIN_SELECTIONS == RETRAIN_SELECTIONS


def test_learning_rate_schedules_match_the_model():
    from models.learning_rate import SCHEDULES
    from pipeline.config import LR_SCHEDULES

    assert LR_SCHEDULES == SCHEDULES


@pytest.mark.parametrize("boundaries", ["[0]", "[6]", "[4, 2]", "[2, 2]"])
def test_learning_rate_boundaries_lie_inside_the_run(boundaries):
    with pytest.raises(ConfigError, match=r"increasing epoch counts in \[1, epochs - 1\] = \[1, 5\]"):
        load_config(None, ["retrieval.epochs=6", "retrieval.learning_rate_schedule=step",
                           f"retrieval.learning_rate_boundaries={boundaries}"])


def test_learning_rate_schedules_load():
    step = load_config(None, ["retrieval.epochs=6", "retrieval.learning_rate_schedule=step",
                              "retrieval.learning_rate_boundaries=[2, 4]"]).retrieval
    assert step.learning_rate_boundaries == (2, 4)
    cosine = load_config(None, ["retrieval.learning_rate_schedule=cosine", "retrieval.learning_rate_decay=0"])
    assert cosine.retrieval.learning_rate_decay == 0.0
    with pytest.raises(ConfigError, match="learning_rate_decay"):
        load_config(None, ["retrieval.epochs=6", "retrieval.learning_rate_schedule=step",
                           "retrieval.learning_rate_boundaries=[2]", "retrieval.learning_rate_decay=0"])


def test_item_gradients_match_the_model():
    from models.cross_batch_retrieval import ITEM_GRADIENTS as MODEL
    from pipeline.config import ITEM_GRADIENTS

    assert ITEM_GRADIENTS == MODEL


def test_preranker_defaults_are_the_models():
    """The stage's defaults, and the pre-ranking benchmark's, are `PrerankerConfig`'s, but
    for the job's two time bounds (a sample of the events for the search, fewer latency
    calls)."""
    import dataclasses
    import importlib.util
    import os

    from models.preranking.training import PrerankerConfig
    from pipeline.preranker_stage import autofas_config

    model = PrerankerConfig()
    job = autofas_config(RunConfig())
    assert (job.search_max_events, job.latency_repeats) == (30_000, 15)
    assert (model.search_max_events, model.latency_repeats) == (0, 30)
    assert dataclasses.replace(job, search_max_events=0, latency_repeats=30) == model
    assert autofas_config(load_config(None, ["preranker.candidates=300"])).candidates == 300
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "benchmarks", "preranker.py")
    spec = importlib.util.spec_from_file_location("preranker_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench._parse_args(["--dataset", "synthetic", "--out", "unused.json"])
    same = {"embedding_dim": args.embedding_dim, "num_mixops": args.num_mixops,
            "operator_widths": tuple(args.operator_widths), "latency_weight": args.lambda_,
            "distillation_weight": args.lambda1, "architecture_latency_weight": args.headline_lambda2,
            "search_epochs": args.search_epochs, "search_warmup_epochs": args.warmup_epochs,
            "retrain_epochs": args.retrain_epochs, "retrain_patience": args.retrain_patience,
            "retrain_selection": args.retrain_selection, "mask_objective": args.mask_objective,
            "batch_size": args.batch_size, "seed": args.seed, "latency_repeats": args.latency_repeats,
            "latency_items_encoded": args.latency_items == "encoded", "candidates": args.candidates}
    assert same == {name: getattr(model, name) for name in same}
    # and it offers the model's choices (a choice the model lacks fails in PrerankerConfig)
    from models.preranking.training import MASK_OBJECTIVES, RETRAIN_SELECTIONS

    for flag, choices in (("--mask-objective", MASK_OBJECTIVES), ("--retrain-selection", RETRAIN_SELECTIONS)):
        for choice in choices:
            bench._parse_args(["--dataset", "synthetic", "--out", "unused.json", flag, choice])


def test_ranker_fields_reach_the_ranking_model():
    from models.ranking.models import RankingConfig
    from pipeline.config import RankerConfig
    from pipeline.ranker_stage import ranking_model_config

    stage = RankerConfig(embedding_dim=4, hidden_units=(16,), coaction_feed_dim=6, coaction_layer_sizes=(3,),
                         coaction_orders=3, order_independent=True, combination_independent=True,
                         sequence_pooling="sum_then_coaction", coaction_l2=0.01)
    model = ranking_model_config(stage)
    shared = {f for f in RankerConfig.__dataclass_fields__} & {f for f in RankingConfig.__dataclass_fields__}
    assert shared and all(getattr(model, f) == getattr(stage, f) for f in shared)
    assert model.coaction_l2 == 0.01


def _float_keys(cls=RunConfig, prefix=""):
    """The dotted keys of every float field of every section."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _float_keys(hints[f.name], key + ".")
        elif hints[f.name] is float:
            yield key


FLOAT_KEYS = sorted(_float_keys())


def test_every_section_has_float_fields_to_check():
    assert {k.split(".")[0] for k in FLOAT_KEYS} == {"data", "stats", "retrieval", "ranker", "preranker", "index",
                                                      "evaluation", "promotion"}
    assert "data.synthetic.brand_noise" in FLOAT_KEYS and "promotion.min_value" in FLOAT_KEYS


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value,shown", [(".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf")])
def test_non_finite_numbers_are_rejected_for_every_float_key(key, value, shown):
    with pytest.raises(ConfigError, match=rf"`{key}` .*Received: (\w+=)?{shown}\b") as e:
        load_config(None, [f"{key}={value}"])
    assert str(e.value).startswith(f"--set {key}={value}: ")


def test_non_finite_numbers_are_rejected_in_mappings_and_built_configs():
    import dataclasses

    from pipeline.config import RetrievalConfig

    with pytest.raises(ConfigError, match=r"`preranker.external_feature_costs.geo` should be a finite number. "
                                          r"Received: inf"):
        load_config(None, ["preranker.external_feature_costs={geo: .inf}"])
    with pytest.raises(ConfigError, match=r"`retrieval.learning_rate` should be a finite number. Received: nan"):
        RunConfig(retrieval=RetrievalConfig(learning_rate=float("nan")))
    with pytest.raises(ConfigError, match=r"`promotion.min_value` should be a finite number. Received: nan"):
        dataclasses.replace(RunConfig(), promotion=dataclasses.replace(RunConfig().promotion, min_value=float("nan")))


def test_errors_name_the_source_of_the_value(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("retrieval:\n  epochs: 2\n  temperature: .nan\n")
    # a bad --set value is the override's, even when the file sets the same key
    with pytest.raises(ConfigError) as e:
        load_config(str(path), ["retrieval.epochs=x", "retrieval.temperature=0.1"])
    assert str(e.value) == "--set retrieval.epochs=x: `retrieval.epochs` should be an integer. Received: 'x'"
    with pytest.raises(ConfigError, match=r"^--set retrieval.hidden_units=\[8, x\]: `retrieval.hidden_units\[1\]`"):
        load_config(None, ["retrieval.hidden_units=[8, x]", "retrieval.temperature=0.1"])
    with pytest.raises(ConfigError, match=r"^--set retrieval={epochs: 0}: `retrieval.epochs` should be >= 1"):
        load_config(None, ["retrieval={epochs: 0}"])
    # a bad value of the file is the file's
    with pytest.raises(ConfigError, match=rf"^{path}: `retrieval.temperature` should be a finite number"):
        load_config(str(path), ["retrieval.epochs=3"])
    # settings that conflict name every source involved
    path.write_text("evaluation:\n  ks: [5]\n")
    with pytest.raises(ConfigError, match=rf"^{path} and --set promotion.metric=retrieval.ndcg@10: "):
        load_config(str(path), ["promotion.metric=retrieval.ndcg@10"])
    with pytest.raises(ConfigError, match=r"^--set data.source=movielens: `data.path` is required"):
        load_config(str(path), ["data.source=movielens"])
    # ... and when no key named was set anywhere, every source
    with pytest.raises(ConfigError, match=rf"^{path} and --set retrieval.negatives=cbns: `retrieval.memory_size` "):
        load_config(str(path), ["retrieval.negatives=cbns"])


@pytest.mark.parametrize("override,message", [
    ("data.split.method=kfold", r"^--set data.split.method=kfold: `data.split.method` should be one of .*"
                                r"Received: method='kfold'"),
    ("data.split.n=0", r"`data.split.n` should be >= 1. Received: n=0"),
    ("data.split.time_quantile=1.5", r"`data.split.time_quantile` should be in \(0, 1\). Received"),
    ("data.synthetic.num_users=-1", r"`data.synthetic.num_users` should be a positive integer. Received: "
                                    r"num_users=-1"),
    ("data.synthetic.mean_impressions_per_user=5000", r"`data.synthetic.mean_impressions_per_user` should be at "
                                                      r"most half of `data.synthetic.num_items`"),
    ("data.synthetic.brand_noise=2", r"`data.synthetic.brand_noise` should be in \[0, 1\]"),
    ("index.kind=hnsw", r"`index.kind` should be one of"),
    ("promotion.keep_versions=0", r"`promotion.keep_versions` should be >= 1"),
])
def test_keys_of_nested_sections_are_named_in_full(override, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, [override])
    assert "invalid `" not in str(e.value)


def test_unreadable_config_files_are_config_errors_naming_the_file(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: is a directory, not a config file$"):
        load_config(str(tmp_path))
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("retrieval:\n  epochs: 2 # é\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=rf"^{latin}: not UTF-8 text: byte 0xe9 on line 2 \(offset 25\)$"):
        load_config(str(latin))
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbfretrieval:\n  epochs: 2\n")
    assert load_config(str(bom)).retrieval.epochs == 2


def test_cli_exit_codes_of_config_and_input_problems(tmp_path, capsys):
    from pipeline.cli import EXIT_DATA, EXIT_USAGE, main

    assert main(["config", "--config", str(tmp_path)]) == EXIT_USAGE
    assert f"{tmp_path}: is a directory" in capsys.readouterr().err
    assert main(["config", "--set", "retrieval.learning_rate=.nan"]) == EXIT_USAGE
    assert main(["config", "--set", "data.source=csv", "--set", "data.path=x.csv",
                 "--set", "data.tabular.colums=x"]) == EXIT_USAGE
    assert "`data.tabular.colums`" in capsys.readouterr().err
    workdir = str(tmp_path / "work")
    for source, path in (("movielens", tmp_path / "nowhere"), ("movielens", tmp_path),
                         ("bars", tmp_path), ("csv", tmp_path / "missing.csv"), ("csv", tmp_path)):
        argv = ["run", "--workdir", workdir, "--set", f"data.source={source}", "--set", f"data.path={path}",
                "--set", "data.tabular.columns={user_id: u, item_id: i, timestamp: t}"]
        if source != "csv":
            argv = argv[:-2]
        assert main(argv) == EXIT_DATA, (source, path)
        assert f"bad input data: {path}" in capsys.readouterr().err


def _tabular(*overrides):
    return load_config(None, ["data.source=csv", "data.path=log.csv",
                              "data.tabular.columns={user_id: u, item_id: i, timestamp: t}", *overrides])


@pytest.mark.parametrize("overrides,message", [
    (["data.tabular.colums=x"], r"^--set data.tabular.colums=x: unknown key\(s\) `data.tabular.colums` in "
                                r"`data.tabular`; known keys: \['columns', "),
    (["data.tabular.format=xlsx"], r"`data.tabular.format` should be one of auto, csv, tsv, parquet. Received: "
                                   r"format='xlsx'"),
    (["data.tabular.timestamp_format=bogus"], r"`data.tabular.timestamp_format` should be None .* Received: "
                                              r"timestamp_format='bogus'"),
    (["data.tabular.columns={user_id: u, item_id: i}"], r"`data.tabular.columns` should name the file columns of "
                                                        r"\['timestamp'\]"),
    (["data.tabular.columns={user_id: u, item_id: i, timestamp: t, when: w}"],
     r"`data.tabular.columns` has unknown keys \['when'\]"),
    (["data.tabular.columns={user_id: u, item_id: i, timestamp: 3}"],
     r"`data.tabular.columns\['timestamp'\]` should be a non-empty column name"),
    (["data.tabular.item_features=[{name: x, kind: categorical}]"],
     r"`data.tabular.item_features` needs `data.tabular.item_table`"),
    (["data.tabular.user_table=u.csv", "data.tabular.user_features=[{name: x, kind: sequence}]"],
     r"`data.tabular.user_features\[0\]\['kind'\]` should be one of"),
])
def test_tabular_options_are_checked_when_the_config_is_loaded(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _tabular(*overrides)


def test_tabular_columns_are_required_for_the_tabular_sources_only():
    for source in ("csv", "parquet"):
        with pytest.raises(ConfigError, match=rf"`data.tabular.columns` is required for `data.source`='{source}'"):
            load_config(None, [f"data.source={source}", "data.path=logs"])
    assert load_config(None, ["data.source=bars", "data.path=d"]).data.tabular == {}
    assert _tabular("data.tabular.timestamp_format='%Y-%m-%d'").data.tabular["timestamp_format"] == "%Y-%m-%d"


def test_loading_and_checking_a_config_does_not_import_tensorflow():
    from conftest import python_subprocess

    proc = python_subprocess(
        "import sys\n"
        "from pipeline.config import load_config\n"
        "from pipeline.data.tabular import TabularOptions\n"
        "TabularOptions({'user_id': 'u', 'item_id': 'i', 'timestamp': 't'}, format='tsv')\n"
        "load_config(None, ['data.source=csv', 'data.path=x.tsv', 'data.tabular.columns={user_id: u, item_id: i, "
        "timestamp: t}'])\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n")
    assert proc.returncode == 0, proc.stderr


def test_the_file_name_decides_the_format_when_it_is_not_set(tmp_path):
    from pipeline.job import read_source

    path = tmp_path / "log.tsv"
    path.write_text("u\ti\tt\n1\ta\t10\n2\tb\t20\n")
    config = load_config(None, ["data.source=csv", f"data.path={path}",
                                "data.tabular.columns={user_id: u, item_id: i, timestamp: t}"])
    assert config.data.tabular["format"] == "tsv"
    raw = read_source(config)
    assert sum(len(c) for c in raw.interactions()) == 2 and raw.source.startswith("tsv:")
    assert _tabular().data.tabular == {"columns": {"user_id": "u", "item_id": "i", "timestamp": "t"}}
    assert "format" not in load_config(None, ["data.source=csv", "data.path=logs/part-*",
                                              "data.tabular.columns={user_id: u, item_id: i, timestamp: t}"]
                                       ).data.tabular
    explicit = load_config(None, ["data.source=csv", f"data.path={path}", "data.tabular.format=csv",
                                  "data.tabular.columns={user_id: u, item_id: i, timestamp: t}"])
    assert explicit.data.tabular["format"] == "csv"
    with pytest.raises(ValueError, match=r"looks like tsv from its name but format='csv'; set `format` "
                                         r"\(`data.tabular.format` in a run config\) to 'tsv'"):
        read_source(explicit)


@pytest.mark.parametrize("overrides,message", [
    (["evaluation.ks=[5]"], r"`promotion.metric` 'retrieval.recall@10' is measured at K=10, which is not among "
                            r"`evaluation.ks` \[5\]"),
    (["promotion.metric=retrieval.tail.ndcg@20"], r"K=20, which is not among `evaluation.ks` \[10, 50\]"),
    (["promotion.metric=retrieval.precision@5"], r"K=5, which is not among `evaluation.ks`"),
    (["promotion.metric=index.recall_vs_exact@100"], r"K=100, which is not among `evaluation.ks`"),
    (["promotion.metric=retrieval.tail.precision@10"], r"'retrieval.tail.precision@10' is not a metric the "
                                                       r"evaluation writes"),
    (["promotion.metric=recall@10"], r"'recall@10' cannot gate a promotion: it is not a metric the run writes"),
    (["promotion.metric=custom.score@7"], r"'custom.score@7' cannot gate a promotion: it is not a metric"),
    (["promotion.metric=ranker.log_loss"], r"'ranker.log_loss' cannot gate a promotion: lower is better for it"),
    (["promotion.metric=preranker.latency_ms_median"], r"lower is better for it"),
    (["promotion.metric=ranker.auc", "ranker.enabled=false"], r"'ranker.auc' is written by the ranker stage, "
                                                              r"which `ranker.enabled=false` turns off"),
    (["promotion.metric=preranker.gauc", "ranker.enabled=false"], r"`ranker.enabled=false` turns off"),
    (["promotion.metric=preranker.auc", "preranker.enabled=false"], r"`preranker.enabled=false` turns off"),
])
def test_promotion_metric_must_be_one_the_evaluation_writes(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("metric", ["retrieval.recall@50", "retrieval.tail.recall@10", "index.ndcg@50",
                                    "baseline.popularity.recall@10", "ranker.auc", "ranker.gauc",
                                    "preranker.auc", "preranker.gauc"])
def test_promotion_metrics_the_run_writes_load(metric):
    assert load_config(None, [f"promotion.metric={metric}"]).promotion.metric == metric


def test_cutoff_metrics_match_what_the_evaluation_writes():
    import os
    import re

    import pipeline
    from pipeline.config import CUTOFF_METRICS

    with open(os.path.join(os.path.dirname(pipeline.__file__), "evaluation.py"), encoding="utf-8") as f:
        written = re.findall(r'metrics\[f"([a-z_.]+)\.([a-z_]+)@\{k\}"\]', f.read())
    assert written
    found = {}
    for prefix, name in written:
        found.setdefault(prefix, []).append(name)
    assert {p: sorted(n) for p, n in found.items()} == {p: sorted(n) for p, n in CUTOFF_METRICS.items()}


def test_predefined_split_needs_a_source_that_brings_one():
    for source in ("csv", "parquet", "movielens", "movielens_tfds", "synthetic"):
        extra = ["data.tabular.columns={user_id: u, item_id: i, timestamp: t}"] if source in ("csv", "parquet") else []
        with pytest.raises(ConfigError, match=rf"`data.split.method` is 'predefined', but `data.source`='{source}' "
                                              "brings no split of its own"):
            load_config(None, [f"data.source={source}", "data.path=x", "data.split.method=predefined", *extra])
    assert load_config(None, ["data.source=bars", "data.path=x", "data.split.method=predefined"])


def test_retrieval_settings_reach_the_model():
    """Each `retrieval.*` key that is a `TwoTowerModel` setting arrives in the model `recfunnel run` builds."""
    from pipeline.job import build_retrieval_model
    from tiny_schema import SCHEMA, VOCABS

    values = {"embedding_dim": 6, "feature_dim": 5, "hidden_units": [7], "normalize": False, "temperature": 0.7,
              "dropout": 0.1, "embedding_l2": 0.02, "query_dropout": 0.3, "history_pooling": "attention",
              "remove_accidental_hits": False}
    config = load_config(None, [f"retrieval.{k}={v}".replace("False", "false") for k, v in values.items()])
    model = build_retrieval_model(config, SCHEMA, VOCABS, None, {"price": [1.0, 2.0]})
    built = model.get_config()
    assert {k: built[k] for k in values} == values
    assert built["numeric_stats"] == {"price": [1.0, 2.0]}


def test_logq_weight_needs_the_softmax_with_its_correction():
    with pytest.raises(ConfigError, match="logq_correction=false turns off. Received: logq_correction=false, "
                                          "logq_weight=1.5"):
        load_config(None, ["retrieval.logq_correction=false", "retrieval.logq_weight=1.5"])
    with pytest.raises(ConfigError, match="loss=ccl has no logQ correction"):
        load_config(None, ["retrieval.loss=ccl", "retrieval.logq_weight=0.5"])
    assert load_config(None, ["retrieval.logq_weight=1.25"]).retrieval.logq_weight == 1.25


def test_a_logq_weight_above_one_with_the_tail_task_warns(caplog):
    from pipeline.job import build_retrieval_model
    from tiny_schema import SCHEMA, VOCABS

    for weight, warned in ((1.25, True), (1.0, False)):
        caplog.clear()
        config = load_config(None, ["retrieval.ssl_weight=0.5", "retrieval.ssl_masking=random",
                                    "retrieval.ssl_items=batch", f"retrieval.logq_weight={weight}"])
        build_retrieval_model(config, SCHEMA, VOCABS, None, {"price": [1.0, 2.0]})
        assert ("lowers the recall of tail items" in caplog.text) == warned, weight


def test_retrieval_loss_settings_reach_the_task():
    """Each `retrieval.*` key that is a `CrossBatchRetrieval` setting arrives in the task `recfunnel run` builds."""
    from pipeline.job import retrieval_task

    values = {"memory_size": 9, "warmup_steps": 4, "num_hard_negatives": 3, "drift_correction": "none",
              "item_gradient": "all", "logq_weight": 1.5, "temperature": 0.2, "remove_accidental_hits": False}
    config = load_config(None, ["retrieval.negatives=cbns"] + [f"retrieval.{k}={v}".replace("False", "false")
                                                               for k, v in values.items()])
    built = retrieval_task(config).get_config()
    assert {k: built[k] for k in values} == values
    ccl = {"margin": 0.5, "negative_weight": 10.0, "ccl_negatives": "uniform"}
    config = load_config(None, ["retrieval.loss=ccl", "retrieval.negatives=mixed", "retrieval.num_mixed_negatives=4",
                                *(f"retrieval.ccl_{k.replace('ccl_', '')}={v}" for k, v in ccl.items())])
    built = retrieval_task(config).get_config()
    assert {k: built[k] for k in ccl} == ccl and built["loss"] == "ccl"


@pytest.mark.parametrize("overrides,message", [
    (["retrieval.loss=ccl", "retrieval.ccl_negatives=uniform", "retrieval.num_mixed_negatives=100"],
     r"set `retrieval.loss=ccl` and `retrieval.negatives=mixed`.*Received: loss=ccl, negatives=inbatch"),
    (["retrieval.warmup_steps=100"], r"`retrieval.warmup_steps` delays the memory bank, and there is none.*"
                                     r"Received: memory_size=0, warmup_steps=100"),
    (["retrieval.negatives=cbns", "retrieval.memory_size=64", "retrieval.num_mixed_negatives=8"],
     r"`retrieval.num_mixed_negatives` draws uniform negatives, which only negatives=mixed uses.*"
     r"Received: negatives=cbns, num_mixed_negatives=8"),
])
def test_retrieval_settings_that_would_be_ignored_are_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_mixed_negatives_with_a_bank_take_a_warmup():
    r = load_config(None, ["retrieval.negatives=mixed", "retrieval.num_mixed_negatives=8", "retrieval.memory_size=64",
                           "retrieval.warmup_steps=10"]).retrieval
    assert (r.negatives, r.num_mixed_negatives, r.memory_size, r.warmup_steps) == ("mixed", 8, 64, 10)


def test_the_generator_history_length_follows_data_history_length():
    assert load_config(None, ["data.history_length=7"]).data.synthetic.history_length == 7
    assert load_config(None, []).data.synthetic.history_length == 20
    with pytest.raises(ConfigError, match=r"`data.synthetic.history_length` follows `data.history_length`: set "
                                          r"that instead. Received: data.synthetic.history_length=50, "
                                          r"data.history_length=20"):
        load_config(None, ["data.synthetic.history_length=50"])


@pytest.mark.parametrize("raw,value", [("1e-3", 0.001), ("5e-4", 0.0005), ("1.5E9", 1.5e9), (".5", 0.5), ("3", 3),
                                       ("off", "off"), ("yes", "yes"), ("true", True), ("%Y-%m-%d", "%Y-%m-%d"),
                                       ("[1e-3, 2]", [0.001, 2])])
def test_override_values_are_read_as_yaml_1_2(raw, value):
    assert parse_override(f"a.b={raw}") == ("a.b", value)


def test_scientific_notation_sets_a_number_in_files_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("retrieval:\n  learning_rate: 1e-3\n")
    assert load_config(str(path), []).retrieval.learning_rate == 0.001
    assert load_config(None, ["retrieval.learning_rate=5e-4"]).retrieval.learning_rate == 0.0005


def test_a_duplicate_key_in_a_config_file_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("retrieval:\n  epochs: 3\nranker:\n  epochs: 2\nretrieval:\n  batch_size: 128\n")
    with pytest.raises(ConfigError, match=rf"^{path}: not valid YAML: duplicate key 'retrieval' \(first on line 1\)"):
        load_config(str(path), [])


def test_a_section_with_every_key_commented_out_is_empty(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("retrieval:\n  # epochs: 3\ndata:\n  source: synthetic\n  tabular:\n")
    assert load_config(str(path), []).retrieval.epochs == RetrievalConfig().epochs
    assert load_config(str(path), ["retrieval.epochs=3"]).retrieval.epochs == 3


def test_tabular_options_with_another_source_are_an_error():
    with pytest.raises(ConfigError, match=r"^--set data.tabular.bogus=1: `data.tabular` holds the options of the csv "
                                          r"and parquet sources, and `data.source` is 'synthetic'"):
        load_config(None, ["data.tabular.bogus=1"])
