"""Checks at the boundary: one clear sentence per bad input.

Every public entry point (package API and operators) runs these before it
writes anything, so bad input never leaves a half-written field or index.
"""

from __future__ import annotations

import fiftyone as fo
from fiftyone import ViewField as F

#: FiftyOne's own sample fields and names it reserves; never written
RESERVED_FIELDS = frozenset(
    {
        "id",
        "_id",
        "filepath",
        "tags",
        "metadata",
        "media_type",
        "created_at",
        "last_modified_at",
        "frames",
        "group",
        "_dataset_id",
        "_sample_id",
    }
)


def check_identifier(value: str, param: str) -> None:
    """``value`` is a name a field or a key can have."""
    if not isinstance(value, str) or not value.isidentifier():
        raise ValueError(
            f"{param}={value!r} is not a valid name; use letters, digits "
            "and underscores, not starting with a digit"
        )


def check_embeddings_field(samples, field: str, param="embeddings_field"):
    """The field exists, holds vectors, and at least one sample has one.

    Returns:
        the dimension of the embeddings
    """
    if not field:
        raise ValueError(f"{param} is required; name the embeddings field")
    found = samples.get_field(field) if samples.has_field(field) else None
    if found is None:
        raise ValueError(
            f"{param}={field!r} does not exist on dataset "
            f"'{samples._root_dataset.name}'; run compute_embeddings first"
        )
    if not isinstance(found, (fo.VectorField, fo.ArrayField)):
        raise ValueError(
            f"{param}={field!r} is a {type(found).__name__}, not an "
            "embeddings (vector) field; pass the field compute_embeddings "
            "wrote"
        )
    first = _first_vector(samples.exists(field).limit(1).values(field))
    start = 1
    while first is None and "." in field:
        # the boxes of the first samples may all lack a vector
        page = samples.exists(field).skip(start).limit(1000).values(field)
        if not page:
            break
        first, start = _first_vector(page), start + len(page)
    if first is None:
        raise ValueError(
            f"{param}={field!r} is empty in this collection; run "
            "compute_embeddings on these samples first"
        )
    return int(len(first))


def _first_vector(values):
    """The first vector of ``values`` (lists of them, for a box
    attribute), or None."""
    for v in values:
        if isinstance(v, list):  # the vectors of a sample's boxes
            v = next((x for x in v if x is not None), None)
        if v is not None and len(v):
            return v
    return None


def check_classification_field(
    samples, field: str, param="label_field", required=True
):
    """The field is a ``Classification`` field (or absent, if allowed)."""
    if not field:
        raise ValueError(f"{param} is required; name a Classification field")
    schema = samples.get_field_schema()
    if field not in schema:
        if required:
            raise ValueError(
                f"{param}={field!r} does not exist on dataset "
                f"'{samples._root_dataset.name}'; name the field holding "
                "your labels"
            )
        return
    doc_type = getattr(schema[field], "document_type", None)
    if doc_type is not fo.Classification:
        kind = doc_type.__name__ if doc_type else type(schema[field]).__name__
        raise ValueError(
            f"{param}={field!r} holds {kind}, not Classification; "
            "prelabel votes on image-level Classification labels"
        )


def check_positive_int(value, param: str) -> int:
    """``value`` is a whole number of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{param} must be a positive whole number; got {value!r}"
        )
    return value


def check_fraction(value, param: str, optional: bool = True):
    """``value`` is a number between 0 and 1 (or None when optional)."""
    if value is None and optional:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0.0 <= float(value) <= 1.0
    ):
        raise ValueError(
            f"{param} must be a number between 0 and 1; got {value!r}"
        )
    return float(value)


def check_k(k, num_reference: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    if k > num_reference:
        raise ValueError(
            f"k={k} is larger than the reference set ({num_reference} "
            f"labeled samples); use k <= {num_reference} or label more "
            "samples"
        )
    return k


def labeled(samples, label_field: str):
    """The samples of ``samples`` that have a label in ``label_field``."""
    return samples.match(F(f"{label_field}.label").exists())
