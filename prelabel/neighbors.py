"""Who votes, and who their neighbors are.

A point is a whole sample, or one box of a patches index (see
:mod:`prelabel.units`): ids below are sample ids, or label ids.

The reference set (the labeled samples that vote) is chosen inside Qdrant
by a payload filter (a view of nearly every labeled sample by the few ids
it lacks, any other view by marks in the payloads); the vectors of the samples
being scored are read from the dataset in chunks, and each chunk is one
batched query in which a sample is never its own neighbor. Pre-annotation,
the references' held-out scores and label-mistake finding all read and
query through :func:`stream`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import fiftyone as fo
import numpy as np

from prelabel import constants, validation
from prelabel.core.voting import sort_classes
from prelabel.index.base import IndexFilter
from prelabel.index.locking import Lease
from prelabel.index.sync import set_payload_in_parts
from prelabel.prefetch import prefetch
from prelabel.progress import Progress, ProgressArg
from prelabel.units import Samples, units_of

#: the payload key that marks the points of a reference given as a view
REFSET = "refset"
#: marking more points than this rebuilds the index's graph afterwards
#: (below it the engine searches plainly anyway: its full-scan threshold)
REINDEX_AFTER_MARKING = 10000
#: a view that leaves out at most this many of the index's labeled points
#: is selected by excluding them (their ids travel in each query), not
#: marked
EXCLUDE_AT_MOST = 10000
#: a filter leaving out more points than this leaves them out of the
#: engine's answers here instead (see :func:`search`)
ENGINE_EXCLUDES = 64


def load_index(samples, index=None, brain_key=None, patches_field=None):
    """The prelabel similarity results that ``index`` names, on
    ``samples``' dataset.

    Args:
        samples: a dataset or view
        index (None): the results of :func:`prelabel.sync_index`, or a
            brain key; default ``brain_key`` or ``"prelabel_qdrant"``
        brain_key (None): the brain key, when ``index`` is not given
        patches_field (None): the patches field the index must hold the
            boxes of (None: an index of whole samples)

    Returns:
        a :class:`prelabel.index.brain.PrelabelQdrantSimilarityIndex`

    Raises:
        ValueError: no such prelabel run, the index of another dataset, or
            one of other points (boxes for samples, or the reverse)
    """
    from prelabel.index.brain import PrelabelQdrantSimilarityIndex

    dataset = samples._root_dataset
    if isinstance(index, PrelabelQdrantSimilarityIndex):
        owner = index.samples._root_dataset
        if owner._doc.id != dataset._doc.id:
            raise ValueError(
                f"index= is the index of dataset '{owner.name}', not of "
                f"'{dataset.name}'; pass the results of sync_index on this "
                "dataset (or its brain key)"
            )
        return _same_points(index, patches_field)
    if index is not None and not isinstance(index, str):
        raise ValueError(
            f"index= must be the results of prelabel.sync_index or a brain "
            f"key; got {type(index).__name__}"
        )
    key = index if isinstance(index, str) else brain_key
    key = key or constants.DEFAULT_BRAIN_KEY
    if key not in dataset.list_brain_runs():
        raise ValueError(
            f"brain_key={key!r} is not a run of dataset '{dataset.name}'; "
            "run prelabel.sync_index first"
        )
    results = dataset.load_brain_results(key)
    if not isinstance(results, PrelabelQdrantSimilarityIndex):
        raise ValueError(
            f"brain_key={key!r} is a run of another backend "
            f"({type(results.config).__name__}); sync a prelabel index "
            "with prelabel.sync_index"
        )
    return _same_points(results, patches_field)


def _same_points(results, patches_field):
    held = results.config.patches_field
    if held == patches_field:
        return results
    if held is None:
        raise ValueError(
            f"brain key {results.key!r} indexes whole samples, not the "
            f"boxes of patches_field={patches_field!r}; sync an index of "
            f"them: prelabel.sync_index(..., patches_field="
            f"{patches_field!r}, brain_key=<a new key>)"
        )
    raise ValueError(
        f"brain key {results.key!r} indexes the boxes of {held!r}; pass "
        f"patches_field={held!r}"
        + ("" if patches_field is None else " or an index of your field")
    )


# ---- the reference set ------------------------------------------------


def check_reference(reference, samples, param: str = "reference") -> None:
    """``reference`` names a reference set: None, a tag, a non-empty list
    of tags, or a view of the same dataset (``param``: the parameter's
    name, for the messages)."""
    if reference is None:
        return
    if isinstance(reference, str):
        tags = [reference]
    elif isinstance(reference, (list, tuple)):
        tags = list(reference)
        if not tags:
            raise ValueError(
                f"{param}=[] selects no sample; pass None for every "
                "labeled sample, a tag (or a list of tags), or a view"
            )
    elif isinstance(reference, fo.core.collections.SampleCollection):
        mine, theirs = samples._root_dataset, reference._root_dataset
        if mine._doc.id != theirs._doc.id:
            raise ValueError(
                f"{param}= is a view of dataset '{theirs.name}', not of "
                f"'{mine.name}'; pass a view of the targets' dataset"
            )
        return
    else:
        raise ValueError(
            f"{param}= must be None, a tag, a list of tags or a view; got "
            f"{type(reference).__name__}"
        )
    for tag in tags:
        if not isinstance(tag, str) or not tag:
            raise ValueError(
                f"{param}={reference!r} holds {tag!r}, which is not a tag; "
                "pass tags as non-empty strings"
            )


def describe_reference(reference):
    """``reference`` as a run record keeps it (a view as ``"<view>"``)."""
    if reference is None or isinstance(reference, str):
        return reference
    if isinstance(reference, (list, tuple)):
        return list(reference)
    return "<view>"


def reference_view(samples, reference, label_field: str):
    """The labeled references among ``samples``, as a view: every labeled
    sample (``None``), those with one of the tags, or a view of labeled
    samples."""
    labeled = validation.labeled(samples, label_field)
    if reference is None:
        return labeled
    if isinstance(reference, str):
        return labeled.match_tags(reference)
    if isinstance(reference, (list, tuple)):
        return labeled.match_tags(list(reference))
    return validation.labeled(reference, label_field)


def reference_filter(
    results, reference, label_field: str, units: Samples | None = None
) -> tuple[IndexFilter, int]:
    """The payload filter selecting the reference set in the index, and
    its size.

    ``reference`` is ``None`` (every labeled sample), a tag or list of tags,
    or a FiftyOne view of labeled samples. A view that holds all but at
    most :data:`EXCLUDE_AT_MOST` of the index's labeled points (a view
    of every labeled sample, or of all but a few) is selected by leaving
    those out: nothing is written. Any other view is marked in the
    payloads, with a token derived from its sample ids, so that the
    queries select it by filter; the same view again finds its points
    marked and writes nothing. The engine takes points whose payload
    changed out of their indexed segment, so a large marking rebuilds
    their graph, part by part (otherwise every query would scan them).
    """
    index = results.index
    if reference is None or isinstance(reference, (str, list, tuple)):
        flt = IndexFilter.reference(reference)
        return flt, index.count(flt)
    units = units or units_for(results)
    ref_ids = units.labeled(reference, label_field)[0]
    flt = _all_but_a_few(index, ref_ids)
    if flt is not None:
        return flt, index.count(flt)
    # the same view marks the same points with the same token: a second
    # run finds them marked and writes nothing
    token = hashlib.blake2b(
        "\n".join(sorted(ref_ids)).encode(), digest_size=8
    ).hexdigest()
    flt = IndexFilter(labeled=True, match=((REFSET, token),))
    marked = index.count(IndexFilter(match=((REFSET, token),)))
    if marked == len(ref_ids):
        # only this id set was ever marked with this token: all marked
        return flt, index.count(flt)
    # only points can be marked: a sample added or embedded after the
    # last sync is not in the index (and setting a payload on it fails)
    present = [
        sid
        for start in range(0, len(ref_ids), 10000)
        for sid, _ in index.iter_payloads(
            [], IndexFilter(sample_ids=tuple(ref_ids[start : start + 10000]))
        )
    ]
    if marked != len(present):
        # the engine moves every point whose payload changed out of its
        # built segment: until its graph is built again, each query scans
        # them all; built in parts, as a sync builds it
        set_payload_in_parts(
            index, present, {REFSET: token}, REINDEX_AFTER_MARKING
        )
    return flt, index.count(flt)


def _all_but_a_few(index, ref_ids: list[str]) -> IndexFilter | None:
    """The filter of the index's labeled points less those not in
    ``ref_ids``, when there are at most :data:`EXCLUDE_AT_MOST` of those;
    else None. Marking a view of most of a large index would rewrite
    nearly every payload and rebuild the graph of all of them at once
    (265 s and 10 GB at 1,000,000 points); leaving a few out costs one
    listing of the labeled points' ids."""
    labeled = IndexFilter(labeled=True)
    if len(ref_ids) < index.count(labeled) - EXCLUDE_AT_MOST:
        return None  # more labeled points outside the view than allowed
    wanted = set(ref_ids)
    others = []
    for sid, _ in index.iter_payloads([], labeled):
        if sid not in wanted:
            others.append(sid)
            if len(others) > EXCLUDE_AT_MOST:
                return None
    return IndexFilter(labeled=True, exclude_sample_ids=tuple(others))


def reference_labels(results, flt) -> list[tuple[str, str]]:
    """``(sample id, label)`` of every reference, as the index has them."""
    return [
        (sid, p.get("label"))
        for sid, p in results.index.iter_payloads(["label"], flt)
    ]


def reference_classes(results, flt) -> list[str]:
    """The classes of the reference set, in natural order (counted by the
    index's keyword index of labels, not by reading every reference)."""
    return sort_classes(results.index.label_counts(flt))


# ---- vectors and neighbors --------------------------------------------


def units_for(results) -> Samples:
    """The points of ``results``: whole samples, or its boxes."""
    return units_of(results.config.patches_field)


def read_vectors(
    dataset, ids: Sequence[str], field: str, units: Samples | None = None
):
    """``(ids, float32 matrix)`` of the given points' ``field`` (an
    attribute of each box, for patches), in the order the database
    returns them."""
    return (units or Samples()).read_vectors(dataset, ids, field)


@dataclass
class Neighbors:
    """A chunk of queries and their nearest references, closest first.

    Attributes:
        ids: the points queried
        vectors: their vectors, as read from the dataset
        neighbor_ids: per query, the neighbors' ids (never itself)
        labels: per query, the neighbors' labels
        sims: float array (n, k) of similarities, NaN-padded
    """

    ids: list[str]
    vectors: np.ndarray
    neighbor_ids: list[list[str]]
    labels: list[list[str | None]]
    sims: np.ndarray


def query(
    results, dataset, ids, field: str, k: int, flt, units=None
) -> Neighbors:
    """The ``k`` nearest references of the given points (one batched
    query; each point's own is dropped)."""
    found, vectors = read_vectors(dataset, ids, field, units)
    return search(results, found, vectors, k, flt)


def search(results, found, vectors, k: int, flt) -> Neighbors:
    """The ``k`` nearest references of points ``found`` whose vectors are
    ``vectors`` (each point's own is dropped).

    A filter that leaves out more than :data:`ENGINE_EXCLUDES` points is
    not handed to the engine whole: it checks every left-out id for every
    query (1,000 queries took 11.4 s with 10,000 left out, 0.6 s with
    none). The engine gets the rest of the filter and ``k`` more
    neighbors to find; the left-out ones are dropped here, and a row left
    with too few is asked again with the whole filter."""
    skip: set[str] = set()
    engine_flt = flt
    if flt is not None and len(flt.exclude_sample_ids) > ENGINE_EXCLUDES:
        skip = set(flt.exclude_sample_ids)
        engine_flt = replace(flt, exclude_sample_ids=())
    limit = k + 1 + (k if skip else 0)
    res = results.index.query(vectors, limit, engine_flt)
    rows = [_kept(res, i, qid, skip, k) for i, qid in enumerate(found)]
    short = [
        i
        for i, keep in enumerate(rows)
        if len(keep) < k and len(res.sample_ids[i]) == limit
    ]
    if short:
        again = results.index.query(vectors[short], k + 1, flt)
        for j, i in enumerate(short):
            res.sample_ids[i] = again.sample_ids[j]
            res.labels[i] = again.labels[j]
            res.scores[i, : k + 1] = again.scores[j]
            res.scores[i, k + 1 :] = np.nan
            rows[i] = _kept(res, i, found[i], skip, k)
    nb_ids, nb_labels = [], []
    sims = np.full((len(found), k), np.nan, dtype=np.float32)
    for i, keep in enumerate(rows):
        nb_ids.append([res.sample_ids[i][j] for j in keep])
        nb_labels.append([res.labels[i][j] for j in keep])
        sims[i, : len(keep)] = res.scores[i, keep]
    return Neighbors(found, vectors, nb_ids, nb_labels, sims)


def _kept(res, i: int, qid: str, skip: set, k: int) -> list[int]:
    """The columns of row ``i`` that are neither the query's own point nor
    left out, at most ``k``."""
    ids = res.sample_ids[i]
    return [j for j, s in enumerate(ids) if s != qid and s not in skip][:k]


def stream(
    results,
    dataset,
    ids: Sequence[str],
    field: str,
    k: int,
    flt,
    batch_size: int = 1000,
    progress: ProgressArg = None,
    label: str = "Querying neighbors",
    units: Samples | None = None,
) -> Iterator[Neighbors]:
    """:func:`query` over ``ids`` in chunks of ``batch_size``: the one
    loop that reads vectors and queries the index. The next chunk's
    vectors are read from the database (in a forked process, see
    :func:`prelabel.prefetch.prefetch`) while a chunk is queried. An
    embedded index stays open across chunks, given back to other
    processes when they wait (see
    :class:`prelabel.index.locking.Lease`)."""
    chunks = [
        ids[start : start + batch_size]
        for start in range(0, len(ids), batch_size)
    ]
    # in a forked process when there is more than one chunk: the engine
    # holds Python's lock while it answers
    reads = prefetch(
        lambda: (read_vectors(dataset, c, field, units) for c in chunks),
        fork=len(chunks) > 1,
    )
    with (
        Progress(progress, len(ids), label) as bar,
        Lease(results.index) as lease,
        contextlib.closing(reads),
    ):
        for chunk, (found, vectors) in zip(chunks, reads, strict=True):
            lease.tick()
            yield search(results, found, vectors, k, flt)
            bar.update(len(chunk))
