"""The embedded place: a Qdrant Edge shard in a folder on this machine.

Layout of an index folder::

    <folder>/index.json   the marker: who owns the folder (dataset, brain
                          key, index id, database) and how to reopen it
                          (dimension, metric); written first, so that a
                          folder prelabel made always says so
    <folder>/shard/       the Qdrant Edge shard (segments, HNSW, WAL)

The inter-process lock lives in prelabel's home folder, never in a folder
a user named. Nothing else in the folder is ever touched: :meth:`drop`
deletes the two entries above and the folder only if it is then empty, so
a file a user keeps there survives, and :meth:`create` refuses a
non-empty folder that is not a prelabel index.

Every public method opens the shard under the lock, works and flushes it;
the shard then stays open for the next call until it has been idle for
``PRELABEL_INDEX_LINGER`` seconds or another process asks for it (see
:class:`_Handle`, and :mod:`prelabel.index.locking` for the lock). Use
:meth:`EdgeIndex.session` to keep it open across several calls of one job.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np

from prelabel import constants
from prelabel.index import base
from prelabel.index.base import (
    IndexBusyError,
    IndexDamagedError,
    IndexFilter,
    VectorIndex,
)
from prelabel.index.locking import FolderLock, Lease

INDEX_FILE = "index.json"
SHARD = "shard"
#: the version of ``index.json`` this code writes (1 had no owner)
FORMAT = 2
_TMP_PREFIX = ".tmp-"
_KEYWORD_FIELDS = (base.SAMPLE_ID, base.LABEL, base.TAGS)
#: what the engine says when another process has the shard open
_BUSY = "WouldBlock"


def _edge():
    try:
        import qdrant_edge
    except ImportError as e:  # pragma: no cover - a dependency
        raise ImportError(
            "The embedded index needs qdrant-edge-py; run "
            "`pip install 'qdrant-edge-py>=0.9,<0.10'`"
        ) from e
    return qdrant_edge


def default_lock_timeout() -> float:
    return float(os.environ.get("PRELABEL_LOCK_TIMEOUT", "120"))


def lock_path(folder: str) -> str:
    """The lock file of an index folder, in prelabel's home."""
    digest = hashlib.blake2b(folder.encode(), digest_size=10).hexdigest()
    return os.path.join(constants.home_dir(), "locks", f"{digest}.lock")


@dataclass
class FolderState:
    """What a folder holds, as far as prelabel is concerned.

    Attributes:
        kind: ``"missing"``, ``"empty"``, ``"ours"`` (a readable marker),
            ``"unreadable"`` (prelabel's entries, but the marker cannot be
            read) or ``"foreign"`` (other files, no marker: not ours)
        meta: the marker's contents when ``kind == "ours"``
    """

    kind: str
    meta: dict | None = None


def inspect_folder(path: str) -> FolderState:
    """Tells whether ``path`` is free, a prelabel index, or someone
    else's folder."""
    if not os.path.exists(path):
        return FolderState("missing")
    if not os.path.isdir(path):
        return FolderState("foreign")
    entries = set(os.listdir(path))
    if not entries:
        return FolderState("empty")
    if INDEX_FILE in entries:
        try:
            meta = _read_json(os.path.join(path, INDEX_FILE))
        except (OSError, ValueError):
            meta = None
        if isinstance(meta, dict) and "dim" in meta:
            return FolderState("ours", meta)
        return FolderState("unreadable")
    if SHARD in entries and entries <= {SHARD} | {
        e for e in entries if e.startswith(_TMP_PREFIX)
    }:
        return FolderState("unreadable")
    return FolderState("foreign")


class EdgeIndex(VectorIndex):
    """A Qdrant Edge shard on disk.

    Args:
        path: the index folder (created on :meth:`create`)
        metric ("cosine"): ``"cosine"``, ``"dotproduct"`` or ``"euclidean"``
        hnsw_config (None): HNSW settings of a new index (``m``,
            ``ef_construct``, ``full_scan_threshold``) over
            :data:`prelabel.index.base.DEFAULT_HNSW`
        quantization ("int8"): ``"int8"`` (scalar quantization: the graph
            is built and searched on int8 vectors, the top candidates
            rescored with the float32 ones) or ``None``
        lock_timeout (None): seconds to wait for another process holding
            the index (``$PRELABEL_LOCK_TIMEOUT`` or 120)
        label (None): how messages name this index (default: its folder)
        repair_hint (None): what a message on damage tells to do
    """

    location = "embedded"

    def __init__(
        self,
        path: str,
        metric: str = "cosine",
        hnsw_config: dict | None = None,
        quantization: str | None = base.DEFAULT_QUANTIZATION,
        lock_timeout: float | None = None,
        label: str | None = None,
        repair_hint: str | None = None,
    ):
        if metric not in base.METRICS:
            raise ValueError(
                f"metric={metric!r} is not supported; use one of "
                f"{base.METRICS}"
            )
        base.check_quantization(quantization)
        self.path = os.path.abspath(os.path.expanduser(path))
        self.metric = metric
        self.hnsw_config = hnsw_config
        self.quantization = quantization
        self.label = label or f"The embedded index at {self.path}"
        self.repair_hint = repair_hint or (
            "rebuild it with prelabel.sync_index(..., rebuild=True)"
        )
        if lock_timeout is None:
            lock_timeout = default_lock_timeout()
        self._handle = _handle_for(self.path, lock_timeout, self.label)
        self._lock = self._handle.lock
        self._scan_kb: int | None = None  # see _threshold_kb
        self._meta: dict | None = None

    # ---- what it is ----------------------------------------------------

    @property
    def name(self) -> str:
        return self.path

    @property
    def lock(self):
        """The :class:`prelabel.index.locking.FolderLock` every use of the
        shard takes (a lease asks it whether anyone waits)."""
        return self._lock

    @property
    def dim(self) -> int | None:
        meta = self.meta
        return meta["dim"] if meta else None

    @property
    def meta(self) -> dict | None:
        """The marker (``index.json``), or None if there is no index.

        Raises:
            IndexDamagedError: the marker cannot be read
        """
        if self._meta is None:
            path = os.path.join(self.path, INDEX_FILE)
            try:
                meta = _read_json(path)
            except FileNotFoundError:
                if os.path.isdir(os.path.join(self.path, SHARD)):
                    raise self._damaged(f"{INDEX_FILE} is missing") from None
                return None
            except (OSError, ValueError) as e:
                raise self._damaged(f"{INDEX_FILE} is unreadable: {e}") from e
            if not isinstance(meta, dict) or "dim" not in meta:
                raise self._damaged(f"{INDEX_FILE} is not an index marker")
            self._meta = meta
        return self._meta

    def exists(self) -> bool:
        return os.path.exists(
            os.path.join(self.path, INDEX_FILE)
        ) or os.path.isdir(os.path.join(self.path, SHARD))

    def state(self) -> FolderState:
        """What the folder holds (see :func:`inspect_folder`)."""
        return inspect_folder(self.path)

    def size_on_disk(self) -> int:
        """Bytes used by the index folder."""
        total = 0
        for root, _, files in os.walk(self.path):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.path.getsize(os.path.join(root, name))
        return total

    def _damaged(self, problem: str) -> IndexDamagedError:
        return IndexDamagedError(
            f"{self.label} is damaged ({problem}); {self.repair_hint}"
        )

    # ---- opening -------------------------------------------------------

    @contextlib.contextmanager
    def session(self):
        """Keeps the shard open (and the lock held) for several calls.

        When the last session of this process ends, the shard is flushed
        and stays open for ``PRELABEL_INDEX_LINGER`` seconds, so that the
        next call (an App query, the next chunk of a job) does not load it
        again; another process that wants it asks, and gets it at once
        (see :class:`_Handle`).
        """
        handle = self._handle
        with self._lock:
            shard = handle.reuse()
            if shard is None:
                if not self.exists():
                    raise IndexDamagedError(
                        f"{self.label} is missing (no index at {self.path}); "
                        f"{self.repair_hint}"
                    )
                self._meta = None  # read again: another process may change it
                self.meta  # noqa: B018 - raises on a damaged marker
                shard = handle.opened(self._load())
            try:
                yield shard
            finally:
                handle.done()

    def _load(self):
        """Opens the shard; waits while another process (one that does not
        share our lock) has it open; a damaged shard is an
        :class:`IndexDamagedError`."""
        deadline = time.monotonic() + self._lock.timeout
        shard_dir = os.path.join(self.path, SHARD)
        if not os.path.isdir(shard_dir):
            raise self._damaged(f"the folder {SHARD}/ is missing")
        while True:
            try:
                return _edge().EdgeShard.load(shard_dir)
            except Exception as e:  # the engine raises bare Exceptions
                if _BUSY not in str(e):
                    raise self._damaged(_engine_message(e)) from e
                if time.monotonic() >= deadline:
                    raise IndexBusyError(
                        f"{self.label} stayed open in another process for "
                        f"more than {self._lock.timeout:.0f} s; wait for it "
                        "to finish, or raise PRELABEL_LOCK_TIMEOUT"
                    ) from e
                time.sleep(0.1)

    @contextlib.contextmanager
    def _engine(self):
        """Turns the engine's errors during an operation into a sentence
        naming the index and the way to repair it."""
        try:
            yield
        except Exception as e:
            if type(e) is Exception:  # the engine's own errors only
                raise self._damaged(_engine_message(e)) from e
            raise

    def create(self, dim: int, owner: dict | None = None) -> None:
        """Creates an empty index in a missing or empty folder.

        Args:
            dim: the vector size
            owner (None): who owns it, written into the marker (dataset
                id, brain key, ...)

        Raises:
            FileExistsError: the folder already holds a prelabel index
            ValueError: the folder holds other files (not ours)
        """
        qe = _edge()
        self._scan_kb = None
        with self._lock:
            state = self.state()
            if state.kind in ("ours", "unreadable"):
                raise FileExistsError(f"An index already exists at {self}")
            if state.kind == "foreign":
                raise ValueError(
                    f"path={self.path!r} is not empty and is not a prelabel "
                    "index; name a new or empty folder (its files are never "
                    "deleted)"
                )
            os.makedirs(self.path, exist_ok=True)
            meta = {
                "format": FORMAT,
                "dim": int(dim),
                "metric": self.metric,
                "quantization": self.quantization,
                "hnsw_config": self.hnsw_config,
                **(owner or {}),
            }
            # the marker first: a folder we started is always recognizable
            _write_json_atomic(os.path.join(self.path, INDEX_FILE), meta)
            self._meta = meta
            shard = qe.EdgeShard.create(
                os.path.join(self.path, SHARD), self._edge_config(qe, dim)
            )
            try:
                for key in _KEYWORD_FIELDS:
                    shard.update(
                        qe.UpdateOperation.create_field_index(
                            key, qe.PayloadSchemaType.Keyword
                        )
                    )
                shard.flush()
            finally:
                shard.close()

    def _edge_config(self, qe, dim: int):
        distance = {
            "cosine": qe.Distance.Cosine,
            "dotproduct": qe.Distance.Dot,
            "euclidean": qe.Distance.Euclid,
        }[self.metric]
        kwargs = {
            "hnsw_config": qe.HnswIndexConfig(
                **base.hnsw_settings(self.hnsw_config)
            )
        }
        memory = None  # the engine's default: loaded whole at each open
        if self.quantization == "int8":
            kwargs["quantization_config"] = qe.ScalarQuantizationConfig(
                type=qe.ScalarType.Int8, quantile=0.99
            )
            # the search walks the int8 copy (in RAM); the float32 vectors
            # only rescore its top candidates: mapped page by page as read
            memory = qe.Memory.Cold
        # merged segments stay under PART_POINTS float32 vectors (in KB)
        kwargs["optimizers"] = qe.EdgeOptimizersConfig(
            max_segment_size=base.PART_POINTS * int(dim) * 4 // 1024
        )
        return qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(
                size=int(dim), distance=distance, memory=memory
            ),
            # every answer carries its points' labels: loaded at opening
            payload_memory=qe.Memory.Cached,
            **kwargs,
        )

    def update_meta(self, **changes) -> dict:
        """Changes entries of the marker (atomically)."""
        with self._lock:
            meta = dict(self.meta or {})
            meta.update(changes)
            _write_json_atomic(os.path.join(self.path, INDEX_FILE), meta)
            self._meta = meta
            return meta

    def drop(self) -> None:
        """Deletes the index: the marker, the shard and the files prelabel
        left half-written; the folder too if nothing else is in it. Any
        other file in the folder stays."""
        self._scan_kb = None
        with self._lock:
            if not self._handle.close_idle():
                raise RuntimeError(f"cannot drop {self} while it is open")
            for entry in _our_entries(self.path):
                path = os.path.join(self.path, entry)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
            with contextlib.suppress(OSError):
                os.rmdir(self.path)
            self._meta = None

    def copy_to(self, path: str, **meta_changes) -> EdgeIndex:
        """Copies this index into a new (missing or empty) folder, with
        marker entries changed, e.g. the owner of a cloned dataset.

        Returns:
            the :class:`EdgeIndex` of the copy
        """
        target = EdgeIndex(
            path,
            metric=self.metric,
            hnsw_config=self.hnsw_config,
            quantization=self.quantization,
            lock_timeout=self._lock.timeout,
        )
        with self._lock, target._lock:
            self._handle.close_idle()  # copy the files of a closed shard
            if target.state().kind not in ("missing", "empty"):
                raise FileExistsError(f"{target.path} is not empty")
            meta = dict(self.meta or {})
            meta.update(meta_changes)
            os.makedirs(target.path, exist_ok=True)
            _write_json_atomic(os.path.join(target.path, INDEX_FILE), meta)
            staging = os.path.join(target.path, f"{_TMP_PREFIX}{SHARD}")
            shutil.copytree(os.path.join(self.path, SHARD), staging)
            os.replace(staging, os.path.join(target.path, SHARD))
            target._meta = meta
        return target

    def _threshold_kb(self) -> int | None:
        """The full-scan threshold the shard was created with (its
        ``edge_config.json``; None if unreadable)."""
        if self._scan_kb is None:
            path = os.path.join(self.path, SHARD, "edge_config.json")
            try:
                with open(path) as f:
                    hnsw = json.load(f).get("hnsw_config") or {}
                self._scan_kb = int(hnsw["full_scan_threshold"])
            except (OSError, ValueError, KeyError, TypeError):
                return None
        return self._scan_kb

    # ---- writing -------------------------------------------------------

    def upsert(self, sample_ids, vectors, payloads) -> None:
        qe = _edge()
        vectors = base.as_matrix(vectors, self.dim)
        points = [
            qe.Point(base.to_point_id(sid), vec.tolist(), payload)
            for sid, vec, payload in zip(
                sample_ids, vectors, payloads, strict=True
            )
        ]
        if not points:
            return
        with self.session() as shard, self._engine():
            shard.update(qe.UpdateOperation.upsert_points(points))

    def set_payload(self, sample_ids, payload) -> None:
        if not len(sample_ids):
            return
        qe = _edge()
        ids = [base.to_point_id(s) for s in sample_ids]
        with self.session() as shard, self._engine():
            shard.update(qe.UpdateOperation.set_payload(ids, payload))

    def delete(self, sample_ids) -> None:
        if not len(sample_ids):
            return
        qe = _edge()
        ids = [base.to_point_id(s) for s in sample_ids]
        with self.session() as shard, self._engine():
            shard.update(qe.UpdateOperation.delete_points(ids))

    def optimize(self) -> None:
        with self.session() as shard, self._engine():
            shard.optimize()

    def close(self) -> None:
        """Closes the shard now unless a session uses it (instead of
        letting it linger): its files are unmapped, so the pages a graph
        build touched no longer count in this process's memory."""
        self._handle.close_idle()

    # ---- reading -------------------------------------------------------

    def count(self, filter: IndexFilter | None = None) -> int:
        if not self.exists():
            return 0
        qe = _edge()
        with self.session() as shard, self._engine():
            return shard.count(qe.CountRequest(filter=_to_filter(filter)))

    def label_counts(self, filter=None):
        if not self.exists():
            return {}
        qe = _edge()
        request = qe.FacetRequest(
            base.LABEL,
            limit=base.MAX_LABELS,
            exact=True,
            filter=_to_filter(filter),
        )
        with self.session() as shard:
            try:
                hits = shard.facet(request).hits
            except Exception:  # no keyword index of labels: count them
                return super().label_counts(filter)
        return {h.value: h.count for h in hits}

    def scroll(self, filter, batch_size, payload, vector):
        if not self.exists():
            return
        qe = _edge()
        offset = None
        # one opening for every page, given back now and then
        with Lease(self) as lease:
            while True:
                lease.tick()
                with self.session() as shard, self._engine():
                    records, offset = shard.scroll(
                        qe.ScrollRequest(
                            offset=offset,
                            limit=batch_size,
                            filter=_to_filter(filter),
                            with_payload=payload,
                            with_vector=vector,
                        )
                    )
                if records:
                    yield records
                if offset is None:
                    return

    def retrieve(self, sample_ids, keys=()):
        ids = [base.to_point_id(s) for s in sample_ids]
        with self.session() as shard, self._engine():
            records = shard.retrieve(
                ids, with_payload=list(keys) or False, with_vector=True
            )
        return _in_order(
            sample_ids,
            {base.to_sample_id(r.id): r for r in records},
            self.dim or 0,
        )

    def query(self, vectors, k, filter=None, exact=False, hnsw_ef=None):
        qe = _edge()
        vectors = base.as_matrix(vectors, self.dim)
        native = _to_filter(filter)
        exact = exact or self.scans_instead(filter, self._threshold_kb())
        with self.session() as shard, self._engine():
            params = self.search_params(
                qe,
                exact,
                hnsw_ef,
                _largest_segment(self.path, shard.info()),
                filter,
            )
            requests = [
                qe.QueryRequest(
                    limit=int(k),
                    query=qe.Query.Nearest(v.tolist()),
                    filter=native,
                    params=params,
                    with_payload=[base.LABEL],
                    with_vector=False,
                )
                for v in vectors
            ]
            results = shard.query_batch(qe.QueryBatchRequest(requests))
        sign = -1.0 if self.metric == "euclidean" else 1.0
        hits = [
            [
                (
                    base.to_sample_id(p.id),
                    sign * p.score,
                    (p.payload or {}).get(base.LABEL),
                )
                for p in row
            ]
            for row in results
        ]
        return base.pad_results(hits, int(k))

    def __repr__(self) -> str:
        return f"EdgeIndex({self.path!r})"


def default_linger() -> float:
    """Seconds an embedded index stays open in a process after its last
    use (``PRELABEL_INDEX_LINGER``; 0 closes it at once)."""
    return float(os.environ.get("PRELABEL_INDEX_LINGER", "120"))


class _Handle:
    """What every ``EdgeIndex`` of one folder shares in this process: the
    lock and the open shard, so that two objects for the same index (say,
    two loaded brain results) nest instead of waiting on each other.

    Loading a shard costs seconds at a million points, so the shard is not
    closed when the last session ends: it lingers, flushed, for
    :func:`default_linger` seconds (an App server answers the next query
    at once). The engine lets one process open a shard at a time, so a
    lingering shard must never keep another process waiting: while it is
    open this process holds a lock on the file ``<lock>.open``; any
    process taking the folder lock first checks that lock
    (:meth:`evict_others`), and if it is held, writes ``<lock>.wanted``
    and waits; the holder's closer thread sees the file within 0.05 s,
    closes the idle shard and lets go.
    """

    def __init__(self, path: str, timeout: float, label: str):
        self.path = path
        self.lock = FolderLock(lock_path(path), timeout=timeout, what=label)
        self.lock.on_acquire = self.evict_others
        self.open_path = self.lock.path + ".open"
        self.wanted_path = self.lock.path + ".wanted"
        self.shard = None
        self.linger = default_linger()
        self._active = 0
        self._idle_since = 0.0
        self._open_fd: int | None = None
        self._files: dict = {}
        self._state = threading.Lock()
        self._closer: threading.Thread | None = None

    # ---- in this process -------------------------------------------------

    def reuse(self):
        """The shard if it is still open (lingering or in use), else None.
        A lingering shard whose files changed since its last flush (deleted,
        damaged, replaced by hand) is closed: the caller loads it again,
        and finds out."""
        with self._state:
            if self.shard is None:
                return None
            files = None if self._active else _files_of(self.path)
            if files is None or files == self._files:
                self._active += 1
                return self.shard
            self._close_keeping(files)
            return None

    def _close_keeping(self, files: dict) -> None:
        """Closes a lingering shard whose files someone else changed. The
        engine rewrites its headers on closing (the bytes it flushed last):
        what the other party wrote is put back, so that closing never
        writes over it (a damaged file stays damaged, and says so when the
        shard is loaded again)."""
        kept = {}
        for p, stat in files.items():
            if self._files.get(p) != stat:
                with contextlib.suppress(OSError), open(p, "rb") as f:
                    kept[p] = f.read()
        self._close()
        for p, data in kept.items():
            with contextlib.suppress(OSError), open(p, "r+b") as f:
                f.write(data)
                f.truncate()

    def opened(self, shard):
        """Registers a shard just loaded (under the folder lock)."""
        with self._state:
            self._hold_open_lock()
            self.shard, self._active = shard, 1
            return shard

    def done(self) -> None:
        """The end of a session: the last one flushes the shard, then
        closes it or lets it linger."""
        with self._state:
            self._active -= 1
            if self._active:
                return
            try:
                self.shard.flush()
            except BaseException:
                self._close()
                raise
            self.linger = default_linger()
            if self.linger <= 0:
                self._close()
                return
            self._files = _files_of(self.path)
            self._idle_since = time.monotonic()
            if self._closer is None or not self._closer.is_alive():
                self._closer = threading.Thread(
                    target=self._close_when_idle,
                    name=f"prelabel-linger-{os.path.basename(self.lock.path)}",
                    daemon=True,
                )
                self._closer.start()

    def close_idle(self) -> bool:
        """Closes the shard unless a session uses it; whether it is
        closed."""
        with self._state:
            if self._active:
                return False
            self._close()
            return True

    def _close_when_idle(self) -> None:
        while True:
            time.sleep(0.05)
            with self._state:
                if self.shard is None:
                    return
                if self._active:
                    continue
                idle = time.monotonic() - self._idle_since
                if idle >= self.linger or os.path.exists(self.wanted_path):
                    self._close()
                    return

    def _close(self) -> None:
        shard, self.shard = self.shard, None
        try:
            if shard is not None:
                shard.close()
        finally:
            fd, self._open_fd = self._open_fd, None
            if fd is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.wanted_path)
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)

    def _hold_open_lock(self) -> None:
        fd = os.open(self.open_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # free: evict_others made sure of it under the folder lock
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.wanted_path)  # left by a process that died
        self._open_fd = fd

    # ---- other processes -------------------------------------------------

    def evict_others(self, deadline: float) -> None:
        """Called when this process takes the folder lock: if another
        process keeps the shard open while idle, asks it to close and waits
        until it has (its closer answers within 0.05 s)."""
        if self.shard is not None:
            return  # this process is the one that has it open
        fd = os.open(self.open_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            asked = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    return
                except BlockingIOError:
                    pass
                if not asked:
                    with open(self.wanted_path, "w") as f:
                        f.write(str(os.getpid()))
                    asked = True
                if time.monotonic() >= deadline:
                    raise IndexBusyError(
                        f"{self.lock.what} is kept open by another process "
                        "that did not give it back when asked; end that "
                        "process, or set PRELABEL_INDEX_LINGER=0 there"
                    )
                time.sleep(0.01)
        finally:
            os.close(fd)


def _files_of(path: str) -> dict:
    """``{file: (inode, size, time of change)}`` of every file of an index
    folder: equal as long as nobody but this process's engine wrote it."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            with contextlib.suppress(OSError):
                st = os.stat(p)
                out[p] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


_HANDLES: dict[str, _Handle] = {}
_HANDLES_LOCK = threading.Lock()


@atexit.register
def _close_lingering() -> None:
    """Closes the shards left open for the next call: when the process ends
    (the engine's own shutdown, not the garbage collector's), and before it
    forks (a DataLoader worker must not inherit the engine's lock)."""
    with _HANDLES_LOCK:
        handles = list(_HANDLES.values())
    for handle in handles:
        with contextlib.suppress(Exception):
            handle.close_idle()


os.register_at_fork(before=_close_lingering)


def _segment_points(info) -> int:
    """About how many points the largest segment of a shard holds (a
    search runs in each segment: its width follows a segment's size).
    Every segment but the appendable one holds a built part."""
    parts = max(1, info.segments_count - 1)
    return -(-info.points_count // parts)


#: bytes a built segment's id tracker keeps per point (its version)
_VERSION_BYTES = 8


def _largest_segment(path: str, info) -> int:
    """How many points the largest segment of the shard at ``path``
    holds (a search runs in each segment: its width follows the largest
    one). Read from the size of each built segment's id tracker, a
    version per point: a large reference view marked at once moves its
    points into one segment of them all (990,000 of 1,000,000 points,
    where equal parts would be 500,000). Where those files do not account
    for every built point, the shard is taken as built in equal parts."""
    folder = os.path.join(path, SHARD, "segments")
    sizes = []
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            versions = os.path.join(folder, name, "id_tracker.versions")
            with contextlib.suppress(OSError):
                sizes.append(os.path.getsize(versions) // _VERSION_BYTES)
    if sizes and sum(sizes) >= info.indexed_vectors_count:
        return max(sizes)
    return _segment_points(info)


def _in_order(sample_ids, found: dict, dim: int):
    """``retrieve``'s answer from the records found, keyed by sample id."""
    order = [s for s in sample_ids if s in found]
    vectors = _vectors([found[s].vector for s in order], dim)
    return order, vectors, [found[s].payload or {} for s in order]


def _vectors(rows, dim: int) -> np.ndarray:
    return np.array(rows, dtype=np.float32).reshape(len(rows), dim)


def _handle_for(path: str, timeout: float, label: str) -> _Handle:
    with _HANDLES_LOCK:
        handle = _HANDLES.get(path)
        if handle is None:
            handle = _HANDLES[path] = _Handle(path, timeout, label)
        handle.lock.timeout = timeout
        handle.lock.what = label
        return handle


def _our_entries(path: str) -> list[str]:
    """The entries of an index folder that prelabel made."""
    try:
        entries = os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [
        e
        for e in entries
        if e in (INDEX_FILE, SHARD) or e.startswith(_TMP_PREFIX)
    ]


def _engine_message(e: Exception) -> str:
    return str(e).replace("Service runtime error: ", "").strip()[:300]


def _to_filter(f: IndexFilter | None):
    if f is None or f.is_empty():
        return None
    qe = _edge()
    must, must_not = [], []
    if f.labeled:
        must_not.append(qe.IsEmptyCondition(base.LABEL))
    if f.labels is not None:
        must.append(
            qe.FieldCondition(base.LABEL, match=qe.MatchAny(list(f.labels)))
        )
    if f.tags is not None:
        must.append(
            qe.FieldCondition(base.TAGS, match=qe.MatchAny(list(f.tags)))
        )
    if f.sample_ids is not None:
        must.append(
            qe.HasIdCondition({base.to_point_id(s) for s in f.sample_ids})
        )
    if f.exclude_sample_ids:
        must_not.append(
            qe.HasIdCondition(
                {base.to_point_id(s) for s in f.exclude_sample_ids}
            )
        )
    for key, value in f.match:
        must.append(qe.FieldCondition(key, match=qe.MatchValue(value)))
    return qe.Filter(must=must or None, must_not=must_not or None)


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _write_json_atomic(path: str, obj: dict) -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=_TMP_PREFIX)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
