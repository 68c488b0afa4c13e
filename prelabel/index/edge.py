"""The embedded place: a Qdrant Edge shard in a folder on this machine.

Layout of an index folder::

    <folder>/shard/       the Qdrant Edge shard (segments, HNSW, WAL)
    <folder>/index.json   what we need to reopen it: dimension, metric
    <folder>.lock         the inter-process lock (outside, so that dropping
                          the folder never pulls the lock from under a waiter)

Every public method opens the shard under the folder lock, works, flushes
and closes it again (see :mod:`prelabel.index.locking` for why). Use
:meth:`EdgeIndex.session` to keep it open across several calls of one job.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence

import numpy as np

from prelabel.index import base
from prelabel.index.base import IndexFilter, VectorIndex
from prelabel.index.locking import FolderLock

_META = "index.json"
_SHARD = "shard"
_KEYWORD_FIELDS = (base.SAMPLE_ID, base.LABEL, base.TAGS)


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


class EdgeIndex(VectorIndex):
    """A Qdrant Edge shard on disk.

    Args:
        path: the index folder (created on :meth:`create`)
        metric ("cosine"): ``"cosine"``, ``"dotproduct"`` or ``"euclidean"``
        hnsw_config (None): optional dict with ``m``, ``ef_construct``,
            ``full_scan_threshold``
        quantization (None): ``None`` or ``"int8"`` (scalar quantization,
            4x less memory for vectors, rescored)
        lock_timeout (None): seconds to wait for another process holding
            the index (``$PRELABEL_LOCK_TIMEOUT`` or 120)
    """

    location = "embedded"

    def __init__(
        self,
        path: str,
        metric: str = "cosine",
        hnsw_config: dict | None = None,
        quantization: str | None = None,
        lock_timeout: float | None = None,
    ):
        if metric not in base.METRICS:
            raise ValueError(
                f"metric={metric!r} is not supported; use one of "
                f"{base.METRICS}"
            )
        if quantization not in (None, "int8"):
            raise ValueError(
                f"quantization={quantization!r} is not supported; use None "
                "or 'int8'"
            )
        self.path = os.path.abspath(os.path.expanduser(path))
        self.metric = metric
        self.hnsw_config = hnsw_config
        self.quantization = quantization
        if lock_timeout is None:
            lock_timeout = default_lock_timeout()
        self._handle = _handle_for(self.path, lock_timeout)
        self._lock = self._handle.lock
        self._meta: dict | None = None

    # ---- what it is ----------------------------------------------------

    @property
    def name(self) -> str:
        return self.path

    @property
    def dim(self) -> int | None:
        meta = self._read_meta()
        return meta["dim"] if meta else None

    def exists(self) -> bool:
        return self._read_meta() is not None

    def _read_meta(self) -> dict | None:
        if self._meta is None:
            try:
                with open(os.path.join(self.path, _META)) as f:
                    self._meta = json.load(f)
            except FileNotFoundError:
                return None
        return self._meta

    def size_on_disk(self) -> int:
        """Bytes used by the index folder."""
        total = 0
        for root, _, files in os.walk(self.path):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.path.getsize(os.path.join(root, name))
        return total

    # ---- opening -------------------------------------------------------

    @contextlib.contextmanager
    def session(self):
        """Keeps the shard open (and the lock held) for several calls."""
        handle = self._handle
        with self._lock:
            if handle.shard is not None:
                yield handle.shard
                return
            if not self.exists():
                raise FileNotFoundError(
                    f"No index at {self.path}; sync the embeddings first "
                    "(prelabel.sync_index)"
                )
            handle.shard = _edge().EdgeShard.load(
                os.path.join(self.path, _SHARD)
            )
            try:
                yield handle.shard
            finally:
                shard, handle.shard = handle.shard, None
                try:
                    shard.flush()
                finally:
                    shard.close()

    def create(self, dim: int) -> None:
        qe = _edge()
        distance = {
            "cosine": qe.Distance.Cosine,
            "dotproduct": qe.Distance.Dot,
            "euclidean": qe.Distance.Euclid,
        }[self.metric]
        kwargs = {}
        if self.hnsw_config:
            hnsw = {"m": 16, "ef_construct": 100, "full_scan_threshold": 10000}
            hnsw.update(self.hnsw_config)
            kwargs["hnsw_config"] = qe.HnswIndexConfig(**hnsw)
        if self.quantization == "int8":
            kwargs["quantization_config"] = qe.ScalarQuantizationConfig(
                type=qe.ScalarType.Int8, quantile=0.99
            )
        config = qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=int(dim), distance=distance),
            **kwargs,
        )
        with self._lock:
            if self.exists():
                raise FileExistsError(f"An index already exists at {self}")
            # a folder without index.json is a create that died half way
            shutil.rmtree(self.path, ignore_errors=True)
            os.makedirs(self.path)
            shard = qe.EdgeShard.create(
                os.path.join(self.path, _SHARD), config
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
            meta = {
                "dim": int(dim),
                "metric": self.metric,
                "quantization": self.quantization,
                "format": 1,
            }
            _write_json_atomic(os.path.join(self.path, _META), meta)
            self._meta = meta

    def drop(self) -> None:
        with self._lock:
            shutil.rmtree(self.path, ignore_errors=True)
            self._meta = None

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
        with self.session() as shard:
            shard.update(qe.UpdateOperation.upsert_points(points))

    def set_payload(self, sample_ids, payload) -> None:
        if not len(sample_ids):
            return
        qe = _edge()
        ids = [base.to_point_id(s) for s in sample_ids]
        with self.session() as shard:
            shard.update(qe.UpdateOperation.set_payload(ids, payload))

    def delete(self, sample_ids) -> None:
        if not len(sample_ids):
            return
        qe = _edge()
        ids = [base.to_point_id(s) for s in sample_ids]
        with self.session() as shard:
            shard.update(qe.UpdateOperation.delete_points(ids))

    def optimize(self) -> None:
        with self.session() as shard:
            shard.optimize()

    # ---- reading -------------------------------------------------------

    def count(self, filter: IndexFilter | None = None) -> int:
        if not self.exists():
            return 0
        qe = _edge()
        with self.session() as shard:
            return shard.count(qe.CountRequest(filter=_to_filter(filter)))

    def iter_payloads(
        self,
        keys: Sequence[str],
        filter: IndexFilter | None = None,
        batch_size: int = 10000,
    ) -> Iterator[tuple[str, dict]]:
        if not self.exists():
            return
        qe = _edge()
        offset = None
        while True:
            with self.session() as shard:
                records, offset = shard.scroll(
                    qe.ScrollRequest(
                        offset=offset,
                        limit=batch_size,
                        filter=_to_filter(filter),
                        with_payload=list(keys),
                        with_vector=False,
                    )
                )
            for r in records:
                yield base.to_sample_id(r.id), r.payload or {}
            if offset is None:
                return

    def get_vectors(self, sample_ids):
        ids = [base.to_point_id(s) for s in sample_ids]
        with self.session() as shard:
            records = shard.retrieve(ids, with_payload=False, with_vector=True)
        found = {base.to_sample_id(r.id): r.vector for r in records}
        order = [s for s in sample_ids if s in found]
        dim = self.dim or 0
        vectors = np.array(
            [found[s] for s in order], dtype=np.float32
        ).reshape(len(order), dim)
        return order, vectors

    def query(self, vectors, k, filter=None, exact=False, hnsw_ef=None):
        qe = _edge()
        vectors = base.as_matrix(vectors, self.dim)
        params = None
        if exact or hnsw_ef is not None:
            params = qe.SearchParams(hnsw_ef=hnsw_ef, exact=bool(exact))
        native = _to_filter(filter)
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
        with self.session() as shard:
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


class _Handle:
    """What every ``EdgeIndex`` of one folder shares in this process: the
    lock and the open shard, so that two objects for the same index (say,
    two loaded brain results) nest instead of waiting on each other."""

    def __init__(self, path: str, timeout: float):
        self.lock = FolderLock(path + ".lock", timeout=timeout)
        self.shard = None


_HANDLES: dict[str, _Handle] = {}
_HANDLES_LOCK = threading.Lock()


def _handle_for(path: str, timeout: float) -> _Handle:
    with _HANDLES_LOCK:
        handle = _HANDLES.get(path)
        if handle is None:
            handle = _HANDLES[path] = _Handle(path, timeout)
        handle.lock.timeout = timeout
        return handle


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


def _write_json_atomic(path: str, obj: dict) -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
