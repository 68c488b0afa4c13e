"""Pre-annotation with scores a person can act on: calibrated confidence,
an accept threshold for a wanted precision, the classifier of an adapted
index, and label spreading, all estimated from the references.

:func:`prelabel.preannotate` hands over to :func:`preannotate_scored`
when any of ``calibrate``, ``target_precision``, ``propagate`` or
``mode="adapted"`` is asked for, or when the index holds adapted
embeddings; the plain vote path is left exactly as it was.

How each target is scored:

- plain index: the kNN vote distribution (as ``preannotate`` writes it);
- adapted index (see :mod:`prelabel.adapt`): the mean of the kNN vote in
  the adapted space and the adapter's classifier, read off the target's
  adapted vector (the vote alone is almost always unanimous there, so it
  cannot rank);
- ``propagate=True``: then label spreading over the neighbor graph of
  references and targets, if the references say it helps (see
  :mod:`prelabel.propagate`).

How the references are scored, the same way and each without its own
label: leave-one-out votes through the index (plain), cross-fitted heads and
votes (adapted), hidden folds (spreading). The calibrator and the accept
threshold are fitted on those scores (:mod:`prelabel.calibration`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import fiftyone as fo
import numpy as np

from prelabel import adapt, calibration, constants, knn, records
from prelabel import propagate as prop
from prelabel.fields import CLASSIFICATION, staged_fields
from prelabel.preannotate import (
    PreannotationResult,
    _drop_self,
    _read_vectors,
    _reference_classes,
    evaluate,
    run_record,
)
from prelabel.progress import Progress, ProgressArg

#: the modes of :func:`prelabel.preannotate`
MODES = ("knn", "adapted")

#: references scored for calibration, at most (a random subset beyond)
MAX_CALIBRATION = 20000


def check_scored_args(
    mode: str = "knn",
    calibrate: bool = False,
    target_precision: float | None = None,
    propagate: bool = False,
) -> None:
    """Raises ``ValueError`` on a bad value of the scored options."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not supported; use one of {MODES}")
    if target_precision is not None and not (
        isinstance(target_precision, (int, float))
        and 0.0 < float(target_precision) < 1.0
    ):
        raise ValueError(
            "target_precision must be a number between 0 and 1 (e.g. 0.99); "
            f"got {target_precision!r}"
        )
    for name, value in (("calibrate", calibrate), ("propagate", propagate)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False; got {value!r}")


def wants_scored(
    results, mode, calibrate, target_precision, propagate, dataset
) -> bool:
    """Whether :func:`prelabel.preannotate` should take the scored path."""
    if mode != "knn" or calibrate or propagate:
        return True
    if target_precision is not None:
        return True
    record = adapt.adapter_record(dataset, results.config.embeddings_field)
    return record is not None


def check_adapt_index(
    dataset,
    results=None,
    reference=None,
    label_field: str = constants.DEFAULT_LABEL_FIELD,
    overwrite: bool = False,
):
    """Runs every check of :func:`adapt_index` without writing.

    Returns:
        ``(results, references view)``; the view is None when ``results``
        already holds adapted embeddings (nothing to learn)

    Raises:
        ValueError: one sentence saying what is wrong and what to do
    """
    from prelabel.preannotate import resolve_index

    results = resolve_index(dataset, results)
    emb_field = results.config.embeddings_field
    if adapt.adapter_record(dataset, emb_field) is not None:
        return results, None
    _, refs = adapt.check_adapt_embeddings(
        dataset,
        reference,
        label_field,
        emb_field,
        f"{emb_field}_adapted",
        overwrite=overwrite,
    )
    return results, refs


def adapt_index(
    dataset,
    results=None,
    reference=None,
    label_field: str = constants.DEFAULT_LABEL_FIELD,
    progress: ProgressArg = True,
    overwrite: bool = False,
):
    """Learns embeddings adapted to the labels of the references from the
    embeddings of an index, and indexes them: the index that
    ``preannotate(..., mode="adapted")`` votes in, built ahead (for
    example to browse the adapted space with ``sort_by_similarity``).

    Reused while the references (ids and labels) are the same, else
    learned again (:func:`prelabel.adapt_embeddings`, which writes
    ``<embeddings_field>_adapted``) and synced (:func:`prelabel.sync_index`)
    under ``<brain_key>_adapted``. Only the references' labels are read.

    Args:
        dataset: the dataset of the index
        results (None): the results of :func:`prelabel.sync_index`, or a
            brain key; default ``"prelabel_qdrant"``
        reference (None): whose labels train it: ``None`` for every sample
            labeled in ``label_field``, a tag (or list of tags), or a view
        label_field ("ground_truth"): the Classification field of labels
        progress (True): a bar, nothing, or ``progress(fraction, label)``
        overwrite (False): allow ``<embeddings_field>_adapted`` to replace
            a field prelabel did not write

    Returns:
        the similarity results of the adapted index (``results`` itself
        when it already holds adapted embeddings)
    """
    from prelabel.indexing import sync_index

    results, refs = check_adapt_index(
        dataset, results, reference, label_field, overwrite
    )
    if refs is None:
        return results  # already an adapted index
    emb_field = results.config.embeddings_field
    out_field = f"{emb_field}_adapted"
    brain_key = f"{results.key}_adapted"
    ref_ids, ref_labels = refs.values(["id", f"{label_field}.label"])
    digest = adapt.reference_digest(ref_ids, ref_labels)
    record = adapt.adapter_record(dataset, out_field)
    fresh = (
        record is not None
        and record.get("reference_digest") == digest
        and record.get("embeddings_field") == emb_field
    )
    if not fresh:
        adapt.adapt_embeddings(
            dataset,
            reference=refs,
            label_field=label_field,
            embeddings_field=emb_field,
            out_field=out_field,
            progress=progress,
            overwrite=overwrite,
        )
    return sync_index(
        dataset,
        embeddings_field=out_field,
        label_field=label_field,
        brain_key=brain_key,
        progress=progress,
    )


@dataclass
class _Scorer:
    """Turns a vote (and a target's vector) into the distribution written."""

    classes: list[str]
    adapter: adapt.Adapter | None = None

    def __post_init__(self):
        if self.adapter is not None:
            cols = {c: i for i, c in enumerate(self.adapter.classes)}
            self._cols = np.array([cols.get(c, -1) for c in self.classes])

    def head_proba(self, adapted: np.ndarray) -> np.ndarray:
        P = self.adapter.proba(adapted)
        out = np.where(
            self._cols[None, :] >= 0, P[:, np.clip(self._cols, 0, None)], 0.0
        )
        totals = out.sum(axis=1, keepdims=True)
        return out / np.where(totals > 0, totals, 1.0)

    def combine(self, vote_probs, head_probs=None) -> np.ndarray:
        if head_probs is None:
            return vote_probs
        return 0.5 * vote_probs + 0.5 * head_probs


def _reference_scores(dataset, results, flt, classes, k, vote, scorer, seed=0):
    """Held-out distributions of the references, scored like targets but
    each without its own label.

    Returns:
        ``(ids, labels (class indices), probs (n, C))``
    """
    pairs = list(results.index.iter_payloads(["label"], flt))
    lookup = {c: i for i, c in enumerate(classes)}
    pairs = [(sid, p.get("label")) for sid, p in pairs]
    pairs = [(sid, lbl) for sid, lbl in pairs if lbl in lookup]
    if len(pairs) > MAX_CALIBRATION:
        pick = np.random.default_rng(seed).choice(
            len(pairs), MAX_CALIBRATION, replace=False
        )
        pairs = [pairs[i] for i in sorted(pick)]
    label_of = dict(pairs)
    emb_field = results.config.embeddings_field
    if scorer.adapter is None:
        ids, probs, winners = [], [], []
        all_ids = [sid for sid, _ in pairs]
        for a in range(0, len(all_ids), 1000):
            chunk_ids, vectors = _read_vectors(
                dataset, all_ids[a : a + 1000], emb_field
            )
            res = results.index.query(vectors, k + 1, flt)
            _, nb_labels, sims = _drop_self(res, chunk_ids, k)
            v = knn.vote(nb_labels, sims, classes, k, vote)
            probs.append(v.probs)
            winners.append(_winners(v.probs, v))
            ids.extend(chunk_ids)
        probs = np.vstack(probs) if probs else np.zeros((0, len(classes)))
        winners = np.concatenate(winners) if winners else np.zeros(0, int)
    else:
        ad = scorer.adapter
        src = ad.info.get("embeddings_field")
        ids, X = _read_vectors(dataset, [sid for sid, _ in pairs], src)
        folds = ad.fold_of(ids)
        head = adapt.cross_fitted_proba(ad, X, folds)
        cols = scorer._cols
        head = np.where(cols[None, :] >= 0, head[:, np.clip(cols, 0, None)], 0)
        head /= np.maximum(head.sum(axis=1, keepdims=True), 1e-12)
        nb_idx, sims = adapt.cross_fitted_neighbors(ad, X, folds, k)
        ref_lbl = [label_of[s] for s in ids]
        nb_labels = [
            [ref_lbl[j] for j in row if j >= 0] for row in nb_idx.tolist()
        ]
        votes = knn.vote(nb_labels, sims, classes, k, vote)
        probs = scorer.combine(votes.probs, head)
        winners = _winners(probs, votes)
    y = np.array([lookup[label_of[s]] for s in ids], dtype=np.int64)
    return list(ids), y, probs, winners


def preannotate_scored(
    targets,
    results,
    flt,
    label_field: str,
    pred_field: str,
    k: int,
    vote: str,
    min_confidence: float | None,
    eval_key: str | None,
    batch_size: int,
    progress: ProgressArg,
    reference,
    calibrate: bool,
    target_precision: float | None,
    propagate: bool,
    mode: str,
    t0: float,
) -> PreannotationResult:
    """The scored path of :func:`prelabel.preannotate` (see the module doc);
    its arguments are ``preannotate``'s, already checked."""
    dataset = targets._dataset
    root = targets._root_dataset
    # the index of the frozen embeddings, whose vote can second the
    # adapted one when ranking what to accept (see _accept_score)
    frozen = (results, flt) if mode == "adapted" else None
    if mode == "adapted":
        results = adapt_index(root, results, reference, label_field, progress)
        from prelabel.preannotate import reference_filter

        flt, _ = reference_filter(results, reference, label_field)
    emb_field = results.config.embeddings_field
    adapter = adapt.load_adapter(root, emb_field)
    classes = _reference_classes(results, flt)
    scorer = _Scorer(classes, adapter)
    out = PreannotationResult(pred_field=pred_field, classes=classes)
    out.mode = mode
    out.brain_key = results.key

    t1 = time.perf_counter()
    ref_ids, ref_y, ref_probs, ref_win = _reference_scores(
        dataset, results, flt, classes, k, vote, scorer
    )
    out.seconds["reference_scores"] = time.perf_counter() - t1

    ids = targets.values("id")
    out.num_targets = len(ids)
    chunks = []
    t_query = 0.0
    with Progress(progress, len(ids), "Pre-annotating") as bar:
        for start in range(0, len(ids), batch_size):
            t2 = time.perf_counter()
            chunk_ids, vectors = _read_vectors(
                dataset, ids[start : start + batch_size], emb_field
            )
            res = results.index.query(vectors, k + 1, flt)
            nb_ids, nb_labels, sims = _drop_self(res, chunk_ids, k)
            votes = knn.vote(nb_labels, sims, classes, k, vote)
            head = scorer.head_proba(vectors) if adapter is not None else None
            probs = scorer.combine(votes.probs, head)
            chunks.append((chunk_ids, votes, nb_ids, probs))
            t_query += time.perf_counter() - t2
            bar.update(len(chunk_ids))
    out.seconds["query_vote"] = t_query

    if propagate:
        t3 = time.perf_counter()
        ref_probs, choice = _propagate(
            root, results, adapter, chunks, ref_ids, ref_y, ref_probs, classes
        )
        out.propagation = {
            "alpha": choice.alpha,
            "use_prior": choice.use_prior,
            "reference_accuracy": {
                f"{a}{'' if p else '/no-prior'}": v
                for (a, p), v in choice.accuracy.items()
            },
        }
        out.seconds["propagate"] = time.perf_counter() - t3

    if propagate and out.propagation["alpha"] > 0:
        ref_win = ref_probs.argmax(axis=1)
    correct = ref_win == ref_y
    conf_ref = ref_probs.max(axis=1)
    scales = None
    if adapter is not None and frozen is not None:
        t5 = time.perf_counter()
        conf_ref, scales, out.accept_score = _accept_score(
            root,
            frozen,
            chunks,
            ref_ids,
            ref_win,
            conf_ref,
            correct,
            classes,
            k,
            vote,
            target_precision or constants.DEFAULT_TARGET_PRECISION,
        )
        out.seconds["accept_score"] = time.perf_counter() - t5
    cal = calibration.calibrate(conf_ref, correct, target_precision)
    out.calibrated = bool(calibrate)
    out.reference_accuracy = cal.reference_accuracy
    out.ece_raw = cal.ece_raw
    out.ece = cal.ece_calibrated if calibrate else cal.ece_raw
    out.num_reference_scored = cal.num_scored
    if target_precision is not None:
        out.target_precision = float(target_precision)
        out.accept_threshold = cal.threshold
        out.expected_coverage = cal.expected_coverage
        out.expected_precision = cal.expected_precision

    t4 = time.perf_counter()
    review_ids, accepted_n, written = [], 0, 0
    run_extra = {
        "mode": mode,
        "calibrate": bool(calibrate),
        "calibrator": cal.calibrator.to_dict() if calibrate else None,
        "target_precision": target_precision,
        "accept_threshold": cal.threshold,
        "expected_coverage": cal.expected_coverage,
        "expected_precision": cal.expected_precision,
        # the references' held-out curve, in the written confidence
        "expected_curve": calibration.curve_points(
            cal.calibrator(conf_ref) if calibrate else conf_ref, correct
        ),
        "propagation": getattr(out, "propagation", None),
        "accept_score": out.accept_score,
    }
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
                extra=run_extra,
            ),
        )
        for i, (chunk_ids, votes, nb_ids, probs) in enumerate(chunks):
            labels, review, acc = _classifications(
                votes,
                nb_ids,
                probs,
                cal if calibrate else None,
                cal.threshold if target_precision is not None else None,
                min_confidence,
                scale=scales[i] if scales is not None else None,
            )
            accepted_n += acc
            written += sum(lbl is not None for lbl in labels)
            review_ids.extend(
                sid for sid, r in zip(chunk_ids, review, strict=True) if r
            )
            dataset.set_values(
                tmp[pred_field],
                dict(zip(chunk_ids, labels, strict=True)),
                key_field="id",
            )
    if review_ids:
        dataset.select(review_ids).tag_samples(constants.REVIEW_TAG)
    out.num_review = len(review_ids)
    out.num_labeled = written
    out.num_accepted = accepted_n if target_precision is not None else None
    out.coverage = (
        accepted_n / out.num_targets
        if target_precision is not None and out.num_targets
        else None
    )
    out.seconds["write"] = time.perf_counter() - t4

    if eval_key is not None:
        t5 = time.perf_counter()
        out.eval_key = eval_key
        out.accuracy = evaluate(
            targets, pred_field, label_field, eval_key, classes
        )
        out.seconds["evaluate"] = time.perf_counter() - t5
    out.seconds["total"] = time.perf_counter() - t0
    return out


def _propagate(
    root, results, adapter, chunks, ref_ids, ref_y, ref_probs, classes
):
    """Spreads the labels over the graph of references and targets, if the
    references say it helps; updates the chunks' distributions in place.

    Returns:
        ``(held-out reference distributions, PropagationChoice)``
    """
    src = (
        adapter.info.get("embeddings_field")
        if adapter is not None
        else results.config.embeddings_field
    )
    target_ids = [sid for c in chunks for sid in c[0]]
    all_ids = list(ref_ids) + [s for s in target_ids if s not in set(ref_ids)]
    row = {sid: i for i, sid in enumerate(all_ids)}
    found, X = _read_vectors(root, all_ids, src)
    order = np.array([row[s] for s in found])
    Xo = np.empty_like(X)
    Xo[order] = X
    W = prop.whitened_features(Xo)
    idx, sims = prop.knn_graph(W, k=10)
    S = prop._operator(idx, sims)
    C = len(classes)
    prior = np.zeros((len(all_ids), C))
    for chunk_ids, _, _, probs in chunks:
        prior[[row[s] for s in chunk_ids]] = probs
    ref_rows = np.array([row[s] for s in ref_ids], dtype=np.int64)
    choice = prop.choose(S, ref_rows, ref_y, C, prior, ref_probs)
    if not choice.helps:
        return ref_probs, choice
    F = prop.spread(
        S,
        ref_rows,
        ref_y,
        C,
        prior=prior if choice.use_prior else None,
        alpha=choice.alpha,
    )
    for i, (chunk_ids, votes, nb_ids, _) in enumerate(chunks):
        chunks[i] = (chunk_ids, votes, nb_ids, F[[row[s] for s in chunk_ids]])
    return choice.held_out_proba, choice


def _frozen_share(root, frozen, ids, winners, classes, k, vote):
    """The share of the frozen-embeddings vote (``k`` neighbors among the
    references of ``frozen``, never the sample itself) that goes to each
    sample's winning class."""
    results, flt = frozen
    emb_field = results.config.embeddings_field
    share = np.zeros(len(ids))
    row = {sid: i for i, sid in enumerate(ids)}
    for a in range(0, len(ids), 1000):
        chunk_ids, vectors = _read_vectors(root, ids[a : a + 1000], emb_field)
        res = results.index.query(vectors, k + 1, flt)
        _, nb_labels, sims = _drop_self(res, chunk_ids, k)
        v = knn.vote(nb_labels, sims, classes, k, vote)
        at = np.array([row[s] for s in chunk_ids], dtype=np.int64)
        share[at] = v.probs[np.arange(len(at)), winners[at]]
    return share


def _accept_score(
    root,
    frozen,
    chunks,
    ref_ids,
    ref_win,
    conf_ref,
    correct,
    classes,
    k,
    vote,
    target_precision,
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
    accepts the most of them at ``target_precision``. Labels never change.

    Returns:
        ``(reference scores, per-chunk target factors or None, name)``
    """
    share_ref = _frozen_share(
        root, frozen, list(ref_ids), ref_win, classes, k, vote
    )
    candidates = {
        "adapted": conf_ref,
        "adapted x frozen vote": conf_ref * share_ref,
    }
    name = calibration.choose_score(candidates, correct, target_precision)
    if name == "adapted":
        return conf_ref, None, name
    scales = []
    for chunk_ids, votes, _, probs in chunks:
        winners = _winners(probs, votes)
        scales.append(
            _frozen_share(
                root, frozen, list(chunk_ids), winners, classes, k, vote
            )
        )
    return candidates[name], scales, name


def _winners(probs: np.ndarray, votes: knn.Votes) -> np.ndarray:
    """The class of each row: the most probable, and among tied ones the
    vote's winner (which breaks ties by similarity)."""
    out = probs.argmax(axis=1)
    lookup = {c: i for i, c in enumerate(votes.classes)}
    for i, lbl in enumerate(votes.labels):
        j = lookup.get(lbl)
        if j is not None and probs[i, j] >= probs[i, out[i]] - 1e-12:
            out[i] = j
    return out


def _classifications(
    votes, nb_ids, probs, cal, threshold, min_confidence, scale=None
):
    """The Classifications of a chunk, which need review, and how many
    were accepted. ``scale``: a factor of each row's raw confidence (the
    frozen vote's share of the winner, see :func:`_accept_score`)."""
    classes = votes.classes
    eps = 1e-3
    logits = np.log((probs + eps) / (1.0 + eps * max(len(classes), 1))).astype(
        np.float32
    )
    labels, review, accepted = [], [], 0
    winners = _winners(probs, votes)
    for i in range(len(probs)):
        if probs[i].sum() <= 0:
            labels.append(None)
            review.append(True)
            continue
        w = int(winners[i])
        raw = float(probs[i, w])
        if scale is not None:
            raw *= float(scale[i])
        conf = float(cal.calibrator(raw)) if cal is not None else raw
        if min_confidence is not None and conf < min_confidence:
            labels.append(None)
            review.append(True)
            continue
        attrs = dict(
            label=classes[w],
            confidence=conf,
            logits=logits[i],
            votes=votes.summary(i),
            neighbors=list(nb_ids[i]),
            vote_share=float(
                votes.probs[i, w] if votes.probs.shape[1] else 0.0
            ),
        )
        if cal is not None:
            attrs["raw_confidence"] = raw
        ok = True
        if threshold is not None:
            ok = raw >= threshold
            attrs["accepted"] = bool(ok)
            accepted += int(ok)
        labels.append(fo.Classification(**attrs))
        review.append(not ok)
    return labels, review, accepted


def find_label_mistakes_adapted(
    samples,
    results,
    label_field: str,
    k: int,
    score_field: str,
    neighbors_field: str,
    progress: ProgressArg,
    t0: float,
    record: dict,
):
    """``find_label_mistakes(method="adapted")``: scores every labeled,
    embedded sample with :func:`prelabel.adapt.label_error_scores` and
    writes the same fields as the default method, atomically."""
    from prelabel import validation
    from prelabel.mistakes import LabelMistakesResult
    from prelabel.preannotate import _natural_key

    root = samples._root_dataset
    dataset = samples._dataset
    emb_field = results.config.embeddings_field
    adapter_rec = adapt.adapter_record(root, emb_field)
    if adapter_rec is not None:
        emb_field = adapter_rec["embeddings_field"]
    labeled = validation.labeled(samples, label_field).exists(emb_field)
    ids, vecs, own = labeled.values(["id", emb_field, f"{label_field}.label"])
    out = LabelMistakesResult(score_field, neighbors_field)
    if len(ids) <= k:
        raise ValueError(
            f"only {len(ids)} labeled samples with {emb_field!r}; need more "
            f"than k={k} to score them"
        )
    classes = sorted(set(own), key=_natural_key)
    lookup = {c: i for i, c in enumerate(classes)}
    y = np.array([lookup[c] for c in own], dtype=np.int64)
    X = np.stack([np.asarray(v, dtype=np.float32) for v in vecs])
    del vecs
    bar = Progress(progress, 2, "Scoring labels (cross-fitted)")
    scores, probs, nb, _ = adapt.label_error_scores(X, y, len(classes), k=k)
    bar.update(1)
    winners = probs.argmax(axis=1)
    counts = np.zeros((len(ids), len(classes)), dtype=np.int64)
    np.add.at(
        counts, (np.repeat(np.arange(len(ids)), nb.shape[1]), y[nb].ravel()), 1
    )
    majority = {}
    for i, sid in enumerate(ids):
        w = int(winners[i])
        order = [w] + [
            c for c in np.argsort(-counts[i], kind="stable")[:3] if c != w
        ][:2]
        summary = ", ".join(
            f"{classes[c]}: {counts[i, c]}" for c in order if counts[i, c]
        )
        majority[sid] = fo.Classification(
            label=classes[w],
            confidence=float(probs[i, w]),
            votes=summary,
            neighbors=[ids[j] for j in nb[i]],
        )
    out.num_disagree = int((winners != y).sum())
    staged = {
        score_field: (fo.FloatField, {}),
        neighbors_field: CLASSIFICATION,
    }
    try:
        with staged_fields(dataset, staged) as tmp:
            tmp.record(records.MISTAKES, score_field, record)
            dataset.set_values(
                tmp[score_field],
                dict(zip(ids, map(float, scores), strict=True)),
                key_field="id",
            )
            dataset.set_values(tmp[neighbors_field], majority, key_field="id")
    finally:
        bar.update(1)
        bar.close()
    out.num_scored = len(ids)
    out.seconds["total"] = time.perf_counter() - t0
    return out
