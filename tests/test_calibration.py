"""Calibrated confidence and the accept threshold, estimated from the
references only: pure functions on known numbers, then pre-annotation of
real handwritten digits (sklearn's 8x8 scans, 64 pixel values as
embeddings) through a real Qdrant Edge index, checked on held-out targets
and with the targets' labels scrambled."""

import uuid

import fiftyone as fo
import numpy as np
import pytest
from sklearn.datasets import load_digits

import prelabel
from prelabel import constants
from prelabel import panel_data as pdata
from prelabel.core import calibration

K = 15


def _digits_dataset(num_train, seed=0):
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.data))
    dataset = fo.Dataset(f"prelabel-cal-{uuid.uuid4().hex[:8]}")
    dataset.add_samples(
        [
            fo.Sample(
                filepath=f"/nonexistent/digits/{i:04d}.png",
                embeddings=digits.data[i].astype(np.float32),
                ground_truth=fo.Classification(label=str(digits.target[i])),
                tags=["train" if rank < num_train else "test"],
            )
            for rank, i in enumerate(order)
        ],
        progress=False,
    )
    return dataset


@pytest.fixture(scope="module")
def digits():
    dataset = _digits_dataset(num_train=400)
    index = prelabel.sync_index(dataset, progress=False)
    yield dataset, index
    if fo.dataset_exists(dataset.name):
        dataset.delete()


def _values(view, *paths):
    return [np.array(v, dtype=object) for v in view.values(list(paths))]


# ---- pure functions ------------------------------------------------------


def test_ece_of_a_perfectly_calibrated_and_an_overconfident_score():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 200000)
    correct = rng.uniform(size=conf.size) < conf
    assert calibration.expected_calibration_error(conf, correct) < 0.01
    # claims 0.95 where 0.75 is right: off by 0.2
    overconfident = np.full(conf.size, 0.95)
    right = rng.uniform(size=conf.size) < 0.75
    ece = calibration.expected_calibration_error(overconfident, right)
    assert ece == pytest.approx(0.2, abs=0.01)
    assert calibration.expected_calibration_error([], []) == 0.0


def test_calibrator_is_monotone_and_fixes_an_overconfident_score():
    rng = np.random.default_rng(1)
    raw = rng.uniform(size=20000)
    truth = raw**3  # the real probability of being right
    correct = rng.uniform(size=raw.size) < truth
    cal = calibration.Calibrator.fit(raw[:10000], correct[:10000])
    out = cal(np.linspace(0, 1, 101))
    assert np.all(np.diff(out) >= 0)
    held_raw, held_ok = raw[10000:], correct[10000:]
    before = calibration.expected_calibration_error(held_raw, held_ok)
    after = calibration.expected_calibration_error(cal(held_raw), held_ok)
    assert before > 0.2 and after < 0.03
    again = calibration.Calibrator.from_dict(cal.to_dict())
    np.testing.assert_allclose(again(held_raw), cal(held_raw))


def test_accept_threshold_keeps_the_precision_and_accepts_ties_together():
    conf = np.array([0.9, 0.9, 0.8, 0.8, 0.8, 0.7, 0.6])
    ok = np.array([1, 1, 1, 1, 1, 0, 1], dtype=bool)
    thresholds, coverage, precision = calibration.precision_curve(conf, ok)
    np.testing.assert_allclose(thresholds, [0.9, 0.8, 0.7, 0.6])
    np.testing.assert_allclose(coverage, [2 / 7, 5 / 7, 6 / 7, 1.0])
    assert calibration.coverage_at_precision(conf, ok, 0.99) == 5 / 7
    # 5 of 5 right: the 95 % lower bound is 0.05 ** (1 / 5) = 0.549
    thr, cov, low = calibration.accept_threshold(conf, ok, 0.5)
    assert (thr, cov) == (0.8, 5 / 7)
    assert low == pytest.approx(0.05**0.2)
    # raw precision 1.0 is not enough to claim 0.85 from 5 references
    thr, cov, _ = calibration.accept_threshold(conf, ok, 0.85)
    assert thr == float("inf") and cov == 0.0
    # many right ones can: 0 errors in n give the bound 0.05 ** (1 / n)
    big = np.r_[np.ones(2000), np.zeros(30)].astype(bool)
    score = np.r_[np.linspace(1, 0.5, 2000), np.linspace(0.4, 0.1, 30)]
    thr, cov, low = calibration.accept_threshold(score, big, 0.99)
    assert low >= 0.99 and thr < 0.5 and cov < 1.0
    # the largest such cut: one more wrong one and the bound falls short
    n = round(cov * big.size)
    next_low, _ = calibration.precision_bounds(2000, n + 1)
    assert next_low < 0.99
    # 299 right of 299 reach 0.99, 298 do not
    thr, _, _ = calibration.accept_threshold(score[:299], big[:299], 0.99)
    assert np.isfinite(thr)
    thr, _, _ = calibration.accept_threshold(score[:298], big[:298], 0.99)
    assert thr == float("inf")


def test_the_lower_bound_holds_as_often_as_it_says():
    """Drawn many times from a precision of exactly 0.97, the lower bound
    exceeds it in at most 5 % of the draws (exact bounds are
    conservative), and the upper bound falls under it as rarely."""
    rng = np.random.default_rng(0)
    for n in (50, 400, 3000):
        hits = rng.binomial(n, 0.97, size=4000)
        low, high = calibration.precision_bounds(hits, np.full(4000, n))
        assert (low > 0.97).mean() <= 0.05
        assert (high < 0.97).mean() <= 0.05
        # and the bounds are not trivially wide
        assert np.median(high - low) < 6 / np.sqrt(n)
    low, high = calibration.precision_bounds(0, 0)
    assert (float(low), float(high)) == (0.0, 1.0)


def _population(rng, n=40000):
    """Confidences and whether each pre-label is right: the probability
    of being right rises with the confidence, to 0.985-1.0 at the top."""
    conf = rng.beta(5, 1, n)
    p = np.where(conf > 0.9, 0.985 + 0.15 * (conf - 0.9), 0.5 + 0.5 * conf**3)
    return conf, rng.uniform(size=n) < p


def _accepted_precision(pick, seeds=range(30), target=0.99):
    """Per seed: references drawn by ``pick`` from a population, a
    threshold for 2,000 random targets, and the precision and share that
    it really accepts of 10,000 other targets."""
    out = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        conf, ok = _population(rng)
        refs = pick(rng, conf)
        rest = np.setdiff1d(np.arange(conf.size), refs)
        targets = rng.choice(rest, 10000, replace=False)
        sample = rng.choice(targets, 2000, replace=False)
        acc = calibration.target_accept_threshold(
            conf[refs], ok[refs], conf[sample], target, targets.size
        )
        got = targets[conf[targets] >= acc.threshold]
        count_thr = calibration.accept_threshold(conf[refs], ok[refs], target)[
            0
        ]
        out.append(
            (
                ok[got].mean() if got.size else np.nan,
                got.size / targets.size,
                np.mean(conf[targets] >= count_thr),
                acc,
            )
        )
    return out


def test_the_target_threshold_keeps_its_promise_from_fair_references():
    """From 1,000 random references, the accepted targets keep 99 % in
    at least 90 % of the draws (the promise is 95 %), never far under,
    and accept far more than the references' own count bound, which
    can hardly vouch for 99 % with 1,000."""
    runs = _accepted_precision(
        lambda rng, conf: rng.choice(conf.size, 1000, replace=False)
    )
    prec = np.array([r[0] for r in runs])
    share = np.array([r[1] for r in runs])
    # accepting nothing (nan) breaks no promise
    assert np.mean(~(prec < 0.99)) >= 0.9 and np.nanmin(prec) > 0.98
    assert share.mean() > 0.15
    assert share.mean() > 2 * np.mean([r[2] for r in runs])
    for _, got, _, acc in runs:
        if acc.interval is None:
            continue
        low, high = acc.interval
        assert low >= 0.99 and low <= acc.precision <= high <= 1.0
        assert abs(acc.coverage - got) < 0.03  # the sample's share


def test_hard_references_still_vouch_for_the_easy_targets():
    """References picked for being uncertain (half of them among the
    least confident fifth): their own precision at any cut is too low to
    vouch for 99 %, yet how often each confidence is right is the same,
    and the targets are mostly confident: the rule accepts and keeps the
    precision."""

    def hard(rng, conf):
        low = np.flatnonzero(conf < np.quantile(conf, 0.2))
        high = np.setdiff1d(np.arange(conf.size), low)
        return np.r_[
            rng.choice(low, 1000, replace=False),
            rng.choice(high, 1000, replace=False),
        ]

    runs = _accepted_precision(hard, seeds=range(10))
    prec = np.array([r[0] for r in runs])
    share = np.mean([r[1] for r in runs])
    assert share > 0.15 and share > 2 * np.mean([r[2] for r in runs])
    assert np.mean(~(prec < 0.99)) >= 0.9 and np.nanmin(prec) > 0.98


def test_the_target_threshold_accepts_nothing_it_cannot_vouch_for():
    rng = np.random.default_rng(0)
    conf, ok = _population(rng, 20000)
    # 100 references are too few to show 99 %
    acc = calibration.target_accept_threshold(
        conf[:100], ok[:100], conf[100:2100], 0.99
    )
    assert acc.threshold == float("inf") and acc.coverage == 0.0
    assert acc.interval is None
    # targets that get no label (nan) are never accepted, but count
    tconf = conf[100:2100].copy()
    tconf[:1000] = np.nan
    acc = calibration.target_accept_threshold(
        conf[2100:], ok[2100:], tconf, 0.95
    )
    assert 0.0 < acc.coverage <= 0.5
    # no references, or no target with a label: nothing
    for refs, targets in ((conf[:0], conf), (conf, np.full(5, np.nan))):
        acc = calibration.target_accept_threshold(
            refs, ok[: refs.size], targets, 0.9
        )
        assert acc.threshold == float("inf")


def test_curve_points_thin_the_curve_and_keep_its_ends():
    rng = np.random.default_rng(2)
    conf = rng.uniform(size=5000)
    ok = rng.uniform(size=conf.size) < conf
    full = calibration.precision_curve(conf, ok)
    pts = calibration.curve_points(conf, ok, max_points=50)
    assert 40 <= len(pts["coverage"]) <= 50
    assert pts["coverage"][0] == full[1][0] and pts["coverage"][-1] == 1.0
    assert pts["precision"][-1] == pytest.approx(ok.mean())
    # every kept point is a point of the full curve
    at = np.searchsorted(full[1], pts["coverage"])
    np.testing.assert_allclose(full[2][at], pts["precision"])
    small = calibration.curve_points(conf[:10], ok[:10])
    assert len(small["coverage"]) == 10


# ---- through the index ---------------------------------------------------


def test_calibrated_preannotation_on_held_out_targets(digits):
    dataset, index = digits
    test = dataset.match_tags("test")
    res = prelabel.preannotate(
        test,
        index=index,
        reference="train",
        k=K,
        calibrate=True,
        target_precision=0.98,
        progress=False,
    )
    assert res.calibrated and res.num_reference_scored == 400
    assert 0.0 <= res.ece <= res.ece_raw + 0.02
    assert res.accept_threshold is not None
    assert 0.3 < res.expected_coverage <= 1.0
    assert res.expected_precision >= 0.98
    # the threshold was chosen for these targets: every one was scored
    assert res.num_accept_sample == len(test)
    low, high = res.precision_interval
    assert 0.98 <= low <= res.expected_precision <= high <= 1.0
    assert "expected" in res.promise

    truth, label, conf, raw, share, accepted, tags = _values(
        test,
        "ground_truth.label",
        "prelabel.label",
        "prelabel.confidence",
        "prelabel.raw_confidence",
        "prelabel.vote_share",
        "prelabel.accepted",
        "tags",
    )
    correct = truth == label
    conf = conf.astype(float)
    # the calibrated confidence means what it says on targets it never saw
    ece = calibration.expected_calibration_error(conf, correct)
    assert ece < 0.05
    # the vote's share is kept as it was, and the raw score beside it
    assert np.all((share.astype(float) > 0) & (share.astype(float) <= 1))
    assert np.all(raw.astype(float) >= share.astype(float) - 1e-9)
    # accepted ones are the confident ones; the rest are tagged for review
    accepted = accepted.astype(bool)
    review = np.array([constants.REVIEW_TAG in t for t in tags])
    assert np.array_equal(accepted, ~review)
    assert res.num_accepted == accepted.sum()
    assert res.coverage == pytest.approx(accepted.mean())
    assert abs(accepted.mean() - res.expected_coverage) < 0.12
    # roughly the precision asked for on held-out targets
    assert correct[accepted].mean() >= 0.96
    run = dataset.info["prelabel_runs"]["prelabel"]
    assert run["calibrate"] and run["target_precision"] == 0.98

    # what the panel plots: the references' curve, expected vs measured
    exp = pdata.run_expectation(dataset, "prelabel", "ground_truth")
    assert exp.target == 0.98
    assert exp.expected_coverage == pytest.approx(res.expected_coverage)
    assert exp.expected_precision == pytest.approx(res.expected_precision)
    assert np.all(np.diff(exp.coverage) > 0) and exp.coverage[-1] == 1.0
    # the whole curve ends at the references' held-out accuracy
    assert exp.precision[-1] == pytest.approx(res.reference_accuracy)
    assert np.all(np.diff(exp.thresholds) < 0)
    assert exp.num_measured == len(test)
    assert exp.measured_coverage == pytest.approx(accepted.mean())
    assert exp.measured_precision == pytest.approx(correct[accepted].mean())
    assert "measured precision" in exp.text
    dataset.untag_samples(constants.REVIEW_TAG)


def test_target_labels_are_never_read(digits):
    """Scrambling the targets' ground truth (in the dataset and in the
    index) changes no pre-label, confidence, threshold or estimate."""
    dataset, index = digits
    test = dataset.match_tags("test")
    kwargs = dict(
        index=index,
        reference="train",
        k=K,
        calibrate=True,
        target_precision=0.98,
        propagate=True,
        progress=False,
    )
    first = prelabel.preannotate(test, pred_field="pl_a", **kwargs)
    ids, truth = test.values(["id", "ground_truth.label"])
    rng = np.random.default_rng(3)
    scrambled = rng.permutation(np.array(truth))
    scrambled = [str((int(t) + 1) % 10) for t in scrambled]
    dataset.set_values(
        "ground_truth",
        {
            sid: fo.Classification(label=lbl)
            for sid, lbl in zip(ids, scrambled, strict=True)
        },
        key_field="id",
    )
    try:
        prelabel.sync_index(dataset, progress=False)  # labels in payloads
        second = prelabel.preannotate(test, pred_field="pl_b", **kwargs)
    finally:
        dataset.set_values(
            "ground_truth",
            {
                sid: fo.Classification(label=lbl)
                for sid, lbl in zip(ids, truth, strict=True)
            },
            key_field="id",
        )
        prelabel.sync_index(dataset, progress=False)
    a = test.values(["pl_a.label", "pl_a.confidence", "pl_a.accepted"])
    b = test.values(["pl_b.label", "pl_b.confidence", "pl_b.accepted"])
    assert a == b
    for name in (
        "accept_threshold",
        "expected_coverage",
        "expected_precision",
        "ece",
        "reference_accuracy",
        "propagation",
    ):
        assert getattr(first, name) == getattr(second, name), name
    dataset.untag_samples(constants.REVIEW_TAG)


def test_default_preannotate_writes_what_it_always_wrote(digits):
    dataset, index = digits
    test = dataset.match_tags("test")
    res = prelabel.preannotate(
        test, index=index, reference="train", k=K, progress=False
    )
    assert res.calibrated is False and res.expected_coverage is None
    doc = test.first()["prelabel"]
    assert doc.confidence == doc.confidence  # a number
    assert doc.has_field("vote_share") is False
    assert doc.has_field("accepted") is False


def test_bad_scored_arguments_say_what_to_do(digits):
    dataset, index = digits
    test = dataset.match_tags("test")
    with pytest.raises(ValueError, match="target_precision"):
        prelabel.preannotate(
            test, index=index, reference="train", target_precision=99
        )
    with pytest.raises(ValueError, match="mode"):
        prelabel.preannotate(
            test, index=index, reference="train", mode="magic"
        )
