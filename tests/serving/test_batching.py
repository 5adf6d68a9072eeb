import threading
import time

import pytest

from serving.batching import BatcherClosedError, MicroBatcher


class Recorder:
    """fn(key, items) that records its calls; blocks until released when `gate` is set."""

    def __init__(self, gate=None, fail_on=None):
        self.calls, self.gate, self.fail_on = [], gate, fail_on
        self.lock = threading.Lock()
        self.entered = threading.Event()

    def __call__(self, key, items):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        with self.lock:
            self.calls.append((key, list(items)))
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [(key, i * 10) for i in items]


def _wait_until(condition, timeout=10.0):
    deadline = time.perf_counter() + timeout
    while not condition():
        assert time.perf_counter() < deadline, "timed out"
        time.sleep(0.001)


def _submit_all(batcher, items, keys=None, first_alone=None):
    """Submits from one thread per item, 10 ms apart; with `first_alone` (a Recorder,
    whose call is held at its gate), the others only once the first call has started (so
    the first item runs alone), each one once the one before it is waiting in the queue
    (so they queue in order however the threads are scheduled)."""
    results, errors, threads = {}, {}, []

    def one(i, key):
        try:
            results[i] = batcher.submit(i, key=key)
        except Exception as e:  # noqa: BLE001
            errors[i] = e

    for n, i in enumerate(items):
        threads.append(threading.Thread(target=one, args=(i, keys[n] if keys else None)))
        threads[-1].start()
        if first_alone is None:
            time.sleep(0.01)
        elif n == 0:
            assert first_alone.entered.wait(10)
        else:
            _wait_until(lambda: batcher._queue.qsize() >= n)
    return threads, results, errors


def test_waiting_items_are_answered_together_and_in_order():
    gate = threading.Event()
    fn = Recorder(gate)
    batcher = MicroBatcher(fn, max_batch_size=4)
    threads, results, errors = _submit_all(batcher, range(7), first_alone=fn)
    gate.set()  # the first call holds item 0; items 1..6 queue behind it
    for t in threads:
        t.join(10)
    batcher.close()
    assert not errors and results == {i: (None, i * 10) for i in range(7)}
    sizes = [len(items) for _, items in fn.calls]
    assert sizes == [1, 4, 2] and [i for _, items in fn.calls for i in items] == list(range(7))
    assert batcher.stats() == {"batches": 3, "items": 7, "largest_batch": 4, "mean_batch": 2.333}


def test_items_of_different_keys_are_never_mixed():
    gate = threading.Event()
    fn = Recorder(gate)
    batcher = MicroBatcher(fn, max_batch_size=16)
    a, b = object(), object()
    threads, results, errors = _submit_all(batcher, range(6), keys=[a, a, b, a, b, b], first_alone=fn)
    gate.set()
    for t in threads:
        t.join(10)
    batcher.close()
    assert not errors
    for key, items in fn.calls:
        assert all(results[i][0] is key for i in items)
    assert sorted(i for _, items in fn.calls for i in items) == list(range(6))
    assert [len(items) for _, items in fn.calls] == [1, 2, 3]  # item 0, then the waiting a's, then the b's


def test_a_failing_item_fails_only_its_own_request():
    gate = threading.Event()
    fn = Recorder(gate, fail_on=3)
    batcher = MicroBatcher(fn, max_batch_size=8)
    threads, results, errors = _submit_all(batcher, range(6), first_alone=fn)
    gate.set()
    for t in threads:
        t.join(10)
    batcher.close()
    assert set(errors) == {3} and isinstance(errors[3], ValueError) and "bad item 3" in str(errors[3])
    assert results == {i: (None, i * 10) for i in (0, 1, 2, 4, 5)}
    # The batch of items 1..5 failed as a whole, then each of its items was answered alone.
    assert [items for _, items in fn.calls] == [[0], [1, 2, 3, 4, 5], [1], [2], [3], [4], [5]]


def test_wrong_result_count_is_an_error_for_every_item():
    batcher = MicroBatcher(lambda key, items: [], max_batch_size=4)
    with pytest.raises(RuntimeError, match="returned 0 results for 1 items"):
        batcher.submit(1)
    batcher.close()


def test_wait_collects_later_items_only_once_requests_arrive_together():
    gate = threading.Event()
    fn = Recorder(gate)
    batcher = MicroBatcher(fn, max_batch_size=8, max_wait_ms=2000)
    gate.set()
    start = time.perf_counter()
    assert batcher.submit("alone") == (None, "alone" * 10)
    assert time.perf_counter() - start < 1.5  # a lone request does not wait
    gate.clear()
    fn.entered.clear()
    threads, _, errors = _submit_all(batcher, [0, 1, 2, 3], first_alone=fn)  # 1..3 queue behind 0
    gate.set()
    for t in threads:
        t.join(10)
    # The last batch held 3 items: the next one waits for items arriving 10 ms apart until
    # it holds 3 (not for the whole 2 s).
    start = time.perf_counter()
    more, results, more_errors = _submit_all(batcher, [4, 5, 6])
    for t in more[:3]:
        t.join(10)
    assert time.perf_counter() - start < 1.5
    batcher.close()
    assert not errors and not more_errors and results == {i: (None, i * 10) for i in (4, 5, 6)}
    assert [len(items) for _, items in fn.calls] == [1, 1, 3, 3]


def test_two_workers_and_close():
    fn = Recorder()
    batcher = MicroBatcher(fn, max_batch_size=2, workers=2)
    threads, results, errors = _submit_all(batcher, range(10))
    for t in threads:
        t.join(10)
    batcher.close()
    batcher.close()  # idempotent
    assert not errors and len(results) == 10
    with pytest.raises(BatcherClosedError):
        batcher.submit(1)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_batch_size": 0}, "max_batch_size"), ({"workers": 0}, "workers"), ({"workers": 1.5}, "workers"),
    ({"max_wait_ms": -1}, "max_wait_ms"), ({"max_wait_ms": float("nan")}, "max_wait_ms")])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MicroBatcher(lambda key, items: items, **kwargs)
