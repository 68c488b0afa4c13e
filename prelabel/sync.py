"""Keeping an index in step with a FiftyOne collection.

A sync compares what should be in the index (each sample's embedding,
reference label and tags) with what is (the digests stored in the points'
payloads) and sends only the difference: new or changed vectors are
upserted, changed labels or tags are set as payload (no vector re-sent),
points of samples that are gone are deleted. Point ids derive from sample
ids, so a sync killed half way leaves no duplicates, and the next sync
finishes the job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from prelabel import constants, validation
from prelabel.index import base
from prelabel.index.base import VectorIndex
from prelabel.progress import Progress, ProgressArg

logger = logging.getLogger(__name__)


@dataclass
class SyncStats:
    """What a sync did.

    Attributes:
        added: points created
        updated_vectors: points whose vector changed
        updated_payloads: points whose label or tags changed (payload only)
        deleted: points removed (their samples are gone or lost their
            embedding)
        unchanged: points left as they were
        skipped: samples without an embedding
        seconds: per stage timings
    """

    added: int = 0
    updated_vectors: int = 0
    updated_payloads: int = 0
    deleted: int = 0
    unchanged: int = 0
    skipped: int = 0
    seconds: dict = field(default_factory=dict)

    @property
    def sent(self) -> int:
        return self.added + self.updated_vectors + self.updated_payloads


def _label_path(label_field: str | None) -> str | None:
    return f"{label_field}.label" if label_field else None


def read_chunk(dataset, ids, embeddings_field, label_field):
    """``(ids, vectors-or-None, labels, tags)`` of the given samples."""
    view = dataset.select(ids)
    fields = ["id", embeddings_field, "tags"]
    label_path = _label_path(label_field)
    if label_path:
        fields.append(label_path)
    values = view.values(fields)
    labels = values[3] if label_path else [None] * len(values[0])
    return values[0], values[1], labels, values[2]


def payloads_for(dataset, ids, vectors, label_field) -> list[dict]:
    """The payloads of the given samples, whose vectors are ``vectors``."""
    view = dataset.select(ids)
    label_path = _label_path(label_field)
    fields = ["id", "tags"] + ([label_path] if label_path else [])
    values = view.values(fields)
    meta = {
        sid: (lbl, tags)
        for sid, tags, lbl in zip(
            values[0],
            values[1],
            values[2] if label_path else [None] * len(values[0]),
            strict=True,
        )
    }
    return [
        base.make_payload(
            sid, meta[sid][0], meta[sid][1], base.vector_digest(vec)
        )
        for sid, vec in zip(ids, vectors, strict=True)
    ]


def check_index_dim(index: VectorIndex, dim: int, embeddings_field: str):
    """Raises if an existing ``index`` holds vectors of another length."""
    if index.dim is not None and index.dim != dim:
        raise ValueError(
            f"embeddings_field={embeddings_field!r} holds {dim}-d "
            f"vectors but the index {index.name} holds {index.dim}-d "
            "ones; use a new brain key for embeddings of another model"
        )


class _Lease:
    """Keeps an embedded index open across the chunks of a long job, and
    gives it back to other processes every few seconds.

    Loading a shard costs more as it grows, so opening it per chunk makes a
    big sync quadratic; holding it for the whole job would make the App wait
    for minutes. Releasing it briefly every couple of seconds lets a waiting
    process (which polls at least every 0.1 s) take its turn. The lease
    lasts ``overhead`` times what the last reopening cost (within
    ``hold`` and ``max_hold``, well under the waiters' lock timeout), so
    that reopening a big shard takes about ``1 / overhead`` of the job.
    """

    def __init__(
        self,
        index,
        hold: float = 2.0,
        pause: float = 0.15,
        overhead: float = 10.0,
        max_hold: float = 30.0,
    ):
        self._session = getattr(index, "session", None)
        self._hold, self._pause, self._overhead = hold, pause, overhead
        self._max_hold = max_hold
        self._cm = None
        self._since = 0.0
        self._lease = hold

    def _open(self):
        if self._session is not None:
            t0 = time.monotonic()
            self._cm = self._session()
            self._cm.__enter__()
            self._since = time.monotonic()
            cost = self._since - t0 + self._pause
            self._lease = min(
                max(self._hold, self._overhead * cost), self._max_hold
            )

    def _close(self, *exc):
        if self._cm is not None:
            cm, self._cm = self._cm, None
            cm.__exit__(*(exc or (None, None, None)))

    def tick(self) -> None:
        if (
            self._cm is not None
            and time.monotonic() - self._since > self._lease
        ):
            self._close()
            time.sleep(self._pause)
            self._open()

    def __enter__(self):
        self._open()
        return self

    def __exit__(self, *exc):
        self._close(*exc)


def sync_points(
    index: VectorIndex,
    samples,
    embeddings_field: str,
    label_field: str | None,
    batch_size: int = 2000,
    progress: ProgressArg = True,
) -> SyncStats:
    """Brings ``index`` up to date with ``samples``.

    Args:
        index: the :class:`prelabel.index.base.VectorIndex`
        samples: the collection the index mirrors
        embeddings_field: the vector field to index
        label_field: the Classification field whose labels go in payloads
        batch_size (2000): points per write
        progress (True): a bar, nothing, or ``progress(fraction, label)``

    Returns:
        a :class:`SyncStats`
    """
    stats = SyncStats()
    t0 = time.perf_counter()
    dim = validation.check_embeddings_field(samples, embeddings_field)
    if label_field:
        validation.check_classification_field(samples, label_field)
    if index.exists():
        check_index_dim(index, dim, embeddings_field)
    else:
        index.create(dim)

    current = {
        sid: (p.get(base.VECTOR_DIGEST), p.get(base.PAYLOAD_DIGEST))
        for sid, p in index.iter_payloads(
            [base.VECTOR_DIGEST, base.PAYLOAD_DIGEST]
        )
    }
    stats.seconds["read_index"] = time.perf_counter() - t0

    dataset = samples._dataset
    all_ids = samples.values("id")
    seen: set[str] = set()
    t1 = time.perf_counter()
    with (
        Progress(progress, len(all_ids), "Syncing index") as bar,
        _Lease(index) as lease,
    ):
        for start in range(0, len(all_ids), batch_size):
            lease.tick()
            chunk = all_ids[start : start + batch_size]
            ids, vecs, labels, tags = read_chunk(
                dataset, chunk, embeddings_field, label_field
            )
            up_ids, up_vecs, up_payloads = [], [], []
            meta_changes: dict[tuple, list[str]] = {}
            for sid, vec, label, tag_list in zip(
                ids, vecs, labels, tags, strict=True
            ):
                if vec is None:
                    stats.skipped += 1
                    continue
                vec = np.asarray(vec, dtype=np.float32)
                if vec.shape != (dim,):
                    raise ValueError(
                        f"sample {sid} has a {vec.shape[0]}-d embedding in "
                        f"{embeddings_field!r} where the others are {dim}-d;"
                        " recompute it with compute_embeddings"
                    )
                seen.add(sid)
                vd = base.vector_digest(vec)
                payload = base.make_payload(sid, label, tag_list, vd)
                old = current.get(sid)
                if old is None or old[0] != vd:
                    if old is None:
                        stats.added += 1
                    else:
                        stats.updated_vectors += 1
                    up_ids.append(sid)
                    up_vecs.append(vec)
                    up_payloads.append(payload)
                elif old[1] != payload[base.PAYLOAD_DIGEST]:
                    stats.updated_payloads += 1
                    key = (label, tuple(payload[base.TAGS]))
                    meta_changes.setdefault(key, []).append(sid)
                else:
                    stats.unchanged += 1
            if up_ids:
                index.upsert(up_ids, np.stack(up_vecs), up_payloads)
            for (label, tag_list), sids in meta_changes.items():
                index.set_payload(
                    sids,
                    {
                        base.LABEL: label,
                        base.TAGS: list(tag_list),
                        base.PAYLOAD_DIGEST: base.payload_digest(
                            label, tag_list
                        ),
                    },
                )
            bar.update(len(chunk))
    stats.seconds["write"] = time.perf_counter() - t1

    stale = [sid for sid in current if sid not in seen]
    for start in range(0, len(stale), batch_size):
        index.delete(stale[start : start + batch_size])
    stats.deleted = len(stale)

    t2 = time.perf_counter()
    if stats.added or stats.updated_vectors or stats.deleted:
        index.optimize()
    stats.seconds["optimize"] = time.perf_counter() - t2
    stats.seconds["total"] = time.perf_counter() - t0
    logger.info("Synced %s: %s", index.name, stats)
    return stats


def check_sync_index(
    samples,
    embeddings_field: str = constants.DEFAULT_EMBEDDINGS_FIELD,
    label_field: str | None = constants.DEFAULT_LABEL_FIELD,
    brain_key: str = constants.DEFAULT_BRAIN_KEY,
    url: str | None = None,
    api_key: str | None = None,
    require_embeddings: bool = True,
):
    """Runs every check of :func:`sync_index` without writing anything, so
    that operator forms can show the reason up front.

    Args: as :func:`sync_index`, and
        require_embeddings (True): ``False`` skips the checks of the
            embeddings themselves, for a caller that computes them first

    Returns:
        the existing
        :class:`prelabel.index.brain.PrelabelQdrantSimilarityIndex` of
        ``brain_key``, or None when the sync would create a new run

    Raises:
        ValueError: one sentence saying what is wrong and what to do
    """
    from prelabel.index.brain import PrelabelQdrantSimilarityIndex

    validation.check_identifier(brain_key, "brain_key")
    dim = None
    if require_embeddings:
        dim = validation.check_embeddings_field(samples, embeddings_field)
    if label_field:
        validation.check_classification_field(samples, label_field)
    dataset = samples._root_dataset
    if brain_key not in dataset.list_brain_runs():
        return None

    results = dataset.load_brain_results(brain_key, url=url, api_key=api_key)
    if not isinstance(results, PrelabelQdrantSimilarityIndex):
        raise ValueError(
            f"brain_key={brain_key!r} is a run of another backend "
            f"({type(results.config).__name__}); choose another key"
        )
    config = results.config
    if config.embeddings_field != embeddings_field:
        raise ValueError(
            f"brain_key={brain_key!r} indexes "
            f"{config.embeddings_field!r}, not {embeddings_field!r}; "
            "use another brain key for other embeddings"
        )
    if config.label_field != label_field:
        raise ValueError(
            f"brain_key={brain_key!r} stores labels of "
            f"{config.label_field!r}, not {label_field!r}; use another "
            "brain key, or delete this run first"
        )
    if dim is not None:
        check_index_dim(results.index, dim, embeddings_field)
    return results


def sync_index(
    samples,
    embeddings_field: str = constants.DEFAULT_EMBEDDINGS_FIELD,
    label_field: str | None = constants.DEFAULT_LABEL_FIELD,
    brain_key: str = constants.DEFAULT_BRAIN_KEY,
    path: str | None = None,
    url: str | None = None,
    api_key: str | None = None,
    collection_name: str | None = None,
    metric: str = "cosine",
    progress: ProgressArg = True,
    **index_kwargs,
):
    """Creates or updates the Qdrant index of ``samples`` under a brain key.

    The first call registers a FiftyOne similarity run (``brain_key``)
    backed by an embedded Qdrant Edge index (default) or a collection on a
    Qdrant server (``url``); later calls send only what changed since.

    Args:
        samples: a FiftyOne dataset or view (the run is registered on its
            dataset; the index mirrors ``samples``)
        embeddings_field ("embeddings"): the vector field to index
        label_field ("ground_truth"): the Classification field whose labels
            go in the payloads, so kNN can select the reference by filter;
            ``None`` for an index without labels
        brain_key ("prelabel_qdrant"): the brain key of the run
        path (None): the embedded index folder (default: under FiftyOne's
            config folder, per dataset and brain key)
        url (None): a Qdrant server URL; the index then lives there
        api_key (None): the server's API key (never stored)
        collection_name (None): the server collection name
        metric ("cosine"): the similarity metric of a new index
        progress (True): a bar, nothing, or ``progress(fraction, label)``
        **index_kwargs: other
            :class:`prelabel.index.brain.PrelabelQdrantSimilarityConfig`
            parameters of a new index (``hnsw_config``, ``quantization``,
            ``shard_number``, ``prefer_grpc``, ...)

    Returns:
        the :class:`prelabel.index.brain.PrelabelQdrantSimilarityIndex`; its
        ``last_sync`` property holds the :class:`SyncStats`
    """
    from prelabel.index.brain import PrelabelQdrantSimilarityConfig

    results = check_sync_index(
        samples,
        embeddings_field=embeddings_field,
        label_field=label_field,
        brain_key=brain_key,
        url=url,
        api_key=api_key,
    )
    dataset = samples._root_dataset

    if results is None:
        config = PrelabelQdrantSimilarityConfig(
            embeddings_field=embeddings_field,
            label_field=label_field,
            metric=metric,
            path=path,
            url=url,
            api_key=api_key,
            collection_name=collection_name,
            **index_kwargs,
        )
        method = config.build()
        method.ensure_requirements()
        method.register_run(dataset, brain_key, overwrite=False)
        results = method.initialize(dataset, brain_key)
        # saved before the long sync: a sync killed half way must leave a
        # run that the next sync_index can load and resume
        results.save()

    try:
        stats = results.sync(samples, progress=progress)
    finally:
        results.save()
    results._last_sync = stats
    return results
