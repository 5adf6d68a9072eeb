"""What the scheduled job needs to be safe to re-run: a workdir lock, stage manifests and fingerprints.

Each stage records ``<workdir>/state/<stage>.json`` when it finishes: a fingerprint of
everything it depends on (its config section, the fingerprints of the stages before
it, and for the data stage the content hashes of the input files) and a summary of
what it produced. A re-run skips a stage whose fingerprint is unchanged and whose
outputs are still there; a changed fingerprint re-runs it and everything after it.
"""

from __future__ import annotations

import errno
import fcntl
import glob as globlib
import hashlib
import json
import os
import time
from typing import Any, Dict, Iterable, List, Optional

STATE_DIR = "state"
LOCK_FILE = ".recfunnel.lock"


class WorkdirLocked(RuntimeError):
    """Another process holds the workdir's lock."""


class WorkdirLock:
    """An exclusive, non-blocking lock on a workdir (``flock``: released when the process dies).

    Usage::

        with WorkdirLock(workdir):
            ...
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd: Optional[int] = None

    def __enter__(self) -> "WorkdirLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise WorkdirLocked(f"another recfunnel run holds {self.path} ({holder}); "
                                    "wait for it to finish or use another --workdir") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}".encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def digest(value: Any) -> str:
    """Stable sha256 of a JSON-serializable value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def content_hash(paths: Iterable[str]) -> str:
    """sha256 over the names and bytes of files (directories walked, glob patterns expanded; sorted)."""
    h = hashlib.sha256()
    files: List[str] = []
    concrete: List[str] = []
    for p in paths:
        if not os.path.exists(p) and globlib.has_magic(p):  # a pattern: the files it matches now
            h.update(f"glob:{p}".encode())
            for match in sorted(globlib.glob(p)):
                h.update(f"match:{match}".encode())
                concrete.append(match)
        else:
            concrete.append(p)
    for p in concrete:
        if os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs.sort()
                files.extend(os.path.join(root, n) for n in sorted(names))
        elif os.path.exists(p):
            files.append(p)
        else:
            h.update(f"missing:{p}".encode())
    for f in files:
        h.update(os.path.basename(f).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class StageState:
    """Reads and writes the per-stage manifests of a workdir."""

    def __init__(self, workdir: str):
        self.dir = os.path.join(workdir, STATE_DIR)

    def _path(self, stage: str) -> str:
        return os.path.join(self.dir, f"{stage}.json")

    def load(self, stage: str) -> Optional[Dict[str, Any]]:
        try:
            with open(self._path(stage)) as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def is_current(self, stage: str, fingerprint: str, outputs: Iterable[str] = ()) -> bool:
        record = self.load(stage)
        return bool(record and record.get("fingerprint") == fingerprint
                    and all(os.path.exists(o) for o in outputs))

    def record(self, stage: str, fingerprint: str, summary: Dict[str, Any]) -> None:
        os.makedirs(self.dir, exist_ok=True)
        tmp = self._path(stage) + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"stage": stage, "fingerprint": fingerprint, "finished_at": time.time(),
                       "summary": summary}, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._path(stage))

    def invalidate(self, stages: Iterable[str]) -> None:
        for stage in stages:
            try:
                os.remove(self._path(stage))
            except FileNotFoundError:
                pass
