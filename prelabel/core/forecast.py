"""Will labeling more pay? A forecast from the references alone (pure
numpy).

The share of targets a pre-annotation can accept grows with the number
of labeled references, and the share it cannot (left for review) shrinks
with the pre-labels' errors, which fall roughly as a power of that
number: ``err(n) ~ c * n ** slope`` with a negative slope (the learning
curves of nearest-neighbor and most other classifiers follow such a
law). The slope is measured on the references: random subsets of several
sizes are scored by a leave-one-out vote of their own nearest neighbors,
and their error rates are fitted against the subsets' sizes in log-log
(the error rate, not the accepted share itself, whose steps at each
threshold make a poor curve). Repeated subsets give the slope's spread,
and the scatter of the largest ones how much one reference set of that
size moves a run; both make the interval.

The forecast applies the slope to what the last pre-annotation really
accepted (a ratio, so that whatever the vote on the references misses
about the real run, its mode, its calibration, cancels out)::

    review share after N more = review share now * ((n + N) / n) ** slope

The references must be a fair sample for the slope to hold (a tag of
random picks, such as :func:`prelabel.select_for_labeling`'s random
share, when the others were chosen).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prelabel.core import leakage
from prelabel.core.calibration import target_accept_threshold
from prelabel.core.vectors import nearest_rows
from prelabel.core.voting import vote

#: subset sizes, as shares of the references
SHARES = (0.125, 0.25, 0.5, 0.75)

#: the interval's quantiles
LOW, HIGH = 0.1, 0.9


@dataclass
class Forecast:
    """What labeling ``more`` samples is expected to do.

    Attributes:
        num_labeled: references now
        more: the samples to label
        accepted_now: the share of targets accepted now
        accepted_next: the expected share after labeling ``more`` (the
            median of the draws)
        interval: ``(low, high)``, the 10 % and 90 % quantiles of
            ``accepted_next`` over the repeated learning curves
        slope: the fitted exponent of the review share (negative: labels
            help; near 0: they no longer do)
        curve: ``(size, review share)`` points the slope was fitted on
    """

    num_labeled: int
    more: int
    accepted_now: float
    accepted_next: float
    interval: tuple[float, float]
    slope: float
    curve: list[tuple[int, float]]

    @property
    def text(self) -> str:
        """One sentence for a person."""
        low, high = self.interval
        return (
            f"labeling {self.more:,} more is expected to raise the accepted "
            f"share from {self.accepted_now:.1%} to {self.accepted_next:.1%}"
            f" (80 % interval {low:.1%} to {high:.1%})"
        )


def error_rate(
    V: np.ndarray, y: np.ndarray, k: int, closer_than: float = np.inf
) -> float:
    """The share of references whose leave-one-out vote of their ``k``
    nearest others is wrong (neighbors more similar than ``closer_than``
    set aside: near-duplicates the targets do not have, see
    :mod:`prelabel.core.leakage`)."""
    k = min(k, len(V) - 1)

    def query(m: int) -> tuple[np.ndarray, np.ndarray]:
        return nearest_rows(
            V, V, min(m, len(V) - 1), self_rows=np.arange(len(V))
        )

    if np.isfinite(closer_than):
        (idx, sims), _ = leakage.widened(query, k, None, closer_than)
    else:
        idx, sims = query(k)
    cols, kept, kept_sims = leakage.closest_kept(sims, closer_than, k)
    voters = np.take_along_axis(idx, cols, 1)
    labels = [
        [y[j] for j, ok in zip(row, m, strict=True) if ok]
        for row, m in zip(voters.tolist(), kept.tolist(), strict=True)
    ]
    classes = sorted(set(y.tolist()))
    votes = vote(labels, kept_sims, classes, k, "majority")
    wrong = [p != t for p, t in zip(votes.labels, y.tolist(), strict=True)]
    return float(np.mean(wrong))


def learning_curve(
    V: np.ndarray,
    y: np.ndarray,
    k: int,
    repeats: int = 5,
    shares=SHARES,
    seed: int = 0,
    closer_than: float = np.inf,
) -> list[list[tuple[int, float]]]:
    """Per repeat, ``(size, error rate)`` of random subsets of the
    references (each size at least ``2 * k``; neighbors above
    ``closer_than`` set aside, as in :func:`error_rate`)."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    n = len(y)
    sizes = sorted({int(round(s * n)) for s in shares if s * n >= 2 * k})
    out = []
    for _ in range(repeats):
        points = []
        for m in sizes:
            rows = rng.choice(n, m, replace=False)
            points.append((m, error_rate(V[rows], y[rows], k, closer_than)))
        out.append(points)
    return out


def fit_slope(points: list[tuple[int, float]]) -> float:
    """The least-squares slope of log error rate against log size (rates
    of 0 are floored at half a sample), at most 0."""
    m = np.array([p[0] for p in points], dtype=np.float64)
    u = np.array([p[1] for p in points], dtype=np.float64)
    u = np.maximum(u, 0.5 / m)
    if len(np.unique(m)) < 2:
        return 0.0
    slope = np.polyfit(np.log(m), np.log(u), 1)[0]
    return float(min(slope, 0.0))


#: the resampled fits behind each replayed threshold (fewer than a run's:
#: the forecast replays the rule once per draw)
REPLAY_DRAWS = 60


def accepted_coverage(
    coverage: np.ndarray,
    precision: np.ndarray,
    num: int,
    target_precision: float,
    error_ratio: float = 1.0,
    rng: np.random.Generator | None = None,
) -> float:
    """The share an accept threshold chosen as a run chooses it
    (:func:`prelabel.core.calibration.target_accept_threshold`) would
    accept, from ``num`` held-out references whose curve is
    ``(coverage, precision)`` with every error rate times
    ``error_ratio``, the references standing for the targets (a fair
    sample). With ``rng``, the errors of each stretch of the curve are
    drawn (binomially) instead of taken as expected: one plausible
    reference set."""
    cov = np.asarray(coverage, dtype=np.float64)
    err = np.clip((1.0 - np.asarray(precision)) * error_ratio, 0.0, 1.0)
    m = np.maximum(np.round(cov * num), 1.0)
    m = np.maximum.accumulate(m)
    step = np.diff(np.r_[0.0, m]).astype(np.int64)
    if rng is None:  # rounded as a running total, not stretch by stretch
        total = np.maximum.accumulate(np.round(err * m))
        wrong = np.minimum(np.diff(np.r_[0.0, total]), step).astype(np.int64)
    else:
        rate = np.diff(np.r_[0.0, err * m]) / np.maximum(step, 1)
        wrong = rng.binomial(step, np.clip(rate, 0.0, 1.0))
    # one confidence per stretch (only the order matters to the rule)
    conf = np.repeat(-cov, step)
    correct = np.concatenate(
        [np.arange(s) >= w for s, w in zip(step, wrong, strict=True)]
    )
    targets = np.sort(conf)[
        np.linspace(0, conf.size - 1, min(conf.size, 2000)).astype(int)
    ]
    acc = target_accept_threshold(
        conf,
        correct,
        targets,
        target_precision,
        draws=REPLAY_DRAWS,
        seed=0 if rng is None else int(rng.integers(1 << 31)),
    )
    return float(np.mean(conf >= acc.threshold)) * float(cov[-1])


def forecast(
    V: np.ndarray,
    y: np.ndarray,
    more: int,
    curve: tuple[np.ndarray, np.ndarray] | None,
    num_calibration: int,
    accepted_now: float,
    target_precision: float,
    k: int = 15,
    repeats: int = 5,
    draws: int = 100,
    seed: int = 0,
    closer_than: float = np.inf,
) -> Forecast:
    """The expected accepted share after labeling ``more`` samples.

    Two things raise it: the pre-labels' errors fall (the slope of the
    references' learning curve), and more references can vouch for a
    lower threshold (the lower bound tightens). Both are applied to the
    last run's held-out reference curve: each point's error rate is
    scaled by ``((n + more) / n) ** slope`` and the threshold is chosen
    again as if ``num_calibration`` grew in proportion. The interval
    draws the slope from its bootstrap and the errors of each stretch of
    the curve binomially.

    Args:
        V: float array (n, d), the references' vectors
        y: their labels (n,)
        more: how many more samples would be labeled
        curve: the last run's held-out curve ``(coverage, precision)``
            of its calibration references (None: no run yet)
        num_calibration: how many references that curve was measured on
        accepted_now: the share of targets the last run accepted
        target_precision: the precision accepted at
        k (15): the neighbors that vote in the learning curve
        repeats (5): learning curves drawn, for the slope's spread
        draws (100): the interval's draws
        seed (0): the seed of subsets and draws
        closer_than (inf): the learning curve's votes set aside
            neighbors more similar than this (near-duplicates among the
            references that the targets do not have: with them, the
            error falls with the number of references faster than it
            will for the targets)

    Returns:
        a :class:`Forecast`
    """
    n = len(y)
    curves = learning_curve(
        V, y, k, repeats, seed=seed, closer_than=closer_than
    )
    pooled = [p for c in curves for p in c]
    slope = fit_slope(pooled) if pooled else 0.0
    rng = np.random.default_rng(seed + 1)
    grow = (n + more) / n if n else 1.0
    num_next = int(round(num_calibration * grow))

    # what the references vouch for now: the replays move as the run did
    now = (
        accepted_coverage(
            curve[0], curve[1], num_calibration, target_precision
        )
        if curve is not None
        else accepted_now
    )

    def after(s: float, draw=None) -> float:
        if curve is None:
            return accepted_now
        cov = accepted_coverage(
            curve[0], curve[1], num_next, target_precision, grow**s, draw
        )
        return float(np.clip(cov + (accepted_now - now), 0.0, 1.0))

    ends = []
    for _ in range(draws):
        pick = rng.integers(0, len(curves), len(curves)) if curves else []
        s = fit_slope([p for i in pick for p in curves[i]]) if curves else 0
        ends.append(after(s, rng))
    low, mid, high = np.quantile(ends, [LOW, 0.5, HIGH])
    means = {}
    for m, u in pooled:
        means.setdefault(m, []).append(u)
    return Forecast(
        num_labeled=n,
        more=int(more),
        accepted_now=float(accepted_now),
        accepted_next=float(mid),
        interval=(float(low), float(high)),
        slope=slope,
        curve=[(m, float(np.mean(v))) for m, v in sorted(means.items())],
    )
