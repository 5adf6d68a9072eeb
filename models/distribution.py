"""`tf.distribute` strategies for retrieval training, chosen by name.

``distribution`` selects how many model replicas train in lockstep:

- ``default``: TensorFlow's default strategy (one replica on the default device; the
  scope is a no-op). Training is exactly what it is without any strategy.
- ``mirrored``: `tf.distribute.MirroredStrategy`, one replica per visible GPU, or per
  logical CPU device on a machine without GPU (one unless the process split its CPU
  with `tf.config.set_logical_device_configuration` before TensorFlow initialized).
- ``multi_worker``: `tf.distribute.MultiWorkerMirroredStrategy`, synchronous training
  over several processes/machines described by the ``TF_CONFIG`` environment variable::

      TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]},
                  "task": {"type": "worker", "index": 0}}'

  Every worker runs the same program; worker 0 (or the ``chief`` task, when the
  cluster has one) is the chief. TensorFlow sets up collective ops once per process
  and before any other TensorFlow work, so the strategy must be created first, and
  only once: `create_strategy` returns the same object on later calls.

Batch semantics under a strategy with R replicas: the dataset's batch size is the
*global* batch; each replica gets batch/R examples, computes its loss on them, and
the replicas' gradients are summed. With in-batch negatives every replica's softmax
therefore sees only its *local* batch (batch/R candidates, not batch): R replicas
with global batch B train like one replica with B/R negatives per row and B rows per
step. A cross-batch memory bank (`models.cross_batch_memory.CrossBatchMemory`)
all-gathers the global batch, so every replica reads the same bank of the last M
items. Replicas need static, equal batches: build the dataset with
``drop_remainder=True`` when `needs_static_batches` says so (the last partial batch of
an epoch is dropped; shuffling changes which examples that is). Across workers
`dataset_for_strategy` shards by data: each worker reads every file and keeps its
share of every global batch (the tf.Example shards are too few to split by file).

References:
  TensorFlow guide, "Distributed training with TensorFlow" and "Multi-worker training
  with Keras" (tensorflow.org/guide/distributed_training).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from models.tf_compat import tf

DISTRIBUTIONS = ("default", "mirrored", "multi_worker")
TF_CONFIG = "TF_CONFIG"

# The one MultiWorkerMirroredStrategy of this process (TensorFlow configures collective
# ops once per process).
_MULTI_WORKER: Dict[str, Any] = {}


def replica_devices() -> List[str]:
    """Devices of the ``mirrored`` replicas: every GPU, else every logical CPU device."""
    gpus = tf.config.list_logical_devices("GPU")
    devices = gpus or tf.config.list_logical_devices("CPU")
    return [d.name for d in devices]


def parse_tf_config(text: Optional[str]) -> Dict[str, Any]:
    """The ``TF_CONFIG`` of a multi-worker job, checked.

    Returns:
      ``{"cluster": {task type: [address, ...]}, "task": {"type", "index"}}``.

    Raises:
      ValueError: missing, not JSON, or the task is not in the cluster.
    """
    if not text:
        raise ValueError("distribution='multi_worker' needs the TF_CONFIG environment variable, e.g. "
                         '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                         '"task": {"type": "worker", "index": 0}}. Received: TF_CONFIG unset')
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"TF_CONFIG should be JSON ({err}). Received: TF_CONFIG={text!r}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not cluster.get("worker") and not cluster.get("chief"):
        raise ValueError(f"TF_CONFIG should have cluster.worker (a list of host:port). Received: TF_CONFIG={text!r}")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise ValueError(f"TF_CONFIG should have task.type and task.index. Received: TF_CONFIG={text!r}")
    if isinstance(task["index"], bool) or not isinstance(task["index"], int):
        raise ValueError(f"TF_CONFIG task.index should be an integer. Received: TF_CONFIG={text!r}")
    members = cluster.get(task["type"])
    if not isinstance(members, list) or not 0 <= task["index"] < len(members):
        raise ValueError(f"TF_CONFIG task {task} is not in the cluster {cluster}. Received: TF_CONFIG={text!r}")
    return config


def is_chief(tf_config: Optional[str] = None) -> bool:
    """Whether this process is the chief: always without ``TF_CONFIG``; else the
    ``chief`` task, or worker 0 of a cluster without one."""
    text = os.environ.get(TF_CONFIG) if tf_config is None else tf_config
    if not text:
        return True
    config = parse_tf_config(text)
    task_type, index = config["task"]["type"], int(config["task"]["index"])
    if "chief" in config["cluster"]:
        return task_type == "chief"
    return task_type == "worker" and index == 0


def create_strategy(distribution: str) -> tf.distribute.Strategy:
    """The strategy named by `distribution` (one of `DISTRIBUTIONS`).

    Create it before any other TensorFlow work of the process (``multi_worker``
    requires it; see the module docstring).

    Raises:
      ValueError: unknown `distribution`, or a missing/invalid ``TF_CONFIG``.
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"`distribution` should be one of {DISTRIBUTIONS}. Received: distribution={distribution!r}")
    if distribution == "default":
        return tf.distribute.get_strategy()
    if distribution == "mirrored":
        return tf.distribute.MirroredStrategy(replica_devices())
    text = os.environ.get(TF_CONFIG)
    parse_tf_config(text)
    if TF_CONFIG in _MULTI_WORKER:
        if _MULTI_WORKER[TF_CONFIG] != text:
            raise ValueError("This process already created a MultiWorkerMirroredStrategy for another TF_CONFIG; "
                             f"TensorFlow allows one per process. Received: TF_CONFIG={text!r}")
        return _MULTI_WORKER["strategy"]
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    _MULTI_WORKER.update({TF_CONFIG: text, "strategy": strategy})
    return strategy


def cross_replica_sum(value: tf.Tensor) -> tf.Tensor:
    """`value` summed over the replicas in sync (itself outside a multi-replica step)."""
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)
    return value


def needs_static_batches(strategy: tf.distribute.Strategy) -> bool:
    """Whether batches must all have the same size (``drop_remainder=True``): with
    more than one replica, so every replica gets batch/R examples every step."""
    return strategy.num_replicas_in_sync > 1


def dataset_for_strategy(dataset: tf.data.Dataset, strategy: tf.distribute.Strategy) -> tf.data.Dataset:
    """`dataset` (batched by the global batch) with the options `strategy` needs.

    Across workers it is sharded by data: every worker reads every file and keeps
    its replicas' part of each global batch, so the workers' shuffles must agree
    (a seeded dataset does).
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return dataset
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)
