"""MongoDB indexes that let the mistakes panel read only the samples it
shows, however large the dataset.

The panel's rows and charts are the samples that hold both a label field
and a pre-label (or a score). FiftyOne writes "has this label" as an
aggregation expression, which MongoDB answers by reading every sample;
at 500,000 samples that is 0.4-0.8 s per question. Every FiftyOne label
carries an ``_id``, so "``field._id`` is an ObjectId" says the same thing
in a form an index on ``field.id`` answers by itself
(:func:`present`). :func:`ensure` creates those indexes after a job writes
its field: on the label field it voted with, on the field it wrote.

The indexes are FiftyOne's own (``dataset.list_indexes()`` shows them,
``dataset.drop_index()`` removes them, deleting a field drops its index);
without them every query still answers the same, only slower.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def present(*fields: str) -> dict:
    """A MongoDB query that keeps the samples holding a label in each of
    ``fields`` (top-level label fields), answerable from their indexes.

    Args:
        *fields: label field names

    Returns:
        a dict for ``samples.match()``
    """
    return {f"{field}._id": {"$type": "objectId"} for field in fields}


def scored(score_field: str, min_score: float | None = None) -> dict:
    """A MongoDB query that keeps the samples with a numeric
    ``score_field`` (at least ``min_score``), answerable from its index."""
    cond: dict = {"$type": "number"}
    if min_score:
        cond["$gte"] = float(min_score)
    return {score_field: cond}


def ensure(samples, label_fields=(), score_fields=()) -> None:
    """Creates the indexes :func:`present` and :func:`scored` use, on the
    dataset of ``samples``, where missing. A failure (say, MongoDB's limit
    of 64 indexes) is logged, not raised: queries stay right without them.

    Args:
        samples: a dataset or view
        label_fields (()): top-level label fields to index
        score_fields (()): top-level float fields to index
    """
    dataset = samples._root_dataset
    wanted = [f"{f}.id" for f in label_fields] + list(score_fields)
    existing = set(dataset.list_indexes())
    for path in wanted:
        if path in existing:
            continue
        try:
            dataset.create_index(path)
        except Exception as e:  # noqa: BLE001 - an index is an optimization
            logger.warning("Could not index '%s': %s", path, e)
