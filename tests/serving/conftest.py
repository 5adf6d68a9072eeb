"""Serving fixtures: a workdir with test-only exports, written in seconds without training.

The query/item towers and the (pre-)ranker are small `tf.Module`s over hashed
features with the exact signatures of the real exports:

* towers: ``serving_default(**features of one side) -> {"embedding": [B, D]}``;
* scorers: ``serving_default(**every schema feature) -> {"scores": [N], "logits": [N]}``
  with user features ``[1]`` / ``[1, L]`` (broadcast to the N candidates) and item
  features ``[N]`` / ``[N, L]``; logit = <sum of the user's hashed feature vectors,
  sum of the item's>. By default they also have ``score_users``, ``encode_items``
  (item features → hash bucket + 1, 0 for padding) and ``score_users_encoded``, as
  the real exports do; ``legacy=True`` leaves those out (the exports of older versions).
"""

import os
import shutil

import numpy as np
import pytest

from models.features import Kind, Schema, padded_batch
from models.tf_compat import tf

BUCKETS = 97


def _hashed_vectors(features, schema, side, table):
    """``[B, D]``: sum over the side's features of their (mean) hashed vectors."""
    total = 0.0
    for f in schema.side(side):
        x = features[f.name]
        if f.kind == Kind.NUMERIC:
            total += x[:, tf.newaxis] * table[0][tf.newaxis, :]
            continue
        ids = tf.strings.to_hash_bucket_fast(tf.strings.join([f.name + "=", x]), BUCKETS)
        vectors = tf.gather(table, ids)
        if f.kind == Kind.CATEGORICAL:
            total += vectors
        else:
            mask = tf.cast(tf.not_equal(x, ""), tf.float32)[..., tf.newaxis]
            total += tf.reduce_sum(vectors * mask, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)
    return total


class HashedTower(tf.Module):
    """A tower: hashed features of one side → ``embedding [B, dim]`` (L2-normalised)."""

    def __init__(self, schema: Schema, side: str, dim: int = 8, seed: int = 0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.table = tf.Variable(rng.normal(size=(BUCKETS, dim)).astype(np.float32), trainable=False)
        self._schema_json = schema.to_dict()
        schema_obj, table = schema, self.table

        @tf.function(input_signature=[schema.tensor_specs(side)])
        def embed(features):
            v = _hashed_vectors(features, schema_obj, side, table)
            return {"embedding": tf.math.l2_normalize(v, axis=-1)}

        self._embed = embed
        self.serving = tf.function(lambda **features: embed(features)).get_concrete_function(
            **schema.tensor_specs(side))


class HashedScorer(tf.Module):
    """A ranker/pre-ranker with the export signature: ``scores = sigmoid(<u, v>)``."""

    def __init__(self, schema: Schema, dim: int = 8, seed: int = 1):
        super().__init__()
        rng = np.random.default_rng(seed)
        # Small entries keep the logits in sigmoid's unsaturated range (no ties at 1.0).
        self.user_table = tf.Variable(0.2 * rng.normal(size=(BUCKETS, dim)).astype(np.float32), trainable=False)
        self.item_table = tf.Variable(0.2 * rng.normal(size=(BUCKETS, dim)).astype(np.float32), trainable=False)
        user_specs, item_specs = schema.tensor_specs("user"), schema.tensor_specs("item")
        schema_obj = schema

        def score(**features):
            u = _hashed_vectors({k: features[k] for k in user_specs}, schema_obj, "user", self.user_table)
            v = _hashed_vectors({k: features[k] for k in item_specs}, schema_obj, "item", self.item_table)
            logits = tf.reduce_sum(u * v, axis=-1)  # [1, D] broadcast against [N, D]
            return {"scores": tf.sigmoid(logits), "logits": logits}

        self.serving = tf.function(score).get_concrete_function(**user_specs, **item_specs)
        index_spec = {"user_index": tf.TensorSpec([None], tf.int32, name="user_index")}

        def score_users(**features):
            u = _hashed_vectors({k: features[k] for k in user_specs}, schema_obj, "user", self.user_table)
            v = _hashed_vectors({k: features[k] for k in item_specs}, schema_obj, "item", self.item_table)
            logits = tf.reduce_sum(tf.gather(u, features["user_index"]) * v, axis=-1)
            return {"scores": tf.sigmoid(logits), "logits": logits}

        def encode_items(**features):
            out = {}
            for f in schema_obj.item_features:
                x = features[f.name]
                if f.kind == Kind.NUMERIC:
                    out[f.name] = x
                else:
                    bucket = tf.strings.to_hash_bucket_fast(tf.strings.join([f.name + "=", x]), BUCKETS)
                    out[f.name] = tf.where(tf.equal(x, ""), 0, tf.cast(bucket, tf.int32) + 1)
            return out

        def score_users_encoded(**features):
            u = _hashed_vectors({k: features[k] for k in user_specs}, schema_obj, "user", self.user_table)
            v = 0.0
            for f in schema_obj.item_features:
                x = features[f.name]
                if f.kind == Kind.NUMERIC:
                    v += x[:, tf.newaxis] * self.item_table[0][tf.newaxis, :]
                    continue
                vectors = tf.gather(self.item_table, tf.maximum(x - 1, 0))
                if f.kind == Kind.CATEGORICAL:
                    v += vectors
                else:
                    mask = tf.cast(x > 0, tf.float32)[..., tf.newaxis]
                    v += tf.reduce_sum(vectors * mask, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)
            logits = tf.reduce_sum(tf.gather(u, features["user_index"]) * v, axis=-1)
            return {"scores": tf.sigmoid(logits), "logits": logits}

        encoded_specs = {k: tf.TensorSpec(v.shape, tf.int32 if v.dtype == tf.string else v.dtype, name=k)
                         for k, v in item_specs.items()}
        self.all_signatures = {
            "serving_default": self.serving,
            "score_users": tf.function(score_users).get_concrete_function(**user_specs, **item_specs, **index_spec),
            "encode_items": tf.function(encode_items).get_concrete_function(**item_specs),
            "score_users_encoded": tf.function(score_users_encoded).get_concrete_function(
                **user_specs, **encoded_specs, **index_spec)}


def _save_atomic(module, path, signatures):
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tf.saved_model.save(module, tmp, signatures=signatures)
    os.rename(tmp, path)


def item_rows(data_dir):
    import pyarrow.parquet as pq

    return pq.read_table(os.path.join(data_dir, "items.parquet")).to_pylist()


def embed(signature, features):
    return signature(**{k: tf.constant(v) for k, v in features.items()})


def publish_version(workdir, version, *, tower_seed=0, index_kind="brute_force", preranker_seed=None,
                    ranker_seed=None, dim=8):
    """Writes query_tower, item_tower and index of `version` (index last, as the job does)."""
    from serving import exports
    from serving.index import IndexConfig, build_index, save_index

    data_dir = os.path.join(workdir, "data")
    schema = Schema.load(os.path.join(data_dir, "schema.json"))
    query = HashedTower(schema, "user", dim, seed=tower_seed)
    item = HashedTower(schema, "item", dim, seed=tower_seed + 100)
    for model, module in ((exports.QUERY_TOWER, query), (exports.ITEM_TOWER, item)):
        os.makedirs(exports.model_dir(workdir, model), exist_ok=True)
        _save_atomic(module, exports.version_path(workdir, model, version), {"serving_default": module.serving})
    rows = item_rows(data_dir)
    emb = embed(item.serving, padded_batch(schema, "item", rows))["embedding"].numpy()
    ids = [r["item_id"] for r in rows]
    module, params = build_index(emb, ids, IndexConfig(kind=index_kind))
    os.makedirs(exports.model_dir(workdir, exports.INDEX), exist_ok=True)
    save_index(module, params, exports.version_path(workdir, exports.INDEX, version),
               item_tower_version=str(version), embedding_dim=dim, num_items=len(ids))
    for model, seed in ((exports.PRERANKER, preranker_seed), (exports.RANKER, ranker_seed)):
        if seed is not None:
            publish_scorer(workdir, model, version, seed)


def publish_scorer(workdir, model, version, seed, legacy=False):
    """A scorer export; `legacy` gives it only ``serving_default`` (as older versions wrote)."""
    from serving import exports

    schema = Schema.load(os.path.join(workdir, "data", "schema.json"))
    scorer = HashedScorer(schema, seed=seed)
    os.makedirs(exports.model_dir(workdir, model), exist_ok=True)
    _save_atomic(scorer, exports.version_path(workdir, model, version),
                 {"serving_default": scorer.serving} if legacy else scorer.all_signatures)


@pytest.fixture(scope="session")
def base_workdir(tmp_path_factory, tiny_data_dir):
    """Workdir with version 1 (towers + exact index), no pre-ranker or ranker (read-only)."""
    w = str(tmp_path_factory.mktemp("serving") / "w")
    shutil.copytree(tiny_data_dir, os.path.join(w, "data"))
    publish_version(w, 1)
    return w


@pytest.fixture(scope="session")
def ranked_workdir(tmp_path_factory, base_workdir):
    """`base_workdir` plus pre-ranker and ranker version 1 (read-only)."""
    w = str(tmp_path_factory.mktemp("serving-ranked") / "w")
    shutil.copytree(base_workdir, w)
    publish_scorer(w, "preranker", 1, seed=11)
    publish_scorer(w, "ranker", 1, seed=12)
    return w


@pytest.fixture
def copy_workdir(tmp_path):
    """A private, writable copy of a session workdir."""
    def copy(src):
        dst = str(tmp_path / "w")
        shutil.copytree(src, dst)
        return dst
    return copy


@pytest.fixture(scope="session")
def publish():
    """``publish.version(workdir, v, ...)`` and ``publish.scorer(workdir, model, v, seed)``."""
    import types

    return types.SimpleNamespace(version=publish_version, scorer=publish_scorer)
