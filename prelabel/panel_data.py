"""What the mistakes panel shows, computed from a dataset: no App code.

The panel (``panels/mistakes_panel.py``) only renders what these functions
return and calls them on each click, so every number on screen can be
checked from Python, and a script gets the same rows, counts, confusion
matrix and coverage curve as the App.

Two modes review two kinds of disagreement:

- ``"prelabel"``: pre-labels (a field written by :func:`prelabel.preannotate`)
  that disagree with ground truth, most confident first;
- ``"suspicious"``: labeled samples whose neighbors' majority (the field
  written by :func:`prelabel.find_label_mistakes`) is another label, most
  suspicious first.

A third, ``"label_next"`` (:func:`label_next`), lists the latest picks of
:func:`prelabel.select_for_labeling`: why each was picked and which ones a
person has labeled since.

Everything is computed over the whole dataset, never the App's current
view: the panel sets that view itself (a row's neighbors, a confusion
cell), and its list must not shrink to what it just showed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import fiftyone as fo
import numpy as np
from fiftyone import ViewField as F

from prelabel import constants, label_indexes, records, validation
from prelabel.core.calibration import precision_curve
from prelabel.core.voting import natural_key
from prelabel.deprecation import moved
from prelabel.fields import check_output_field
from prelabel.mistakes import disagreeing_labels, high_confidence_mistakes

#: what the panel reviews (its two modes) and what it calls them; not to
#: be confused with ``constants.MODES``, how pre-annotation scores
REVIEWS = {
    "prelabel": "Pre-label mistakes",
    "suspicious": "Suspicious labels",
}

#: the mode listing what to label next (not a review: no ground truth to
#: disagree with, only picks)
LABEL_NEXT = "label_next"

#: the panel's tabs: the two reviews, then what to label next
PANEL_MODES = {**REVIEWS, LABEL_NEXT: "Label next"}

#: what one row of each mode is called in the summary
NOUNS = {
    "prelabel": ("mistake", "mistakes"),
    "suspicious": ("label", "labels"),
}

#: the tags the panel's bulk actions write
TAGS = ("label_error", "prelabel_ok", constants.REVIEW_TAG)

#: the confusion matrix's row/column for a missing label (FiftyOne's name)
MISSING = "(none)"

#: the default precision that pre-labels must keep to be accepted unseen
DEFAULT_TARGET_PRECISION = constants.DEFAULT_TARGET_PRECISION

#: the summary counts the rows whose score is above this
DEFAULT_HIGH = 0.9


@dataclass(frozen=True)
class Source:
    """The fields one mode reads.

    Attributes:
        mode: ``"prelabel"`` or ``"suspicious"``
        gt_field: the ground-truth Classification field (for boxes, the
            patches field whose labels are under test)
        pred_field: the Classification field compared with ground truth:
            the pre-labels, or the neighbors' majority (``<score>_label``)
        score_field: the float score field (suspicious mode), or None when
            the score is the pre-label's confidence
        boxes: for boxes scored by ``find_label_mistakes(...,
            patches_field=...)``, that patches field: a row is then one box
            of ``score_field`` (a Detections field holding each box's own
            label, its score and its neighbors' majority), shown in a
            patches view
    """

    mode: str
    gt_field: str
    pred_field: str
    score_field: str | None = None
    boxes: str | None = None

    def rows(self, dataset):
        """The collection whose samples are the rows: the dataset, or
        the patches view of the scored boxes."""
        return dataset.to_patches(self.score_field) if self.boxes else dataset

    @property
    def gt_path(self) -> str:
        """The label under test, or the ground truth."""
        if self.boxes:
            return f"{self.score_field}.label"
        return f"{self.gt_field}.label"

    @property
    def pred_path(self) -> str:
        """The label compared with it."""
        if self.boxes:
            return f"{self.score_field}.neighbors_label"
        return f"{self.pred_field}.label"

    def path(self, attr: str) -> str:
        """An attribute of the compared label (``votes``, ``neighbors``)."""
        return f"{self.score_field if self.boxes else self.pred_field}.{attr}"

    @property
    def score_path(self) -> str:
        """The field that ranks the rows (higher first)."""
        if self.boxes:
            return f"{self.score_field}.score"
        return self.score_field or f"{self.pred_field}.confidence"


@dataclass(frozen=True)
class Filters:
    """What the panel's filters keep.

    Attributes:
        min_score: rows with a confidence (or score) at least this
        truth: rows of this ground-truth class only (None: any)
        pred: rows of this predicted / majority class only (None: any)
    """

    min_score: float = 0.0
    truth: str | None = None
    pred: str | None = None


@dataclass
class Summary:
    """Counts of the filtered rows.

    Attributes:
        mode: the mode counted
        count: rows that pass the filters
        high_count: of those, rows whose score is above ``high``
        high: the score of ``high_count``
    """

    mode: str
    count: int
    high_count: int
    high: float = DEFAULT_HIGH

    @property
    def text(self) -> str:
        """``"312 mistakes, 41 above 0.9"``."""
        one, many = NOUNS[self.mode]
        noun = one if self.count == 1 else many
        if self.mode == "suspicious":
            noun = f"suspicious {noun}"
        return (
            f"{self.count:,} {noun}, {self.high_count:,} above {self.high:g}"
        )


@dataclass
class Confusion:
    """A confusion matrix: rows are ground truth, columns predictions.

    Attributes:
        classes: the row and column labels
        counts: int array (C, C)
    """

    classes: list[str]
    counts: np.ndarray

    def normalized(self) -> np.ndarray:
        """Each row divided by its sum (rows without samples stay 0)."""
        sums = self.counts.sum(axis=1, keepdims=True)
        return np.divide(
            self.counts,
            sums,
            out=np.zeros(self.counts.shape, dtype=float),
            where=sums > 0,
        )


@dataclass
class Coverage:
    """Precision versus coverage of pre-labels accepted above a confidence.

    Point ``i`` accepts every pre-label with confidence
    ``>= thresholds[i]``: ``coverage[i]`` is the share of samples accepted,
    ``precision[i]`` the share of those that are right. Thresholds are the
    distinct confidences, highest first, so coverage only grows.

    Attributes:
        thresholds: float array, strictly decreasing
        coverage: float array, strictly increasing, ending at 1
        precision: float array
        num_samples: pre-labels with ground truth in the curve
        target: the precision asked for
        threshold: the lowest threshold whose accepted pre-labels keep
            ``target`` precision (the most coverage), or None if none does
        coverage_at_target: the coverage at ``threshold`` (0 if None)
        precision_at_target: the precision at ``threshold`` (None if None)
    """

    thresholds: np.ndarray
    coverage: np.ndarray
    precision: np.ndarray
    num_samples: int
    target: float
    threshold: float | None
    coverage_at_target: float
    precision_at_target: float | None

    @property
    def text(self) -> str:
        """One sentence a person decides with."""
        if self.num_samples == 0:
            return "No pre-label with ground truth to measure yet."
        if self.threshold is None:
            return (
                f"No confidence threshold reaches {self.target:.1%} "
                f"precision on these {self.num_samples:,} samples."
            )
        return (
            f"Accept pre-labels with confidence ≥ {self.threshold:.3f}: "
            f"{self.coverage_at_target:.1%} of {self.num_samples:,} "
            f"samples at {self.precision_at_target:.1%} precision "
            f"(target {self.target:.1%})."
        )


# ---- what can be reviewed ---------------------------------------------


def prelabel_runs(dataset) -> dict:
    """The run records of the pre-label fields: field -> run info."""
    return records.read(dataset, records.RUNS)


def eval_keys_for(dataset, pred_field: str) -> list[str]:
    """The classification evaluations of ``pred_field``."""
    keys = []
    for key in dataset.list_evaluations():
        config = dataset.get_evaluation_info(key).config
        if (
            getattr(config, "pred_field", None) == pred_field
            and getattr(config, "type", None) == "classification"
        ):
            keys.append(key)
    return keys


def find_sources(dataset) -> dict:
    """What this dataset can be reviewed with.

    Returns:
        a dict with ``"prelabel"``: the pre-label fields (those recorded by
        :func:`prelabel.preannotate` that still exist), and
        ``"suspicious"``: the score fields written by
        :func:`prelabel.find_label_mistakes` (a float field ``X`` next to a
        Classification field ``X_label``, or the Detections field of
        scored boxes)
    """
    schema = dataset.get_field_schema()
    classifications = {
        name
        for name, f in schema.items()
        if getattr(f, "document_type", None) is fo.Classification
    }
    prelabel = [f for f in prelabel_runs(dataset) if f in classifications]
    suspicious = sorted(
        name
        for name, f in schema.items()
        if isinstance(f, fo.FloatField) and f"{name}_label" in classifications
    )
    suspicious += sorted(_box_scores(dataset))
    return {"prelabel": prelabel, "suspicious": suspicious}


def _box_scores(dataset) -> dict[str, str]:
    """Score fields of boxes that still exist -> their patches field."""
    schema = dataset.get_field_schema(embedded_doc_type=fo.Detections)
    return {
        name: rec["patches_field"]
        for name, rec in records.read(dataset, records.MISTAKES).items()
        if rec.get("patches_field") and name in schema
    }


def default_gt_field(dataset, pred_field: str | None = None) -> str:
    """The ground truth a pre-label field was voted with, else the label
    field of any pre-annotation run or prelabel index, else
    ``ground_truth``."""
    runs = prelabel_runs(dataset)
    if pred_field in runs and runs[pred_field].get("label_field"):
        return runs[pred_field]["label_field"]
    for run in runs.values():
        if run.get("label_field"):
            return run["label_field"]
    for key in dataset.list_brain_runs(
        type="similarity", method=constants.BACKEND_NAME
    ):
        label_field = dataset.get_brain_info(key).config.label_field
        if label_field:
            return label_field
    return constants.DEFAULT_LABEL_FIELD


def make_source(
    dataset,
    mode: str,
    pred_field: str | None = None,
    gt_field: str | None = None,
    score_field: str | None = None,
) -> Source | None:
    """The :class:`Source` of ``mode``, its missing fields defaulted from
    what the dataset holds; None if the dataset has nothing to review in
    that mode.

    Raises:
        ValueError: an unknown mode, or a field given that cannot be read
    """
    if mode not in REVIEWS:
        raise ValueError(f"mode={mode!r} is not one of {list(REVIEWS)}")
    sources = find_sources(dataset)
    if mode == "prelabel":
        fields = sources["prelabel"]
        if pred_field is None:
            pred_field = (
                constants.DEFAULT_PRED_FIELD
                if constants.DEFAULT_PRED_FIELD in fields
                else (fields[0] if fields else None)
            )
        if pred_field is None:
            return None
        gt_field = gt_field or default_gt_field(dataset, pred_field)
        source = Source(mode, gt_field, pred_field)
    else:
        fields = sources["suspicious"]
        if score_field is None:
            score_field = (
                constants.DEFAULT_SCORE_FIELD
                if constants.DEFAULT_SCORE_FIELD in fields
                else (fields[0] if fields else None)
            )
        if score_field is None:
            return None
        boxes = _box_scores(dataset).get(score_field)
        if boxes:
            return Source(mode, boxes, score_field, score_field, boxes)
        gt_field = gt_field or default_gt_field(dataset)
        source = Source(mode, gt_field, f"{score_field}_label", score_field)
    validation.check_classification_field(dataset, source.gt_field, "gt_field")
    validation.check_classification_field(
        dataset, source.pred_field, "pred_field"
    )
    return source


def data_version(dataset) -> str:
    """Changes whenever a field, a run or a sample of ``dataset`` changes
    (two indexed lookups), so a panel knows when to reload."""
    dataset.reload()
    newest = dataset.max("last_modified_at") if len(dataset) else None
    return f"{dataset.last_modified_at}|{newest}|{len(dataset)}"


# ---- the list ---------------------------------------------------------


def mistakes_view(dataset, source: Source, filters: Filters | None = None):
    """The rows of ``source`` that pass ``filters``, most confident (or
    suspicious) first; ties in sample order, so pages are stable.

    Pre-label mode is :func:`prelabel.high_confidence_mistakes`, suspicious
    mode :func:`prelabel.disagreeing_labels`.
    """
    filters = filters or Filters()
    gt, pred = F(source.gt_path), F(source.pred_path)
    if source.mode == "prelabel":
        view = high_confidence_mistakes(
            dataset,
            source.pred_field,
            source.gt_field,
            min_confidence=filters.min_score,
        )
    else:
        view = disagreeing_labels(
            dataset,
            source.score_field,
            None if source.boxes else source.gt_field,
            min_score=filters.min_score,
        )
    if filters.truth is not None:
        view = view.match(gt == filters.truth)
    if filters.pred is not None:
        view = view.match(pred == filters.pred)
    return view.sort_by([(source.score_path, -1), ("_id", 1)])


@dataclass
class Page:
    """The first rows of a :func:`mistakes_view` and the counts of all.

    Attributes:
        rows: see :func:`list_rows`
        summary: see :func:`summarize`
        classes: the labels (either side) among all the rows, in natural
            order
    """

    rows: list[dict]
    summary: Summary
    classes: list[str]


def page(
    view,
    source: Source,
    limit: int | None = 100,
    high: float = DEFAULT_HIGH,
) -> Page:
    """The first ``limit`` rows of ``view`` (a :func:`mistakes_view`), the
    counts and the labels of all its rows, from one pass over the samples
    (ids, scores, labels) and a lookup of the shown rows by id."""
    ids, scores, truth, pred = view.values(
        ["id", source.score_path, source.gt_path, source.pred_path]
    )
    labels = (set(truth) | set(pred)) - {None}
    known = np.asarray([s for s in scores if s is not None], dtype=float)
    summary = Summary(
        source.mode,
        count=len(known),
        high_count=int(np.count_nonzero(known > high)),
        high=high,
    )
    shown = ids if limit is None else ids[: max(int(limit), 0)]
    # the shown rows by id, from the collection without the view's stages
    rows = getattr(view, "_base_view", view)
    return Page(
        _rows_of(rows, shown, source),
        summary,
        sorted(labels, key=natural_key),
    )


def _rows_of(rows, ids: list[str], source: Source) -> list[dict]:
    """The table rows of the samples (or boxes) ``ids`` of ``rows``, in
    that order."""
    if not ids:
        return []
    found = rows.select(ids, ordered=True).values(
        [
            "id",
            "filepath",
            source.gt_path,
            source.pred_path,
            source.score_path,
            source.path("votes"),
        ]
    )
    return [
        {
            "id": sid,
            "filename": os.path.basename(path),
            "truth": t,
            "pred": p,
            "score": None if s is None else round(float(s), 4),
            "votes": v or "",
        }
        for sid, path, t, p, s, v in zip(*found, strict=True)
    ]


def list_rows(view, source: Source, limit: int | None = 100) -> list[dict]:
    """The table rows of the first ``limit`` samples (or boxes) of
    ``view`` (a :func:`mistakes_view`): ``id``, ``filename``, ``truth``,
    ``pred``, ``score`` and ``votes`` (``"7: 12, 1: 3"``)."""
    return page(view, source, limit).rows


def summarize(view, source: Source, high: float = DEFAULT_HIGH) -> Summary:
    """Counts of ``view`` (a :func:`mistakes_view`)."""
    return page(view, source, 0, high).summary


def class_choices(dataset, source: Source) -> list[str]:
    """Every label of the ground truth or the compared field among the
    rows (the unfiltered :func:`mistakes_view`), in natural order (``"2"``
    before ``"10"``): the classes the class filters can find."""
    return page(mistakes_view(dataset, source), source, 0).classes


def evidence_view(dataset, sample_id: str, source: Source):
    """The sample and, after it, the neighbors that voted for it, in their
    order (closest first): the evidence behind its row. For a box, a
    patches view of the index's boxes: the box, then its neighbors."""
    rows = source.rows(dataset)
    values = rows.select(sample_id).values(source.path("neighbors"))
    if not values:
        raise ValueError(f"sample {sample_id!r} is not in this dataset")
    if source.boxes:
        (own,) = rows.select(sample_id).values(source.path("source_id"))
        rows, sample_id = dataset.to_patches(source.boxes), own
    neighbors = [n for n in (values[0] or []) if n != sample_id]
    return rows.select([sample_id] + neighbors, ordered=True)


# ---- evaluation: confusion matrix and coverage -------------------------


def evaluation_scope(
    dataset, pred_field: str, gt_field: str, eval_key: str | None = None
):
    """The samples an evaluation covers: its evaluation view, or without
    ``eval_key`` every sample with both a pre-label and ground truth."""
    if eval_key:
        if eval_key not in dataset.list_evaluations():
            raise ValueError(
                f"eval_key={eval_key!r} is not an evaluation of dataset "
                f"'{dataset.name}'; run kNN pre-annotate with an eval key"
            )
        return dataset.load_evaluation_view(eval_key)
    return dataset.match(label_indexes.present(gt_field, pred_field))


def _eval_classes(dataset, pred_field, eval_key) -> list[str]:
    classes = prelabel_runs(dataset).get(pred_field, {}).get("classes")
    if not classes and eval_key:
        classes = dataset.load_evaluation_results(eval_key).classes
    return [str(c) for c in (classes or [])]


@dataclass
class _Columns:
    """The evaluated samples' labels, read once for every chart."""

    truth: list
    pred: list
    conf: list
    accepted: list


def _scope_columns(dataset, pred_field, gt_field, eval_key) -> _Columns:
    scope = evaluation_scope(dataset, pred_field, gt_field, eval_key)
    return _Columns(
        *scope.values(
            [
                f"{gt_field}.label",
                f"{pred_field}.label",
                f"{pred_field}.confidence",
                f"{pred_field}.accepted",
            ]
        )
    )


@dataclass
class Charts:
    """What the panel plots of a pre-label field.

    Attributes:
        confusion: see :func:`confusion_matrix`
        coverage: see :func:`precision_coverage`
        expectation: see :func:`run_expectation`
    """

    confusion: Confusion
    coverage: Coverage
    expectation: Expectation | None


def charts(
    dataset,
    pred_field: str,
    gt_field: str,
    eval_key: str | None = None,
    target: float = DEFAULT_TARGET_PRECISION,
) -> Charts:
    """:func:`confusion_matrix`, :func:`precision_coverage` and
    :func:`run_expectation` from one read of the evaluated samples."""
    _check_target(target)
    columns = _scope_columns(dataset, pred_field, gt_field, eval_key)
    run = prelabel_runs(dataset).get(pred_field) or {}
    return Charts(
        _confusion(dataset, pred_field, eval_key, columns),
        _coverage(columns, target),
        _expectation(run, columns),
    )


def confusion_matrix(
    dataset, pred_field: str, gt_field: str, eval_key: str | None = None
) -> Confusion:
    """The confusion matrix of the current labels over the evaluated
    samples (see :func:`evaluation_scope`).

    Computed from the fields as they are now, so that every cell counts
    exactly the samples :func:`confusion_cell_view` shows; on an unchanged
    dataset it equals FiftyOne's ``results.confusion_matrix()``. Classes
    are the run's classes, then any other label seen, then ``"(none)"`` if
    a label is missing.
    """
    columns = _scope_columns(dataset, pred_field, gt_field, eval_key)
    return _confusion(dataset, pred_field, eval_key, columns)


def _confusion(dataset, pred_field, eval_key, columns) -> Confusion:
    truth = [MISSING if t is None else t for t in columns.truth]
    pred = [MISSING if p is None else p for p in columns.pred]
    pred = [MISSING if p is None else p for p in pred]
    classes = _eval_classes(dataset, pred_field, eval_key)
    seen = (set(truth) | set(pred)) - set(classes) - {MISSING}
    classes += sorted(seen, key=natural_key)
    if MISSING in truth or MISSING in pred:
        classes.append(MISSING)
    index = {c: i for i, c in enumerate(classes)}
    counts = np.zeros((len(classes), len(classes)), dtype=int)
    if truth:
        np.add.at(
            counts,
            ([index[t] for t in truth], [index[p] for p in pred]),
            1,
        )
    return Confusion(classes, counts)


def confusion_cell_view(
    dataset,
    pred_field: str,
    gt_field: str,
    truth: str,
    pred: str,
    eval_key: str | None = None,
):
    """Exactly the samples of one confusion-matrix cell (ground truth
    ``truth``, prediction ``pred``), most confident first."""
    scope = evaluation_scope(dataset, pred_field, gt_field, eval_key)

    def is_(field, label):
        expr = F(f"{field}.label")
        return expr.exists(False) if label == MISSING else expr == label

    view = scope.match(is_(gt_field, truth) & is_(pred_field, pred))
    return view.sort_by(
        [(f"{pred_field}.confidence", -1), ("_id", 1)],
    )


def precision_coverage(
    dataset,
    pred_field: str,
    gt_field: str,
    eval_key: str | None = None,
    target: float = DEFAULT_TARGET_PRECISION,
) -> Coverage:
    """Precision against coverage when only pre-labels at or above a
    confidence threshold are accepted, and the threshold that keeps
    ``target`` precision with the most coverage.

    Computed over the evaluated samples (see :func:`evaluation_scope`).
    """
    _check_target(target)
    columns = _scope_columns(dataset, pred_field, gt_field, eval_key)
    return _coverage(columns, target)


def _check_target(target: float) -> None:
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target={target} must be in (0, 1]")


def _coverage(columns, target: float) -> Coverage:
    truth, pred, conf = columns.truth, columns.pred, columns.conf
    keep = [
        i
        for i, (t, p, c) in enumerate(zip(truth, pred, conf, strict=True))
        if t is not None and p is not None and c is not None
    ]
    conf = np.asarray([conf[i] for i in keep], dtype=float)
    correct = np.asarray([truth[i] == pred[i] for i in keep], dtype=bool)
    return coverage_curve(conf, correct, target)


def coverage_curve(
    confidence: np.ndarray,
    correct: np.ndarray,
    target: float = DEFAULT_TARGET_PRECISION,
) -> Coverage:
    """:func:`precision_coverage` on arrays: ``confidence`` of each
    pre-label and whether it is ``correct``."""
    thresholds, coverage, precision = precision_curve(confidence, correct)
    n = len(confidence)
    ok = np.flatnonzero(precision >= target - 1e-12)
    if len(ok) == 0:
        return Coverage(
            thresholds, coverage, precision, n, target, None, 0.0, None
        )
    best = ok[-1]
    return Coverage(
        thresholds,
        coverage,
        precision,
        n,
        target,
        float(thresholds[best]),
        float(coverage[best]),
        float(precision[best]),
    )


@dataclass
class Expectation:
    """What a pre-annotation run with an accept threshold expected, from
    its references (each scored without its own label), beside what the
    ground truth measures of the pre-labels it accepted.

    Attributes:
        coverage: the references' held-out curve: share accepted ...
        precision: ... and the precision of those (float arrays)
        thresholds: the confidence of each point (as written)
        target: the run's ``target_precision`` (None without one)
        expected_coverage: the expected share of targets accepted at the
            run's threshold
        expected_precision: the expected precision of those
        interval: 95 % bounds on that precision (None in runs older than
            the bound)
        num_measured: accepted-or-not pre-labels with ground truth
        measured_coverage: the share of those the run accepted
        measured_precision: the precision of the accepted ones (None when
            none was accepted or nothing can be measured)
    """

    coverage: np.ndarray
    precision: np.ndarray
    thresholds: np.ndarray
    target: float | None
    expected_coverage: float | None
    expected_precision: float | None
    interval: tuple[float, float] | None = None
    num_measured: int = 0
    measured_coverage: float | None = None
    measured_precision: float | None = None

    @property
    def text(self) -> str:
        """One sentence: expected against measured."""
        if self.target is None:
            return (
                "The dashed curve is what the references expected "
                "(each scored without its own label)."
            )
        if self.expected_precision is None:
            return (
                f"No confidence kept {self.target:.1%} precision with 95 % "
                "confidence on the references, so the run accepted no "
                "pre-label; label more samples or lower the target."
            )
        said = (
            f"The run accepted the pre-labels its references showed to "
            f"keep {self.target:.1%} precision with 95 % confidence"
            + (
                f" (bounds {self.interval[0]:.1%} to {self.interval[1]:.1%})"
                if self.interval
                else ""
            )
            + f": {self.expected_coverage:.1%} of them expected"
        )
        if not self.num_measured:
            return said + "; no ground truth to measure them against yet."
        if self.measured_precision is None:
            return said + (
                f"; none of the {self.num_measured:,} with ground truth "
                "was accepted."
            )
        return said + (
            f", {self.measured_coverage:.1%} of {self.num_measured:,} "
            f"with ground truth accepted at {self.measured_precision:.1%} "
            "measured precision."
        )


def _finite(value) -> float | None:
    """``value`` as a float, or None for None, NaN or infinity (a run
    whose threshold was never reached stores NaN)."""
    if value is None or not np.isfinite(value):
        return None
    return float(value)


def run_expectation(
    dataset, pred_field: str, gt_field: str, eval_key: str | None = None
) -> Expectation | None:
    """The :class:`Expectation` of the run that wrote ``pred_field``, or
    None when that run stored no expectation (a plain vote: no
    calibration, no accept threshold)."""
    run = prelabel_runs(dataset).get(pred_field) or {}
    if not run.get("expected_curve"):
        return None
    columns = None
    if run.get("target_precision") is not None:
        columns = _scope_columns(dataset, pred_field, gt_field, eval_key)
    return _expectation(run, columns)


def _expectation(run: dict, columns) -> Expectation | None:
    curve = run.get("expected_curve")
    if not curve:
        return None
    target = run.get("target_precision")
    out = Expectation(
        coverage=np.asarray(curve["coverage"], dtype=float),
        precision=np.asarray(curve["precision"], dtype=float),
        thresholds=np.asarray(curve["thresholds"], dtype=float),
        target=target,
        expected_coverage=_finite(run.get("expected_coverage")),
        expected_precision=_finite(run.get("expected_precision")),
        interval=(
            tuple(run["precision_interval"])
            if run.get("precision_interval")
            else None
        ),
    )
    if target is None:
        return out
    rows = [
        (t == p, bool(a))
        for t, p, a in zip(
            columns.truth, columns.pred, columns.accepted, strict=True
        )
        if t is not None and p is not None
    ]
    out.num_measured = len(rows)
    hits = [ok for ok, a in rows if a]
    if rows:
        out.measured_coverage = len(hits) / len(rows)
    if hits:
        out.measured_precision = float(np.mean(hits))
    return out


# ---- bulk actions -----------------------------------------------------


def tag_samples(view, tag: str, source: Source | None = None) -> int:
    """Adds ``tag`` to every sample of ``view``; returns how many. For
    rows of boxes (``source.boxes``), the label tag goes on each scored
    box of the index's patches field (the box a person labeled)."""
    if not tag or not isinstance(tag, str):
        raise ValueError(f"tag={tag!r} must be a non-empty string")
    if source is not None and source.boxes:
        ids = view.values(source.path("source_id"))
        root = view._root_dataset
        if ids:
            root.select_labels(ids=ids, fields=source.boxes).tag_labels(
                tag, label_fields=source.boxes
            )
        return len(ids)
    ids = view.values("id")
    if ids:
        view._dataset.select(ids).tag_samples(tag)
    return len(ids)


def check_accept_field(dataset, source: Source, field: str) -> None:
    """Raises unless ``field`` can receive accepted labels: a new name, or
    a field this action wrote before; never the ground truth, the field
    the labels come from, or a field a person or another tool wrote."""
    never = {
        source.gt_field: "the ground-truth field",
        source.pred_field: "the field the labels come from",
    }
    if source.score_field:
        never[source.score_field] = "the score field"
    check_output_field(
        dataset,
        field,
        "accept_field",
        records.ACCEPTED,
        never=never,
        types=((fo.EmbeddedDocumentField, fo.Classification),),
    )


def accept_labels(view, source: Source, field: str) -> int:
    """Copies the compared labels (pre-labels, or the neighbors' majority)
    of the samples of ``view`` into ``field``, a new Classification field;
    ground truth is never touched. Returns how many were copied."""
    if source.boxes:
        raise ValueError(
            "accepting the neighbors' labels of boxes is not supported; "
            "correct a box's label in the App (or with set_label_values)"
        )
    dataset = view._dataset
    check_accept_field(dataset, source, field)
    ids, labels, confs = view.values(
        [
            "id",
            f"{source.pred_field}.label",
            f"{source.pred_field}.confidence",
        ]
    )
    values = {
        sid: fo.Classification(label=label, confidence=conf)
        for sid, label, conf in zip(ids, labels, confs, strict=True)
        if label is not None
    }
    if not values:
        return 0
    if not dataset.has_sample_field(field):
        # recorded first: a field this action made stays its own
        records.put(
            dataset, records.ACCEPTED, field, {"from": source.pred_field}
        )
        dataset.add_sample_field(
            field,
            fo.EmbeddedDocumentField,
            embedded_doc_type=fo.Classification,
        )
    dataset.set_values(field, values, key_field="id")
    return len(values)


# ---- what to label next -------------------------------------------------


@dataclass
class LabelNext:
    """The picks of one :func:`prelabel.select_for_labeling` run, as they
    stand now.

    Attributes:
        reason_field: the field of the picks' reasons (names the record)
        label_field: the field a person labels the picks in
        strategy: how they were picked (``"spread"``, ``"uncertain"``, ...)
        timestamp: when (ISO 8601, UTC)
        rows: one dict per pick still in the dataset, in the order picked:
            ``id``, ``rank`` (1 for the first pick), ``filename``,
            ``filepath``, ``reason``, ``label`` (its label now, or None),
            ``labeled`` and ``random`` (a fair pick)
        num_random: fair picks (every unlabeled sample had the same chance)
        num_labeled: picks labeled by now
        num_missing: picks deleted from the dataset since
        tag: the tag on the picks
        view_name: the saved view of the picks (None: none was saved, or
            it was deleted since)
        forecast: the forecast made when they were picked (the record's
            dict: ``text``, ``more``, ``accepted_now``, ...), or None when
            there were too few labels to draw a learning curve
    """

    reason_field: str
    label_field: str
    strategy: str
    timestamp: str | None
    rows: list[dict]
    num_random: int
    num_labeled: int
    num_missing: int = 0
    tag: str | None = None
    view_name: str | None = None
    forecast: dict | None = None

    @property
    def ids(self) -> list[str]:
        """The picks still in the dataset, in the order picked."""
        return [r["id"] for r in self.rows]

    @property
    def text(self) -> str:
        """``"Strategy spread: 30 picks, 5 labeled so far"``."""
        n = len(self.rows)
        said = (
            f"Strategy {self.strategy}: {n:,} {'pick' if n == 1 else 'picks'}"
            f", {self.num_labeled:,} labeled so far"
        )
        if self.num_random and self.num_random < n:
            said += f" ({self.num_random:,} of them a fair random share)"
        if self.num_missing:
            said += f"; {self.num_missing:,} deleted since"
        return said

    @property
    def forecast_text(self) -> str:
        """One sentence: what labeling the picks was expected to do."""
        text = (self.forecast or {}).get("text")
        if not text:
            return (
                "No forecast yet: it starts from a pre-annotation with an "
                "accept threshold and a learning curve of at least 60 "
                "labeled samples."
            )
        return f"Forecast when picked: {text}."


def selection_fields(dataset) -> list[str]:
    """The reason fields of :func:`prelabel.select_for_labeling` runs that
    still exist, newest first."""
    found = records.read(dataset, records.SELECTIONS)
    newest = sorted(
        found.items(),
        key=lambda kv: kv[1].get("timestamp") or "",
        reverse=True,
    )
    return [name for name, _ in newest if dataset.has_sample_field(name)]


def label_next(
    dataset, reason_field: str | None = None, label_field: str | None = None
) -> LabelNext | None:
    """The latest picks of :func:`prelabel.select_for_labeling` (or those
    of ``reason_field``), each with its reason and its label now.

    Args:
        dataset: the dataset
        reason_field (None): the reason field of the selection to read;
            default the newest selection
        label_field (None): the Classification field a person labels the
            picks in; default the selection's, else the ground truth of
            the dataset's pre-annotations or index (see
            :func:`default_gt_field`)

    Returns:
        a :class:`LabelNext`, or None when nothing was picked yet

    Raises:
        ValueError: ``reason_field`` names no selection, or
            ``label_field`` is not a Classification field
    """
    fields = selection_fields(dataset)
    if reason_field is None:
        if not fields:
            return None
        reason_field = fields[0]
    elif reason_field not in fields:
        raise ValueError(
            f"reason_field={reason_field!r} is not a selection of dataset "
            f"'{dataset.name}'; choose one of {fields} or run "
            "select_for_labeling"
        )
    record = records.get(dataset, records.SELECTIONS, reason_field) or {}
    label_field = (
        label_field or record.get("label_field") or default_gt_field(dataset)
    )
    has_labels = dataset.has_sample_field(label_field)
    if has_labels:
        validation.check_classification_field(dataset, label_field)
    picks = list(record.get("ids") or [])
    fair = set(record.get("random_ids") or [])
    paths = ["id", "filepath", reason_field]
    if has_labels:
        paths.append(f"{label_field}.label")
    found = {
        sid: rest
        for sid, *rest in zip(
            *dataset.select(picks).values(paths), strict=True
        )
    }
    rows = []
    for rank, sid in enumerate(picks, start=1):
        if sid not in found:
            continue  # deleted since
        path, reason, *label = found[sid]
        label = label[0] if label else None
        rows.append(
            {
                "id": sid,
                "rank": rank,
                "filename": os.path.basename(path),
                "filepath": path,
                "reason": reason or "",
                "label": label,
                "labeled": label is not None,
                "random": sid in fair,
            }
        )
    view_name = record.get("view_name")
    if view_name and not dataset.has_saved_view(view_name):
        view_name = None
    return LabelNext(
        reason_field=reason_field,
        label_field=label_field,
        strategy=record.get("strategy") or "unknown",
        timestamp=record.get("timestamp"),
        rows=rows,
        num_random=sum(r["random"] for r in rows),
        num_labeled=sum(r["labeled"] for r in rows),
        num_missing=len(picks) - len(rows),
        tag=record.get("tag"),
        view_name=view_name,
        forecast=record.get("forecast"),
    )


def picks_view(dataset, picks: LabelNext):
    """Every pick in the order picked: the selection's saved view, or the
    same samples selected again when that view was deleted."""
    if picks.view_name:
        return dataset.load_saved_view(picks.view_name)
    return dataset.select(picks.ids, ordered=True)


def pick_view(dataset, sample_id: str):
    """One pick alone, for the grid.

    Raises:
        ValueError: the sample was deleted
    """
    view = dataset.select(sample_id)
    if not len(view):
        raise ValueError(f"sample {sample_id!r} is not in this dataset")
    return view


# the review modes' old name, before pre-annotation's modes took it
__getattr__ = moved(__name__, {"MODES": "prelabel.panel_data:REVIEWS"})
