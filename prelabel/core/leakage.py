"""References scored as the targets will be: without the near-duplicates
that only references have.

A reference's held-out score (its leave-one-out vote, or a cross-fitted
score) is meant to stand for a target's. When the references hold
near-duplicates of each other (video frames, bursts, augmented copies)
that the targets do not have, a reference's nearest neighbors are its own
copies, its score is easier than any target's, and a threshold chosen on
the references accepts too much of the targets (0.969 measured precision
for 0.99 asked, on references that are noisy copies of each other).

The symptom is measurable without a label: the similarity of a
reference to its nearest other reference is larger than that of a target
to its nearest reference. :func:`closeness_threshold` finds the largest
similarity ``t`` such that, once every reference's neighbors above ``t``
are set aside, the references are no closer to their nearest neighbor
than the targets are (a one-sided two-sample Kolmogorov-Smirnov bound);
``inf`` when they never were. :func:`keep_closest` then picks each
reference's voters among its neighbors at or below ``t``, and
:func:`duplicate_groups` joins references closer than ``t`` into groups
that cross-fitting keeps in one fold. Pure numpy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np

from prelabel.core.vectors import nearest_rows

#: the confidence with which the references must be shown closer to each
#: other than the targets are to them before neighbors are set aside
LEVEL = 0.99

#: neighbors queried beyond ``k`` for each scored reference, so that a
#: reference with near-duplicates still has ``k`` voters once they are
#: set aside
EXTRA_NEIGHBORS = 30

#: the most neighbors queried beyond ``k`` when a reference's copies go on
#: past :data:`EXTRA_NEIGHBORS` (see :func:`widened`)
MAX_EXTRA_NEIGHBORS = 480

#: the share of references that may keep fewer than ``k`` voters once
#: their copies are set aside before the query is widened
SHORT_SHARE = 0.1

#: targets (or other samples standing for them) whose nearest reference
#: is compared, at most
TARGET_SAMPLE = 2000


def sample_rows(
    n: int, size: int = TARGET_SAMPLE, seed: int = 0
) -> np.ndarray:
    """A seeded random sample of at most ``size`` of ``n`` rows, sorted:
    the targets (or the samples standing for them) that are compared."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, min(n, size), replace=False))


def _nearest_kept(sims: np.ndarray, t: float) -> np.ndarray:
    """Per row, the largest similarity at or below ``t`` (rows sorted
    closest first, NaN-padded); ``-inf`` where none is."""
    keep = np.nan_to_num(sims, nan=np.inf) <= t
    first = keep.argmax(axis=1)
    out = sims[np.arange(len(sims)), first].astype(np.float64)
    return np.where(keep.any(axis=1), out, -np.inf)


def _excess(ref_top: np.ndarray, target_top: np.ndarray) -> float:
    """How much more often a reference's nearest neighbor is closer than a
    given similarity than a target's is, at worst over similarities."""
    R, T = np.sort(ref_top), np.sort(target_top)
    at = np.r_[R, T]
    above_r = 1.0 - np.searchsorted(R, at, "right") / R.size
    above_t = 1.0 - np.searchsorted(T, at, "right") / T.size
    return float((above_r - above_t).max())


def closeness_threshold(
    ref_sims: np.ndarray,
    target_top: np.ndarray,
    level: float = LEVEL,
) -> float:
    """The similarity above which a reference's neighbors are closer than
    a target's neighbors get.

    Args:
        ref_sims: float array ``(n, m)``: each reference's similarities to
            its nearest other references, closest first, NaN-padded
        target_top: float array ``(t,)``: each target's (or a random
            sample of targets') similarity to its nearest reference
        level (0.99): the confidence of the test that sets neighbors aside

    Returns:
        ``inf`` when the references are not significantly closer to each
        other than the targets are to them (nothing to set aside), else
        the largest threshold after which they are not
    """
    sims = np.asarray(ref_sims, dtype=np.float64)
    top = np.asarray(target_top, dtype=np.float64)
    top = top[np.isfinite(top)]
    if sims.ndim != 2 or not sims.size or not top.size:
        return float("inf")
    n, m = len(sims), top.size
    slack = np.sqrt(-np.log(1.0 - level) / 2.0) * np.sqrt((n + m) / (n * m))
    if _excess(_nearest_kept(sims, np.inf), top) <= slack:
        return float("inf")
    # the largest candidate that passes; setting more aside only lowers
    # each reference's nearest kept similarity, so a bisection finds it
    finite = sims[np.isfinite(sims)]
    cands = np.unique(np.quantile(finite, np.linspace(0.0, 1.0, 513)))
    lo, hi = -1, len(cands) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _excess(_nearest_kept(sims, cands[mid]), top) <= slack:
            lo = mid
        else:
            hi = mid - 1
    return float(cands[lo]) if lo >= 0 else float(cands[0])


def short_share(sims: np.ndarray, t: float, k: int) -> float:
    """The share of rows (closest first, NaN-padded) that found every
    neighbor asked for and still keep fewer than ``k`` at or below ``t``:
    references whose copies may go on past the neighbors queried."""
    sims = np.asarray(sims, dtype=np.float64)
    if sims.ndim != 2 or not sims.size:
        return 0.0
    full = np.isfinite(sims[:, -1])
    kept = (np.nan_to_num(sims, nan=np.inf) <= t).sum(axis=1)
    return float(np.mean(full & (kept < k)))


def widened(
    query: Callable[[int], tuple],
    k: int,
    target_top: np.ndarray | None,
    threshold: float | None = None,
    extra: int = EXTRA_NEIGHBORS,
    most: int = MAX_EXTRA_NEIGHBORS,
) -> tuple[tuple, float]:
    """The references' neighbors, queried wide enough to set their copies
    aside, and the threshold of :func:`closeness_threshold`.

    ``query(m)`` returns a tuple whose last item is the ``(n, m)``
    similarities of each reference's ``m`` nearest others (closest first,
    NaN-padded). It is called with ``k + extra`` neighbors, and again with
    ``extra`` doubled (up to ``most``, or until ``query`` returns fewer
    columns than asked: there are no more) while more than
    :data:`SHORT_SHARE` of the references keep fewer than ``k`` voters:
    with about 49 copies of each reference among the references and 30
    extra neighbors, the threshold found among them still let copies
    vote, and the accepted targets measured 0.923 precision for 0.99
    asked (widened: 0.994).

    Args:
        query: the neighbors of the references, ``m`` of each
        k: the neighbors that will vote
        target_top: the similarity of a sample of targets to their
            nearest reference (see :func:`closeness_threshold`)
        threshold (None): a threshold found before, instead of one from
            ``target_top``
        extra: the first neighbors asked beyond ``k``
        most: the most neighbors asked beyond ``k``

    Returns:
        ``(what query returned last, the threshold)``
    """
    while True:
        out = query(k + extra)
        t = (
            closeness_threshold(out[-1], target_top)
            if threshold is None
            else float(threshold)
        )
        capped = np.shape(out[-1])[1] < k + extra  # no more to ask for
        if (
            capped
            or extra >= most
            or short_share(out[-1], t, k) <= SHORT_SHARE
        ):
            return out, t
        extra = min(2 * extra, most)


def keep_closest(sims: np.ndarray, t: float, k: int) -> np.ndarray:
    """Which neighbors vote: per row (closest first, NaN-padded), the
    first ``k`` at or below ``t``.

    Returns:
        a bool array of the shape of ``sims``
    """
    sims = np.asarray(sims, dtype=np.float64)
    keep = np.nan_to_num(sims, nan=np.inf) <= t
    return keep & (np.cumsum(keep, axis=1) <= k)


def closest_kept(
    sims: np.ndarray, t: float, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The voters of :func:`keep_closest` moved to the front of each row.

    Returns:
        ``(columns (n, k), kept (n, k) bool, their similarities (n, k)
        NaN where not kept)``: column ``j`` of row ``i`` is voter
        ``cols[i, j]`` of the input when ``kept[i, j]``
    """
    sims = np.asarray(sims, dtype=np.float64)
    keep = keep_closest(sims, t, k)
    cols = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(keep, cols, 1)
    return (
        cols,
        kept,
        np.where(kept, np.take_along_axis(sims, cols, 1), np.nan),
    )


def reference_neighbors(
    Z_ref: np.ndarray,
    Z_other: np.ndarray | None,
    rows: np.ndarray | None = None,
    k: int = 15,
) -> tuple[np.ndarray, np.ndarray, float]:
    """The references' nearest other references (``k`` +
    :data:`EXTRA_NEIGHBORS`, or more: :func:`widened`; exact) and the
    threshold of :func:`closeness_threshold` against the other samples
    ``Z_other`` (standing for the targets; a random
    :data:`TARGET_SAMPLE` of them).

    Args:
        Z_ref: the references' vectors ``(n, d)``
        Z_other: other samples' vectors in the same space, or None
        rows (None): the references whose neighbors are wanted (all)
        k (15): the neighbors that will vote

    Returns:
        ``(indices, similarities, threshold)``: rows of ``Z_ref`` closest
        first, and ``inf`` when nothing is to be set aside
    """
    rows = np.arange(len(Z_ref)) if rows is None else np.asarray(rows)

    def query(m: int) -> tuple[np.ndarray, np.ndarray]:
        return nearest_rows(
            Z_ref[rows], Z_ref, min(m, len(Z_ref) - 1), self_rows=rows
        )

    if Z_other is None or not len(Z_other) or len(Z_ref) < 3:
        return (*query(k + EXTRA_NEIGHBORS), float("inf"))
    _, top = nearest_rows(Z_other[sample_rows(len(Z_other))], Z_ref, 1)
    (idx, sims), t = widened(query, k, top[:, 0])
    return idx, sims, t


def duplicate_groups(
    n: int,
    rows: np.ndarray,
    idx: np.ndarray,
    sims: np.ndarray,
    t: float,
    max_size: int,
) -> np.ndarray:
    """Groups of references linked by similarities above ``t``, the
    closest pairs joined first, no group past ``max_size`` members (so a
    chain of near-duplicates cannot swallow the reference set).

    Args:
        n: the number of references
        rows: int array ``(q,)``: the references whose neighbors are given
        idx: int array ``(q, m)``: their nearest other references (rows
            of the ``n``), ``-1``-padded
        sims: their similarities, closest first, NaN-padded
        t: the threshold of :func:`closeness_threshold`
        max_size: the largest group

    Returns:
        an int array ``(n,)``: a group id per reference (its own row when
        it joined none)
    """
    parent = np.arange(n)
    size = np.ones(n, dtype=np.int64)
    if not np.isfinite(t):
        return parent

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    idx = np.asarray(idx)
    s = np.nan_to_num(np.asarray(sims, dtype=np.float64), nan=-np.inf)
    qs, cols = np.nonzero((s > t) & (idx >= 0))
    for e in np.argsort(-s[qs, cols], kind="stable"):
        a, b = root(int(rows[qs[e]])), root(int(idx[qs[e], cols[e]]))
        if a != b and size[a] + size[b] <= max_size:
            if size[a] < size[b]:
                a, b = b, a
            parent[b] = a
            size[a] += size[b]
    return np.array([root(a) for a in range(n)], dtype=np.int64)


def groups(
    Z_ref: np.ndarray,
    Z_other: np.ndarray,
    folds: int,
    rows: np.ndarray | None = None,
    k: int = 15,
) -> np.ndarray | None:
    """Near-duplicate groups of references for cross-fitting with
    ``folds`` folds: the references of ``rows`` (default all) linked to
    their neighbors closer than :func:`closeness_threshold` says the
    other samples ``Z_other`` (standing for the targets; a random
    :data:`TARGET_SAMPLE` of them) get, groups of at most a tenth of a
    fold.

    Args:
        Z_ref: the references' vectors ``(n, d)``
        Z_other: other samples' vectors, in the same space
        folds: the folds the groups are kept whole in
        rows (None): the references to link (those whose held-out scores
            are used)
        k (15): the neighbors that will vote

    Returns:
        a group id per reference (:func:`duplicate_groups`), or None when
        the references are no closer to each other than the others are
        to them (or there is nothing to compare)
    """
    if Z_other is None or not len(Z_other) or len(Z_ref) < 3:
        return None
    rows = np.arange(len(Z_ref)) if rows is None else np.asarray(rows)
    idx, sims, t = reference_neighbors(Z_ref, Z_other, rows, k)
    return fold_groups(len(Z_ref), rows, idx, sims, t, folds)


def fold_groups(
    n: int,
    rows: np.ndarray,
    idx: np.ndarray,
    sims: np.ndarray,
    t: float,
    folds: int,
) -> np.ndarray | None:
    """:func:`duplicate_groups` for cross-fitting with ``folds`` folds
    (a group holds at most a tenth of a fold); None when ``t`` sets
    nothing aside."""
    if not np.isfinite(t):
        return None
    cap = max(1, n // (2 * folds))
    return duplicate_groups(n, rows, idx, sims, t, cap)


def calibration_subset(ids: Sequence[str], limit: int) -> np.ndarray:
    """Which of ``ids`` are scored for calibration when there are more
    than ``limit``: the rows of the ``limit`` ids of smallest digest. The
    choice depends on the ids alone, not on their order, so the adapter
    (which keeps the near-duplicates of these references out of the
    heads that score them) and the scorer pick the same ones.

    Returns:
        sorted row indices into ``ids``
    """
    if len(ids) <= limit:
        return np.arange(len(ids))
    keys = np.array(
        [
            int.from_bytes(
                hashlib.blake2b(str(s).encode(), digest_size=8).digest(),
                "big",
            )
            for s in ids
        ],
        dtype=np.uint64,
    )
    return np.sort(np.argsort(keys, kind="stable")[:limit])
