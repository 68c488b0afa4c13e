"""Pre-annotation: each target gets the vote of its nearest labeled
neighbors, written as a ``fo.Classification`` in a field of its own.

One path for every option::

    check → scorer (kNN vote | adapted: vote and classifier in the
            adapted space) → the references' verdict (each reference
            scored without its own label: calibration, the accept
            threshold, whether spreading helps) → the targets, chunk by
            chunk (query, score, classify, write aside) → swap the field
            in → run record → evaluation

Targets stream in chunks of ``batch_size``: memory does not grow with the
number of targets, except with ``propagate=True``, whose graph holds every
reference and target (see :mod:`prelabel.scorers`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import fiftyone as fo
import numpy as np

from prelabel import (
    adapt,
    constants,
    label_indexes,
    neighbors,
    records,
    scorers,
    units,
    validation,
)
from prelabel.core import calibration, leakage
from prelabel.core.voting import logits, winners
from prelabel.deprecation import moved
from prelabel.fields import check_output_field, staged_fields
from prelabel.health import check_index
from prelabel.index.locking import Lease
from prelabel.prefetch import Behind
from prelabel.progress import Progress, ProgressArg


@dataclass
class PreannotationResult:
    """What a pre-annotation run did.

    Attributes:
        pred_field: the field written
        num_targets: targets considered
        num_labeled: targets given a pre-label
        num_review: targets left for review (no label, below
            ``min_confidence``, or not accepted)
        classes: the classes of the reference set
        eval_key: the evaluation key, if the run was evaluated
        accuracy: accuracy against ground truth, if evaluated
        seconds: per stage timings
        mode: ``"knn"`` or ``"adapted"``
        brain_key: the index that voted (the adapted one in that mode)

    With ``calibrate``, ``target_precision``, ``propagate`` or
    ``mode="adapted"`` (estimated from the references, each scored without
    its own label):

    Attributes:
        calibrated: whether ``confidence`` was calibrated
        reference_accuracy: held-out accuracy on the references
        ece_raw: calibration error of the raw confidence on the references
        ece: calibration error of the written confidence on the references
            (cross-validated when calibrated)
        num_reference_scored: references scored for these estimates
        target_precision: the precision asked for
        accept_threshold: the raw confidence accepted from
        expected_coverage: the expected share of targets accepted at that
            threshold
        expected_precision: the expected precision of the accepted
            pre-labels
        precision_interval: ``(lower, upper)``, 95 % bounds on the
            precision of the accepted pre-labels, from the references (how
            often a pre-label of each confidence is right) and the targets
            (how many of each confidence there are); the lower one reached
            ``target_precision`` (the promise)
        num_accept_sample: the targets scored to choose the threshold (a
            random sample of at most ``constants.ACCEPT_SAMPLE``)
        num_accepted: targets accepted (the others are tagged for review)
        coverage: ``num_accepted / num_targets``
        propagation: what spreading the labels chose, with
            ``propagate=True``
        accept_score: in ``mode="adapted"``, what ranks the pre-labels
            for acceptance, chosen on the references: ``"adapted"``, or
            ``"adapted x frozen vote"`` (also the share of the vote of the
            neighbors in the frozen embeddings)
        near_duplicate_similarity: the similarity above which the
            references' neighbors were set aside when scoring them (their
            vote; in ``mode="adapted"`` their vote in the frozen
            embeddings, the adapter keeping copies in one fold), because
            the targets never get that close to theirs (near-duplicates
            among the references, see :mod:`prelabel.core.leakage`);
            ``inf`` when none were
        num_reference_trimmed: scored references that had neighbors set
            aside
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
    precision_interval: tuple[float, float] | None = None
    num_accepted: int | None = None
    coverage: float | None = None
    propagation: dict | None = None
    accept_score: str | None = None
    num_accept_sample: int | None = None
    near_duplicate_similarity: float | None = None
    num_reference_trimmed: int | None = None

    @property
    def promise(self) -> str | None:
        """What the accept threshold promises, in a sentence (None without
        a ``target_precision``)."""
        if self.target_precision is None:
            return None
        if not self.precision_interval:
            return (
                f"nothing accepted: the references do not show "
                f"{self.target_precision:.1%} precision with 95 % confidence "
                "at any confidence of the targets; label more samples or "
                f"lower the target{self._trimmed}"
            )
        low, high = self.precision_interval
        return (
            f"precision at least {self.target_precision:.1%} with 95 % "
            f"confidence (expected {self.expected_precision:.2%}, 95 % "
            f"bounds {low:.2%} to {high:.2%}){self._trimmed}"
        )

    @property
    def _trimmed(self) -> str:
        if not self.num_reference_trimmed:
            return ""
        return (
            f"; {self.num_reference_trimmed:,} references were scored "
            "without their neighbors closer than "
            f"{self.near_duplicate_similarity:.3f} (near-duplicates the "
            "targets do not have)"
        )


def check_options(
    mode: str = "knn",
    calibrate: bool = False,
    target_precision: float | None = None,
    propagate: bool = False,
) -> None:
    """Raises ``ValueError`` on a bad value of the quality options."""
    if mode not in constants.MODES:
        raise ValueError(
            f"mode={mode!r} is not supported; use one of {constants.MODES}"
        )
    if target_precision is not None and not (
        isinstance(target_precision, (int, float))
        and not isinstance(target_precision, bool)
        and 0.0 < float(target_precision) < 1.0
    ):
        raise ValueError(
            "target_precision must be a number between 0 and 1 (e.g. 0.99); "
            f"got {target_precision!r}"
        )
    for name, value in (("calibrate", calibrate), ("propagate", propagate)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False; got {value!r}")


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
    patches_field: str | None = None,
    calibration_reference=None,
    *,
    keep_open: contextlib.ExitStack | None = None,
):
    """Runs every check of :func:`preannotate` without writing a label, so
    that operator forms can show the reason before anything runs (a
    reference given as a view is selected in the index, marked in the
    payloads when it must be, as
    :func:`prelabel.neighbors.reference_filter` does).

    Args: as :func:`preannotate`, and
        keep_open (None): an ``ExitStack`` that keeps the embedded index
            open after the checks (for a caller that queries it next;
            loading a shard of 60,000 points takes about a second)

    Returns:
        ``(results, filter, num_reference, units)``: the similarity
        results, the payload filter of the reference set, its size, and
        the points (:class:`prelabel.units.Samples` or ``Patches``)

    Raises:
        ValueError: one sentence saying what is wrong and what to do
    """
    if vote not in constants.VOTES:
        raise ValueError(
            f"vote={vote!r} is not supported; use one of {constants.VOTES}"
        )
    validation.check_fraction(min_confidence, "min_confidence")
    validation.check_positive_int(batch_size, "batch_size")
    neighbors.check_reference(reference, targets)
    if eval_key is not None:
        validation.check_identifier(eval_key, "eval_key")
    check_options(mode, calibrate, target_precision, propagate)
    if calibration_reference is not None:
        neighbors.check_reference(
            calibration_reference, targets, "calibration_reference"
        )
        if target_precision is None and not calibrate and mode == "knn":
            raise ValueError(
                "calibration_reference chooses the references that "
                "calibrate; pass calibrate=True or a target_precision too, "
                "or leave it out"
            )
    points, label_field = units.resolve(targets, patches_field, label_field)
    if patches_field is not None:
        _check_box_options(mode, eval_key)
    results = neighbors.load_index(targets, index, brain_key, patches_field)
    # the checks below share one opening of an embedded index
    with contextlib.ExitStack() as own:
        (own if keep_open is None else keep_open).enter_context(
            Lease(results.index)
        )
        check_index(
            targets, results, sample_size=64, count=False
        ).raise_if_damaged()
        config = results.config
        if config.label_field != label_field:
            raise ValueError(
                f"label_field={label_field!r} but the index stores labels of "
                f"{config.label_field!r}; pass label_field="
                f"{config.label_field!r} or sync an index with this field"
            )
        if patches_field is None:
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
            types=((fo.EmbeddedDocumentField, points.result_doc),),
        )
        _check_targets_embedded(targets, results, points)
        flt, num_ref = neighbors.reference_filter(
            results, reference, label_field, points
        )
        if num_ref == 0:
            raise ValueError(
                f"the reference set is empty: no {points.noun} in the index "
                f"has a label in {label_field!r}"
                + (f" and the tag(s) {reference!r}" if reference else "")
                + f"; label some {points.plural} first (and sync the index)"
            )
        validation.check_k(k, num_ref)
        if calibration_reference is not None and patches_field is None:
            _check_calibration_reference(
                targets, calibration_reference, reference, label_field
            )
        return results, flt, num_ref, points


def _check_calibration_reference(targets, chosen, reference, label_field):
    """Some labeled sample that votes is among ``chosen`` (a tag, tags or
    a view)."""
    voters = neighbors.reference_view(
        targets._root_dataset, reference, label_field
    )
    if isinstance(chosen, (str, list, tuple)):
        both = voters.match_tags(chosen)
    else:  # a view: usually the few random picks
        both = voters.select(
            validation.labeled(chosen, label_field).values("id")
        )
    if not both.limit(1).count():  # counted in the database
        raise ValueError(
            "calibration_reference selects none of the references that "
            "vote; pass a tag or view of labeled references"
        )


def _check_box_options(mode, eval_key) -> None:
    """Refuses the options that are for image labels only."""
    if mode != "knn":
        raise ValueError(
            f"mode={mode!r} learns from whole-image labels; boxes are "
            "pre-annotated with mode='knn' (calibrate and target_precision "
            "apply)"
        )
    if eval_key is not None:
        raise ValueError(
            "eval_key evaluates image-level pre-labels; for boxes, compare "
            "the pre-label field with your ground truth (e.g. "
            "evaluate_detections), or leave eval_key out"
        )


def _check_targets_embedded(targets, results, points) -> None:
    emb_field = results.config.embeddings_field
    path = points.path(targets, emb_field)
    dim = validation.check_embeddings_field(targets, path)
    if results.index.dim is not None and dim != results.index.dim:
        raise ValueError(
            f"the targets' {path!r} are {dim}-d but the index holds "
            f"{results.index.dim}-d vectors; recompute embeddings with the "
            "index's model or sync a new brain key"
        )
    embedded, total = points.coverage(targets, emb_field)
    missing = total - embedded
    if missing:
        raise ValueError(
            f"{missing} targets have no {path!r}; run compute_embeddings "
            "on them first"
        )


@dataclass
class _Run:
    """A pre-annotation as the checks resolved it: what every stage of the
    path reads, passed down once."""

    targets: object
    results: object
    flt: object
    reference: object
    label_field: str
    pred_field: str
    k: int
    vote: str
    min_confidence: float | None
    eval_key: str | None
    batch_size: int
    progress: ProgressArg
    calibrate: bool
    target_precision: float | None
    propagate: bool
    mode: str
    overwrite: bool
    units: units.Samples
    calibration_reference: object = None

    @property
    def dataset(self):
        return self.targets._dataset

    @property
    def root(self):
        return self.targets._root_dataset


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
    patches_field: str | None = None,
    calibration_reference=None,
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
            it helps (:func:`prelabel.scorers.propagate`; holds every
            reference and target in memory, at most 100,000)
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
        patches_field (None): pre-annotate the boxes of this
            ``Detections`` field instead of whole images, each by its
            nearest labeled boxes in an index of them
            (``sync_index(..., patches_field=...)``): every box of
            ``targets`` (filter them, e.g. to unlabeled boxes, with
            ``filter_labels``) gets a ``fo.Detection`` on the same box in
            ``pred_field`` (a ``Detections`` field of its own, linked by
            ``source_id``; the boxes themselves are never modified), with
            the attributes above; a box left for review carries the label
            tag ``needs_review``. The labels of ``patches_field`` vote
            (``label_field`` does not apply), ``mode="knn"`` only
        calibration_reference (None): the references whose held-out scores
            fit the calibration and the accept threshold (a tag, list of
            tags or view; every reference still votes). Default: all of
            them. Pass the references that were picked at random (the tag
            ``to_label_random`` of :func:`prelabel.select_for_labeling`)
            when the others were chosen for being hard or typical: only a
            fair sample of the targets measures their precision without
            bias

    Returns:
        a :class:`PreannotationResult`
    """
    t0 = time.perf_counter()
    with contextlib.ExitStack() as held:
        results, flt, _, points = check_preannotate(
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
            patches_field=patches_field,
            calibration_reference=calibration_reference,
            keep_open=held,
        )
        run = _Run(
            targets,
            results,
            flt,
            reference,
            points.label_field(label_field),
            pred_field,
            k,
            vote,
            min_confidence,
            eval_key,
            batch_size,
            progress,
            calibrate or mode == "adapted",
            target_precision,
            propagate,
            mode,
            overwrite,
            points,
            calibration_reference,
        )
        if mode != "knn":
            # learning the adapted space takes a while, and the adapted
            # index answers: give the checked one back now
            held.close()
        scorer, frozen = _scorers(run)
        out = PreannotationResult(
            pred_field=pred_field,
            classes=scorer.classes,
            mode=mode,
            brain_key=scorer.results.key,
        )
        # one opening of the scorer's index for the checks, the references'
        # verdict and the targets (the streams inside give it back every few
        # seconds)
        with Lease(scorer.results.index):
            verdict = _verdict(run, scorer, frozen, out)
            _write(run, scorer, verdict, out)
        held.close()
        if eval_key is not None:
            t1 = time.perf_counter()
            out.eval_key = eval_key
            out.accuracy = evaluate(
                targets, pred_field, label_field, eval_key, out.classes
            )
            out.seconds["evaluate"] = time.perf_counter() - t1
    out.seconds["total"] = time.perf_counter() - t0
    return out


def _scorers(run: _Run):
    """The scorer of the targets, and in adapted mode a scorer of the
    frozen index (the second opinion that may rank acceptance)."""
    results, flt = run.results, run.flt
    frozen = None
    if run.mode == "adapted":
        frozen = (results, flt)
        try:
            results = adapt.adapt_index(
                run.root,
                results,
                run.reference,
                run.label_field,
                run.progress,
            )
        except ValueError as e:
            if "out_field=" not in str(e):
                raise
            raise ValueError(
                f"mode='adapted' writes its embeddings to a field named "
                f"after the index's; {e}. From preannotate: delete or "
                "rename that field, or call prelabel.adapt_index(dataset, "
                "..., overwrite=True) once first"
            ) from e
        flt, _ = neighbors.reference_filter(
            results, run.reference, run.label_field
        )
    classes = neighbors.reference_classes(results, flt)
    adapter = adapt.load_adapter(run.root, results.config.embeddings_field)
    args = (results, flt, classes, run.k, run.vote)
    if adapter is None:
        return scorers.VoteScorer(*args, run.units), None
    scorer = scorers.AdaptedScorer(*args, adapter)
    if frozen is not None:
        frozen = scorers.VoteScorer(*frozen, classes, run.k, run.vote)
    return scorer, frozen


@dataclass
class _Verdict:
    """What the references decided, before any target is written."""

    cal: calibration.Calibration | None = None
    calibrate: bool = False
    threshold: float | None = None
    spreading: scorers.Spreading | None = None
    #: the targets' scored chunks when spreading kept them (it holds every
    #: target for its graph anyway), so the targets are queried once
    target_chunks: list | None = None
    frozen: scorers.VoteScorer | None = None
    extra: dict = field(default_factory=dict)

    @property
    def scored(self) -> bool:
        return self.cal is not None


def _verdict(run: _Run, scorer, frozen, out) -> _Verdict:
    """Scores the references (each without its own label) and fits on them
    what the targets need: spreading, the accept score, the calibrator and
    the accept threshold. A plain vote needs none of it."""
    scored = (
        run.mode != "knn"
        or run.calibrate
        or run.propagate
        or run.target_precision is not None
        or isinstance(scorer, scorers.AdaptedScorer)
    )
    verdict = _Verdict(calibrate=run.calibrate)
    if not scored:
        verdict.extra = _record_extra(run, verdict, None, None)
        return verdict
    t0 = time.perf_counter()
    sample, num_targets = _target_sample(run, scorer)
    top = [c.neighbors.sims[:, 0] for c in sample if len(c.probs)]
    refs = scorer.score_references(
        run.dataset, target_top=np.concatenate(top) if top else None
    )
    out.seconds["reference_scores"] = time.perf_counter() - t0
    if run.propagate:
        verdict.spreading, verdict.target_chunks = _spread(
            run, scorer, refs, out
        )
        out.propagation = verdict.spreading.record()
    conf_ref = refs.confidence
    if frozen is not None:
        t1 = time.perf_counter()
        out.accept_score, conf_ref = scorers.choose_accept_score(
            refs,
            frozen,
            run.root,
            scorer.classes,
            run.k,
            run.vote,
            run.target_precision or constants.DEFAULT_TARGET_PRECISION,
            [sid for c in sample for sid in c.neighbors.ids],
        )
        if out.accept_score != "adapted":
            verdict.frozen = frozen
        out.seconds["accept_score"] = time.perf_counter() - t1
    out.near_duplicate_similarity = refs.closer_than
    out.num_reference_trimmed = refs.num_trimmed
    fair = _calibration_rows(run, refs.ids)
    correct = refs.correct[fair]
    conf_ref = conf_ref[fair]
    verdict.cal = cal = calibration.calibrate(conf_ref, correct)
    if run.target_precision is not None:
        t1 = time.perf_counter()
        target_conf = _sample_confidence(run, sample, verdict)
        out.num_accept_sample = int(target_conf.size)
        cal.set_acceptance(
            calibration.target_accept_threshold(
                conf_ref,
                correct,
                target_conf,
                run.target_precision,
                num_targets,
            ),
            run.target_precision,
        )
        out.seconds["accept_threshold"] = time.perf_counter() - t1
        verdict.threshold = cal.threshold
        out.target_precision = float(run.target_precision)
        out.accept_threshold = cal.threshold
        out.expected_coverage = cal.expected_coverage
        out.expected_precision = cal.expected_precision
        out.precision_interval = cal.precision_interval
    out.calibrated = run.calibrate
    out.reference_accuracy = cal.reference_accuracy
    out.ece_raw = cal.ece_raw
    out.ece = cal.ece_calibrated if run.calibrate else cal.ece_raw
    out.num_reference_scored = cal.num_scored
    verdict.extra = _record_extra(run, verdict, out, conf_ref, correct)
    return verdict


def _target_sample(run: _Run, scorer) -> tuple[list, int]:
    """A random sample of the targets (at most ``constants.ACCEPT_SAMPLE``)
    scored in chunks (their vectors dropped): how close the targets get to
    their nearest reference, which the references' scores must not beat
    (:mod:`prelabel.core.leakage`), and what the accept threshold is
    chosen for (:func:`_sample_confidence`). Returns ``(chunks, number
    of targets)``."""
    ids = run.units.ids(run.targets)
    rows = leakage.sample_rows(len(ids), constants.ACCEPT_SAMPLE)
    chunks = []
    for chunk in scorer.stream(
        run.dataset, [ids[i] for i in rows], run.batch_size
    ):
        chunk.neighbors.vectors = None
        chunks.append(chunk)
    return chunks, len(ids)


def _sample_confidence(run: _Run, chunks, verdict: _Verdict) -> np.ndarray:
    """The raw confidences of the sampled targets as the writer will
    compute them (after spreading, times the frozen vote's share); ``nan``
    where a target would get no label."""
    conf = []
    for chunk in chunks:
        scale = _prepare(run, chunk, verdict)
        conf.append(_accept_confidence(chunk, verdict, run, scale))
    return np.concatenate(conf) if conf else np.zeros(0)


def _accept_confidence(chunk, verdict: _Verdict, run: _Run, scale):
    """What the accept threshold is compared with, per row of a chunk
    (:func:`raw_confidence`), ``nan`` where no label is written (no vote,
    or under ``min_confidence``)."""
    raw = raw_confidence(chunk, scale)
    if run.min_confidence is not None:
        conf = raw
        if verdict.calibrate and verdict.cal is not None:
            conf = verdict.cal.calibrator(raw)
        raw[conf < run.min_confidence] = np.nan
    return raw


def raw_confidence(chunk, scale=None) -> np.ndarray:
    """The raw confidence of each row of a chunk: the winner's share of
    the written distribution, times ``scale`` (the frozen vote's share,
    when the references chose it); ``nan`` for a row with no vote."""
    probs = chunk.probs
    raw = probs[np.arange(len(probs)), chunk.winners].astype(np.float64)
    if scale is not None:
        raw = raw * np.asarray(scale, dtype=np.float64)
    raw[probs.sum(axis=1) <= 0] = np.nan
    return raw


def _calibration_rows(run: _Run, ref_ids) -> np.ndarray:
    """The rows of the scored references that calibrate: every one, or
    those of ``calibration_reference``."""
    chosen = run.calibration_reference
    if chosen is None:
        return np.arange(len(ref_ids))
    if isinstance(chosen, (str, list, tuple)):
        chosen = run.root.match_tags(chosen)
    points = run.units.ids(chosen)
    wanted = set(points)
    rows = np.array(
        [i for i, sid in enumerate(ref_ids) if sid in wanted], dtype=np.int64
    )
    if not rows.size:
        raise ValueError(
            "calibration_reference selects none of the references that "
            "vote; pass a tag or view of labeled references"
        )
    return rows


def _spread(run: _Run, scorer, refs, out):
    """The pass over the targets that spreading needs: every target's
    score, for the graph. Returns the spreading and the scored chunks
    (without their vectors), which the writer uses instead of querying
    the targets again."""
    t0 = time.perf_counter()
    ids, priors, chunks = [], [], []
    for chunk in scorer.stream(
        run.dataset,
        run.units.ids(run.targets),
        run.batch_size,
        run.progress,
        "Scoring targets for label spreading",
    ):
        ids.extend(chunk.neighbors.ids)
        priors.append(chunk.probs)
        chunk.neighbors.vectors = None  # the graph reads its own
        chunks.append(chunk)
    adapter = getattr(scorer, "adapter", None)
    # the graph is built on the frozen embeddings in adapted mode
    src = adapter.info.get("embeddings_field") if adapter else scorer.field
    spreading = scorers.propagate(
        run.root,
        src,
        refs,
        ids,
        np.vstack(priors) if priors else np.zeros((0, len(scorer.classes))),
        scorer.classes,
        run.units,
    )
    out.seconds["propagate"] = time.perf_counter() - t0
    return spreading, chunks


def _record_extra(run, verdict, out, conf_ref, correct=None) -> dict:
    """The run record's entries on how the pre-labels were scored."""
    cal = verdict.cal
    if cal is None:
        return {"mode": run.mode, "calibrate": False}
    written = cal.calibrator(conf_ref) if run.calibrate else conf_ref
    return {
        "mode": run.mode,
        "calibrate": bool(run.calibrate),
        "calibrator": cal.calibrator.to_dict() if run.calibrate else None,
        "target_precision": run.target_precision,
        "accept_threshold": cal.threshold,
        "expected_coverage": cal.expected_coverage,
        "expected_precision": cal.expected_precision,
        "precision_interval": cal.precision_interval,
        # the references' held-out curve, in the written confidence
        "expected_curve": calibration.curve_points(written, correct),
        "num_calibration": int(len(correct)),
        "num_accept_sample": out.num_accept_sample,
        "near_duplicate_similarity": out.near_duplicate_similarity,
        "num_reference_trimmed": out.num_reference_trimmed,
        "propagation": out.propagation,
        "accept_score": out.accept_score,
        "calibration_reference": neighbors.describe_reference(
            run.calibration_reference
        ),
    }


def _write(run: _Run, scorer, verdict: _Verdict, out) -> None:
    """The targets, chunk by chunk: scored, classified and written aside;
    swapped in with the run record when every chunk succeeded."""
    dataset = run.dataset
    ids = run.units.ids(run.targets)
    out.num_targets = len(ids)
    review_ids, accepted = [], 0
    t_query = t_write = 0.0
    record = run_record(
        scorer.results.key,
        run.label_field,
        run.k,
        run.vote,
        scorer.classes,
        run.min_confidence,
        run.reference,
        extra=dict(verdict.extra, patches_field=run.units.patches_field),
    )
    staged = {run.pred_field: run.units.result_type}
    with (
        staged_fields(dataset, staged) as stage,
        Behind() as writes,
    ):
        stage.record(records.RUNS, run.pred_field, record)
        writer = run.units.writer(dataset, stage[run.pred_field], ids)
        t0 = time.perf_counter()
        for chunk in _target_chunks(run, scorer, verdict, ids):
            scale = _prepare(run, chunk, verdict)
            t1 = time.perf_counter()
            labels, review, acc = classify(
                chunk, verdict, run.min_confidence, scale
            )
            accepted += acc
            out.num_labeled += sum(lbl is not None for lbl in labels)
            chunk_review = [
                s
                for s, r in zip(chunk.neighbors.ids, review, strict=True)
                if r
            ]
            review_ids.extend(chunk_review)
            # written in a thread while the next chunk is queried
            writes.put(
                writer.write,
                dict(zip(chunk.neighbors.ids, labels, strict=True)),
                chunk_review,
            )
            t2 = time.perf_counter()
            t_query += t1 - t0
            t_write += t2 - t1
            t0 = t2
        t3 = time.perf_counter()
        writes.wait()
        writer.close()
    if run.units.patches_field is None:  # what the panel reads fast
        label_indexes.ensure(dataset, (run.label_field, run.pred_field))
    t_write += time.perf_counter() - t3  # the swap of the field, indexes
    run.units.tag_for_review(dataset, review_ids)
    out.num_review = len(review_ids)
    if verdict.threshold is not None:
        out.num_accepted = accepted
        out.coverage = accepted / out.num_targets if out.num_targets else None
    out.seconds.update(query_vote=t_query, write=t_write)


def _target_chunks(run: _Run, scorer, verdict: _Verdict, ids):
    """The targets' scored chunks: queried now, or kept by spreading."""
    if verdict.target_chunks is None:
        yield from scorer.stream(
            run.dataset, ids, run.batch_size, run.progress, "Pre-annotating"
        )
        return
    with Progress(run.progress, len(ids), "Pre-annotating") as bar:
        while verdict.target_chunks:
            chunk = verdict.target_chunks.pop(0)
            yield chunk
            bar.update(len(chunk.neighbors.ids))


def _prepare(run: _Run, chunk, verdict: _Verdict):
    """The chunk's distributions after spreading, and the factor of each
    raw confidence (the frozen vote's share of the winner) if the
    references chose it."""
    spreading = verdict.spreading
    if spreading is not None and spreading.probs is not None:
        chunk.probs = np.stack(
            [spreading.probs[s] for s in chunk.neighbors.ids]
        )
    if verdict.frozen is None:
        return None
    return scorers.frozen_share(
        verdict.frozen,
        run.root,
        chunk.neighbors.ids,
        chunk.winners,
        chunk.votes.classes,
        run.k,
        run.vote,
    )


def classify(chunk, verdict=None, min_confidence=None, scale=None):
    """The results of a chunk (the attributes of each target's
    ``fo.Classification``, or None: no label), which targets need review,
    and how many were accepted.

    Args:
        chunk: a :class:`prelabel.scorers.ChunkScores`
        verdict (None): what the references decided (calibrator,
            threshold); None for the plain vote
        min_confidence (None): below it (after calibration) no label is
            written
        scale (None): a factor of each row's raw confidence

    Returns:
        ``(labels, review flags, number accepted)``
    """
    verdict = verdict or _Verdict()
    probs, votes = chunk.probs, chunk.votes
    classes = votes.classes
    log_probs = logits(probs)
    wins = winners(probs, votes)
    raws = raw_confidence(chunk, scale)
    cal = verdict.cal if verdict.calibrate else None
    labels, review, accepted = [], [], 0
    for i in range(len(probs)):
        if np.isnan(raws[i]):
            labels.append(None)
            review.append(True)
            continue
        w = int(wins[i])
        raw = float(raws[i])
        conf = float(cal.calibrator(raw)) if cal is not None else raw
        if min_confidence is not None and conf < min_confidence:
            labels.append(None)
            review.append(True)
            continue
        attrs = dict(
            label=classes[w],
            confidence=conf,
            logits=log_probs[i],
            votes=votes.summary(i),
            neighbors=list(chunk.neighbors.neighbor_ids[i]),
        )
        if verdict.scored:
            attrs["vote_share"] = float(votes.probs[i, w])
        if cal is not None:
            attrs["raw_confidence"] = raw
        ok = True
        if verdict.threshold is not None:
            ok = raw >= verdict.threshold
            attrs["accepted"] = bool(ok)
            accepted += int(ok)
        labels.append(attrs)
        review.append(not ok)
    return labels, review, accepted


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
    return {
        # which run of a label field is the latest (select_for_labeling)
        "timestamp": datetime.now(UTC).isoformat(),
        "brain_key": brain_key,
        "label_field": label_field,
        "k": k,
        "vote": vote,
        "classes": classes,
        "min_confidence": min_confidence,
        "reference": neighbors.describe_reference(reference),
        **(extra or {}),
    }


# names that lived here before the neighbor loop had a module of its own
__getattr__ = moved(
    __name__,
    {
        "resolve_index": "prelabel.neighbors:load_index",
        "reference_filter": "prelabel.neighbors",
    },
)
