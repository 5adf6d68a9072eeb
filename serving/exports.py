"""Layout of the exported models under a workdir, and how versions are found.

    <workdir>/export/query_tower/<version>/   SavedModel, signature serving_default
    <workdir>/export/item_tower/<version>/    SavedModel, signatures serving_default, log_q
    <workdir>/export/index/<version>/         manifest.json + saved_model/ (see serving.index)
    <workdir>/export/preranker/<version>/     optional SavedModel, signature serving_default
    <workdir>/export/ranker/<version>/        optional SavedModel, signature serving_default
    <workdir>/export/serving_data/<version>/  the user, history and item tables the version
                                              serves with (a copy of ``<workdir>/data``)

Versions are positive integers; a version directory appears only complete (it is
written under a temporary name and renamed). ``<workdir>/export/promoted.json`` names the
version that passed the quality gates; serving and queries load it by default.
``<workdir>/export/rejected.json`` lists the versions a gate turned down: with no promoted
version yet, serving takes the newest complete version not among them.

A version serves with its own copy of the data tables, so a later run that rewrites
``<workdir>/data`` (and whose version a gate may reject) does not change what the
served version knows about users and items. Versions exported before these copies
existed serve with ``<workdir>/data``.

The query tower, item tower and index of one version belong together (the required
models). The pre-ranker and ranker score (user, item) feature pairs and depend on no
retrieval model: serving uses the one with the same version number when it exists,
else the newest one that passed its run's gate (`stage_version`). Version numbers are shared by all models
(`next_version`), so a ranker exported on its own schedule never collides with a
retrieval version.
"""

from __future__ import annotations

import os
import json
import time
from typing import Any, Dict, List, Optional

from models import data_layout as layout

EXPORT_DIR = "export"
DATA_DIR = "data"
QUERY_TOWER = "query_tower"
ITEM_TOWER = "item_tower"
INDEX = "index"
PRERANKER = "preranker"
RANKER = "ranker"
REQUIRED_MODELS = (QUERY_TOWER, ITEM_TOWER, INDEX)
OPTIONAL_MODELS = (PRERANKER, RANKER)
MODELS = REQUIRED_MODELS + OPTIONAL_MODELS
SERVING_DATA = "serving_data"
# Every versioned directory under export/: the models and the data they serve with.
ARTIFACTS = MODELS + (SERVING_DATA,)
SERVING_DATA_FILES = (layout.SCHEMA_FILE, layout.USERS_FILE, layout.USER_HISTORY_FILE, layout.ITEMS_FILE)
PROMOTED_FILE = "promoted.json"
REJECTED_FILE = "rejected.json"


def model_dir(workdir: str, model: str) -> str:
    if model not in ARTIFACTS and not model.isidentifier():
        raise ValueError(f"unknown export {model!r}")
    return os.path.join(workdir, EXPORT_DIR, model)


def versions(workdir: str, model: str) -> List[int]:
    """Complete versions of an export, ascending."""
    d = model_dir(workdir, model)
    if not os.path.isdir(d):
        return []
    return sorted(int(v) for v in os.listdir(d) if v.isdigit() and os.path.isdir(os.path.join(d, v)))


def latest_version(workdir: str, model: str) -> Optional[int]:
    vs = versions(workdir, model)
    return vs[-1] if vs else None


def next_version(workdir: str) -> int:
    """One more than the highest version of any export, optional ones included.

    All exports of a run share it; an optional model exported on its own gets a
    number above every existing version, so it never shadows an older run's model.
    """
    highest = [latest_version(workdir, m) or 0 for m in ARTIFACTS]
    return max(highest) + 1


def version_path(workdir: str, model: str, version: int) -> str:
    return os.path.join(model_dir(workdir, model), str(int(version)))


class BadRecordError(ValueError):
    """``promoted.json`` or ``rejected.json`` cannot be read as what it should hold."""


def _read_record(path: str) -> Optional[Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise BadRecordError(f"{path}: not a readable JSON record: {e}") from None


def promoted(workdir: str) -> Optional[Dict[str, Any]]:
    """The promotion record (``version``, ``metrics``, ``promoted_at``), or None.

    Raises:
      BadRecordError: the file exists and is not a JSON object with an integer ``version``.
    """
    path = os.path.join(workdir, EXPORT_DIR, PROMOTED_FILE)
    record = _read_record(path)
    if record is not None and not (isinstance(record, dict) and isinstance(record.get("version"), int)
                                   and not isinstance(record["version"], bool)):
        raise BadRecordError(f"{path}: should be a JSON object with an integer \"version\". Received: "
                             f"{json.dumps(record)[:200]}")
    return record


def promoted_version(workdir: str) -> Optional[int]:
    record = promoted(workdir)
    return int(record["version"]) if record else None


def complete_versions(workdir: str) -> List[int]:
    """Versions present for every required model, ascending."""
    complete = None
    for model in REQUIRED_MODELS:
        vs = set(versions(workdir, model))
        complete = vs if complete is None else complete & vs
    return sorted(complete or ())


def rejected_versions(workdir: str) -> Dict[int, str]:
    """Versions a quality gate turned down, with the gate's reason.

    Raises:
      BadRecordError: the file exists and is not a JSON object of version → reason.
    """
    path = os.path.join(workdir, EXPORT_DIR, REJECTED_FILE)
    record = _read_record(path)
    if record is None:
        return {}
    if not isinstance(record, dict) or not all(v.isdigit() for v in record):
        raise BadRecordError(f"{path}: should be a JSON object of version number → reason. Received: "
                             f"{json.dumps(record)[:200]}")
    return {int(v): str(reason) for v, reason in record.items()}


def write_rejected(workdir: str, rejected: Dict[int, str]) -> None:
    """Atomically replaces the record of rejected versions."""
    _write_json(os.path.join(workdir, EXPORT_DIR, REJECTED_FILE), {str(v): r for v, r in sorted(rejected.items())})


def serving_version(workdir: str) -> Optional[int]:
    """The version serving loads by default: the promoted one; before any promotion, the
    newest complete one that no quality gate rejected."""
    v = promoted_version(workdir)
    if v is not None:
        return v
    rejected = rejected_versions(workdir)
    complete = [v for v in complete_versions(workdir) if v not in rejected]
    return complete[-1] if complete else None


def nothing_to_serve(workdir: str) -> str:
    """Why `serving_version` finds no version: every complete one was turned down by its gate
    (with the reasons), or none is exported."""
    complete, rejected = complete_versions(workdir), rejected_versions(workdir)
    if complete and all(v in rejected for v in complete):
        reasons = "; ".join(f"version {v}: {rejected[v]}" for v in complete)
        return f"no version of {workdir} passed the quality gate ({reasons})"
    return f"nothing exported under {model_dir(workdir, INDEX)}"


def serving_data_dir(workdir: str, version: int) -> str:
    """The data tables version `version` serves with: its own copy, else ``<workdir>/data``."""
    path = version_path(workdir, SERVING_DATA, version)
    return path if os.path.isdir(path) else os.path.join(workdir, DATA_DIR)


def stage_version(workdir: str, model: str, version: int) -> Optional[int]:
    """The version of an optional model served with retrieval `version`.

    The same version number when that export exists; else the newest one that a quality
    gate did not turn down and that is either part of a complete run no newer than
    `version` or exported on its own (no retrieval model or serving data under its
    number). A model of a run still in progress, or of a run its gate rejected, is
    never chosen. None when there is none.
    """
    if model not in OPTIONAL_MODELS:
        raise ValueError(f"`model` should be one of {OPTIONAL_MODELS}. Received: model={model!r}")
    vs = versions(workdir, model)
    if int(version) in vs:
        return int(version)
    rejected = rejected_versions(workdir)
    complete = set(complete_versions(workdir))
    of_runs = {v for m in REQUIRED_MODELS + (SERVING_DATA,) for v in versions(workdir, m)}
    eligible = [v for v in vs if v not in rejected and ((v in complete and v <= int(version)) or v not in of_runs)]
    return eligible[-1] if eligible else None


def write_promoted(workdir: str, version: int, metrics: Dict[str, Any],
                   data_fingerprint: Optional[str] = None) -> None:
    """Atomically records `version` as the promoted one, with the metrics of its gate and the
    fingerprint of the data they were measured on."""
    record = {"version": int(version), "metrics": metrics,
              "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if data_fingerprint is not None:
        record["data_fingerprint"] = data_fingerprint
    _write_json(os.path.join(workdir, EXPORT_DIR, PROMOTED_FILE), record)


def _write_json(path: str, value: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
