"""Pre-annotation by kNN vote, its evaluation, its errors and the mistake
rankings, on real handwritten digits (sklearn's 1,797 8x8 scans, their 64
pixel values as embeddings) in a real Qdrant Edge index, checked against
exact cosine kNN in numpy."""

import uuid

import fiftyone as fo
import fiftyone.brain as fob
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

import prelabel
from prelabel import constants

K = 15
CLASSES = [str(c) for c in range(10)]


def _digits_dataset(n=None, seed=0, num_train=500, extra=None):
    """A dataset of real digits: ``embeddings`` (64 pixels),
    ``ground_truth``, and ``train`` / ``test`` tags on a seeded random
    split. No sample objects stay alive after the call."""
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.data))
    if n is not None:
        order = order[:n]
    dataset = fo.Dataset(f"prelabel-pre-{uuid.uuid4().hex[:8]}")
    samples = []
    for rank, i in enumerate(order):
        fields = dict(
            filepath=f"/nonexistent/digits/{i:04d}.png",
            embeddings=digits.data[i].astype(np.float32),
            ground_truth=fo.Classification(label=str(digits.target[i])),
            tags=["train" if rank < num_train else "test"],
        )
        if extra:
            fields.update(extra(rank, i))
        samples.append(fo.Sample(**fields))
    dataset.add_samples(samples, progress=False)
    return dataset


def _delete(dataset):
    if fo.dataset_exists(dataset.name):
        dataset.delete()


def _unit(vectors):
    mat = np.stack(vectors).astype(np.float64)
    return mat / np.linalg.norm(mat, axis=1, keepdims=True)


def _exact_votes(targets, reference, k=K, leave_one_out=False):
    """Exact cosine kNN majority vote in numpy, with knn.vote's tie rule
    (among the most-voted classes, the larger sum of similarities wins).

    Returns ``{target id: (label, confidence, [neighbor ids])}``.
    """
    t_ids, t_vecs = targets.values(["id", "embeddings"])
    r_ids, r_vecs, r_labels = reference.values(
        ["id", "embeddings", "ground_truth.label"]
    )
    sims = _unit(t_vecs) @ _unit(r_vecs).T
    if leave_one_out:
        pos = {sid: j for j, sid in enumerate(r_ids)}
        for i, sid in enumerate(t_ids):
            if sid in pos:
                sims[i, pos[sid]] = -np.inf
    out = {}
    for i, sid in enumerate(t_ids):
        nb = np.argsort(-sims[i], kind="stable")[:k]
        counts, sums = {}, {}
        for j in nb:
            lbl = r_labels[j]
            counts[lbl] = counts.get(lbl, 0) + 1
            sums[lbl] = sums.get(lbl, 0.0) + sims[i, j]
        top = max(counts.values())
        label = max((c for c in counts if counts[c] == top), key=sums.get)
        out[sid] = (label, top / k, [r_ids[j] for j in nb])
    return out


def _votes_of_the_view(targets, ref, field) -> float:
    """Checks that every pre-label in ``field`` has ``K`` neighbors, all
    from ``ref``; returns the share that agree with exact votes of
    ``ref``."""
    exact = _exact_votes(targets, ref)
    ref_ids = set(ref.values("id"))
    ids, preds = targets.values(["id", field])
    agree = 0
    for sid, pred in zip(ids, preds, strict=True):
        assert len(pred.neighbors) == K
        assert set(pred.neighbors) <= ref_ids
        agree += pred.label == exact[sid][0]
    return agree / len(ids)


def _schema(dataset):
    return sorted(dataset.get_field_schema())


def _no_temporary_fields(dataset):
    return not [f for f in _schema(dataset) if f.startswith("prelabel_tmp")]


# ---- the shared digits dataset ------------------------------------------


@pytest.fixture(scope="module")
def digits():
    """All 1,797 digits, 500 tagged train (seeded), the rest test, synced
    under the brain key "px"."""
    dataset = _digits_dataset()
    results = prelabel.sync_index(
        dataset, brain_key="px", label_field="ground_truth", progress=False
    )
    yield dataset, results
    _delete(dataset)


@pytest.fixture(scope="module")
def full_run(digits):
    """Every test sample pre-annotated by the train samples, evaluated."""
    dataset, results = digits
    gt_before = dataset.values("ground_truth")
    targets = dataset.match_tags("test")
    out = prelabel.preannotate(
        targets,
        index=results,
        reference="train",
        label_field="ground_truth",
        pred_field="pred",
        k=K,
        eval_key="pre_eval",
        progress=False,
    )
    return out, gt_before


def test_preannotate_writes_label_confidence_logits_votes_neighbors(
    digits, full_run
):
    dataset, _ = digits
    out, _ = full_run
    targets = dataset.match_tags("test")
    train_ids = set(dataset.match_tags("train").values("id"))
    assert out.pred_field == "pred"
    assert out.num_targets == len(targets) == 1297
    assert out.num_labeled == out.num_targets and out.num_review == 0
    assert out.classes == CLASSES

    ids, preds = targets.values(["id", "pred"])
    for sid, pred in zip(ids, preds, strict=True):
        assert isinstance(pred, fo.Classification)
        assert pred.label in CLASSES
        assert 0.0 <= pred.confidence <= 1.0
        assert len(pred.logits) == len(CLASSES)
        # the winner has the largest logit (log of the vote share; ties
        # go to the class with the closer voters)
        assert pred.logits[CLASSES.index(pred.label)] == max(pred.logits)
        assert isinstance(pred.votes, str)
        votes = dict(v.split(": ") for v in pred.votes.split(", "))
        counts = {c: int(n) for c, n in votes.items()}
        assert counts[pred.label] == max(counts.values())
        assert counts[pred.label] == round(pred.confidence * K)
        assert len(pred.neighbors) == K
        assert len(set(pred.neighbors)) == K
        assert set(pred.neighbors) <= train_ids
        assert sid not in pred.neighbors
    # nothing outside the targets was written
    assert dataset.match_tags("train").exists("pred").count() == 0


def test_preannotate_accuracy_and_agreement_with_exact_knn(digits, full_run):
    dataset, _ = digits
    targets = dataset.match_tags("test")
    exact = _exact_votes(targets, dataset.match_tags("train"))
    ids, preds, gts = targets.values(["id", "pred", "ground_truth.label"])
    accuracy = np.mean([p.label == g for p, g in zip(preds, gts, strict=True)])
    assert accuracy >= 0.9, accuracy

    same_label = np.mean(
        [p.label == exact[s][0] for s, p in zip(ids, preds, strict=True)]
    )
    assert same_label >= 0.98, same_label
    same_conf = np.mean(
        [
            abs(p.confidence - exact[s][1]) < 1e-6
            for s, p in zip(ids, preds, strict=True)
        ]
    )
    assert same_conf >= 0.98, same_conf
    same_neighbors = np.mean(
        [
            set(p.neighbors) == set(exact[s][2])
            for s, p in zip(ids, preds, strict=True)
        ]
    )
    assert same_neighbors >= 0.95, same_neighbors


def test_preannotate_leaves_ground_truth_unchanged(digits, full_run):
    dataset, _ = digits
    _, gt_before = full_run
    assert dataset.values("ground_truth") == gt_before
    assert _no_temporary_fields(dataset)


def test_eval_key_registers_a_fiftyone_evaluation(digits, full_run):
    dataset, _ = digits
    out, _ = full_run
    assert out.eval_key == "pre_eval"
    assert "pre_eval" in dataset.list_evaluations()
    info = dataset.get_evaluation_info("pre_eval")
    assert info.config.pred_field == "pred"
    assert info.config.gt_field == "ground_truth"
    metrics = dataset.load_evaluation_results("pre_eval").metrics()
    assert out.accuracy == pytest.approx(metrics["accuracy"])
    preds, gts = dataset.match_tags("test").values(
        ["pred.label", "ground_truth.label"]
    )
    mine = np.mean([p == g for p, g in zip(preds, gts, strict=True)])
    assert out.accuracy == pytest.approx(mine)


def test_reference_none_never_votes_for_itself(digits):
    dataset, results = digits
    targets = dataset.match_tags("train")
    out = prelabel.preannotate(
        targets,
        index=results,
        reference=None,
        pred_field="self_pred",
        k=K,
        progress=False,
    )
    try:
        assert out.num_labeled == len(targets)
        exact = _exact_votes(targets, dataset, leave_one_out=True)
        ids, preds = targets.values(["id", "self_pred"])
        agree = 0
        for sid, pred in zip(ids, preds, strict=True):
            assert sid not in pred.neighbors
            assert len(pred.neighbors) == K
            agree += pred.label == exact[sid][0]
        assert agree / len(ids) >= 0.98
    finally:
        dataset.delete_sample_field("self_pred")


@pytest.mark.parametrize("path", ["left out", "marked"])
def test_reference_view_votes_only_from_that_view(digits, monkeypatch, path):
    """A view is selected by leaving out the few labeled points it lacks,
    or by marking its own (any more left out than
    ``EXCLUDE_AT_MOST``): either way only its samples vote."""
    from prelabel import neighbors

    dataset, results = digits
    writes = []
    index_type = type(results.index)
    real = index_type.set_payload

    def set_payload(self, *args, **kwargs):
        writes.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(index_type, "set_payload", set_payload)
    # 1,797 labeled points, 200 in each view: 1,597 left out
    monkeypatch.setattr(
        neighbors, "EXCLUDE_AT_MOST", 2000 if path == "left out" else 1000
    )
    targets = dataset.match_tags("test").limit(150)
    for skip in (0, 250):  # a second view must not see the first one's mark
        ref = dataset.match_tags("train").skip(skip).limit(200)
        prelabel.preannotate(
            targets,
            index=results,
            reference=ref,
            pred_field="view_pred",
            k=K,
            progress=False,
        )
        assert _votes_of_the_view(targets, ref, "view_pred") >= 0.98
    assert bool(writes) == (path == "marked")
    dataset.delete_sample_field("view_pred")


def test_a_view_leaving_out_the_nearest_asks_again(digits, monkeypatch):
    """Left-out points are dropped from the engine's answers, which find
    ``k`` more than asked: a target whose nearest are nearly all left out
    (a view without its class) is asked again with the whole filter, and
    still gets ``K`` neighbors, all from the view, as exact search does."""
    dataset, results = digits
    F = fo.ViewField
    ref = dataset.match(F("ground_truth.label") != "3")
    targets = dataset.match_tags("test").match(F("ground_truth.label") == "3")
    calls = []
    index_type = type(results.index)
    real = index_type.query

    def query(self, vectors, k, filter=None, *args, **kwargs):
        if filter is not None and filter.labeled:  # a reference search
            calls.append((len(vectors), len(filter.exclude_sample_ids)))
        return real(self, vectors, k, filter, *args, **kwargs)

    monkeypatch.setattr(index_type, "query", query)
    prelabel.preannotate(
        targets,
        index=results,
        reference=ref,
        pred_field="no_threes",
        k=K,
        progress=False,
    )
    try:
        left_out = len(dataset) - len(ref)
        # first everyone without the left-out ids, then the short rows
        assert calls[0] == (len(targets), 0)
        assert calls[1][1] == left_out and 0 < calls[1][0] < len(targets)
        assert _votes_of_the_view(targets, ref, "no_threes") >= 0.95
    finally:
        dataset.delete_sample_field("no_threes")


def test_weighted_vote(digits):
    dataset, results = digits
    targets = dataset.match_tags("test").limit(200)
    out = prelabel.preannotate(
        targets,
        index=results,
        reference="train",
        pred_field="w_pred",
        vote="weighted",
        progress=False,
    )
    try:
        assert out.num_labeled == len(targets)
        emb = dict(zip(*dataset.values(["id", "embeddings"]), strict=True))
        lbl = dict(
            zip(*dataset.values(["id", "ground_truth.label"]), strict=True)
        )
        ids, preds, gts = targets.values(
            ["id", "w_pred", "ground_truth.label"]
        )
        for sid, pred in zip(ids, preds, strict=True):
            # the winner's share of the similarity-weighted vote
            q = _unit([emb[sid]])[0]
            sims = _unit([emb[n] for n in pred.neighbors]) @ q
            weights = {}
            for n, s in zip(pred.neighbors, sims, strict=True):
                weights[lbl[n]] = weights.get(lbl[n], 0.0) + max(s, 1e-3)
            best = max(weights, key=weights.get)
            assert pred.label == best
            assert pred.confidence == pytest.approx(
                weights[best] / sum(weights.values()), abs=1e-4
            )
        accuracy = np.mean(
            [p.label == g for p, g in zip(preds, gts, strict=True)]
        )
        assert accuracy >= 0.9
    finally:
        dataset.delete_sample_field("w_pred")


def test_min_confidence_leaves_unsure_targets_for_review(digits):
    dataset, results = digits
    targets = dataset.match_tags("test").limit(300)
    try:
        out = prelabel.preannotate(
            targets,
            index=results,
            reference="train",
            pred_field="sure_pred",
            min_confidence=0.99,
            progress=False,
        )
        ids, preds, tags = targets.values(["id", "sure_pred", "tags"])
        unlabeled = {s for s, p in zip(ids, preds, strict=True) if p is None}
        tagged = {
            s
            for s, t in zip(ids, tags, strict=True)
            if constants.REVIEW_TAG in t
        }
        assert 0 < len(unlabeled) < len(ids)
        assert unlabeled == tagged
        assert out.num_review == len(unlabeled)
        assert out.num_labeled == len(ids) - len(unlabeled)
        assert all(p.confidence >= 0.99 for p in preds if p is not None)
        # nobody outside the targets was tagged
        assert len(dataset.match_tags(constants.REVIEW_TAG)) == len(tagged)
    finally:
        dataset.untag_samples(constants.REVIEW_TAG)
        if dataset.has_sample_field("sure_pred"):
            dataset.delete_sample_field("sure_pred")


def test_rerun_replaces_only_the_pred_field(digits, full_run):
    dataset, results = digits
    other = ["id", "ground_truth", "tags", "pred", "filepath"]
    before = dataset.values(other)
    emb_before = np.stack(dataset.values("embeddings"))
    first = dataset.match_tags("test").limit(300)
    second = dataset.match_tags("test").skip(300).limit(100)
    for targets in (first, second):
        prelabel.preannotate(
            targets,
            index=results,
            reference="train",
            pred_field="again",
            progress=False,
        )
        assert dataset.exists("again").count() == len(targets)
        assert set(dataset.exists("again").values("id")) == set(
            targets.values("id")
        )
    assert dataset.values(other) == before
    np.testing.assert_array_equal(
        np.stack(dataset.values("embeddings")), emb_before
    )
    assert _no_temporary_fields(dataset)
    dataset.delete_sample_field("again")


# ---- mistakes ------------------------------------------------------------


def test_high_confidence_mistakes(digits, full_run):
    dataset, _ = digits
    ids, preds, gts = dataset.values(["id", "pred", "ground_truth.label"])
    wrong = {
        sid: p.confidence
        for sid, p, g in zip(ids, preds, gts, strict=True)
        if p is not None and p.label != g
    }
    assert wrong  # pixels kNN is good, not perfect

    view = prelabel.high_confidence_mistakes(dataset, "pred", "ground_truth")
    got = view.values("id")
    assert sorted(got) == sorted(wrong)
    confs = view.values("pred.confidence")
    assert confs == sorted(confs, reverse=True)
    assert confs == [wrong[s] for s in got]

    view = prelabel.high_confidence_mistakes(
        dataset, "pred", "ground_truth", min_confidence=0.6
    )
    want = {s for s, c in wrong.items() if c >= 0.6}
    assert 0 < len(want) < len(wrong)
    assert set(view.values("id")) == want
    confs = view.values("pred.confidence")
    assert confs == sorted(confs, reverse=True)


def test_find_label_mistakes_ranks_flipped_labels_first():
    digits_data = load_digits()
    n = len(digits_data.data)
    rng = np.random.default_rng(42)
    flipped = set(rng.choice(n, size=int(0.05 * n), replace=False).tolist())
    shift = rng.integers(1, 10, size=n)

    def noisy(rank, i):
        label = int(digits_data.target[i])
        if i in flipped:
            label = (label + int(shift[i])) % 10
        return {"noisy": fo.Classification(label=str(label))}

    dataset = _digits_dataset(extra=noisy)
    try:
        prelabel.sync_index(
            dataset, brain_key="noisy", label_field="noisy", progress=False
        )
        gt_before = dataset.values("noisy")
        out = prelabel.find_label_mistakes(
            dataset,
            index="noisy",
            label_field="noisy",
            k=K,
            progress=False,
        )
        assert out.score_field == "mistake_score"
        assert out.label_field == "mistake_score_label"
        assert out.num_scored == n
        assert dataset.values("noisy") == gt_before
        assert _no_temporary_fields(dataset)

        ids, paths, scores, majority, noisy_labels = dataset.values(
            [
                "id",
                "filepath",
                "mistake_score",
                "mistake_score_label",
                "noisy.label",
            ]
        )
        is_flipped = [
            int(p.rsplit("/", 1)[1].split(".")[0]) in flipped for p in paths
        ]
        assert sum(is_flipped) == len(flipped)
        assert all(0.0 <= s <= 1.0 for s in scores)
        auroc = roc_auc_score(is_flipped, scores)
        assert auroc > 0.9, auroc

        for sid, m in zip(ids, majority, strict=True):
            assert sid not in m.neighbors  # never votes for itself
            assert len(m.neighbors) == K
        assert out.num_disagree == sum(
            m.label != lbl
            for m, lbl in zip(majority, noisy_labels, strict=True)
        )

        # the scores are 1 - the leave-one-out vote share of the own label
        u = _unit(dataset.values("embeddings"))
        sims = u @ u.T
        np.fill_diagonal(sims, -np.inf)
        nb = np.argsort(-sims, axis=1, kind="stable")[:, :K]
        labels = np.array(noisy_labels)
        want = 1.0 - (labels[nb] == labels[:, None]).mean(axis=1)
        assert np.mean(np.abs(np.array(scores) - want) < 1e-6) >= 0.98

        top = prelabel.suspicious_labels(dataset).limit(len(flipped))
        top_paths = top.values("filepath")
        hits = sum(
            int(p.rsplit("/", 1)[1].split(".")[0]) in flipped
            for p in top_paths
        )
        assert hits / len(flipped) >= 0.8
    finally:
        _delete(dataset)


# ---- errors: one ValueError naming the parameter, nothing written -------


@pytest.fixture(scope="module")
def small():
    """150 real digits with a string field, a Detections field, an existing
    pre-label field, a sklearn similarity run and our index."""

    def extra(rank, i):
        return {
            "caption": f"digit {i}",
            "dets": fo.Detections(
                detections=[fo.Detection(label="x", bounding_box=[0, 0, 1, 1])]
            ),
        }

    dataset = _digits_dataset(n=150, num_train=100, extra=extra)
    results = prelabel.sync_index(dataset, brain_key="px", progress=False)
    fob.compute_similarity(
        dataset, embeddings="embeddings", backend="sklearn", brain_key="skl"
    )
    prelabel.preannotate(
        dataset.match_tags("test"),
        index=results,
        reference="train",
        pred_field="prev",
        progress=False,
    )
    yield dataset, results
    _delete(dataset)


def _kwargs(results, **kwargs):
    base = dict(
        index=results,
        reference="train",
        label_field="ground_truth",
        pred_field="prelabel",
        k=5,
        progress=False,
    )
    base.update(kwargs)
    return base


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"reference": "nonexistent_tag"}, "reference.*nonexistent_tag"),
        ({"k": 101}, "k=101"),
        ({"k": 0}, "k must"),
        ({"label_field": "caption"}, "label_field='caption'"),
        ({"label_field": "dets"}, "label_field='dets'"),
        ({"pred_field": "ground_truth"}, "pred_field='ground_truth'"),
        ({"pred_field": "caption"}, "pred_field='caption'.*overwrite=True"),
        ({"pred_field": "dets"}, "pred_field='dets'.*overwrite=True"),
        ({"pred_field": "not a name"}, "pred_field='not a name'"),
        ({"index": "nope"}, "brain_key='nope'"),
        ({"index": None, "brain_key": "nope"}, "brain_key='nope'"),
        ({"index": "skl"}, "brain_key='skl'.*another backend"),
        ({"vote": "loudest"}, "vote='loudest'"),
        ({"min_confidence": 1.5}, "min_confidence"),
        ({"eval_key": "bad key"}, "eval_key='bad key'"),
    ],
)
def test_bad_input_raises_value_error_and_writes_nothing(small, kwargs, match):
    dataset, results = small
    schema = _schema(dataset)
    prev = dataset.values("prev")
    with pytest.raises(ValueError, match=match):
        prelabel.preannotate(
            dataset.match_tags("test"), **_kwargs(results, **kwargs)
        )
    assert _schema(dataset) == schema
    assert dataset.values("prev") == prev
    assert dataset.list_evaluations() == []


def test_sync_rejects_label_fields_that_are_not_classifications(small):
    dataset, _ = small
    for field, kind in (("caption", "StringField"), ("dets", "Detections")):
        with pytest.raises(ValueError, match=f"label_field='{field}'.*{kind}"):
            prelabel.sync_index(
                dataset, brain_key="bad", label_field=field, progress=False
            )
    assert "bad" not in dataset.list_brain_runs()


def test_failure_half_way_keeps_the_previous_pred_field(small, monkeypatch):
    dataset, results = small
    schema = _schema(dataset)
    prev = dataset.values("prev")
    index = results.index
    real = index.query
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("qdrant went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(index, "query", flaky)
    with pytest.raises(RuntimeError, match="went away"):
        prelabel.preannotate(
            dataset.match_tags("test"),
            **_kwargs(results, pred_field="prev", batch_size=10),
        )
    assert len(calls) == 2
    assert dataset.values("prev") == prev
    assert _schema(dataset) == schema
    assert _no_temporary_fields(dataset)

    calls.clear()
    with pytest.raises(RuntimeError, match="went away"):
        prelabel.find_label_mistakes(
            dataset, index=results, k=5, batch_size=20, progress=False
        )
    assert _schema(dataset) == schema


@pytest.fixture
def tiny():
    dataset = _digits_dataset(n=60, num_train=40)
    results = prelabel.sync_index(dataset, brain_key="px", progress=False)
    yield dataset, results
    _delete(dataset)


def test_targets_without_embeddings(tiny):
    dataset, results = tiny
    dataset.add_samples(
        [
            fo.Sample(filepath=f"/nonexistent/new/{i}.png", tags=["new"])
            for i in range(3)
        ],
        progress=False,
    )
    with pytest.raises(ValueError, match="3 targets have no 'embeddings'"):
        prelabel.preannotate(dataset, **_kwargs(results))
    with pytest.raises(ValueError, match="embeddings_field='embeddings'"):
        prelabel.preannotate(dataset.match_tags("new"), **_kwargs(results))
    assert not dataset.has_sample_field("prelabel")


def test_targets_of_another_dimension(tiny):
    dataset, results = tiny
    dataset.add_samples(
        [
            fo.Sample(
                filepath=f"/nonexistent/short/{i}.png",
                embeddings=np.ones(32, dtype=np.float32),
                tags=["short"],
            )
            for i in range(3)
        ],
        progress=False,
    )
    with pytest.raises(ValueError, match="'embeddings' are 32-d.*64-d"):
        prelabel.preannotate(dataset.match_tags("short"), **_kwargs(results))
    assert not dataset.has_sample_field("prelabel")


def test_embeddings_field_that_no_longer_exists(tiny):
    dataset, results = tiny
    dataset.delete_sample_field("embeddings")
    with pytest.raises(ValueError, match="embeddings_field='embeddings'"):
        prelabel.preannotate(dataset.match_tags("test"), **_kwargs(results))
    with pytest.raises(ValueError, match="embeddings_field='embeddings'"):
        prelabel.find_label_mistakes(dataset, index=results, progress=False)
    assert not dataset.has_sample_field("prelabel")


def test_label_field_whose_type_changed_since_the_sync(tiny):
    dataset, results = tiny
    dataset.delete_sample_field("ground_truth")
    dataset.add_sample_field("ground_truth", fo.StringField)
    with pytest.raises(
        ValueError, match="label_field='ground_truth'.*StringField"
    ):
        prelabel.preannotate(dataset.match_tags("test"), **_kwargs(results))
    assert not dataset.has_sample_field("prelabel")


def test_the_same_reference_view_is_marked_once(digits, monkeypatch):
    """Marking a view writes payloads, which takes the points out of the
    engine's graph: a large marking rebuilds it, and the same view again
    writes nothing (and votes the same)."""
    from prelabel import neighbors

    dataset, results = digits
    index_type = type(results.index)
    calls = {"set_payload": 0, "optimize": 0}
    for name in calls:
        real = getattr(index_type, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(index_type, name, counted)
    listings = []
    real_iter = index_type.iter_payloads

    def iter_payloads(self, keys, filter=None, *args, **kwargs):
        if filter is not None and set(filter.sample_ids or ()) == ref_ids:
            listings.append(1)  # which of the references are present
        return real_iter(self, keys, filter, *args, **kwargs)

    monkeypatch.setattr(index_type, "iter_payloads", iter_payloads)
    monkeypatch.setattr(neighbors, "REINDEX_AFTER_MARKING", 100)
    monkeypatch.setattr(neighbors, "EXCLUDE_AT_MOST", 0)
    targets = dataset.match_tags("test").limit(50)
    ref = dataset.match_tags("train").skip(100).limit(300)
    ref_ids = set(ref.values("id"))
    labels = []
    for _ in range(2):
        prelabel.preannotate(
            targets,
            index=results,
            reference=ref,
            pred_field="marked_once",
            k=K,
            overwrite=True,
            progress=False,
        )
        labels.append(targets.values("marked_once.label"))
    assert calls == {"set_payload": 1, "optimize": 1}
    # the second run counts the marked points instead of listing them
    assert len(listings) == 1
    assert labels[0] == labels[1]
    dataset.delete_sample_field("marked_once")


def test_reference_view_with_samples_not_in_the_index(tiny):
    """A reference view may hold labeled samples the index does not have
    yet (no embedding, or embedded after the last sync): they cannot vote,
    the others do."""
    dataset, results = tiny
    indexed = set(dataset.match_tags("train").values("id"))
    dataset.add_samples(
        [
            fo.Sample(
                filepath="/nonexistent/late/0.png",
                ground_truth=fo.Classification(label="3"),
                tags=["train"],
            ),
            fo.Sample(
                filepath="/nonexistent/late/1.png",
                embeddings=np.ones(64, dtype=np.float32),
                ground_truth=fo.Classification(label="3"),
                tags=["train"],
            ),
        ],
        progress=False,
    )
    out = prelabel.preannotate(
        dataset.match_tags("test"),
        **_kwargs(results, reference=dataset.match_tags("train")),
    )
    assert out.num_labeled == len(dataset.match_tags("test"))
    for pred in dataset.match_tags("test").values("prelabel"):
        assert len(pred.neighbors) == 5
        assert set(pred.neighbors) <= indexed
