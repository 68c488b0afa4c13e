"""What to label next: the numbers (pure numpy).

Every sample is a node of its ``k``-nearest-neighbor graph (read from the
index). Labeling a sample settles, besides itself, the neighbors whose
pre-labels it will vote for; so a batch of picks is chosen as a greedy
maximum *weighted coverage* of that graph: each pick is the sample whose
own weight plus its still uncovered neighbors' weights is largest, and
then it and its neighbors are covered. Coverage of a graph is submodular,
so the greedy batch is within ``1 - 1/e`` of the best one and can be
evaluated lazily (a priority queue whose stale entries are re-scored only
when they reach the top).

The weight says what a pick is for:

- cold start (no pre-annotation yet): 1 for every unlabeled sample; the
  labeled samples and their neighbors start covered. The picks are the
  centers of dense, not yet labeled regions: typical and spread over
  every mode of the data (this is ProbCover's rule, Yehuda et al. 2022,
  on the kNN graph instead of a fixed radius).
- warm: the pre-label's uncertainty, ``1 - confidence`` of the calibrated
  pre-label of a sample left for review, 0 for an accepted or labeled
  one. The picks are where many samples still need a person's review, so
  one label is expected to move many of them into the accepted set.

Outliers (the samples furthest from their neighbors) and near-duplicates
of a labeled sample or of an earlier pick are never picked; a cap per
predicted class keeps a batch from spending itself on one confusion.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

#: the share of samples whose outlier score marks them as outliers
OUTLIER_QUANTILE = 0.99

#: cosine similarity at or above which two samples are near-duplicates
DUPLICATE_SIMILARITY = 0.98


def outlier_scores(sims: np.ndarray) -> np.ndarray:
    """How far each sample lies from its neighbors: one minus the mean
    cosine similarity of its neighbors (NaN entries, missing neighbors,
    are skipped; a sample without any scores 1).

    Args:
        sims: float array (n, k) of each sample's neighbors' similarities

    Returns:
        float array (n,), larger for lonelier samples
    """
    sims = np.asarray(sims, dtype=np.float64)
    have = np.isfinite(sims)
    total = np.where(have, sims, 0.0).sum(axis=1)
    count = have.sum(axis=1)
    mean = np.divide(total, count, out=np.zeros(len(sims)), where=count > 0)
    return 1.0 - mean


def outlier_mask(
    scores: np.ndarray, quantile: float = OUTLIER_QUANTILE
) -> np.ndarray:
    """The samples whose outlier score is above the ``quantile`` of all
    scores (bool array); none when ``quantile`` is 1."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0 or quantile >= 1.0:
        return np.zeros(scores.shape, dtype=bool)
    return scores > np.quantile(scores, quantile)


@dataclass
class Picks:
    """A batch chosen by :func:`greedy_coverage`.

    Attributes:
        rows: the picked rows, in the order picked
        gains: the weight each pick covered when it was picked
        covered: how many uncovered samples with weight > 0 each pick
            covered (itself included)
        num_candidates: the rows that could be picked
    """

    rows: np.ndarray
    gains: np.ndarray
    covered: np.ndarray
    num_candidates: int


def _reverse(idx: np.ndarray, sims: np.ndarray, n: int):
    """For each row, the rows that list it as a neighbor, and their
    similarities (CSR: ``starts``, ``rows``, ``sims``)."""
    src = np.repeat(np.arange(idx.shape[0]), idx.shape[1])
    dst = idx.ravel()
    sim = sims.ravel()
    ok = dst >= 0
    src, dst, sim = src[ok], dst[ok], sim[ok]
    order = np.argsort(dst, kind="stable")
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(dst, minlength=n), out=starts[1:])
    return starts, src[order], sim[order]


def greedy_coverage(
    idx: np.ndarray,
    sims: np.ndarray,
    weight: np.ndarray,
    candidates: np.ndarray,
    budget: int,
    labeled: np.ndarray | None = None,
    cover_labeled: bool = True,
    duplicate_similarity: float = DUPLICATE_SIMILARITY,
    classes: np.ndarray | None = None,
    class_cap: int | None = None,
) -> Picks:
    """The greedy batch of at most ``budget`` picks of largest weighted
    coverage of the neighbor graph (see the module's docstring).

    Args:
        idx: int array (n, k), each row's neighbors' rows (-1: none)
        sims: float array (n, k), their cosine similarities
        weight: float array (n,), what covering each row is worth (>= 0)
        candidates: bool array (n,), the rows that may be picked
        budget: the most picks
        labeled (None): bool array (n,), the rows already labeled (never
            picked; their near-duplicates are not picked either)
        cover_labeled (True): whether a labeled row's neighbors start
            covered (cold start: what a label settles is settled)
        duplicate_similarity (0.98): a row this similar to a labeled row
            or to a pick (either one listing the other as a neighbor) is
            not picked
        classes (None): int array (n,), each row's predicted class, for
            ``class_cap``
        class_cap (None): the most picks of one predicted class (relaxed
            when the other classes have no candidate left)

    Returns:
        the :class:`Picks`
    """
    idx = np.asarray(idx, dtype=np.int64)
    sims = np.nan_to_num(np.asarray(sims, dtype=np.float64), nan=-1.0)
    n = idx.shape[0]
    weight = np.asarray(weight, dtype=np.float64)
    if weight.shape != (n,) or np.any(weight < 0):
        raise ValueError("weight must be a non-negative array, one per row")
    labeled = (
        np.zeros(n, dtype=bool)
        if labeled is None
        else np.asarray(labeled, dtype=bool)
    )
    blocked = ~np.asarray(candidates, dtype=bool) | labeled
    covered = np.zeros(n, dtype=bool)
    starts, rev_rows, rev_sims = _reverse(idx, sims, n)

    def near(row: int) -> np.ndarray:
        """Rows within ``duplicate_similarity`` of ``row``, both ways."""
        fwd = idx[row][sims[row] >= duplicate_similarity]
        lo, hi = starts[row], starts[row + 1]
        back = rev_rows[lo:hi][rev_sims[lo:hi] >= duplicate_similarity]
        return np.concatenate([fwd[fwd >= 0], back])

    for row in np.flatnonzero(labeled):
        blocked[near(row)] = True
        if cover_labeled:
            covered[row] = True
            nb = idx[row]
            covered[nb[nb >= 0]] = True

    def gain(row: int) -> tuple[float, int]:
        nb = idx[row]
        nb = np.unique(np.r_[row, nb[nb >= 0]])
        open_ = nb[~covered[nb]]
        w = weight[open_]
        return float(w.sum()), int((w > 0).sum())

    heap = [(-gain(r)[0], int(r)) for r in np.flatnonzero(~blocked)]
    num_candidates = len(heap)
    heapq.heapify(heap)
    per_class: dict[int, int] = {}
    deferred: list[tuple[float, int]] = []
    rows, gains, counts = [], [], []
    while len(rows) < budget and (heap or deferred):
        if not heap:
            # every class left is at its cap: relax it
            class_cap, heap, deferred = None, deferred, []
            heapq.heapify(heap)
            continue
        _, row = heapq.heappop(heap)
        if blocked[row]:
            continue
        g, c = gain(row)
        if heap and g < -heap[0][0] - 1e-12:
            heapq.heappush(heap, (-g, row))  # stale: re-queue
            continue
        if class_cap is not None and classes is not None:
            cls = int(classes[row])
            if per_class.get(cls, 0) >= class_cap:
                deferred.append((-g, row))
                continue
            per_class[cls] = per_class.get(cls, 0) + 1
        rows.append(row)
        gains.append(g)
        counts.append(c)
        blocked[row] = True
        blocked[near(row)] = True
        covered[row] = True
        nb = idx[row]
        covered[nb[nb >= 0]] = True
    return Picks(
        rows=np.asarray(rows, dtype=np.int64),
        gains=np.asarray(gains, dtype=np.float64),
        covered=np.asarray(counts, dtype=np.int64),
        num_candidates=num_candidates,
    )


def spread_sample(
    Z: np.ndarray,
    candidates: np.ndarray,
    budget: int,
    rng: np.random.Generator,
    num_clusters: int = 32,
) -> np.ndarray:
    """A random sample of ``budget`` candidate rows that is spread over
    every region of the data and still a fair sample.

    The candidates are grouped by k-means on ``Z`` and ordered group by
    group (at random within a group); the sample takes every
    ``len / budget``-th of that order from a random start (systematic
    sampling). Every candidate has the same chance ``budget / len`` to be
    picked, as in a uniform draw, so precision measured on the picks is
    unbiased; but each group gets its share of picks (to within one),
    which a uniform draw gets only on average: no mode of the data is
    left out by bad luck.

    Args:
        Z: float array (n, d), the rows' (reduced) vectors
        candidates: bool array (n,), the rows that may be picked
        budget: the picks
        rng: the random generator
        num_clusters (32): the groups (at most ``budget``)

    Returns:
        int array of the picked rows, in random order
    """
    from sklearn.cluster import MiniBatchKMeans

    rows = np.flatnonzero(np.asarray(candidates, dtype=bool))
    budget = min(int(budget), rows.size)
    if budget <= 0:
        return np.zeros(0, dtype=np.int64)
    groups = min(num_clusters, budget, rows.size)
    if groups > 1:
        km = MiniBatchKMeans(
            n_clusters=groups,
            random_state=int(rng.integers(2**31 - 1)),
            n_init=3,
            batch_size=4096,
        )
        label = km.fit_predict(np.asarray(Z[rows], dtype=np.float32))
    else:
        label = np.zeros(rows.size, dtype=np.int64)
    order = np.lexsort((rng.random(rows.size), label))
    step = rows.size / budget
    at = (rng.random() * step + step * np.arange(budget)).astype(np.int64)
    picked = rows[order[np.minimum(at, rows.size - 1)]]
    return rng.permutation(picked)


def project(X: np.ndarray, dim: int = 64, seed: int = 0) -> np.ndarray:
    """A random Gaussian projection of the L2-normalized rows of ``X``
    to ``dim`` dimensions (distances are kept up to a small error, which
    is all that grouping needs), float32."""
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    X = X / np.maximum(norms, 1e-12)
    if X.shape[1] <= dim:
        return X
    R = np.random.default_rng(seed).standard_normal((X.shape[1], dim))
    return (X @ (R / np.sqrt(dim)).astype(np.float32)).astype(np.float32)
