"""prefetch: the same items, computed ahead in one thread of their own,
errors and early stops handed over."""

import threading
import time

import pytest

from prelabel.prefetch import Behind, prefetch


def test_same_items_in_order_and_ahead():
    produced = []

    def make():
        for i in range(5):
            produced.append(i)
            yield i

    it = prefetch(make)
    assert next(it) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert produced[:2] == [0, 1]  # the next one was computed meanwhile
    assert list(it) == [1, 2, 3, 4]


def test_the_iterator_lives_in_one_other_thread():
    seen, closed = set(), []

    def make():
        seen.add(threading.get_ident())
        try:
            for i in range(3):
                seen.add(threading.get_ident())
                yield i
        finally:
            closed.append(threading.get_ident())

    assert list(prefetch(make)) == [0, 1, 2]
    assert len(seen) == 1 and threading.get_ident() not in seen
    assert closed == list(seen)


def test_an_error_is_raised_at_its_item():
    def make():
        yield 1
        raise KeyError("boom")

    it = prefetch(make)
    assert next(it) == 1
    with pytest.raises(KeyError, match="boom"):
        next(it)


def test_stopping_early_closes_the_producer():
    closed = threading.Event()

    def make():
        try:
            yield from range(1000)
        finally:
            closed.set()

    for i in prefetch(make, depth=2):
        if i == 3:
            break
    assert closed.wait(5)
    assert not [
        t for t in threading.enumerate() if t.name == "prelabel-prefetch"
    ]


def test_behind_runs_in_order_in_one_thread_and_raises_errors():
    done, threads = [], set()

    def work(i):
        threads.add(threading.get_ident())
        time.sleep(0.01)
        done.append(i)

    with Behind(depth=2) as behind:
        for i in range(6):
            behind.put(work, i)
            assert len(done) >= i - 2  # never more than 2 behind
    assert done == list(range(6))
    assert len(threads) == 1 and threading.get_ident() not in threads

    def fail(i):
        if i == 1:
            raise ValueError("write failed")

    with pytest.raises(ValueError, match="write failed"):
        with Behind() as behind:
            for i in range(4):
                behind.put(fail, i)


def test_behind_drops_queued_calls_when_the_block_raises():
    done = []
    with pytest.raises(RuntimeError, match="caller"):
        with Behind(depth=3) as behind:
            behind.put(time.sleep, 0.2)
            behind.put(done.append, 1)
            raise RuntimeError("caller")
    assert done == []  # queued behind the running call: cancelled
