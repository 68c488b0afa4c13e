"""Overlapping the stages of a chunked job in threads: the next item of
an iterator computed while the caller works on the current one
(:func:`prefetch`), and the caller's writes done behind it
(:class:`Behind`).

A sync reads chunk i + 1 from the database while chunk i goes to the
index; pre-annotation writes chunk i while chunk i + 1 is queried. What
overlaps is the time spent outside Python's lock (MongoDB's socket and
its own process, zlib); Qdrant Edge's queries hold the lock.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch(make: Callable[[], Iterator[T]], depth: int = 1) -> Iterator[T]:
    """The items of ``make()``, computed up to ``depth`` ahead in a
    thread of their own.

    The iterator is created, advanced and closed in that thread (so a
    generator that holds a resource, such as an open index, keeps it in
    one thread). An exception it raises is raised here, at the item where
    it happened; when the caller stops early (``break``, an exception,
    ``close()``), the thread stops after the item it is computing and the
    iterator is closed.

    Args:
        make: returns the iterator (called in the thread)
        depth (1): items computed ahead

    Returns:
        an iterator over the same items, in the same order
    """
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
