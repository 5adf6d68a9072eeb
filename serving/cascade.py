"""The serving cascade: query tower → index → pre-ranker → ranker.

    user id / features ─ query tower ─► embedding [1, D]
        ─ index (retrieval_candidates + seen) ─► drop seen items ─► ≤ retrieval_candidates
        ─ pre-ranker (optional) ─► best preranker_candidates
        ─ ranker (optional) ─► best k

Each stage keeps the order of the one before for ties. A stage whose model is not
exported is skipped, and the answer names the stages that ran; an item's ``score`` is
the score of the last stage that ran (an inner product after retrieval, a click
probability after a ranker).

The pre-ranker and ranker are SavedModels whose ``serving_default`` signature takes
schema features by name — user features with batch 1 (``[1]`` string, ``[1, L]``
string, ``[1]`` float32; the one user is broadcast to every candidate — or N rows, one
per candidate, which scores the candidates of several users in one call), item features
``[N]`` / ``[N, L]`` / ``[N]`` — and returns ``{"scores": [N], ...}``. Exports with the
``encode_items`` and ``score_users_encoded`` signatures (`models.signatures`) get every
indexed item encoded once when the version is loaded (the model's own vocabulary ids,
int32, about 40 bytes per item per model), and are then called with gathered rows of
integers: no string is gathered or looked up per candidate. Older exports get strings.

Queries are answered in batches: `Cascade.prepare` validates one query and looks up
its user; `Cascade.answer` runs a list of prepared queries through one query-tower
call, one index search and one call per scoring stage (the candidates of all users
concatenated, each row carrying its user's features). `recommend` and `retrieve` are
batches of one; the HTTP service batches concurrent requests (`serving.batching`).

A `Cascade` is immutable once loaded and safe to call from many threads at once;
`Cascade.load` reuses the parts of a previous cascade that did not change, which
makes swapping in a new version cheap.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from models.features import ITEM_ID, OOV_TOKEN, Kind, Schema, normalize_value, padded_batch
from models.signatures import (ENCODE_ITEMS_SIGNATURE, ENCODED_SCORING_SIGNATURE, MULTI_USER_SIGNATURE,
                               USER_INDEX, several_user_arguments)
from models.tf_compat import tf
from serving import exports
from serving.index import LoadedIndex, load_index
from serving.item_store import EncodedItems, ItemStore
from serving.user_store import UnknownUserError, UserStore

log = logging.getLogger("recfunnel.serving")

DATA_DIR = exports.DATA_DIR
RETRIEVAL = "retrieval"
STAGES = (RETRIEVAL, exports.PRERANKER, exports.RANKER)


@dataclasses.dataclass(frozen=True)
class CascadeConfig:
    """Stage sizes of the cascade.

    Attributes:
      retrieval_candidates: items taken from the index after removing seen items.
      preranker_candidates: items the pre-ranker passes on to the ranker.
      use_preranker: run the pre-ranker when one is exported.
      use_ranker: run the ranker when one is exported.
    """

    retrieval_candidates: int = 1000
    preranker_candidates: int = 200
    use_preranker: bool = True
    use_ranker: bool = True

    def __post_init__(self):
        for name in ("retrieval_candidates", "preranker_candidates"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"`{name}` should be a positive integer. Received: {name}={value!r}")
        if self.preranker_candidates > self.retrieval_candidates:
            raise ValueError(
                "`preranker_candidates` should not exceed `retrieval_candidates`. Received: "
                f"preranker_candidates={self.preranker_candidates}, retrieval_candidates={self.retrieval_candidates}")


class CandidateScorer:
    """A pre-ranker or ranker export: scores N candidates of one user.

    Args:
      path: the SavedModel directory.
      schema: the dataset's feature schema; every signature input must be one of its
        features.
      name: ``preranker`` or ``ranker`` (for messages).
    """

    def __init__(self, path: str, schema: Schema, name: str = exports.RANKER):
        self.path, self.name = path, name
        self._module = tf.saved_model.load(path)
        if "serving_default" not in self._module.signatures:
            raise ValueError(f"{name} export {path} has no `serving_default` signature")
        self._fn = self._module.signatures["serving_default"]
        inputs = self._fn.structured_input_signature[1]
        known = {f.name: f.side for f in schema.features}
        foreign = sorted(set(inputs) - set(known))
        if foreign:
            raise ValueError(f"{name} export {path} takes inputs {foreign} that are not features of the schema "
                             f"({sorted(known)})")
        if "scores" not in self._fn.structured_outputs:
            raise ValueError(f"{name} export {path} should return `scores`. "
                             f"Received outputs {sorted(self._fn.structured_outputs)}")
        self.user_inputs = sorted(n for n in inputs if known[n] == "user")
        self.item_inputs = sorted(n for n in inputs if known[n] == "item")
        # Exports since the several-user signature score a batch of users in one call;
        # older ones get each candidate's user row (the same scores, more lookups).
        self._multi = self._module.signatures.get(MULTI_USER_SIGNATURE)
        if self._multi is not None and set(self._multi.structured_input_signature[1]) != set(inputs) | {USER_INDEX}:
            raise ValueError(f"{name} export {path}: the `{MULTI_USER_SIGNATURE}` signature takes "
                             f"{sorted(self._multi.structured_input_signature[1])}, not the inputs of "
                             f"`serving_default` plus {USER_INDEX!r}")
        # Exports since the encoded signatures take items as the model's own ids, encoded
        # once per loaded version (`encode`), so that no string is handled per candidate.
        self._encode = self._module.signatures.get(ENCODE_ITEMS_SIGNATURE)
        self._encoded = self._module.signatures.get(ENCODED_SCORING_SIGNATURE)
        if (self._encode is None) != (self._encoded is None):
            raise ValueError(f"{name} export {path} has only one of the signatures "
                             f"`{ENCODE_ITEMS_SIGNATURE}` and `{ENCODED_SCORING_SIGNATURE}`")
        if self._encode is not None:
            if set(self._encode.structured_input_signature[1]) != set(self.item_inputs):
                raise ValueError(f"{name} export {path}: `{ENCODE_ITEMS_SIGNATURE}` takes "
                                 f"{sorted(self._encode.structured_input_signature[1])}, not the item inputs "
                                 f"{self.item_inputs} of `serving_default`")
            if set(self._encoded.structured_input_signature[1]) != set(inputs) | {USER_INDEX}:
                raise ValueError(f"{name} export {path}: `{ENCODED_SCORING_SIGNATURE}` takes "
                                 f"{sorted(self._encoded.structured_input_signature[1])}, not the inputs of "
                                 f"`serving_default` plus {USER_INDEX!r}")

    @property
    def encodes_items(self) -> bool:
        """Whether the export scores items encoded in advance (`encode`, `score(encoded=True)`)."""
        return self._encode is not None

    def encode(self, item_features: Mapping[str, Any]) -> Dict[str, np.ndarray]:
        """N items' features (the export's item inputs) → their encoded form, by name:
        int32 vocabulary ids ``[N]`` / ``[N, L]``, float32 standardized numeric values."""
        if self._encode is None:
            raise ValueError(f"{self.name} export {self.path} has no `{ENCODE_ITEMS_SIGNATURE}` signature")
        out = self._encode(**{n: tf.convert_to_tensor(item_features[n]) for n in self.item_inputs})
        return {n: out[n].numpy() for n in self.item_inputs}

    def score(self, user_tensors: Mapping[str, Any], item_features: Mapping[str, Any],
              user_index: Optional[np.ndarray] = None, encoded: bool = False) -> np.ndarray:
        """``[N]`` scores of N candidates: `item_features` have N rows, `user_tensors`
        batch 1 (one user, broadcast) or N (each candidate's own user); with
        `user_index` ``[N]``, `user_tensors` hold U users and candidate i is scored for
        user ``user_index[i]``. With `encoded`, `item_features` come from `encode`."""
        count = int(next(iter(item_features.values())).shape[0])
        args = {n: tf.convert_to_tensor(item_features[n]) for n in self.item_inputs}
        if encoded and self._encoded is None:
            raise ValueError(f"{self.name} export {self.path} has no `{ENCODED_SCORING_SIGNATURE}` signature")
        if encoded or (user_index is not None and self._multi is not None):  # a several-user signature
            index = np.zeros(count, np.int32) if user_index is None else np.asarray(user_index, dtype=np.int32)
            args = several_user_arguments({n: user_tensors[n] for n in self.user_inputs}, args, tf.constant(index))
            fn = self._encoded if encoded else self._multi
        elif user_index is None:
            args.update({n: user_tensors[n] for n in self.user_inputs})
            fn = self._fn
        else:
            index = tf.constant(np.asarray(user_index, dtype=np.int32))
            args.update({n: tf.gather(user_tensors[n], index) for n in self.user_inputs})
            fn = self._fn
        scores = fn(**args)["scores"].numpy().reshape(-1)
        if scores.shape[0] != count:
            raise ValueError(f"{self.name} {self.path} returned {scores.shape[0]} scores for {count} candidates")
        return scores


class QueryTower:
    """The exported query tower: user features ``[B]`` / ``[B, L]`` → ``embedding [B, D]``."""

    def __init__(self, path: str):
        self.path = path
        self._module = tf.saved_model.load(path)
        self._fn = self._module.signatures["serving_default"]
        self.inputs = sorted(self._fn.structured_input_signature[1])
        self.dim = int(self._fn.structured_outputs["embedding"].shape[-1])

    def __call__(self, user_tensors: Mapping[str, Any]) -> np.ndarray:
        missing = sorted(set(self.inputs) - set(user_tensors))
        if missing:
            raise ValueError(f"the query tower {self.path} needs user features {missing}")
        return self._fn(**{n: user_tensors[n] for n in self.inputs})["embedding"].numpy()


@dataclasses.dataclass(frozen=True)
class PreparedQuery:
    """A validated query with its user looked up (`Cascade.prepare`), ready to answer
    alone or in a batch (`Cascade.answer`).

    Attributes:
      user_id: as asked (None for a features-only query).
      row: the user's tower input row (stored features, overridden by the request's).
      known: the user id is one of the data's users.
      seen: items left out (the user's training items and the request's own history;
        empty with ``include_seen``).
      k, n_retrieval, n_pre: items returned, taken from the index, kept by the pre-ranker.
      stages: the stages the query may run (``(RETRIEVAL,)`` for `Cascade.retrieve`).
      timings, explain: what the answer carries besides the items.
      started, prepared: ``time.perf_counter()`` when preparation started and ended.
      user_ms: milliseconds spent preparing.
    """

    user_id: Optional[str]
    row: Dict[str, Any]
    known: bool
    seen: FrozenSet[str]
    k: int
    n_retrieval: int
    n_pre: int
    stages: Tuple[str, ...]
    timings: bool
    explain: bool
    started: float
    prepared: float
    user_ms: float


def data_files_signature(data_dir: str) -> Tuple:
    """Changes whenever a table the stores read is another file or is rewritten (two versions'
    copies of an unchanged table are one file, linked, and keep the stores loaded)."""
    out = []
    for name in exports.SERVING_DATA_FILES:
        try:
            st = os.stat(os.path.join(data_dir, name))
            out.append((name, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            out.append((name, None, None))
    return tuple(out)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` should be a positive integer. Received: {name}={value!r}")
    return int(value)


class Cascade:
    """Loaded exports of one version and the stores they read, answering queries.

    Build with `Cascade.load`. Attributes: ``version`` (of the retrieval models),
    ``models`` (``{model: version or None}``), ``stages`` (the stages that run).
    """

    def __init__(self, *, workdir: str, version: int, schema: Schema, query_tower: QueryTower, index: LoadedIndex,
                 users: UserStore, items: Optional[ItemStore], preranker: Optional[CandidateScorer],
                 ranker: Optional[CandidateScorer], models: Dict[str, Optional[int]], config: CascadeConfig,
                 data_signature: Tuple = (), encoded_items: Optional[Mapping[str, EncodedItems]] = None):
        if (preranker is not None or ranker is not None) and items is None:
            raise ValueError("an ItemStore is needed to run a pre-ranker or ranker")
        self.workdir, self.version, self.schema, self.config = workdir, int(version), schema, config
        self.query_tower, self.index, self.users, self.items = query_tower, index, users, items
        self.preranker, self.ranker = preranker, ranker
        self.models = dict(models)
        self.data_signature = data_signature
        self.loaded_at = time.time()
        self._index_ids = index.item_ids()
        self._item_positions = items.positions(self._index_ids) if items is not None else None
        if self._item_positions is not None and np.any(self._item_positions < 0):
            log.warning("%d indexed items are missing from the item table; they are ranked with OOV features",
                        int(np.sum(self._item_positions < 0)))
        self.stages = [RETRIEVAL] + [n for n, m in ((exports.PRERANKER, preranker), (exports.RANKER, ranker))
                                     if m is not None]
        # Every indexed item encoded once per scorer that can take items so (`encoded_items`
        # hands over the arrays of a previous cascade with the same index, items and scorer).
        self.encoded_items: Dict[str, EncodedItems] = {}
        for name, scorer in ((exports.PRERANKER, preranker), (exports.RANKER, ranker)):
            if scorer is not None and scorer.encodes_items and index.num_items > 0:
                given = (encoded_items or {}).get(name)
                self.encoded_items[name] = given if given is not None else self._encode_candidates(scorer, name)

    def _encode_candidates(self, scorer: CandidateScorer, name: str, chunk_size: int = 65536) -> EncodedItems:
        """The scorer's encoded features of every indexed item, in index order (items
        missing from the item table keep their own id, as when scored by strings)."""
        t0 = time.perf_counter()
        n = self.index.num_items
        parts = [scorer.encode(self._item_tensors(scorer, np.arange(start, min(n, start + chunk_size))))
                 for start in range(0, n, chunk_size)]
        out = EncodedItems({f: np.concatenate([p[f] for p in parts]) for f in scorer.item_inputs})
        log.info("encoded the %d indexed items for the %s in %.1f s (%.0f MB)", n, name, time.perf_counter() - t0,
                 out.nbytes / 2 ** 20)
        return out

    def _item_tensors(self, scorer: CandidateScorer, index: np.ndarray) -> Dict[str, Any]:
        """The scorer's item inputs, as strings, for the indexed items at `index` (ids from
        the index, so that items missing from the item table keep theirs)."""
        ids = self.index.item_ids_at(index) if ITEM_ID in scorer.item_inputs else None
        return self.items.tensors_at(self._item_positions[index], ids, names=scorer.item_inputs)

    # -- loading ---------------------------------------------------------------------
    @classmethod
    def load(cls, workdir: str, version: Optional[int] = None, *, config: CascadeConfig = CascadeConfig(),
             preranker_version: Optional[int] = None, ranker_version: Optional[int] = None,
             previous: Optional["Cascade"] = None, data_dir: Optional[str] = None) -> "Cascade":
        """Loads version `version` (None: `exports.serving_version`), with its own data tables.

        Args:
          workdir: the directory `recfunnel run` wrote.
          version: the retrieval models' version.
          config: stage sizes and which optional stages run.
          preranker_version, ranker_version: pin an optional model's version (None:
            `exports.stage_version`).
          previous: a loaded cascade whose unchanged parts (same model versions, same
            data files) are reused.
          data_dir: the user and item tables to serve with (default: the version's own
            copy, `exports.serving_data_dir`; evaluation passes the run's current data).

        Raises:
          FileNotFoundError: no complete version, or a required model is missing.
          ValueError: the exports do not fit together (index vs tower, scorer vs schema).
        """
        if version is None:
            version = exports.serving_version(workdir)
            if version is None:
                why = exports.nothing_to_serve(workdir)
                if exports.complete_versions(workdir):
                    raise FileNotFoundError(f"{why}; ask for a version explicitly to load it anyway")
                raise FileNotFoundError(f"{why}; run `recfunnel run --workdir {workdir}` first")
        version = int(version)
        for model in exports.REQUIRED_MODELS:
            path = exports.version_path(workdir, model, version)
            if not os.path.isdir(path):
                raise FileNotFoundError(f"export {model} version {version} is missing: {path}")
        wanted = {exports.PRERANKER: (config.use_preranker, preranker_version),
                  exports.RANKER: (config.use_ranker, ranker_version)}
        models: Dict[str, Optional[int]] = {exports.QUERY_TOWER: version, exports.INDEX: version}
        for model, (use, pinned) in wanted.items():
            v = None
            if use:
                v = int(pinned) if pinned is not None else exports.stage_version(workdir, model, version)
                if v is not None and not os.path.isdir(exports.version_path(workdir, model, v)):
                    raise FileNotFoundError(f"export {model} version {v} is missing: "
                                            f"{exports.version_path(workdir, model, v)}")
            models[model] = v

        def reusable(model):
            return (previous is not None and previous.workdir == workdir
                    and previous.models.get(model) == models[model] and models[model] is not None)

        data_dir = data_dir or exports.serving_data_dir(workdir, version)
        signature = data_files_signature(data_dir)
        same_data = previous is not None and previous.workdir == workdir and previous.data_signature == signature
        users = previous.users if same_data else UserStore(data_dir)
        schema = users.schema
        query_tower = previous.query_tower if reusable(exports.QUERY_TOWER) else QueryTower(
            exports.version_path(workdir, exports.QUERY_TOWER, version))
        index = previous.index if reusable(exports.INDEX) else load_index(
            exports.version_path(workdir, exports.INDEX, version), expected_item_tower_version=str(version),
            expected_embedding_dim=query_tower.dim)
        scorers = {}
        for model in exports.OPTIONAL_MODELS:
            if models[model] is None:
                scorers[model] = None
            elif reusable(model) and getattr(previous, model) is not None:
                scorers[model] = getattr(previous, model)
            else:
                scorers[model] = CandidateScorer(exports.version_path(workdir, model, models[model]), schema, model)
        items = None
        if any(s is not None for s in scorers.values()):
            items = previous.items if same_data and previous.items is not None else ItemStore(data_dir)
        encoded = {}
        if previous is not None and previous.index is index and previous.items is items:
            encoded = {m: a for m, a in previous.encoded_items.items() if getattr(previous, m) is scorers[m]}
        return cls(workdir=workdir, version=version, schema=schema, query_tower=query_tower, index=index,
                   users=users, items=items, preranker=scorers[exports.PRERANKER], ranker=scorers[exports.RANKER],
                   models=models, config=config, data_signature=signature, encoded_items=encoded)

    def describe(self) -> Dict[str, Any]:
        """What is loaded: versions, stages, corpus size and index parameters."""
        params = {k: v for k, v in self.index.manifest["params"].items() if k != "tuning"}
        return {"workdir": os.path.abspath(self.workdir), "version": self.version, "models": dict(self.models),
                "stages": list(self.stages),
                "skipped_stages": [s for s in STAGES if s not in self.stages],
                "num_items": self.index.num_items, "num_users": len(self.users),
                "index": params, "config": dataclasses.asdict(self.config),
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at))}

    def warm_up(self) -> None:
        """Runs one cold-start query through every stage (traces the functions, fills caches)."""
        self.recommend(OOV_TOKEN, k=min(10, self.index.num_items), allow_unknown=True, include_seen=True)
        self.retrieve(OOV_TOKEN, k=min(10, self.index.num_items), allow_unknown=True, include_seen=True)

    # -- queries ---------------------------------------------------------------------
    def _user_row(self, user_id: Optional[str], features: Optional[Mapping[str, Any]],
                  allow_unknown: bool) -> Tuple[dict, bool, List[str]]:
        """(tower input row, known user?, the request's own history items)."""
        if user_id is None and features is None:
            raise ValueError("a query needs `user_id` or `features`. Received neither")
        if user_id is not None and (not isinstance(user_id, str) or not user_id):
            raise TypeError(f"`user_id` should be a non-empty string. Received: user_id={user_id!r}")
        known = user_id is not None and user_id in self.users
        if user_id is not None and not known and features is None and not allow_unknown:
            raise UnknownUserError(
                f"unknown user id {user_id!r}: not among the {len(self.users)} users of version "
                f"{self.version} ({self.users.data_dir})")
        row = self.users.row(user_id if user_id is not None else OOV_TOKEN, allow_unknown=True)
        own_history: List[str] = []
        if features is not None:
            if not isinstance(features, Mapping):
                raise TypeError(f"`features` should be a mapping of user feature names to values. "
                                f"Received: {type(features).__name__}")
            by_name = {f.name: f for f in self.schema.user_features}
            unknown = sorted(set(features) - set(by_name))
            if unknown:
                raise ValueError(f"unknown user feature(s) {unknown}; the schema's user features are "
                                 f"{sorted(by_name)}")
            for name, value in features.items():
                feature = by_name[name]
                if feature.kind == Kind.NUMERIC:
                    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                        raise TypeError(f"feature {name!r} should be a number. Received: {value!r}")
                elif feature.kind == Kind.CATEGORICAL:
                    if not isinstance(value, (str, int, np.integer)) or isinstance(value, bool):
                        raise TypeError(f"feature {name!r} should be a string. Received: {value!r}")
                elif not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                    raise TypeError(f"feature {name!r} should be a list of strings. Received: {value!r}")
                row[name] = normalize_value(feature, value)
                if feature.kind == Kind.SEQUENCE:
                    own_history = list(row[name])
        return row, known, own_history

    def prepare(self, user_id: Optional[str] = None, features: Optional[Mapping[str, Any]] = None, k: int = 10,
                include_seen: bool = False, allow_unknown: bool = False, timings: bool = False,
                explain: bool = False, retrieval_only: bool = False, retrieval_candidates: Optional[int] = None,
                preranker_candidates: Optional[int] = None) -> "PreparedQuery":
        """Validates a query and looks up its user (arguments as in `recommend`).

        The checks that can fail on the request's own values happen here, so that a
        batch of prepared queries (`answer`) fails only on a fault of the models.
        """
        t0 = time.perf_counter()
        k = _positive_int("k", k)
        if retrieval_only:
            n_retrieval, n_pre, stages = k, k, (RETRIEVAL,)
        else:
            n_retrieval = max(k, _positive_int("retrieval_candidates", retrieval_candidates or
                                               self.config.retrieval_candidates))
            n_pre = max(k, _positive_int("preranker_candidates", preranker_candidates or
                                         self.config.preranker_candidates))
            stages = STAGES
        row, known, own_history = self._user_row(user_id, features, allow_unknown)
        seen = set()
        if not include_seen:
            if known:
                seen.update(self.users.seen(user_id))
            seen.update(own_history)
        now = time.perf_counter()
        return PreparedQuery(user_id=user_id, row=row, known=known, seen=frozenset(seen), k=k,
                             n_retrieval=n_retrieval, n_pre=n_pre, stages=stages, timings=bool(timings),
                             explain=bool(explain), started=t0, prepared=now,
                             user_ms=round(1e3 * (now - t0), 3))

    def answer(self, queries: Sequence["PreparedQuery"]) -> List[Dict[str, Any]]:
        """Answers prepared queries together: one query-tower call, one index search and
        one call per scoring stage for the whole batch.

        Each answer is the one the query gets alone, except that the index is searched
        once, as deep as the deepest query of the batch needs: exact search returns the
        same items, ScaNN re-scores at least as many candidates (its recall can only
        rise). Stage timings are those of the batch; ``batch_size`` says how many
        queries shared it.
        """
        if not queries:
            return []
        t_start = time.perf_counter()
        clock: Dict[str, float] = {}

        def lap(name, start):
            now = time.perf_counter()
            clock[name] = round(1e3 * (now - start), 3)
            return now

        b = len(queries)
        user_batch = padded_batch(self.schema, "user", [q.row for q in queries])
        user_tensors = {n: tf.constant(v) for n, v in user_batch.items()}
        embeddings = self.query_tower(user_tensors)
        t = lap("query_tower", t_start)

        fetch = [min(self.index.num_items, q.n_retrieval + len(q.seen)) for q in queries]
        all_scores, all_indices = self.index.search_indices(embeddings, max(fetch))
        t = lap("index", t)

        # Per query: drop padding (non-finite scores: an index saved before searches were
        # widened for rows short of points pads them), keep its own depth, drop seen items
        # and repeats.
        cand_index: List[np.ndarray] = []
        cand_ids: List[np.ndarray] = []
        stage_scores: List[Dict[str, np.ndarray]] = []
        for j, q in enumerate(queries):
            scores, indices = all_scores[j][:fetch[j]], all_indices[j][:fetch[j]]
            valid = np.isfinite(scores)
            scores, indices = scores[valid], indices[valid]
            ids = self._index_ids[indices]
            keep = (np.arange(len(ids)) if not q.seen else
                    np.flatnonzero(np.fromiter((i not in q.seen for i in ids), bool, len(ids))))
            _, first = np.unique(indices[keep], return_index=True)
            if len(first) < len(keep):
                keep = keep[np.sort(first)]
            keep = keep[:q.n_retrieval]
            cand_index.append(indices[keep])
            cand_ids.append(ids[keep])
            stage_scores.append({RETRIEVAL: scores[keep].astype(np.float64)})
        counts = [{RETRIEVAL: len(c)} for c in cand_ids]
        ran = [[RETRIEVAL] for _ in queries]
        t = lap("filter", t)

        scorers = [(name, scorer, [q.n_pre if name == exports.PRERANKER else q.k for q in queries])
                   for name, scorer in ((exports.PRERANKER, self.preranker), (exports.RANKER, self.ranker))
                   if scorer is not None]
        gather_ms = 0.0
        for name, scorer, limits in scorers:
            group = [j for j, q in enumerate(queries) if len(cand_ids[j]) and name in q.stages]
            if not group:
                continue
            # The candidates' features, only those this model takes: rows of the items
            # encoded at load (integers), or for older exports the items' strings.
            t_gather = time.perf_counter()
            index = np.concatenate([cand_index[j] for j in group])
            encoded = self.encoded_items.get(name)
            feats = encoded.at(index) if encoded is not None else self._item_tensors(scorer, index)
            gathered = time.perf_counter() - t_gather
            gather_ms += 1e3 * gathered
            t += gathered  # the stage's own time leaves the gathering out
            sizes = [len(cand_ids[j]) for j in group]
            if len(group) == 1:  # one user: its batch-1 row is broadcast by the model
                users = {n: v[group[0]:group[0] + 1] for n, v in user_tensors.items()}
                owner = None
            else:
                users = user_tensors if len(group) == b else {
                    n: tf.gather(v, np.asarray(group)) for n, v in user_tensors.items()}
                owner = np.repeat(np.arange(len(group)), sizes)
            s_all = scorer.score(users, feats, owner, encoded=encoded is not None).astype(np.float64)
            for j, s in zip(group, np.split(s_all, np.cumsum(sizes)[:-1])):
                order = np.argsort(-s, kind="stable")[:limits[j]]
                cand_index[j] = cand_index[j][order]
                cand_ids[j] = cand_ids[j][order]
                stage_scores[j] = {st: v[order] for st, v in stage_scores[j].items()}
                stage_scores[j][name] = s[order]
                counts[j][name] = int(len(order))
                ran[j].append(name)
            t = lap(name, t)
        if any(len(r) > 1 for r in ran):
            clock["item_features"] = round(gather_ms, 3)

        end = time.perf_counter()
        out = []
        for j, q in enumerate(queries):
            final = stage_scores[j][ran[j][-1]]
            items = []
            for i in range(min(q.k, len(cand_ids[j]))):
                item = {"item_id": str(cand_ids[j][i]), "score": float(final[i])}
                if q.explain:
                    item["stage_scores"] = {st: float(v[i]) for st, v in stage_scores[j].items()}
                items.append(item)
            answer: Dict[str, Any] = {
                "user_id": q.user_id, "items": items, "version": self.version, "cold_start": not q.known,
                "stages": ran[j], "skipped_stages": [s for s in STAGES if s not in ran[j]],
                "models": {m: v for m, v in self.models.items()
                           if m in (exports.QUERY_TOWER, exports.INDEX) or m in ran[j]},
            }
            if q.explain:
                answer["candidates"] = counts[j]
                answer["seen_excluded"] = len(q.seen)
            if q.timings or q.explain:
                timing = {"user_features": q.user_ms, "wait": round(1e3 * max(0.0, t_start - q.prepared), 3)}
                timing.update({k: v for k, v in clock.items() if k in ("query_tower", "index", "filter")
                               or k in ran[j] or (k == "item_features" and len(ran[j]) > 1)})
                timing["total"] = round(1e3 * (end - q.started), 3)
                answer["timings_ms"] = timing
                answer["batch_size"] = b
            out.append(answer)
        return out

    def recommend(self, user_id: Optional[str] = None, features: Optional[Mapping[str, Any]] = None, k: int = 10,
                  include_seen: bool = False, allow_unknown: bool = False, timings: bool = False,
                  explain: bool = False, retrieval_candidates: Optional[int] = None,
                  preranker_candidates: Optional[int] = None) -> Dict[str, Any]:
        """The k best items for one user through every loaded stage.

        Args:
          user_id: a known user, or (with `features` or `allow_unknown`) any id.
          features: user features by name, overriding the stored ones (categorical:
            str, numeric: number, multi-valued/sequence: list of str, oldest first).
          k: items returned (distinct; fewer only when the corpus runs out).
          include_seen: keep the user's training items (and the items of a history
            sent in `features`); by default they are removed before ranking.
          allow_unknown: answer an unknown id without features as a cold-start user
            (OOV features, empty history).
          timings: add ``timings_ms``: ``user_features`` (this query's lookup), ``wait``
            (queued for a batch), the stages of its batch (``query_tower``, ``index``,
            ``filter``, ``item_features``, ``preranker``, ``ranker``) and ``total``; and
            ``batch_size``.
          explain: add per-item ``stage_scores``, per-stage candidate counts and timings.
          retrieval_candidates, preranker_candidates: override the stage sizes (each at
            least k).

        Returns:
          ``{"user_id", "items": [{"item_id", "score"}], "version", "cold_start", "stages",
          "skipped_stages", "models"[, "timings_ms", "batch_size", "candidates",
          "seen_excluded"]}``.

        Raises:
          UnknownUserError: unknown `user_id`, no `features`, `allow_unknown` False.
          ValueError, TypeError: a bad argument or feature value (the message names it).
        """
        return self.answer([self.prepare(user_id, features, k, include_seen, allow_unknown, timings, explain,
                                         retrieval_candidates=retrieval_candidates,
                                         preranker_candidates=preranker_candidates)])[0]

    def retrieve(self, user_id: Optional[str] = None, features: Optional[Mapping[str, Any]] = None, k: int = 10,
                 include_seen: bool = False, allow_unknown: bool = False, timings: bool = False,
                 explain: bool = False) -> Dict[str, Any]:
        """The k best items of the retrieval stage alone (arguments as in `recommend`)."""
        return self.answer([self.prepare(user_id, features, k, include_seen, allow_unknown, timings, explain,
                                         retrieval_only=True)])[0]


__all__ = ["Cascade", "CascadeConfig", "CandidateScorer", "PreparedQuery", "QueryTower", "STAGES", "RETRIEVAL",
           "UnknownUserError"]
