"""The scale-out place: a collection on a Qdrant server (or Qdrant Cloud).

Talks to the server through ``qdrant-client``'s current API
(``collection_exists`` / ``create_collection``, ``upsert``, ``scroll``,
``query_batch_points``). Credentials are passed in, never stored here.
``QdrantClient(":memory:")`` or ``QdrantClient(path=...)`` serve the same
API in-process, which is how the tests exercise this module.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import numpy as np

from prelabel.index import base
from prelabel.index.base import (
    IndexDamagedError,
    IndexFilter,
    IndexUnreachableError,
    VectorIndex,
)
from prelabel.index.edge import FolderState

#: the key of a collection's metadata that marks it as prelabel's
META_KEY = "prelabel"


def _models():
    from qdrant_client import models

    return models


def connect(
    url: str | None = None,
    api_key: str | None = None,
    prefer_grpc: bool | None = None,
    grpc_port: int | None = None,
    timeout: int | None = None,
):
    """A ``QdrantClient`` for a server URL (``":memory:"`` for tests)."""
    try:
        from qdrant_client import QdrantClient
    except ImportError as e:  # pragma: no cover - a dependency
        raise ImportError(
            "The server index needs qdrant-client; run "
            "`pip install 'qdrant-client>=1.16'`"
        ) from e
    if url is None:
        raise ValueError(
            "No Qdrant server URL: pass url=..., or set "
            "PRELABEL_QDRANT_URL (and PRELABEL_QDRANT_API_KEY)"
        )
    if url == ":memory:":
        return QdrantClient(location=":memory:")
    kwargs = {"url": url, "api_key": api_key}
    if prefer_grpc is not None:
        kwargs["prefer_grpc"] = prefer_grpc
    if grpc_port is not None:
        kwargs["grpc_port"] = grpc_port
    if timeout is not None:
        kwargs["timeout"] = timeout
    return QdrantClient(**kwargs)


class ServerIndex(VectorIndex):
    """A collection on a Qdrant server.

    The collection's metadata holds the same marker as an embedded index
    folder (who owns it, its dimension and metric) under ``"prelabel"``.
    Every error of the client (the server unreachable, a refused key) is
    raised as an :class:`IndexUnreachableError` that names the URL.

    Args:
        client: a ``qdrant_client.QdrantClient``
        collection_name: the collection to use or create
        metric ("cosine"): ``"cosine"``, ``"dotproduct"`` or ``"euclidean"``
        shard_number (None): shards of a new collection
        replication_factor (None): replicas of a new collection
        write_consistency_factor (None): of a new collection
        hnsw_config (None): dict of ``qdrant_client.models.HnswConfigDiff``
            settings over :data:`prelabel.index.base.DEFAULT_HNSW`
        quantization ("int8"): ``"int8"`` (scalar quantization, the top
            candidates rescored with the float32 vectors) or ``None``
        url (None): the server's URL, to name it in messages
    """

    location = "server"

    def __init__(
        self,
        client,
        collection_name: str,
        metric: str = "cosine",
        shard_number: int | None = None,
        replication_factor: int | None = None,
        write_consistency_factor: int | None = None,
        hnsw_config: dict | None = None,
        quantization: str | None = base.DEFAULT_QUANTIZATION,
        url: str | None = None,
    ):
        if metric not in base.METRICS:
            raise ValueError(
                f"metric={metric!r} is not supported; use one of "
                f"{base.METRICS}"
            )
        base.check_quantization(quantization)
        self.client = client
        self.collection_name = collection_name
        self.metric = metric
        self.shard_number = shard_number
        self.replication_factor = replication_factor
        self.write_consistency_factor = write_consistency_factor
        self.hnsw_config = hnsw_config
        self.quantization = quantization
        self.url = url
        self._dim: int | None = None
        self._scan_kb: int | None = None  # see _threshold_kb

    @contextlib.contextmanager
    def _call(self):
        """Names the server and what to do when the client fails."""
        try:
            yield
        except (IndexDamagedError, IndexUnreachableError, ValueError):
            raise
        except Exception as e:
            if not _is_client_error(e):
                raise
            where = self.url or "the configured URL"
            raise IndexUnreachableError(
                f"The Qdrant server at {where} did not answer for collection "
                f"{self.collection_name!r} ({_reason(e)}); check that it is "
                "running and that url= / api_key= (or PRELABEL_QDRANT_URL / "
                "PRELABEL_QDRANT_API_KEY) are right"
            ) from e

    @property
    def name(self) -> str:
        return self.collection_name

    @property
    def dim(self) -> int | None:
        if self._dim is None and self.exists():
            with self._call():
                info = self.client.get_collection(self.collection_name)
            self._dim = info.config.params.vectors.size
        return self._dim

    def _threshold_kb(self) -> int | None:
        """The collection's full-scan threshold (None if unknown), read
        once like :attr:`dim`."""
        if self._scan_kb is None and self.exists():
            with self._call():
                info = self.client.get_collection(self.collection_name)
            hnsw = getattr(info.config, "hnsw_config", None)
            self._scan_kb = getattr(hnsw, "full_scan_threshold", None)
        return self._scan_kb

    @property
    def meta(self) -> dict | None:
        """The marker in the collection's metadata (None: not ours, or no
        collection)."""
        if not self.exists():
            return None
        with self._call():
            info = self.client.get_collection(self.collection_name)
        meta = (getattr(info.config, "metadata", None) or {}).get(META_KEY)
        return dict(meta) if isinstance(meta, dict) else None

    def state(self) -> FolderState:
        """Like :func:`prelabel.index.edge.inspect_folder`, for the
        collection: ``"missing"``, ``"ours"`` or ``"foreign"``."""
        if not self.exists():
            return FolderState("missing")
        meta = self.meta
        if meta is not None:
            return FolderState("ours", meta)
        return FolderState("foreign")

    def update_meta(self, **changes) -> dict:
        """Changes entries of the marker."""
        meta = dict(self.meta or {})
        meta.update(changes)
        with self._call():
            self.client.update_collection(
                self.collection_name, metadata={META_KEY: meta}
            )
        return meta

    def exists(self) -> bool:
        with self._call():
            return self.client.collection_exists(self.collection_name)

    def create(self, dim: int, owner: dict | None = None) -> None:
        m = _models()
        distance = {
            "cosine": m.Distance.COSINE,
            "dotproduct": m.Distance.DOT,
            "euclidean": m.Distance.EUCLID,
        }[self.metric]
        quantization = None
        if self.quantization == "int8":
            quantization = m.ScalarQuantization(
                scalar=m.ScalarQuantizationConfig(
                    type=m.ScalarType.INT8, quantile=0.99
                )
            )
        if self.exists():
            raise FileExistsError(
                f"A collection named {self.collection_name!r} already exists"
            )
        meta = {
            "dim": int(dim),
            "metric": self.metric,
            "quantization": self.quantization,
            **(owner or {}),
        }
        with self._call():
            self._create(m, dim, distance, quantization, meta)
        self._dim, self._scan_kb = int(dim), None

    def _create(self, m, dim, distance, quantization, meta) -> None:
        self.client.create_collection(
            self.collection_name,
            metadata={META_KEY: meta},
            vectors_config=m.VectorParams(size=int(dim), distance=distance),
            shard_number=self.shard_number,
            replication_factor=self.replication_factor,
            write_consistency_factor=self.write_consistency_factor,
            hnsw_config=m.HnswConfigDiff(
                **base.hnsw_settings(self.hnsw_config)
            ),
            quantization_config=quantization,
        )
        with warnings.catch_warnings():
            # local mode says payload indexes do nothing there; a server uses
            # them for filtered HNSW
            warnings.simplefilter("ignore", UserWarning)
            for key in (base.SAMPLE_ID, base.LABEL, base.TAGS):
                self.client.create_payload_index(
                    self.collection_name, key, m.PayloadSchemaType.KEYWORD
                )

    def drop(self) -> None:
        if self.exists():
            with self._call():
                self.client.delete_collection(self.collection_name)
        self._dim = self._scan_kb = None

    def copy_to(self, collection_name: str, **meta_changes) -> ServerIndex:
        """Copies every point into a new collection, with marker entries
        changed (e.g. the owner of a cloned dataset).

        Returns:
            the :class:`ServerIndex` of the copy
        """
        target = copy.copy(self)  # the same client and settings
        target.collection_name, target._dim = collection_name, None
        target._scan_kb = None
        meta = dict(self.meta or {})
        meta.update(meta_changes)
        meta.pop("dim", None)
        target.create(self.dim, owner=meta)
        offset = None
        while True:
            with self._call():
                points, offset = self.client.scroll(
                    self.collection_name,
                    limit=1000,
                    offset=offset,
                    with_payload=True,
                    with_vectors=True,
                )
            if points:
                target.upsert(
                    [base.to_sample_id(p.id) for p in points],
                    np.array([p.vector for p in points], dtype=np.float32),
                    [p.payload or {} for p in points],
                )
            if offset is None:
                return target

    def upsert(self, sample_ids, vectors, payloads) -> None:
        if not len(sample_ids):
            return
        m = _models()
        vectors = base.as_matrix(vectors, self.dim)
        with self._call():
            self.client.upsert(
                self.collection_name,
                points=m.Batch(
                    ids=[base.to_point_id(s) for s in sample_ids],
                    vectors=vectors.tolist(),
                    payloads=list(payloads),
                ),
                wait=True,
            )

    def set_payload(self, sample_ids, payload) -> None:
        if not len(sample_ids):
            return
        with self._call():
            self.client.set_payload(
                self.collection_name,
                payload=payload,
                points=[base.to_point_id(s) for s in sample_ids],
                wait=True,
            )

    def delete(self, sample_ids) -> None:
        if not len(sample_ids):
            return
        m = _models()
        with self._call():
            self.client.delete(
                self.collection_name,
                points_selector=m.PointIdsList(
                    points=[base.to_point_id(s) for s in sample_ids]
                ),
                wait=True,
            )

    def optimize(self) -> None:
        # the server builds HNSW in the background by itself
        pass

    def count(self, filter: IndexFilter | None = None) -> int:
        if not self.exists():
            return 0
        with self._call():
            return self.client.count(
                self.collection_name,
                count_filter=_to_filter(filter),
                exact=True,
            ).count

    def _approx_count(self) -> int:
        """The number of points as the server estimates it (no scan),
        for the search width of a query."""
        with self._call():
            return self.client.count(self.collection_name, exact=False).count

    def label_counts(self, filter=None):
        if not self.exists():
            return {}
        with self._call():
            hits = self.client.facet(
                self.collection_name,
                key=base.LABEL,
                facet_filter=_to_filter(filter),
                limit=base.MAX_LABELS,
                exact=True,
            ).hits
        return {h.value: h.count for h in hits}

    def scroll(self, filter, batch_size, payload, vector):
        if not self.exists():
            return
        offset = None
        while True:
            with self._call():
                records, offset = self.client.scroll(
                    self.collection_name,
                    limit=batch_size,
                    offset=offset,
                    scroll_filter=_to_filter(filter),
                    with_payload=payload,
                    with_vectors=vector,
                )
            if records:
                yield records
            if offset is None:
                return

    def retrieve(self, sample_ids, keys=()):
        with self._call():
            records = self.client.retrieve(
                self.collection_name,
                ids=[base.to_point_id(s) for s in sample_ids],
                with_payload=list(keys) or False,
                with_vectors=True,
            )
        found = {base.to_sample_id(r.id): r for r in records}
        order = [s for s in sample_ids if s in found]
        vectors = np.array([found[s].vector for s in order], dtype=np.float32)
        return (
            order,
            vectors.reshape(len(order), self.dim or 0),
            [found[s].payload or {} for s in order],
        )

    def query(self, vectors, k, filter=None, exact=False, hnsw_ef=None):
        m = _models()
        vectors = base.as_matrix(vectors, self.dim)
        exact = exact or self.scans_instead(filter, self._threshold_kb())
        params = self.search_params(
            m, exact, hnsw_ef, self._approx_count(), filter
        )
        native = _to_filter(filter)
        requests = [
            m.QueryRequest(
                query=v.tolist(),
                filter=native,
                limit=int(k),
                params=params,
                with_payload=[base.LABEL],
                with_vector=False,
            )
            for v in vectors
        ]
        with self._call():
            responses = self.client.query_batch_points(
                self.collection_name, requests=requests
            )
        sign = -1.0 if self.metric == "euclidean" else 1.0
        hits = [
            [
                (
                    base.to_sample_id(p.id),
                    sign * p.score,
                    (p.payload or {}).get(base.LABEL),
                )
                for p in r.points
            ]
            for r in responses
        ]
        return base.pad_results(hits, int(k))

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"ServerIndex({self.collection_name!r})"


def _is_client_error(e: Exception) -> bool:
    """Whether ``e`` comes from talking to the server (HTTP, gRPC or the
    connection), not from our own code."""
    from qdrant_client.http.exceptions import ApiException

    if isinstance(e, (ApiException, ConnectionError, TimeoutError)):
        return True
    module = type(e).__module__ or ""
    return module.startswith(("httpx", "httpcore", "grpc"))


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _to_filter(f: IndexFilter | None):
    if f is None or f.is_empty():
        return None
    m = _models()
    must, must_not = [], []
    if f.labeled:
        must_not.append(
            m.IsEmptyCondition(is_empty=m.PayloadField(key=base.LABEL))
        )
    if f.labels is not None:
        must.append(
            m.FieldCondition(
                key=base.LABEL, match=m.MatchAny(any=list(f.labels))
            )
        )
    if f.tags is not None:
        must.append(
            m.FieldCondition(key=base.TAGS, match=m.MatchAny(any=list(f.tags)))
        )
    if f.sample_ids is not None:
        must.append(
            m.HasIdCondition(
                has_id=[base.to_point_id(s) for s in f.sample_ids]
            )
        )
    if f.exclude_sample_ids:
        must_not.append(
            m.HasIdCondition(
                has_id=[base.to_point_id(s) for s in f.exclude_sample_ids]
            )
        )
    for key, value in f.match:
        must.append(m.FieldCondition(key=key, match=m.MatchValue(value=value)))
    return m.Filter(must=must or None, must_not=must_not or None)
