import json
import os
import shutil

import numpy as np
import pyarrow.compute as pc
import pytest
from conftest import python_subprocess

from models.features import Schema, padded_batch
from models.tf_compat import tf
from serving import exports
from serving.cascade import Cascade, CascadeConfig, CandidateScorer
from serving.user_store import UnknownUserError, UserStore


def _signature(path):
    return tf.saved_model.load(path).signatures["serving_default"]


class Reference:
    """Brute-force answers computed straight from the exports and the tables."""

    def __init__(self, workdir, version=1):
        import pyarrow.parquet as pq

        self.data_dir = os.path.join(workdir, "data")
        self.schema = Schema.load(os.path.join(self.data_dir, "schema.json"))
        self.users = UserStore(self.data_dir)
        self.rows = pq.read_table(os.path.join(self.data_dir, "items.parquet")).to_pylist()
        self.ids = np.array([r["item_id"] for r in self.rows], dtype=object)
        self.item_feats = padded_batch(self.schema, "item", self.rows)
        self.query = _signature(exports.version_path(workdir, "query_tower", version))
        item = _signature(exports.version_path(workdir, "item_tower", version))
        self.item_emb = item(**{k: tf.constant(v) for k, v in self.item_feats.items()})["embedding"].numpy()
        self.workdir, self.version = workdir, version

    def user_tensors(self, user_id):
        return {k: tf.constant(v) for k, v in self.users.features([user_id], allow_unknown=True).items()}

    def retrieval_scores(self, user_id):
        return (self.query(**self.user_tensors(user_id))["embedding"].numpy() @ self.item_emb.T)[0]

    def scorer_scores(self, model, user_id, rows):
        fn = _signature(exports.version_path(self.workdir, model, self.version))
        feats = {k: tf.constant(v[rows]) for k, v in self.item_feats.items()}
        return fn(**self.user_tensors(user_id), **feats)["scores"].numpy()

    def cascade(self, user_id, k, n_retrieval, n_pre, stages):
        """Item rows and scores after each stage, seen items removed first."""
        seen = set(self.users.seen(user_id))
        s = self.retrieval_scores(user_id)
        rows = [r for r in np.argsort(-s, kind="stable") if self.ids[r] not in seen][:n_retrieval]
        rows, final = np.array(rows), s[rows]
        for model, limit in (("preranker", n_pre), ("ranker", k)):
            if model in stages:
                final = self.scorer_scores(model, user_id, rows)
                order = np.argsort(-final, kind="stable")[:limit]
                rows, final = rows[order], final[order]
        return list(self.ids[rows[:k]]), final[:k]


@pytest.fixture(scope="module")
def users_with_history(base_workdir):
    store = UserStore(os.path.join(base_workdir, "data"))
    return [u for u in store.user_ids() if len(store.seen(u)) >= 2][:4]


def test_retrieval_alone_is_the_exact_top_k_without_seen_items(base_workdir, users_with_history):
    ref = Reference(base_workdir)
    cascade = Cascade.load(base_workdir)
    assert cascade.stages == ["retrieval"] and cascade.items is None  # no item table needed
    for user in users_with_history:
        out = cascade.recommend(user, k=7)
        want_ids, want_scores = ref.cascade(user, 7, 1000, 200, ())
        assert [i["item_id"] for i in out["items"]] == want_ids
        np.testing.assert_allclose([i["score"] for i in out["items"]], want_scores, rtol=1e-5, atol=1e-6)
        assert not {i["item_id"] for i in out["items"]} & set(ref.users.seen(user))
        assert out["stages"] == ["retrieval"] and out["skipped_stages"] == ["preranker", "ranker"]
        assert out["models"] == {"query_tower": 1, "index": 1} and out["version"] == 1
        assert out["cold_start"] is False
    # include_seen: the seen items come back (the user's best item overall is first)
    user = users_with_history[0]
    best = ref.ids[int(np.argmax(ref.retrieval_scores(user)))]
    assert cascade.recommend(user, k=1, include_seen=True)["items"][0]["item_id"] == best


@pytest.mark.parametrize("config", [CascadeConfig(retrieval_candidates=120, preranker_candidates=30),
                                    CascadeConfig()])
def test_preranker_and_ranker_reorder_the_retrieved_candidates(ranked_workdir, users_with_history, config):
    ref = Reference(ranked_workdir)
    cascade = Cascade.load(ranked_workdir, config=config)
    assert cascade.stages == ["retrieval", "preranker", "ranker"]
    for user in users_with_history[:3]:
        out = cascade.recommend(user, k=5, explain=True)
        want_ids, want_scores = ref.cascade(user, 5, config.retrieval_candidates, config.preranker_candidates,
                                            ("preranker", "ranker"))
        assert [i["item_id"] for i in out["items"]] == want_ids
        np.testing.assert_allclose([i["score"] for i in out["items"]], want_scores, rtol=1e-5)
        assert out["stages"] == ["retrieval", "preranker", "ranker"] and out["skipped_stages"] == []
        assert out["models"] == {"query_tower": 1, "index": 1, "preranker": 1, "ranker": 1}
        n_items = len(ref.ids) - len(set(ref.users.seen(user)))
        assert out["candidates"] == {"retrieval": min(config.retrieval_candidates, n_items),
                                     "preranker": min(config.preranker_candidates, n_items), "ranker": 5}
        for item in out["items"]:
            assert set(item["stage_scores"]) == {"retrieval", "preranker", "ranker"}
            assert item["score"] == item["stage_scores"]["ranker"] and 0 < item["score"] < 1
        assert {"user_features", "query_tower", "index", "filter", "item_features", "preranker", "ranker",
                "total"} <= set(out["timings_ms"])
    # The pre-ranker cut matters: the ranker alone over all retrieved items differs somewhere.
    if config.preranker_candidates < 100:
        alone = [ref.cascade(u, 5, 120, 120, ("ranker",))[0] for u in users_with_history[:3]]
        cascaded = [ref.cascade(u, 5, 120, 30, ("preranker", "ranker"))[0] for u in users_with_history[:3]]
        assert alone != cascaded


def test_ranker_without_preranker(copy_workdir, base_workdir, users_with_history, publish):
    w = copy_workdir(base_workdir)
    publish.scorer(w, "ranker", 1, seed=12)
    ref = Reference(w)
    cascade = Cascade.load(w, config=CascadeConfig(retrieval_candidates=60, preranker_candidates=60))
    assert cascade.stages == ["retrieval", "ranker"]
    user = users_with_history[1]
    out = cascade.recommend(user, k=6)
    assert out["stages"] == ["retrieval", "ranker"] and out["skipped_stages"] == ["preranker"]
    assert out["models"] == {"query_tower": 1, "index": 1, "ranker": 1}
    want_ids, want_scores = ref.cascade(user, 6, 60, 60, ("ranker",))
    assert [i["item_id"] for i in out["items"]] == want_ids
    np.testing.assert_allclose([i["score"] for i in out["items"]], want_scores, rtol=1e-5)


def test_stage_sizes_and_cold_start(ranked_workdir, users_with_history):
    cascade = Cascade.load(ranked_workdir, config=CascadeConfig(retrieval_candidates=50, preranker_candidates=20))
    user = users_with_history[0]
    out = cascade.recommend(user, k=30, explain=True)  # k above the pre-ranker size widens it to k
    assert len(out["items"]) == 30 and out["candidates"]["preranker"] == 30
    assert len({i["item_id"] for i in out["items"]}) == 30
    out = cascade.recommend(user, k=3, retrieval_candidates=10, preranker_candidates=4, explain=True)
    assert out["candidates"] == {"retrieval": 10, "preranker": 4, "ranker": 3}
    with pytest.raises(UnknownUserError, match="unknown user id 'nobody'"):
        cascade.recommend("nobody")
    cold = cascade.recommend("nobody", k=4, allow_unknown=True)
    assert cold["cold_start"] is True and len(cold["items"]) == 4
    only = cascade.retrieve(user, k=4, timings=True)
    assert only["stages"] == ["retrieval"] and only["skipped_stages"] == ["preranker", "ranker"]
    assert set(only["timings_ms"]) == {"user_features", "wait", "query_tower", "index", "filter", "total"}
    assert [i["item_id"] for i in only["items"]] == [
        i["item_id"] for i in Cascade.load(ranked_workdir, config=CascadeConfig(
            use_preranker=False, use_ranker=False)).recommend(user, k=4)["items"]]


def test_features_instead_of_or_over_the_stored_user(base_workdir, users_with_history):
    cascade = Cascade.load(base_workdir)
    schema = cascade.schema
    user = users_with_history[0]
    stored = cascade.users.row(user)
    same = cascade.recommend(features={f.name: stored[f.name] for f in schema.user_features}, k=5,
                             include_seen=True)
    assert same["items"] == cascade.recommend(user, k=5, include_seen=True)["items"]
    assert same["cold_start"] is True and same["user_id"] is None
    # A history sent with the request is excluded like seen items (and reaches the tower).
    history = [cascade.recommend(user, k=2, include_seen=True)["items"][1]["item_id"]]
    out = cascade.recommend(user, features={"history": history}, k=10)
    assert history[0] not in {i["item_id"] for i in out["items"]}
    # An unknown id with features is answered from the features.
    assert cascade.recommend("someone-new", features={"gender": "f"}, k=3)["cold_start"] is True
    with pytest.raises(ValueError, match=r"unknown user feature\(s\) \['shoe_size'\]"):
        cascade.recommend(user, features={"shoe_size": "44"})
    with pytest.raises(TypeError, match="feature 'history' should be a list of strings"):
        cascade.recommend(user, features={"history": "i1"})
    with pytest.raises(TypeError, match="feature 'gender' should be a string"):
        cascade.recommend(user, features={"gender": ["f"]})
    with pytest.raises(ValueError, match="needs `user_id` or `features`"):
        cascade.recommend()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="`k` should be a positive integer"):
            cascade.recommend(user, k=bad)


def test_optional_model_versions_and_next_version(tmp_path):
    w = str(tmp_path)
    for model, vs in (("query_tower", (1, 2)), ("item_tower", (1, 2)), ("index", (1, 2)), ("ranker", (1, 4)),
                      ("preranker", ())):
        for v in vs:
            os.makedirs(exports.version_path(w, model, v))
    os.makedirs(exports.version_path(w, "ranker", 5) + ".tmp")  # incomplete: ignored
    assert exports.stage_version(w, "ranker", 1) == 1  # the same number when exported
    assert exports.stage_version(w, "ranker", 2) == 4  # else the newest
    assert exports.stage_version(w, "preranker", 2) is None
    assert exports.next_version(w) == 5  # above every export, the ranker's too
    assert exports.complete_versions(w) == [1, 2] and exports.serving_version(w) == 2
    with pytest.raises(ValueError, match="`model` should be one of"):
        exports.stage_version(w, "index", 1)


def test_an_optional_model_of_a_rejected_or_unfinished_run_is_not_served(tmp_path):
    w = str(tmp_path)
    for model, vs in (("query_tower", (1, 2, 3, 5)), ("item_tower", (1, 2, 3)), ("index", (1, 2)),
                      ("serving_data", (1, 2, 3, 5)), ("ranker", (1, 3, 4, 5))):
        for v in vs:
            os.makedirs(exports.version_path(w, model, v))
    # 3: a run stopped before its index; 5: a run between its export and index stages; 4: exported on its own.
    assert exports.stage_version(w, "ranker", 2) == 4
    exports.write_rejected(w, {4: "ranker.auc=0.5000 < min_value=0.6"})
    assert exports.stage_version(w, "ranker", 2) == 1
    exports.write_rejected(w, {1: "worse than before", 4: "ranker.auc=0.5000 < min_value=0.6"})
    assert exports.stage_version(w, "ranker", 2) is None
    assert exports.stage_version(w, "ranker", 5) == 5  # its own version, pinned on purpose


@pytest.mark.parametrize("name,text,message", [
    ("promoted.json", '{"version": ', r"promoted.json: not a readable JSON record"),
    ("promoted.json", '{"version": "2"}', r'promoted.json: should be a JSON object with an integer "version"'),
    ("promoted.json", "[2]", r'promoted.json: should be a JSON object with an integer "version"'),
    ("rejected.json", '{"2": ', r"rejected.json: not a readable JSON record"),
    ("rejected.json", '{"v2": "bad"}', r"rejected.json: should be a JSON object of version number"),
])
def test_a_damaged_promotion_record_is_an_error_naming_the_file(tmp_path, name, text, message):
    w = str(tmp_path)
    os.makedirs(os.path.join(w, exports.EXPORT_DIR))
    with open(os.path.join(w, exports.EXPORT_DIR, name), "w") as f:
        f.write(text)
    with pytest.raises(exports.BadRecordError, match=message):
        exports.serving_version(w)


def test_reload_reuses_unchanged_parts(copy_workdir, ranked_workdir, publish):
    w = copy_workdir(ranked_workdir)
    first = Cascade.load(w)
    same = Cascade.load(w, previous=first)
    for part in ("query_tower", "index", "users", "items", "preranker", "ranker"):
        assert getattr(same, part) is getattr(first, part), part
    assert sorted(first.encoded_items) == ["preranker", "ranker"]
    for model in ("preranker", "ranker"):  # the items encoded for a scorer are reused with it
        assert same.encoded_items[model] is first.encoded_items[model]
    publish.version(w, 2, tower_seed=5)  # new retrieval models; no ranker 2: the newest ranker (1) stays
    second = Cascade.load(w, previous=first)
    assert second.version == 2 and second.models == {"query_tower": 2, "index": 2, "preranker": 1, "ranker": 1}
    assert second.index is not first.index and second.query_tower is not first.query_tower
    assert second.ranker is first.ranker and second.preranker is first.preranker and second.items is first.items
    assert second.encoded_items["ranker"] is not first.encoded_items["ranker"]  # a new index: encoded again
    publish.scorer(w, "ranker", 2, seed=13)  # the ranker of the same version number wins
    third = Cascade.load(w, previous=second)
    assert third.models["ranker"] == 2 and third.ranker is not second.ranker and third.index is second.index
    assert Cascade.load(w, ranker_version=1, previous=third).models["ranker"] == 1  # pinned


def test_bad_exports_are_refused_with_clear_messages(copy_workdir, base_workdir):
    w = copy_workdir(base_workdir)
    with pytest.raises(FileNotFoundError, match="export query_tower version 3 is missing"):
        Cascade.load(w, 3)
    with pytest.raises(ValueError, match="should not exceed `retrieval_candidates`"):
        CascadeConfig(retrieval_candidates=10, preranker_candidates=20)
    with pytest.raises(ValueError, match="`retrieval_candidates` should be a positive integer"):
        CascadeConfig(retrieval_candidates=0)

    class Foreign(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="shoe_size")])
        def score(self, shoe_size):
            return {"scores": tf.zeros_like(shoe_size, tf.float32)}

    path = exports.version_path(w, "ranker", 1)
    module = Foreign()
    tf.saved_model.save(module, path, signatures={"serving_default": module.score})
    with pytest.raises(ValueError, match=r"takes inputs \['shoe_size'\] that are not features of the schema"):
        Cascade.load(w)
    schema = Schema.load(os.path.join(w, "data", "schema.json"))
    with pytest.raises(ValueError, match="takes inputs"):
        CandidateScorer(path, schema, "ranker")


def test_cascade_answers_identically_in_a_fresh_process(ranked_workdir, users_with_history):
    users = users_with_history[:3]
    cascade = Cascade.load(ranked_workdir)
    here = [cascade.recommend(u, k=5)["items"] for u in users]
    code = f"""
import json
from serving.cascade import Cascade
c = Cascade.load({ranked_workdir!r})
print(json.dumps([c.recommend(u, k=5)["items"] for u in {users!r}]))
"""
    proc = python_subprocess(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    there = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [[i["item_id"] for i in r] for r in there] == [[i["item_id"] for i in r] for r in here]
    np.testing.assert_allclose([[i["score"] for i in r] for r in there], [[i["score"] for i in r] for r in here],
                               rtol=1e-6)


def _assert_same_answers(batched, alone):
    for b, a in zip(batched, alone):
        assert [i["item_id"] for i in b["items"]] == [i["item_id"] for i in a["items"]]
        np.testing.assert_allclose([i["score"] for i in b["items"]], [i["score"] for i in a["items"]],
                                   rtol=1e-5, atol=1e-6)
        rest = ("items", "timings_ms", "batch_size")
        assert {k: v for k, v in b.items() if k not in rest} == {k: v for k, v in a.items() if k not in rest}
        assert b.get("batch_size", len(batched)) == len(batched) and a.get("batch_size", 1) == 1


def test_a_batch_answers_each_query_as_it_is_answered_alone(ranked_workdir, users_with_history):
    cascade = Cascade.load(ranked_workdir, config=CascadeConfig(retrieval_candidates=60, preranker_candidates=20))
    u0, u1, u2, u3 = users_with_history
    history = UserStore(os.path.join(ranked_workdir, "data")).seen(u1)
    asks = [dict(user_id=u0, k=5), dict(user_id=u1, k=8, include_seen=True),
            dict(user_id=u2, k=3, retrieval_only=True), dict(user_id=u3, k=4, retrieval_candidates=30,
                                                             preranker_candidates=10),
            dict(features={"history": history, "age": "25-34"}, k=6),
            dict(user_id="nobody", k=5, allow_unknown=True), dict(user_id=u0, k=5)]
    queries = [cascade.prepare(timings=True, explain=True, **a) for a in asks]
    batched = cascade.answer(queries)
    alone = [cascade.answer([q])[0] for q in queries]
    _assert_same_answers(batched, alone)
    assert [b["stages"] for b in batched[:3]] == [["retrieval", "preranker", "ranker"]] * 2 + [["retrieval"]]
    assert batched[3]["candidates"] == {"retrieval": 30, "preranker": 10, "ranker": 4}
    assert batched[5]["cold_start"] and not batched[0]["cold_start"]
    store = UserStore(os.path.join(ranked_workdir, "data"))
    assert not {i["item_id"] for i in batched[0]["items"]} & set(store.seen(u0))
    assert not {i["item_id"] for i in batched[4]["items"]} & set(history)
    assert batched[1]["seen_excluded"] == 0 and batched[4]["seen_excluded"] == len(set(history))
    assert {"user_features", "wait", "query_tower", "index", "filter", "item_features", "preranker", "ranker",
            "total"} == set(batched[0]["timings_ms"])
    assert set(batched[2]["timings_ms"]) == {"user_features", "wait", "query_tower", "index", "filter", "total"}
    # recommend() and retrieve() are batches of one.
    assert cascade.recommend(u0, k=5)["items"] == [
        {"item_id": i["item_id"], "score": i["score"]} for i in alone[0]["items"]]
    assert cascade.answer([]) == []


def test_a_batch_with_nothing_to_rank_and_a_tiny_corpus(ranked_workdir, users_with_history):
    """Queries whose candidates run out (k beyond the corpus left) batch with full ones."""
    cascade = Cascade.load(ranked_workdir, config=CascadeConfig(retrieval_candidates=200, preranker_candidates=150))
    queries = [cascade.prepare(u, k=200) for u in users_with_history[:2]] + [
        cascade.prepare(users_with_history[2], k=2)]
    batched = cascade.answer(queries)
    _assert_same_answers(batched, [cascade.answer([q])[0] for q in queries])
    seen = UserStore(os.path.join(ranked_workdir, "data")).seen(users_with_history[0])
    assert len(batched[0]["items"]) == 200 - len(set(seen))


@pytest.mark.parametrize("model_type", ["dnn", "can"])
def test_cascade_runs_the_ranking_models_export(copy_workdir, base_workdir, users_with_history, model_type):
    """The real ranker export (`models.ranking.export_ranker`) fits the cascade's scorer contract,
    one user or a batch of users per call."""
    ranking = pytest.importorskip("models.ranking")
    import pandas as pd

    w = copy_workdir(base_workdir)
    data = os.path.join(w, "data")
    schema = Schema.load(os.path.join(data, "schema.json"))
    items = pd.read_parquet(os.path.join(data, "items.parquet"))
    columns = {c: pd.read_parquet(os.path.join(data, "users.parquet"))[c].tolist() for c in ("user_id", "age",
                                                                                           "gender", "region")}
    columns.update({c: items[c].tolist() for c in items.columns})
    columns["history"] = pd.read_parquet(os.path.join(data, "user_history.parquet"))["history"].tolist()
    model = ranking.build_ranker(model_type, schema, ranking.build_vocabularies(schema, columns))
    store = UserStore(data)
    user = users_with_history[0]
    import pyarrow.parquet as pq

    all_items = padded_batch(schema, "item", pq.read_table(os.path.join(data, "items.parquet")).to_pylist())
    model.score_candidates(store.features([user]), all_items)  # builds the weights
    os.makedirs(exports.model_dir(w, "ranker"))
    ranking.export_ranker(model, exports.version_path(w, "ranker", 1))
    cascade = Cascade.load(w, config=CascadeConfig(retrieval_candidates=80, preranker_candidates=80))
    assert cascade.stages == ["retrieval", "ranker"]
    out = cascade.recommend(user, k=5, explain=True)
    # The ranker's own scores of the 80 retrieved candidates, sorted, give the same top 5.
    retrieved = cascade.retrieve(user, k=80)["items"]
    rows = [int(np.flatnonzero(items["item_id"].to_numpy() == i["item_id"])[0]) for i in retrieved]
    direct = model.score_candidates(store.features([user]), {k: v[rows] for k, v in all_items.items()}).numpy()
    order = np.argsort(-direct, kind="stable")[:5]
    assert [i["item_id"] for i in out["items"]] == [retrieved[j]["item_id"] for j in order]
    np.testing.assert_allclose([i["score"] for i in out["items"]], direct[order], rtol=1e-5)
    queries = [cascade.prepare(u, k=5) for u in users_with_history]
    _assert_same_answers(cascade.answer(queries), [cascade.answer([q])[0] for q in queries])


def test_items_encoded_at_load_score_as_strings_do(copy_workdir, ranked_workdir, users_with_history, publish):
    """Scorers with the encoded signatures score rows of items encoded once at load; exports
    without them (older versions) get the items' strings. Both give the same answers."""
    w = copy_workdir(ranked_workdir)
    encoded = Cascade.load(w)
    assert sorted(encoded.encoded_items) == ["preranker", "ranker"]
    assert len(encoded.encoded_items["ranker"]) == encoded.index.num_items
    for model, seed in (("preranker", 11), ("ranker", 12)):  # the same weights, without the signatures
        shutil.rmtree(exports.version_path(w, model, 1))
        publish.scorer(w, model, 1, seed=seed, legacy=True)
    strings = Cascade.load(w)
    assert strings.encoded_items == {} and not strings.ranker.encodes_items
    queries = [dict(user_id=u) for u in users_with_history] + [dict(features={"age": "a"})]
    for q in queries:
        by_ids, by_strings = (c.recommend(**q, k=7, explain=True) for c in (encoded, strings))
        assert [i["item_id"] for i in by_ids["items"]] == [i["item_id"] for i in by_strings["items"]]
        for a, b in zip(by_ids["items"], by_strings["items"]):
            assert a["stage_scores"] == pytest.approx(b["stage_scores"], rel=1e-6)
    batch = [encoded.prepare(u, k=7) for u in users_with_history]
    _assert_same_answers(encoded.answer(batch), [encoded.answer([q])[0] for q in batch])


def test_index_padding_is_dropped_and_a_query_left_without_candidates_answers_empty(
        ranked_workdir, users_with_history, monkeypatch):
    """An index saved before short rows were searched again pads a query's results with
    NaN scores when its partitions hold fewer than the points asked for (possibly none):
    the cascade ranks only the real candidates and answers an empty list rather than failing."""
    cascade = Cascade.load(ranked_workdir, config=CascadeConfig(retrieval_candidates=60, preranker_candidates=20))
    u0, u1, u2 = users_with_history[:3]
    full = [cascade.answer([cascade.prepare(u, k=5, explain=True, include_seen=True)])[0] for u in (u0, u1, u2)]
    kept = 8
    retrieved = [i["item_id"] for i in cascade.retrieve(u1, k=kept, include_seen=True)["items"]]
    search = cascade.index.search_indices

    def padded(queries, k):
        scores, indices = search(queries, k)
        scores, indices = scores.copy(), indices.copy()
        scores[0, :], indices[0, :] = np.nan, 0  # u0: nothing found
        scores[1, kept:], indices[1, kept:] = np.nan, 0  # u1: only `kept` found
        return scores, indices

    monkeypatch.setattr(cascade.index, "search_indices", padded)
    out = cascade.answer([cascade.prepare(u, k=5, explain=True, include_seen=True) for u in (u0, u1, u2)])
    assert out[0]["items"] == [] and out[0]["candidates"]["retrieval"] == 0
    assert out[1]["candidates"]["retrieval"] == kept and len(out[1]["items"]) == 5
    assert out[1]["candidates"] == {"retrieval": kept, "preranker": kept, "ranker": 5}
    # the survivors are the first `kept` retrieved items, ranked as before by the later stages
    assert {i["item_id"] for i in out[1]["items"]} <= set(retrieved)
    assert [i["item_id"] for i in out[2]["items"]] == [i["item_id"] for i in full[2]["items"]]
    np.testing.assert_allclose([i["score"] for i in out[2]["items"]], [i["score"] for i in full[2]["items"]],
                               rtol=1e-5, atol=1e-6)
    assert out[2]["candidates"] == full[2]["candidates"]


def test_a_version_serves_with_its_own_data_and_a_rejected_one_is_not_loaded(copy_workdir, base_workdir,
                                                                              users_with_history, publish):
    import pyarrow.parquet as pq

    from models import data_layout as layout

    w = copy_workdir(base_workdir)
    user = users_with_history[0]
    before = Cascade.load(w).recommend(user, k=5)
    # Version 1 gets its own copy of the tables (as the job's export stage writes it); then a new
    # run rewrites <workdir>/data without that user.
    shutil.copytree(os.path.join(w, "data"), exports.version_path(w, exports.SERVING_DATA, 1))
    users = pq.read_table(os.path.join(w, "data", layout.USERS_FILE))
    pq.write_table(users.filter(pc.not_equal(users["user_id"], user)), os.path.join(w, "data", layout.USERS_FILE))
    cascade = Cascade.load(w)
    assert cascade.users.data_dir == exports.version_path(w, exports.SERVING_DATA, 1)
    assert cascade.recommend(user, k=5)["items"] == before["items"]
    # The new run's version 2 (serving with <workdir>/data, no copy) is turned down by its gate.
    publish.version(w, 2, tower_seed=5)
    exports.write_rejected(w, {2: "retrieval.recall@10=0.0100 < min_value=0.5"})
    assert exports.serving_version(w) == 1 and Cascade.load(w).version == 1
    with pytest.raises(UnknownUserError, match=f"unknown user id '{user}'.*version 2"):
        Cascade.load(w, 2).recommend(user, k=5)  # explicitly asked for, it loads, with its own data
    exports.write_rejected(w, {1: "worse than before", 2: "retrieval.recall@10=0.0100 < min_value=0.5"})
    with pytest.raises(FileNotFoundError, match=r"no version .* passed the quality gate \(version 1: worse than "
                                                r"before; version 2: retrieval.recall@10=0.0100"):
        Cascade.load(w)
