"""tf.data input pipelines over the materialized TFRecord shards."""

from __future__ import annotations

from typing import Optional, Sequence

from models.examples import parse_examples
from models.features import LABEL, Schema
from models.tf_compat import tf


def example_dataset(files: Sequence[str], schema: Schema, batch_size: int, *,
                    shuffle: bool = True, seed: Optional[int] = None,
                    positives_only: bool = False, repeat: bool = False,
                    shuffle_buffer: int = 50_000, drop_remainder: bool = False) -> tf.data.Dataset:
    """Batches of parsed examples: interleaved read → shuffle → batch → parse → prefetch.

    Args:
      files: TFRecord shards (GZIP) written by the materialization step.
      positives_only: keep rows with ``label > 0`` (retrieval trains on positives).
      drop_remainder: fixed batch shapes (needed by some distribution strategies).

    Returns:
      A dataset of dicts in the layout of `models.examples.parse_examples`.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` should be positive. Received: batch_size={batch_size}")
    if not files:
        raise ValueError("`files` is empty: no TFRecord shards to read.")
    if positives_only and not schema.has_label:
        raise ValueError(f"`positives_only` needs a label column, and schema {schema.name!r} has none.")
    ds = tf.data.Dataset.from_tensor_slices(list(files))
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"),
                       cycle_length=min(4, len(files)), num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=not shuffle or seed is not None)
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if positives_only:
        # Parse in vectorized blocks, drop negatives, then re-batch so every batch
        # (except perhaps the last) has exactly `batch_size` positives.
        ds = ds.batch(1024).map(lambda x: parse_examples(schema, x),
                                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

        def _keep(batch):
            mask = batch[LABEL] > 0
            return {k: tf.boolean_mask(v, mask) for k, v in batch.items()}

        ds = ds.map(_keep, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    else:
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        ds = ds.map(lambda x: parse_examples(schema, x), num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)
