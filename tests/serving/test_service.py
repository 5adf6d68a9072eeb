import json
import os
import socket
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serving.cascade import Cascade, CascadeConfig
from serving.service import ModelWatcher, ServiceConfig, create_app
from serving.user_store import UserStore


@pytest.fixture(scope="module")
def client(ranked_workdir):
    app = create_app(ServiceConfig(ranked_workdir, poll_interval=0, max_k=50, max_body_bytes=4096,
                                   max_list_length=20,
                                   cascade=CascadeConfig(retrieval_candidates=100, preranker_candidates=50)))
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def user(ranked_workdir):
    store = UserStore(os.path.join(ranked_workdir, "data"))
    return next(u for u in store.user_ids() if len(store.seen(u)) >= 2), store


def test_models_reports_batching_without_starting_it(ranked_workdir):
    def batcher_threads():
        return sum(t.name.startswith("recfunnel-batcher") for t in threading.enumerate())

    before = batcher_threads()
    with TestClient(create_app(ServiceConfig(ranked_workdir, poll_interval=0))) as c:
        assert c.get("/v1/models").json()["batching"] == {
            "max_batch_size": 16, "workers": 2, "wait_ms": 4.0, "batches": 0, "items": 0, "largest_batch": 0,
            "mean_batch": 0.0}
        assert batcher_threads() == before
        assert c.post("/v1/recommend", json={"user_id": "u1", "k": 2}).status_code == 200
        assert batcher_threads() == before + 2
        stats = c.get("/v1/models").json()["batching"]
        assert (stats["batches"], stats["items"], stats["mean_batch"]) == (1, 1, 1.0)


def test_health_ready_and_models(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {
        "status": "ready", "version": 1, "stages": ["retrieval", "preranker", "ranker"]}
    models = client.get("/v1/models").json()
    assert models["ready"] is True and models["version"] == 1
    assert models["models"] == {"query_tower": 1, "index": 1, "preranker": 1, "ranker": 1}
    assert models["num_items"] == 200 and models["index"]["kind"] == "brute_force"
    assert models["config"]["retrieval_candidates"] == 100 and models["last_error"] is None
    schema = client.get("/openapi.json").json()
    assert {"/v1/recommend", "/v1/retrieve", "/v1/models", "/healthz", "/readyz"} <= set(schema["paths"])
    features = schema["components"]["schemas"]["UserFeatures"]["properties"]
    assert {"user_id", "age", "gender", "region", "history"} <= set(features)


def test_recommend_and_retrieve(client, user, ranked_workdir):
    user_id, store = user
    r = client.post("/v1/recommend", json={"user_id": user_id, "k": 8})
    assert r.status_code == 200
    out = r.json()
    ids = [i["item_id"] for i in out["items"]]
    assert len(ids) == 8 == len(set(ids)) and not set(ids) & set(store.seen(user_id))
    scores = [i["score"] for i in out["items"]]
    assert scores == sorted(scores, reverse=True)
    assert out["stages"] == ["retrieval", "preranker", "ranker"] and out["version"] == 1
    # The same answer as the cascade in process.
    direct = Cascade.load(ranked_workdir, config=CascadeConfig(retrieval_candidates=100, preranker_candidates=50))
    assert out["items"] == direct.recommend(user_id, k=8)["items"]
    explained = client.post("/v1/recommend", json={"user_id": user_id, "k": 2, "explain": True}).json()
    assert set(explained["items"][0]["stage_scores"]) == {"retrieval", "preranker", "ranker"}
    assert explained["candidates"]["ranker"] == 2 and "total" in explained["timings_ms"]
    timed = client.post("/v1/recommend", json={"user_id": user_id, "k": 2, "timings": True}).json()
    assert "ranker" in timed["timings_ms"] and "candidates" not in timed
    with_seen = client.post("/v1/recommend", json={"user_id": user_id, "k": 50, "include_seen": True}).json()
    assert set(store.seen(user_id)) & {i["item_id"] for i in with_seen["items"]} or len(store.seen(user_id)) > 50
    retrieved = client.post("/v1/retrieve", json={"user_id": user_id, "k": 3}).json()
    assert retrieved["stages"] == ["retrieval"] and len(retrieved["items"]) == 3
    assert retrieved["items"] == direct.retrieve(user_id, k=3)["items"]
    by_features = client.post("/v1/recommend", json={"features": {"gender": "f", "history": ["i1", "i2"]}, "k": 4})
    assert by_features.status_code == 200 and by_features.json()["cold_start"] is True
    assert not {"i1", "i2"} & {i["item_id"] for i in by_features.json()["items"]}
    cold = client.post("/v1/recommend", json={"user_id": "nobody", "cold_start": True, "k": 3})
    assert cold.status_code == 200 and len(cold.json()["items"]) == 3


@pytest.mark.parametrize("body, status, message", [
    ({"user_id": "nobody"}, 404, "unknown user id 'nobody'"),
    ({}, 422, "send `user_id`, `features` or both"),
    ({"user_id": "u1", "k": 0}, 422, "k: Input should be greater than or equal to 1 (received 0)"),
    ({"user_id": "u1", "k": 51}, 422, "k: Input should be less than or equal to 50 (received 51)"),
    ({"user_id": "u1", "k": "5"}, 422, "k: Input should be a valid integer (received '5')"),
    ({"user_id": "u1", "k": 2.5}, 422, "k: Input should be a valid integer"),
    ({"user_id": "u1", "k": None}, 422, "k: Input should be a valid integer"),
    ({"user_id": ""}, 422, "user_id: String should have at least 1 character"),
    ({"user_id": "u" * 257}, 422, "user_id: String should have at most 256 characters"),
    ({"user_id": 7}, 422, "user_id: Input should be a valid string (received 7)"),
    ({"user_id": "u1", "include_seen": "yes"}, 422, "include_seen: Input should be a valid boolean"),
    ({"user_id": "u1", "colour": "red"}, 422, "colour: unknown field"),
    ({"features": {"shoe_size": "44"}}, 422, "features.shoe_size: unknown field"),
    ({"features": {"gender": 1}}, 422, "features.gender: Input should be a valid string (received 1)"),
    ({"features": {"history": "i1"}}, 422, "features.history: Input should be a valid list"),
    ({"features": {"history": [1]}}, 422, "features.history.0: Input should be a valid string"),
    ({"features": {"history": ["i1"] * 21}}, 422, "features.history: List should have at most 20 items"),
    ({"features": ["gender"]}, 422, "features: Input should be a valid dictionary or object"),
    ([1, 2], 422, "body: Input should be a valid dictionary or object"),
])
@pytest.mark.parametrize("path", ["/v1/recommend", "/v1/retrieve"])
def test_invalid_requests_are_refused_with_a_message_naming_the_problem(client, path, body, status, message):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"], r.json()["detail"]


def test_malformed_and_oversized_bodies(client):
    r = client.post("/v1/recommend", content=b'{"user_id": "u1",', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "body: not valid JSON" in r.json()["detail"]
    big = json.dumps({"user_id": "u1", "features": {"history": ["x" * 200] * 20}}).encode()
    assert len(big) > 4096
    r = client.post("/v1/recommend", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["detail"] == f"request body is {len(big)} bytes; the limit is 4096 bytes"

    def chunks():  # no Content-Length: the body is counted while it streams in
        for _ in range(5):
            yield b" " * 1000

    r = client.post("/v1/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit of 4096 bytes" in r.json()["detail"]
    r = client.post("/v1/recommend", content=b"{}", headers={"content-type": "application/json",
                                                              "content-length": "abc"})
    assert r.status_code == 400


def test_not_ready_until_a_version_appears_and_bad_versions_keep_the_old(copy_workdir, base_workdir, publish):
    w = copy_workdir(base_workdir)
    os.rename(os.path.join(w, "export"), os.path.join(w, "export-later"))
    app = create_app(ServiceConfig(w, poll_interval=0))
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["detail"].startswith("no model version loaded yet (nothing exported")
        r = c.post("/v1/recommend", json={"user_id": "u1"})
        assert r.status_code == 503 and "no model version loaded yet" in r.json()["detail"]
        assert c.get("/v1/models").json()["ready"] is False
        os.rename(os.path.join(w, "export-later"), os.path.join(w, "export"))
        # Exported, but turned down by its quality gate: not served, and every answer says why.
        from serving import exports

        exports.write_rejected(w, {1: "retrieval.recall@10=0.0100 < min_value=0.5"})
        assert app.state.watcher.refresh() is False
        why = "passed the quality gate (version 1: retrieval.recall@10=0.0100 < min_value=0.5)"
        assert why in c.get("/readyz").json()["detail"] and why in c.get("/v1/models").json()["last_error"]
        assert why in c.post("/v1/recommend", json={"user_id": "u1"}).json()["detail"]
        exports.write_rejected(w, {})
        assert app.state.watcher.refresh() is True
        assert c.get("/readyz").json()["version"] == 1
        assert c.post("/v1/recommend", json={"user_id": "u1"}).status_code == 200
        # A broken new version: reported, not retried, and version 1 keeps serving.
        publish.version(w, 2)
        with open(os.path.join(w, "export", "index", "2", "manifest.json"), "w") as f:
            f.write("{not json")
        assert app.state.watcher.refresh() is False and app.state.watcher.refresh() is False
        models = c.get("/v1/models").json()
        assert models["version"] == 1 and "loading version 2 failed" in models["last_error"]
        assert c.post("/v1/recommend", json={"user_id": "u1"}).json()["version"] == 1


def test_hot_reload_under_concurrent_requests_drops_nothing(copy_workdir, base_workdir, publish):
    import httpx
    import uvicorn

    w = copy_workdir(base_workdir)
    app = create_app(ServiceConfig(w, follow="latest", poll_interval=0.1))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the server takes the bound socket: no other process can take the port
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    users = UserStore(os.path.join(w, "data")).user_ids()[:20]
    stop, errors, versions = threading.Event(), [], []
    per_thread = [[] for _ in range(4)]

    def hammer(seed):
        with httpx.Client(base_url=base, timeout=30) as http:
            i = seed
            while not stop.is_set():
                try:
                    r = http.post("/v1/recommend", json={"user_id": users[i % len(users)], "k": 5})
                    if r.status_code != 200 or len(r.json()["items"]) != 5:
                        errors.append((r.status_code, r.text[:200]))
                    else:
                        versions.append(r.json()["version"])
                        per_thread[seed].append(r.json()["version"])
                except Exception as e:  # noqa: BLE001
                    errors.append(repr(e))
                i += 1

    threads = [threading.Thread(target=hammer, args=(s,)) for s in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        publish.version(w, 2, tower_seed=3)  # written under temporary names, renamed into place
        deadline = time.time() + 30
        while time.time() < deadline and (not versions or versions[-1] != 2):
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        with httpx.Client(base_url=base, timeout=30) as http:
            final = http.post("/v1/recommend", json={"user_id": users[0], "k": 5}).json()
            models = http.get("/v1/models").json()
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    assert errors == []
    assert len(versions) > 20  # the requests really overlapped the reload
    assert 1 in versions and 2 in versions and versions[-1] == 2
    # Once a client has an answer from version 2, its later requests never get version 1;
    # after the first version-2 answer at most the other clients' in-flight requests finish
    # on version 1.
    assert all(seq == sorted(seq) for seq in per_thread)
    assert versions[versions.index(2):].count(1) <= len(per_thread) - 1
    assert models["version"] == 2 and models["reloads"] == 2
    assert final["items"] == Cascade.load(w, 2).recommend(users[0], k=5)["items"]


def test_which_version_the_watcher_follows(copy_workdir, base_workdir, publish):
    from serving import exports

    w = copy_workdir(base_workdir)
    exports.write_promoted(w, 1, {})
    publish.version(w, 2, tower_seed=4)  # complete but not promoted
    promoted = ModelWatcher(ServiceConfig(w))
    latest = ModelWatcher(ServiceConfig(w, follow="latest"))
    pinned = ModelWatcher(ServiceConfig(w, version=1, follow="latest"))
    assert promoted.target()[:3] == (1, None, None)
    assert latest.target()[:3] == (2, None, None) and pinned.target()[:3] == (1, None, None)
    publish.scorer(w, "ranker", 3, seed=5)  # a ranker exported on its own schedule
    assert promoted.target()[:3] == (1, None, 3) and latest.target()[:3] == (2, None, 3)
    assert ModelWatcher(ServiceConfig(w, cascade=CascadeConfig(use_ranker=False))).target()[:3] == (1, None, None)
    exports.write_promoted(w, 2, {})
    assert promoted.target()[:3] == (2, None, 3)
    with pytest.raises(ValueError, match="`follow` should be one of"):
        ServiceConfig(w, follow="newest")
    with pytest.raises(ValueError, match="`max_k` should not exceed the retrieval candidates"):
        ServiceConfig(w, max_k=2000)


class _Hold:
    """Makes the clients' requests overlap on purpose, however the threads are scheduled:
    once `clients` is set, the first `meet` calls of `Cascade.answer` wait for each other
    (a barrier), and the first call also waits `first_wait` seconds (requests queue behind it)."""

    def __init__(self, meet=1, first_wait=0.0):
        self.clients = threading.Event()
        self.barrier = threading.Barrier(meet, timeout=20) if meet > 1 else None
        self.first_wait, self.calls, self.lock = first_wait, 0, threading.Lock()

    def __call__(self):
        if not self.clients.is_set():  # the service's warm-up queries at start
            return
        with self.lock:
            self.calls += 1
            n = self.calls
        if n == 1:
            time.sleep(self.first_wait)
        if self.barrier is not None and n <= self.barrier.parties:
            self.barrier.wait()


def _tracked_answer(monkeypatch, delay=0.02, hold=None):
    """Patches `Cascade.answer` to record (calls running at once, batch sizes)."""
    running, peak, sizes, lock = [0], [0], [], threading.Lock()
    original = Cascade.answer

    def tracked(self, queries):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            sizes.append(len(queries))
        try:
            if hold is not None:
                hold()
            time.sleep(delay)
            return original(self, queries)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(Cascade, "answer", tracked)
    return peak, sizes


def _ask_concurrently(app, users, repeat=2, k=3, hold=None):
    answers = []
    with TestClient(app) as c:
        if hold is not None:
            hold.clients.set()
        def ask(u):
            r = c.post("/v1/recommend", json={"user_id": u, "k": k})
            answers.append((u, r.status_code, r.json()))

        threads = [threading.Thread(target=ask, args=(u,)) for u in users for _ in range(repeat)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        stats = c.get("/v1/models").json()["batching"]
    return answers, stats


def test_max_concurrent_bounds_the_cascades_computed_at_once(ranked_workdir, monkeypatch):
    for bad in (dict(max_concurrent=-1), dict(max_concurrent=2), dict(max_batch_size=0), dict(batch_workers=0),
                dict(batch_wait_ms=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServiceConfig(ranked_workdir, **bad)
    users = UserStore(os.path.join(ranked_workdir, "data")).user_ids()[:8]
    for limit, bounded in ((2, True), (0, False)):
        hold = _Hold(meet=2 if bounded else 3)  # unbounded: 3 at once must be possible
        monkeypatch.undo()
        peak, sizes = _tracked_answer(monkeypatch, hold=hold)
        app = create_app(ServiceConfig(ranked_workdir, poll_interval=0, max_concurrent=limit, max_batch_size=1,
                                       cascade=CascadeConfig(retrieval_candidates=100, preranker_candidates=50)))
        answers, stats = _ask_concurrently(app, users, hold=hold)
        assert [a[1] for a in answers] == [200] * 16 and stats == {"max_batch_size": 1}
        if bounded:
            assert peak[0] == limit  # never more, and the requests did overlap
        else:
            assert peak[0] > 2
        assert set(sizes) == {1}


def test_concurrent_requests_are_batched_with_the_answers_they_get_alone(ranked_workdir, monkeypatch):
    hold = _Hold(first_wait=0.5)  # the other requests queue behind the first batch
    peak, sizes = _tracked_answer(monkeypatch, delay=0.05, hold=hold)
    users = UserStore(os.path.join(ranked_workdir, "data")).user_ids()[:8]
    config = CascadeConfig(retrieval_candidates=100, preranker_candidates=50)
    app = create_app(ServiceConfig(ranked_workdir, poll_interval=0, max_batch_size=4, batch_workers=1,
                                   cascade=config))
    answers, stats = _ask_concurrently(app, users, k=5, hold=hold)
    assert [a[1] for a in answers] == [200] * 16
    # One worker: one batch at a time, at most 4 queries, and the waiting requests did share batches.
    assert peak[0] == 1 and max(sizes) == 4 and len(sizes) < 16
    assert stats["max_batch_size"] == 4 and stats["items"] == 16 and stats["largest_batch"] == 4
    assert stats["batches"] == len(sizes) - 2  # the load's warm-up queries do not go through the batcher
    direct = Cascade.load(ranked_workdir, config=config)
    for user, _, out in answers:
        alone = direct.recommend(user, k=5)
        assert [i["item_id"] for i in out["items"]] == [i["item_id"] for i in alone["items"]]
        np.testing.assert_allclose([i["score"] for i in out["items"]], [i["score"] for i in alone["items"]],
                                   rtol=1e-5, atol=1e-6)


def test_a_damaged_promotion_record_answers_503_naming_it_and_keeps_the_served_version(copy_workdir, base_workdir):
    from serving import exports

    w = copy_workdir(base_workdir)
    exports.write_promoted(w, 1, {})
    record = os.path.join(w, "export", "promoted.json")
    with open(record) as f:
        good = f.read()
    with open(record, "w") as f:
        f.write('{"version": ')
    app = create_app(ServiceConfig(w, poll_interval=0))
    with TestClient(app) as c:  # starts anyway, and says what is wrong
        r = c.get("/readyz")
        assert r.status_code == 503 and f"{record}: not a readable JSON record" in r.json()["detail"]
        with open(record, "w") as f:
            f.write(good)
        assert app.state.watcher.refresh() is True
        assert c.get("/readyz").json()["version"] == 1
        with open(record, "w") as f:
            f.write("[1]")
        assert app.state.watcher.refresh() is False
        models = c.get("/v1/models").json()
        assert models["version"] == 1 and "should be a JSON object" in models["last_error"]
        assert c.post("/v1/recommend", json={"user_id": "u1", "k": 2}).status_code == 200
    assert isinstance(exports.BadRecordError("x"), ValueError)


def test_a_body_without_a_json_content_type_is_told_so(client):
    r = client.post("/v1/recommend", content=b'{"user_id": "u1", "k": 1}',
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 422
    assert r.json()["detail"] == ("the body should be JSON sent with Content-Type: application/json. Received: "
                                  "Content-Type: application/x-www-form-urlencoded")


def test_a_workdir_that_does_not_exist_yet_is_waited_for(tmp_path):
    w = str(tmp_path / "not-yet")
    with TestClient(create_app(ServiceConfig(w, poll_interval=0))) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and f"nothing exported under {w}" in r.json()["detail"]
