import math

import numpy as np
import pytest
from conftest import python_subprocess

from models.learning_rate import EpochLearningRate, learning_rate_at
from models.tf_compat import keras, tf


def test_constant_and_step_rates_by_hand():
    assert [learning_rate_at(e, 0.01, "constant", 5) for e in range(5)] == [0.01] * 5
    rates = [learning_rate_at(e, 0.01, "step", 6, decay=0.1, boundaries=(2, 4)) for e in range(6)]
    assert rates == pytest.approx([0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001])


def test_cosine_runs_from_the_base_rate_to_its_fraction():
    # E = 5, d = 0.2: η·(0.2 + 0.8·½(1 + cos(π e/4))) = η·(1, 0.8828, 0.6, 0.3172, 0.2).
    rates = [learning_rate_at(e, 0.5, "cosine", 5, decay=0.2) for e in range(5)]
    half = 0.5 * (1 + math.cos(math.pi / 4))
    assert rates == pytest.approx([0.5, 0.5 * (0.2 + 0.8 * half), 0.5 * 0.6, 0.5 * (0.2 + 0.8 * (1 - half)), 0.1])
    assert learning_rate_at(0, 0.5, "cosine", 1, decay=0.2) == 0.5


@pytest.mark.parametrize("kwargs, message", [
    ({"schedule": "linear"}, "`schedule` should be one of constant, step, cosine. Received: 'linear'"),
    ({"epoch": -1}, "Received: epoch=-1"),
    ({"epochs": 0}, "epochs=0"),
    ({"schedule": "step", "decay": 0.0, "boundaries": (1,)}, r"`decay` should be in \(0, 1\].*decay=0.0"),
    ({"schedule": "cosine", "decay": -0.5}, "decay=-0.5"),
    ({"schedule": "cosine", "decay": 1.5}, "decay=1.5"),
    ({"schedule": "step", "boundaries": (2, 1)}, r"increasing epoch counts >= 1. Received: \[2, 1\]"),
    ({"schedule": "step", "boundaries": (0,)}, r"Received: \[0\]"),
])
def test_bad_arguments_name_the_value(kwargs, message):
    args = {"epoch": 0, "base": 0.1, "schedule": "constant", "epochs": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        learning_rate_at(**args)


class _Slope(keras.Model):
    """loss = w: each SGD step lowers w by exactly the learning rate."""

    def __init__(self):
        super().__init__()
        self.w = tf.Variable(0.0)

    def train_step(self, data):
        with tf.GradientTape() as tape:
            loss = self.w + 0.0 * tf.reduce_sum(data)
        self.optimizer.apply_gradients([(tape.gradient(loss, self.w), self.w)])
        return {"loss": loss}


def _fit(callback, initial_epoch=0, epochs=4):
    model = _Slope()
    model.compile(optimizer=keras.optimizers.SGD(1.0))
    ws = []
    record = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: ws.append(float(model.w.numpy())))
    data = tf.data.Dataset.from_tensors(tf.zeros([1]))  # one step per epoch
    history = model.fit(data, epochs=epochs, initial_epoch=initial_epoch, verbose=0, callbacks=[callback, record])
    return -np.diff([0.0, *ws]), history


def test_callback_trains_each_epoch_at_its_rate_and_logs_it():
    callback = EpochLearningRate(0.5, "step", 4, decay=0.1, boundaries=(1, 3))
    steps, history = _fit(callback)
    assert steps == pytest.approx([0.5, 0.05, 0.05, 0.005])
    assert history.history["learning_rate"] == pytest.approx([0.5, 0.05, 0.05, 0.005])


def test_a_resumed_run_starts_at_the_rate_of_its_epoch():
    steps, _ = _fit(EpochLearningRate(0.5, "cosine", 5, decay=0.0), initial_epoch=2, epochs=5)
    assert steps == pytest.approx([0.25, 0.5 * 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0], abs=1e-7)


def test_callback_rejects_bad_arguments_when_built():
    with pytest.raises(ValueError, match="`schedule` should be one of"):
        EpochLearningRate(0.1, "warmup", 3)


def test_the_rate_reaches_every_replica():
    """Under MirroredStrategy on 2 logical CPUs the scheduled rate moves both replicas' copies."""
    code = """
import models.tf_compat
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from models.learning_rate import EpochLearningRate
from models.tf_compat import keras
strategy = tf.distribute.MirroredStrategy()
with strategy.scope():
    model = keras.Sequential([keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=lambda y, p: tf.reduce_sum(p))
x = tf.ones([4, 1])
model.fit(x, x, batch_size=4, epochs=3, verbose=0, callbacks=[EpochLearningRate(0.5, "step", 3, 0.1, (1, 2))])
values = [v.numpy().item() for v in strategy.experimental_local_results(model.layers[0].kernel)]
print(len(values), *values)
"""
    proc = python_subprocess(code, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Each replica's loss sums its 2 examples of x = 1 (gradient 2), Keras divides it by the 2
    # replicas and the replicas' gradients add: 2 per step; steps at 0.5, 0.05, 0.005 move w by
    # -(1 + 0.1 + 0.01) (-3 at a constant 0.5).
    replicas, *values = proc.stdout.split()
    assert int(replicas) == 2 and [float(v) for v in values] == pytest.approx([-1.11, -1.11])
