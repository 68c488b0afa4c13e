"""Label spreading over the neighbor graph of references and targets, on
real handwritten digits (sklearn's 8x8 scans): it must help where labels
are few, be decided from the references alone (hidden folds), and never
read a target's label."""

import uuid

import fiftyone as fo
import numpy as np
import pytest
from sklearn.datasets import load_digits

import prelabel
from prelabel import constants
from prelabel.core import propagation as prop
from prelabel.core import vectors

K = 15


@pytest.fixture(scope="module")
def arrays():
    digits = load_digits()
    order = np.random.default_rng(1).permutation(len(digits.data))
    return digits.data[order].astype(np.float32), digits.target[order]


def test_spreading_from_few_labels_beats_their_vote(arrays):
    X, y = arrays
    n = 60
    W = vectors.whitened_features(X)
    assert W.shape[0] == len(X)
    np.testing.assert_allclose(np.linalg.norm(W, axis=1), 1.0, atol=1e-5)
    idx, sims = vectors.exact_neighbors(W, k=10)
    assert not np.any(idx == np.arange(len(X))[:, None])  # never itself
    S = prop.graph_operator(idx, sims)
    seeds = np.arange(n)
    F = prop.spread(S, seeds, y[:n], 10, alpha=0.9)
    np.testing.assert_allclose(F.sum(axis=1), 1.0, atol=1e-9)
    spread_acc = (F[n:].argmax(1) == y[n:]).mean()
    # the seeds' own kNN vote (k = 5 of 60) on the same features
    sims_t = W[n:] @ W[:n].T
    nb = np.argsort(-sims_t, axis=1)[:, :5]
    vote = np.array([np.bincount(r, minlength=10).argmax() for r in y[:n][nb]])
    vote_acc = (vote == y[n:]).mean()
    assert spread_acc > vote_acc + 0.02, (vote_acc, spread_acc)
    # seeds keep their labels
    assert np.array_equal(F[:n].argmax(1), y[:n])


def test_the_references_decide_and_score_held_out(arrays):
    X, y = arrays
    n = 100
    W = vectors.whitened_features(X)
    S = prop.graph_operator(*vectors.exact_neighbors(W, k=10))
    choice = prop.choose(S, np.arange(n), y[:n], 10, None, None)
    assert set(choice.accuracy) == {
        c for c in prop.candidates() if not c[1]
    }  # without priors, only the "no prior" candidates are tried
    assert choice.held_out_proba.shape == (n, 10)
    assert choice.helps
    # with priors (here: flat, a useless guess), "no spreading" is tried
    prior = np.full((len(X), 10), 0.1)
    choice = prop.choose(
        S, np.arange(n), y[:n], 10, prior, np.full((n, 10), 0.1)
    )
    assert set(choice.accuracy) == set(prop.candidates())
    assert (0.0, True) in choice.accuracy
    assert choice.accuracy[(0.0, True)] <= 0.2  # a flat prior ranks nothing
    assert choice.helps and not choice.use_prior


def _dataset(X, y, num_train):
    dataset = fo.Dataset(f"prelabel-prop-{uuid.uuid4().hex[:8]}")
    dataset.add_samples(
        [
            fo.Sample(
                filepath=f"/nonexistent/digits/{i:04d}.png",
                embeddings=X[i],
                ground_truth=fo.Classification(label=str(y[i])),
                tags=["train" if i < num_train else "test"],
            )
            for i in range(len(X))
        ],
        progress=False,
    )
    return dataset


def test_propagate_helps_with_few_labels_and_ignores_target_labels(arrays):
    X, y = arrays
    dataset = _dataset(X, y, num_train=80)
    try:
        index = prelabel.sync_index(dataset, progress=False)
        test = dataset.match_tags("test")
        plain = prelabel.preannotate(
            test,
            index=index,
            reference="train",
            k=K,
            eval_key="ev",
            progress=False,
        )
        res = prelabel.preannotate(
            test,
            index=index,
            reference="train",
            k=K,
            propagate=True,
            pred_field="pl_a",
            eval_key="ev",
            progress=False,
        )
        assert res.propagation["alpha"] > 0
        assert res.accuracy > plain.accuracy + 0.02
        # scramble the targets' labels (dataset and index): same output
        ids, truth = test.values(["id", "ground_truth.label"])
        dataset.set_values(
            "ground_truth",
            {
                sid: fo.Classification(label=str((int(t) + 1) % 10))
                for sid, t in zip(ids, truth, strict=True)
            },
            key_field="id",
        )
        prelabel.sync_index(dataset, progress=False)
        again = prelabel.preannotate(
            test,
            index=index,
            reference="train",
            k=K,
            propagate=True,
            pred_field="pl_b",
            progress=False,
        )
        assert again.propagation == res.propagation
        assert test.values(["pl_a.label", "pl_a.confidence"]) == test.values(
            ["pl_b.label", "pl_b.confidence"]
        )
        assert constants.REVIEW_TAG not in dataset.distinct("tags")
    finally:
        dataset.delete()
