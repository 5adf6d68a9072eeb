"""The tf.Example format of training examples, both directions, derived from the schema.

One example is one interaction, denormalized: the user's features (with the
behaviour sequence as it was before the event), the item's features, and the
interaction columns ``timestamp`` and, as the schema announces, ``rating`` and
``label``. Writing (`encode_example`) and reading (`parse_examples`) live together
so the two can never disagree.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from models.features import LABEL, RATING, TIMESTAMP, Kind, Schema, pad_values
from models.tf_compat import tf


def _bytes_feature(values) -> "tf.train.Feature":
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v.encode("utf-8") for v in values]))


def encode_side(schema: Schema, side: str, row: Mapping[str, Any]) -> bytes:
    """Serialized `tf.train.Features` of one user's or item's static features.

    Sequence features are not static and are left out (see `encode_event`).
    """
    feats: Dict[str, tf.train.Feature] = {}
    for f in schema.side(side):
        if f.kind == Kind.SEQUENCE:
            continue
        if f.kind == Kind.CATEGORICAL:
            feats[f.name] = _bytes_feature([row[f.name]])
        elif f.kind == Kind.MULTI_CATEGORICAL:
            feats[f.name] = _bytes_feature(list(row[f.name])[:f.max_length])
        else:
            feats[f.name] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(row[f.name])]))
    return tf.train.Features(feature=feats).SerializeToString()


def encode_event(schema: Schema, history, timestamp: int, rating: Optional[float] = None,
                 label: Optional[float] = None) -> bytes:
    """Serialized `tf.train.Features` of the per-event part of an example."""
    feats: Dict[str, tf.train.Feature] = {}
    seq = schema.sequence_feature
    if seq is not None:
        feats[seq.name] = _bytes_feature(list(history)[-seq.max_length:])
    feats[TIMESTAMP] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(timestamp)]))
    if schema.has_rating:
        feats[RATING] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(rating)]))
    if schema.has_label:
        feats[LABEL] = tf.train.Feature(float_list=tf.train.FloatList(value=[float(label)]))
    return tf.train.Features(feature=feats).SerializeToString()


def join_example(*features_parts: bytes) -> bytes:
    """Serialized `tf.train.Example` from serialized `Features` parts with disjoint keys.

    Protocol buffers merge concatenated messages, and a map field's entries are
    repeated fields, so the concatenation of serialized `Features` is the serialized
    union; the `Example` wraps it as field 1 (length-delimited). This lets the
    materializer serialize each user and item once instead of once per interaction.
    """
    body = b"".join(features_parts)
    n = len(body)
    varint = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            varint.append(byte | 0x80)
        else:
            varint.append(byte)
            break
    return b"\x0a" + bytes(varint) + body


def encode_example(schema: Schema, user: Mapping[str, Any], item: Mapping[str, Any],
                   history, timestamp: int, rating: Optional[float] = None,
                   label: Optional[float] = None) -> bytes:
    """Serializes one interaction.

    Args:
      user: user table row (canonical values, see `models.features.normalize_value`).
      item: item table row.
      history: item ids of the user's behaviour sequence before the event, oldest first.
    """
    return join_example(encode_side(schema, "user", user), encode_side(schema, "item", item),
                        encode_event(schema, history, timestamp, rating, label))


def parsing_spec(schema: Schema) -> Dict[str, Any]:
    """The `tf.io.parse_example` spec for examples written by `encode_example`."""
    spec: Dict[str, Any] = {}
    for f in schema.features:
        if f.kind == Kind.CATEGORICAL:
            spec[f.name] = tf.io.FixedLenFeature([], tf.string)
        elif f.kind == Kind.NUMERIC:
            spec[f.name] = tf.io.FixedLenFeature([], tf.float32)
        else:
            spec[f.name] = tf.io.RaggedFeature(tf.string)
    spec[TIMESTAMP] = tf.io.FixedLenFeature([], tf.int64)
    if schema.has_rating:
        spec[RATING] = tf.io.FixedLenFeature([], tf.float32)
    if schema.has_label:
        spec[LABEL] = tf.io.FixedLenFeature([], tf.float32)
    return spec


def parse_examples(schema: Schema, serialized: tf.Tensor) -> Dict[str, tf.Tensor]:
    """Parses a batch of serialized examples into the towers' dense input layout.

    Returns:
      dict name -> tensor; categorical ``[B]`` string, multi-valued and sequence
      ``[B, max_length]`` string padded with ``""``, numeric ``[B]`` float32,
      ``timestamp`` ``[B]`` int64, ``rating``/``label`` ``[B]`` float32.
    """
    parsed = tf.io.parse_example(serialized, parsing_spec(schema))
    out = {}
    for name, value in parsed.items():
        if isinstance(value, tf.RaggedTensor):
            f = schema.feature(name)
            # Sequences keep their most recent items (they are written oldest first).
            if f.kind == Kind.SEQUENCE:
                value = value[:, -f.max_length:]
            else:
                value = value[:, :f.max_length]
            value = value.to_tensor(default_value="", shape=[None, f.max_length])
        out[name] = value
    return out


__all__ = ["encode_example", "encode_side", "encode_event", "join_example", "parsing_spec", "parse_examples",
           "pad_values"]
