"""Embeddings adapted to the user's labels, in a dataset: writing them,
keeping the adapter, indexing them.

:func:`adapt_embeddings` learns an :class:`prelabel.core.adapter.Adapter`
from the labeled references (only their labels are read) and writes the
adapted vector of every embedded sample to a field of its own, aside and
swapped in whole; the adapter is kept in a file of the dataset's own
folder and named in the dataset's records. :func:`adapt_index` does that
once per reference set and indexes the field: the index that
``preannotate(..., mode="adapted")`` votes in.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from prelabel import constants, neighbors, records, validation
from prelabel.core import leakage
from prelabel.core.adapter import Adapter, cross_fitted_proba, fit_adapter
from prelabel.core.calibration import MAX_CALIBRATION
from prelabel.core.voting import sort_classes
from prelabel.deprecation import moved
from prelabel.fields import check_output_field, staged_fields
from prelabel.progress import Progress, ProgressArg, sub
from prelabel.stored_vectors import values_with_vectors

#: where the adapters of a dataset are recorded in ``dataset.info``
INFO_KEY = records.ADAPTERS

#: unlabeled samples that the label-free part of the map (centering, PCA)
#: is fitted on, at most (a random subset beyond)
MAX_UNLABELED_FIT = 20000


@dataclass
class AdaptationResult:
    """What :func:`adapt_embeddings` did.

    Attributes:
        out_field: the vector field written
        embeddings_field: the frozen embeddings it was learned from
        path: the adapter file
        num_reference: references whose labels trained it
        num_written: samples given an adapted vector
        dim: the adapted vectors' length
        classes: the classes it knows
        reference_accuracy: cross-fitted accuracy of its classifier on the
            references (each scored by a head that never saw it)
        seconds: timings
    """

    out_field: str
    embeddings_field: str
    path: str
    num_reference: int = 0
    num_written: int = 0
    dim: int = 0
    classes: list[str] = field(default_factory=list)
    reference_accuracy: float | None = None
    seconds: dict = field(default_factory=dict)


def adapter_path(dataset, out_field: str) -> str:
    """Where the adapter of ``out_field`` of ``dataset`` is kept."""
    from prelabel.orphans import adapters_folder

    return os.path.join(adapters_folder(dataset), f"{out_field}.npz")


def adapter_record(dataset, embeddings_field: str) -> dict | None:
    """The record of the adapter that wrote ``embeddings_field``, if any."""
    return records.get(dataset, records.ADAPTERS, embeddings_field)


def load_adapter(dataset, embeddings_field: str) -> Adapter | None:
    """The adapter that wrote ``embeddings_field``, or None if that field
    was not written by :func:`adapt_embeddings`.

    A cloned dataset's records name its original's adapter file: the
    clone reads it and keeps a copy of its own, so that deleting either
    dataset's adapters never takes the other's.
    """
    from prelabel.orphans import adapters_folder

    record = adapter_record(dataset, embeddings_field)
    if record is None:
        return None
    adapter = Adapter.load(record["path"])
    if os.path.dirname(os.path.abspath(record["path"])) != adapters_folder(
        dataset
    ):
        own = adapter_path(
            dataset, f"{embeddings_field}.{uuid.uuid4().hex[:8]}"
        )
        adapter.save(own)
        records.put(
            dataset, records.ADAPTERS, embeddings_field, dict(record, path=own)
        )
    return adapter


def check_adapt_embeddings(
    samples,
    reference=None,
    label_field: str = constants.DEFAULT_LABEL_FIELD,
    embeddings_field: str = constants.DEFAULT_EMBEDDINGS_FIELD,
    out_field: str | None = None,
    overwrite: bool = False,
):
    """Runs every check of :func:`adapt_embeddings` without writing.

    Returns:
        ``(out_field, references view)``

    Raises:
        ValueError: one sentence saying what is wrong and what to do
    """
    import fiftyone as fo

    out_field = out_field or f"{embeddings_field}_adapted"
    validation.check_embeddings_field(samples, embeddings_field)
    validation.check_classification_field(samples, label_field)
    check_output_field(
        samples,
        out_field,
        "out_field",
        records.ADAPTERS,
        overwrite=overwrite,
        never={
            embeddings_field: "the embeddings field it is learned from",
            label_field: "the ground-truth field (the labels it learns)",
        },
        types=(fo.VectorField,),
    )
    refs = neighbors.reference_view(samples, reference, label_field).exists(
        embeddings_field
    )
    if len(refs) < 4 or len(set(refs.distinct(f"{label_field}.label"))) < 2:
        raise ValueError(
            f"the reference set has {len(refs)} embedded samples"
            + (f" with the tag(s) {reference!r}" if reference else "")
            + "; label at least 4 samples of 2 or more classes in "
            f"{label_field!r} first"
        )
    return out_field, refs


def adapt_embeddings(
    samples,
    reference=None,
    label_field: str = constants.DEFAULT_LABEL_FIELD,
    embeddings_field: str = constants.DEFAULT_EMBEDDINGS_FIELD,
    out_field: str | None = None,
    folds: int = 5,
    seed: int = 0,
    batch_size: int = 10000,
    progress: ProgressArg = True,
    overwrite: bool = False,
    near_duplicates: dict[str, int] | None = None,
    **fit_kwargs,
) -> AdaptationResult:
    """Learns embeddings adapted to the labels of ``reference`` and writes
    them to ``out_field`` for every embedded sample of ``samples``.

    Only the references' labels are read; every other sample contributes
    its embedding to the unsupervised part of the map (centering, PCA),
    never a label. Index the new field with :func:`prelabel.sync_index`
    (another brain key) and pre-annotate from it with
    :func:`prelabel.preannotate`, which then also uses the learned
    classifier and calibrates by cross-fitting (see ``mode="adapted"``
    there for all of it in one call).

    The field is written aside and replaces the old one whole when every
    vector is written (one adapter per field, never a mix); the adapter
    file of the replaced field is deleted afterwards.

    Args:
        samples: the samples to write adapted vectors for (a dataset or
            view); they must have ``embeddings_field``
        reference (None): whose labels train the map: ``None`` for every
            sample of ``samples`` labeled in ``label_field``, a tag (or
            list of tags), or a view of labeled samples
        label_field ("ground_truth"): the Classification field of labels
        embeddings_field ("embeddings"): the frozen embeddings
        out_field (None): the vector field to write; default
            ``<embeddings_field>_adapted``
        folds (5): cross-fitted heads (see the module doc)
        seed (0): seeds the folds and the training
        batch_size (10000): samples read and written at a time
        progress (True): a bar, nothing, or ``progress(fraction, label)``
        overwrite (False): allow ``out_field`` to replace a field that
            prelabel did not write
        near_duplicates (None): reference sample id -> group of
            near-duplicates that cross-fitting keeps in one fold (see
            :mod:`prelabel.core.leakage`; :func:`adapt_index` finds them
            through the index); default found by exact search over the
            references' features
        **fit_kwargs: other :func:`fit_adapter` parameters

    Returns:
        an :class:`AdaptationResult`
    """
    import fiftyone as fo

    t0 = time.perf_counter()
    out_field, refs = check_adapt_embeddings(
        samples, reference, label_field, embeddings_field, out_field, overwrite
    )
    validation.check_positive_int(batch_size, "batch_size")
    dataset = samples._dataset
    old = adapter_record(dataset, out_field)
    span = 0.8
    field_info = {"adapted_from": embeddings_field, "label_field": label_field}
    with staged_fields(
        dataset, {out_field: (fo.VectorField, {"info": field_info})}
    ) as tmp:
        data = _training_data(
            samples, refs, embeddings_field, label_field, seed
        )
        t1 = time.perf_counter()
        adapter = fit_adapter(
            data.X_ref,
            data.labels,
            X_unlabeled=data.X_other,
            reference_ids=data.ids,
            classes=data.classes,
            folds=folds,
            seed=seed,
            progress=sub(progress, 0.0, span),
            groups=_group_array(data.ids, near_duplicates),
            **fit_kwargs,
        )
        t2 = time.perf_counter()
        adapter.info.update(
            embeddings_field=embeddings_field, label_field=label_field
        )
        record = _save_adapter(dataset, adapter, data, out_field, reference)
        record["embeddings_field"] = embeddings_field
        record["label_field"] = label_field
        tmp.record(records.ADAPTERS, out_field, record)
        staged = dataset.get_field(tmp[out_field])
        staged.info = dict(field_info, adapter=record["path"], dim=adapter.dim)
        staged.save()
        written = _write_adapted(
            samples.exists(embeddings_field),
            adapter,
            tmp[out_field],
            embeddings_field,
            batch_size,
            sub(progress, span, 1 - span),
        )
        t3 = time.perf_counter()
    if old and os.path.abspath(old["path"]) != record["path"]:
        _remove_own_file(dataset, old["path"])
    return AdaptationResult(
        out_field=out_field,
        embeddings_field=embeddings_field,
        path=record["path"],
        num_reference=len(data.ids),
        num_written=written,
        dim=adapter.dim,
        classes=data.classes,
        reference_accuracy=record["reference_accuracy"],
        seconds={
            "read": t1 - t0,
            "fit": t2 - t1,
            "write": t3 - t2,
            "total": time.perf_counter() - t0,
        },
    )


@dataclass
class _TrainingData:
    ids: list[str]
    labels: list[str]
    classes: list[str]
    X_ref: np.ndarray
    X_other: np.ndarray | None


def _training_data(samples, refs, embeddings_field, label_field, seed=0):
    """The references' vectors and labels, and the vectors of the other
    embedded samples (at most :data:`MAX_UNLABELED_FIT`, a random subset
    beyond) for the label-free part of the map, so that memory does not
    grow with the number of unlabeled samples."""
    ref_ids, ref_vecs, ref_labels = values_with_vectors(
        refs,
        ["id", embeddings_field, f"{label_field}.label"],
        embeddings_field,
    )
    ref_set = set(ref_ids)
    other = [
        sid
        for sid in samples.exists(embeddings_field).values("id")
        if sid not in ref_set
    ]
    if len(other) > MAX_UNLABELED_FIT:
        pick = np.random.default_rng(seed).choice(
            len(other), MAX_UNLABELED_FIT, replace=False
        )
        other = [other[i] for i in sorted(pick)]
    X_other = None
    if other:
        _, X_other = neighbors.read_vectors(
            samples._dataset, other, embeddings_field
        )
    return _TrainingData(
        ids=ref_ids,
        labels=ref_labels,
        classes=sort_classes(ref_labels),
        X_ref=np.stack([np.asarray(v, dtype=np.float32) for v in ref_vecs]),
        X_other=X_other,
    )


#: bumped when fitting changes what an adapter's cross-fitted scores mean
#: (2: near-duplicate references share a fold; 3: their groups are found
#: among as many neighbors as their copies need), so that an adapter of
#: an older recipe is learned again rather than reused
RECIPE = 3


def _group_array(ids, near_duplicates) -> np.ndarray | None:
    """The groups of ``near_duplicates`` in the order of ``ids`` (a
    reference of no group is a group of its own)."""
    if near_duplicates is None:
        return None
    return np.array(
        [near_duplicates.get(s, -1 - i) for i, s in enumerate(ids)],
        dtype=np.int64,
    )


def near_duplicate_groups(
    dataset,
    results,
    flt,
    ref_ids: list[str],
    k: int = constants.DEFAULT_K,
    folds: int = 5,
) -> dict[str, int]:
    """The near-duplicate groups of the references that an adapter's
    cross-fitting keeps whole, found through the index: the references
    scored for calibration
    (:func:`prelabel.core.leakage.calibration_subset`) are linked to
    their neighbors closer than a random sample of the other embedded
    samples (standing for the targets) gets to theirs.

    Args:
        dataset: the dataset of the index
        results: the index's similarity results
        flt: the payload filter of the references
        ref_ids: the references' sample ids
        k (15): the neighbors that will vote
        folds (5): the adapter's folds (a group holds at most a tenth of
            one)

    Returns:
        sample id -> group id; empty when the references are no closer
        to each other than the other samples are to them
    """
    field = results.config.embeddings_field
    rows = leakage.calibration_subset(ref_ids, MAX_CALIBRATION)
    wanted = set(ref_ids)
    others = [s for s in dataset.exists(field).values("id") if s not in wanted]
    if not len(rows) or not others:
        return {}
    pick = [others[i] for i in leakage.sample_rows(len(others))]
    top = np.concatenate(
        [np.zeros(0)]
        + [
            nb.sims[:, 0]
            for nb in neighbors.stream(results, dataset, pick, field, 1, flt)
        ]
    )

    def query(m: int):
        ids, nb_ids, sims = [], [], []
        for nb in neighbors.stream(
            results, dataset, [ref_ids[i] for i in rows], field, m, flt
        ):
            ids.extend(nb.ids)
            nb_ids.extend(nb.neighbor_ids)
            sims.append(nb.sims)
        return ids, nb_ids, np.vstack(sims) if sims else np.zeros((0, m))

    (ids, nb_ids, S), t = leakage.widened(query, k, top)
    if not ids:
        return {}
    row = {sid: i for i, sid in enumerate(ref_ids)}
    idx = np.full(S.shape, -1, dtype=np.int64)
    for i, found in enumerate(nb_ids):
        idx[i, : len(found)] = [row.get(s, -1) for s in found]
    groups = leakage.fold_groups(
        len(ref_ids),
        np.array([row[s] for s in ids], dtype=np.int64),
        idx,
        S,
        t,
        folds,
    )
    if groups is None:
        return {}
    return dict(zip(ref_ids, groups.tolist(), strict=True))


def reference_digest(ids, labels) -> str:
    """A digest of a reference set: its sample ids and their labels."""
    h = hashlib.blake2b(digest_size=12)
    for sid, lbl in sorted(zip(ids, labels, strict=True)):
        h.update(f"{sid}:{lbl};".encode())
    return h.hexdigest()


def _save_adapter(dataset, adapter, data, out_field, reference) -> dict:
    """Saves the adapter in a file of its own (the field's old adapter
    stays until the new field replaces the old one) and returns the
    record of the field."""
    lookup = {c: i for i, c in enumerate(data.classes)}
    y_ref = np.array([lookup[v] for v in data.labels])
    oof = cross_fitted_proba(adapter, data.X_ref, adapter.folds)
    ref_acc = float((oof.argmax(axis=1) == y_ref).mean())
    adapter.info.update(
        {
            "reference": neighbors.describe_reference(reference),
            "reference_accuracy": ref_acc,
        }
    )
    path = adapter_path(dataset, f"{out_field}.{uuid.uuid4().hex[:8]}")
    adapter.save(path)
    return {
        "path": path,
        "reference": neighbors.describe_reference(reference),
        "reference_digest": reference_digest(data.ids, data.labels),
        "recipe": RECIPE,
        "num_reference": len(data.ids),
        "classes": data.classes,
        "folds": adapter.num_heads,
        "dim": adapter.dim,
        "reference_accuracy": ref_acc,
    }


def _write_adapted(
    embedded, adapter, field, embeddings_field, batch_size, progress
) -> int:
    """Writes the adapted vector of every sample of ``embedded``."""
    dataset = embedded._dataset
    ids = embedded.values("id")
    with Progress(progress, len(ids), "Writing adapted embeddings") as bar:
        for a in range(0, len(ids), batch_size):
            chunk_ids, X = neighbors.read_vectors(
                dataset, ids[a : a + batch_size], embeddings_field
            )
            V = adapter.transform(X)
            dataset.set_values(
                field,
                dict(zip(chunk_ids, list(V), strict=True)),
                key_field="id",
            )
            bar.update(len(chunk_ids))
    return len(ids)


def _remove_own_file(dataset, path: str) -> None:
    """Deletes an adapter file if it lies in ``dataset``'s own folder (a
    clone's record may name its original's file, which stays)."""
    from prelabel.orphans import adapters_folder

    folder = adapters_folder(dataset)
    if os.path.dirname(os.path.abspath(path)) == folder:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


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
    results = neighbors.load_index(dataset, results)
    emb_field = results.config.embeddings_field
    if adapter_record(dataset, emb_field) is not None:
        return results, None
    _, refs = check_adapt_embeddings(
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

    Reused while the references (ids and labels) and the recipe of the
    fit (:data:`RECIPE`) are the same, else
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
    digest = reference_digest(ref_ids, ref_labels)
    record = adapter_record(dataset, out_field)
    fresh = (
        record is not None
        and record.get("reference_digest") == digest
        and record.get("recipe") == RECIPE
        and record.get("embeddings_field") == emb_field
    )
    if not fresh:
        flt, _ = neighbors.reference_filter(results, reference, label_field)
        adapt_embeddings(
            dataset,
            reference=refs,
            label_field=label_field,
            embeddings_field=emb_field,
            out_field=out_field,
            progress=progress,
            overwrite=overwrite,
            near_duplicates=near_duplicate_groups(
                dataset, results, flt, ref_ids
            ),
        )
    return sync_index(
        dataset,
        embeddings_field=out_field,
        label_field=label_field,
        brain_key=brain_key,
        progress=progress,
    )


def delete_adapters(dataset, out_field: str | None = None) -> int:
    """Deletes the adapter files of ``dataset`` (or only the one of
    ``out_field``) and their records; the adapted fields stay. (The files
    of a deleted dataset go with :func:`prelabel.delete_orphans`.)

    Returns:
        the number of adapters deleted
    """
    from prelabel.orphans import adapters_folder

    found = records.read(dataset, records.ADAPTERS)
    names = [out_field] if out_field is not None else list(found)
    done = [name for name in names if name in found]
    for name in done:
        _remove_own_file(dataset, found[name]["path"])
    records.update(dataset, remove=[(records.ADAPTERS, n) for n in done])
    folder = adapters_folder(dataset)
    if set(os.listdir(folder)) <= {"owner.json"}:
        shutil.rmtree(folder, ignore_errors=True)
    return len(done)


# names that lived here before the numbers moved to prelabel.core
__getattr__ = moved(
    __name__,
    {
        **{
            name: "prelabel.core.adapter"
            for name in (
                "stratified_folds",
                "Head",
                "train_head",
                "cross_fitted_neighbors",
                "label_error_scores",
            )
        },
        "fit_features": "prelabel.core.vectors",
        "reference_view": "prelabel.neighbors",
    },
)
