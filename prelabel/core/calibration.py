"""Confidence that means what it says, estimated from the references only.

A raw confidence (the winner's share of a kNN vote, or a classifier's
probability) ranks pre-labels but is not a probability of being right: a
15-neighbor vote has 16 possible values and the share of correct labels at
each value depends on the data. Here the references are scored as if they
were targets (leave-one-out votes, or cross-fitted scores where a projection
was learned from them), a monotone map from raw confidence to "probability
correct" is fitted on those scores (isotonic regression), and the threshold
that keeps a wanted precision is read off the same scores. Nothing here
sees a target's label. Pure numpy (and scikit-learn's isotonic fit).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, bins: int = 15
) -> float:
    """The expected calibration error: the mean, over equal-width bins of
    confidence, of ``|accuracy - mean confidence|``, weighted by the share
    of samples in each bin.

    Args:
        confidence: float array (n,) in [0, 1]
        correct: bool array (n,), whether each prediction was right
        bins (15): the number of bins

    Returns:
        a float in [0, 1] (0.0 for no samples)
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    if conf.size == 0:
        return 0.0
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.mean() * abs(conf[m].mean() - ok[m].mean())
    return float(total)


def precision_curve(
    confidence: np.ndarray, correct: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision of the accepted set when accepting the most confident
    first, evaluated only where the confidence changes (ties are accepted
    or rejected together).

    Returns:
        ``(thresholds, coverage, precision)``: accepting every sample with
        ``confidence >= thresholds[i]`` covers ``coverage[i]`` of them at
        precision ``precision[i]``; thresholds decrease
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    if conf.size == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    order = np.argsort(-conf, kind="stable")
    conf, ok = conf[order], ok[order]
    hits = np.cumsum(ok)
    # the last position of each run of equal confidences
    ends = np.flatnonzero(np.r_[conf[1:] != conf[:-1], True])
    n = np.arange(1, conf.size + 1)
    return conf[ends], n[ends] / conf.size, hits[ends] / n[ends]


def curve_points(
    confidence: np.ndarray, correct: np.ndarray, max_points: int = 200
) -> dict:
    """:func:`precision_curve` thinned to at most ``max_points`` points
    (evenly spaced in coverage, the ends kept), as JSON-able lists: what a
    run stores so that a plot can show later what it expected.

    Returns:
        ``{"thresholds": [...], "coverage": [...], "precision": [...]}``
    """
    thresholds, coverage, precision = precision_curve(confidence, correct)
    if coverage.size > max_points:
        want = np.linspace(coverage[0], coverage[-1], max_points)
        keep = np.unique(np.searchsorted(coverage, want))
        thresholds, coverage, precision = (
            thresholds[keep],
            coverage[keep],
            precision[keep],
        )
    return {
        "thresholds": [float(v) for v in thresholds],
        "coverage": [float(v) for v in coverage],
        "precision": [float(v) for v in precision],
    }


def coverage_at_precision(
    confidence: np.ndarray, correct: np.ndarray, target_precision: float
) -> float:
    """The largest share of samples that can be accepted, most confident
    first, while the precision of the accepted ones stays at or above
    ``target_precision`` (ties are accepted together)."""
    _, coverage, precision = precision_curve(confidence, correct)
    ok = np.flatnonzero(precision >= target_precision - 1e-12)
    return float(coverage[ok.max()]) if ok.size else 0.0


#: references scored for calibration, at most (a subset beyond, chosen by
#: :func:`prelabel.core.leakage.calibration_subset`)
MAX_CALIBRATION = 20000

#: the confidence with which an accept threshold keeps the asked precision
#: (a one-sided lower bound on the references' precision)
CONFIDENCE_LEVEL = 0.95


def precision_bounds(
    hits, n, level: float = CONFIDENCE_LEVEL
) -> tuple[np.ndarray, np.ndarray]:
    """Exact (Clopper-Pearson) one-sided bounds on a precision measured as
    ``hits`` right of ``n``: the true precision is at least the lower bound
    with probability ``level``, and at most the upper bound with the same.

    Args:
        hits: right ones (array or number)
        n: accepted ones, ``>= hits`` (array or number)
        level (0.95): the confidence of each bound

    Returns:
        ``(lower, upper)`` float arrays; ``(0, 1)`` where ``n`` is 0
    """
    from scipy.stats import beta

    h = np.asarray(hits, dtype=np.float64)
    m = np.asarray(n, dtype=np.float64)
    a = 1.0 - float(level)
    with np.errstate(invalid="ignore", divide="ignore"):
        lower = np.where(h > 0, beta.ppf(a, h, m - h + 1), 0.0)
        upper = np.where(h < m, beta.ppf(1 - a, h + 1, m - h), 1.0)
    lower = np.where(m > 0, np.nan_to_num(lower), 0.0)
    upper = np.where(m > 0, np.nan_to_num(upper, nan=1.0), 1.0)
    return lower, upper


def largest_vouched_cut(
    hits, n, target_precision: float, level: float = CONFIDENCE_LEVEL
) -> tuple[int, float]:
    """The accept rule: of nested cuts (the ``i``-th accepts ``n[i]``
    references, ``hits[i]`` of them right; ``n`` increasing), the largest
    whose lower bound (:func:`precision_bounds`) reaches the target.

    Returns:
        ``(index, its lower bound)``, or ``(-1, nan)`` when none does
    """
    lower, _ = precision_bounds(hits, n, level)
    ok = np.flatnonzero(lower >= target_precision - 1e-12)
    if not ok.size:
        return -1, float("nan")
    return int(ok.max()), float(lower[ok.max()])


def accept_threshold(
    confidence: np.ndarray,
    correct: np.ndarray,
    target_precision: float,
    level: float = CONFIDENCE_LEVEL,
) -> tuple[float, float, float]:
    """The lowest confidence to accept so that the accepted references
    keep ``target_precision``, with confidence ``level``.

    A cut is allowed when the lower confidence bound
    (:func:`precision_bounds`) of the accepted references' precision
    reaches the target, so the number of references behind a cut counts:
    50 accepted references all right do not show 99 % precision (their
    bound is 94 %), 2,000 with 10 wrong do. The raw precision of the
    largest cut that happens to reach the target is an optimistic pick
    (on data it was not tuned on, such cuts measured 0.982-0.989 for an
    asked 0.99); the bound is what makes the promise hold.

    Args:
        confidence: raw or calibrated confidences of the scored references
        correct: whether each reference's (held-out) pre-label matched its
            label
        target_precision: the wanted precision, e.g. 0.99
        level (0.95): the confidence of the bound

    Returns:
        ``(threshold, coverage, lower bound)`` on the references: accept
        ``confidence >= threshold``; ``threshold`` is ``inf`` (accept
        nothing) when no cut's bound reaches the precision
    """
    thresholds, coverage, precision = precision_curve(confidence, correct)
    n = np.round(coverage * len(np.asarray(confidence)))
    i, lower = largest_vouched_cut(
        np.round(precision * n), n, target_precision, level
    )
    if i < 0:
        return float("inf"), 0.0, float("nan")
    return float(thresholds[i]), float(coverage[i]), lower


#: how many resampled fits :func:`target_accept_threshold` draws
NUM_DRAWS = 400


@dataclass
class Acceptance:
    """An accept threshold and what it promises on the targets.

    Attributes:
        threshold: accept a pre-label whose raw confidence is at least this
            (``inf``: accept nothing)
        coverage: the expected share of targets accepted
        precision: the expected precision of the accepted pre-labels
        interval: ``(lower, upper)`` bounds on that precision, each at the
            confidence level (the lower one reached the target), or None
            when nothing is accepted
    """

    threshold: float
    coverage: float
    precision: float
    interval: tuple[float, float] | None


def _pav_rates(hits, n, rng) -> np.ndarray:
    """One draw of the probability of being right in each group of
    references (ordered by confidence): the groups are pooled into
    monotone blocks (isotonic regression, weighted by size), and each
    block's rate is drawn from its Jeffreys posterior, so that a block of
    few references, even all right, stays uncertain."""
    from sklearn.isotonic import isotonic_regression

    fitted = isotonic_regression(hits / n, sample_weight=n)
    starts = np.flatnonzero(np.r_[True, fitted[1:] != fitted[:-1]])
    block_hits = np.add.reduceat(hits, starts)
    block_n = np.add.reduceat(n, starts)
    rates = rng.beta(block_hits + 0.5, block_n - block_hits + 0.5)
    return np.repeat(rates, np.diff(np.r_[starts, n.size]))


def target_accept_threshold(
    ref_confidence: np.ndarray,
    ref_correct: np.ndarray,
    target_confidence: np.ndarray,
    target_precision: float,
    num_targets: int | None = None,
    level: float = CONFIDENCE_LEVEL,
    draws: int = NUM_DRAWS,
    seed: int = 0,
) -> Acceptance:
    """The lowest confidence to accept so that the accepted *targets* keep
    ``target_precision``, with confidence ``level``.

    :func:`accept_threshold` bounds the precision of the accepted
    references; that is the targets' only when the references are a fair
    sample of them. References chosen for being hard (or typical) are
    not: hard ones make the bound too strict, typical ones too lenient.
    Here the references say how likely a pre-label of each confidence is
    to be right (a monotone fit), and the targets say how many pre-labels
    of each confidence there are; the expected precision of accepting
    ``confidence >= c`` is the mean probability of being right over the
    targets above ``c``. Its uncertainty is drawn ``draws`` times: the
    references resampled (Poisson bootstrap), the fit's blocks' rates
    drawn from their posteriors, the targets resampled, and the binomial
    luck of the accepted pre-labels themselves. The threshold is the
    lowest cut whose ``1 - level`` quantile reaches the target.

    Args:
        ref_confidence: the references' held-out confidences (n,)
        ref_correct: bool (n,), whether each held-out pre-label was right
        target_confidence: the confidences of the targets, or of a random
            sample of them (m,); ``nan`` for a target that gets no label
        target_precision: the wanted precision, e.g. 0.99
        num_targets (None): how many targets the sample stands for
            (default ``m``): the more are accepted, the less luck matters
        level (0.95): the confidence of the promise
        draws (400): resampled fits
        seed (0): the draws' seed

    Returns:
        an :class:`Acceptance`
    """
    conf = np.asarray(ref_confidence, dtype=np.float64)
    ok = np.asarray(ref_correct, dtype=np.float64)
    tconf = np.asarray(target_confidence, dtype=np.float64)
    tconf = np.where(np.isnan(tconf), -np.inf, tconf)
    nothing = Acceptance(float("inf"), 0.0, float("nan"), None)
    if conf.size == 0 or not np.isfinite(tconf).any():
        return nothing
    # the references in groups of equal confidence, at most ~1,000
    order = np.argsort(conf, kind="stable")
    conf, ok = conf[order], ok[order]
    cuts = np.quantile(conf, np.linspace(0, 1, 1001)[1:-1])
    edges = np.unique(np.r_[0, np.searchsorted(conf, cuts), conf.size])
    lo = conf[edges[:-1]]
    hits = np.add.reduceat(ok, edges[:-1])
    sizes = np.diff(edges).astype(np.float64)
    # the targets from the most confident down; the cuts are where the
    # confidence changes
    tconf = np.sort(tconf)[::-1]
    ends = np.flatnonzero(np.r_[tconf[1:] != tconf[:-1], True])
    ends = ends[np.isfinite(tconf[ends])]
    population = float(num_targets or tconf.size)
    rng = np.random.default_rng(seed)
    found = np.empty((draws, ends.size))
    for d in range(draws):
        h = rng.poisson(hits)
        m = h + rng.poisson(sizes - hits)
        kept = m > 0
        rates = _pav_rates(h[kept], m[kept], rng)
        at = np.searchsorted(lo[kept], tconf, side="right") - 1
        r = rates[np.clip(at, 0, None)]
        w = rng.poisson(1.0, tconf.size).astype(np.float64)
        n_acc = np.cumsum(w)[ends]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.cumsum(w * r)[ends] / n_acc
            var = np.cumsum(w * r * (1 - r))[ends] / n_acc
            accepted = np.maximum(n_acc / w.sum() * population, 1.0)
            luck = np.sqrt(var / accepted) * rng.standard_normal(ends.size)
        found[d] = np.clip(np.nan_to_num(mean + luck), 0.0, 1.0)
    lower = np.quantile(found, 1 - level, axis=0)
    good = np.flatnonzero(lower >= target_precision - 1e-12)
    if not good.size:
        return nothing
    i = int(good.max())
    return Acceptance(
        threshold=float(tconf[ends[i]]),
        coverage=float((ends[i] + 1) / tconf.size),
        precision=float(found[:, i].mean()),
        interval=(float(lower[i]), float(np.quantile(found[:, i], level))),
    )


def choose_score(
    candidates: dict, correct: np.ndarray, target_precision: float
) -> str:
    """The candidate score that accepts the most references at
    ``target_precision`` (:func:`accept_threshold`); on a tie, the first.

    Args:
        candidates: name -> the references' held-out scores (n,)
        correct: bool (n,), whether each reference's pre-label was right
        target_precision: the wanted precision

    Returns:
        the name of the chosen candidate
    """
    best, best_cov = None, -1.0
    for name, score in candidates.items():
        cov = accept_threshold(score, correct, target_precision)[1]
        if cov > best_cov:
            best, best_cov = name, cov
    return best


@dataclass
class Calibrator:
    """A monotone map from raw confidence to the probability of being
    right, fitted by isotonic regression (a step function, interpolated
    linearly between its knots).

    Attributes:
        x: the knots' raw confidences (increasing)
        y: the knots' probabilities of being right (non-decreasing)
        num_samples: how many scored references it was fitted on
        ece: the expected calibration error of the raw confidence on those
            references, before the fit
    """

    x: np.ndarray = field(default_factory=lambda: np.array([0.0, 1.0]))
    y: np.ndarray = field(default_factory=lambda: np.array([0.0, 1.0]))
    num_samples: int = 0
    ece: float | None = None

    @classmethod
    def fit(cls, confidence: np.ndarray, correct: np.ndarray) -> Calibrator:
        """Fits the map on scored references.

        Args:
            confidence: raw confidences (n,)
            correct: bool (n,), whether each pre-label was right

        Raises:
            ValueError: with no scored reference
        """
        from sklearn.isotonic import IsotonicRegression

        conf = np.asarray(confidence, dtype=np.float64)
        ok = np.asarray(correct, dtype=np.float64)
        if conf.size == 0:
            raise ValueError(
                "cannot calibrate without scored references; label more "
                "samples or turn calibration off"
            )
        iso = IsotonicRegression(
            y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip"
        ).fit(conf, ok)
        return cls(
            x=np.asarray(iso.X_thresholds_, dtype=np.float64),
            y=np.asarray(iso.y_thresholds_, dtype=np.float64),
            num_samples=int(conf.size),
            ece=expected_calibration_error(conf, ok),
        )

    def __call__(self, confidence) -> np.ndarray:
        """The calibrated confidence of raw confidences."""
        conf = np.asarray(confidence, dtype=np.float64)
        if self.x.size == 1:
            return np.full(conf.shape, float(self.y[0]))
        return np.interp(conf, self.x, self.y)

    def to_dict(self) -> dict:
        """A JSON-able form, for run infos."""
        return {
            "x": [float(v) for v in self.x],
            "y": [float(v) for v in self.y],
            "num_samples": self.num_samples,
            "ece": self.ece,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Calibrator:
        return cls(
            x=np.asarray(d["x"], dtype=np.float64),
            y=np.asarray(d["y"], dtype=np.float64),
            num_samples=int(d.get("num_samples", 0)),
            ece=d.get("ece"),
        )


@dataclass
class Calibration:
    """What calibrating a run on its references found.

    Attributes:
        calibrator: the fitted :class:`Calibrator`
        num_scored: references scored (leave-one-out or cross-fitted)
        reference_accuracy: accuracy of those references' pre-labels
        ece_raw: calibration error of the raw confidence on the references
        ece_calibrated: calibration error after the map, estimated by
            cross-validation over the references (fit on some, measured on
            the others), so it is not flattered by the fit itself
        target_precision: the precision asked for, if any
        threshold: the raw confidence to accept at, if asked
        expected_coverage: the expected share of targets accepted at
            ``threshold``
        expected_precision: the expected precision of the targets
            accepted at ``threshold``
        precision_interval: ``(lower, upper)`` bounds on that precision
            (:func:`target_accept_threshold`; the lower one is the promise:
            it reached ``target_precision``)
    """

    calibrator: Calibrator
    num_scored: int
    reference_accuracy: float
    ece_raw: float
    ece_calibrated: float
    target_precision: float | None = None
    threshold: float | None = None
    expected_coverage: float | None = None
    expected_precision: float | None = None
    precision_interval: tuple[float, float] | None = None

    def set_acceptance(
        self, acceptance: Acceptance, target_precision: float
    ) -> None:
        """Records the accept threshold chosen for ``target_precision``."""
        self.target_precision = float(target_precision)
        self.threshold = acceptance.threshold
        self.expected_coverage = acceptance.coverage
        self.expected_precision = acceptance.precision
        self.precision_interval = acceptance.interval


def calibrate(
    confidence: np.ndarray,
    correct: np.ndarray,
    target_precision: float | None = None,
    folds: int = 5,
    seed: int = 0,
) -> Calibration:
    """Fits a :class:`Calibrator` on scored references, estimates its
    calibration error by K-fold cross-validation over those references, and
    optionally the accept threshold for ``target_precision``
    (:func:`target_accept_threshold`, the references standing for the
    targets; with a sample of the targets, call it and
    :meth:`Calibration.set_acceptance` instead).

    Args:
        confidence: raw confidences of the references, each scored without
            its own label (leave-one-out or cross-fitted)
        correct: bool, whether each reference's pre-label was right
        target_precision (None): e.g. 0.99, for an accept threshold
        folds (5): folds of the cross-validated calibration error
        seed (0): the fold assignment's seed

    Returns:
        a :class:`Calibration`
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    cal = Calibrator.fit(conf, ok)
    held = np.empty_like(conf)
    if conf.size >= 2 * folds:
        which = np.random.default_rng(seed).permutation(conf.size) % folds
        for f in range(folds):
            fit = which != f
            held[~fit] = Calibrator.fit(conf[fit], ok[fit])(conf[~fit])
    else:
        held = cal(conf)
    out = Calibration(
        calibrator=cal,
        num_scored=int(conf.size),
        reference_accuracy=float(ok.mean()) if ok.size else float("nan"),
        ece_raw=expected_calibration_error(conf, ok),
        ece_calibrated=expected_calibration_error(held, ok),
    )
    if target_precision is not None:
        out.set_acceptance(
            target_accept_threshold(
                conf, ok, conf, target_precision, seed=seed
            ),
            target_precision,
        )
    return out
