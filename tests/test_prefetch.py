"""prefetch: the same items, computed ahead in one thread of their own
or in a forked process, errors and early stops handed over; a forked
child holds none of the parent's file locks and dies with it."""

import fcntl
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
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


# ---- in a forked process ----------------------------------------------


def test_forked_items_come_in_order_from_another_process():
    def make():
        for i in range(5):
            yield i, os.getpid()

    items = list(prefetch(make, fork=True))
    assert [i for i, _ in items] == list(range(5))
    pids = {pid for _, pid in items}
    assert len(pids) == 1 and os.getpid() not in pids
    assert multiprocessing.active_children() == []


def test_a_forked_error_is_raised_at_its_item_with_its_traceback():
    def make():
        yield 1
        raise KeyError("boom")

    it = prefetch(make, fork=True)
    assert next(it) == 1
    with pytest.raises(KeyError, match="boom") as info:
        next(it)
    assert "in the process reading ahead" in info.value.__notes__[0]
    assert "raise KeyError" in info.value.__notes__[0]


class _Unpicklable(Exception):
    def __init__(self, a, b):
        super().__init__(a)
        self.b = b


def test_an_error_that_cannot_cross_the_pipe_is_described():
    def make():
        raise _Unpicklable("lost", 2)
        yield

    with pytest.raises(RuntimeError, match="_Unpicklable: lost"):
        list(prefetch(make, fork=True))


def test_a_child_that_dies_is_an_error_not_a_hang():
    def make():
        yield 1
        os._exit(3)

    it = prefetch(make, fork=True)
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="exit code 3"):
        next(it)


def test_stopping_early_ends_the_child():
    def make():
        i = 0
        while True:
            yield i
            i += 1

    for i in prefetch(make, fork=True):
        if i == 3:
            break
    assert multiprocessing.active_children() == []


def test_the_child_keeps_none_of_the_parents_file_locks(tmp_path):
    """An index's lock is a ``flock`` on a file the parent has open: the
    child's copy of the file would keep it locked after the parent closed
    it (and a reopened index would wait for the child)."""
    path = str(tmp_path / "lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def make():
        for i in range(1000):
            yield i
            time.sleep(0.01)

    it = prefetch(make, fork=True)
    assert next(it) == 0
    os.close(fd)  # the parent lets go; the child is still reading
    other = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free
    finally:
        os.close(other)
        it.close()


def test_the_child_dies_with_a_killed_parent(tmp_path):
    code = textwrap.dedent("""
        import os, sys, time
        from prelabel.prefetch import prefetch

        def make():
            yield os.getpid()
            while True:
                yield b"x" * 1_000_000
                time.sleep(0.05)

        it = prefetch(make, fork=True)
        print(next(it), flush=True)
        time.sleep(60)
        """)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True
    )
    try:
        child = int(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        if proc.poll() is None:
            proc.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _in_a_daemon(out):
    def make():
        yield from (os.getpid(), os.getpid())

    out.put(sorted(set(prefetch(make, fork=True))) + [os.getpid()])


def test_a_daemonic_process_reads_in_a_thread():
    """A daemonic ``multiprocessing`` child may not have children (a
    delegated worker pool's): there ``fork=True`` reads in a thread."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    proc = ctx.Process(target=_in_a_daemon, args=(out,), daemon=True)
    proc.start()
    try:
        item_pid, own_pid = out.get(timeout=30)
    finally:
        proc.join(timeout=30)
    assert item_pid == own_pid
    assert proc.exitcode == 0
