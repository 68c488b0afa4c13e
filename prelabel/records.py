"""What prelabel remembers about a dataset, in ``dataset.info``: the one
module that reads and writes those records.

Kinds of records, each a dict under its own ``dataset.info`` key, one
entry per field (or per adapted field):

- :data:`RUNS` (``prelabel_runs``): pre-label fields written by
  :func:`prelabel.preannotate` and how they were made;
- :data:`MISTAKES` (``prelabel_mistakes``): score fields written by
  :func:`prelabel.find_label_mistakes`, with their neighbors field;
- :data:`ADAPTERS` (``prelabel_adapters``): adapted embeddings fields and
  the adapter file that wrote them;
- :data:`EMBEDDINGS` (``prelabel_embeddings``): embeddings fields written
  by :func:`prelabel.compute_embeddings`;
- :data:`ACCEPTED` (``prelabel_accepted``): fields the mistakes panel's
  "accept" action copies labels into;
- :data:`SELECTIONS` (``prelabel_selections``): reason fields written by
  :func:`prelabel.select_for_labeling`, with their outlier field, picks,
  tags and saved view;
- :data:`PENDING` (``prelabel_pending``): field writes in progress (see
  :mod:`prelabel.fields`), so that a killed job can be finished or undone.

Every write is one atomic MongoDB update of the dataset document that sets
or removes single entries, so two processes recording different fields
never overwrite each other's records (a whole-``info`` save would).
"""

from __future__ import annotations

import fiftyone.core.odm as foo

RUNS = "prelabel_runs"
MISTAKES = "prelabel_mistakes"
ADAPTERS = "prelabel_adapters"
EMBEDDINGS = "prelabel_embeddings"
ACCEPTED = "prelabel_accepted"
SELECTIONS = "prelabel_selections"
PENDING = "prelabel_pending"

KINDS = (RUNS, MISTAKES, ADAPTERS, EMBEDDINGS, ACCEPTED, SELECTIONS, PENDING)

#: what each kind of record is called in a message
WRITERS = {
    RUNS: "prelabel.preannotate",
    MISTAKES: "prelabel.find_label_mistakes",
    ADAPTERS: "prelabel.adapt_embeddings",
    EMBEDDINGS: "prelabel.compute_embeddings",
    ACCEPTED: "the mistakes panel's accept action",
    SELECTIONS: "prelabel.select_for_labeling",
}

#: the record entry naming a second field each kind writes
SECOND_FIELD = {MISTAKES: "neighbors_field", SELECTIONS: "outlier_field"}


def _collection():
    return foo.get_db_conn().datasets


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; use one of {KINDS}")


def read(dataset, kind: str) -> dict:
    """Every record of ``kind``, as stored now in the database (not as the
    possibly older in-memory ``dataset.info`` has it)."""
    _check_kind(kind)
    doc = _collection().find_one({"_id": dataset._doc.id}, {f"info.{kind}": 1})
    info = (doc or {}).get("info") or {}
    return dict(info.get(kind) or {})


def get(dataset, kind: str, name: str) -> dict | None:
    """The record of ``kind`` for ``name``, or None."""
    return read(dataset, kind).get(name)


def update(
    dataset,
    put: dict[tuple[str, str], dict] | None = None,
    remove: list[tuple[str, str]] | tuple = (),
    only_if_absent: tuple[str, str] | None = None,
) -> bool:
    """Sets and removes records in one atomic update.

    Args:
        dataset: the dataset
        put (None): ``(kind, name) -> record`` to set
        remove (()): ``(kind, name)`` pairs to remove
        only_if_absent (None): a ``(kind, name)`` that must not exist yet;
            the update is skipped if it does

    Returns:
        whether the update was applied
    """
    put = put or {}
    for kind, name in list(put) + list(remove):
        _check_kind(kind)
        _check_name(name)
    coll = _collection()
    _id = dataset._doc.id
    # "info.x.y" cannot be set inside a null info
    coll.update_one({"_id": _id, "info": None}, {"$set": {"info": {}}})
    query = {"_id": _id}
    if only_if_absent is not None:
        kind, name = only_if_absent
        query[f"info.{kind}.{name}"] = {"$exists": False}
    change = {}
    if put:
        change["$set"] = {
            f"info.{kind}.{name}": record
            for (kind, name), record in put.items()
        }
    if remove:
        change["$unset"] = {f"info.{kind}.{name}": "" for kind, name in remove}
    if not change:
        return True
    applied = coll.update_one(query, change).matched_count == 1
    for kind in {kind for kind, _ in remove}:
        # no empty dicts left behind in the info a person reads
        coll.update_one(
            {"_id": _id, f"info.{kind}": {}}, {"$unset": {f"info.{kind}": ""}}
        )
    dataset._doc.reload("info")
    return applied


def put(dataset, kind: str, name: str, record: dict) -> None:
    """Sets the record of ``kind`` for ``name``."""
    update(dataset, put={(kind, name): record})


def remove(dataset, kind: str, name: str) -> None:
    """Removes the record of ``kind`` for ``name`` (if any)."""
    update(dataset, remove=[(kind, name)])


def writer_of(dataset, field: str) -> str | None:
    """The kind of record saying that prelabel wrote ``field``, or None
    when no record claims it (a field a person or another tool wrote)."""
    info = (
        _collection().find_one(
            {"_id": dataset._doc.id},
            {f"info.{k}": 1 for k in WRITERS},
        )
        or {}
    ).get("info") or {}
    for kind in WRITERS:
        records = info.get(kind) or {}
        if field in records:
            return kind
        second = SECOND_FIELD.get(kind)
        if second and any(r.get(second) == field for r in records.values()):
            return kind
    return None


def _check_name(name: str) -> None:
    # record names become MongoDB key paths: field names are identifiers
    if not isinstance(name, str) or not name or "." in name or "$" in name:
        raise ValueError(f"{name!r} cannot name a record")
