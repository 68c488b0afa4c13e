"""Writing sample fields so that nothing a user owns is lost.

Two rules:

1. **Whose field is it.** prelabel writes a field only if it does not exist
   yet or prelabel wrote it itself (its run records say so,
   :mod:`prelabel.records`); a field a person or another tool wrote is
   replaced only when the caller passes ``overwrite=True``
   (:func:`check_output_field`). Ground truth and FiftyOne's own fields
   are never written.

2. **All or nothing.** A job writes temporary fields chunk by chunk
   (:func:`staged_fields`); they replace the real ones only when every
   chunk succeeded. The replacement is journaled in the dataset's records
   before it starts and is idempotent, so a kill at any instant leaves
   either the old field whole or a journal that the next prelabel write on
   the dataset (or :func:`recover`) rolls forward to the new field whole. A
   job that dies while still writing leaves only its temporary field,
   which the next one deletes. Two jobs never write the same field at
   once: the second is told which process holds it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import fiftyone.core.sample as fos

from prelabel import label_indexes, records
from prelabel.index.locking import ProcessId
from prelabel.validation import RESERVED_FIELDS, check_identifier

#: the prefix of every temporary field
TMP_PREFIX = "prelabel_tmp_"


class FieldBusyError(RuntimeError):
    """Another live process is writing the same field."""


def check_output_field(
    samples,
    field: str,
    param: str,
    writer: str,
    overwrite: bool = False,
    never: dict[str, str] | None = None,
    types: tuple = (),
) -> None:
    """Raises unless prelabel may write ``field`` of ``samples``' dataset.

    A field may be written when it does not exist, or when the records
    say the job ``writer`` wrote it (and it has one of ``types``), or when
    ``overwrite=True`` (a field a person or another tool wrote, or one of
    another type). Reserved fields and the fields of ``never`` are refused
    even then.

    Args:
        samples: a dataset or view
        field: the field to write
        param: the parameter that named it, for the message
        writer: the :mod:`prelabel.records` kind of the job writing it
        overwrite (False): allow replacing a field prelabel did not write
        never (None): ``field -> why`` that no job may write (the ground
            truth, the embeddings an index reads, ...)
        types (()): the field classes (or ``(EmbeddedDocumentField,
            document type)``) an existing field may have

    Raises:
        ValueError: one sentence naming ``param`` and what to do
    """
    check_identifier(field, param)
    if not isinstance(overwrite, bool):
        raise ValueError(f"overwrite must be True or False; got {overwrite!r}")
    dataset = samples._dataset
    if field in RESERVED_FIELDS or field.startswith(TMP_PREFIX):
        raise ValueError(
            f"{param}={field!r} is a field FiftyOne or prelabel reserves; "
            "choose another name"
        )
    if field in set(dataset._get_default_sample_fields()):
        raise ValueError(
            f"{param}={field!r} is a built-in FiftyOne field; choose "
            "another name"
        )
    for name, why in (never or {}).items():
        if field == name:
            raise ValueError(
                f"{param}={field!r} would overwrite {why}, which prelabel "
                "never does; choose a new field name"
            )
    existing = dataset.get_field(field)
    if existing is None or overwrite:
        return
    owner = records.writer_of(dataset, field)
    if owner is None:
        raise ValueError(
            f"{param}={field!r} holds {_describe(existing)} values that "
            "prelabel did not write (a person's labels or another tool's); "
            "choose a new field name, or pass overwrite=True to replace them"
        )
    if owner != writer:
        raise ValueError(
            f"{param}={field!r} holds the output of "
            f"{records.WRITERS[owner]}; choose another field name"
        )
    if types and not _has_type(existing, types):
        raise ValueError(
            f"{param}={field!r} is a {_describe(existing)} field; choose a "
            "new field name, or pass overwrite=True to replace it"
        )


def _has_type(field, types) -> bool:
    for t in types:
        if isinstance(t, tuple):
            ftype, doc_type = t
            if isinstance(field, ftype) and (
                getattr(field, "document_type", None) is doc_type
            ):
                return True
        elif isinstance(field, t):
            return True
    return False


def _describe(field) -> str:
    doc_type = getattr(field, "document_type", None)
    return doc_type.__name__ if doc_type else type(field).__name__


class Staging:
    """What a job writing staged fields gets: the temporary field to write
    instead of each real one, and the records to save with the swap.

    Attributes:
        tmp: final field name -> the temporary field to write instead
    """

    def __init__(self, tmp: dict[str, str]):
        self.tmp = tmp
        self._now: datetime | None = None
        self._records: dict[tuple[str, str], dict] = {}
        self._removed: list[tuple[str, str]] = []

    def __getitem__(self, name: str) -> str:
        return self.tmp[name]

    @property
    def now(self) -> datetime:
        """The ``last_modified_at`` the swap gives every sample it moves
        (naive UTC, whole milliseconds, as MongoDB stores it), also after
        a recovery; fixed when first read, at the latest when the swap is
        journaled. Read after the last write, a sample modified later has
        a later one."""
        if self._now is None:
            self._now = _now()
        return self._now

    def record(self, kind: str, name: str, record: dict) -> None:
        """Saves ``record`` in the same update that completes the swap."""
        self._records[(kind, name)] = record

    def forget(self, kind: str, name: str) -> None:
        """Removes a record in the same update that completes the swap."""
        self._removed.append((kind, name))


@contextmanager
def staged_fields(
    dataset, fields: dict, replace: bool = True
) -> Iterator[Staging]:
    """Temporary fields that replace ``fields`` when the block succeeds.

    Args:
        dataset: the dataset to write
        fields: final field name -> ``(field type, add_sample_field
            keyword arguments)``
        replace (True): the new field holds only what the job wrote (a
            sample the job did not write loses its old value); ``False``
            merges: only the samples the job wrote change

    Yields:
        a :class:`Staging`; write ``staging.tmp[name]`` instead of
        ``name``, and pass records to save with ``staging.record``

    On success every final field is replaced as a whole and the records
    are saved; on any exception (``KeyboardInterrupt`` included) the
    temporary fields are deleted and the final ones are left as they were.

    Raises:
        FieldBusyError: another live process is writing one of the fields
    """
    recover(dataset)
    token = uuid.uuid4().hex[:8]
    tmp = {name: f"{TMP_PREFIX}{i}_{token}" for i, name in enumerate(fields)}
    owner = ProcessId.current().to_dict()
    claimed = []
    try:
        for name in fields:
            entry = {
                "state": "writing",
                "tmp": tmp[name],
                "token": token,
                "replace": bool(replace),
                # a new field has no old values to clear at the swap
                "existed": dataset.has_sample_field(name),
                "owner": owner,
            }
            if not records.update(
                dataset,
                put={(records.PENDING, name): entry},
                only_if_absent=(records.PENDING, name),
            ):
                raise _busy(dataset, name)
            claimed.append(name)
        for name, (ftype, kwargs) in fields.items():
            dataset.add_sample_field(tmp[name], ftype, **kwargs)
        staging = Staging(tmp)
        yield staging
    except BaseException:
        _roll_back(dataset, {n: tmp[n] for n in claimed})
        raise
    _commit(dataset, fields, tmp, staging)


def _busy(dataset, name: str) -> FieldBusyError:
    entry = records.get(dataset, records.PENDING, name) or {}
    who = ProcessId.from_dict(entry.get("owner") or {})
    return FieldBusyError(
        f"the field {name!r} of dataset '{dataset.name}' is being written "
        f"by {who}; wait for that job to finish and try again (if that "
        "process is gone but ran on another machine, run "
        "prelabel.recover(dataset, force=True) first)"
    )


def _roll_back(dataset, tmp: dict[str, str]) -> None:
    """Deletes the temporary fields and their journal entries."""
    for staged in tmp.values():
        if dataset.has_sample_field(staged):
            dataset.delete_sample_field(staged)
        else:
            _unset(dataset, staged)
    if tmp:
        records.update(dataset, remove=[(records.PENDING, n) for n in tmp])


def _commit(dataset, fields: dict, tmp: dict[str, str], staging) -> None:
    """Journals the swap as ready, then performs it."""
    entries = records.read(dataset, records.PENDING)
    put = {}
    for i, name in enumerate(fields):
        entry = dict(entries[name], state="ready")
        if i == 0:
            # the records are saved with the last step; a recovery that
            # finishes the swap saves them too
            entry["records"] = [
                [kind, rname, rec]
                for (kind, rname), rec in staging._records.items()
            ]
            entry["forget"] = [list(r) for r in staging._removed]
        entry["now"] = staging.now.isoformat()
        put[(records.PENDING, name)] = entry
    records.update(dataset, put=put)
    _swap(dataset, list(fields))


def _declare_like(dataset, name: str, staged: str) -> None:
    """Declares the final field with the type of its temporary one; an
    existing field of another type (one the caller chose to overwrite)
    goes first."""
    want = dataset.get_field(staged)
    existing = dataset.get_field(name)
    doc_type = getattr(want, "document_type", None)
    if existing is not None:
        if type(existing) is type(want) and (
            getattr(existing, "document_type", None) is doc_type
        ):
            if want.info is not None and existing.info != want.info:
                existing.info = want.info
                existing.save()
            return
        dataset.delete_sample_field(name)
    kwargs = {"embedded_doc_type": doc_type} if doc_type else {}
    dataset.add_sample_field(name, type(want), info=want.info, **kwargs)


def _swap(dataset, names: list[str]) -> None:
    """Moves each journaled temporary field into place (idempotent, so a
    recovery may run it again), then saves the records and clears the
    journal in one update."""
    coll = dataset._sample_collection
    entries = records.read(dataset, records.PENDING)
    # a recovery stamps the time the job chose (and may have recorded)
    stamps = [
        entries[n]["now"] for n in names if entries.get(n, {}).get("now")
    ]
    now = datetime.fromisoformat(stamps[0]) if stamps else _now()
    for name in names:
        entry = entries.get(name)
        if entry is None:
            continue
        staged = entry["tmp"]
        if dataset.has_sample_field(staged):
            _declare_like(dataset, name, staged)
        if (
            entry["state"] == "ready"
            and entry.get("replace", True)
            and entry.get("existed", True)
        ):
            # the samples the job did not write lose the old value; done
            # once, before any move (after one it would erase moved values)
            coll.update_many(
                {**_holding(dataset, name), staged: {"$exists": False}},
                {"$unset": {name: ""}, "$set": {"last_modified_at": now}},
            )
        if entry["state"] == "ready":
            entry = dict(entry, state="moving")
            records.put(dataset, records.PENDING, name, entry)
        coll.update_many(
            {staged: {"$exists": True}},
            {"$rename": {staged: name}, "$set": {"last_modified_at": now}},
        )
        if dataset.has_sample_field(staged):
            _drop_moved_field(dataset, staged)
    put, remove = {}, []
    for name in names:
        entry = entries.get(name) or {}
        for kind, rname, rec in entry.get("records") or []:
            put[(kind, rname)] = rec
        for kind, rname in entry.get("forget") or []:
            remove.append((kind, rname))
        remove.append((records.PENDING, name))
    records.update(dataset, put=put, remove=remove)
    fos.Sample._reload_docs(dataset._sample_collection_name)


def _now() -> datetime:
    """Now as MongoDB stores a date: naive UTC, whole milliseconds."""
    now = datetime.now(UTC).replace(tzinfo=None)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _holding(dataset, name: str) -> dict:
    """The samples that hold a value in ``name``. Every value of a field of
    labels with ids (a ``Classification``) has an ``_id``, which the
    ``<name>.id`` index a job creates answers without reading every sample
    (0.46 s -> 0.03 s at 500,000); a null there is no value either way."""
    doc_type = getattr(dataset.get_field(name), "document_type", None)
    if "id" in getattr(doc_type, "_fields", ()):
        return label_indexes.present(name)
    return {name: {"$exists": True}}


def _drop_moved_field(dataset, staged: str) -> None:
    """Deletes the schema of a temporary field that no sample holds any
    more (every value was just moved into place).

    FiftyOne's ``delete_sample_field`` would also unset it on every sample
    and stamp each one's ``last_modified_at``: 1.5 s at 70,000 samples,
    and every sample, written or not, would look modified. The steps below
    are the rest of what it does for a plain top-level field (fields of
    label schemas or of grouped media take FiftyOne's own path).
    """
    if staged in (dataset.label_schemas or {}) or (
        dataset.media_type == "group"
    ):
        dataset.delete_sample_field(staged)
        return
    doc_cls = dataset._sample_doc_cls
    doc_cls._reload_fields()
    doc_cls._delete_field_schema(staged)
    dataset._doc.app_config._delete_paths([staged])
    dataset._doc.save()
    doc_cls._delete_indexes([staged])
    dataset._reload()


def _unset(dataset, staged: str) -> None:
    dataset._sample_collection.update_many(
        {staged: {"$exists": True}}, {"$unset": {staged: ""}}
    )


def recover(dataset, force: bool = False) -> list[str]:
    """Finishes or undoes the field writes that a dead process left.

    A write that was still running when its process died is undone (its
    temporary field deleted); one that had written every chunk is
    finished (the new field moved into place, its records saved). Writes
    of live processes, and of processes on other machines, are left to
    them. Temporary fields that no journal mentions are deleted.

    Args:
        dataset: the dataset
        force (False): also finish or undo the writes of processes that
            look alive: only for a write whose process is known to be gone
            but cannot be checked (it ran on another machine)

    Returns:
        the fields whose write was finished or undone
    """
    done = []
    entries = records.read(dataset, records.PENDING)
    if entries:
        dataset.reload()
    for name, entry in entries.items():
        owner = ProcessId.from_dict(entry.get("owner") or {})
        if owner.alive() and not force:
            continue
        # claim it, so that two recovering processes do not both act
        me = ProcessId.current().to_dict()
        claimed = dict(entry, owner=me)
        if not _claim(dataset, name, entry, claimed):
            continue
        if entry["state"] == "writing":
            _roll_back(dataset, {name: entry["tmp"]})
        else:
            _swap(dataset, [name])
        done.append(name)
    _drop_stray_tmp_fields(dataset)
    return done


def _claim(dataset, name, entry, claimed) -> bool:
    coll = records._collection()
    path = f"info.{records.PENDING}.{name}"
    result = coll.update_one(
        {"_id": dataset._doc.id, f"{path}.owner": entry.get("owner")},
        {"$set": {path: claimed}},
    )
    dataset._doc.reload("info")
    return result.modified_count == 1


def _drop_stray_tmp_fields(dataset) -> None:
    """Temporary fields no journal entry mentions (left by an older
    prelabel, or by a write whose journal was removed by hand)."""
    pending = records.read(dataset, records.PENDING)
    live = {e.get("tmp") for e in pending.values()}
    for name in list(dataset.get_field_schema()):
        if name.startswith(TMP_PREFIX) and name not in live:
            dataset.delete_sample_field(name)
