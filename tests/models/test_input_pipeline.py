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
