"""Keeping an index in step with a FiftyOne collection.

A sync compares what should be in the index (each sample's embedding,
reference label and tags) with what is (the digests stored in the points'
payloads) and sends only the difference: new or changed vectors are
upserted, changed labels or tags are set as payload (no vector re-sent),
points of samples that are gone are deleted. Point ids derive from sample
ids, so a sync killed half way leaves no duplicates, and the next sync
finishes the job.

It also checks what it keeps: every payload against its own digest, and
the stored vectors of a random sample of the points it would leave
unchanged (all of them with ``verify=True``, or as soon as one of the
sample differs) against the samples' embeddings, so a damaged file (a
point whose bytes changed on disk) is found and repaired instead of being
reported as "in sync".
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from prelabel import validation
from prelabel.index import base
from prelabel.index.base import VectorIndex
from prelabel.index.locking import Lease
from prelabel.prefetch import prefetch
from prelabel.progress import Progress, ProgressArg
from prelabel.stored_vectors import values_with_vectors
from prelabel.units import Samples, units_of

logger = logging.getLogger(__name__)

#: stored vectors may differ from the sample's (normalized) embedding by
#: this much before the point counts as damaged
VECTOR_TOLERANCE = 1e-3

#: how many stored vectors a sync reads back by default (a random sample;
#: all of them when one differs, or when the index is not larger)
VERIFY_SAMPLE = 2000


@dataclass
class SyncStats:
    """What a sync did.

    Attributes:
        added: points created
        updated_vectors: points whose vector changed
        updated_payloads: points whose label or tags changed (payload only)
        deleted: points removed (their samples are gone or lost their
            embedding)
        repaired: points whose stored vector or payload had been damaged
            (they no longer matched what was written) and were written
            again
        unchanged: points left as they were
        skipped: samples without an embedding
        seconds: per stage timings
    """

    added: int = 0
    updated_vectors: int = 0
    updated_payloads: int = 0
    deleted: int = 0
    repaired: int = 0
    unchanged: int = 0
    skipped: int = 0
    seconds: dict = field(default_factory=dict)

    @property
    def sent(self) -> int:
        return (
            self.added
            + self.updated_vectors
            + self.updated_payloads
            + self.repaired
        )


def _label_path(label_field: str | None) -> str | None:
    return f"{label_field}.label" if label_field else None


def read_chunk(dataset, ids, embeddings_field, label_field, units=None):
    """``(ids, vectors-or-None, labels, tags, sample ids)`` of the given
    points: samples, or the boxes of a patches field (their own labels,
    their sample's tags)."""
    units = units or Samples()
    if units.patches_field is not None:
        wanted = set(ids)
        parents = sorted({p for p in units.parents_of(dataset, ids) if p})
        view = dataset.select(parents)
        tags = dict(zip(*view.values(["id", "tags"]), strict=True))
        rows = [
            r
            for r in units.rows(view, [embeddings_field, "label"])
            if r[0] in wanted
        ]
        cols = list(zip(*rows, strict=True)) or [()] * 5
        lids, sids, _, vecs, labels = cols
        return lids, vecs, labels, [tags[s] for s in sids], sids
    view = dataset.select(ids)
    fields = ["id", embeddings_field, "tags"]
    label_path = _label_path(label_field)
    if label_path:
        fields.append(label_path)
    values = values_with_vectors(view, fields, embeddings_field)
    labels = values[3] if label_path else [None] * len(values[0])
    return values[0], values[1], labels, values[2], values[0]


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
    return base.make_payloads(
        ids,
        [meta[sid][0] for sid in ids],
        [meta[sid][1] for sid in ids],
        np.asarray(vectors, dtype=np.float32).reshape(len(ids), -1),
    )


def patch_payloads(
    dataset, sample_ids, label_ids, vectors, patches_field: str
) -> list[dict]:
    """The payloads of the given patches (labels of ``patches_field``),
    whose vectors are ``vectors``: the patch's own label, its sample's
    tags, and its sample's id."""
    _, id_path = dataset._get_label_field_path(patches_field, "id")
    _, label_path = dataset._get_label_field_path(patches_field, "label")
    values = dataset.select(sorted(set(sample_ids))).values(
        ["tags", id_path, label_path]
    )
    meta = {}
    for tags, lids, labels in zip(*values, strict=True):
        if not isinstance(lids, list):  # a single label per sample
            lids, labels = [lids], [labels]
        for lid, label in zip(lids, labels, strict=True):
            if lid is not None:
                meta[lid] = (label, tags)
    missing = [lid for lid in label_ids if lid not in meta]
    if missing:
        raise ValueError(
            f"{len(missing)} label_ids (eg {missing[0]}) are not labels of "
            f"patches_field={patches_field!r} of the given samples"
        )
    return base.make_payloads(
        sample_ids,
        [meta[lid][0] for lid in label_ids],
        [meta[lid][1] for lid in label_ids],
        np.asarray(vectors, dtype=np.float32).reshape(len(label_ids), -1),
    )


def check_index_dim(index: VectorIndex, dim: int, embeddings_field: str):
    """Raises if an existing ``index`` holds vectors of another length."""
    if index.dim is not None and index.dim != dim:
        raise ValueError(
            f"embeddings_field={embeddings_field!r} holds {dim}-d "
            f"vectors but the index {index.name} holds {index.dim}-d "
            "ones; use a new brain key for embeddings of another model"
        )


def check_vectors(vecs, sids, embeddings_field: str, dim: int):
    """The samples' embeddings as one float32 ``(n, dim)`` matrix, or a
    sentence naming the first sample and the field whose embedding cannot
    be indexed."""
    for vec, sid in zip(vecs, sids, strict=True):
        shape = np.shape(vec)
        if shape != (dim,):
            raise ValueError(
                f"sample {sid} has a {int(np.prod(shape))}-d embedding in "
                f"embeddings_field={embeddings_field!r} where the others "
                f"are {dim}-d; recompute it with compute_embeddings"
            )
    matrix = np.array(vecs, dtype=np.float32).reshape(len(vecs), dim)
    bad = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
    if len(bad):
        raise ValueError(
            f"sample {sids[bad[0]]} has NaN or infinite values in "
            f"embeddings_field={embeddings_field!r}; recompute its embedding "
            "(compute_embeddings(..., skip_existing=False) on it) or "
            "exclude it from the sync"
        )
    return matrix


def embedding_dim(
    samples, embeddings_field: str, patches_field: str | None = None
) -> int | None:
    """The length of the first embedding in ``samples`` (of their boxes,
    with ``patches_field``; None: none)."""
    path = units_of(patches_field).path(samples, embeddings_field)
    try:
        return validation.check_embeddings_field(samples, path)
    except ValueError:
        return None


def stored_form(vectors: np.ndarray, metric: str) -> np.ndarray:
    """The vectors as the engine keeps them: unit length for cosine."""
    if metric != "cosine":
        return vectors
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


_CURRENT_KEYS = [
    base.SAMPLE_ID,
    base.LABEL,
    base.TAGS,
    base.VECTOR_DIGEST,
    base.PAYLOAD_DIGEST,
]


def _summary(sid: str, p: dict) -> tuple:
    """``(vector digest, payload digest, payload intact)`` of a point of
    sample ``sid``."""
    intact = p.get(base.SAMPLE_ID) == sid and p.get(
        base.PAYLOAD_DIGEST
    ) == base.payload_digest(p.get(base.LABEL), p.get(base.TAGS) or ())
    return p.get(base.VECTOR_DIGEST), p.get(base.PAYLOAD_DIGEST), intact


class _PointStream:
    """The index's points in sample-id order (the order of their point
    ids, which derive from sample ids), read a batch at a time: the sync
    walks it beside the dataset's sorted ids, so neither side is held in
    memory whole."""

    def __init__(self, index: VectorIndex):
        self._it = iter(index.iter_payloads(_CURRENT_KEYS))
        self._next = next(self._it, None)

    def until(self, last: str, wanted: set) -> tuple[dict, list[str]]:
        """The points up to id ``last``: ``(payloads of those in wanted,
        ids of the others)`` (the others are stale: the dataset's ids are
        walked in order too)."""
        current, stale = {}, []
        while self._next is not None and self._next[0] <= last:
            sid, p = self._next
            if sid in wanted:
                current[sid] = p
            else:
                stale.append(sid)
            self._next = next(self._it, None)
        return current, stale

    def rest(self) -> list[str]:
        """The ids of the points after the dataset's last id (stale)."""
        out = []
        while self._next is not None:
            out.append(self._next[0])
            self._next = next(self._it, None)
        return out


class _Chunk:
    """What one chunk of a sync sends."""

    def __init__(self):
        self.up_ids, self.up_vecs, self.up_payloads = [], [], []
        self.meta_changes: dict[tuple, list[str]] = {}
        self.keep_ids, self.keep_vecs = [], []
        self.stale: list[str] = []

    def upsert(self, sid, vec, payload):
        self.up_ids.append(sid)
        self.up_vecs.append(vec)
        self.up_payloads.append(payload)

    def keep(self, sid, vec, payload, unchanged: bool):
        """A point whose stored vector should be the embedding already."""
        self.keep_ids.append(sid)
        self.keep_vecs.append((vec, payload, unchanged))


@dataclass
class _Rows:
    """A chunk of samples read and made ready to send: those with an
    embedding (ids, checked vectors, payloads) and those without."""

    sids: list
    matrix: np.ndarray
    payloads: list[dict]
    skipped: list

    @classmethod
    def of(cls, values, dim: int, embeddings_field: str) -> _Rows:
        """The rows of ``read_chunk``'s ``values``: the vectors checked
        (a wrong length or a NaN raises, naming the sample) and the
        payloads made."""
        rows, skipped = [], []
        for row in zip(*values, strict=True):
            if row[1] is None:
                skipped.append(row[0])
            else:
                rows.append(row)
        if not rows:
            return cls([], np.zeros((0, dim), np.float32), [], skipped)
        sids, vecs, labels, tags, parents = zip(*rows, strict=True)
        matrix = check_vectors(vecs, sids, embeddings_field, dim)
        payloads = base.make_payloads(parents, labels, tags, matrix)
        return cls(list(sids), matrix, payloads, skipped)


def _plan_chunk(rows: _Rows, current, stats, checked) -> _Chunk:
    """What a chunk sends; ``checked(sid)`` says whether a point left in
    place has its stored vector read back."""
    chunk = _Chunk()
    for sid in rows.skipped:
        stats.skipped += 1
        if sid in current:
            chunk.stale.append(sid)  # lost its embedding
    for sid, vec, payload in zip(
        rows.sids, rows.matrix, rows.payloads, strict=True
    ):
        old = current.get(sid)
        if old is not None:
            old = _summary(payload[base.SAMPLE_ID], old)
        if old is None:
            stats.added += 1
            chunk.upsert(sid, vec, payload)
        elif old[0] != payload[base.VECTOR_DIGEST]:
            stats.updated_vectors += 1
            chunk.upsert(sid, vec, payload)
        elif not old[2]:
            stats.repaired += 1
            chunk.upsert(sid, vec, payload)
        elif old[1] != payload[base.PAYLOAD_DIGEST]:
            stats.updated_payloads += 1
            key = (payload[base.LABEL], tuple(payload[base.TAGS]))
            chunk.meta_changes.setdefault(key, []).append(sid)
            if checked(sid):
                chunk.keep(sid, vec, payload, unchanged=False)
        else:
            stats.unchanged += 1
            if checked(sid):
                chunk.keep(sid, vec, payload, unchanged=True)
    return chunk


def _verify_chunk(index, chunk: _Chunk, stats: SyncStats, metric: str):
    """Reads back the vectors the chunk leaves in place; a point whose
    stored vector differs from the embedding is written again."""
    if not chunk.keep_ids:
        return
    found, stored = index.get_vectors(chunk.keep_ids)
    where = {sid: i for i, sid in enumerate(found)}
    want = stored_form(
        np.stack([v for v, _, _ in chunk.keep_vecs]).astype(np.float32),
        metric,
    )
    damaged = 0
    for j, sid in enumerate(chunk.keep_ids):
        i = where.get(sid)
        if i is not None and np.allclose(
            stored[i], want[j], atol=VECTOR_TOLERANCE, rtol=0
        ):
            continue
        vec, payload, unchanged = chunk.keep_vecs[j]
        chunk.upsert(sid, vec, payload)
        damaged += 1
        stats.unchanged -= int(unchanged)
        stats.updated_payloads -= int(not unchanged)
    stats.repaired += damaged
    if damaged:
        logger.warning(
            "%s: %d points no longer held what was written (damaged "
            "files?); they were written again",
            index.name,
            damaged,
        )


def _checked(ids: list, verify):
    """Whether a point's stored vector is read back (see
    :func:`sync_points`)."""
    if verify is True or (verify == "sample" and len(ids) <= VERIFY_SAMPLE):
        return lambda sid: True
    if verify == "sample":
        pick = np.random.default_rng().choice(
            len(ids), VERIFY_SAMPLE, replace=False
        )
        sample = {ids[i] for i in pick}
        return sample.__contains__
    if verify is False:
        return lambda sid: False
    raise ValueError(f"verify must be True, False or 'sample'; got {verify!r}")


def _delete(index, stale: list[str], stats: SyncStats) -> None:
    """Deletes the points of samples that are gone (or lost their
    embedding)."""
    for start in range(0, len(stale), 10000):
        index.delete(stale[start : start + 10000])
    stats.deleted += len(stale)


def _apply_chunk(index, chunk: _Chunk) -> None:
    if chunk.up_ids:
        index.upsert(chunk.up_ids, np.stack(chunk.up_vecs), chunk.up_payloads)
    for (label, tag_list), sids in chunk.meta_changes.items():
        index.set_payload(
            sids,
            {
                base.LABEL: label,
                base.TAGS: list(tag_list),
                base.PAYLOAD_DIGEST: base.payload_digest(label, tag_list),
            },
        )


def _optimize(index, seconds: dict) -> None:
    """Builds the graph of what was written (its seconds counted)."""
    t0 = time.perf_counter()
    index.optimize()
    seconds["optimize"] = seconds.get("optimize", 0.0) + (
        time.perf_counter() - t0
    )


class GraphParts:
    """Builds the graph of every :data:`prelabel.index.base.PART_POINTS`
    points a job writes, then closes and reopens the index (its pages
    handed back): a big job's memory is that of one part's build, not of
    one graph over every point.

    Args:
        index: the index written to
        lease: the :class:`prelabel.index.locking.Lease` the job holds
        seconds: where the builds' seconds are added (key ``optimize``)
    """

    def __init__(self, index: VectorIndex, lease: Lease, seconds: dict):
        self.index, self.lease, self.seconds = index, lease, seconds
        self.unbuilt = 0

    def wrote(self, num_points: int) -> None:
        """Counts points written; builds their part once it is full."""
        self.unbuilt += num_points
        if self.unbuilt >= base.PART_POINTS:
            _optimize(self.index, self.seconds)
            self.lease.reopen()
            self.unbuilt = 0


def set_payload_in_parts(
    index: VectorIndex, sample_ids, payload: dict, build_over: int = 0
) -> None:
    """Sets ``payload`` on the points of ``sample_ids``, building the
    graph of every :data:`prelabel.index.base.PART_POINTS` of them as it
    goes (see :class:`GraphParts`), and of the rest when there are more
    than ``build_over``.

    The engine moves every point whose payload changes out of its built
    segment: marked at once, 990,000 points of 1,000,000 landed in one
    segment whose graph build peaked at 10.3 GB.

    Args:
        index: the index
        sample_ids: the points' sample ids
        payload: the keys and values to set
        build_over (0): the rest of the points (past the last full part)
            is left to the engine's plain search when there are at most
            this many
    """
    seconds: dict = {}
    with Lease(index) as lease:
        parts = GraphParts(index, lease, seconds)
        for start in range(0, len(sample_ids), base.PART_POINTS):
            lease.tick()
            part = sample_ids[start : start + base.PART_POINTS]
            index.set_payload(part, payload)
            parts.wrote(len(part))
        if parts.unbuilt > build_over:
            _optimize(index, seconds)


def _read_ahead(dataset, chunks, embeddings_field, label_field, units, dim):
    """The :class:`_Rows` of each chunk of ids: chunk i + 1 is read,
    checked and made into payloads while chunk i is written, in a forked
    process when there is more than one (the engine holds Python's lock
    while it writes and builds)."""
    return prefetch(
        lambda: (
            _Rows.of(
                read_chunk(dataset, ids, embeddings_field, label_field, units),
                dim,
                embeddings_field,
            )
            for ids in chunks
        ),
        fork=len(chunks) > 1,
    )


def sync_points(
    index: VectorIndex,
    samples,
    embeddings_field: str,
    label_field: str | None,
    dim: int | None = None,
    batch_size: int = 2000,
    progress: ProgressArg = True,
    verify: bool | str = "sample",
    patches_field: str | None = None,
) -> SyncStats:
    """Brings ``index`` up to date with ``samples`` (or with the boxes of
    their ``patches_field``).

    Args:
        index: the :class:`prelabel.index.base.VectorIndex`
        samples: the collection the index mirrors
        embeddings_field: the vector field to index
        label_field: the Classification field whose labels go in payloads
        dim (None): the vectors' dimension; None checks the fields and
            creates the index if it does not exist
        batch_size (2000): points per write
        progress (True): a bar, nothing, or ``progress(fraction, label)``
        verify ("sample"): which stored vectors to read back and compare
            with the embeddings (a point that differs is written again):
            ``"sample"`` a random :data:`VERIFY_SAMPLE` of them, and every
            one as soon as one differs; ``True`` every one; ``False`` none
        patches_field (None): index the boxes of this field (their own
            labels; ``embeddings_field`` is an attribute of each box)

    Returns:
        a :class:`SyncStats`
    """
    units = units_of(patches_field)
    if dim is None:
        dim = validation.check_embeddings_field(
            samples, units.path(samples, embeddings_field)
        )
        if label_field and patches_field is None:
            validation.check_classification_field(samples, label_field)
        if index.exists():
            check_index_dim(index, dim, embeddings_field)
        else:
            index.create(dim)
    stats = SyncStats()
    t0 = time.perf_counter()
    # both sides in sample-id order: a merge, chunk by chunk, never a map
    # of every point in memory
    all_ids = sorted(units.ids(samples))
    checked = _checked(all_ids, verify)
    dataset = samples._dataset
    metric = getattr(index, "metric", "cosine")
    chunks = [
        all_ids[start : start + batch_size]
        for start in range(0, len(all_ids), batch_size)
    ]
    reads = _read_ahead(
        dataset, chunks, embeddings_field, label_field, units, dim
    )
    with (
        Progress(progress, len(all_ids), "Syncing index") as bar,
        Lease(index) as lease,
        contextlib.closing(reads),
    ):
        points = _PointStream(index)
        parts = GraphParts(index, lease, stats.seconds)
        for ids, rows in zip(chunks, reads, strict=True):
            lease.tick()
            current, stale = points.until(ids[-1], set(ids))
            chunk = _plan_chunk(rows, current, stats, checked)
            _verify_chunk(index, chunk, stats, metric)
            _apply_chunk(index, chunk)
            _delete(index, stale + chunk.stale, stats)
            parts.wrote(len(chunk.up_ids))
            bar.update(len(ids))
        _delete(index, points.rest(), stats)
    stats.seconds["write"] = (
        time.perf_counter() - t0 - stats.seconds.get("optimize", 0.0)
    )

    if stats.repaired and verify == "sample" and len(all_ids) > VERIFY_SAMPLE:
        logger.warning(
            "%s: damaged points in a sample; checking every point",
            index.name,
        )
        again = sync_points(
            index,
            samples,
            embeddings_field,
            label_field,
            dim,
            batch_size,
            progress=False,
            verify=True,
            patches_field=patches_field,
        )
        stats.repaired += again.repaired
        stats.unchanged -= again.repaired
    stats.seconds.setdefault("optimize", 0.0)
    if stats.added or stats.updated_vectors or stats.deleted or stats.repaired:
        _optimize(index, stats.seconds)
    stats.seconds["total"] = time.perf_counter() - t0
    logger.info("Synced %s: %s", index.name, stats)
    return stats
