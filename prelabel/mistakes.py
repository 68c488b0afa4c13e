"""Where the labels or the pre-labels are most likely wrong.

Two rankings:

- :func:`high_confidence_mistakes`: pre-labels that disagree with ground
  truth, most confident first (a confident disagreement is either a bad
  pre-label worth understanding or a wrong ground-truth label);
- :func:`find_label_mistakes`: for labeled samples, the leave-one-out vote
  of their labeled neighbors against their own label (through the same
  neighbor loop as pre-annotation, :mod:`prelabel.neighbors`), or a
  sharper in-memory score (``method="adapted"``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

import fiftyone as fo
import numpy as np
from fiftyone import ViewField as F

from prelabel import (
    adapt,
    constants,
    label_indexes,
    neighbors,
    records,
    units,
    validation,
)
from prelabel.core.adapter import label_error_scores
from prelabel.core.voting import own_label_scores, sort_classes, summarize
from prelabel.core.voting import vote as vote_of
from prelabel.fields import check_output_field, staged_fields
from prelabel.health import check_index
from prelabel.index.base import IndexFilter
from prelabel.index.locking import Lease
from prelabel.progress import Progress, ProgressArg
from prelabel.stored_vectors import values_with_vectors

#: how :func:`find_label_mistakes` scores (also in ``constants``)
METHODS = constants.METHODS


def high_confidence_mistakes(
    samples,
    pred_field: str = constants.DEFAULT_PRED_FIELD,
    gt_field: str = constants.DEFAULT_LABEL_FIELD,
    min_confidence: float = 0.0,
):
    """The samples whose pre-label disagrees with ground truth, most
    confident first.

    Args:
        samples: a dataset or view
        pred_field ("prelabel"): the Classification field of pre-labels
        gt_field ("ground_truth"): the Classification field of ground truth
        min_confidence (0.0): keep only mistakes at least this confident

    Returns:
        a :class:`fiftyone.core.view.DatasetView`
    """
    validation.check_classification_field(samples, pred_field, "pred_field")
    validation.check_classification_field(samples, gt_field, "gt_field")
    if pred_field == gt_field:
        raise ValueError(
            f"pred_field and gt_field are both {pred_field!r}; pass the "
            "pre-label field and the ground-truth field"
        )
    pred, gt = F(f"{pred_field}.label"), F(f"{gt_field}.label")
    conf = F(f"{pred_field}.confidence")
    view = samples.match(label_indexes.present(pred_field, gt_field))
    view = view.match(pred.exists() & gt.exists() & (pred != gt))
    if min_confidence:
        view = view.match(conf >= float(min_confidence))
    return view.sort_by(conf, reverse=True)


@dataclass
class LabelMistakesResult:
    """What :func:`find_label_mistakes` did.

    Attributes:
        score_field: the float field written (higher = more suspicious);
            for boxes, the Detections field of the scored boxes
        label_field: the neighbors' majority label field written (None
            for boxes: the majority is an attribute of each box)
        num_scored: labeled samples scored
        num_disagree: samples whose neighbors' majority is another label
        seconds: timings
    """

    score_field: str
    label_field: str | None
    num_scored: int = 0
    num_disagree: int = 0
    seconds: dict = field(default_factory=dict)


def check_find_label_mistakes(
    samples,
    index=None,
    label_field: str = constants.DEFAULT_LABEL_FIELD,
    k: int = constants.DEFAULT_K,
    score_field: str = constants.DEFAULT_SCORE_FIELD,
    neighbors_field: str | None = None,
    vote: str = "majority",
    brain_key: str | None = None,
    method: str = "loo",
    overwrite: bool = False,
    batch_size: int = 1000,
    patches_field: str | None = None,
):
    """Runs every check of :func:`find_label_mistakes` without writing
    anything, so that operator forms can show the reason up front.

    Args: as :func:`find_label_mistakes`

    Returns:
        ``(results, neighbors_field, filter, units)``: the similarity
        results, the resolved neighbors field (None for boxes), the
        payload filter of labeled points and the points scored

    Raises:
        ValueError: one sentence saying what is wrong and what to do
    """
    validation.check_identifier(score_field, "score_field")
    neighbors_field = neighbors_field or f"{score_field}_label"
    if neighbors_field == score_field:
        raise ValueError(
            f"neighbors_field={neighbors_field!r} is the score field; choose "
            "another name"
        )
    validation.check_positive_int(batch_size, "batch_size")
    if vote not in constants.VOTES:
        raise ValueError(
            f"vote={vote!r} is not supported; use {constants.VOTES}"
        )
    if method not in METHODS:
        raise ValueError(
            f"method={method!r} is not supported; use one of {METHODS}"
        )
    points, label_field = units.resolve(samples, patches_field, label_field)
    if patches_field is not None and method != "loo":
        raise ValueError(
            f"method={method!r} learns from whole-image labels; boxes are "
            "scored with method='loo'"
        )
    results = neighbors.load_index(samples, index, brain_key, patches_field)
    # the checks below share one opening of an embedded index
    with Lease(results.index):
        check_index(
            samples, results, sample_size=64, count=False
        ).raise_if_damaged()
        if results.config.label_field != label_field:
            raise ValueError(
                f"label_field={label_field!r} but the index stores labels "
                f"of {results.config.label_field!r}; sync an index with this "
                "field"
            )
        if patches_field is None:
            validation.check_classification_field(samples, label_field)
        emb_field = results.config.embeddings_field
        never = {
            label_field: "the ground-truth field (the labels under test)",
            emb_field: "the embeddings field the index reads",
        }
        outputs = [
            ("score_field", score_field, (fo.FloatField,)),
            (
                "neighbors_field",
                neighbors_field,
                ((fo.EmbeddedDocumentField, fo.Classification),),
            ),
        ]
        if patches_field is not None:
            neighbors_field = None
            outputs = [
                (
                    "score_field",
                    score_field,
                    ((fo.EmbeddedDocumentField, points.result_doc),),
                )
            ]
        for param, name, types in outputs:
            check_output_field(
                samples,
                name,
                param,
                records.MISTAKES,
                overwrite=overwrite,
                never=never,
                types=types,
            )
        validation.check_embeddings_field(
            samples, points.path(samples, emb_field)
        )

        flt = IndexFilter(labeled=True)
        num_ref = results.index.count(flt)
        validation.check_k(k, max(num_ref - 1, 0))
        return results, neighbors_field, flt, points


def find_label_mistakes(
    samples,
    index=None,
    label_field: str = constants.DEFAULT_LABEL_FIELD,
    k: int = constants.DEFAULT_K,
    score_field: str = constants.DEFAULT_SCORE_FIELD,
    neighbors_field: str | None = None,
    vote: str = "majority",
    brain_key: str | None = None,
    batch_size: int = 1000,
    progress: ProgressArg = True,
    method: str = "loo",
    overwrite: bool = False,
    patches_field: str | None = None,
) -> LabelMistakesResult:
    """Scores every labeled sample by how much its labeled neighbors
    disagree with its own label (leave-one-out: a sample never votes for
    itself).

    Writes ``score_field`` (``1 - share of the vote for the sample's own
    label``; higher = more likely mislabeled) and ``neighbors_field``, a
    Classification with the neighbors' majority label, its share and the
    vote. Sort by ``score_field`` (descending) to review. Both fields are
    written aside and swapped in together when every sample is scored.

    Args:
        samples: the labeled samples to score (a dataset or view)
        index (None): the results of :func:`prelabel.sync_index`, or a
            brain key
        label_field ("ground_truth"): the labels under test
        k (15): neighbors that vote
        score_field ("mistake_score"): the float field to write
        neighbors_field (None): the Classification field for the
            neighbors' label; default ``<score_field>_label``
        vote ("majority"): ``"majority"`` or ``"weighted"``
        brain_key (None): the brain key, when ``index`` is not given
        batch_size (1000): samples per query batch
        progress (True): a bar, nothing, or ``progress(fraction, label)``
        method ("loo"): ``"loo"``, the leave-one-out vote of the index; or
            ``"adapted"``, the mean of a leave-one-out vote in a label-free
            whitened space and a classifier cross-fitted on the labels (a
            sample is scored by a head that never saw its label). Sharper,
            computed exactly in memory (suits up to ~10^5 labeled samples);
            ``vote`` does not apply
        overwrite (False): allow ``score_field`` / ``neighbors_field`` to
            replace fields that prelabel did not write (without it such a
            field is refused); ``label_field`` is never overwritten
        patches_field (None): score the labeled boxes of this
            ``Detections`` field instead, each by its nearest labeled
            boxes in an index of them (``sync_index(...,
            patches_field=...)``). ``score_field`` is then a
            ``Detections`` field of its own: a ``fo.Detection`` on each
            scored box (linked by ``source_id``; the boxes themselves are
            never modified) with the box's own ``label``, its ``score``
            (as above), and the neighbors' majority as ``neighbors_label``
            with its share (``confidence``), ``votes`` and ``neighbors``;
            ``neighbors_field`` does not apply

    Returns:
        a :class:`LabelMistakesResult`
    """
    t0 = time.perf_counter()
    results, neighbors_field, flt, points = check_find_label_mistakes(
        samples,
        index=index,
        label_field=label_field,
        k=k,
        score_field=score_field,
        neighbors_field=neighbors_field,
        vote=vote,
        brain_key=brain_key,
        method=method,
        overwrite=overwrite,
        batch_size=batch_size,
        patches_field=patches_field,
    )
    label_field = points.label_field(label_field)
    record = mistakes_record(
        results.key, label_field, k, method, neighbors_field, patches_field
    )
    emb_field = results.config.embeddings_field
    if method == "adapted":
        # an index of adapted embeddings: score in the frozen ones
        record_of = adapt.adapter_record(samples._root_dataset, emb_field)
        emb_field = record_of["embeddings_field"] if record_of else emb_field
        labeled = validation.labeled(samples, label_field).exists(emb_field)
        ids, own = labeled.values(["id", f"{label_field}.label"])
        rows = _adapted_rows(labeled, emb_field, ids, own, k, batch_size)
    else:
        ids, own = points.labeled(
            samples.exists(points.path(samples, emb_field)), label_field
        )
        classes = neighbors.reference_classes(results, flt)
        rows = _loo_rows(
            results, flt, (ids, own), classes, (k, vote, batch_size), points
        )
    out = LabelMistakesResult(score_field, neighbors_field)
    with Progress(progress, len(ids), "Scoring labels") as bar:
        _write(samples._dataset, out, record, rows, bar, (points, ids, own))
    out.seconds["total"] = time.perf_counter() - t0
    return out


#: ``(ids, scores, neighbors' majority, which disagree)`` chunk by chunk
Rows = Iterator[tuple[list[str], np.ndarray, list, np.ndarray]]


def _loo_rows(results, flt, labeled, classes, opts, points) -> Rows:
    """The :data:`Rows` of the leave-one-out vote of each labeled
    point's neighbors (``labeled``: their ids and labels; ``opts``: k,
    vote, batch size)."""
    ids, own = labeled
    k, vote, batch_size = opts
    own_by_id = dict(zip(ids, own, strict=True))
    dataset = results.samples._root_dataset
    for nb in neighbors.stream(
        results,
        dataset,
        ids,
        results.config.embeddings_field,
        k,
        flt,
        batch_size,
        units=points,
    ):
        votes = vote_of(nb.labels, nb.sims, classes, k, vote)
        mine = [own_by_id[s] for s in nb.ids]
        majority = [
            (
                {
                    "label": lbl,
                    "confidence": float(votes.confidence[i]),
                    "votes": votes.summary(i),
                    "neighbors": list(nb.neighbor_ids[i]),
                }
                if lbl is not None
                else None
            )
            for i, lbl in enumerate(votes.labels)
        ]
        disagree = np.array(
            [
                lbl is not None and lbl != m
                for lbl, m in zip(votes.labels, mine, strict=True)
            ],
            dtype=bool,
        )
        yield nb.ids, own_label_scores(votes, mine), majority, disagree


def _adapted_rows(labeled, emb_field, ids, own, k, batch_size) -> Rows:
    """The same rows from
    :func:`prelabel.core.adapter.label_error_scores`, computed in memory
    over every labeled sample, then handed out in chunks."""
    if len(ids) <= k:
        raise ValueError(
            f"only {len(ids)} labeled samples with {emb_field!r}; need more "
            f"than k={k} to score them"
        )
    classes = sort_classes(own)
    lookup = {c: i for i, c in enumerate(classes)}
    y = np.array([lookup[c] for c in own], dtype=np.int64)
    # the same view as ``ids``: the same order
    (vecs,) = values_with_vectors(labeled, [emb_field], emb_field)
    X = np.stack([np.asarray(v, dtype=np.float32) for v in vecs])
    scores, probs, nb, _ = label_error_scores(X, y, len(classes), k=k)
    wins = probs.argmax(axis=1)
    counts = np.zeros((len(ids), len(classes)), dtype=np.int64)
    np.add.at(
        counts, (np.repeat(np.arange(len(ids)), nb.shape[1]), y[nb].ravel()), 1
    )
    for a in range(0, len(ids), batch_size):
        rows = range(a, min(a + batch_size, len(ids)))
        majority = [
            {
                "label": classes[wins[i]],
                "confidence": float(probs[i, wins[i]]),
                "votes": summarize(classes, counts[i], int(wins[i])),
                "neighbors": [ids[j] for j in nb[i]],
            }
            for i in rows
        ]
        disagree = wins[a : rows.stop] != y[a : rows.stop]
        yield ids[a : rows.stop], scores[a : rows.stop], majority, disagree


def _write(dataset, out, record, rows: Rows, bar, scored) -> None:
    """Writes the rows aside, then swaps the fields in with the record
    (``scored``: the points, their ids and their own labels)."""
    if scored[0].patches_field is not None:
        return _write_boxes(dataset, out, record, rows, bar, scored)
    staged = {
        out.score_field: (fo.FloatField, {}),
        out.label_field: units.CLASSIFICATION,
    }
    low = np.inf
    with staged_fields(dataset, staged) as stage:
        # the majority as raw Classification documents, in one bulk
        # request per chunk (FiftyOne's classes cost 0.4 ms a label)
        writer = scored[0].writer(dataset, stage[out.label_field], [])
        for ids, scores, majority, disagree in rows:
            dataset.set_values(
                stage[out.score_field],
                dict(zip(ids, map(float, scores), strict=True)),
                key_field="id",
            )
            writer.write(dict(zip(ids, majority, strict=True)))
            out.num_scored += len(ids)
            out.num_disagree += int(disagree.sum())
            low = min(low, np.min(scores[disagree], initial=np.inf))
            bar.update(len(ids))
        # what lets disagreeing_labels() read only the disagreements
        record.update(
            disagree_min_score=float(low) if np.isfinite(low) else None,
            scored_at=stage.now.isoformat(),
        )
        stage.record(records.MISTAKES, out.score_field, record)
    label_indexes.ensure(dataset, score_fields=(out.score_field,))


def _write_boxes(dataset, out, record, rows, bar, scored) -> None:
    """For boxes: one Detections field, a Detection per scored box with
    its own label, its score and the neighbors' majority."""
    points, all_ids, labels = scored
    own = dict(zip(all_ids, labels, strict=True))
    staged = {out.score_field: points.result_type}
    with staged_fields(dataset, staged) as stage:
        stage.record(records.MISTAKES, out.score_field, record)
        writer = points.writer(dataset, stage[out.score_field], all_ids)
        for ids, scores, majority, disagree in rows:
            writer.write(
                {
                    lid: _box_score(own.get(lid), float(score), maj)
                    for lid, score, maj in zip(
                        ids, scores, majority, strict=True
                    )
                }
            )
            out.num_scored += len(ids)
            out.num_disagree += int(disagree.sum())
            bar.update(len(ids))
        writer.close()


def _box_score(label, score, majority) -> dict:
    """What a scored box's Detection carries (the attributes of a
    Classification)."""
    attrs = dict(label=label, score=score)
    if majority is not None:
        attrs.update(
            neighbors_label=majority["label"],
            confidence=majority["confidence"],
            votes=majority["votes"],
            neighbors=majority["neighbors"],
        )
    return attrs


def mistakes_record(
    brain_key, label_field, k, method, neighbors_field, patches_field=None
) -> dict:
    """What the run records of a score field say about its run."""
    return {
        "brain_key": brain_key,
        "label_field": label_field,
        "k": k,
        "method": method,
        "neighbors_field": neighbors_field,
        "patches_field": patches_field,
    }


def suspicious_labels(
    samples,
    score_field: str = constants.DEFAULT_SCORE_FIELD,
    min_score: float = 0.0,
):
    """The scored samples, most suspicious first; for a score field of
    boxes (``find_label_mistakes(..., patches_field=...)``), a patches
    view of the scored boxes.

    Args:
        samples: a dataset or view
        score_field ("mistake_score"): the score field written
        min_score (0.0): keep only scores at least this high

    Returns:
        a :class:`fiftyone.core.view.DatasetView`
    """
    record = records.get(samples._root_dataset, records.MISTAKES, score_field)
    if (record or {}).get("patches_field"):
        view = samples.to_patches(score_field)
        score = F(f"{score_field}.score")
        if min_score:
            view = view.match(score >= float(min_score))
    else:
        view = samples.match(label_indexes.scored(score_field, min_score))
        score = F(score_field)
    return view.sort_by(score, reverse=True)


def disagreeing_labels(
    samples,
    score_field: str = constants.DEFAULT_SCORE_FIELD,
    gt_field: str | None = None,
    min_score: float = 0.0,
):
    """The scored samples whose label is not their neighbors' majority
    (``<score_field>_label``), most suspicious first; for a score field of
    boxes, a patches view of those boxes.

    The run records the lowest score of a sample that disagreed and when
    it wrote, so the query reads, through two indexes, only the samples
    scored at least that high and those modified since (``last_modified_at``:
    say, a label fixed after the run), not every scored sample. Compared
    with another ``gt_field``, or after a run that recorded neither, it
    reads every scored sample.

    Args:
        samples: a dataset or view
        score_field ("mistake_score"): the score field written
        gt_field (None): the labels compared with the majority; default
            the field the run scored
        min_score (0.0): keep only scores at least this high

    Returns:
        a :class:`fiftyone.core.view.DatasetView`
    """
    record = records.get(samples._root_dataset, records.MISTAKES, score_field)
    record = record or {}
    if record.get("patches_field"):
        view = suspicious_labels(samples, score_field, min_score)
        own = F(f"{score_field}.label")
        major = F(f"{score_field}.neighbors_label")
        score = F(f"{score_field}.score")
    else:
        gt_field = gt_field or record.get("label_field")
        gt_field = gt_field or constants.DEFAULT_LABEL_FIELD
        major_field = record.get("neighbors_field") or f"{score_field}_label"
        view = samples.match(
            _candidates(record, score_field, gt_field, min_score)
        )
        own, major = F(f"{gt_field}.label"), F(f"{major_field}.label")
        score = F(score_field)
    view = view.match(own.exists() & major.exists() & (own != major))
    return view.sort_by(score, reverse=True)


def _candidates(
    record: dict, score_field: str, gt_field: str, min_score: float
) -> dict:
    """The query that keeps every scored sample that may disagree: all of
    them, unless the run recorded its lowest disagreeing score and when it
    wrote (and scored ``gt_field``)."""
    scored = label_indexes.scored(score_field, min_score)
    stamp = record.get("scored_at")
    if not stamp or record.get("label_field") != gt_field:
        return scored
    since = {
        **scored,
        "last_modified_at": {"$gt": datetime.fromisoformat(stamp)},
    }
    low = record.get("disagree_min_score")
    if low is None:
        return since
    return {
        "$or": [label_indexes.scored(score_field, max(low, min_score)), since]
    }
