"""How a sample is scored: a distribution over the classes from its
neighbors (and, in adapted mode, from the adapter's classifier), for
targets one chunk at a time, and for the references each without its own
label.

- :class:`VoteScorer`: the kNN vote of the neighbors in the index; a
  reference is scored by its leave-one-out vote.
- :class:`AdaptedScorer`: in an index of adapted embeddings (see
  :mod:`prelabel.adapt`), the mean of the vote and the adapter's
  classifier, read off the sample's adapted vector (the vote alone is
  almost always unanimous there, so it cannot rank); a reference is scored
  by the head and the neighbors that never saw its label (cross-fitting).
- :func:`propagate`: label spreading over the neighbor graph of references
  and targets, a step after either scorer, used when the references
  (hidden folds) say it helps.
- :func:`frozen_share`: a second opinion for ranking adapted pre-labels,
  the share of the vote of the neighbors in the frozen embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prelabel import neighbors
from prelabel.core import adapter as core_adapter
from prelabel.core import calibration, leakage
from prelabel.core import propagation as core_propagation
from prelabel.core.calibration import MAX_CALIBRATION
from prelabel.core.vectors import exact_neighbors, whitened_features
from prelabel.core.voting import Votes, vote, winners

#: references and targets that label spreading may hold in memory: it
#: reads every embedding and builds an exact neighbor graph
MAX_PROPAGATION = 100000


@dataclass
class ChunkScores:
    """The scores of a chunk of targets.

    Attributes:
        neighbors: the :class:`prelabel.neighbors.Neighbors` of the chunk
        votes: their :class:`prelabel.core.voting.Votes`
        probs: float array (n, C), the distribution written
    """

    neighbors: neighbors.Neighbors
    votes: Votes
    probs: np.ndarray

    @property
    def winners(self) -> np.ndarray:
        return winners(self.probs, self.votes)


@dataclass
class ReferenceScores:
    """The references scored as targets, each without its own label.

    Attributes:
        ids: their sample ids
        y: their labels, as class indices
        probs: float array (n, C) of their held-out distributions
        winners: the class each would be pre-labeled with
        closer_than: the similarity above which their neighbors were set
            aside as closer than the targets get (``inf``: none were; see
            :mod:`prelabel.core.leakage`)
        num_trimmed: the references that had neighbors set aside
    """

    ids: list[str]
    y: np.ndarray
    probs: np.ndarray
    winners: np.ndarray
    closer_than: float = float("inf")
    num_trimmed: int = 0

    @property
    def correct(self) -> np.ndarray:
        return self.winners == self.y

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(axis=1)


class VoteScorer:
    """The kNN vote of a sample's nearest references in ``results``.

    Args:
        results: the similarity results of the index voted in
        flt: the payload filter of the reference set
        classes: the classes, in the order of the distributions
        k: neighbors that vote
        vote_method: ``"majority"`` or ``"weighted"``
        units (None): the :class:`prelabel.units.Samples` or
            :class:`prelabel.units.Patches` of ``results`` (one per run:
            it remembers where the boxes it has seen live)
    """

    def __init__(self, results, flt, classes, k, vote_method, units=None):
        self.results = results
        self.flt = flt
        self.classes = list(classes)
        self.k = k
        self.vote_method = vote_method
        self.field = results.config.embeddings_field
        self.units = units or neighbors.units_for(results)

    def score(self, nb: neighbors.Neighbors) -> ChunkScores:
        """The distribution of each sample of a chunk."""
        votes = vote(
            nb.labels, nb.sims, self.classes, self.k, self.vote_method
        )
        return ChunkScores(nb, votes, votes.probs)

    def stream(self, dataset, ids, batch_size, progress=None, label=""):
        """:meth:`score` of every chunk of ``ids``."""
        for nb in neighbors.stream(
            self.results,
            dataset,
            ids,
            self.field,
            self.k,
            self.flt,
            batch_size,
            progress,
            label,
            self.units,
        ):
            yield self.score(nb)

    def score_references(self, dataset, target_top=None) -> ReferenceScores:
        """Every reference (a subset of :data:`MAX_CALIBRATION` beyond
        that) scored by its leave-one-out vote.

        Args:
            dataset: the dataset of the points
            target_top (None): the similarity of a sample of targets to
                their nearest reference: neighbors of a reference closer
                than the targets get are set aside
                (:mod:`prelabel.core.leakage`)
        """
        label_of = self._reference_labels()
        ids, votes, t, trimmed = self.held_out(
            dataset, list(label_of), target_top
        )
        scores = self._scores(
            label_of, ids, votes.probs, winners(votes.probs, votes)
        )
        scores.closer_than, scores.num_trimmed = t, trimmed
        return scores

    def held_out(self, dataset, ids, target_top=None):
        """The held-out votes of ``ids``: each one's ``k`` nearest
        references (never itself), without those closer than
        ``target_top`` says the targets get to theirs, found among as many
        neighbors as their copies need
        (:func:`prelabel.core.leakage.widened`).

        Returns:
            ``(ids found, their Votes, the similarity above which
            neighbors were set aside, how many rows had one set aside)``
        """
        if target_top is None:
            _, labels, sims = out = self.held_out_neighbors(dataset, ids)
            t = float("inf")
        else:
            out, t = leakage.widened(
                lambda m: self.held_out_neighbors(dataset, ids, m),
                self.k,
                target_top,
            )
            _, labels, sims = out
        votes, trimmed = self.held_out_votes(labels, sims, t)
        return out[0], votes, t, trimmed

    def held_out_neighbors(self, dataset, ids, m: int | None = None):
        """The ``m`` (default ``k``) nearest references of ``ids`` (never a
        point itself).

        Returns:
            ``(ids found, their neighbors' labels, similarities (n, m))``
        """
        m = m or self.k
        found, labels, sims = [], [], []
        for nb in neighbors.stream(
            self.results,
            dataset,
            ids,
            self.field,
            m,
            self.flt,
            1000,
            units=self.units,
        ):
            found.extend(nb.ids)
            labels.extend(nb.labels)
            sims.append(nb.sims)
        return found, labels, np.vstack(sims) if sims else np.zeros((0, m))

    def held_out_votes(self, labels, sims, t: float = float("inf")):
        """The vote of each row's ``k`` nearest neighbors at or below the
        similarity ``t`` (all of them by default).

        Returns:
            ``(Votes, how many rows had a neighbor set aside)``
        """
        cols, kept, kept_sims = leakage.closest_kept(sims, t, self.k)
        kept_labels = [
            [row[j] for j, ok in zip(c, m, strict=True) if ok]
            for row, c, m in zip(
                labels, cols.tolist(), kept.tolist(), strict=True
            )
        ]
        votes = vote(
            kept_labels, kept_sims, self.classes, self.k, self.vote_method
        )
        trimmed = int((np.nan_to_num(sims, nan=-np.inf) > t).any(1).sum())
        return votes, trimmed

    def _reference_labels(self) -> dict[str, str]:
        """The scored references' labels by id (a subset of
        :data:`MAX_CALIBRATION` chosen by their ids beyond that)."""
        lookup = set(self.classes)
        pairs = [
            (sid, lbl)
            for sid, lbl in neighbors.reference_labels(self.results, self.flt)
            if lbl in lookup
        ]
        rows = leakage.calibration_subset(
            [p[0] for p in pairs], MAX_CALIBRATION
        )
        return dict(pairs[i] for i in rows)

    def _scores(self, label_of, ids, probs, wins) -> ReferenceScores:
        lookup = {c: i for i, c in enumerate(self.classes)}
        y = np.array([lookup[label_of[s]] for s in ids], dtype=np.int64)
        return ReferenceScores(list(ids), y, probs, wins)


class AdaptedScorer(VoteScorer):
    """The vote in an index of adapted embeddings, averaged with the
    classifier of the adapter that wrote them.

    Args: as :class:`VoteScorer`, and
        adapter: the :class:`prelabel.core.adapter.Adapter`
    """

    def __init__(self, results, flt, classes, k, vote_method, adapter):
        super().__init__(results, flt, classes, k, vote_method)
        self.adapter = adapter
        cols = {c: i for i, c in enumerate(adapter.classes)}
        self._cols = np.array([cols.get(c, -1) for c in self.classes])

    def _in_classes(self, P: np.ndarray) -> np.ndarray:
        """The adapter's class probabilities in this scorer's columns."""
        cols = self._cols
        return np.where(cols[None, :] >= 0, P[:, np.clip(cols, 0, None)], 0.0)

    def score(self, nb: neighbors.Neighbors) -> ChunkScores:
        chunk = super().score(nb)
        head = self._in_classes(self.adapter.proba(nb.vectors))
        totals = head.sum(axis=1, keepdims=True)
        head = head / np.where(totals > 0, totals, 1.0)
        chunk.probs = 0.5 * chunk.votes.probs + 0.5 * head
        return chunk

    def score_references(self, dataset, target_top=None) -> ReferenceScores:
        """Every reference scored by the head and the neighbors of the
        cross-fitting fold that never saw its label. Near-duplicates are
        kept out by the adapter's folds (a reference's copies share its
        fold), not by a threshold here: a held-out reference is embedded
        by one head, a target by all of them, so their similarities are
        not comparable (``target_top`` is not used)."""
        ad = self.adapter
        label_of = self._reference_labels()
        ids, X = neighbors.read_vectors(
            dataset, list(label_of), ad.info.get("embeddings_field")
        )
        folds = ad.fold_of(ids)
        head = self._in_classes(core_adapter.cross_fitted_proba(ad, X, folds))
        head /= np.maximum(head.sum(axis=1, keepdims=True), 1e-12)
        nb_idx, sims = core_adapter.cross_fitted_neighbors(
            ad, X, folds, self.k
        )
        ref_lbl = [label_of[s] for s in ids]
        nb_labels = [
            [ref_lbl[j] if j >= 0 else None for j in row]
            for row in nb_idx.tolist()
        ]
        votes, _ = self.held_out_votes(nb_labels, sims)
        probs = 0.5 * votes.probs + 0.5 * head
        return self._scores(label_of, ids, probs, winners(probs, votes))


def frozen_share(
    frozen, dataset, ids, wins, classes, k, vote_method, target_top=None
):
    """The share of the vote of each sample's ``k`` nearest references in
    the frozen embeddings (``frozen``: a :class:`VoteScorer` of that index)
    that goes to the class ``wins`` gives it (never its own vote; for
    references, without the neighbors closer than ``target_top`` says
    the targets get, as in :meth:`VoteScorer.score_references`)."""
    return _frozen_share(
        frozen, dataset, ids, wins, classes, k, vote_method, target_top
    )[0]


def _frozen_share(
    frozen, dataset, ids, wins, classes, k, vote_method, target_top
):
    """:func:`frozen_share`, and the threshold and count of
    :meth:`VoteScorer.held_out_votes`."""
    scorer = VoteScorer(frozen.results, frozen.flt, classes, k, vote_method)
    found, votes, t, trimmed = scorer.held_out(dataset, list(ids), target_top)
    share = np.zeros(len(ids))
    row = {sid: i for i, sid in enumerate(ids)}
    at = np.array([row[s] for s in found], dtype=np.int64)
    share[at] = votes.probs[np.arange(len(at)), np.asarray(wins)[at]]
    return share, t, trimmed


def choose_accept_score(
    refs, frozen, dataset, classes, k, vote_method, tp, target_ids=()
):
    """Which score ranks the adapted pre-labels for acceptance, chosen on
    the references.

    The adapted score is the sharper classifier, but on some data its most
    confident predictions level off just under a high precision (a few
    look-alike classes stay confused at any confidence), while the
    neighbors in the frozen embeddings, an independent view, are
    unanimous on most of the samples that are safe. The candidates are
    the adapted score alone and times the frozen vote's share of the
    adapted label; the references (held out for both) pick the one that
    accepts the most of them at ``tp``. Labels never change.

    ``target_ids`` (a sample of the targets) say how close the targets
    get to their nearest reference in the frozen embeddings, so that the
    references' frozen votes leave out their near-duplicates.

    Returns:
        ``(name, the references' scores under it)``; ``refs.closer_than``
        and ``refs.num_trimmed`` say what the frozen votes set aside
    """
    conf = refs.confidence
    top = None
    if len(target_ids):
        _, _, sims = frozen.held_out_neighbors(dataset, list(target_ids))
        top = sims[:, 0] if sims.size else None
    share, refs.closer_than, refs.num_trimmed = _frozen_share(
        frozen, dataset, refs.ids, refs.winners, classes, k, vote_method, top
    )
    candidates = {"adapted": conf, "adapted x frozen vote": conf * share}
    name = calibration.choose_score(candidates, refs.correct, tp)
    return name, candidates[name]


@dataclass
class Spreading:
    """What label spreading chose, and the targets' distributions after
    it (``probs``: sample id -> row), when it helps."""

    choice: core_propagation.PropagationChoice
    probs: dict[str, np.ndarray] | None

    def record(self) -> dict:
        """What the run record keeps of it."""
        c = self.choice
        return {
            "alpha": c.alpha,
            "use_prior": c.use_prior,
            "reference_accuracy": {
                f"{a}{'' if p else '/no-prior'}": v
                for (a, p), v in c.accuracy.items()
            },
        }


def propagate(
    root, field, refs, target_ids, priors, classes, units=None
) -> Spreading:
    """Spreads the labels over the graph of references and targets, if the
    references say it helps.

    Args:
        root: the dataset
        field: the embeddings field the graph is built on (the frozen one
            in adapted mode)
        refs: the :class:`ReferenceScores` (updated: their held-out
            distributions under spreading)
        target_ids: the targets, in the order of ``priors``
        priors: float array (n, C), the targets' scores
        classes: the classes
        units (None): the points' :class:`prelabel.units.Samples` (or
            boxes)

    Returns:
        a :class:`Spreading`
    """
    ref_set = set(refs.ids)
    all_ids = list(refs.ids) + [s for s in target_ids if s not in ref_set]
    if len(all_ids) > MAX_PROPAGATION:
        raise ValueError(
            f"propagate=True holds {len(all_ids):,} references and targets "
            f"in memory, more than {MAX_PROPAGATION:,}; pre-annotate a "
            "smaller view of targets, or pass propagate=False"
        )
    row = {sid: i for i, sid in enumerate(all_ids)}
    found, X = neighbors.read_vectors(root, all_ids, field, units)
    Xo = np.empty_like(X)
    Xo[np.array([row[s] for s in found])] = X
    W = whitened_features(Xo)
    idx, sims = exact_neighbors(W, k=10)
    S = core_propagation.graph_operator(idx, sims)
    prior = np.zeros((len(all_ids), len(classes)))
    target_rows = [row[s] for s in target_ids]
    prior[target_rows] = priors
    ref_rows = np.array([row[s] for s in refs.ids], dtype=np.int64)
    choice = core_propagation.choose(
        S,
        ref_rows,
        refs.y,
        len(classes),
        prior,
        refs.probs,
        groups=leakage.groups(
            W[ref_rows], W[target_rows], core_propagation.HIDDEN_FOLDS
        ),
    )
    if not choice.helps:
        return Spreading(choice, None)
    F = core_propagation.spread(
        S,
        ref_rows,
        refs.y,
        len(classes),
        prior=prior if choice.use_prior else None,
        alpha=choice.alpha,
    )
    refs.probs = choice.held_out_proba
    refs.winners = refs.probs.argmax(axis=1)
    return Spreading(choice, {s: F[row[s]] for s in target_ids})
