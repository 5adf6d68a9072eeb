"""tf.data input pipelines over the materialized TFRecord shards."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from models.examples import parse_examples
from models.features import LABEL, Schema
from models.tf_compat import tf


def example_dataset(files: Sequence[str], schema: Schema, batch_size: int, *,
                    shuffle: bool = True, seed: Optional[int] = None,
                    positives_only: bool = False, repeat: bool = False,
                    shuffle_buffer: int = 50_000, drop_remainder: bool = False,
                    num_rows: Optional[int] = None,
                    epoch: Optional[Callable[[], tf.Tensor]] = None) -> tf.data.Dataset:
    """Batches of parsed examples: interleaved read → shuffle → batch → parse → prefetch.

    Args:
      files: TFRecord shards (GZIP) written by the materialization step.
      positives_only: keep rows with ``label > 0`` (retrieval trains on positives).
      drop_remainder: fixed batch shapes (needed by some distribution strategies).
      num_rows: the rows one pass yields (after `positives_only`), when known: the
        dataset then declares its number of batches, and a pass that yields another
        number fails. Keras then ends an epoch after its last batch instead of
        calling the training step once more to find the end (which counts one more
        optimizer iteration than there were steps).
      epoch: with `shuffle` and a `seed`, a function returning the 0-based epoch
        (int64 scalar tensor, e.g. read from a variable) when a pass starts: the
        pass's order is drawn from ``(seed, epoch)`` alone. Without it each new pass
        draws the next order of the dataset's own sequence, which starts again in a
        new process, so a resumed run would see the first epoch's order again.

    Returns:
      A dataset of dicts in the layout of `models.examples.parse_examples`.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` should be positive. Received: batch_size={batch_size}")
    if not files:
        raise ValueError("`files` is empty: no TFRecord shards to read.")
    if positives_only and not schema.has_label:
        raise ValueError(f"`positives_only` needs a label column, and schema {schema.name!r} has none.")
    if num_rows is not None and (isinstance(num_rows, bool) or int(num_rows) != num_rows or num_rows < 0):
        raise ValueError(f"`num_rows` should be an integer >= 0. Received: num_rows={num_rows!r}")
    if epoch is not None and not (shuffle and seed is not None):
        raise ValueError("`epoch` orders a shuffled pass from (seed, epoch): it needs `shuffle` and a `seed`.")
    if epoch is None:
        ds = _records(files, shuffle, seed, shuffle_buffer, reshuffle=True)
    else:
        def one_pass(_):
            # The pass's seeds come from `seed` and the epoch alone: this function's graph-level
            # seed is fixed (with a graph seed of 0 TensorFlow would test the tensor seed as a bool).
            tf.random.set_seed(_PASS_GRAPH_SEED)
            return _records(files, True, _epoch_seed(seed, epoch()), shuffle_buffer, reshuffle=False)

        # One element, expanded into the pass when the pass starts: `epoch()` is read then.
        ds = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).flat_map(one_pass)
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
    if num_rows is not None and not repeat:
        ds = ds.apply(tf.data.experimental.assert_cardinality(num_batches(num_rows, batch_size, drop_remainder)))
    return ds.prefetch(tf.data.AUTOTUNE)


def num_batches(num_rows: int, batch_size: int, drop_remainder: bool = False) -> int:
    """Batches of `batch_size` that one pass over `num_rows` rows yields."""
    return num_rows // batch_size if drop_remainder else -(-num_rows // batch_size)


def _records(files: Sequence[str], shuffle: bool, seed, shuffle_buffer: int, reshuffle: bool) -> tf.data.Dataset:
    """Serialized records of one pass: the shards (shuffled) read four at a time, then
    shuffled in a buffer; `seed` is an int or an int64 scalar tensor."""
    ds = tf.data.Dataset.from_tensor_slices(list(files))
    if shuffle:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=reshuffle)
    ds = ds.interleave(lambda f: tf.data.TFRecordDataset(f, compression_type="GZIP"),
                       cycle_length=min(4, len(files)), num_parallel_calls=tf.data.AUTOTUNE,
                       deterministic=not shuffle or seed is not None)
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=reshuffle)
    return ds


_PASS_GRAPH_SEED = 1


def _epoch_seed(seed: int, epoch: tf.Tensor) -> tf.Tensor:
    """An int64 seed for the pass of `epoch`, distinct for every (seed, epoch) in range."""
    return tf.constant(int(seed) * 1_000_003, tf.int64) + tf.cast(epoch, tf.int64)
