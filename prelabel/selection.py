"""What to label next: :func:`select_for_labeling` picks the samples a
person should label so that the next pre-annotation leaves the least for
review, tags them and says why each was picked.

The numbers are :mod:`prelabel.core.selection` (a greedy weighted coverage
of the samples' neighbor graph, read from the index); this module reads
the graph, the labels and the last pre-annotation's scores, and writes the
picks:

- the tag ``to_label`` on the picks (the previous selection's tag is
  taken back from the samples it put it on, never from others);
- a saved view ``to_label`` of the picks, in the order picked;
- a string field (``label_next_reason``) with the reason of each pick;
- a float field (``outlier_score``) on every sample: how far it lies from
  its neighbors (the App can sort and filter by it).

The first batches are a fair sample spread over the data, and a share of
every later batch too (``random_share``): references chosen for being
typical or uncertain are not a fair sample of the targets, so only fair
ones can check an accept threshold's precision without bias (they carry
the tag ``to_label_random``; pass it as ``calibration_reference`` to
:func:`prelabel.preannotate`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import fiftyone as fo
import numpy as np

from prelabel import constants, neighbors, records, validation
from prelabel.core import forecast as core_forecast
from prelabel.core import leakage
from prelabel.core import selection as core
from prelabel.fields import check_output_field, staged_fields
from prelabel.index.base import IndexFilter
from prelabel.progress import ProgressArg

#: the most references a forecast reads (a random subset beyond)
MAX_FORECAST_REFERENCES = 20000

#: how :func:`select_for_labeling` may pick
STRATEGIES = constants.STRATEGIES

DEFAULT_TAG = constants.LABEL_NEXT_TAG
DEFAULT_RANDOM_TAG = constants.FAIR_TAG
DEFAULT_REASON_FIELD = constants.REASON_FIELD
DEFAULT_OUTLIER_FIELD = constants.OUTLIER_FIELD
DEFAULT_RANDOM_SHARE = constants.FAIR_SHARE


@dataclass
class SelectionResult:
    """What :func:`select_for_labeling` picked.

    Attributes:
        ids: the picked sample ids, in the order picked
        reasons: the reason of each pick (as written in ``reason_field``)
        strategy: the strategy used (``"auto"`` resolved)
        tag: the tag put on the picks
        random_tag: the tag put on the random share of the picks
        view_name: the saved view of the picks
        num_random: fair picks (every unlabeled sample had the same
            chance), the first ones of ``ids``
        num_candidates: samples that could be picked
        num_labeled: samples already labeled
        num_outliers: samples left out as outliers
        num_unindexed: samples of the view without a point in the index
            (never picked: sync the index first)
        num_uncertain: samples the pre-annotation left for review
            (``"uncertain"`` only)
        num_top_up: typical picks among the other unlabeled samples,
            when fewer than the budget were left for review
            (``"uncertain"`` only)
        forecast: what labeling the picks is expected to do (a
            :class:`prelabel.core.forecast.Forecast`), or None when there
            are too few labels to draw a learning curve
        seconds: per stage timings
    """

    ids: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    strategy: str = "auto"
    tag: str = DEFAULT_TAG
    random_tag: str | None = DEFAULT_RANDOM_TAG
    view_name: str | None = DEFAULT_TAG
    num_random: int = 0
    num_candidates: int = 0
    num_labeled: int = 0
    num_outliers: int = 0
    num_unindexed: int = 0
    num_uncertain: int | None = None
    num_top_up: int = 0
    forecast: core_forecast.Forecast | None = None
    seconds: dict = field(default_factory=dict)


@dataclass
class _Graph:
    """The samples' neighbor graph, as rows."""

    ids: list[str]
    idx: np.ndarray
    sims: np.ndarray
    #: the vectors, randomly projected to a few dimensions (for grouping)
    Z: np.ndarray


def _check_tag(value, param: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{param} must be a non-empty string; got {value!r}")
    return value


def _pred_run(dataset, pred_field: str | None, label_field: str):
    """The pre-annotation run whose scores say what is uncertain: the one
    that wrote ``pred_field``, or the latest run on ``label_field``."""
    runs = records.read(dataset, records.RUNS)
    if pred_field is not None:
        if pred_field not in runs:
            raise ValueError(
                f"pred_field={pred_field!r} was not written by "
                "prelabel.preannotate; pass the field of a pre-annotation "
                "run, or strategy='spread'"
            )
        return pred_field
    mine = [
        (r.get("timestamp") or "", name)
        for name, r in runs.items()
        if r.get("label_field") == label_field
        and not r.get("patches_field")
        and dataset.has_sample_field(name)
    ]
    return max(mine)[1] if mine else None


def check_select_for_labeling(
    samples,
    index=None,
    budget: int = 100,
    label_field: str = constants.DEFAULT_LABEL_FIELD,
    strategy: str = "auto",
    pred_field: str | None = None,
    brain_key: str | None = None,
    tag: str = DEFAULT_TAG,
    random_tag: str | None = DEFAULT_RANDOM_TAG,
    view_name: str | None = DEFAULT_TAG,
    reason_field: str = DEFAULT_REASON_FIELD,
    outlier_field: str = DEFAULT_OUTLIER_FIELD,
    k: int = constants.DEFAULT_K,
    random_share: float = DEFAULT_RANDOM_SHARE,
    duplicate_similarity: float = core.DUPLICATE_SIMILARITY,
    outlier_quantile: float = core.OUTLIER_QUANTILE,
    overwrite: bool = False,
):
    """Runs every check of :func:`select_for_labeling` without writing
    anything (for operator forms).

    Returns:
        ``(results, strategy, pred_field)``: the index, the strategy
        (``"auto"`` resolved) and the pre-annotation field it reads (None
        unless ``"uncertain"``)

    Raises:
        ValueError: one sentence naming the parameter and what to do
    """
    _check_values(
        budget,
        k,
        strategy,
        tag,
        random_tag,
        random_share,
        duplicate_similarity,
        outlier_quantile,
    )
    validation.check_identifier(label_field, "label_field")
    if samples.has_field(label_field):  # a cold start may have none yet
        validation.check_classification_field(samples, label_field)
    results = neighbors.load_index(samples, index, brain_key)
    if results.config.patches_field:
        raise ValueError(
            "select_for_labeling picks whole samples; pass an index of "
            "samples, not of boxes"
        )
    _check_outputs(
        samples,
        results,
        label_field,
        view_name,
        reason_field,
        outlier_field,
        overwrite,
    )
    strategy, chosen = _strategy(samples, strategy, pred_field, label_field)
    return results, strategy, chosen if strategy == "uncertain" else None


def _check_values(
    budget,
    k,
    strategy,
    tag,
    random_tag,
    random_share,
    duplicate_similarity,
    outlier_quantile,
) -> None:
    """The checks of the plain values."""
    validation.check_positive_int(budget, "budget")
    validation.check_positive_int(k, "k")
    if strategy not in STRATEGIES:
        raise ValueError(
            f"strategy={strategy!r} is not one of {list(STRATEGIES)}"
        )
    _check_tag(tag, "tag")
    if random_tag is not None:
        _check_tag(random_tag, "random_tag")
        if random_tag == tag:
            raise ValueError(
                f"random_tag={random_tag!r} is the same as tag; choose "
                "another name, or None"
            )
    for value, param in (
        (random_share, "random_share"),
        (duplicate_similarity, "duplicate_similarity"),
        (outlier_quantile, "outlier_quantile"),
    ):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0.0 <= float(value) <= 1.0
        ):
            raise ValueError(
                f"{param}={value!r} is not a number between 0 and 1; pass "
                "one (e.g. 0.2)"
            )


def _check_outputs(
    samples,
    results,
    label_field,
    view_name,
    reason_field,
    outlier_field,
    overwrite,
) -> None:
    """What is written may be written: the saved view and both fields."""
    dataset = samples._root_dataset
    mine = records.get(dataset, records.SELECTIONS, reason_field) or {}
    if (
        view_name is not None
        and dataset.has_saved_view(view_name)
        and mine.get("view_name") != view_name
        and not overwrite
    ):
        raise ValueError(
            f"view_name={view_name!r} is a saved view prelabel did not "
            "save; choose another name, or pass overwrite=True"
        )
    if reason_field == outlier_field:
        raise ValueError(
            f"outlier_field={outlier_field!r} is the reason field; choose "
            "another name"
        )
    never = {
        label_field: "the ground-truth field",
        results.config.embeddings_field: "the embeddings the index reads",
    }
    for param, name, types in (
        ("reason_field", reason_field, (fo.StringField,)),
        ("outlier_field", outlier_field, (fo.FloatField,)),
    ):
        check_output_field(
            samples,
            name,
            param,
            records.SELECTIONS,
            overwrite=overwrite,
            never=never,
            types=types,
        )


def _strategy(samples, strategy, pred_field, label_field):
    """``(strategy, pre-annotation field it reads)`` with ``"auto"``
    resolved."""
    chosen = None
    if strategy in ("auto", "uncertain"):
        chosen = _pred_run(samples._root_dataset, pred_field, label_field)
        if chosen is None and strategy == "uncertain":
            raise ValueError(
                "strategy='uncertain' reads the scores of a pre-annotation "
                f"on label_field={label_field!r}; run prelabel.preannotate "
                "first, or use strategy='spread'"
            )
    if strategy == "auto":
        # until a pre-annotation accepts something, the labels must be a
        # fair sample: only they can vouch for an accept threshold
        accepted = chosen and len(
            samples.match(fo.ViewField(f"{chosen}.accepted") == True)  # noqa
        )
        strategy = "uncertain" if accepted else "spread"
    return strategy, chosen


def select_for_labeling(
    samples,
    index=None,
    budget: int = 100,
    label_field: str = constants.DEFAULT_LABEL_FIELD,
    strategy: str = "auto",
    pred_field: str | None = None,
    brain_key: str | None = None,
    tag: str = DEFAULT_TAG,
    random_tag: str | None = DEFAULT_RANDOM_TAG,
    view_name: str | None = DEFAULT_TAG,
    reason_field: str = DEFAULT_REASON_FIELD,
    outlier_field: str = DEFAULT_OUTLIER_FIELD,
    k: int = constants.DEFAULT_K,
    random_share: float = DEFAULT_RANDOM_SHARE,
    duplicate_similarity: float = core.DUPLICATE_SIMILARITY,
    outlier_quantile: float = core.OUTLIER_QUANTILE,
    seed: int | None = None,
    overwrite: bool = False,
    progress: ProgressArg = None,
) -> SelectionResult:
    """Picks the next ``budget`` samples to label, tags them and writes why.

    Strategies:

    - ``"spread"`` (cold start): a fair sample spread evenly over the
      data's regions (every unlabeled sample has the same chance, as in a
      uniform draw, but every region gets its share); all of it is
      tagged ``random_tag``, since only a fair sample can vouch for an
      accept threshold's precision;
    - ``"uncertain"`` (warm): where the last pre-annotation left the most
      samples for review, weighted by how unsure each pre-label was, at
      most twice a fair share of picks per predicted class. These samples
      would be reviewed anyway, so labeling them costs no extra work,
      and each settles its neighbors' pre-labels too;
    - ``"typical"``: the centers of dense regions no label is near yet
      (ProbCover's rule on the neighbor graph): the most accurate first
      labels, but not a fair sample;
    - ``"random"``: uniformly at random (what people do without a tool);
    - ``"auto"``: ``"uncertain"`` once a pre-annotation of
      ``label_field`` accepted something, else ``"spread"``.

    ``"typical"`` and ``"uncertain"`` draw ``random_share`` of the budget
    as ``"spread"`` does. Outliers (the ``1 - outlier_quantile`` of
    samples furthest from their neighbors) and near-duplicates of a
    labeled sample or of another pick are never picked, except by the
    fair draws, which must stay fair. Nothing is written unless every
    stage succeeds; the previous selection under ``reason_field`` is
    replaced.

    Args:
        samples: the dataset or view to pick from (its labeled samples
            count as labeled)
        index (None): the results of :func:`prelabel.sync_index` or a
            brain key (default ``brain_key`` or ``"prelabel_qdrant"``)
        budget (100): how many samples to pick
        label_field ("ground_truth"): the Classification field a person
            labels
        strategy ("auto"): one of :data:`STRATEGIES`
        pred_field (None): the pre-annotation whose scores ``"uncertain"``
            reads (default: the latest one of ``label_field``)
        brain_key (None): the index's brain key, when ``index`` is None
        tag ("to_label"): the tag put on the picks
        random_tag ("to_label_random"): the tag put on the fair picks
            too (keep it after labeling: pass it as
            ``calibration_reference`` to :func:`prelabel.preannotate`, it
            marks the references that check precision without bias);
            None for no such tag
        view_name ("to_label"): a saved view of the picks, or None
        reason_field ("label_next_reason"): the string field of reasons
        outlier_field ("outlier_score"): the float field of outlier scores
        k (15): neighbors per sample in the graph
        random_share (0.2): the share of the budget drawn fairly by
            ``"typical"`` and ``"uncertain"``
        duplicate_similarity (0.98): cosine similarity from which two
            samples are near-duplicates
        outlier_quantile (0.99): samples above this quantile of outlier
            scores are not picked (1.0: keep every sample)
        seed (None): the random share's seed
        overwrite (False): replace output fields or a saved view that
            prelabel did not write
        progress (None): ``True`` for a progress bar, or a callback

    Returns:
        a :class:`SelectionResult`
    """
    t0 = time.perf_counter()
    results, strategy, pred_field = check_select_for_labeling(
        samples,
        index,
        budget,
        label_field,
        strategy,
        pred_field,
        brain_key,
        tag,
        random_tag,
        view_name,
        reason_field,
        outlier_field,
        k,
        random_share,
        duplicate_similarity,
        outlier_quantile,
        overwrite,
    )
    dataset = samples._root_dataset
    out = SelectionResult(
        strategy=strategy, tag=tag, random_tag=random_tag, view_name=view_name
    )
    view_ids = samples.values("id")
    graph = _graph(results, dataset, view_ids, k, progress)
    out.num_unindexed = len(view_ids) - len(graph.ids)
    out.seconds["graph"] = time.perf_counter() - t0
    labeled = _labeled_rows(samples, label_field, graph.ids)
    out.num_labeled = int(labeled.sum())
    scores = core.outlier_scores(graph.sims)
    outlier = core.outlier_mask(scores, outlier_quantile)
    out.num_outliers = int((outlier & ~labeled).sum())
    t1 = time.perf_counter()
    rng = np.random.default_rng(seed)
    fair = _fair_picks(graph, labeled, budget, strategy, random_share, rng)
    picked_rows = [int(r) for r in fair]
    reasons = [FAIR_REASONS[strategy]] * len(fair)
    active = budget - len(fair)
    taken = labeled | np.isin(np.arange(labeled.size), fair)
    candidates = ~outlier & ~taken
    out.num_candidates = int(candidates.sum())
    if active:
        rows, more = _active_picks(
            samples,
            graph,
            strategy,
            pred_field,
            labeled,
            taken,
            candidates,
            active,
            duplicate_similarity,
            out,
        )
        picked_rows += rows
        reasons += more
    if strategy == "uncertain" and len(picked_rows) < budget:
        extra = _top_up(
            graph, labeled, ~outlier, picked_rows, budget, duplicate_similarity
        )
        picked_rows += extra
        reasons += [TOP_UP_REASON] * len(extra)
        out.num_top_up = len(extra)
    out.seconds["select"] = time.perf_counter() - t1
    out.ids = [graph.ids[r] for r in picked_rows]
    out.reasons = reasons
    out.num_random = len(fair)
    t2 = time.perf_counter()
    if out.num_labeled:
        out.forecast = forecast_labeling(
            samples, results, budget, label_field, pred_field, random_tag, k
        )
    out.seconds["forecast"] = time.perf_counter() - t2
    t2 = time.perf_counter()
    fields = (reason_field, outlier_field, label_field)
    _write(dataset, out, graph, scores, fields, results.key)
    out.seconds["write"] = time.perf_counter() - t2
    out.seconds["total"] = time.perf_counter() - t0
    return out


#: the reason of a pick that fills the budget when the strategy found
#: fewer candidates (not tagged as a fair pick: drawn after the others)
TOP_UP_REASON = (
    "typical (filling the budget): fewer samples than the budget were "
    "left for review"
)

#: the reason written on a fair pick, per strategy
FAIR_REASONS = {
    "random": "random: drawn uniformly from the unlabeled samples",
    "spread": (
        "spread: a fair sample drawn evenly across the data's regions, so "
        "that the accept threshold can be vouched for"
    ),
    "typical": (
        "random share: a fair sample, to check the accept threshold's "
        "precision without bias"
    ),
    "uncertain": (
        "random share: a fair sample, to check the accept threshold's "
        "precision without bias"
    ),
}


def _labeled_rows(samples, label_field: str, ids) -> np.ndarray:
    """Whether each of ``ids`` has a label (bool array)."""
    labeled = np.zeros(len(ids), dtype=bool)
    if samples.has_field(label_field):
        row = {sid: i for i, sid in enumerate(ids)}
        for sid in validation.labeled(samples, label_field).values("id"):
            if sid in row:
                labeled[row[sid]] = True
    return labeled


def _active_picks(
    samples,
    graph,
    strategy,
    pred_field,
    labeled,
    taken,
    candidates,
    active,
    duplicate_similarity,
    out,
):
    """``(rows, reasons)`` of the ``active`` picks that are not fair
    draws: typical or uncertain ones (none for the fair strategies)."""
    reasons: list[str] = []
    picks = None
    if strategy == "typical":
        picks = core.greedy_coverage(
            graph.idx,
            graph.sims,
            (~labeled).astype(np.float64),
            candidates,
            active,
            labeled=taken,
            duplicate_similarity=duplicate_similarity,
        )
        reasons = [
            f"typical: {c} unlabeled samples around it that no label is "
            "near yet"
            for c in picks.covered
        ]
    elif strategy == "uncertain":
        weight, classes, pre = _uncertainty(
            samples, pred_field, graph.ids, labeled
        )
        out.num_uncertain = int((weight > 0).sum())
        num_classes = max(len(set(classes[classes >= 0].tolist())), 1)
        # an accepted pre-label needs no one: labeling it would be extra
        # work, labeling one left for review replaces that review
        picks = core.greedy_coverage(
            graph.idx,
            graph.sims,
            weight,
            candidates & (weight > 0),
            active,
            labeled=taken,
            cover_labeled=False,
            duplicate_similarity=duplicate_similarity,
            classes=classes,
            class_cap=math.ceil(2 * active / num_classes),
        )
        reasons = [
            _uncertain_reason(pre[r], c)
            for r, c in zip(picks.rows, picks.covered, strict=True)
        ]
    if picks is None:
        return [], []
    return picks.rows.tolist(), reasons


def _top_up(graph, labeled, allowed, picked, budget, duplicate_similarity):
    """Typical picks among the unlabeled samples not picked yet, up to
    ``budget`` picks in all (when fewer were left for review)."""
    taken = labeled.copy()
    taken[picked] = True
    return [
        int(r)
        for r in core.greedy_coverage(
            graph.idx,
            graph.sims,
            (~labeled).astype(np.float64),
            allowed & ~taken,
            budget - len(picked),
            labeled=taken,
            duplicate_similarity=duplicate_similarity,
        ).rows
    ]


def _fair_picks(graph, labeled, budget, strategy, random_share, rng):
    """The picks every unlabeled sample had the same chance to be: all of
    them for ``"random"`` (a uniform draw) and ``"spread"`` (spread over
    the data's regions), else ``random_share`` of the budget (spread)."""
    unlabeled = ~labeled
    num = budget
    if strategy in ("typical", "uncertain"):
        num = int(round(budget * float(random_share)))
    num = min(num, int(unlabeled.sum()))
    if strategy == "random":
        return rng.choice(np.flatnonzero(unlabeled), num, replace=False)
    return core.spread_sample(graph.Z, unlabeled, num, rng)


def _graph(results, dataset, ids, k, progress) -> _Graph:
    """Every indexed sample of ``ids`` and its ``k`` nearest indexed
    samples among ``ids`` (others are dropped: -1, NaN). Held as arrays
    chunk by chunk (about 200 bytes a sample), never as id strings."""
    field = results.config.embeddings_field
    position = {sid: i for i, sid in enumerate(ids)}
    found, idx, sims, Z = [], [], [], []
    for chunk in neighbors.stream(
        results,
        dataset,
        ids,
        field,
        k,
        IndexFilter(),
        progress=progress,
        label="Reading the neighbor graph",
    ):
        found.append(np.array([position[s] for s in chunk.ids], np.int64))
        at = np.full((len(chunk.ids), k), -1, dtype=np.int64)
        for i, nbs in enumerate(chunk.neighbor_ids):
            for j, sid in enumerate(nbs):
                at[i, j] = position.get(sid, -1)
        idx.append(at)
        sims.append(np.where(at >= 0, chunk.sims, np.nan).astype(np.float32))
        Z.append(core.project(chunk.vectors))
    if not found:
        empty = np.zeros((0, k))
        return _Graph([], empty.astype(np.int64), empty, empty)
    found = np.concatenate(found)
    # renumber from positions in ``ids`` to rows of the indexed samples
    row = np.full(len(ids), -1, dtype=np.int64)
    row[found] = np.arange(found.size)
    idx = np.vstack(idx)
    idx = np.where(idx >= 0, row[np.maximum(idx, 0)], -1)
    sims = np.where(idx >= 0, np.vstack(sims), np.nan).astype(np.float32)
    return _Graph([ids[i] for i in found], idx, sims, np.vstack(Z))


def _uncertainty(samples, pred_field, ids, labeled):
    """Each row's weight (``1 - confidence`` of a pre-label left for
    review; 1 for a sample not pre-annotated; 0 when accepted or
    labeled), predicted class index (-1: none) and ``(label,
    confidence)``."""
    paths = [f"{pred_field}.{a}" for a in ("label", "confidence", "accepted")]
    sid, *cols = samples.values(["id", *paths])
    got = dict(zip(sid, zip(*cols, strict=True), strict=True))
    n = len(ids)
    weight = np.ones(n)
    classes = np.full(n, -1, dtype=np.int64)
    pre = [(None, None)] * n
    names: dict[str, int] = {}
    for i, sid in enumerate(ids):
        label, conf, accepted = got.get(sid, (None, None, None))
        pre[i] = (label, conf)
        if labeled[i] or accepted:
            weight[i] = 0.0
            continue
        if conf is not None:
            weight[i] = max(1.0 - float(conf), 1e-3)
        if label is not None:
            classes[i] = names.setdefault(label, len(names))
    return weight, classes, pre


def _uncertain_reason(pre, covered: int) -> str:
    label, conf = pre
    said = (
        f"pre-label {label!r} at confidence {conf:.2f}, left for review"
        if label is not None and conf is not None
        else "not pre-annotated yet"
    )
    return f"uncertain: {said}; {covered} samples around it need review"


def _forecast_record(fc) -> dict | None:
    """What the selection record keeps of a forecast (JSON-able)."""
    if fc is None:
        return None
    return {
        "text": fc.text,
        "more": fc.more,
        "num_labeled": fc.num_labeled,
        "accepted_now": fc.accepted_now,
        "accepted_next": fc.accepted_next,
        "interval": list(fc.interval),
        "slope": fc.slope,
    }


def _write(dataset, out, graph, scores, fields, brain_key):
    """The fields (``(reason, outlier, label)`` names; the first two
    swapped in whole with the record), then the tags and the saved view;
    the previous selection's tags are taken back from the samples it
    tagged."""
    reason_field, outlier_field, label_field = fields
    before = records.get(dataset, records.SELECTIONS, reason_field) or {}
    record = {
        "timestamp": datetime.now(UTC).isoformat(),
        "strategy": out.strategy,
        "ids": out.ids,
        "random_ids": out.ids[: out.num_random],
        "tag": out.tag,
        "random_tag": out.random_tag,
        "view_name": out.view_name,
        "outlier_field": outlier_field,
        "label_field": label_field,
        "brain_key": brain_key,
        "forecast": _forecast_record(out.forecast),
        # tags to take back: the previous picks', and any that a run killed
        # between its swap and its tags left (cleared once taken back)
        "untag": [[before.get("tag"), before.get("ids") or []]]
        + (before.get("untag") or []),
    }
    staged = {
        reason_field: (fo.StringField, {}),
        outlier_field: (fo.FloatField, {}),
    }
    with staged_fields(dataset, staged) as stage:
        stage.record(records.SELECTIONS, reason_field, record)
        dataset.set_values(
            stage[outlier_field],
            dict(zip(graph.ids, scores.tolist(), strict=True)),
            key_field="id",
        )
        if out.ids:
            dataset.set_values(
                stage[reason_field],
                dict(zip(out.ids, out.reasons, strict=True)),
                key_field="id",
            )
    for old_tag, ids in record["untag"]:
        if old_tag and ids:
            dataset.select(ids).untag_samples(old_tag)
    if out.ids:
        dataset.select(out.ids).tag_samples(out.tag)
    if out.random_tag and out.num_random:
        dataset.select(out.ids[: out.num_random]).tag_samples(out.random_tag)
    if out.view_name:
        dataset.save_view(
            out.view_name,
            dataset.select(out.ids, ordered=True),
            overwrite=True,
        )
    records.put(
        dataset, records.SELECTIONS, reason_field, {**record, "untag": []}
    )


def forecast_labeling(
    samples,
    index=None,
    more: int = 100,
    label_field: str = constants.DEFAULT_LABEL_FIELD,
    pred_field: str | None = None,
    fair_tag: str | None = DEFAULT_RANDOM_TAG,
    k: int = constants.DEFAULT_K,
    seed: int = 0,
) -> core_forecast.Forecast | None:
    """What labeling ``more`` samples is expected to do to the share of
    pre-labels accepted without review (see
    :mod:`prelabel.core.forecast`).

    Args:
        samples: the dataset or view (its labeled samples are the
            references)
        index (None): the index (or its brain key) whose vectors the
            learning curve reads
        more (100): how many more samples would be labeled
        label_field ("ground_truth"): the labels
        pred_field (None): the pre-annotation with an accept threshold
            whose accepted share and reference curve are the starting
            point (default: the latest one of ``label_field``; without
            one, the forecast says nothing will be accepted)
        fair_tag ("to_label_random"): when at least 50 labeled samples
            carry this tag, only they draw the learning curve (the other
            picks were chosen, not drawn at random)
        k (15): neighbors that vote in the learning curve
        seed (0): the subsets' seed

    Returns:
        a :class:`prelabel.core.forecast.Forecast`, or None with fewer
        than ``4 * k`` references or without a pre-annotation that has an
        accept threshold (nothing to forecast from: run
        :func:`prelabel.preannotate` with ``target_precision`` first)
    """
    results = neighbors.load_index(samples, index)
    dataset = samples._root_dataset
    pred_field = pred_field or _pred_run(dataset, None, label_field)
    run = (
        records.get(dataset, records.RUNS, pred_field) if pred_field else None
    )
    if not (run and run.get("expected_curve") and run.get("num_calibration")):
        return None
    refs = validation.labeled(samples, label_field)
    if fair_tag and len(refs.match_tags(fair_tag)) >= 50:
        refs = refs.match_tags(fair_tag)
    ids, labels = refs.values(["id", f"{label_field}.label"])
    if len(ids) < 4 * k:
        return None
    if len(ids) > MAX_FORECAST_REFERENCES:
        keep = np.random.default_rng(seed).choice(
            len(ids), MAX_FORECAST_REFERENCES, replace=False
        )
        ids = [ids[i] for i in keep]
        labels = [labels[i] for i in keep]
    label_of = dict(zip(ids, labels, strict=True))
    found, X = neighbors.read_vectors(
        dataset, ids, results.config.embeddings_field
    )
    y = np.array([label_of[s] for s in found], dtype=object)
    got = run["expected_curve"]
    curve = (np.asarray(got["coverage"]), np.asarray(got["precision"]))
    num_cal = int(run["num_calibration"])
    target = run.get("target_precision") or constants.DEFAULT_TARGET_PRECISION
    pre = samples.exists(pred_field)
    if samples.has_field(label_field):
        pre = pre.exists(label_field, False)  # still unlabeled
    accepted_now = 0.0
    if len(pre):
        accepted = pre.match(fo.ViewField(f"{pred_field}.accepted"))
        accepted_now = len(accepted) / len(pre)
    return core_forecast.forecast(
        X,
        y,
        more,
        curve,
        num_cal,
        accepted_now,
        target,
        k=k,
        seed=seed,
        closer_than=_closer_than(dataset, pre, results, X, k, seed),
    )


def _closer_than(dataset, targets, results, X, k, seed) -> float:
    """How close the references may be to each other before the learning
    curve sets a neighbor aside: :func:`prelabel.core.leakage.
    closeness_threshold` against a random sample of the unlabeled
    samples (``inf`` when there are none)."""
    ids = targets.values("id")
    if not ids:
        return float("inf")
    pick = [ids[i] for i in leakage.sample_rows(len(ids), seed=seed)]
    _, T = neighbors.read_vectors(
        dataset, pick, results.config.embeddings_field
    )
    if not len(T):
        return float("inf")
    return leakage.reference_neighbors(X, T, k=k)[2]
