"""The small interface every vector index place implements.

Two places implement it: :class:`prelabel.index.edge.EdgeIndex` (Qdrant Edge,
a shard on disk in this process) and :class:`prelabel.index.server.ServerIndex`
(a Qdrant server through ``qdrant-client``). Everything above this module
(sync, kNN, the FiftyOne brain backend) talks only to this interface, so the
two places behave the same.

A point is a FiftyOne sample: its Qdrant id is derived from the sample id the
same way FiftyOne's own Qdrant backend does it (the 24 hex digits plus eight
zeros, read as a UUID), so the mapping needs no lookup table. Its payload
holds ``sample_id``, ``label`` (the reference label or ``None``), ``tags``,
two digests that let a sync skip what did not change, and ``norm``, the
length of the vector as given (a cosine index keeps unit vectors; the norm
gives back what was added).
"""

from __future__ import annotations

import abc
import hashlib
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

#: payload keys
SAMPLE_ID = "sample_id"
LABEL = "label"
TAGS = "tags"
VECTOR_DIGEST = "vdigest"
PAYLOAD_DIGEST = "pdigest"
NORM = "norm"

METRICS = ("cosine", "dotproduct", "euclidean")

#: how a new index keeps its vectors: ``"int8"`` (scalar quantization,
#: with the float32 vectors kept for rescoring) or ``None`` (float32 only).
#: On 60,000 x 1,280 MNIST features (benchmarks/index_settings.py) int8
#: builds the graph 2.8x faster and answers filtered queries 1.4x faster
#: at the same recall@15, 0.9997 against exact search (0.973 without
#: rescoring)
DEFAULT_QUANTIZATION = "int8"

#: a quantized index ranks this many times k candidates by their int8
#: scores, then rescores them with the float32 vectors ...
RESCORE_OVERSAMPLING = 2.0
#: ... and this many once it holds more than :data:`LARGE_INDEX` points
LARGE_INDEX_OVERSAMPLING = 4.0
#: past this many points, a query's search ``ef`` grows with the index:
#: one per :data:`POINTS_PER_EF` points (never under ``ef_construct``,
#: the engine's default). On noisy copies of the real MNIST features
#: (256 principal components, a filter of references, k = 15), recall@15
#: against exact search at the engine's defaults was 0.993 at 100,000
#: points but 0.950 at 500,000 and 0.893 at 1,000,000; with 4x
#: oversampling, ``ef`` 200 / 400 gave 0.986 / 0.994 at 500,000 and 400 /
#: 600 gave 0.985 / 0.990 at 1,000,000. Through FiftyOne at 500,000
#: samples (``ef`` 250): recall@15 0.991 instead of 0.955, a
#: pre-annotation 10-35 % slower (BENCHMARKS.md, "Scale in FiftyOne")
LARGE_INDEX = 200_000
POINTS_PER_EF = 2_000

#: a sync builds the graph of every this many points it writes (then
#: hands the shard's pages back), and a new embedded index keeps its
#: segments under this many points: at 1,000,000 x 512 one graph built
#: at the end peaked at 10.5 GB RSS; four of 250,000 at 5.1 GB, built in
#: 112 s instead of 146, recall@15 0.9999 (0.997), 143-155 queries/s
#: instead of 172 (benchmarks/scale.py)
PART_POINTS = 250_000

#: the HNSW settings of a new index, under those a caller gives (Qdrant's
#: own). ``ef_construct`` 64 built a 60,000-point int8 graph in 3/4 of the
#: time, but at 1,000,000 points it saved nothing and dropped recall@15
#: from 0.995 to 0.967 (benchmarks/index_settings.py, scale.py).
#: ``full_scan_threshold`` (KB of float32 vectors: 10,000 points at 1,280
#: dimensions) is 5x Qdrant's: a filter matching fewer points is answered
#: by scanning them (their int8 copies, then rescoring), which at 3,000
#: to 9,000 labeled points of 60,000 found the true neighbors (recall@15
#: 1.000) where the graph found 0.003 to 0.47 (benchmarks/filtered_recall.py)
DEFAULT_HNSW = {"m": 16, "ef_construct": 100, "full_scan_threshold": 50000}

#: a filter that selects no tag (labeled points, a reference view's marks,
#: some labels) has no subgraph of its own in the index, so its queries
#: walk the graph with Qdrant's ACORN (the neighbors' neighbors of points
#: the filter drops), unless the engine estimates it keeps more than this
#: share of the points: at 18,000 and 36,000 labeled points of 60,000 it
#: lifted recall@15 from 0.63 and 0.81 to 0.995 and 1.000
#: (benchmarks/filtered_recall.py)
ACORN_MAX_SELECTIVITY = 0.95


def hnsw_settings(hnsw_config: dict | None) -> dict:
    """The HNSW settings of a new index: :data:`DEFAULT_HNSW` updated with
    ``hnsw_config``."""
    return {**DEFAULT_HNSW, **(hnsw_config or {})}


def search_ef(num_points: int, floor: int = 100) -> int:
    """The HNSW search ``ef`` of a query on an index of ``num_points``
    points: one per :data:`POINTS_PER_EF` points, at least ``floor``
    (the index's ``ef_construct``, the engine's own default)."""
    return max(int(floor), int(num_points) // POINTS_PER_EF)


def check_quantization(quantization) -> None:
    """Raises unless ``quantization`` is one an index supports."""
    if quantization not in (None, "int8"):
        raise ValueError(
            f"quantization={quantization!r} is not supported; use 'int8' "
            "(the default) or None (float32 vectors only)"
        )


#: the most distinct labels :meth:`VectorIndex.label_counts` asks a place's
#: facet of the labels for
MAX_LABELS = 1_000_000


def to_point_id(sample_id: str) -> str:
    """The Qdrant point id (a UUID string) of a FiftyOne sample id."""
    return str(uuid.UUID(sample_id + "00000000"))


def to_sample_id(point_id) -> str:
    """The FiftyOne sample id of a Qdrant point id (UUID or its string)."""
    return str(point_id).replace("-", "")[:-8]


def vector_digest(vector: np.ndarray) -> str:
    """A short digest of a vector's float32 bytes."""
    data = np.ascontiguousarray(vector, dtype=np.float32)
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def payload_digest(label: str | None, tags: Sequence[str]) -> str:
    """A short digest of the reference label and tags of a point."""
    text = repr((label, sorted(tags or ())))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def make_payload(
    sample_id: str,
    label: str | None,
    tags: Sequence[str],
    vector: np.ndarray,
) -> dict:
    """The payload stored with a sample's point whose vector (as given,
    before any normalization) is ``vector`` (an empty label is no
    label)."""
    matrix = np.asarray(vector, dtype=np.float32)[None, :]
    return make_payloads([sample_id], [label], [tags], matrix)[0]


def make_payloads(
    sample_ids: Sequence[str],
    labels: Sequence[str | None],
    tags: Sequence[Sequence[str]],
    vectors: np.ndarray,
) -> list[dict]:
    """:func:`make_payload` of many points at once: ``vectors`` is their
    float32 ``(n, dim)`` matrix (the norms are computed in one pass, each
    distinct label and tags digested once)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1).tolist()
    digests: dict[tuple, str] = {}
    out = []
    for sid, label, tag_list, vector, norm in zip(
        sample_ids, labels, tags, vectors, norms, strict=True
    ):
        label = label or None
        tag_list = sorted(tag_list or ())
        key = (label, tuple(tag_list))
        pdigest = digests.get(key)
        if pdigest is None:
            pdigest = digests[key] = payload_digest(label, tag_list)
        out.append(
            {
                SAMPLE_ID: sid,
                LABEL: label,
                TAGS: tag_list,
                VECTOR_DIGEST: vector_digest(vector),
                PAYLOAD_DIGEST: pdigest,
                NORM: norm,
            }
        )
    return out


@dataclass(frozen=True)
class IndexFilter:
    """A payload filter, translated by each place into Qdrant's own filter.

    Args:
        labeled (False): only points whose ``label`` is set
        labels (None): only points whose ``label`` is one of these
        tags (None): only points having at least one of these tags
        sample_ids (None): only these samples (small sets only: the ids
            travel in the request)
        exclude_sample_ids (None): never these samples
        match (()): ``(key, value)`` pairs the payload must equal
    """

    labeled: bool = False
    labels: tuple[str, ...] | None = None
    tags: tuple[str, ...] | None = None
    sample_ids: tuple[str, ...] | None = None
    exclude_sample_ids: tuple[str, ...] = field(default_factory=tuple)
    match: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @classmethod
    def reference(cls, tags: str | Sequence[str] | None = None) -> IndexFilter:
        """Labeled points, optionally only those with one of ``tags``."""
        if isinstance(tags, str):
            tags = (tags,)
        return cls(labeled=True, tags=tuple(tags) if tags else None)

    def is_empty(self) -> bool:
        return not (
            self.labeled
            or self.labels is not None
            or self.tags is not None
            or self.sample_ids is not None
            or self.exclude_sample_ids
            or self.match
        )

    def is_untagged(self) -> bool:
        """Whether the filter keeps only some points without naming a tag
        (labeled points, a reference view's marks, labels): the engine
        has no graph links of their own between such points, as it has
        for each tag."""
        return not self.is_empty() and not self.tags


@dataclass
class QueryResult:
    """Neighbors of a batch of queries, padded to ``k`` columns.

    Attributes:
        sample_ids: list (one per query) of lists of neighbor sample ids
        scores: float array (num_queries, k) of similarities, NaN-padded:
            higher is always closer (cosine similarity, dot product, or the
            negated euclidean distance)
        labels: list (one per query) of lists of the neighbors' labels
    """

    sample_ids: list[list[str]]
    scores: np.ndarray
    labels: list[list[str | None]]


class IndexBusyError(RuntimeError):
    """The embedded index stayed locked by another process too long."""


class IndexDamagedError(ValueError):
    """The index cannot be read as it is (files damaged or missing); the
    message says how to rebuild it."""


class IndexUnreachableError(RuntimeError):
    """The Qdrant server could not be reached or refused the request."""


class VectorIndex(abc.ABC):
    """A vector index of FiftyOne samples with payloads."""

    #: "embedded" or "server"
    location: str = ""
    #: ``None`` (float32 vectors) or ``"int8"`` (scalar quantization)
    quantization: str | None = None
    #: candidates per neighbor a quantized index rescores; None: by the
    #: size of the index (see :data:`RESCORE_OVERSAMPLING`)
    oversampling: float | None = None
    #: HNSW settings of a new index, under :data:`DEFAULT_HNSW`
    hnsw_config: dict | None = None

    def search_params(
        self,
        models,
        exact: bool,
        hnsw_ef: int | None,
        num_points: int = 0,
        filter: IndexFilter | None = None,
    ):
        """The ``SearchParams`` of a query, from the engine's ``models``
        (Qdrant Edge's or qdrant-client's, which share these names), or
        None for the engine's defaults. A quantized index picks
        ``oversampling`` x k candidates by their int8 scores and ranks
        them by their float32 vectors. Without ``hnsw_ef``, an index of
        more than :data:`LARGE_INDEX` points searches wider (see
        :func:`search_ef`). A ``filter`` without tags walks the graph
        with ACORN (see :data:`ACORN_MAX_SELECTIVITY`)."""
        large = num_points > LARGE_INDEX
        if hnsw_ef is None and not exact and large:
            floor = hnsw_settings(self.hnsw_config)["ef_construct"]
            hnsw_ef = search_ef(num_points, floor)
        rescoring = None
        if self.quantization:
            oversampling = self.oversampling or (
                LARGE_INDEX_OVERSAMPLING if large else RESCORE_OVERSAMPLING
            )
            rescoring = models.QuantizationSearchParams(
                rescore=True, oversampling=float(oversampling)
            )
        acorn = None
        if filter is not None and filter.is_untagged():
            acorn = models.AcornSearchParams(
                enable=True, max_selectivity=ACORN_MAX_SELECTIVITY
            )
        if not (exact or hnsw_ef is not None or rescoring or acorn):
            return None
        return models.SearchParams(
            hnsw_ef=hnsw_ef,
            exact=bool(exact),
            quantization=rescoring,
            acorn=acorn,
        )

    def scans_instead(self, filter, threshold_kb: int | None) -> bool:
        """Whether a query with ``filter`` should scan the points it keeps
        rather than walk the graph, on an index created with
        ``threshold_kb`` as its full-scan threshold: one created before
        :data:`DEFAULT_HNSW` raised it walks the graph for a filter
        without a tag that a new index scans, and finds few of the true
        neighbors (0.00-0.54 of them at 5-30 % of 60,000 points)."""
        wanted = DEFAULT_HNSW["full_scan_threshold"]
        if threshold_kb is None or threshold_kb >= wanted:
            return False
        if filter is None or not filter.is_untagged():
            return False
        return self.count(filter) * (self.dim or 0) * 4 <= wanted * 1024

    @property
    @abc.abstractmethod
    def dim(self) -> int | None:
        """The vector dimension, or None if the index was never created."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """What a person sees: a folder or a collection name."""

    @abc.abstractmethod
    def exists(self) -> bool:
        """Whether the index has been created."""

    @abc.abstractmethod
    def create(self, dim: int) -> None:
        """Creates an empty index of vectors of size ``dim``."""

    @abc.abstractmethod
    def count(self, filter: IndexFilter | None = None) -> int:
        """The number of points, optionally matching a filter."""

    @abc.abstractmethod
    def upsert(
        self,
        sample_ids: Sequence[str],
        vectors: np.ndarray,
        payloads: Sequence[dict],
    ) -> None:
        """Inserts or replaces points (vector and whole payload)."""

    @abc.abstractmethod
    def set_payload(self, sample_ids: Sequence[str], payload: dict) -> None:
        """Sets the given payload keys on existing points."""

    @abc.abstractmethod
    def delete(self, sample_ids: Sequence[str]) -> None:
        """Deletes points; unknown ids are ignored."""

    def label_counts(self, filter: IndexFilter | None = None) -> dict:
        """``label -> number of points`` (matching ``filter``) that carry
        it; points without a label are not counted. Places answer from
        their keyword index of labels (a facet) when they have one."""
        counts: dict = {}
        for _, p in self.iter_payloads([LABEL], filter):
            label = p.get(LABEL)
            if label is not None:
                counts[label] = counts.get(label, 0) + 1
        return counts

    @abc.abstractmethod
    def scroll(
        self,
        filter: IndexFilter | None,
        batch_size: int,
        payload: Sequence[str] | bool,
        vector: bool,
    ) -> Iterator[list]:
        """Yields every point (matching ``filter``), a page of the
        engine's records (``id``, ``payload``, ``vector``) at a time."""

    def iter_payloads(
        self,
        keys: Sequence[str],
        filter: IndexFilter | None = None,
        batch_size: int = 10000,
    ) -> Iterator[tuple[str, dict]]:
        """Yields ``(sample_id, payload)`` for every point (matching
        ``filter``), with only ``keys`` of the payload."""
        for records in self.scroll(filter, batch_size, list(keys), False):
            for r in records:
                yield to_sample_id(r.id), r.payload or {}

    @abc.abstractmethod
    def retrieve(
        self, sample_ids: Sequence[str], keys: Sequence[str] = ()
    ) -> tuple[list[str], np.ndarray, list[dict]]:
        """The stored vectors and payloads (only ``keys``) of the given
        samples that are in the index, in the order asked.

        Returns:
            a tuple of (found sample ids, float32 array of their vectors,
            their payloads)
        """

    def get_vectors(
        self, sample_ids: Sequence[str]
    ) -> tuple[list[str], np.ndarray]:
        """The stored vectors of the given samples that are in the index
        (unit length in a cosine index).

        Returns:
            a tuple of (found sample ids, float32 array of their vectors)
        """
        found, vectors, _ = self.retrieve(sample_ids)
        return found, vectors

    def iter_vectors(
        self, filter: IndexFilter | None = None, batch_size: int = 4096
    ) -> Iterator[tuple[list[str], np.ndarray]]:
        """Yields ``(sample ids, stored vectors)`` batches of every point
        (matching ``filter``), in the index's order."""
        for records in self.scroll(filter, batch_size, False, True):
            vectors = np.array([r.vector for r in records], dtype=np.float32)
            yield (
                [to_sample_id(r.id) for r in records],
                vectors.reshape(len(records), self.dim or 0),
            )

    @abc.abstractmethod
    def query(
        self,
        vectors: np.ndarray,
        k: int,
        filter: IndexFilter | None = None,
        exact: bool = False,
        hnsw_ef: int | None = None,
    ) -> QueryResult:
        """The ``k`` nearest points of each query vector, in one batch."""

    @abc.abstractmethod
    def optimize(self) -> None:
        """Builds the HNSW graph and merges segments, so queries are fast."""

    @abc.abstractmethod
    def drop(self) -> None:
        """Deletes the whole index and everything it stored."""

    def close(self) -> None:
        """Releases what the index holds open (nothing by default)."""

    def __enter__(self):
        return self

    def __exit__(self, *args):
        self.close()


def as_matrix(vectors, dim: int | None = None) -> np.ndarray:
    """Validates query or point vectors: a float32 (n, dim) array."""
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(
            f"vectors must be a 2D array (n, dim); got shape {arr.shape}"
        )
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(
            f"vectors have dimension {arr.shape[1]} but the index holds "
            f"{dim}-dimensional vectors; use embeddings from the same model "
            "or sync a new brain key"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError("vectors contain NaN or infinite values")
    return arr


def pad_results(
    hits: list[list[tuple[str, float, str | None]]], k: int
) -> QueryResult:
    """Builds a :class:`QueryResult` from per-query ``(id, score, label)``."""
    scores = np.full((len(hits), k), np.nan, dtype=np.float32)
    ids, labels = [], []
    for i, row in enumerate(hits):
        ids.append([h[0] for h in row])
        labels.append([h[2] for h in row])
        if row:
            scores[i, : len(row)] = [h[1] for h in row]
    return QueryResult(sample_ids=ids, scores=scores, labels=labels)
