"""Overlapping the stages of a chunked job: the next item of an iterator
computed while the caller works on the current one (:func:`prefetch`, in
a thread or a forked process), and the caller's writes done behind it
(:class:`Behind`).

A sync reads chunk i + 1 from the database while chunk i goes to the
index; pre-annotation writes chunk i while chunk i + 1 is queried. In a
thread, what overlaps is the time spent outside Python's lock (MongoDB's
socket and its own process, zlib): Qdrant Edge holds the lock while it
writes, builds its graph or answers a query, so decoding the next chunk
waits for it. A forked process has a lock of its own.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.reduction
import os
import queue
import stat
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(
    make: Callable[[], Iterator[T]], depth: int = 1, fork: bool = False
) -> Iterator[T]:
    """The items of ``make()``, computed up to ``depth`` ahead in a
    thread of their own, or in a forked process.

    The iterator is created, advanced and closed in that thread (so a
    generator that holds a resource, such as an open index, keeps it in
    one thread). An exception it raises is raised here, at the item where
    it happened; when the caller stops early (``break``, an exception,
    ``close()``), the thread stops after the item it is computing and the
    iterator is closed.

    With ``fork=True``, where this process can fork a child (see
    :func:`can_fork`), the iterator runs in a forked copy of this
    process and its items, pickled, cross a pipe: for work that holds
    Python's lock (decoding, digests) beside work in this process that
    holds it too. The child opens its own database connection (FiftyOne's
    is not shared across a fork), may only read (what it writes to
    memory stays in the child), dies with this process and is killed when
    the caller stops early. An exception it raises is raised here, with
    the child's traceback as a note.

    Args:
        make: returns the iterator (called in the thread or the child)
        depth (1): items computed ahead (a forked child computes one
            while its last one is received)
        fork (False): compute them in a forked process where possible

    Returns:
        an iterator over the same items, in the same order
    """
    if fork and can_fork():
        return _forked(make)
    return _threaded(make, depth)


def can_fork() -> bool:
    """Whether this process may fork a child that runs Python: a POSIX
    platform, and not itself a daemonic ``multiprocessing`` child (which
    may not have children)."""
    return (
        "fork" in multiprocessing.get_all_start_methods()
        and not multiprocessing.current_process().daemon
    )


def _threaded(make: Callable[[], Iterator[T]], depth: int) -> Iterator[T]:
    items: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            it = make()
            try:
                for item in it:
                    if not put(item):
                        return
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
        except BaseException as e:  # noqa: BLE001 - raised in the caller
            put(_Failed(e))
            return
        put(_DONE)

    thread = threading.Thread(target=work, name="prelabel-prefetch")
    thread.daemon = True
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()


def _forked(make: Callable[[], Iterator[T]]) -> Iterator[T]:
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(
        target=_produce,
        args=(make, receive, send),
        name="prelabel-prefetch",
        daemon=True,  # ended by this process's exit
    )
    child.start()
    send.close()  # the child's end: EOF here once the child is gone
    try:
        while True:
            try:
                kind, value = receive.recv()
            except EOFError:
                child.join()
                raise RuntimeError(
                    "the process reading ahead ended without its items "
                    f"(exit code {child.exitcode}); run again, or report "
                    "it if it repeats"
                ) from None
            if kind == "done":
                return
            if kind == "failed":
                raise value
            yield value
    finally:
        receive.close()
        if child.is_alive():
            child.kill()  # it only reads: nothing of it is to keep
        child.join()


class _Gone(Exception):
    """The parent closed its end of the pipe (it stopped or died)."""


def _send(send, message) -> None:
    try:
        send.send(message)
    except OSError as e:
        raise _Gone from e


def _produce(make, receive, send) -> None:
    """The forked child: sends ``("item", x)`` for each item, then
    ``("done", None)`` or ``("failed", error)``; a parent that is gone
    closes the pipe, so the next send ends the child."""
    receive.close()
    _release_inherited_files()
    database = sys.modules.get("fiftyone.core.odm.database")
    if database is not None:
        # a client is not shared across a fork: the next query connects
        # again (FiftyOne's own worker processes do the same)
        database._disconnect()
    try:
        for item in make():
            _send(send, ("item", item))
        _send(send, ("done", None))
    except _Gone:
        pass
    except BaseException as e:  # noqa: BLE001 - raised in the parent
        with contextlib.suppress(_Gone):
            _send(send, ("failed", _portable(e)))
    finally:
        send.close()


def _release_inherited_files() -> None:
    """Points the child's copies of the parent's open files and folders
    at ``/dev/null``: a lock the parent holds on one (an index's) is then
    released when the parent closes it, not when the child ends. The
    numbers stay taken, so nothing the child opens reuses them."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in _open_fds():
        if fd <= 2 or fd == null:
            continue
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            continue
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            os.dup2(null, fd)


def _open_fds() -> list[int]:
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return sorted(int(name) for name in os.listdir(folder))
        except (OSError, ValueError):
            continue
    return list(range(3, min(os.sysconf("SC_OPEN_MAX"), 65536)))


def _portable(error: BaseException) -> BaseException:
    """``error`` with the child's traceback as a note, or, if it cannot
    cross a pipe, a RuntimeError that says what it was."""
    note = "".join(traceback.format_exception(error)).rstrip()
    try:
        error.add_note(f"in the process reading ahead:\n{note}")
        pickler = multiprocessing.reduction.ForkingPickler
        pickler.loads(pickler.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any pickling failure
        return RuntimeError(
            f"{type(error).__name__}: {error}\n"
            f"in the process reading ahead:\n{note}"
        )


class Behind:
    """Runs calls one at a time, in order, in a thread of their own, at
    most ``depth`` behind the caller; an exception of one is raised by the
    next :meth:`put` or by :meth:`wait`. Leaving the ``with`` block waits
    for the calls in flight (and raises the first error, unless the block
    is already raising one).

    Args:
        depth (1): calls that may be waiting or running when :meth:`put`
            returns
    """

    def __init__(self, depth: int = 1):
        self._depth = max(1, int(depth))
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def __enter__(self) -> Behind:
        self._pool = ThreadPoolExecutor(
            1, thread_name_prefix="prelabel-behind"
        )
        return self

    def put(self, fn: Callable, *args, **kwargs) -> None:
        """Queues ``fn(*args, **kwargs)`` once fewer than ``depth`` calls
        are waiting or running."""
        while len(self._pending) >= self._depth:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(fn, *args, **kwargs))

    def wait(self) -> None:
        """Returns when every queued call is done."""
        while self._pending:
            self._pending.pop(0).result()

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.wait()
        finally:
            for f in self._pending:
                f.cancel()
            self._pool.shutdown(wait=True)
            self._pending = []
