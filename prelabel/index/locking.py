"""An inter-process lock around an embedded index folder.

Qdrant Edge locks its write-ahead log: while one process holds a shard open,
loading it in another fails. The App server, a notebook and a delegated
worker are separate processes, so every use of an embedded index opens the
shard for one operation only, under this lock, and closes it again. Loading
a shard takes milliseconds, so the cost is small and nobody holds the index
while idle. Waiters poll; after ``timeout`` seconds they get a clear error
naming the process that holds it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time

from prelabel.index.base import IndexBusyError


class FolderLock:
    """A re-entrant lock, exclusive across processes and threads.

    Args:
        path: the lock file (created if missing)
        timeout (120.0): seconds to wait before raising
            :class:`IndexBusyError`
    """

    def __init__(self, path: str, timeout: float = 120.0):
        self.path = path
        self.timeout = timeout
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._depth > 0

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout
        if not self._thread_lock.acquire(timeout=self.timeout):
            raise self._busy_error()
        if self._depth > 0:
            self._depth += 1
            return

        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            delay = 0.005
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        os.close(fd)
                        raise
                    if time.monotonic() >= deadline:
                        os.close(fd)
                        raise self._busy_error() from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.1)
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except BaseException:
            self._thread_lock.release()
            raise

        self._fd = fd
        self._depth = 1

    def release(self) -> None:
        if self._depth <= 0:
            raise RuntimeError("release() of a lock that is not held")
        self._depth -= 1
        if self._depth == 0:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self._thread_lock.release()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *args):
        self.release()

    def _busy_error(self) -> IndexBusyError:
        try:
            with open(self.path) as f:
                holder = f.read().strip() or "unknown"
        except OSError:
            holder = "unknown"
        # the lock file is "<index folder>.lock", next to the folder
        folder = self.path.removesuffix(".lock")
        return IndexBusyError(
            f"The embedded index at {folder} was held "
            f"by another process (pid {holder}) for more than "
            f"{self.timeout:.0f} s; wait for it to finish, or raise "
            "PRELABEL_LOCK_TIMEOUT"
        )
