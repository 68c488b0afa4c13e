"""An inter-process lock around an embedded index folder.

Qdrant Edge locks its write-ahead log: while one process holds a shard open,
loading it in another fails. The App server, a notebook and a delegated
worker are separate processes, so every use of an embedded index opens the
shard under this lock, for one operation or one lease of a job. A process
may keep an idle shard open after that (loading one costs seconds at a
million points), but gives it back as soon as another process takes this
lock and asks (``edge._Handle``). Waiters poll; after ``timeout`` seconds
they get a clear error naming the process that holds it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass

from prelabel.index.base import IndexBusyError


@dataclass(frozen=True)
class ProcessId:
    """Which process on which machine holds something: enough to tell,
    later and from another process, whether it is still running (a pid
    alone may have been reused).

    Attributes:
        host: the machine's host name
        pid: the process id
        started: the process's start time (seconds since the epoch)
    """

    host: str = ""
    pid: int = 0
    started: float = 0.0

    @classmethod
    def current(cls) -> ProcessId:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _start_time(pid) or 0.0)

    @classmethod
    def from_dict(cls, d: dict) -> ProcessId:
        return cls(
            str(d.get("host", "")),
            int(d.get("pid", 0) or 0),
            float(d.get("started", 0.0) or 0.0),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def alive(self) -> bool:
        """Whether the process may still run: True for a process of another
        machine (it cannot be checked from here)."""
        if not self.pid:
            return False
        if self.host != socket.gethostname():
            return True
        started = _start_time(self.pid)
        return started is not None and abs(started - self.started) < 1.0

    def __str__(self) -> str:
        return f"process {self.pid} on {self.host or 'an unknown host'}"


def _start_time(pid: int) -> float | None:
    """When process ``pid`` started, or None if there is no such process
    (a zombie counts as gone)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


class FolderLock:
    """A re-entrant lock, exclusive across processes and threads.

    Args:
        path: the lock file (created if missing)
        timeout (120.0): seconds to wait before raising
            :class:`IndexBusyError`
        what (None): what the lock guards, for the message (default: the
            lock file)
    """

    def __init__(
        self, path: str, timeout: float = 120.0, what: str | None = None
    ):
        self.path = path
        self.timeout = timeout
        self.what = what or path
        self._thread_lock = threading.RLock()
        self._depth = 0
        #: threads of this process blocked in :meth:`acquire`
        self._waiting = 0
        self._counting = threading.Lock()
        #: touched by other processes while they wait for the lock
        self.waiting_path = path + ".waiting"
        self._fd: int | None = None
        #: called with the deadline each time this process takes the lock
        #: (not when it re-enters): see ``edge._Handle.evict_others``
        self.on_acquire = None

    @property
    def held(self) -> bool:
        return self._depth > 0

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout
        if not self._thread_lock.acquire(blocking=False):
            self._count_waiting(1)
            try:
                if not self._thread_lock.acquire(timeout=self.timeout):
                    raise self._busy_error()
            finally:
                self._count_waiting(-1)
        if self._depth > 0:
            self._depth += 1
            return

        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd = self._wait_for(deadline)
        except BaseException:
            self._thread_lock.release()
            raise
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            if self.on_acquire is not None:
                self.on_acquire(deadline)
        except BaseException:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            self._thread_lock.release()
            raise

        self._fd = fd
        self._depth = 1

    def _wait_for(self, deadline: float) -> int:
        """The locked descriptor of the lock file. A file deleted (and
        perhaps made anew) while this process waited on it locks nothing:
        the lock is taken again on the file now at the path."""
        delay = 0.005
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except OSError as e:
                        if e.errno not in (errno.EAGAIN, errno.EACCES):
                            raise
                        if time.monotonic() >= deadline:
                            raise self._busy_error() from None
                        self._signal_waiting()
                        time.sleep(delay)
                        delay = min(delay * 2, 0.1)
                try:
                    same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                return fd
            os.close(fd)

    def _count_waiting(self, step: int) -> None:
        with self._counting:
            self._waiting += step

    def _signal_waiting(self) -> None:
        """Tells the holder that a process waits (the file's time
        changes)."""
        try:
            fd = os.open(self.waiting_path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.utime(fd)
            finally:
                os.close(fd)
        except OSError:
            pass  # the holder then keeps it until its job ends

    def contention_mark(self):
        """A token for :meth:`contended_since`, taken when the lock was
        taken."""
        try:
            return os.stat(self.waiting_path).st_mtime_ns
        except OSError:
            return None

    def contended_since(self, mark) -> bool:
        """Whether another thread or process has waited for the lock since
        ``mark`` (:meth:`contention_mark`) was taken."""
        return self._waiting > 0 or self.contention_mark() != mark

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
        return IndexBusyError(
            f"{self.what} was held "
            f"by another process (pid {holder}) for more than "
            f"{self.timeout:.0f} s; wait for it to finish, or raise "
            "PRELABEL_LOCK_TIMEOUT"
        )


#: per thread: id of an index -> the outermost lease holding it
_ACTIVE = threading.local()


def _active() -> dict:
    if not hasattr(_ACTIVE, "leases"):
        _ACTIVE.leases = {}
    return _ACTIVE.leases


class Lease:
    """Keeps an embedded index open across the chunks of a long job (a
    sync, a stream of queries), and gives it back to other processes every
    few seconds. An index without sessions (a server) needs none: the
    lease does nothing.

    Loading a shard costs more as it grows, so opening it per chunk makes a
    big sync quadratic; holding it for the whole job would make the App wait
    for minutes. Releasing it briefly every couple of seconds lets a waiting
    process (which polls at least every 0.1 s) take its turn. The lease
    lasts ``overhead`` times what the last reopening cost (within
    ``hold`` and ``max_hold``, well under the waiters' lock timeout), so
    that reopening a big shard takes about ``1 / overhead`` of the job.
    It is given back only when someone waits (another thread of this
    process, or a process that touched the lock's ``.waiting`` file since
    the lease began): alone, a job holds the index to its end, with no
    flush and no pause at every lease.

    Leases nest: one taken in the same thread while another holds the
    same index leaves the opening and the giving back to the outer one, so
    a job's steps share one opening.
    """

    def __init__(
        self,
        index,
        hold: float = 2.0,
        pause: float = 0.15,
        overhead: float = 10.0,
        max_hold: float = 30.0,
    ):
        self._index = index
        self._session = getattr(index, "session", None)
        self._lock = getattr(index, "lock", None)
        self._mark = None
        self._hold, self._pause, self._overhead = hold, pause, overhead
        self._max_hold = max_hold
        self._cm = None
        self._since = 0.0
        self._lease = hold
        #: the lease of an enclosing step on the same index, which this
        #: one leaves the opening and the giving back to
        self._outer = None

    def _open(self):
        if self._session is not None:
            t0 = time.monotonic()
            self._cm = self._session()
            self._cm.__enter__()
            self._since = time.monotonic()
            if self._lock is not None:
                self._mark = self._lock.contention_mark()
            cost = self._since - t0 + self._pause
            self._lease = min(
                max(self._hold, self._overhead * cost), self._max_hold
            )

    def _close(self, *exc):
        if self._cm is not None:
            cm, self._cm = self._cm, None
            cm.__exit__(*(exc or (None, None, None)))

    def tick(self) -> None:
        if self._outer is not None:
            self._outer.tick()
            return
        if (
            self._cm is not None
            and time.monotonic() - self._since > self._lease
            and self._wanted()
        ):
            self._close()
            time.sleep(self._pause)
            self._open()

    def reopen(self) -> None:
        """Closes the index for real (``index.close()``: an embedded shard
        unmaps its files rather than lingering) and opens it again."""
        if self._outer is not None:
            self._outer.reopen()
            return
        if self._cm is not None:
            self._close()
            self._index.close()
            self._open()

    def _wanted(self) -> bool:
        """Whether another thread or process waits for the index (always,
        for an index that cannot tell)."""
        if self._lock is None:
            return True
        return self._lock.contended_since(self._mark)

    def __enter__(self):
        if self._session is None:
            return self
        # the registry of the thread entering (a generator holding a lease
        # may be closed by another thread)
        self._registry = _active()
        self._outer = self._registry.get(id(self._index))
        if self._outer is None:
            self._registry[id(self._index)] = self
            self._open()
        return self

    def __exit__(self, *exc):
        if self._session is None or self._outer is not None:
            return
        self._registry.pop(id(self._index), None)
        self._close(*exc)
