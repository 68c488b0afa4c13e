"""What the mistakes panel shows (``prelabel.panel_data``), checked on a
real pre-annotated and scored digits dataset against what the database
holds, FiftyOne's own evaluation results, and direct numpy computations;
its "Label next" list on real digits picked by
:func:`prelabel.select_for_labeling` from a real Qdrant Edge index."""

from datetime import datetime

import fiftyone as fo
import numpy as np
import pytest
from reviewed_digits import (
    EVAL_KEY,
    build_picked_dataset,
    build_reviewed_dataset,
    delete,
    label_from_truth,
)

import prelabel
from prelabel import label_indexes, records
from prelabel import panel_data as pdata

K = 15


@pytest.fixture(scope="module")
def reviewed():
    dataset, pre, mistakes = build_reviewed_dataset()
    yield dataset, pre, mistakes
    delete(dataset)


@pytest.fixture(scope="module")
def dataset(reviewed):
    return reviewed[0]


@pytest.fixture
def pre_source(dataset):
    return pdata.make_source(dataset, "prelabel")


@pytest.fixture
def sus_source(dataset):
    return pdata.make_source(dataset, "suspicious")


def _table(dataset, *paths):
    """``{id: (values...)}`` of every sample, straight from the database."""
    ids, *cols = dataset.values(["id", *paths])
    return {sid: vals for sid, *vals in zip(ids, *cols, strict=True)}


# ---- sources ---------------------------------------------------------


def test_sources_found_from_what_the_package_wrote(dataset):
    assert pdata.find_sources(dataset) == {
        "prelabel": ["prelabel"],
        "suspicious": ["mistake_score"],
    }
    assert pdata.make_source(dataset, "prelabel") == pdata.Source(
        "prelabel", "ground_truth", "prelabel"
    )
    assert pdata.make_source(dataset, "suspicious") == pdata.Source(
        "suspicious", "ground_truth", "mistake_score_label", "mistake_score"
    )
    assert pdata.eval_keys_for(dataset, "prelabel") == [EVAL_KEY]
    assert pdata.eval_keys_for(dataset, "ground_truth") == []


def test_sources_reject_bad_input(dataset):
    with pytest.raises(ValueError, match="mode="):
        pdata.make_source(dataset, "everything")
    with pytest.raises(ValueError, match="gt_field='nope'"):
        pdata.make_source(dataset, "prelabel", gt_field="nope")
    with pytest.raises(ValueError, match="pred_field='mistake_score'"):
        pdata.make_source(dataset, "prelabel", pred_field="mistake_score")


def test_no_source_on_a_dataset_without_runs():
    dataset = fo.Dataset()
    try:
        dataset.add_sample(
            fo.Sample(
                filepath="/nonexistent/a.png",
                ground_truth=fo.Classification(label="1"),
            )
        )
        assert pdata.find_sources(dataset) == {
            "prelabel": [],
            "suspicious": [],
        }
        assert pdata.make_source(dataset, "prelabel") is None
        assert pdata.make_source(dataset, "suspicious") is None
    finally:
        dataset.delete()


# ---- pre-label mistakes ------------------------------------------------


def test_prelabel_rows_are_the_disagreements_most_confident_first(
    dataset, pre_source
):
    db = _table(
        dataset,
        "ground_truth.label",
        "prelabel.label",
        "prelabel.confidence",
        "prelabel.votes",
        "filepath",
    )
    expected = {
        sid
        for sid, (gt, pred, *_) in db.items()
        if pred is not None and gt != pred
    }
    view = pdata.mistakes_view(dataset, pre_source)
    ids = view.values("id")
    assert set(ids) == expected and len(ids) == len(expected) > 10
    # the package's own ranking holds the same samples
    assert set(ids) == set(
        prelabel.high_confidence_mistakes(dataset).values("id")
    )
    keys = [(-db[s][2], s) for s in ids]
    assert keys == sorted(keys)  # confidence down, then sample order

    rows = pdata.list_rows(view, pre_source, limit=7)
    assert [r["id"] for r in rows] == ids[:7]
    for row in rows:
        gt, pred, conf, votes, path = db[row["id"]]
        assert row == {
            "id": row["id"],
            "filename": path.rsplit("/", 1)[1],
            "truth": gt,
            "pred": pred,
            "score": round(conf, 4),
            "votes": votes,
        }
        # the vote names the winner first with its count
        assert votes.startswith(f"{pred}: {round(conf * K)}")
    assert len(pdata.list_rows(view, pre_source, limit=None)) == len(ids)


@pytest.mark.parametrize(
    "filters",
    [
        pdata.Filters(min_score=0.8),
        pdata.Filters(truth="8"),
        pdata.Filters(pred="1"),
        pdata.Filters(min_score=0.5, truth="9", pred="8"),
        pdata.Filters(min_score=1.01),
    ],
)
def test_prelabel_filters_and_summary(dataset, pre_source, filters):
    db = _table(
        dataset, "ground_truth.label", "prelabel.label", "prelabel.confidence"
    )
    expected = [
        sid
        for sid, (gt, pred, conf) in db.items()
        if pred is not None
        and gt != pred
        and conf >= filters.min_score
        and filters.truth in (None, gt)
        and filters.pred in (None, pred)
    ]
    view = pdata.mistakes_view(dataset, pre_source, filters)
    assert sorted(view.values("id")) == sorted(expected)

    summary = pdata.summarize(view, pre_source)
    confs = np.array([db[s][2] for s in expected])
    assert summary.count == len(expected)
    assert summary.high_count == int(np.sum(confs > 0.9))
    noun = "mistake" if len(expected) == 1 else "mistakes"
    assert summary.text == (
        f"{len(expected)} {noun}, {summary.high_count} above 0.9"
    )


def test_a_page_of_a_whole_dataset(dataset, pre_source):
    """list_rows() of a dataset rather than a view: every sample."""
    rows = pdata.list_rows(dataset, pre_source, limit=3)
    assert [r["id"] for r in rows] == dataset.values("id")[:3]


def test_class_choices_in_natural_order(dataset, pre_source):
    assert pdata.class_choices(dataset, pre_source) == [
        str(d) for d in range(10)
    ]


def test_evidence_view_is_the_sample_then_its_voters(dataset, pre_source):
    row = pdata.list_rows(
        pdata.mistakes_view(dataset, pre_source), pre_source, limit=1
    )[0]
    neighbors = dataset[row["id"]].prelabel.neighbors
    view = pdata.evidence_view(dataset, row["id"], pre_source)
    assert view.values("id") == [row["id"]] + list(neighbors)
    assert len(neighbors) == K
    # the voters are the labeled reference samples
    assert set(view.skip(1).values("tags", unwind=True)) == {"train"}
    with pytest.raises(ValueError, match="not in this dataset"):
        pdata.evidence_view(dataset, "0" * 24, pre_source)


# ---- suspicious labels -------------------------------------------------


def test_suspicious_rows_are_the_labels_neighbors_disagree_with(
    reviewed, sus_source
):
    dataset, _, mistakes = reviewed
    db = _table(
        dataset,
        "ground_truth.label",
        "mistake_score_label.label",
        "mistake_score",
        "mistake_score_label.votes",
    )
    expected = {
        sid
        for sid, (gt, major, _, _) in db.items()
        if major is not None and gt != major
    }
    view = pdata.mistakes_view(dataset, sus_source)
    ids = view.values("id")
    assert set(ids) == expected and len(ids) == len(expected)
    assert len(ids) == mistakes.num_disagree
    keys = [(-db[s][2], s) for s in ids]
    assert keys == sorted(keys)

    row = pdata.list_rows(view, sus_source, limit=1)[0]
    gt, major, score, votes = db[row["id"]]
    assert (row["truth"], row["pred"], row["votes"]) == (gt, major, votes)
    # the score is 1 - the share of the vote for the sample's own label
    own = dict(v.split(": ") for v in votes.split(", ")).get(gt, "0")
    assert row["score"] == pytest.approx(1 - int(own) / K, abs=1e-4)

    summary = pdata.summarize(view, sus_source, high=0.5)
    scores = np.array([db[s][2] for s in ids])
    assert (summary.count, summary.high_count) == (
        len(ids),
        int(np.sum(scores > 0.5)),
    )
    assert summary.text.startswith(f"{len(ids)} suspicious labels, ")

    evidence = pdata.evidence_view(dataset, row["id"], sus_source)
    assert evidence.values("id")[0] == row["id"]
    assert row["id"] not in evidence.values("id")[1:]


def test_suspicious_min_score_filter(dataset, sus_source):
    scores = dict(zip(*dataset.values(["id", "mistake_score"]), strict=True))
    view = pdata.mistakes_view(
        dataset, sus_source, pdata.Filters(min_score=0.6)
    )
    ids = view.values("id")
    assert ids and all(scores[s] >= 0.6 for s in ids)
    everything = pdata.mistakes_view(dataset, sus_source).values("id")
    assert set(ids) == {s for s in everything if scores[s] >= 0.6}


def _disagreements(dataset) -> set[str]:
    """The scored samples whose label is not their neighbors' majority,
    from every sample in the database."""
    db = _table(dataset, "ground_truth.label", "mistake_score_label.label")
    return {
        sid
        for sid, (gt, major) in db.items()
        if major is not None and gt is not None and gt != major
    }


def _samples_read(view) -> int:
    """The samples MongoDB reaches to answer ``view``: the index keys it
    examines (one per sample: the fields indexed hold no lists), or the
    samples it scans when it uses no index."""
    coll = view._dataset._sample_collection
    cmd = {"aggregate": coll.name, "pipeline": view._pipeline(), "cursor": {}}
    plan = coll.database.command(
        {"explain": cmd, "verbosity": "executionStats"}
    )
    stats = plan.get("executionStats") or plan["stages"][0]["$cursor"].get(
        "executionStats"
    )
    return stats["totalKeysExamined"] or stats["totalDocsExamined"]


def test_suspicious_rows_read_only_what_may_disagree():
    """The run records its lowest disagreeing score and when it wrote:
    the panel reads the samples scored that high and those modified since
    (a label edited after the run shows at once), not every sample."""
    dataset, _, mistakes = build_reviewed_dataset(n=300, seed=1)
    try:
        source = pdata.make_source(dataset, "suspicious")
        record = records.get(dataset, records.MISTAKES, "mistake_score")
        ids, scores, modified = dataset.values(
            ["id", "mistake_score", "last_modified_at"]
        )
        scores = dict(zip(ids, scores, strict=True))
        wrong = _disagreements(dataset)
        assert len(wrong) == mistakes.num_disagree > 0
        low = min(scores[s] for s in wrong)
        assert record["disagree_min_score"] == low
        # every sample the run wrote carries the recorded time, none later
        stamp = datetime.fromisoformat(record["scored_at"])
        assert max(modified) == stamp

        view = pdata.mistakes_view(dataset, source)
        assert set(view.values("id")) == wrong
        at_least_low = sum(s >= low for s in scores.values())
        assert _samples_read(view) == at_least_low < len(dataset)

        # a person changes a label the neighbors agreed with
        agreed = next(s for s in ids if s not in wrong and scores[s] < low)
        sample = dataset[agreed]
        major = sample.mistake_score_label.label
        sample.ground_truth.label = str((int(major) + 1) % 10)
        sample.save()
        view = pdata.mistakes_view(dataset, source)
        assert set(view.values("id")) == wrong | {agreed}
        assert _samples_read(view) == at_least_low + 1
        # ... and fixes one the neighbors disagreed with
        fixed = next(iter(wrong))
        sample = dataset[fixed]
        sample.ground_truth.label = sample.mistake_score_label.label
        sample.save()
        view = pdata.mistakes_view(dataset, source)
        assert set(view.values("id")) == (wrong - {fixed}) | {agreed}
        assert set(view.values("id")) == _disagreements(dataset)

        # compared with another field, or for a run that recorded
        # nothing of this, every scored sample is read: the rows still
        # agree with the database
        dataset.clone_sample_field("ground_truth", "other")
        other = pdata.make_source(dataset, "suspicious", gt_field="other")
        view = pdata.mistakes_view(dataset, other)
        assert set(view.values("id")) == _disagreements(dataset)
        assert _samples_read(view) == len(dataset)
    finally:
        delete(dataset)


def test_without_disagreement_only_what_was_modified_since_is_read():
    """Two clusters far apart, labeled by cluster: no neighbor disagrees,
    so the panel reads no sample until a label is changed."""
    rng = np.random.default_rng(0)
    dataset = fo.Dataset()
    try:
        dataset.add_samples(
            [
                fo.Sample(
                    filepath=f"/nonexistent/two/{i}.png",
                    embeddings=np.eye(8)[i % 2] + 0.01 * rng.random(8),
                    ground_truth=fo.Classification(label=str(i % 2)),
                )
                for i in range(40)
            ],
            progress=False,
        )
        prelabel.sync_index(dataset, progress=False)
        out = prelabel.find_label_mistakes(dataset, k=5, progress=False)
        assert out.num_disagree == 0
        rec = records.get(dataset, records.MISTAKES, "mistake_score")
        assert rec["disagree_min_score"] is None
        source = pdata.make_source(dataset, "suspicious")
        view = pdata.mistakes_view(dataset, source)
        assert view.values("id") == [] and _samples_read(view) == 0

        sample = dataset.first()
        sample.ground_truth.label = "1"
        sample.save()
        view = pdata.mistakes_view(dataset, source)
        assert view.values("id") == [sample.id]
        assert _samples_read(view) == 1
    finally:
        dataset.delete()


# ---- confusion matrix ----------------------------------------------------


def test_confusion_matrix_equals_fiftyones_evaluation(dataset):
    confusion = pdata.confusion_matrix(
        dataset, "prelabel", "ground_truth", EVAL_KEY
    )
    results = dataset.load_evaluation_results(EVAL_KEY)
    assert confusion.classes == [str(d) for d in range(10)]
    np.testing.assert_array_equal(
        confusion.counts, results.confusion_matrix(classes=confusion.classes)
    )
    assert confusion.counts.sum() == len(dataset.match_tags("test"))

    norm = confusion.normalized()
    sums = confusion.counts.sum(axis=1)
    np.testing.assert_allclose(norm.sum(axis=1)[sums > 0], 1.0)
    np.testing.assert_allclose(
        norm[sums > 0], confusion.counts[sums > 0] / sums[sums > 0, None]
    )
    # without an eval key: every sample with both labels, the same here
    plain = pdata.confusion_matrix(dataset, "prelabel", "ground_truth")
    np.testing.assert_array_equal(plain.counts, confusion.counts)


def test_each_confusion_cell_view_holds_exactly_its_samples(dataset):
    confusion = pdata.confusion_matrix(
        dataset, "prelabel", "ground_truth", EVAL_KEY
    )
    scope = dataset.load_evaluation_view(EVAL_KEY)
    db = _table(scope, "ground_truth.label", "prelabel.label")
    for i, truth in enumerate(confusion.classes):
        for j, pred in enumerate(confusion.classes):
            view = pdata.confusion_cell_view(
                dataset, "prelabel", "ground_truth", truth, pred, EVAL_KEY
            )
            expected = {
                s for s, (gt, p) in db.items() if (gt, p) == (truth, pred)
            }
            ids = view.values("id")
            assert set(ids) == expected
            assert len(ids) == confusion.counts[i, j]


def test_confusion_follows_a_relabel(dataset):
    """Computed from the fields as they are now, so counts and cell views
    agree after an edit; a sample whose label is removed leaves the
    evaluated samples."""
    scope = dataset.load_evaluation_view(EVAL_KEY)
    sample = dataset[scope.first().id]
    old = sample.ground_truth.label
    pred = sample.prelabel.label
    new = str((int(old) + 5) % 10)
    before = pdata.confusion_matrix(
        dataset, "prelabel", "ground_truth", EVAL_KEY
    )
    version = pdata.data_version(dataset)
    try:
        sample.ground_truth.label = new
        sample.save()
        assert pdata.data_version(dataset) != version
        after = pdata.confusion_matrix(
            dataset, "prelabel", "ground_truth", EVAL_KEY
        )
        idx = {c: i for i, c in enumerate(after.classes)}
        diff = after.counts - before.counts
        assert diff[idx[new], idx[pred]] == 1
        assert diff[idx[old], idx[pred]] == -1
        assert np.abs(diff).sum() == 2
        cell = pdata.confusion_cell_view(
            dataset, "prelabel", "ground_truth", new, pred, EVAL_KEY
        )
        assert sample.id in cell.values("id")

        sample.ground_truth = None
        sample.save()
        gone = pdata.confusion_matrix(
            dataset, "prelabel", "ground_truth", EVAL_KEY
        )
        assert gone.counts.sum() == before.counts.sum() - 1
    finally:
        sample.ground_truth = fo.Classification(label=old)
        sample.save()


def test_confusion_of_an_evaluation_with_missing_predictions(dataset):
    """An evaluation of every sample (the reference ones have no
    pre-label) has a "(none)" column, as FiftyOne counts it."""
    dataset.evaluate_classifications(
        "prelabel", gt_field="ground_truth", eval_key="all_eval"
    )
    try:
        confusion = pdata.confusion_matrix(
            dataset, "prelabel", "ground_truth", "all_eval"
        )
        assert confusion.classes[-1] == pdata.MISSING
        results = dataset.load_evaluation_results("all_eval")
        np.testing.assert_array_equal(
            confusion.counts,
            results.confusion_matrix(classes=confusion.classes),
        )
        assert confusion.counts[:, -1].sum() == len(
            dataset.match_tags("train")
        )
        cell = pdata.confusion_cell_view(
            dataset, "prelabel", "ground_truth", "3", pdata.MISSING, "all_eval"
        )
        expected = dataset.match_tags("train").match(
            fo.ViewField("ground_truth.label") == "3"
        )
        assert set(cell.values("id")) == set(expected.values("id"))
        assert len(cell) == confusion.counts[3, -1] > 0
    finally:
        dataset.delete_evaluation("all_eval")


def test_unknown_eval_key_is_refused(dataset):
    with pytest.raises(ValueError, match="eval_key='nope'"):
        pdata.confusion_matrix(dataset, "prelabel", "ground_truth", "nope")


# ---- precision versus coverage -------------------------------------------


def _direct_curve(conf, correct, target):
    """Every distinct threshold by brute force."""
    points = []
    for t in sorted(set(conf), reverse=True):
        accepted = conf >= t
        points.append(
            (t, accepted.mean(), correct[accepted].mean(), accepted.sum())
        )
    good = [p for p in points if p[2] >= target]
    best = min(good, key=lambda p: p[0]) if good else None
    return points, best


@pytest.mark.parametrize("target", [0.99, 0.95, 0.9, 0.85, 0.8, 0.5])
def test_precision_coverage_matches_a_direct_computation(dataset, target):
    curve = pdata.precision_coverage(
        dataset, "prelabel", "ground_truth", EVAL_KEY, target=target
    )
    gt, pred, conf = dataset.load_evaluation_view(EVAL_KEY).values(
        ["ground_truth.label", "prelabel.label", "prelabel.confidence"]
    )
    conf = np.array(conf)
    correct = np.array(gt) == np.array(pred)
    points, best = _direct_curve(conf, correct, target)

    assert curve.num_samples == len(conf)
    np.testing.assert_allclose(curve.thresholds, [p[0] for p in points])
    np.testing.assert_allclose(curve.coverage, [p[1] for p in points])
    np.testing.assert_allclose(curve.precision, [p[2] for p in points])
    # monotonic: thresholds fall, coverage grows to every sample
    assert np.all(np.diff(curve.thresholds) < 0)
    assert np.all(np.diff(curve.coverage) > 0)
    assert curve.coverage[-1] == 1.0
    results = dataset.load_evaluation_results(EVAL_KEY)
    assert curve.precision[-1] == pytest.approx(results.metrics()["accuracy"])
    if best is None:
        assert curve.threshold is None and curve.coverage_at_target == 0
        assert "No confidence threshold" in curve.text
    else:
        assert curve.threshold == pytest.approx(best[0])
        assert curve.coverage_at_target == pytest.approx(best[1])
        assert curve.precision_at_target == pytest.approx(best[2])
        assert curve.precision_at_target >= target
        assert f"{curve.threshold:.3f}" in curve.text
        # nothing with more coverage keeps the target
        more = curve.coverage > curve.coverage_at_target
        assert np.all(curve.precision[more] < target)


def test_coverage_curve_ties_dips_and_edges():
    conf = np.array([0.9, 0.9, 0.8, 0.7, 0.7, 0.7, 0.5, 0.2])
    correct = np.array([1, 0, 1, 1, 1, 1, 1, 0], dtype=bool)
    curve = pdata.coverage_curve(conf, correct, target=0.8)
    # ties are accepted together: 0.9 accepts two samples at once
    np.testing.assert_allclose(curve.thresholds, [0.9, 0.8, 0.7, 0.5, 0.2])
    np.testing.assert_allclose(curve.coverage, np.array([2, 3, 6, 7, 8]) / 8)
    np.testing.assert_allclose(
        curve.precision, [1 / 2, 2 / 3, 5 / 6, 6 / 7, 6 / 8]
    )
    # precision dips below target at the top and recovers: the most
    # coverage that keeps the target wins
    assert curve.threshold == 0.5
    assert curve.coverage_at_target == 7 / 8

    unreachable = pdata.coverage_curve(conf, correct, target=0.99)
    assert unreachable.threshold is None
    assert unreachable.precision_at_target is None

    empty = pdata.coverage_curve(np.zeros(0), np.zeros(0, dtype=bool))
    assert empty.num_samples == 0 and empty.threshold is None
    assert "No pre-label" in empty.text
    with pytest.raises(ValueError, match="target="):
        pdata.precision_coverage(None, "p", "g", target=0)


# ---- bulk actions ----------------------------------------------------------


def test_tag_samples_tags_exactly_the_filtered_rows(dataset, pre_source):
    view = pdata.mistakes_view(dataset, pre_source, pdata.Filters(truth="8"))
    ids = set(view.values("id"))
    try:
        assert pdata.tag_samples(view, "label_error") == len(ids) > 0
        tagged = set(dataset.match_tags("label_error").values("id"))
        assert tagged == ids
    finally:
        dataset.untag_samples("label_error")
    with pytest.raises(ValueError, match="tag="):
        pdata.tag_samples(view, "")


def test_accept_labels_copies_into_a_new_field_never_ground_truth(
    dataset, pre_source
):
    view = pdata.mistakes_view(
        dataset, pre_source, pdata.Filters(min_score=0.8)
    )
    ids = view.values("id")
    gt_before = dataset.values("ground_truth.label")
    try:
        assert pdata.accept_labels(view, pre_source, "accepted") == len(ids)
        got = _table(dataset, "accepted.label", "accepted.confidence")
        pre = _table(dataset, "prelabel.label", "prelabel.confidence")
        for sid, (label, conf) in got.items():
            if sid in ids:
                assert (label, conf) == tuple(pre[sid])
            else:
                assert label is None
        assert dataset.values("ground_truth.label") == gt_before

        for bad in ("ground_truth", "prelabel", "filepath", "mistake_score"):
            with pytest.raises(ValueError, match="accept_field="):
                pdata.accept_labels(view, pre_source, bad)
        with pytest.raises(ValueError, match="accept_field="):
            pdata.accept_labels(view, pre_source, "not a name")
        assert dataset.values("ground_truth.label") == gt_before
    finally:
        if dataset.has_sample_field("accepted"):
            dataset.delete_sample_field("accepted")


def test_data_version_changes_with_fields_and_samples(dataset):
    version = pdata.data_version(dataset)
    assert pdata.data_version(dataset) == version
    dataset.add_sample_field("scratch", fo.StringField)
    try:
        assert pdata.data_version(dataset) != version
    finally:
        dataset.delete_sample_field("scratch")


# ---- what to label next ----------------------------------------------------


@pytest.fixture
def picked():
    """200 digits, 80 labeled, 20 picked to label next."""
    dataset, out = build_picked_dataset()
    yield dataset, out
    delete(dataset)


def test_no_selection_yet(dataset):
    assert pdata.selection_fields(dataset) == []
    assert pdata.label_next(dataset) is None


def test_label_next_lists_the_picks_in_order_with_their_reasons(picked):
    dataset, out = picked
    picks = pdata.label_next(dataset)
    assert picks.reason_field == "label_next_reason"
    assert picks.label_field == "ground_truth"
    assert picks.strategy == out.strategy == "spread"
    assert picks.ids == out.ids and len(out.ids) == 20
    db = _table(dataset, "filepath", "label_next_reason", "ground_truth")
    assert [r["reason"] for r in picks.rows] == out.reasons
    for rank, row in enumerate(picks.rows, start=1):
        path, reason, label = db[row["id"]]
        assert row["rank"] == rank
        assert row["filepath"] == path
        assert row["filename"] == path.rsplit("/", 1)[-1]
        assert row["reason"] == reason and reason.startswith("spread:")
        assert label is None
        assert (row["label"], row["labeled"]) == (None, False)
    # a spread sample is fair through and through
    assert picks.num_random == out.num_random == 20
    assert all(r["random"] for r in picks.rows)
    assert (picks.num_labeled, picks.num_missing) == (0, 0)
    assert (picks.tag, picks.view_name) == ("to_label", "to_label")
    assert picks.text == "Strategy spread: 20 picks, 0 labeled so far"
    assert picks.forecast["text"] == out.forecast.text
    assert picks.forecast_text == f"Forecast when picked: {out.forecast.text}."
    assert picks.forecast_text.startswith(
        "Forecast when picked: labeling 20 more is expected to raise"
    )


def test_label_next_counts_the_picks_labeled_since(picked):
    dataset, out = picked
    done = [out.ids[1], out.ids[4], out.ids[7]]
    label_from_truth(dataset, done)
    picks = pdata.label_next(dataset)
    assert picks.num_labeled == 3
    assert picks.text == "Strategy spread: 20 picks, 3 labeled so far"
    truth = _table(dataset, "truth.label")
    for row in picks.rows:
        if row["id"] in done:
            assert row["labeled"] and row["label"] == truth[row["id"]][0]
        else:
            assert not row["labeled"] and row["label"] is None
    assert picks.ids == out.ids  # still in the order picked

    # a label removed again is no longer counted
    dataset.select(done[0]).set_field("ground_truth", None).save()
    assert pdata.label_next(dataset).num_labeled == 2


def test_without_enough_labels_there_is_no_forecast():
    dataset, out = build_picked_dataset(num_labeled=0, budget=10)
    try:
        assert out.forecast is None
        picks = pdata.label_next(dataset)
        assert picks.forecast is None
        assert "No forecast yet" in picks.forecast_text
        assert picks.text == "Strategy spread: 10 picks, 0 labeled so far"
    finally:
        delete(dataset)


def test_the_picks_view_is_the_saved_view_or_the_picks_again(picked):
    dataset, out = picked
    picks = pdata.label_next(dataset)
    view = pdata.picks_view(dataset, picks)
    assert view.values("id") == out.ids
    assert view.values("id") == dataset.load_saved_view("to_label").values(
        "id"
    )
    assert pdata.pick_view(dataset, out.ids[3]).values("id") == [out.ids[3]]

    dataset.delete_saved_view("to_label")
    picks = pdata.label_next(dataset)
    assert picks.view_name is None
    assert pdata.picks_view(dataset, picks).values("id") == out.ids

    dataset.delete_samples([out.ids[0]])
    picks = pdata.label_next(dataset)
    assert picks.ids == out.ids[1:] and picks.num_missing == 1
    assert picks.rows[0]["rank"] == 2  # the rank it was picked at
    assert picks.text.endswith("; 1 deleted since")
    with pytest.raises(ValueError, match="not in this dataset"):
        pdata.pick_view(dataset, out.ids[0])


def test_label_next_reads_the_newest_selection_or_the_one_named(picked):
    dataset, first = picked
    second = prelabel.select_for_labeling(
        dataset,
        budget=5,
        strategy="typical",
        random_share=0.0,
        tag="batch_2",
        random_tag=None,
        view_name="batch_2",
        reason_field="why_2",
        outlier_field="outlier_2",
        progress=False,
    )
    assert pdata.selection_fields(dataset) == ["why_2", "label_next_reason"]
    newest = pdata.label_next(dataset)
    assert newest.reason_field == "why_2" and newest.strategy == "typical"
    assert newest.ids == second.ids and newest.num_random == 0
    assert [r["reason"] for r in newest.rows] == second.reasons
    assert newest.text == "Strategy typical: 5 picks, 0 labeled so far"
    assert pdata.label_next(dataset, "label_next_reason").ids == first.ids

    with pytest.raises(ValueError, match="reason_field='nope'"):
        pdata.label_next(dataset, "nope")
    with pytest.raises(ValueError, match="label_field='embeddings'"):
        pdata.label_next(dataset, label_field="embeddings")

    # a selection whose reason field was deleted is no longer offered
    dataset.delete_sample_field("why_2")
    assert pdata.selection_fields(dataset) == ["label_next_reason"]
    assert pdata.label_next(dataset).ids == first.ids


# ---- indexes ---------------------------------------------------------


def _plan(view) -> str:
    """MongoDB's explanation of ``view``'s pipeline, as text."""
    coll = view._dataset._sample_collection
    return str(
        coll.database.command(
            "aggregate", coll.name, pipeline=view._pipeline(), explain=True
        )
    )


def test_the_panel_reads_its_rows_through_indexes(
    dataset, pre_source, sus_source
):
    """The jobs index the fields the panel finds its rows by, and its
    queries use them: at 500,000 samples it reads its rows, not every
    sample (benchmarks/scale_fiftyone.py)."""
    pred, gt = pre_source.pred_field, pre_source.gt_field
    assert {
        f"{pred}.id",
        f"{gt}.id",
        sus_source.score_field,
    } <= set(dataset.list_indexes())
    scope = pdata.evaluation_scope(dataset, pred, gt)
    assert "IXSCAN" in _plan(scope)
    for source in (pre_source, sus_source):
        assert "IXSCAN" in _plan(pdata.mistakes_view(dataset, source))


def test_without_the_indexes_the_rows_are_the_same(
    dataset, pre_source, sus_source
):
    pred, gt = pre_source.pred_field, pre_source.gt_field
    paths = [f"{pred}.id", f"{gt}.id", sus_source.score_field]
    before = {
        s.mode: pdata.page(pdata.mistakes_view(dataset, s), s, None)
        for s in (pre_source, sus_source)
    }
    charts = pdata.charts(dataset, pred, gt)
    for path in paths:
        dataset.drop_index(path)
    try:
        for s in (pre_source, sus_source):
            view = pdata.mistakes_view(dataset, s)
            assert "IXSCAN" not in _plan(view)
            assert pdata.page(view, s, None) == before[s.mode]
        again = pdata.charts(dataset, pred, gt)
        np.testing.assert_array_equal(
            again.confusion.counts, charts.confusion.counts
        )
        assert again.coverage.text == charts.coverage.text
    finally:
        label_indexes.ensure(dataset, (pred, gt), (sus_source.score_field,))
    assert set(paths) <= set(dataset.list_indexes())


def test_an_index_that_cannot_be_made_is_only_a_warning(
    dataset, monkeypatch, caplog
):
    def refuse(self, *args, **kwargs):
        raise RuntimeError("too many indexes")

    monkeypatch.setattr(fo.Dataset, "create_index", refuse)
    with caplog.at_level("WARNING", logger="prelabel.label_indexes"):
        label_indexes.ensure(dataset, ("not_indexed_yet",))
    assert "not_indexed_yet.id" in caplog.text
    assert "too many indexes" in caplog.text
