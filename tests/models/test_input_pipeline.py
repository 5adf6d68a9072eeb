import os

import pytest

from models import data_layout as layout
from models.features import Schema
from models.input_pipeline import example_dataset


def test_batches_have_the_tower_layout(tiny_data_dir):
    schema = Schema.load(os.path.join(tiny_data_dir, layout.SCHEMA_FILE))
    files = layout.example_files(tiny_data_dir, "train")
    batch = next(iter(example_dataset(files, schema, 32, seed=1)))
    assert batch["user_id"].shape == (32,)
    assert batch["history"].shape == (32, schema.feature("history").max_length)
    assert batch["tags"].shape == (32, schema.feature("tags").max_length)


def test_positives_only_keeps_full_batches_of_positives(tiny_data_dir):
    schema = Schema.load(os.path.join(tiny_data_dir, layout.SCHEMA_FILE))
    files = layout.example_files(tiny_data_dir, "train")
    ds = example_dataset(files, schema, 16, shuffle=False, positives_only=True)
    sizes = []
    for b in ds:
        assert (b["label"].numpy() > 0).all()
        sizes.append(int(b["label"].shape[0]))
    everything = sum(int((b["label"].numpy() > 0).sum()) for b in example_dataset(files, schema, 64, shuffle=False))
    assert sum(sizes) == everything
    assert all(s == 16 for s in sizes[:-1])


def test_argument_errors(tiny_data_dir):
    schema = Schema.load(os.path.join(tiny_data_dir, layout.SCHEMA_FILE))
    with pytest.raises(ValueError, match="batch_size"):
        example_dataset(["x"], schema, 0)
    with pytest.raises(ValueError, match="empty"):
        example_dataset([], schema, 8)


def _ids(ds):
    return [x for b in ds for x in b["item_id"].numpy().tolist()]


def test_epoch_orders_depend_on_the_seed_and_epoch_alone(tiny_data_dir):
    from models.tf_compat import tf

    schema = Schema.load(os.path.join(tiny_data_dir, layout.SCHEMA_FILE))
    files = layout.example_files(tiny_data_dir, "train")
    epoch = tf.Variable(0, dtype=tf.int64)
    tf.random.set_seed(11)
    want = tf.random.uniform([4]).numpy()
    tf.random.set_seed(11)
    ds = example_dataset(files, schema, 32, seed=3, shuffle_buffer=100, epoch=lambda: epoch.read_value())
    first = _ids(ds)
    assert (tf.random.uniform([4]).numpy() == want).all()   # the pass's own graph seed stays inside it
    assert _ids(ds) == first                      # the same epoch: the same order
    epoch.assign(1)
    second = _ids(ds)
    assert second != first and sorted(second) == sorted(first)   # another epoch: another order, same rows
    # A new dataset (a resumed run) at epoch 1 yields epoch 1's order, not the first pass of a sequence.
    resumed = example_dataset(files, schema, 32, seed=3, shuffle_buffer=100, epoch=lambda: epoch.read_value())
    assert _ids(resumed) == second
    other_seed = example_dataset(files, schema, 32, seed=4, shuffle_buffer=100, epoch=lambda: epoch.read_value())
    assert _ids(other_seed) != second
    # Without `epoch`, every pass draws the next order of the dataset's own sequence.
    plain = example_dataset(files, schema, 32, seed=3, shuffle_buffer=100)
    assert _ids(plain) != _ids(plain)


def test_num_rows_declares_the_batches_and_a_wrong_count_fails(tiny_data_dir):
    from models.tf_compat import tf

    schema = Schema.load(os.path.join(tiny_data_dir, layout.SCHEMA_FILE))
    files = layout.example_files(tiny_data_dir, "train")
    rows = sum(int(b["label"].shape[0]) for b in example_dataset(files, schema, 64, shuffle=False,
                                                                   positives_only=True))
    ds = example_dataset(files, schema, 16, seed=1, positives_only=True, num_rows=rows)
    assert int(ds.cardinality()) == -(-rows // 16) == len(list(ds))
    dropped = example_dataset(files, schema, 16, seed=1, positives_only=True, num_rows=rows, drop_remainder=True)
    assert int(dropped.cardinality()) == rows // 16 == len(list(dropped))
    wrong = example_dataset(files, schema, 16, seed=1, positives_only=True, num_rows=rows + 16)
    expected = f"expected to contain {-(-(rows + 16) // 16)} elements but contained only {-(-rows // 16)} "
    with pytest.raises(tf.errors.FailedPreconditionError, match=expected):
        list(wrong)


def test_epoch_and_num_rows_argument_errors(tiny_data_dir):
    schema = Schema.load(os.path.join(tiny_data_dir, layout.SCHEMA_FILE))
    files = layout.example_files(tiny_data_dir, "train")
    with pytest.raises(ValueError, match="num_rows"):
        example_dataset(files, schema, 8, num_rows=-1)
    with pytest.raises(ValueError, match="seed"):
        example_dataset(files, schema, 8, epoch=lambda: 0)
    with pytest.raises(ValueError, match="shuffle"):
        example_dataset(files, schema, 8, shuffle=False, seed=1, epoch=lambda: 0)
