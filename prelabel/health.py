"""Is an index whole, and in step with its dataset?

:func:`check_index` reads an index without changing anything: its marker
and configuration, whether the engine opens it, how many points it holds,
and, for a sample of points (or all of them), whether the stored vector
and payload are still what was written for that sample. It tells two
things apart:

- **damage** (``problems``): files that cannot be read, a vector or a
  payload that no longer matches what was written. Only a rebuild
  (``sync_index(..., rebuild=True)``) repairs an index that cannot be
  opened; a sync rewrites damaged points it finds;
- **staleness** (``stale``): samples added, changed or deleted since the
  last sync. A sync fixes it.

Pre-annotation and label-mistake finding run a quick check before they
start, and refuse a damaged index with the sentence that says what to do.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from prelabel.index import base, ownership
from prelabel.index.base import (
    IndexDamagedError,
    IndexFilter,
    IndexUnreachableError,
)
from prelabel.index.locking import Lease
from prelabel.index.sync import VECTOR_TOLERANCE, stored_form
from prelabel.units import units_of

#: indexes up to this size are checked point by point, even when sampled
CHECK_ALL_BELOW = 2000


@dataclass
class IndexHealth:
    """What :func:`check_index` found.

    Attributes:
        brain_key: the run checked
        name: the index's folder or collection
        num_points: points in the index (None if it cannot be read)
        num_embedded: samples of the dataset with an embedding (None
            when not counted)
        num_checked: points whose vector and payload were compared with
            the dataset
        problems: damage found, one sentence each
        stale: what a sync would change, one sentence each
        repair: what to do about the problems
    """

    brain_key: str
    name: str
    num_points: int | None = None
    num_embedded: int | None = 0
    num_checked: int = 0
    problems: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    repair: str = ""

    @property
    def ok(self) -> bool:
        """No damage (the index may still be out of step)."""
        return not self.problems

    def raise_if_damaged(self) -> None:
        """Raises :class:`IndexDamagedError` naming the first problem."""
        if self.problems:
            raise IndexDamagedError(
                f"The index of brain key {self.brain_key!r} ({self.name}) is "
                f"damaged: {self.problems[0]}"
                + (
                    f" (and {len(self.problems) - 1} more)"
                    if len(self.problems) > 1
                    else ""
                )
                + f"; {self.repair}"
            )


def check_index(
    samples,
    index=None,
    brain_key: str | None = None,
    sample_size: int | None = 256,
    seed: int | None = None,
    count: bool = True,
) -> IndexHealth:
    """Checks the index of a prelabel run of ``samples``' dataset,
    read-only.

    Args:
        samples: the dataset of the run (or a view of it)
        index (None): the results of :func:`prelabel.sync_index`, or a
            brain key; default ``brain_key`` or ``"prelabel_qdrant"``
        brain_key (None): the brain key, when ``index`` is not given
        sample_size (256): how many points to compare with the dataset;
            None compares every point (an index of fewer than 2,000 points
            is always compared whole)
        seed (None): seeds which points are sampled
        count (True): whether to count the dataset's embedded samples and
            compare with the index's points (a scan of the dataset:
            seconds at 500,000 samples; the quick check before a job
            leaves it out, as it looks for damage only)

    Returns:
        an :class:`IndexHealth`

    Raises:
        ValueError: no such prelabel run
    """
    dataset = samples._root_dataset
    config, vindex, key = _resolve(dataset, index, brain_key)
    health = IndexHealth(
        brain_key=key,
        name=vindex.name,
        repair=(
            "rebuild it with prelabel.sync_index(dataset, "
            f"brain_key={key!r}, rebuild=True)"
        ),
    )
    points = units_of(config.patches_field)
    emb_field = config.embeddings_field
    health.num_embedded = (
        points.count_embedded(dataset, emb_field) if count else None
    )
    if ownership.is_foreign_run(config, dataset):
        health.stale.append(
            "the run came with a clone of another dataset and still names "
            "that dataset's index; loading it gives it its own"
        )
        return health
    try:
        # one opening of an embedded index for every check, not one each
        _check_marker(vindex, config, health)
        if health.problems:
            return health
        with Lease(vindex):
            _check_count(vindex, health)
            size = max(health.num_embedded or 0, health.num_points or 0)
            if sample_size is not None and size <= max(
                sample_size, CHECK_ALL_BELOW
            ):
                sample_size = None  # a small index is compared whole
            rows = points.sample_vectors(dataset, emb_field, sample_size, seed)
            _check_points(vindex, rows, health)
            _check_self_queries(vindex, health, seed)
    except IndexDamagedError as e:
        health.problems.append(_problem(e))
    except IndexUnreachableError as e:
        health.problems.append(str(e))
        health.repair = "check the server and its credentials"
    return health


def _resolve(dataset, index, brain_key):
    """``(config, vector index, brain key)`` of a results object or a
    brain key, without loading (and so without changing) the run."""
    from prelabel import constants
    from prelabel.index.brain import (
        PrelabelQdrantSimilarityConfig,
        PrelabelQdrantSimilarityIndex,
    )

    if isinstance(index, PrelabelQdrantSimilarityIndex):
        return index.config, index.index, index.key
    key = index if isinstance(index, str) else brain_key
    key = key or constants.DEFAULT_BRAIN_KEY
    if key not in dataset.list_brain_runs():
        raise ValueError(
            f"brain_key={key!r} is not a run of dataset '{dataset.name}'; "
            "run prelabel.sync_index first"
        )
    config = dataset.get_brain_info(key).config
    if not isinstance(config, PrelabelQdrantSimilarityConfig):
        raise ValueError(
            f"brain_key={key!r} is a run of another backend "
            f"({type(config).__name__}); check_index reads prelabel indexes"
        )
    return config, ownership.open_index_for(config), key


def _problem(e: Exception) -> str:
    text = str(e)
    text = text.split(" is damaged (", 1)[-1]
    return text.split("); ", 1)[0]


def _check_marker(index, config, health: IndexHealth) -> None:
    """What the folder or collection says of itself (nothing opened)."""
    state = index.state()
    if state.kind == "missing":
        health.problems.append("it is missing (deleted?)")
        return
    if state.kind != "ours":
        health.problems.append("its marker (index.json) cannot be read")
        return
    meta = state.meta
    if meta.get("index_id") not in (None, config.index_id):
        health.problems.append("it is the index of another run")
    if meta.get("metric", config.metric) != config.metric:
        health.problems.append(
            f"its metric is {meta.get('metric')!r}, the run's "
            f"{config.metric!r}"
        )
    if meta.get("complete") is False:
        health.stale.append("its first sync did not finish")


def _check_count(index, health: IndexHealth) -> None:
    health.num_points = index.count()
    if health.num_embedded is None:
        return
    if health.num_points != health.num_embedded:
        health.stale.append(
            f"it holds {health.num_points:,} points for "
            f"{health.num_embedded:,} embedded samples"
        )


def _check_points(index, rows, health):
    """Compares stored vectors and payloads with the dataset's
    (``rows``: ``(point id, sample id, vector)``)."""
    metric = getattr(index, "metric", "cosine")
    damaged = missing = changed = 0
    for start in range(0, len(rows), 1000):
        chunk = rows[start : start + 1000]
        chunk_ids = [r[0] for r in chunk]
        payloads = dict(
            index.iter_payloads(
                [
                    base.SAMPLE_ID,
                    base.LABEL,
                    base.TAGS,
                    base.VECTOR_DIGEST,
                    base.PAYLOAD_DIGEST,
                ],
                IndexFilter(sample_ids=tuple(chunk_ids)),
            )
        )
        found, stored = index.get_vectors(chunk_ids)
        at = {sid: i for i, sid in enumerate(found)}
        for pid, parent, vec in chunk:
            p = payloads.get(pid)
            if pid not in at or p is None:
                missing += 1
                continue
            health.num_checked += 1
            vec = np.asarray(vec, dtype=np.float32)
            if not _payload_intact(parent, p):
                damaged += 1
            elif p.get(base.VECTOR_DIGEST) != base.vector_digest(vec):
                changed += 1
            elif not np.allclose(
                stored[at[pid]],
                stored_form(vec[None, :], metric)[0],
                atol=VECTOR_TOLERANCE,
                rtol=0,
            ):
                damaged += 1
    if damaged:
        health.problems.append(
            f"{damaged} of {health.num_checked:,} points checked no longer "
            "hold the vector or payload that was written"
        )
    if missing:
        health.stale.append(f"{missing} embedded samples are not in it")
    if changed:
        health.stale.append(f"{changed} samples changed their embedding")


def _payload_intact(sid: str, p: dict) -> bool:
    return p.get(base.SAMPLE_ID) == sid and p.get(
        base.PAYLOAD_DIGEST
    ) == base.payload_digest(p.get(base.LABEL), p.get(base.TAGS) or ())


def _check_self_queries(index, health, seed, n: int = 16) -> None:
    """A stored vector's nearest point is itself (or an equal vector)."""
    if not health.num_points:
        return
    first = itertools.islice(index.iter_payloads([], batch_size=256), 256)
    ids = [sid for sid, _ in first]
    rng = np.random.default_rng(seed)
    pick = [ids[i] for i in rng.choice(len(ids), min(n, len(ids)), False)]
    found, vectors = index.get_vectors(pick)
    finite = np.all(np.isfinite(vectors), axis=1)
    found = [sid for sid, ok in zip(found, finite, strict=True) if ok]
    vectors = vectors[finite]
    if not found:
        return
    res = index.query(vectors, 1)
    best = [row[0] if row else None for row in res.sample_ids]
    lost = sum(
        b != sid and not np.isclose(res.scores[i, 0], _self_score(index, v))
        for i, (sid, b, v) in enumerate(zip(found, best, vectors, strict=True))
    )
    if lost:
        health.problems.append(
            f"{lost} of {len(found)} points are not their own nearest "
            "neighbor (the search structure is damaged)"
        )


def _self_score(index, v: np.ndarray) -> float:
    metric = getattr(index, "metric", "cosine")
    if metric == "cosine":
        return 1.0
    if metric == "dotproduct":
        return float(v @ v)
    return 0.0
