"""Micro-batching: concurrent calls answered together by one batched call.

    batcher = MicroBatcher(lambda key, items: key.answer(items), max_batch_size=16)
    result = batcher.submit(prepared_query, key=cascade)   # blocks; from many threads

A request thread submits its item and waits. A worker thread takes the oldest waiting
item and every other item already waiting (up to `max_batch_size`; with `max_wait_ms`,
when the previous batch held n > 1 items — requests are arriving together — it waits up
to that long until the batch holds n, so that the clients of the last batch, whose next
requests are on their way, join the next one; a lone client never waits), and makes one
call per key (`fn(key, items)`):
items with different keys — queries of two loaded versions during a reload — are never
mixed. Under light load a batch is one item and nothing waits; under heavy load the
batches grow, and the per-call costs (a TensorFlow function call, an index search) are
paid once per batch instead of once per request.

If a batched call raises, each of its items is retried alone, so that one bad item
fails only its own request; the exception of an item's own call is raised in the
thread that submitted it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Hashable, List, Optional, Sequence

log = logging.getLogger("recfunnel.serving")


class _Pending:
    __slots__ = ("item", "key", "done", "result", "error")

    def __init__(self, item: Any, key: Hashable):
        self.item, self.key = item, key
        self.done = threading.Event()
        self.result: Any = None
        self.error: Optional[BaseException] = None


class BatcherClosedError(RuntimeError):
    """The batcher was closed before the item was answered."""


def batch_stats(batches: int = 0, items: int = 0, largest_batch: int = 0) -> dict:
    """`MicroBatcher.stats`' report (by default, of a batcher that has run nothing)."""
    return {"batches": batches, "items": items, "largest_batch": largest_batch,
            "mean_batch": round(items / batches, 3) if batches else 0.0}


class MicroBatcher:
    """Answers items submitted from many threads in batches.

    Args:
      fn: ``fn(key, items) -> results``, one result per item, in order.
      max_batch_size: the most items in one call (1 = every item alone).
      workers: threads making calls; a second worker overlaps one batch's Python work
        with another's TensorFlow work.
      max_wait_ms: how long a worker may wait for more items after the first one of a
        batch, until the batch is as large as the previous one (0 = take only what is
        already waiting). Under concurrent load, waiting a few milliseconds lets the
        requests of the last batch's clients come back and join, so batches stay large.
      name: thread name prefix.
    """

    def __init__(self, fn: Callable[[Hashable, List[Any]], Sequence[Any]], max_batch_size: int = 16,
                 workers: int = 1, max_wait_ms: float = 0.0, name: str = "recfunnel-batcher"):
        for arg, value in (("max_batch_size", max_batch_size), ("workers", workers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{arg}` should be a positive integer. Received: {arg}={value!r}")
        if not max_wait_ms >= 0:
            raise ValueError(f"`max_wait_ms` should be >= 0. Received: max_wait_ms={max_wait_ms!r}")
        self.fn, self.max_batch_size, self.max_wait = fn, max_batch_size, max_wait_ms / 1e3
        self._queue: "queue.Queue[Optional[_Pending]]" = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self.batches = 0
        self.items = 0
        self.largest_batch = 0
        self._last_batch = 1  # the size of the batch run last: > 1 means concurrent load
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, item: Any, key: Hashable = None) -> Any:
        """The result of `item` (blocks until its batch is done); re-raises its error."""
        pending = _Pending(item, key)
        with self._lock:
            if self._closed:
                raise BatcherClosedError("the batcher is closed")
            self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result

    def stats(self) -> dict:
        """Batches taken, items in them, mean and largest batch size (a batch counts from
        the moment a worker takes it, before its items are answered)."""
        with self._lock:
            return batch_stats(self.batches, self.items, self.largest_batch)

    def close(self, timeout: float = 30.0) -> None:
        """Stops the workers after the items already submitted; later submits raise."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for _ in self._threads:
                self._queue.put(None)
        for t in self._threads:
            t.join(timeout=timeout)

    # -- workers ---------------------------------------------------------------------
    def _collect(self, first: _Pending) -> List[_Pending]:
        batch = [first]
        crowd = min(self.max_batch_size, self._last_batch)  # the size worth waiting for
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                if len(batch) < crowd and remaining > 0:
                    nxt = self._queue.get(timeout=remaining)
                else:
                    nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:  # a stop marker: put it back for the loop to see after this batch
                self._queue.put(None)
                break
            batch.append(nxt)
        return batch

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = self._collect(first)
            with self._lock:  # counted before the answers go out, so a client sees its own batch
                self._last_batch = len(batch)
                self.batches += 1
                self.items += len(batch)
                self.largest_batch = max(self.largest_batch, len(batch))
            groups: dict = {}
            for p in batch:
                groups.setdefault(id(p.key), []).append(p)
            for group in groups.values():
                self._run(group)

    def _run(self, group: List[_Pending]) -> None:
        try:
            results = list(self.fn(group[0].key, [p.item for p in group]))
            if len(results) != len(group):
                raise RuntimeError(f"the batched call returned {len(results)} results for {len(group)} items")
        except BaseException as e:  # noqa: BLE001  (delivered to the submitting threads)
            if len(group) > 1:
                log.debug("a batch of %d failed (%s: %s); answering its items one by one", len(group),
                          type(e).__name__, e)
                for p in group:
                    self._run([p])
                return
            group[0].error = e
            group[0].done.set()
            return
        for p, r in zip(group, results):
            p.result = r
            p.done.set()


__all__ = ["MicroBatcher", "BatcherClosedError", "batch_stats"]
