"""`models.distribution`: TF_CONFIG checks, the chief, strategy selection."""

import json

import pytest

from models import distribution
from models.tf_compat import tf

CLUSTER = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}


def _tf_config(task_type="worker", index=0, cluster=CLUSTER):
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


def test_parse_tf_config_accepts_a_worker_of_the_cluster():
    assert distribution.parse_tf_config(_tf_config(index=1))["task"] == {"type": "worker", "index": 1}


@pytest.mark.parametrize("text, match", [
    (None, "TF_CONFIG unset"),
    ("{not json", "should be JSON"),
    (json.dumps({"task": {"type": "worker", "index": 0}}), "cluster.worker"),
    (json.dumps({"cluster": CLUSTER}), "task.type and task.index"),
    (_tf_config(index=2), "is not in the cluster"),
    (_tf_config(task_type="ps"), "is not in the cluster"),
    (_tf_config(index=None), "task.index should be an integer"),
    (_tf_config(index="x"), "task.index should be an integer"),
    (_tf_config(index=1.9), "task.index should be an integer"),
])
def test_parse_tf_config_names_the_problem(text, match):
    with pytest.raises(ValueError, match=match):
        distribution.parse_tf_config(text)


def test_is_chief():
    assert distribution.is_chief("")  # no cluster: this process is the whole job
    assert distribution.is_chief(_tf_config(index=0))
    assert not distribution.is_chief(_tf_config(index=1))
    with_chief = {"chief": ["127.0.0.1:3"], **CLUSTER}
    assert distribution.is_chief(_tf_config("chief", 0, with_chief))
    assert not distribution.is_chief(_tf_config("worker", 0, with_chief))


def test_create_strategy():
    with pytest.raises(ValueError, match="distribution='gpus'"):
        distribution.create_strategy("gpus")
    default = distribution.create_strategy("default")
    assert default is tf.distribute.get_strategy() and not distribution.needs_static_batches(default)
    mirrored = distribution.create_strategy("mirrored")
    assert isinstance(mirrored, tf.distribute.MirroredStrategy)
    assert mirrored.num_replicas_in_sync == len(tf.config.list_logical_devices("CPU"))


def test_multi_worker_without_tf_config_is_refused(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs the TF_CONFIG"):
        distribution.create_strategy("multi_worker")


def test_dataset_for_strategy_leaves_single_process_datasets_alone():
    ds = tf.data.Dataset.range(4).batch(2)
    assert distribution.dataset_for_strategy(ds, tf.distribute.get_strategy()) is ds
