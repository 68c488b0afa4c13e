"""Embeddings adapted to the labels: learned from the references only, on
real handwritten digits (sklearn's 8x8 scans, 64 pixel values as the
frozen embeddings): they must make kNN better than the raw vectors, never
depend on a target's label, survive a save/load, and drive
``preannotate(mode="adapted")`` and ``find_label_mistakes(method=
"adapted")`` through a real Qdrant Edge index."""

import os
import uuid

import fiftyone as fo
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

import prelabel
from prelabel import adapt, constants
from prelabel.core import adapter as core_adapter
from prelabel.core import calibration

K = 15


@pytest.fixture(scope="module")
def arrays():
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.data))
    X = digits.data[order].astype(np.float32)
    y = np.array([str(v) for v in digits.target[order]])
    return X, y


def _knn_accuracy(R, yr, T, yt, k=K):
    R = R / np.linalg.norm(R, axis=1, keepdims=True)
    T = T / np.linalg.norm(T, axis=1, keepdims=True)
    nb = np.argsort(-(T @ R.T), axis=1)[:, :k]
    pred = []
    for row in yr[nb]:
        vals, counts = np.unique(row, return_counts=True)
        pred.append(vals[counts.argmax()])
    return float((np.array(pred) == yt).mean())


def test_adapted_embeddings_beat_raw_ones_for_knn(arrays):
    X, y = arrays
    n = 300
    ad = core_adapter.fit_adapter(X[:n], y[:n], X_unlabeled=X[n:], folds=5)
    V = ad.transform(X)
    assert V.shape == (len(X), ad.dim) and V.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(V, axis=1), 1.0, atol=1e-5)
    raw = _knn_accuracy(X[:n], y[:n], X[n:], y[n:])
    adapted = _knn_accuracy(V[:n], y[:n], V[n:], y[n:])
    assert adapted >= raw + 0.02, (raw, adapted)
    # the learned classifier, read off the adapted vectors
    proba = ad.proba(V[n:])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)
    head_acc = (np.array(ad.classes)[proba.argmax(1)] == y[n:]).mean()
    assert head_acc >= raw


def test_cross_fitting_scores_each_reference_without_its_label(arrays):
    X, y = arrays
    n = 300
    ad = core_adapter.fit_adapter(X[:n], y[:n], folds=5)
    assert sorted(set(ad.folds.tolist())) == [0, 1, 2, 3, 4]
    classes = np.array(ad.classes)
    oof = core_adapter.cross_fitted_proba(ad, X[:n], ad.folds)
    in_sample = ad.proba(ad.transform(X[:n]))
    oof_acc = (classes[oof.argmax(1)] == y[:n]).mean()
    in_acc = (classes[in_sample.argmax(1)] == y[:n]).mean()
    target_acc = (
        classes[ad.proba(ad.transform(X[n:])).argmax(1)] == y[n:]
    ).mean()
    # in-sample scores flatter; held-out ones are honest
    assert in_acc > oof_acc
    assert abs(oof_acc - target_acc) < 0.05
    # a reference's neighbors come from the other folds
    nb, sims = core_adapter.cross_fitted_neighbors(ad, X[:n], ad.folds, K)
    assert nb.shape == (n, K) and np.all(nb >= 0)
    assert np.all(ad.folds[nb] != ad.folds[:, None])
    assert np.all(np.diff(sims, axis=1) <= 1e-6)


def _dataset(X, y, num_train):
    dataset = fo.Dataset(f"prelabel-adapt-{uuid.uuid4().hex[:8]}")
    dataset.add_samples(
        [
            fo.Sample(
                filepath=f"/nonexistent/digits/{i:04d}.png",
                embeddings=X[i],
                ground_truth=fo.Classification(label=y[i]),
                tags=["train" if i < num_train else "test"],
            )
            for i in range(len(X))
        ],
        progress=False,
    )
    return dataset


@pytest.fixture(scope="module")
def digits_ds(arrays):
    X, y = arrays
    dataset = _dataset(X[:900], y[:900], num_train=300)
    yield dataset
    if fo.dataset_exists(dataset.name):
        dataset.delete()


def test_adapt_embeddings_never_reads_target_labels(digits_ds):
    dataset = digits_ds
    res = prelabel.adapt_embeddings(
        dataset,
        reference="train",
        embeddings_field="embeddings",
        out_field="emb_a",
        progress=False,
    )
    assert res.num_reference == 300 and res.num_written == len(dataset)
    assert res.dim == dataset.first()["emb_a"].shape[0]
    assert os.path.isfile(res.path)
    assert dataset.get_field("emb_a").info["adapted_from"] == "embeddings"
    before = np.stack(dataset.values("emb_a"))
    # the saved adapter reproduces the field
    loaded = adapt.load_adapter(dataset, "emb_a")
    np.testing.assert_allclose(
        loaded.transform(np.stack(dataset.values("embeddings"))),
        before,
        atol=1e-5,
    )

    test = dataset.match_tags("test")
    ids, truth = test.values(["id", "ground_truth.label"])
    wrong = {
        sid: fo.Classification(label=str((int(t) + 3) % 10))
        for sid, t in zip(ids, truth, strict=True)
    }
    dataset.set_values("ground_truth", wrong, key_field="id")
    try:
        prelabel.adapt_embeddings(
            dataset,
            reference="train",
            embeddings_field="embeddings",
            out_field="emb_b",
            progress=False,
        )
    finally:
        dataset.set_values(
            "ground_truth",
            {
                sid: fo.Classification(label=t)
                for sid, t in zip(ids, truth, strict=True)
            },
            key_field="id",
        )
    np.testing.assert_array_equal(np.stack(dataset.values("emb_b")), before)
    # the files live outside the database: delete them with the records
    assert adapt.delete_adapters(dataset, "emb_b") == 1
    assert os.path.isfile(res.path)
    assert adapt.adapter_record(dataset, "emb_b") is None
    assert adapt.delete_adapters(dataset) == 1
    assert not os.path.exists(os.path.dirname(res.path))


def test_adapt_embeddings_says_what_is_wrong(digits_ds):
    with pytest.raises(ValueError, match="out_field"):
        prelabel.adapt_embeddings(
            digits_ds, embeddings_field="embeddings", out_field="embeddings"
        )
    with pytest.raises(ValueError, match="reference set"):
        prelabel.adapt_embeddings(
            digits_ds, reference="nope", embeddings_field="embeddings"
        )


def test_preannotate_adapted_mode_in_one_call(digits_ds):
    dataset = digits_ds
    index = prelabel.sync_index(
        dataset, embeddings_field="embeddings", progress=False
    )
    test = dataset.match_tags("test")
    plain = prelabel.preannotate(
        test, index=index, reference="train", eval_key="ev", progress=False
    )
    res = prelabel.preannotate(
        test,
        index=index,
        reference="train",
        mode="adapted",
        target_precision=0.98,
        eval_key="ev",
        progress=False,
    )
    assert res.mode == "adapted" and res.calibrated
    assert res.brain_key == f"{constants.DEFAULT_BRAIN_KEY}_adapted"
    assert res.brain_key in dataset.list_brain_runs()
    assert dataset.has_sample_field("embeddings_adapted")
    assert res.accuracy >= plain.accuracy
    assert res.expected_coverage > 0 and res.num_accepted > 0
    # the same references: the adapter is reused, not learned again
    path = adapt.adapter_record(dataset, "embeddings_adapted")["path"]
    stamp = os.path.getmtime(path)
    again = prelabel.preannotate(
        test,
        index=index,
        reference="train",
        mode="adapted",
        progress=False,
    )
    assert os.path.getmtime(path) == stamp
    assert again.num_targets == res.num_targets
    # the adapted index used directly also votes with its classifier
    direct = prelabel.preannotate(
        test,
        index=res.brain_key,
        reference="train",
        eval_key="ev",
        progress=False,
    )
    assert direct.mode == "knn" and direct.accuracy >= plain.accuracy
    assert test.first()["prelabel"].has_field("vote_share")
    dataset.untag_samples("needs_review")


def test_one_click_refuses_an_adapted_field_it_did_not_write(arrays):
    X, y = arrays
    dataset = _dataset(X[:200], y[:200], num_train=100)
    try:
        prelabel.sync_index(
            dataset, embeddings_field="embeddings", progress=False
        )
        # a person's vectors under the name the adapted field takes
        dataset.set_values("embeddings_adapted", [np.ones(4)] * 200)
        with pytest.raises(ValueError, match="adapt_index") as err:
            prelabel.preannotate(
                dataset.match_tags("test"),
                reference="train",
                mode="adapted",
                pred_field="pre",
                overwrite=True,
                progress=False,
            )
        assert "embeddings_adapted" in str(err.value)
        assert not dataset.has_sample_field("pre")
        assert (dataset.values("embeddings_adapted")[0] == 1).all()
    finally:
        dataset.delete()


def test_accept_score_is_chosen_on_the_references(digits_ds, monkeypatch):
    """In adapted mode the references pick what ranks pre-labels for
    acceptance; forced to the product, the written raw confidence is the
    adapted score times the frozen vote's share of the adapted label."""
    dataset = digits_ds
    index = prelabel.sync_index(
        dataset, embeddings_field="embeddings", progress=False
    )
    test = dataset.match_tags("test")
    prelabel.preannotate(
        test,
        index=index,
        reference="train",
        pred_field="plain",
        progress=False,
    )
    kwargs = dict(
        index=index,
        reference="train",
        mode="adapted",
        target_precision=0.98,
        progress=False,
    )
    res = prelabel.preannotate(test, pred_field="free", **kwargs)
    assert res.accept_score in ("adapted", "adapted x frozen vote")
    run = dataset.info["prelabel_runs"]["free"]
    assert run["accept_score"] == res.accept_score

    picked = []

    def forced(name):
        def choose(candidates, correct, target):
            picked.append(sorted(candidates))
            return name

        return choose

    monkeypatch.setattr(calibration, "choose_score", forced("adapted"))
    alone = prelabel.preannotate(test, pred_field="alone", **kwargs)
    product = "adapted x frozen vote"
    monkeypatch.setattr(calibration, "choose_score", forced(product))
    both = prelabel.preannotate(test, pred_field="both", **kwargs)
    assert picked == [["adapted", product]] * 2
    assert (alone.accept_score, both.accept_score) == ("adapted", product)
    classes = dataset.info["prelabel_runs"]["plain"]["classes"]
    rows = zip(*test.values(["alone", "both", "plain"]), strict=True)
    for a, b, p in rows:
        assert a.label == b.label  # labels never change
        # the plain vote's share of that label, from its logits
        smoothed = np.exp(np.asarray(p.logits, dtype=np.float64))
        share = smoothed * (1 + 1e-3 * len(classes)) - 1e-3
        share = share[classes.index(b.label)]
        assert b.raw_confidence == pytest.approx(
            a.raw_confidence * share, abs=1e-5
        )
    dataset.untag_samples("needs_review")


def test_choose_score_prefers_the_one_that_keeps_the_precision():
    rng = np.random.default_rng(0)
    correct = rng.uniform(size=4000) < 0.9
    # "flat": wrong ones spread evenly over the top: never 99 % precise
    flat = rng.uniform(size=correct.size)
    # "sharp": the wrong ones rank last
    sharp = np.where(correct, 1.0, 0.0) * rng.uniform(0.5, 1, correct.size)
    cands = {"flat": flat, "sharp": sharp}
    assert calibration.choose_score(cands, correct, 0.99) == "sharp"
    # a tie (both accept everything at a low target) keeps the first
    assert calibration.choose_score(cands, correct, 0.5) == "flat"


def test_adapted_label_mistakes_beat_the_plain_vote(arrays):
    X, y = arrays
    n = 900
    rng = np.random.default_rng(0)
    flipped = rng.uniform(size=n) < 0.1
    noisy = y[:n].copy()
    for i in np.flatnonzero(flipped):
        noisy[i] = str((int(noisy[i]) + rng.integers(1, 10)) % 10)
    dataset = _dataset(X[:n], noisy, num_train=n)
    try:
        index = prelabel.sync_index(dataset, progress=False)
        aucs = {}
        for method in ("loo", "adapted"):
            res = prelabel.find_label_mistakes(
                dataset,
                index=index,
                k=K,
                score_field=f"s_{method}",
                method=method,
                progress=False,
            )
            assert res.num_scored == n
            score = np.array(dataset.values(f"s_{method}"), dtype=float)
            aucs[method] = roc_auc_score(flipped, score)
        assert aucs["adapted"] >= aucs["loo"] - 0.005, aucs
        assert aucs["adapted"] > 0.95, aucs
        doc = dataset.first()["s_adapted_label"]
        assert doc.label in set(y) and len(doc.neighbors) == K
    finally:
        dataset.delete()
