"""The kNN vote and the leave-one-out scores, on cases checked by hand."""

import numpy as np
import pytest

from prelabel.core.voting import Votes, own_label_scores, vote

NAN = np.nan
ABC = ["a", "b", "c"]
DIGITS = [str(d) for d in range(10)]


def test_majority_winner_and_confidence_is_votes_over_k():
    votes = vote(
        [["a", "b", "a", "c", "a"], ["c", "c", "b", "c", "c"]],
        np.array([[0.9, 0.8, 0.7, 0.6, 0.5], [0.9, 0.8, 0.7, 0.6, 0.5]]),
        ABC,
        k=5,
    )
    assert votes.classes == ABC
    assert votes.labels == ["a", "c"]
    np.testing.assert_allclose(votes.confidence, [3 / 5, 4 / 5])
    np.testing.assert_array_equal(votes.counts, [[3, 1, 1], [0, 1, 4]])
    np.testing.assert_allclose(votes.probs, [[0.6, 0.2, 0.2], [0.0, 0.2, 0.8]])


def test_only_the_first_k_neighbors_vote():
    # the two trailing "b" would win if they voted
    votes = vote(
        [["a", "a", "b", "b", "b"]],
        np.array([[0.9, 0.8, 0.7, 0.6, 0.5]]),
        ABC,
        k=3,
    )
    assert votes.labels == ["a"]
    np.testing.assert_allclose(votes.confidence, [2 / 3])
    np.testing.assert_array_equal(votes.counts, [[2, 1, 0]])


def test_majority_tie_goes_to_the_more_similar_voters():
    labels = [["a", "b", "b", "a"], ["a", "b", "b", "a"]]
    sims = np.array(
        [
            # a: 0.9 + 0.3 = 1.2, b: 0.8 + 0.7 = 1.5 -> b, though a is closest
            [0.9, 0.8, 0.7, 0.3],
            # a: 0.9 + 0.8 = 1.7, b: 0.5 + 0.4 = 0.9 -> a
            [0.9, 0.5, 0.4, 0.8],
        ]
    )
    votes = vote(labels, sims, ABC, k=4)
    assert votes.labels == ["b", "a"]
    np.testing.assert_allclose(votes.confidence, [0.5, 0.5])
    # the same voters in the other class order: the winner does not move
    votes = vote(labels, sims, ["b", "a"], k=4)
    assert votes.labels == ["b", "a"]


def test_majority_tie_break_never_outweighs_a_vote():
    # dot-product scores are unbounded: a single very close voter must
    # not beat two voters
    votes = vote([["b", "a", "a"]], np.array([[5000.0, 1.0, 1.0]]), ABC, 3)
    assert votes.labels == ["a"]
    np.testing.assert_allclose(votes.confidence, [2 / 3])
    # negative similarities (cosine of far points) break ties the same way
    votes = vote([["a", "b"]], np.array([[-0.2, -0.1]]), ABC, 2)
    assert votes.labels == ["b"]


def test_weighted_vote_shares():
    labels = [["a", "b", "b"]]
    sims = np.array([[0.9, 0.3, 0.3]])
    # majority: b has two voters
    assert vote(labels, sims, ABC, 3).labels == ["b"]
    # weighted: a 0.9, b 0.6 -> a with 0.6 of the weight
    votes = vote(labels, sims, ABC, 3, method="weighted")
    assert votes.labels == ["a"]
    np.testing.assert_allclose(votes.confidence, [0.6])
    np.testing.assert_allclose(votes.probs, [[0.6, 0.4, 0.0]])
    np.testing.assert_array_equal(votes.counts, [[1, 2, 0]])


def test_weighted_vote_floors_far_neighbors():
    # a negative similarity still counts a little (floor 1e-3)
    votes = vote(
        [["a", "b"]], np.array([[0.5, -0.2]]), ABC, 2, method="weighted"
    )
    assert votes.labels == ["a"]
    np.testing.assert_allclose(votes.probs, [[0.5 / 0.501, 0.001 / 0.501, 0]])
    np.testing.assert_allclose(votes.confidence, [0.5 / 0.501])


def test_neighbors_without_label_or_outside_classes_are_ignored():
    votes = vote(
        [[None, "z", "a", "b", "a"]],
        np.array([[0.99, 0.98, 0.5, 0.4, 0.3]]),
        ["a", "b"],
        k=5,
    )
    assert votes.labels == ["a"]
    np.testing.assert_array_equal(votes.counts, [[2, 1]])
    # confidence is the winner's share of the neighbors that voted
    np.testing.assert_allclose(votes.confidence, [2 / 3])
    np.testing.assert_allclose(votes.probs.sum(axis=1), [1.0])

    weighted = vote(
        [[None, "z", "a", "b", "a"]],
        np.array([[0.99, 0.98, 0.5, 0.4, 0.3]]),
        ["a", "b"],
        k=5,
        method="weighted",
    )
    np.testing.assert_allclose(weighted.probs, [[0.8 / 1.2, 0.4 / 1.2]])


def test_fewer_than_k_neighbors():
    # NaN-padded similarities: row 0 found two neighbors, row 1 three
    votes = vote(
        [["a", "a"], ["b", "a", "b"]],
        np.array([[0.9, 0.8, NAN, NAN, NAN], [0.9, 0.8, 0.7, NAN, NAN]]),
        ABC,
        k=5,
    )
    assert votes.labels == ["a", "b"]
    np.testing.assert_array_equal(votes.counts, [[2, 0, 0], [1, 2, 0]])
    np.testing.assert_allclose(votes.confidence, [1.0, 2 / 3])


def test_similarities_narrower_than_k_are_padded():
    votes = vote([["b", "b"]], np.array([[0.9, 0.8]]), ABC, k=15)
    assert votes.labels == ["b"]
    np.testing.assert_array_equal(votes.counts, [[0, 2, 0]])
    np.testing.assert_allclose(votes.confidence, [1.0])


def test_a_label_without_a_similarity_does_not_vote():
    votes = vote([["a", "b", "b"]], np.array([[0.9, NAN, NAN]]), ABC, k=3)
    assert votes.labels == ["a"]
    np.testing.assert_array_equal(votes.counts, [[1, 0, 0]])


@pytest.mark.parametrize("method", ["majority", "weighted"])
def test_no_neighbor_gives_no_label(method):
    votes = vote(
        [[], [None, "z"], ["c"]],
        np.array([[NAN, NAN], [0.9, 0.8], [0.5, NAN]]),
        ABC,
        k=2,
        method=method,
    )
    assert votes.labels == [None, None, "c"]
    np.testing.assert_allclose(votes.confidence, [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(votes.counts[:2], 0)
    np.testing.assert_array_equal(votes.probs[:2], 0.0)
    assert votes.summary(0) == ""


def test_no_query_at_all():
    votes = vote([], np.zeros((0, 3)), ABC, k=3)
    assert votes.labels == []
    assert votes.confidence.shape == (0,)
    assert votes.probs.shape == (0, 3)


def test_summary_reads_like_a_person_would():
    votes = vote(
        [["7"] * 12 + ["1"] * 3, ["3", "3", "8"]],
        np.linspace(0.99, 0.5, 15)[None, :].repeat(2, axis=0),
        DIGITS,
        k=15,
    )
    assert votes.labels == ["7", "3"]
    np.testing.assert_allclose(votes.confidence, [12 / 15, 2 / 3])
    assert votes.summary(0) == "7: 12, 1: 3"
    assert votes.summary(0, top=1) == "7: 12"
    assert votes.summary(1) == "3: 2, 8: 1"


@pytest.mark.parametrize("method", ["majority", "weighted"])
def test_logits_are_a_log_distribution_with_the_winner_on_top(method):
    rng = np.random.default_rng(0)
    labels = [
        list(rng.choice(DIGITS, size=15, p=_skewed(i))) for i in range(50)
    ]
    sims = np.sort(rng.uniform(0.2, 1.0, size=(50, 15)), axis=1)[:, ::-1]
    votes = vote(labels, sims, DIGITS, k=15, method=method)
    logits = votes.logits()
    assert logits.shape == (50, 10)
    assert logits.dtype == np.float32
    assert np.all(np.isfinite(logits))
    np.testing.assert_allclose(np.exp(logits).sum(axis=1), 1.0, rtol=1e-5)
    # argmax of the logits is the winner (ties aside, where the logits are
    # equal and only the similarities tell the classes apart)
    top = np.sort(votes.probs, axis=1)
    clear = top[:, -1] > top[:, -2]
    assert clear.sum() > 40
    winners = np.array([DIGITS.index(lbl) for lbl in votes.labels])
    np.testing.assert_array_equal(logits.argmax(axis=1)[clear], winners[clear])
    # a larger share never gets a smaller logit
    for p, lg in zip(votes.probs, logits, strict=True):
        order = np.argsort(p, kind="stable")
        assert np.all(np.diff(lg[order]) >= -1e-6)


def _skewed(i):
    p = np.full(10, 0.02)
    p[i % 10] = 0.82
    return p / p.sum()


def test_own_label_scores():
    votes = vote(
        [["a", "a", "a", "b"], ["a", "b", "b", "b"], ["c", "c", "c", "c"]],
        np.full((3, 4), 0.5),
        ABC,
        k=4,
    )
    scores = own_label_scores(votes, ["a", "a", "zzz"])
    # 1 - 3/4 for a sample agreeing with its neighbors, 1 - 1/4 for one
    # that does not, 1.0 for a label no neighbor can vote for
    np.testing.assert_allclose(scores, [0.25, 0.75, 1.0])
    assert np.all((scores >= 0) & (scores <= 1))
    np.testing.assert_allclose(
        own_label_scores(votes, ["b", "b", "c"]), [0.75, 0.25, 0.0]
    )


def test_own_label_scores_weighted_and_without_neighbors():
    votes = vote(
        [["a", "b", "b"], []],
        np.array([[0.9, 0.3, 0.3], [NAN, NAN, NAN]]),
        ABC,
        k=3,
        method="weighted",
    )
    np.testing.assert_allclose(own_label_scores(votes, ["a", "a"]), [0.4, 1.0])


def test_votes_is_a_plain_record():
    votes = Votes(
        classes=["x", "y"],
        labels=["y"],
        confidence=np.array([0.75]),
        probs=np.array([[0.25, 0.75]]),
        counts=np.array([[1, 3]]),
    )
    assert votes.summary(0) == "y: 3, x: 1"
    np.testing.assert_allclose(own_label_scores(votes, ["x"]), [0.75])


@pytest.mark.parametrize("method", ["knn", "Majority", "", None])
def test_bad_method_raises(method):
    with pytest.raises(ValueError, match="not supported"):
        vote([["a"]], np.array([[0.5]]), ABC, k=1, method=method)


@pytest.mark.parametrize("k", [0, -3])
def test_k_below_one_raises(k):
    with pytest.raises(ValueError, match="k must be at least 1"):
        vote([["a"]], np.array([[0.5]]), ABC, k=k)


def test_no_classes_gives_no_label():
    votes = vote([["a", "b"]], np.array([[0.9, 0.8]]), [], k=2)
    assert votes.labels == [None]
    np.testing.assert_allclose(votes.confidence, [0.0])
    assert votes.probs.shape == (1, 0)
