"""Pre-annotation: each target gets the vote of its nearest labeled
neighbors, written as a ``fo.Classification`` in a field of its own.

The reference set is selected inside Qdrant by a payload filter (labeled
points, optionally with a tag), never by sending id lists; targets are
queried in batches (one request per chunk); a sample never votes for
itself. Results are written to a temporary field and moved into place only
when every chunk succeeded, so a failure leaves the previous pre-labels as
they were.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import fiftyone as fo
import numpy as np

from prelabel import constants, knn, records, validation
from prelabel.fields import CLASSIFICATION, check_output_field, staged_fields
from prelabel.health import check_index
from prelabel.index.base import IndexFilter
from prelabel.progress import Progress, ProgressArg

logger = logging.getLogger(__name__)


@dataclass
class PreannotationResult:
    """What a pre-annotation run did.

    Attributes:
        pred_field: the field written
        num_targets: targets considered
        num_labeled: targets given a pre-label
        num_review: targets left for review (below ``min_confidence``)
        classes: the classes of the reference set
        eval_key: the evaluation key, if the run was evaluated
        accuracy: accuracy against ground truth, if evaluated
        seconds: per stage timings

    With ``calibrate``, ``target_precision``, ``propagate`` or
    ``mode="adapted"`` (estimated from the references, each scored without
    its own label; see :mod:`prelabel.scored`):

    Attributes:
        mode: ``"knn"`` or ``"adapted"``
        brain_key: the index that voted (the adapted one in that mode)
        calibrated: whether ``confidence`` was calibrated
        reference_accuracy: held-out accuracy on the references
        ece_raw: calibration error of the raw confidence on the references
        ece: calibration error of the written confidence on the references
            (cross-validated when calibrated)
        num_reference_scored: references scored for these estimates
        target_precision: the precision asked for
        accept_threshold: the raw confidence accepted from
        expected_coverage: the share of references accepted at that
            threshold: the expected share of targets
        expected_precision: the references' precision at that threshold
        num_accepted: targets accepted (the others are tagged for review)
        coverage: ``num_accepted / num_targets``
        propagation: what spreading the labels chose, with
            ``propagate=True``
        accept_score: in ``mode="adapted"``, what ranks the pre-labels
            for acceptance, chosen on the references: ``"adapted"``, or
            ``"adapted x frozen vote"`` (also the share of the vote of the
            neighbors in the frozen embeddings)
    """

    pred_field: str
    num_targets: int = 0
    num_labeled: int = 0
    num_review: int = 0
    classes: list[str] = field(default_factory=list)
    eval_key: str | None = None
    accuracy: float | None = None
    seconds: dict = field(default_factory=dict)
    mode: str = "knn"
    brain_key: str | None = None
    calibrated: bool = False
    reference_accuracy: float | None = None
    ece_raw: float | None = None
    ece: float | None = None
    num_reference_scored: int | None = None
    target_precision: float | None = None
    accept_threshold: float | None = None
    expected_coverage: float | None = None
    expected_precision: float | None = None
    num_accepted: int | None = None
    coverage: float | None = None
    propagation: dict | None = None
    accept_score: str | None = None


def resolve_index(samples, index=None, brain_key=None):
    """The similarity results of ``index`` (results, a brain key or None)."""
    from prelabel.index.brain import PrelabelQdrantSimilarityIndex

    dataset = samples._root_dataset
    if isinstance(index, PrelabelQdrantSimilarityIndex):
        owner = index.samples._root_dataset
        if owner._doc.id != dataset._doc.id:
            raise ValueError(
                f"index= is the index of dataset '{owner.name}', not of "
                f"'{dataset.name}'; pass the results of sync_index on this "
                "dataset (or its brain key)"
            )
        return index
    if index is not None and not isinstance(index, str):
        raise ValueError(
            f"index= must be the results of prelabel.sync_index or a brain "
            f"key; got {type(index).__name__}"
        )
    key = index if isinstance(index, str) else brain_key
    key = key or constants.DEFAULT_BRAIN_KEY
    if key not in dataset.list_brain_runs():
        raise ValueError(
            f"brain_key={key!r} is not a run of dataset '{dataset.name}'; "
            "run prelabel.sync_index first"
        )
    results = dataset.load_brain_results(key)
    if not isinstance(results, PrelabelQdrantSimilarityIndex):
        raise ValueError(
            f"brain_key={key!r} is a run of another backend "
            f"({type(results.config).__name__}); sync a prelabel index "
            "with prelabel.sync_index"
        )
    return results


def check_reference(reference, samples) -> None:
    """``reference`` names a reference set: None, a tag, a non-empty list
    of tags, or a view of the same dataset."""
    if reference is None:
        return
    if isinstance(reference, str):
        tags = [reference]
    elif isinstance(reference, (list, tuple)):
        tags = list(reference)
        if not tags:
            raise ValueError(
                "reference=[] selects no sample; pass None for every "
                "labeled sample, a tag (or a list of tags), or a view"
            )
    elif isinstance(reference, fo.core.collections.SampleCollection):
        mine, theirs = samples._root_dataset, reference._root_dataset
        if mine._doc.id != theirs._doc.id:
            raise ValueError(
                f"reference= is a view of dataset '{theirs.name}', not of "
                f"'{mine.name}'; pass a view of the targets' dataset"
            )
        return
    else:
        raise ValueError(
            f"reference= must be None, a tag, a list of tags or a view; got "
            f"{type(reference).__name__}"
        )
    for tag in tags:
        if not isinstance(tag, str) or not tag:
            raise ValueError(
                f"reference={reference!r} holds {tag!r}, which is not a tag; "
                "pass tags as non-empty strings"
            )


def reference_filter(
    results, reference, label_field: str
) -> tuple[IndexFilter, int]:
    """The payload filter selecting the reference set, and its size.

    ``reference`` is ``None`` (every labeled sample), a tag or list of tags,
    or a FiftyOne view of labeled samples. A view is marked once in the
    payloads (a one-off write keyed by a fresh token) so that the queries
    select it by filter.
    """
    index = results.index
    if reference is None or isinstance(reference, (str, list, tuple)):
        flt = IndexFilter.reference(reference)
    else:
        ref_ids = validation.labeled(reference, label_field).values("id")
        # only points can be marked: a sample added or embedded after the
        # last sync is not in the index (and setting a payload on it fails)
        present = [
            sid
            for start in range(0, len(ref_ids), 10000)
            for sid, _ in index.iter_payloads(
                [],
                IndexFilter(sample_ids=tuple(ref_ids[start : start + 10000])),
            )
        ]
        token = uuid.uuid4().hex[:12]
        index.set_payload(present, {"refset": token})
        flt = IndexFilter(labeled=True, match=(("refset", token),))
    return flt, index.count(flt)


def check_preannotate(
    targets,
    index=None,
    reference: (
        str | Sequence[str] | fo.core.collections.SampleCollection | None
    ) = None,
    label_field: str = constants.DEFAULT_LABEL_FIELD,
    pred_field: str = constants.DEFAULT_PRED_FIELD,
    k: int = constants.DEFAULT_K,
    vote: str = "majority",
    brain_key: str | None = None,
    min_confidence: float | None = None,
    eval_key: str | None = None,
    calibrate: bool = False,
    target_precision: float | None = None,
    propagate: bool = False,
    mode: str = "knn",
    overwrite: bool = False,
    batch_size: int = 1000,
):
    """Runs every check of :func:`preannotate` without writing a label, so
    that operator forms can show the reason before anything runs (a
    reference given as a view is marked in the payloads, as
    :func:`reference_filter` does).

    Args: as :func:`preannotate`

    Returns:
        ``(results, filter, num_reference)``: the similarity results, the
        payload filter of the reference set and its size

    Raises:
        ValueError: one sentence saying what is wrong and what to do
    """
    if vote not in knn.VOTES:
        raise ValueError(
            f"vote={vote!r} is not supported; use one of {knn.VOTES}"
        )
    validation.check_fraction(min_confidence, "min_confidence")
    validation.check_positive_int(batch_size, "batch_size")
    check_reference(reference, targets)
    if eval_key is not None:
        validation.check_identifier(eval_key, "eval_key")
    from prelabel import scored

    scored.check_scored_args(mode, calibrate, target_precision, propagate)
    results = resolve_index(targets, index, brain_key)
    check_index(targets, results, sample_size=64).raise_if_damaged()
    config = results.config
    if config.label_field != label_field:
        raise ValueError(
            f"label_field={label_field!r} but the index stores labels of "
            f"{config.label_field!r}; pass label_field="
            f"{config.label_field!r} or sync an index with this field"
        )
    validation.check_classification_field(targets, label_field)
    emb_field = config.embeddings_field
    check_output_field(
        targets,
        pred_field,
        "pred_field",
        records.RUNS,
        overwrite=overwrite,
        never={
            label_field: (
                "the ground-truth field (the labels the index votes with)"
            ),
            emb_field: "the embeddings field the index reads",
        },
        types=((fo.EmbeddedDocumentField, fo.Classification),),
    )
    dim = validation.check_embeddings_field(targets, emb_field)
    if results.index.dim is not None and dim != results.index.dim:
        raise ValueError(
            f"the targets' {emb_field!r} are {dim}-d but the index holds "
            f"{results.index.dim}-d vectors; recompute embeddings with the "
            "index's model or sync a new brain key"
        )
    missing = len(targets.exists(emb_field, False))
    if missing:
        raise ValueError(
            f"{missing} targets have no {emb_field!r}; run "
            "compute_embeddings on them first"
        )

    flt, num_ref = reference_filter(results, reference, label_field)
    if num_ref == 0:
        raise ValueError(
            "the reference set is empty: no sample in the index has a "
            f"label in {label_field!r}"
            + (f" and the tag(s) {reference!r}" if reference else "")
            + "; label some samples (and sync the index) first"
        )
    validation.check_k(k, num_ref)
    return results, flt, num_ref


def preannotate(
    targets,
    index=None,
    reference: (
        str | Sequence[str] | fo.core.collections.SampleCollection | None
    ) = None,
    label_field: str = constants.DEFAULT_LABEL_FIELD,
    pred_field: str = constants.DEFAULT_PRED_FIELD,
    k: int = constants.DEFAULT_K,
    vote: str = "majority",
    brain_key: str | None = None,
    min_confidence: float | None = None,
    eval_key: str | None = None,
    batch_size: int = 1000,
    progress: ProgressArg = True,
    calibrate: bool = False,
    target_precision: float | None = None,
    propagate: bool = False,
    mode: str = "knn",
    overwrite: bool = False,
) -> PreannotationResult:
    """Pre-annotates ``targets`` by a vote of their nearest labeled
    neighbors in the index.

    Each target gets a ``fo.Classification`` in ``pred_field`` with
    ``label``, ``confidence`` (the winner's share of the vote), ``logits``
    (log of the vote distribution over ``classes``, for tools such as
    ``compute_mistakenness`` or cleanlab), ``votes`` (``"7: 12, 1: 3"``)
    and ``neighbors`` (the ids of the voters, the evidence).

    Args:
        targets: the samples to pre-annotate (a dataset or view)
        index (None): the results of :func:`prelabel.sync_index`, or a
            brain key; default ``brain_key`` or ``"prelabel_qdrant"``
        reference (None): who votes: ``None`` for every sample labeled in
            ``label_field``, a tag (or list of tags) of labeled samples, or
            a view of labeled samples
        label_field ("ground_truth"): the Classification field holding the
            reference labels (also the ground truth for ``eval_key``)
        pred_field ("prelabel"): the field to write; never the ground truth
        k (15): neighbors that vote
        vote ("majority"): ``"majority"`` (one vote each) or
            ``"weighted"`` (votes weighted by similarity)
        brain_key (None): the brain key, when ``index`` is not given
        min_confidence (None): below this confidence no label is written
            and the sample is tagged ``needs_review``
        eval_key (None): if given, evaluate the pre-labels of targets that
            have ground truth with ``evaluate_classifications``
        batch_size (1000): targets per query batch
        progress (True): a bar, nothing, or ``progress(fraction, label)``
        calibrate (False): write as ``confidence`` the probability that the
            pre-label is right, estimated from the references (each scored
            without its own label); the uncalibrated value is kept as
            ``raw_confidence`` and the vote's share as ``vote_share``.
            ``min_confidence`` then applies to the calibrated value
        target_precision (None): e.g. ``0.99``: accept the pre-labels whose
            confidence reaches the threshold the references say keeps this
            precision (attribute ``accepted=True``) and tag the others
            ``needs_review`` (their label is still written); the result
            reports the threshold and the expected coverage
        propagate (False): spread the labels over the neighbor graph of
            references and targets, when the references (hidden folds) say
            it helps (:mod:`prelabel.propagate`)
        mode ("knn"): ``"knn"`` votes in ``index``; ``"adapted"`` first
            learns embeddings adapted to the references' labels (once per
            reference set, :func:`prelabel.adapt_embeddings`), indexes them
            under ``<brain_key>_adapted``, votes there together with the
            learned classifier, and calibrates. An index of adapted
            embeddings always votes with its classifier
        overwrite (False): allow ``pred_field`` to replace a field that
            prelabel did not write (without it, such a field, e.g. labels
            a person reviewed, is refused); the ground truth and the
            index's embeddings are never overwritten

    Returns:
        a :class:`PreannotationResult`
    """
    t0 = time.perf_counter()
    results, flt, num_ref = check_preannotate(
        targets,
        index=index,
        reference=reference,
        label_field=label_field,
        pred_field=pred_field,
        k=k,
        vote=vote,
        brain_key=brain_key,
        min_confidence=min_confidence,
        eval_key=eval_key,
        calibrate=calibrate,
        target_precision=target_precision,
        propagate=propagate,
        mode=mode,
        overwrite=overwrite,
        batch_size=batch_size,
    )
    from prelabel import scored

    if scored.wants_scored(
        results,
        mode,
        calibrate,
        target_precision,
        propagate,
        targets._root_dataset,
    ):
        return scored.preannotate_scored(
            targets,
            results,
            flt,
            label_field=label_field,
            pred_field=pred_field,
            k=k,
            vote=vote,
            min_confidence=min_confidence,
            eval_key=eval_key,
            batch_size=batch_size,
            progress=progress,
            reference=reference,
            calibrate=calibrate or mode == "adapted",
            target_precision=target_precision,
            propagate=propagate,
            mode=mode,
            t0=t0,
        )
    emb_field = results.config.embeddings_field
    classes = _reference_classes(results, flt)
    out = PreannotationResult(pred_field=pred_field, classes=classes)

    dataset = targets._dataset
    ids = targets.values("id")
    out.num_targets = len(ids)
    review_ids: list[str] = []
    t_query = t_write = 0.0
    with staged_fields(dataset, {pred_field: CLASSIFICATION}) as tmp:
        tmp.record(
            records.RUNS,
            pred_field,
            run_record(
                results.key,
                label_field,
                k,
                vote,
                classes,
                min_confidence,
                reference,
            ),
        )
        with Progress(progress, len(ids), "Pre-annotating") as bar:
            for start in range(0, len(ids), batch_size):
                chunk = ids[start : start + batch_size]
                t1 = time.perf_counter()
                chunk_ids, vectors = _read_vectors(dataset, chunk, emb_field)
                res = results.index.query(vectors, k + 1, flt)
                nb_ids, nb_labels, sims = _drop_self(res, chunk_ids, k)
                votes = knn.vote(nb_labels, sims, classes, k, vote)
                t2 = time.perf_counter()
                labels, review = _classifications(
                    votes, nb_ids, min_confidence
                )
                review_ids.extend(
                    sid for sid, r in zip(chunk_ids, review, strict=True) if r
                )
                dataset.set_values(
                    tmp[pred_field],
                    dict(zip(chunk_ids, labels, strict=True)),
                    key_field="id",
                )
                t_query += t2 - t1
                t_write += time.perf_counter() - t2
                bar.update(len(chunk))
        t3 = time.perf_counter()
    t_write += time.perf_counter() - t3  # the swap of the field

    if review_ids:
        dataset.select(review_ids).tag_samples(constants.REVIEW_TAG)
    out.num_review = len(review_ids)
    out.num_labeled = out.num_targets - out.num_review
    out.seconds = {"query_vote": t_query, "write": t_write}

    if eval_key is not None:
        t4 = time.perf_counter()
        out.eval_key = eval_key
        out.accuracy = evaluate(
            targets, pred_field, label_field, eval_key, classes
        )
        out.seconds["evaluate"] = time.perf_counter() - t4
    out.seconds["total"] = time.perf_counter() - t0
    return out


def evaluate(samples, pred_field, gt_field, eval_key, classes=None):
    """Evaluates ``pred_field`` against ``gt_field`` under ``eval_key``
    (replacing an earlier run of that key) and returns the accuracy."""
    evaluated = samples.exists(gt_field).exists(pred_field)
    dataset = samples._root_dataset
    if eval_key in dataset.list_evaluations():
        dataset.delete_evaluation(eval_key)
    if len(evaluated) == 0:
        return None
    report = evaluated.evaluate_classifications(
        pred_field,
        gt_field=gt_field,
        eval_key=eval_key,
        classes=classes,
        progress=False,
    )
    return float(report.metrics()["accuracy"])


def _reference_classes(results, flt) -> list[str]:
    labels = {
        payload.get("label")
        for _, payload in results.index.iter_payloads(["label"], flt)
    }
    labels.discard(None)
    return sorted(labels, key=_natural_key)


def _natural_key(label: str):
    return (0, int(label)) if label.isdigit() else (1, label)


def _read_vectors(dataset, chunk, emb_field):
    ids, vecs = dataset.select(chunk).values(["id", emb_field])
    return ids, np.stack([np.asarray(v, dtype=np.float32) for v in vecs])


def _drop_self(res, query_ids, k):
    """Removes each query's own point from its neighbors; keeps ``k``."""
    nb_ids, nb_labels = [], []
    sims = np.full((len(query_ids), k), np.nan, dtype=np.float32)
    for i, qid in enumerate(query_ids):
        keep = [j for j, s in enumerate(res.sample_ids[i]) if s != qid][:k]
        nb_ids.append([res.sample_ids[i][j] for j in keep])
        nb_labels.append([res.labels[i][j] for j in keep])
        sims[i, : len(keep)] = res.scores[i, keep]
    return nb_ids, nb_labels, sims


def _classifications(votes: knn.Votes, nb_ids, min_confidence):
    logits = votes.logits()
    labels, review = [], []
    for i, label in enumerate(votes.labels):
        conf = float(votes.confidence[i])
        if label is None or (
            min_confidence is not None and conf < min_confidence
        ):
            labels.append(None)
            review.append(True)
            continue
        labels.append(
            fo.Classification(
                label=label,
                confidence=conf,
                logits=logits[i],
                votes=votes.summary(i),
                neighbors=list(nb_ids[i]),
            )
        )
        review.append(False)
    return labels, review


def run_record(
    brain_key,
    label_field,
    k,
    vote,
    classes,
    min_confidence,
    reference,
    extra: dict | None = None,
) -> dict:
    """What the run records of a pre-label field say about its run."""
    if reference is not None and not isinstance(reference, (str, list, tuple)):
        reference = "<view>"
    return {
        "brain_key": brain_key,
        "label_field": label_field,
        "k": k,
        "vote": vote,
        "classes": classes,
        "min_confidence": min_confidence,
        "reference": (
            list(reference) if isinstance(reference, tuple) else reference
        ),
        **(extra or {}),
    }
