"""References with near-duplicates of each other (copies the targets do
not have) are scored as the targets will be: their closer-than-targets
neighbors set aside, their copies kept in one cross-fitting fold. On real
digits (sklearn's 8x8 scans): noisy copies of the same scan among the
references, targets from other scans."""

import uuid

import fiftyone as fo
import numpy as np
import pytest
from sklearn.datasets import load_digits

import prelabel
from prelabel.core import adapter as core_adapter
from prelabel.core import leakage
from prelabel.core.vectors import nearest_rows

COPIES = 4


def _copies(X, copies, seed, rel=0.25):
    """``copies`` noisy copies of each row (noise norm ``rel`` times the
    row's norm), grouped by source."""
    rng = np.random.default_rng(seed)
    X = np.repeat(np.asarray(X, dtype=np.float32), copies, axis=0)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    noise = rng.standard_normal(X.shape).astype(np.float32)
    return X + rel * norms * noise / np.sqrt(X.shape[1])


def _split(seed=0, num_ref_src=300, num_targets=500):
    d = load_digits()
    order = np.random.default_rng(seed).permutation(len(d.data))
    ref_src = order[:num_ref_src]
    tgt = order[num_ref_src : num_ref_src + num_targets]
    return d, ref_src, tgt


def _sims(R, T, k=15 + leakage.EXTRA_NEIGHBORS):
    idx, sims = nearest_rows(R, R, k, self_rows=np.arange(len(R)))
    _, top = nearest_rows(T, R, 1)
    return idx, sims, top[:, 0]


def test_references_of_the_targets_kind_have_nothing_set_aside():
    d, ref_src, tgt = _split()
    _, sims, top = _sims(d.data[ref_src], d.data[tgt])
    assert leakage.closeness_threshold(sims, top) == np.inf
    keep = leakage.keep_closest(sims, np.inf, 15)
    assert keep[:, :15].all() and not keep[:, 15:].any()


def test_copies_among_the_references_are_set_aside_and_grouped():
    d, ref_src, tgt = _split()
    R = _copies(d.data[ref_src], COPIES, seed=1)
    idx, sims, top = _sims(R, _copies(d.data[tgt], 1, seed=2))
    t = leakage.closeness_threshold(sims, top)
    assert np.isfinite(t)
    source = np.arange(len(R)) // COPIES
    # what the threshold sets aside is mostly copies of the same scan,
    # and after it the references are no closer than the targets
    above = sims > t
    same = source[idx] == source[:, None]
    assert same[above].mean() > 0.8
    assert (same & above).sum() > 0.7 * (same[:, : COPIES - 1]).sum()
    nearest = leakage._nearest_kept(sims, t)
    assert np.median(nearest) <= np.median(top) + 0.01
    keep = leakage.keep_closest(sims, t, 15)
    assert (keep.sum(axis=1) <= 15).all()
    assert not (keep & above).any()

    groups = leakage.duplicate_groups(
        len(R), np.arange(len(R)), idx, sims, t, 40
    )
    assert np.bincount(groups).max() <= 40
    # copies of one scan share a group far more often than chance
    together = np.mean(
        [len(set(groups[source == s])) == 1 for s in range(len(ref_src))]
    )
    assert together > 0.6


def test_more_copies_than_the_extra_neighbors_widen_the_query():
    """With 60 copies of each scan among the references (more than the
    30 extra neighbors), every reference's first 45 neighbors are copies:
    the query is widened until nearly every reference keeps ``k``
    voters that are not copies of its own scan."""
    d, ref_src, tgt = _split(num_ref_src=40)
    copies, k = 60, 15
    R = _copies(d.data[ref_src], copies, seed=1)
    T = _copies(d.data[tgt], 1, seed=2)
    _, narrow, top = _sims(R, T)
    t_narrow = leakage.closeness_threshold(narrow, top)
    assert leakage.short_share(narrow, t_narrow, k) > 0.5
    widths = []

    def query(m):
        widths.append(m)
        return nearest_rows(R, R, m, self_rows=np.arange(len(R)))

    (idx, sims), t = leakage.widened(query, k, top)
    assert widths == [45, 75, 135]
    assert leakage.short_share(sims, t, k) <= leakage.SHORT_SHARE
    keep = leakage.keep_closest(sims, t, k)
    source = np.arange(len(R)) // copies
    voters_same = (source[idx] == source[:, None])[keep]
    assert voters_same.mean() < 0.05
    # what the exact helper returns is the same widened query
    idx2, sims2, t2 = leakage.reference_neighbors(R, T, k=k)
    assert sims2.shape == sims.shape and t2 == t


def test_grouped_folds_never_split_a_group_and_spread_the_classes():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    groups = np.repeat(np.arange(100), 4)
    y = y[groups]  # a group holds one class, as copies do
    folds = core_adapter.stratified_folds(y, 5, seed=0, groups=groups)
    for g in range(100):
        assert len(set(folds[groups == g])) == 1
    for c in range(4):
        counts = np.bincount(folds[y == c], minlength=5)
        assert counts.max() - counts.min() <= 8


def test_the_adapter_keeps_copies_in_one_fold():
    d, ref_src, tgt = _split(num_ref_src=200)
    R = _copies(d.data[ref_src], COPIES, seed=1)
    y = [str(v) for v in np.repeat(d.target[ref_src], COPIES)]
    X_other = _copies(d.data[tgt], 1, seed=2)
    ad = core_adapter.fit_adapter(
        R, y, X_unlabeled=X_other, folds=5, epochs=2, min_steps=20
    )
    assert ad.info["near_duplicates"] > len(R) // 2
    source = np.arange(len(R)) // COPIES
    split = np.mean(
        [len(set(ad.folds[source == s])) > 1 for s in range(len(ref_src))]
    )
    assert split < 0.5  # independent folds would split 99 % of them
    plain = core_adapter.fit_adapter(R, y, folds=5, epochs=2, min_steps=20)
    assert plain.info["near_duplicates"] == 0


def test_calibration_subset_depends_on_the_ids_not_their_order():
    ids = [uuid.uuid4().hex for _ in range(500)]
    rows = leakage.calibration_subset(ids, 100)
    chosen = {ids[i] for i in rows}
    shuffled = list(reversed(ids))
    again = {shuffled[i] for i in leakage.calibration_subset(shuffled, 100)}
    assert len(chosen) == 100 and chosen == again
    assert list(leakage.calibration_subset(ids, 1000)) == list(range(500))


def _dataset(copies):
    """References: ``copies`` noisy copies of each of 300 scans; targets:
    500 other scans, each once."""
    d, ref_src, tgt = _split()
    R = _copies(d.data[ref_src], copies, seed=1)
    T = _copies(d.data[tgt], 1, seed=2)
    rows = [
        (v, c, "train")
        for v, c in zip(R, np.repeat(d.target[ref_src], copies), strict=True)
    ]
    rows += [(v, c, "test") for v, c in zip(T, d.target[tgt], strict=True)]
    dataset = fo.Dataset(f"prelabel-leak-{uuid.uuid4().hex[:8]}")
    dataset.add_samples(
        [
            fo.Sample(
                filepath=f"/nonexistent/leak/{i:05d}.png",
                embeddings=v,
                ground_truth=fo.Classification(label=str(lbl)),
                tags=[tag],
            )
            for i, (v, lbl, tag) in enumerate(rows)
        ],
        progress=False,
    )
    prelabel.sync_index(dataset, progress=False)
    return dataset


@pytest.fixture(params=[1, COPIES], ids=["no copies", "copies"])
def references(request):
    dataset = _dataset(request.param)
    yield request.param, dataset
    dataset.delete()


@pytest.mark.parametrize("propagate", [False, True])
def test_references_are_scored_like_the_targets(references, propagate):
    copies, dataset = references
    out = prelabel.preannotate(
        dataset.match_tags("test"),
        reference="train",
        pred_field="pre",
        target_precision=0.9,
        propagate=propagate,
        eval_key="ev",
        progress=False,
    )
    if propagate:  # spreading's hidden folds keep copies together
        assert out.propagation is not None
    if copies == 1:  # as before: nothing set aside
        assert out.near_duplicate_similarity == np.inf
        assert out.num_reference_trimmed == 0
        assert "near-duplicates" not in out.promise
    else:
        assert np.isfinite(out.near_duplicate_similarity)
        assert out.num_reference_trimmed > 0.5 * out.num_reference_scored
        assert "near-duplicates" in out.promise
    # a scan voted on by its own copies is right more often (0.98 here,
    # the targets 0.96); with its copies set aside, as often as a target
    assert abs(out.reference_accuracy - out.accuracy) < 0.012


def test_nearest_rows_in_blocks_of_bounded_memory(monkeypatch):
    from prelabel.core import vectors

    rng = np.random.default_rng(0)
    Q, R = rng.random((50, 8)), rng.random((300, 8))
    own = np.full(50, -1)
    own[:10] = np.arange(10)
    whole = nearest_rows(Q, R, 5, self_rows=own)
    monkeypatch.setattr(vectors, "MAX_BLOCK_CELLS", 1000)  # 3 rows a block
    blocked = nearest_rows(Q, R, 5, self_rows=own)
    assert (whole[0] == blocked[0]).all()
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    Rn = R / np.linalg.norm(R, axis=1, keepdims=True)
    S = Qn @ Rn.T
    S[np.arange(10), np.arange(10)] = -np.inf
    assert (np.argsort(-S, axis=1)[:, :5] == whole[0]).all()


def test_the_forecast_learning_curve_sets_copies_aside():
    """With copies among the references the error falls with their
    number faster than it will for the targets (a larger subset holds
    more of each scan's copies): the forecast would promise too much."""
    from prelabel.core import forecast

    d, ref_src, tgt = _split(num_ref_src=300, num_targets=1400)
    R = _copies(d.data[ref_src], COPIES, seed=1)
    y = np.repeat(d.target[ref_src], COPIES).astype(str)
    t = leakage.reference_neighbors(R, _copies(d.data[tgt], 1, seed=2))[2]
    assert np.isfinite(t)

    def slope(V, labels, closer_than=np.inf):
        curves = forecast.learning_curve(
            V, labels, 15, closer_than=closer_than
        )
        return forecast.fit_slope([p for c in curves for p in c])

    # the truth: as many distinct scans, no copies
    rows = np.r_[ref_src, tgt[:900]]
    truth = slope(d.data[rows], d.target[rows].astype(str))
    fair, leaky = slope(R, y, t), slope(R, y)
    assert abs(fair - truth) < 0.15
    assert leaky < fair - 0.2


@pytest.fixture
def copies_dataset():
    dataset = _dataset(COPIES)
    yield dataset
    dataset.delete()


def test_one_click_finds_the_copies_through_the_index(
    copies_dataset, monkeypatch
):
    from prelabel import adapt

    def exact(*args, **kwargs):
        raise AssertionError("the index has the neighbors")

    monkeypatch.setattr(core_adapter, "reference_groups", exact)
    dataset = copies_dataset
    out = prelabel.preannotate(
        dataset.match_tags("test"),
        reference="train",
        pred_field="pre",
        mode="adapted",
        target_precision=0.9,
        eval_key="ev",
        progress=False,
    )
    adapter = adapt.load_adapter(dataset, "embeddings_adapted")
    ref_ids = dataset.match_tags("train").values("id")  # copies in a row
    assert adapter.info["near_duplicates"] > len(ref_ids) // 2
    folds = adapter.fold_of(ref_ids)
    split = np.mean(
        [
            len(set(folds[i : i + COPIES])) > 1
            for i in range(0, len(ref_ids), COPIES)
        ]
    )
    assert split < 0.5  # folds blind to copies split 99 % of the scans
    # held out without their copies, the references are no easier than
    # the targets
    assert out.reference_accuracy <= out.accuracy + 0.012


def test_groups_of_one_give_the_folds_of_no_groups():
    y = np.random.default_rng(0).integers(0, 4, 300)
    plain = core_adapter.stratified_folds(y, 5, seed=3)
    single = core_adapter.stratified_folds(
        y, 5, seed=3, groups=-1 - np.arange(300)
    )
    assert (plain == single).all()
