"""Voting over nearest neighbors: pure numpy, no FiftyOne, no index.

The inputs are what an index query returns: for each query the labels of
its neighbors (closest first) and their similarities. The outputs are a
label, a confidence and the vote distribution per query.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from prelabel.constants import VOTES


def natural_key(label: str):
    """Sorts class names as a person reads them: ``"2"`` before ``"10"``."""
    return (0, int(label)) if label.isdigit() else (1, label)


def sort_classes(labels) -> list[str]:
    """The distinct labels (None dropped) in natural order."""
    return sorted({lbl for lbl in labels if lbl is not None}, key=natural_key)


def summarize(classes, counts_row, winner: int | None, top: int = 3) -> str:
    """A vote as a person reads it: ``"7: 12, 1: 3"``, the winner first
    (even when it won a tie on similarity), classes without votes left
    out."""
    order = list(np.argsort(-counts_row, kind="stable")[:top])
    if winner is not None:
        order = [winner] + [c for c in order if c != winner][: top - 1]
    return ", ".join(
        f"{classes[c]}: {counts_row[c]}" for c in order if counts_row[c] > 0
    )


@dataclass
class Votes:
    """The outcome of a vote for ``n`` queries over ``C`` classes.

    Attributes:
        classes: the class names, in column order
        labels: the winning label per query (``None`` with no neighbor)
        confidence: float array (n,) in [0, 1], the winner's share
        probs: float array (n, C), the vote distribution (rows sum to 1,
            or 0 with no neighbor)
        counts: int array (n, C), neighbors per class
    """

    classes: list[str]
    labels: list[str | None]
    confidence: np.ndarray
    probs: np.ndarray
    counts: np.ndarray

    def summary(self, i: int, top: int = 3) -> str:
        """The vote of query ``i`` as a person reads it: ``"7: 12, 1: 3"``."""
        winner = self.labels[i]
        w = self.classes.index(winner) if winner is not None else None
        return summarize(self.classes, self.counts[i], w, top)

    def logits(self, eps: float = 1e-3) -> np.ndarray:
        """Log of the smoothed distribution, for FiftyOne's ``logits``."""
        return logits(self.probs, eps)


def encode(
    neighbor_labels: Sequence[Sequence[str | None]],
    classes: Sequence[str],
    k: int,
) -> np.ndarray:
    """Class indices (n, k) of the neighbors; -1 where missing or unknown."""
    lookup = {c: i for i, c in enumerate(classes)}
    out = np.full((len(neighbor_labels), k), -1, dtype=np.int64)
    for i, row in enumerate(neighbor_labels):
        for j, label in enumerate(row[:k]):
            out[i, j] = lookup.get(label, -1)
    return out


def vote(
    neighbor_labels: Sequence[Sequence[str | None]],
    similarities: np.ndarray,
    classes: Sequence[str],
    k: int,
    method: str = "majority",
) -> Votes:
    """Votes of the first ``k`` neighbors of each query.

    ``majority``: one vote per neighbor; confidence = winning votes / number
    of neighbors. Ties go to the class whose voters are more similar.
    ``weighted``: each neighbor votes with its similarity (clipped at a small
    positive floor, so a far neighbor still counts a little); confidence =
    the winner's share of the total weight.

    Args:
        neighbor_labels: per query, the neighbors' labels, closest first
        similarities: array (n, >= k) of similarities (higher = closer),
            NaN where no neighbor
        classes: the class names; labels outside it are ignored
        k: how many neighbors vote
        method ("majority"): ``"majority"`` or ``"weighted"``

    Returns:
        a :class:`Votes`
    """
    if method not in VOTES:
        raise ValueError(f"vote={method!r} is not supported; use {VOTES}")
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}")
    classes = list(classes)
    n, num_classes = len(neighbor_labels), len(classes)
    codes = encode(neighbor_labels, classes, k)
    sims = np.asarray(similarities, dtype=np.float64)[:, :k]
    if sims.shape[1] < codes.shape[1]:
        sims = np.pad(
            sims,
            ((0, 0), (0, codes.shape[1] - sims.shape[1])),
            constant_values=np.nan,
        )
    valid = (codes >= 0) & np.isfinite(sims)
    safe_codes = np.where(valid, codes, 0)

    counts = np.zeros((n, num_classes), dtype=np.int64)
    sim_sums = np.zeros((n, num_classes), dtype=np.float64)
    rows = np.repeat(np.arange(n), codes.shape[1]).reshape(codes.shape)
    np.add.at(counts, (rows[valid], safe_codes[valid]), 1)
    np.add.at(
        sim_sums, (rows[valid], safe_codes[valid]), np.nan_to_num(sims)[valid]
    )

    if method == "majority":
        weights = counts.astype(np.float64)
        # ties: among the most-voted classes, the one whose voters are
        # closer wins (scores may be unbounded, e.g. dot products)
        top = counts == counts.max(axis=1, keepdims=True, initial=0)
        rank = np.where(top, sim_sums, -np.inf)
    else:
        floor = 1e-3
        w = np.where(valid, np.clip(np.nan_to_num(sims), floor, None), 0.0)
        weights = np.zeros((n, num_classes), dtype=np.float64)
        np.add.at(weights, (rows[valid], safe_codes[valid]), w[valid])
        rank = weights

    totals = weights.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        probs = np.where(totals > 0, weights / totals, 0.0)
    winner = rank.argmax(axis=1) if num_classes else np.zeros(n, dtype=int)
    has_vote = totals[:, 0] > 0
    confidence = np.where(
        has_vote, probs[np.arange(n), winner] if num_classes else 0.0, 0.0
    )
    labels = [
        classes[w] if ok else None
        for w, ok in zip(winner, has_vote, strict=True)
    ]
    return Votes(
        classes=classes,
        labels=labels,
        confidence=confidence.astype(np.float64),
        probs=probs,
        counts=counts,
    )


def own_label_scores(votes: Votes, own_labels: Sequence[str]) -> np.ndarray:
    """Leave-one-out mistake scores: 1 - the share of the vote that goes to
    each sample's own label (higher = more likely mislabeled)."""
    lookup = {c: i for i, c in enumerate(votes.classes)}
    idx = np.array([lookup.get(lbl, -1) for lbl in own_labels])
    share = np.where(
        idx >= 0,
        votes.probs[np.arange(len(idx)), np.clip(idx, 0, None)],
        0.0,
    )
    return 1.0 - share


def winners(probs: np.ndarray, votes: Votes) -> np.ndarray:
    """The class of each row of ``probs``: the most probable, and among
    tied ones the vote's winner (which breaks ties by similarity)."""
    out = probs.argmax(axis=1)
    lookup = {c: i for i, c in enumerate(votes.classes)}
    for i, lbl in enumerate(votes.labels):
        j = lookup.get(lbl)
        if j is not None and probs[i, j] >= probs[i, out[i]] - 1e-12:
            out[i] = j
    return out


def logits(probs: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """Log of the smoothed distribution, for FiftyOne's ``logits``."""
    num_classes = max(probs.shape[1], 1)
    return np.log((probs + eps) / (1.0 + eps * num_classes)).astype(np.float32)
