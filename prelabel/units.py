"""What one point of an index stands for: a whole sample, or one object
patch (a ``Detection`` of a patches field).

Every job that reads vectors and labels, or writes a result per point,
goes through one of these (:func:`resolve` picks it) so that whole images
and boxes share one path:

- :class:`Samples`: points are samples; a vector is a sample field, a
  label a ``Classification`` field, and a result a ``Classification`` in
  a field of its own;
- :class:`Patches`: points are the labels of a ``Detections`` (or
  ``Detection``) field, keyed by label id; a vector is an attribute of
  each label, the label is the box's own ``label`` (``None``: an
  unlabeled box), and a result is a ``fo.Detection`` on the same box, in
  a ``Detections`` field of its own that links back by ``source_id``.
  The boxes a person drew are never modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import fiftyone as fo
import fiftyone.core.utils as fou
import numpy as np
from bson import ObjectId
from fiftyone import ViewField as F
from pymongo import UpdateOne

from prelabel import constants
from prelabel.stored_vectors import values_with_vectors

#: the ``fields`` entry of a Classification field
CLASSIFICATION = (
    fo.EmbeddedDocumentField,
    {"embedded_doc_type": fo.Classification},
)

#: the label types a patches field may hold
PATCH_TYPES = (fo.Detection, fo.Detections)


class Samples:
    """Points are whole samples."""

    patches_field: str | None = None
    #: what a point is called in messages
    noun, plural = "sample", "samples"
    #: the label type of a job's per-point result field
    result_doc = fo.Classification

    @property
    def result_type(self) -> tuple:
        """The ``fields`` entry (see :mod:`prelabel.fields`) of a job's
        per-point result field."""
        return (
            fo.EmbeddedDocumentField,
            {"embedded_doc_type": self.result_doc},
        )

    def path(self, samples, attr: str) -> str:
        """The database path of a per-point ``attr`` (a sample field)."""
        return attr

    def label_field(self, label_field: str | None) -> str | None:
        """The field whose labels the points carry."""
        return label_field

    def ids(self, samples) -> list[str]:
        """The points of ``samples``."""
        return samples.values("id")

    def labeled(self, samples, label_field: str) -> tuple[list, list]:
        """``(ids, labels)`` of the points of ``samples`` that have a
        label in ``label_field``."""
        return samples.match(F(f"{label_field}.label").exists()).values(
            ["id", f"{label_field}.label"]
        )

    def counted(self, samples, field: str | None) -> str | None:
        """What ``fo.Count`` counts for the points of ``samples`` with a
        ``field`` (None: every point)."""
        return field

    def count(self, samples) -> int:
        """How many points ``samples`` holds."""
        return samples.count(self.counted(samples, None))

    def count_embedded(self, samples, field: str) -> int:
        """How many points of ``samples`` have a vector in ``field``."""
        return samples.count(self.counted(samples, field))

    def coverage(self, samples, field: str) -> tuple[int, int]:
        """``(points with a vector in field, points)`` of ``samples``,
        both counted in one pass over the collection."""
        total, embedded = samples.aggregate(
            [
                fo.Count(self.counted(samples, None)),
                fo.Count(self.counted(samples, field)),
            ]
        )
        return embedded, total

    def tag_for_review(self, dataset, ids: Sequence[str]) -> None:
        """Tags the given points for review, once their result field is
        in place (samples get the sample tag; a box's result carries the
        label tag already, see :meth:`writer`)."""
        if ids:
            dataset.select(list(ids)).tag_samples(constants.REVIEW_TAG)

    def sample_vectors(
        self, samples, field: str, size: int | None, seed=None
    ) -> list[tuple]:
        """``(point id, sample id, vector)`` of the points with a vector
        in ``field``: all of them, or those of ``size`` random samples."""
        if not samples.has_field(field):
            return []
        view = samples.exists(field)
        if size is not None:
            quick = take(samples, size, seed).exists(field)
            # a dataset mostly without vectors: pick among those it has
            view = quick if len(quick) >= size // 2 else view.take(size, seed)
        ids, vecs = values_with_vectors(view, ["id", field], field)
        return list(zip(ids, ids, vecs, strict=True))

    def read_vectors(
        self, dataset, ids: Sequence[str], field: str
    ) -> tuple[list[str], np.ndarray]:
        """``(ids, float32 matrix)`` of the given points' ``field``, in
        the order the database returns them (points without a vector
        are left out)."""
        found, vecs = values_with_vectors(
            dataset.select(list(ids)), ["id", field], field
        )
        return _matrix(found, vecs)

    def writer(self, dataset, field: str, ids) -> _SampleWriter:
        """Writes one result per point of ``ids`` into ``field``, a chunk
        at a time: ``writer.write({id: attributes or None}, review)``
        (the attributes of the point's ``fo.Classification``)
        (``review``: the ids to tag for review; samples are tagged by the
        caller once the field is in place), then ``writer.close()``."""
        return _SampleWriter(dataset, field, self.result_type)


class Patches(Samples):
    """Points are the labels of ``patches_field``, keyed by label id.

    Args:
        patches_field: a ``Detections`` or ``Detection`` field
    """

    noun, plural = "box", "boxes"
    result_doc = fo.Detections

    def __init__(self, patches_field: str):
        self.patches_field = patches_field
        #: label id -> its sample id, and its box, for the ids seen
        self.parent: dict[str, str] = {}
        self.box: dict[str, list] = {}

    def path(self, samples, attr: str) -> str:
        _, path = samples._get_label_field_path(self.patches_field, attr)
        return path

    def label_field(self, label_field: str | None) -> str:
        return self.patches_field

    def record_name(self, attr: str) -> str:
        """The name prelabel's records give the boxes' ``attr``."""
        return f"{self.patches_field}:{attr}"

    def rows(self, samples, attrs: Sequence[str]) -> list[tuple]:
        """``(label id, sample id, box, *attrs)`` of every label of
        ``samples`` (as filtered there), in sample order; the parents and
        boxes are remembered."""
        paths = [self.path(samples, a) for a in ("id", "bounding_box")]
        paths += [self.path(samples, a) for a in attrs]
        values = samples.values(["id"] + paths)
        rows = []
        for sid, *cols in zip(*values, strict=True):
            if cols[0] is None:
                continue
            if not isinstance(cols[0], list):  # one Detection per sample
                cols = [[c] for c in cols]
            for row in zip(*cols, strict=True):
                self.parent[row[0]] = sid
                self.box[row[0]] = row[1]
                rows.append((row[0], sid, *row[1:]))
        return rows

    def ids(self, samples) -> list[str]:
        return [r[0] for r in self.rows(samples, [])]

    def labeled(self, samples, label_field: str) -> tuple[list, list]:
        rows = [r for r in self.rows(samples, ["label"]) if r[3]]
        return [r[0] for r in rows], [r[3] for r in rows]

    def counted(self, samples, field):
        return self.path(samples, field or "id")

    def tag_for_review(self, dataset, ids) -> None:
        pass  # written with each box's result

    def sample_vectors(self, samples, field, size, seed=None):
        view = samples if size is None else take(samples, size, seed)
        return [
            (r[0], r[1], r[3])
            for r in self.rows(view, [field])
            if r[3] is not None
        ]

    def parents_of(self, dataset, ids: Sequence[str]) -> list[str]:
        """The sample of each given label (looked up once if unseen)."""
        unseen = [i for i in ids if i not in self.parent]
        if unseen:
            view = dataset.filter_labels(
                self.patches_field,
                F("_id").is_in([ObjectId(i) for i in unseen]),
            )
            self.rows(view, [])
        return [self.parent.get(i) for i in ids]

    def read_vectors(self, dataset, ids, field):
        wanted = set(ids)
        parents = {p for p in self.parents_of(dataset, ids) if p}
        rows = self.rows(dataset.select(sorted(parents)), [field])
        rows = [r for r in rows if r[0] in wanted]
        return _matrix([r[0] for r in rows], [r[3] for r in rows])

    def writer(self, dataset, field: str, ids) -> _PatchWriter:
        return _PatchWriter(self, dataset, field, ids)


def take(samples, size: int, seed=None):
    """``size`` random samples of ``samples``, as a view.

    Unseeded, from a whole dataset, MongoDB's ``$sample`` picks them
    without reading every document; FiftyOne's ``take`` (used otherwise)
    sorts the collection by a random key, seconds at 500,000 samples.
    """
    whole = isinstance(samples, fo.Dataset) and samples.media_type != "group"
    if seed is not None or not whole:
        return samples.take(size, seed=seed)
    picked = samples._sample_collection.aggregate(
        [{"$sample": {"size": int(size)}}, {"$project": {"_id": True}}]
    )
    return samples.select([str(d["_id"]) for d in picked])


def units_of(patches_field: str | None) -> Samples:
    """:class:`Patches` of ``patches_field``, or :class:`Samples`."""
    return Samples() if patches_field is None else Patches(patches_field)


def resolve(
    samples, patches_field: str | None, label_field: str | None
) -> tuple[Samples, str | None]:
    """The points of a job and the field their labels are read from:
    whole samples and ``label_field``, or the boxes of ``patches_field``
    and their own labels (``label_field`` is then left out, or names
    ``patches_field``).

    Raises:
        ValueError: ``patches_field`` is not a Detections field, or
            ``label_field`` names another field
    """
    if samples._is_patches:
        raise ValueError(
            "this is a patches view; pass the dataset (or a view of its "
            "samples) that the patches come from, with patches_field="
            "<the Detections field>"
        )
    if patches_field is None:
        return Samples(), label_field
    check_patches_field(samples, patches_field)
    if label_field not in (constants.DEFAULT_LABEL_FIELD, patches_field, None):
        raise ValueError(
            f"label_field={label_field!r}: boxes carry their own labels "
            f"(those of patches_field={patches_field!r}); leave label_field "
            "out"
        )
    return Patches(patches_field), patches_field


def embedding_coverage(
    samples, embeddings_field: str, patches_field: str | None = None
) -> tuple[int, int]:
    """``(points with a vector, points)`` of ``samples``: samples, or the
    boxes of ``patches_field`` (``embeddings_field`` an attribute of each
    box).

    Args:
        samples: a dataset or view
        embeddings_field: the vector field (or box attribute)
        patches_field (None): a Detections field

    Returns:
        a tuple of two ints
    """
    points = units_of(patches_field)
    if not samples.has_field(points.path(samples, embeddings_field)):
        return 0, points.count(samples)
    return points.coverage(samples, embeddings_field)


def check_patches_field(samples, patches_field: str) -> None:
    """``patches_field`` is a ``Detections``/``Detection`` field of
    ``samples``."""
    if not isinstance(patches_field, str) or not patches_field:
        raise ValueError(
            f"patches_field must be the name of a Detections field; got "
            f"{patches_field!r}"
        )
    field = samples.get_field(patches_field)
    doc_type = getattr(field, "document_type", None)
    if field is None or doc_type not in PATCH_TYPES:
        what = (
            "does not exist"
            if field is None
            else (
                f"holds {getattr(doc_type, '__name__', type(field).__name__)}"
            )
        )
        raise ValueError(
            f"patches_field={patches_field!r} {what} on dataset "
            f"'{samples._root_dataset.name}'; pass a Detections field "
            "(the boxes to embed, index or label)"
        )


def _matrix(ids, vecs) -> tuple[list[str], np.ndarray]:
    keep = [i for i, v in enumerate(vecs) if v is not None]
    if not keep:
        return [], np.zeros((0, 0), dtype=np.float32)
    return [ids[i] for i in keep], np.stack(
        [np.asarray(vecs[i], dtype=np.float32) for i in keep]
    )


def classification_doc(attrs: dict | None) -> dict | None:
    """The stored form of ``fo.Classification(**attrs)`` (a new label id;
    arrays as FiftyOne stores them), built without FiftyOne's document
    classes, which cost 0.2 ms a label to build and as much to
    serialize."""
    if attrs is None:
        return None
    doc = {"_id": ObjectId(), "_cls": "Classification", "tags": []}
    for name, value in attrs.items():
        if isinstance(value, np.ndarray):
            value = fou.serialize_numpy_array(value)
        doc[name] = value
    return doc


class _SampleWriter:
    """Writes each sample's result (the attributes of a Classification,
    or None) in one bulk request per chunk, as ``set_values`` would."""

    def __init__(self, dataset, field: str, result_type: tuple):
        self.dataset, self.field = dataset, field
        if not dataset.has_sample_field(field):
            ftype, kwargs = result_type
            dataset.add_sample_field(field, ftype, **kwargs)

    def write(self, values: dict, review=()) -> None:
        now = datetime.now(UTC).replace(tzinfo=None)
        ops = [
            UpdateOne(
                {"_id": ObjectId(sid)},
                {
                    "$set": {
                        self.field: classification_doc(attrs),
                        "last_modified_at": now,
                    }
                },
            )
            for sid, attrs in values.items()
        ]
        if ops:
            self.dataset._bulk_write(ops, ids=list(values))

    def close(self) -> None:
        pass


class _PatchWriter:
    """Gathers the results of a sample's boxes (which may arrive in two
    chunks) and writes the sample's ``Detections`` once all are there
    (or at :meth:`close`). A box left for review carries the label tag
    ``needs_review`` (with no label when none was given)."""

    def __init__(self, units: Patches, dataset, field: str, ids):
        self.units, self.dataset, self.field = units, dataset, field
        self.expected: dict[str, int] = {}
        for sid in units.parents_of(dataset, ids):
            self.expected[sid] = self.expected.get(sid, 0) + 1
        self.pending: dict[str, list] = {}

    def write(self, values: dict, review=()) -> None:
        review = set(review)
        parents = self.units.parents_of(self.dataset, list(values))
        ready = []
        for (lid, label), sid in zip(values.items(), parents, strict=True):
            det = self._detection(lid, label)
            if lid in review:
                det.tags = list(det.tags or []) + [constants.REVIEW_TAG]
            self.pending.setdefault(sid, []).append(det)
            if len(self.pending[sid]) >= self.expected.get(sid, 0):
                ready.append(sid)
        self._flush(ready)

    def close(self) -> None:
        self._flush(list(self.pending))

    def _flush(self, sids) -> None:
        if not sids:
            return
        self.dataset.set_values(
            self.field,
            {
                sid: fo.Detections(detections=self.pending.pop(sid))
                for sid in sids
            },
            key_field="id",
        )

    def _detection(self, lid: str, label) -> fo.Detection:
        """The result for box ``lid``: a Detection on the same box, with
        the attributes ``label`` (those of a Classification, or None)."""
        attrs = dict(label or {})
        box = self.units.box.get(lid)
        return fo.Detection(
            bounding_box=None if box is None else list(box),
            source_id=lid,
            **attrs,
        )
