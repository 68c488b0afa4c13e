"""Overlapping a producer with its consumer: the next item of an iterator
is computed in a thread while the caller works on the current one.

A sync reads chunk i + 1 from the database while chunk i goes to the
index; most of both is spent outside Python's lock (MongoDB's socket,
zlib, the engine), so on two cores the stages overlap.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
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
