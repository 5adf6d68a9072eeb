"""The HTTP service: the cascade behind FastAPI, with hot reload of new export versions.

    POST /v1/recommend   user id and/or user features → ranked items with scores
    POST /v1/retrieve    the retrieval stage alone
    GET  /v1/models      what is loaded (versions, stages, index parameters, reloads)
    GET  /healthz        the process is up
    GET  /readyz         200 once a version is loaded, 503 before
    GET  /docs, /openapi.json

Requests are validated against a model built from the dataset's feature schema
(types, ``k`` ≤ `ServiceConfig.max_k`, string and list lengths) and the body size is
capped (`max_body_bytes`); errors are 4xx with a ``detail`` message naming the field.

One loaded `Cascade` is shared by all requests. A `ModelWatcher` polls the workdir in
a background thread; when the version to serve changes (a new complete version, a
new promotion, a new pre-ranker/ranker export, rewritten data tables) it loads the
new cascade next to the old one — reusing the unchanged parts — and swaps one
reference. A request holds the cascade it started with, so none is dropped or sees a
mix of versions. TensorFlow calls block, so the endpoints are plain ``def`` functions,
which FastAPI runs in its thread pool.

Concurrent requests are answered in batches (`ServiceConfig.max_batch_size`): a
request thread validates its query (`Cascade.prepare`, so a bad request fails alone)
and hands it to a `MicroBatcher`, whose worker runs every waiting query of the same
cascade through one batched `Cascade.answer`.

`serve(..., processes=N)` runs N such applications in worker processes sharing the port
(uvicorn's process manager, which restarts a worker that dies): each loads its own
cascade, reloads by itself and batches its own requests; ``GET /v1/models`` says which
process answered.
"""

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from serving import exports
from serving.batching import BatcherClosedError, MicroBatcher, batch_stats
from serving.cascade import DATA_DIR, Cascade, CascadeConfig, data_files_signature
from serving.user_store import UnknownUserError

log = logging.getLogger("recfunnel.serving")

FOLLOW_MODES = ("promoted", "latest")
MAX_POLL_INTERVAL = 86400.0  # a day


@dataclasses.dataclass(frozen=True)
class ServiceConfig:
    """How the service loads models and bounds requests.

    Attributes:
      workdir: the directory `recfunnel run` writes.
      version: serve this version only (None: follow `follow`).
      follow: ``promoted`` — the promoted version, else (before any promotion) the newest
        complete one that no quality gate rejected (what `recfunnel query` loads);
        ``latest`` — the newest complete version, promoted or not.
      poll_interval: seconds between checks for a new version (0 = never reload).
      max_k: the largest ``k`` a request may ask for.
      max_body_bytes: larger request bodies are refused with 413.
      max_list_length: the longest list a multi-valued or sequence feature may carry.
      cascade: stage sizes and which optional stages run.
      max_batch_size: concurrent requests answered together by one batched cascade
        call (`serving.batching`): one query-tower call, one index search and one call
        per scoring stage for the batch. 1 = every request computed alone.
      batch_workers: threads computing batches (with batching on). Two let one batch's
        Python work overlap another's TensorFlow work; one runs a batch at a time.
      batch_wait_ms: how long a batch may wait for more requests after its first,
        until it is as large as the previous batch (`serving.batching`); a batch after a
        batch of one never waits, so a lone client pays nothing. 0 = take only the
        requests already waiting.
      max_concurrent: with batching off, cascades computed at once (0 = no limit);
        requests beyond it wait their turn. With batching on, `batch_workers` bounds
        the cascades computed at once.
    """

    workdir: str
    version: Optional[int] = None
    follow: str = "promoted"
    poll_interval: float = 5.0
    max_k: int = 100
    max_body_bytes: int = 64 * 1024
    max_list_length: int = 1000
    cascade: CascadeConfig = CascadeConfig()
    max_batch_size: int = 16
    batch_workers: int = 2
    batch_wait_ms: float = 4.0
    max_concurrent: int = 0

    def __post_init__(self):
        if self.follow not in FOLLOW_MODES:
            raise ValueError(f"`follow` should be one of {FOLLOW_MODES}. Received: follow={self.follow!r}")
        if not 0 <= self.poll_interval <= MAX_POLL_INTERVAL:  # NaN too
            raise ValueError(f"`poll_interval` should be in [0, {MAX_POLL_INTERVAL}] seconds (0 = no reloading). "
                             f"Received: poll_interval={self.poll_interval}")
        if self.version is not None and self.version < 1:
            raise ValueError(f"`version` should be a positive integer. Received: version={self.version}")
        for name in ("max_k", "max_body_bytes", "max_list_length", "max_batch_size", "batch_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` should be a positive integer. Received: {name}={getattr(self, name)}")
        if self.max_concurrent < 0:
            raise ValueError(f"`max_concurrent` should be >= 0 (0 = no limit). Received: {self.max_concurrent}")
        if self.max_concurrent and self.max_batch_size > 1:
            raise ValueError(f"`max_concurrent` applies when batching is off (max_batch_size=1); with batching, "
                             f"`batch_workers` bounds the cascades computed at once. Received: "
                             f"max_concurrent={self.max_concurrent}, max_batch_size={self.max_batch_size}")
        if not self.batch_wait_ms >= 0:
            raise ValueError(f"`batch_wait_ms` should be >= 0. Received: batch_wait_ms={self.batch_wait_ms}")
        if self.max_k > self.cascade.retrieval_candidates:
            raise ValueError(f"`max_k` should not exceed the retrieval candidates. Received: max_k={self.max_k}, "
                             f"retrieval_candidates={self.cascade.retrieval_candidates}")


# -- hot reload -------------------------------------------------------------------------
class ModelWatcher:
    """Holds the served cascade and swaps in a new one when the workdir changes.

    `current` is the cascade to use (None until one loads). `refresh()` checks once;
    `start()` runs it every `poll_interval` seconds in a daemon thread. A version that
    fails to load is logged, reported by `status()` and not retried until the target
    changes again; the previous cascade keeps serving.
    """

    def __init__(self, config: ServiceConfig):
        self.config = config
        self.current: Optional[Cascade] = None
        self._target: Optional[Tuple] = None
        self._failed: Optional[Tuple] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.reloads = 0
        self.last_error: Optional[str] = None
        self.last_check: Optional[float] = None

    def target(self) -> Optional[Tuple]:
        """(version, pre-ranker version, ranker version, data files) to serve, or None."""
        workdir, cfg = self.config.workdir, self.config
        if cfg.version is not None:
            version = cfg.version
        elif cfg.follow == "latest":
            complete = exports.complete_versions(workdir)
            version = complete[-1] if complete else None
        else:
            version = exports.serving_version(workdir)
        if version is None:
            return None
        pre = exports.stage_version(workdir, exports.PRERANKER, version) if cfg.cascade.use_preranker else None
        rank = exports.stage_version(workdir, exports.RANKER, version) if cfg.cascade.use_ranker else None
        return (int(version), pre, rank, data_files_signature(exports.serving_data_dir(workdir, version)))

    def refresh(self) -> bool:
        """Loads and swaps in the target when it changed; True when a swap happened."""
        with self._lock:
            self.last_check = time.time()
            try:
                target = self.target()
            except exports.BadRecordError as e:  # a damaged promoted.json / rejected.json: say so, keep serving
                if self.last_error != str(e):
                    log.error("%s; still serving %s", e, self.current.version if self.current is not None
                              else "nothing")
                self.last_error = str(e)
                return False
            except OSError as e:  # the workdir is being rewritten; try again next time
                log.warning("cannot read the exports of %s: %s", self.config.workdir, e)
                return False
            if target is None:
                if self.current is None:  # say why nothing is served (the gate, or no export)
                    self.last_error = exports.nothing_to_serve(self.config.workdir)
                return False
            if target == self._target or target == self._failed:
                return False
            version, pre, rank, _ = target
            started = time.perf_counter()
            try:
                cascade = Cascade.load(self.config.workdir, version, config=self.config.cascade,
                                       preranker_version=pre, ranker_version=rank, previous=self.current)
            except Exception as e:  # noqa: BLE001  (any load failure keeps the old version serving)
                self._failed = target
                self.last_error = f"loading version {version} failed: {type(e).__name__}: {e}"
                log.error("%s; still serving %s", self.last_error,
                          self.current.version if self.current is not None else "nothing")
                return False
            try:
                cascade.warm_up()
            except Exception as e:  # noqa: BLE001
                self._failed = target
                self.last_error = f"version {version} loaded but failed a test query: {type(e).__name__}: {e}"
                log.error("%s; still serving %s", self.last_error,
                          self.current.version if self.current is not None else "nothing")
                return False
            previous = self.current
            self.current = cascade  # one reference swap: requests keep the cascade they started with
            self._target, self._failed, self.last_error = target, None, None
            self.reloads += 1
            log.info("serving version %d (stages %s, models %s) loaded in %.1f s%s", cascade.version,
                     cascade.stages, cascade.models, time.perf_counter() - started,
                     f"; was {previous.version}" if previous is not None else "")
            return True

    def _loop(self):
        while not self._stop.wait(self.config.poll_interval):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001  (the poller must survive anything)
                log.exception("reload check failed")

    def start(self) -> None:
        if self.config.poll_interval > 0 and self.config.version is None and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="recfunnel-model-watcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def status(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"ready": self.current is not None, "follow": self.config.follow,
                               "pinned_version": self.config.version, "poll_interval": self.config.poll_interval,
                               "reloads": self.reloads, "last_error": self.last_error}
        if self.current is not None:
            out.update(self.current.describe())
        return out


# -- request / response models ------------------------------------------------------------
def _integral(value):
    """JSON integers, including 5.0 (JSON Schema's integers); not strings or booleans."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):
        raise ValueError("Input should be a valid integer")
    return int(value)


def _request_models(schema, config: ServiceConfig):
    """Pydantic models of the request bodies, with the schema's user features as fields."""
    from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model, model_validator
    from typing_extensions import Annotated

    from models.features import Kind

    token = Annotated[str, Field(min_length=0, max_length=256, strict=True)]
    feature_fields: Dict[str, Any] = {}
    for f in (schema.user_features if schema is not None else ()):
        if f.kind == Kind.CATEGORICAL:
            kind = Annotated[str, Field(max_length=256, strict=True, description=f"categorical {f.description}")]
        elif f.kind == Kind.NUMERIC:
            kind = Annotated[float, Field(allow_inf_nan=False, strict=True, description="numeric")]
        else:
            kind = Annotated[List[token], Field(max_length=config.max_list_length,
                                                description=f"{f.kind.value}, oldest first" if f.kind == Kind.SEQUENCE
                                                else f.kind.value)]
        feature_fields[f.name] = (kind, None)
    if feature_fields:
        features_type = create_model("UserFeatures", __config__=ConfigDict(extra="forbid"), **feature_fields)
    else:  # no schema yet: any feature name, checked against the schema once loaded
        features_type = Dict[Annotated[str, Field(max_length=256)],
                             Any]

    class _Query(BaseModel):
        # At least one of user_id and features (null is not a value of either).
        model_config = ConfigDict(extra="forbid", json_schema_extra={
            "anyOf": [{"required": ["user_id"]}, {"required": ["features"]}]})

        user_id: Annotated[str, Field(min_length=1, max_length=256, strict=True)] = Field(
            None, description="a known user id; unknown ids need `features` or `cold_start`")
        include_seen: bool = Field(False, strict=True, description="keep the user's training items")
        cold_start: bool = Field(False, strict=True,
                                 description="answer an unknown user id without features as a new user")
        timings: bool = Field(False, strict=True, description="add per-stage timings in milliseconds")
        explain: bool = Field(False, strict=True, description="add per-item stage scores and per-stage counts")

        @model_validator(mode="after")
        def _user_given(self):
            if self.user_id is None and getattr(self, "features", None) is None:
                raise ValueError("send `user_id`, `features` or both")
            return self

    k_field = (Annotated[int, Field(ge=1, le=config.max_k), BeforeValidator(_integral)],
               Field(10, description=f"items to return, 1..{config.max_k}"))
    features_field = (features_type, Field(None, description="user features overriding the stored ones"))
    recommend = create_model("RecommendRequest", __base__=_Query, k=k_field, features=features_field)
    retrieve = create_model("RetrieveRequest", __base__=_Query, k=k_field, features=features_field)
    return recommend, retrieve


def _response_models():
    from pydantic import BaseModel

    class ScoredItem(BaseModel):
        item_id: str
        score: float
        stage_scores: Optional[Dict[str, float]] = None

    class Recommendations(BaseModel):
        user_id: Optional[str]
        items: List[ScoredItem]
        version: int
        cold_start: bool
        stages: List[str]
        skipped_stages: List[str]
        models: Dict[str, Optional[int]]
        candidates: Optional[Dict[str, int]] = None
        seen_excluded: Optional[int] = None
        timings_ms: Optional[Dict[str, float]] = None
        batch_size: Optional[int] = None

    class Problem(BaseModel):
        detail: Any

    return Recommendations, Problem


# -- the app ------------------------------------------------------------------------------
class _BodySizeLimit:
    """ASGI middleware: refuses bodies above `max_bytes` with 413 (buffers up to it)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await JSONResponse({"detail": f"bad Content-Length header {declared[:40]!r}"}, 400)(
                    scope, receive, send)
            if size > self.max_bytes:
                return await JSONResponse(
                    {"detail": f"request body is {size} bytes; the limit is {self.max_bytes} bytes"}, 413)(
                    scope, receive, send)
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                return await JSONResponse(
                    {"detail": f"request body exceeds the limit of {self.max_bytes} bytes"}, 413)(
                    scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _describe_validation_errors(errors) -> str:
    parts = []
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        msg = str(e.get("msg", "invalid"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if e.get("type") == "extra_forbidden":
            msg = "unknown field"
        elif e.get("type") == "missing":
            msg = "required field missing"
        elif e.get("type") == "json_invalid":
            loc, msg = "body", f"not valid JSON ({(e.get('ctx') or {}).get('error', 'decode error')} "\
                               f"at character {e['loc'][-1]})"
        received = e.get("input")
        shown = repr(received)
        if "input" in e and e.get("type") not in ("missing", "json_invalid") and len(shown) <= 80 \
                and not isinstance(received, dict):
            msg += f" (received {shown})"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def create_app(config: ServiceConfig, watcher: Optional[ModelWatcher] = None):
    """The FastAPI application; loads the first version at startup and polls for new ones."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    from models import data_layout as layout
    from models.features import Schema

    watcher = watcher or ModelWatcher(config)
    try:
        version = config.version if config.version is not None else exports.serving_version(config.workdir)
    except exports.BadRecordError:  # the watcher reports it (503 with the reason) until the record is mended
        version = None
    schema_dir = (exports.serving_data_dir(config.workdir, version) if version is not None
                  else os.path.join(config.workdir, DATA_DIR))
    schema_path = os.path.join(schema_dir, layout.SCHEMA_FILE)
    schema = Schema.load(schema_path) if os.path.exists(schema_path) else None
    RecommendRequest, RetrieveRequest = _request_models(schema, config)
    Recommendations, Problem = _response_models()

    batching: Dict[str, Optional[MicroBatcher]] = {"batcher": None}
    batching_lock = threading.Lock()

    def batcher() -> Optional[MicroBatcher]:
        """The batcher (started on first use, and again after a lifespan closed it)."""
        if config.max_batch_size == 1:
            return None
        with batching_lock:
            if batching["batcher"] is None:
                batching["batcher"] = MicroBatcher(
                    lambda cascade, queries: cascade.answer(queries), max_batch_size=config.max_batch_size,
                    workers=config.batch_workers, max_wait_ms=config.batch_wait_ms)
            return batching["batcher"]

    def close_batcher() -> None:
        with batching_lock:
            closing, batching["batcher"] = batching["batcher"], None
        if closing is not None:
            closing.close()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        import anyio

        await anyio.to_thread.run_sync(watcher.refresh)
        if watcher.current is None:
            log.warning("no model version to serve yet (%s); /readyz answers 503 until one appears",
                        watcher.last_error or exports.nothing_to_serve(config.workdir))
        watcher.start()
        try:
            yield
        finally:
            watcher.stop()
            close_batcher()

    app = FastAPI(title="recfunnel", version="1", lifespan=lifespan,
                  description="Recommendations from a recfunnel workdir: retrieval (two-tower + ScaNN) → "
                              "pre-ranker → ranker.")
    app.state.watcher = watcher
    app.add_middleware(_BodySizeLimit, max_bytes=config.max_body_bytes)
    problems = {404: {"model": Problem, "description": "unknown user"},
                413: {"model": Problem, "description": "body too large"},
                422: {"model": Problem, "description": "invalid request"},
                503: {"model": Problem, "description": "no model loaded yet"}}

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        content_type = request.headers.get("content-type", "")
        detail = (_describe_validation_errors(errors) if "json" in content_type.lower() else
                  f"the body should be JSON sent with Content-Type: application/json. Received: Content-Type: "
                  f"{content_type or '(none)'}")
        return JSONResponse(status_code=422, content={
            "detail": detail,
            "errors": [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in errors]})

    slots = threading.BoundedSemaphore(config.max_concurrent) if config.max_concurrent else None

    def _answer(request, retrieval_only: bool):
        cascade = watcher.current
        if cascade is None:
            return JSONResponse(status_code=503, content={
                "detail": f"no model version loaded yet from {config.workdir}"
                          + (f" ({watcher.last_error})" if watcher.last_error else "")})
        features = request.features
        if features is not None and not isinstance(features, dict):
            features = features.model_dump(exclude_none=True)
        gate = slots if slots is not None else contextlib.nullcontext()
        try:
            query = cascade.prepare(request.user_id, features, k=request.k, include_seen=request.include_seen,
                                    allow_unknown=request.cold_start, timings=request.timings,
                                    explain=request.explain, retrieval_only=retrieval_only)
            out, runner = None, batcher()
            if runner is not None:
                try:
                    out = runner.submit(query, key=cascade)
                except BatcherClosedError:  # shutting down: answer this one alone
                    pass
            if out is None:
                with gate:
                    out = cascade.answer([query])[0]
        except UnknownUserError as e:
            return JSONResponse(status_code=404, content={
                "detail": f"{e}; send the user's `features` or set `cold_start` to answer as a new user"})
        except (ValueError, TypeError) as e:
            return JSONResponse(status_code=422, content={"detail": str(e)})
        return JSONResponse(content=out)

    @app.post("/v1/recommend", response_model=Recommendations, responses=problems,
              summary="Ranked items for a user through every loaded stage")
    def recommend(request: RecommendRequest):
        return _answer(request, retrieval_only=False)

    @app.post("/v1/retrieve", response_model=Recommendations, responses=problems,
              summary="Items of the retrieval stage alone (query tower + index, seen items removed)")
    def retrieve(request: RetrieveRequest):
        return _answer(request, retrieval_only=True)

    @app.get("/v1/models", summary="Loaded model versions, stages, reload and batching status")
    def models() -> Dict[str, Any]:
        out = {**watcher.status(), "process": os.getpid()}
        if config.max_batch_size == 1:
            out["batching"] = {"max_batch_size": 1}
        else:
            runner = batching["batcher"]  # a status request does not start the workers
            stats = runner.stats() if runner is not None else batch_stats()
            out["batching"] = {"max_batch_size": config.max_batch_size, "workers": config.batch_workers,
                               "wait_ms": config.batch_wait_ms, **stats}
        return out

    @app.get("/healthz", summary="Liveness: the process is up")
    def healthz() -> Dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: a model version is loaded", responses={503: {"model": Problem}})
    def readyz():
        cascade = watcher.current
        if cascade is None:
            return JSONResponse(status_code=503, content={
                "detail": "no model version loaded yet" + (f" ({watcher.last_error})" if watcher.last_error else "")})
        return {"status": "ready", "version": cascade.version, "stages": cascade.stages}

    return app


# -- processes ---------------------------------------------------------------------------
# A worker process of `serve(..., processes=N)` is a fresh interpreter (spawned by
# uvicorn): it reads its configuration from these variables.
CONFIG_ENV = "RECFUNNEL_SERVICE_CONFIG"
TF_THREADS_ENV = "RECFUNNEL_SERVICE_TF_THREADS"


def config_to_json(config: ServiceConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_json(text: str) -> ServiceConfig:
    fields = json.loads(text)
    return ServiceConfig(**{**fields, "cascade": CascadeConfig(**fields["cascade"])})


def _check_tf_threads(threads: int) -> None:
    if threads < 0:
        raise ValueError(f"`tf_threads` should be >= 0 (0 = TensorFlow's default). Received: {threads}")


def set_tf_threads(threads: int) -> None:
    """TensorFlow threads per operation (intra-op) of this process; 0 = TensorFlow's default."""
    _check_tf_threads(threads)
    if threads:
        from models.tf_compat import tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)


def app_from_environment():
    """The application of one worker process: `create_app` of the configuration in
    ``RECFUNNEL_SERVICE_CONFIG`` (`config_to_json`), with ``RECFUNNEL_SERVICE_TF_THREADS``
    TensorFlow threads per operation."""
    if CONFIG_ENV not in os.environ:
        raise RuntimeError(f"{CONFIG_ENV} is not set: the worker processes of `serve(..., processes=N)` read their "
                           f"configuration from it")
    set_tf_threads(int(os.environ.get(TF_THREADS_ENV, "0")))
    return create_app(config_from_json(os.environ[CONFIG_ENV]))


def serve(config: ServiceConfig, host: str = "127.0.0.1", port: int = 8500, access_log: bool = False,
          log_level: str = "info", processes: int = 1, tf_threads: int = 0) -> None:
    """Runs the service with uvicorn until interrupted.

    Args:
      processes: worker processes sharing the port. One process (the default) holds one
        cascade for all requests; its Python work (HTTP, JSON, filtering, batching) runs
        under one interpreter lock, so it uses about one core and a half however many
        the machine has. With N processes each loads its own cascade (N times the
        memory, each reloading new versions by itself), the kernel spreads connections
        among them, and each batches its own requests.
      tf_threads: TensorFlow threads per operation in each process; 0 = TensorFlow's
        default (one per core) with one process, the cores divided among the processes
        with several.
    """
    import uvicorn

    if isinstance(processes, bool) or int(processes) != processes or processes < 1:
        raise ValueError(f"`processes` should be a positive integer. Received: processes={processes!r}")
    _check_tf_threads(tf_threads)  # before any worker process starts
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding to %s: the service is reachable from other machines", host)
    options = dict(host=host, port=port, access_log=access_log, log_level=log_level, timeout_graceful_shutdown=10)
    if processes == 1:
        set_tf_threads(tf_threads)
        uvicorn.run(create_app(config), **options)
        return
    if tf_threads == 0:
        tf_threads = max(1, (os.cpu_count() or 1) // processes)
    os.environ[CONFIG_ENV] = config_to_json(config)
    os.environ[TF_THREADS_ENV] = str(tf_threads)
    log.info("starting %d worker processes, %d TensorFlow threads per operation each", processes, tf_threads)
    uvicorn.run("serving.service:app_from_environment", factory=True, workers=processes, **options)


__all__ = ["ServiceConfig", "ModelWatcher", "create_app", "serve", "app_from_environment", "config_to_json",
           "config_from_json", "FOLLOW_MODES"]
