"""Checks at the boundary: one clear sentence per bad input.

Every public entry point (package API and operators) runs these before it
writes anything, so bad input never leaves a half-written field or index.
"""

from __future__ import annotations

import fiftyone as fo
from fiftyone import ViewField as F

RESERVED_FIELDS = (
    "id",
    "_id",
    "filepath",
    "tags",
    "metadata",
    "media_type",
    "created_at",
    "last_modified_at",
)


def check_identifier(value: str, param: str) -> None:
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
    schema = samples.get_field_schema()
    if field not in schema:
        raise ValueError(
            f"{param}={field!r} does not exist on dataset "
            f"'{samples._root_dataset.name}'; run compute_embeddings first"
        )
    if not isinstance(schema[field], (fo.VectorField, fo.ArrayField)):
        raise ValueError(
            f"{param}={field!r} is a {type(schema[field]).__name__}, not an "
            "embeddings (vector) field; pass the field compute_embeddings "
            "wrote"
        )
    first = samples.exists(field).limit(1).values(field)
    if not first:
        raise ValueError(
            f"{param}={field!r} is empty in this collection; run "
            "compute_embeddings on these samples first"
        )
    return int(len(first[0]))


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


def check_pred_field(samples, pred_field: str, label_field: str) -> None:
    """The prediction field is a new name or a Classification field, and
    never the ground truth."""
    check_identifier(pred_field, "pred_field")
    if pred_field == label_field:
        raise ValueError(
            f"pred_field={pred_field!r} is the ground-truth field; "
            "pre-labels go to their own field (e.g. 'prelabel')"
        )
    if pred_field in RESERVED_FIELDS:
        raise ValueError(
            f"pred_field={pred_field!r} is a reserved field; choose another"
        )
    check_classification_field(
        samples, pred_field, param="pred_field", required=False
    )


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
