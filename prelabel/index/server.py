"""The scale-out place: a collection on a Qdrant server (or Qdrant Cloud).

Talks to the server through ``qdrant-client``'s current API
(``collection_exists`` / ``create_collection``, ``upsert``, ``scroll``,
``query_batch_points``). Credentials are passed in, never stored here.
``QdrantClient(":memory:")`` or ``QdrantClient(path=...)`` serve the same
API in-process, which is how the tests exercise this module.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import numpy as np

from prelabel.index import base
from prelabel.index.base import IndexFilter, VectorIndex


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

    Args:
        client: a ``qdrant_client.QdrantClient``
        collection_name: the collection to use or create
        metric ("cosine"): ``"cosine"``, ``"dotproduct"`` or ``"euclidean"``
        shard_number (None): shards of a new collection
        replication_factor (None): replicas of a new collection
        write_consistency_factor (None): of a new collection
        hnsw_config (None): dict of ``qdrant_client.models.HnswConfigDiff``
        quantization (None): ``None`` or ``"int8"``
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
        quantization: str | None = None,
    ):
        if metric not in base.METRICS:
            raise ValueError(
                f"metric={metric!r} is not supported; use one of "
                f"{base.METRICS}"
            )
        self.client = client
        self.collection_name = collection_name
        self.metric = metric
        self.shard_number = shard_number
        self.replication_factor = replication_factor
        self.write_consistency_factor = write_consistency_factor
        self.hnsw_config = hnsw_config
        self.quantization = quantization
        self._dim: int | None = None

    @property
    def name(self) -> str:
        return self.collection_name

    @property
    def dim(self) -> int | None:
        if self._dim is None and self.exists():
            info = self.client.get_collection(self.collection_name)
            self._dim = info.config.params.vectors.size
        return self._dim

    def exists(self) -> bool:
        return self.client.collection_exists(self.collection_name)

    def create(self, dim: int) -> None:
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
        self.client.create_collection(
            self.collection_name,
            vectors_config=m.VectorParams(size=int(dim), distance=distance),
            shard_number=self.shard_number,
            replication_factor=self.replication_factor,
            write_consistency_factor=self.write_consistency_factor,
            hnsw_config=(
                m.HnswConfigDiff(**self.hnsw_config)
                if self.hnsw_config
                else None
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
        self._dim = int(dim)

    def drop(self) -> None:
        if self.exists():
            self.client.delete_collection(self.collection_name)
        self._dim = None

    def upsert(self, sample_ids, vectors, payloads) -> None:
        if not len(sample_ids):
            return
        m = _models()
        vectors = base.as_matrix(vectors, self.dim)
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
        return self.client.count(
            self.collection_name, count_filter=_to_filter(filter), exact=True
        ).count

    def iter_payloads(
        self,
        keys: Sequence[str],
        filter: IndexFilter | None = None,
        batch_size: int = 10000,
    ) -> Iterator[tuple[str, dict]]:
        if not self.exists():
            return
        offset = None
        while True:
            records, offset = self.client.scroll(
                self.collection_name,
                limit=batch_size,
                offset=offset,
                scroll_filter=_to_filter(filter),
                with_payload=list(keys),
                with_vectors=False,
            )
            for r in records:
                yield base.to_sample_id(r.id), r.payload or {}
            if offset is None:
                return

    def get_vectors(self, sample_ids):
        records = self.client.retrieve(
            self.collection_name,
            ids=[base.to_point_id(s) for s in sample_ids],
            with_payload=False,
            with_vectors=True,
        )
        found = {base.to_sample_id(r.id): r.vector for r in records}
        order = [s for s in sample_ids if s in found]
        vectors = np.array([found[s] for s in order], dtype=np.float32)
        return order, vectors.reshape(len(order), self.dim or 0)

    def query(self, vectors, k, filter=None, exact=False, hnsw_ef=None):
        m = _models()
        vectors = base.as_matrix(vectors, self.dim)
        params = None
        if exact or hnsw_ef is not None:
            params = m.SearchParams(hnsw_ef=hnsw_ef, exact=bool(exact))
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
