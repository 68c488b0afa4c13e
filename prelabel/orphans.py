"""What prelabel leaves on disk that nothing uses any more, and deleting
it.

An embedded index lives in a folder and an adapter in a file, outside the
database. ``fo.delete_dataset`` cannot know about them, and a process
killed during a first sync leaves an unfinished index that no run names.
:func:`delete_orphans` finds both under prelabel's home folder and deletes
them; :func:`prelabel.sync_index` runs it before each sync. Only folders
whose marker names this database are considered, so two databases sharing
one home folder never delete each other's indexes.
"""

from __future__ import annotations

import logging
import os
import shutil

import fiftyone.core.odm as foo

from prelabel import constants
from prelabel.index import ownership
from prelabel.index.edge import EdgeIndex, inspect_folder
from prelabel.index.locking import ProcessId

logger = logging.getLogger(__name__)

#: the folder of the adapter files under prelabel's home
ADAPTERS = "adapters"
#: the marker of a dataset's adapter folder
ADAPTERS_OWNER = "owner.json"


def delete_orphans(keep=None, dry_run: bool = False) -> list[str]:
    """Deletes the embedded indexes and adapter files under prelabel's
    home that belong to deleted datasets of this database, and the
    unfinished indexes of first syncs whose process is gone.

    Args:
        keep (None): a ``(dataset, brain_key)`` whose unfinished index is
            left in place (the sync about to resume it)
        dry_run (False): only list what would be deleted

    Returns:
        the deleted (or, with ``dry_run``, deletable) folders and files
    """
    db = ownership.database_id()
    datasets = {str(d["_id"]) for d in foo.get_db_conn().datasets.find({}, {})}
    keep_key = (str(keep[0]._doc.id), keep[1]) if keep else None
    found = []
    root = ownership.indexes_root()
    for dataset_id in _listdir(root):
        folder = os.path.join(root, dataset_id)
        for name in _listdir(folder):
            path = os.path.join(folder, name)
            state = inspect_folder(path)
            if state.kind != "ours" or state.meta.get("database_id") != db:
                continue
            if _is_orphan(state.meta, datasets, keep_key):
                found.append(path)
                if not dry_run:
                    EdgeIndex(path).drop()
        if not dry_run:
            _rmdir_if_empty(folder)
    found += _orphan_adapter_folders(db, datasets, dry_run)
    if found and not dry_run:
        logger.info("Deleted %d orphaned prelabel folders", len(found))
    return found


def _is_orphan(meta: dict, datasets: set, keep_key) -> bool:
    dataset_id = meta.get("dataset_id")
    if dataset_id not in datasets and not _dataset_exists(dataset_id):
        return True
    if meta.get("complete", True):
        return False
    if keep_key == (dataset_id, meta.get("brain_key")):
        return False
    creator = ProcessId.from_dict(meta.get("creator") or {})
    return not creator.alive()


def _dataset_exists(dataset_id) -> bool:
    """Asked again right before deleting: the dataset may have been made
    after the list was read."""
    from bson import ObjectId
    from bson.errors import InvalidId

    try:
        oid = ObjectId(dataset_id)
    except (InvalidId, TypeError):
        return False
    return foo.get_db_conn().datasets.find_one({"_id": oid}, {}) is not None


def adapters_folder(dataset) -> str:
    """The folder of ``dataset``'s adapter files (created, with its
    owner marker, if missing)."""
    folder = os.path.join(constants.home_dir(), ADAPTERS, str(dataset._doc.id))
    marker = os.path.join(folder, ADAPTERS_OWNER)
    if not os.path.exists(marker):
        import json

        os.makedirs(folder, exist_ok=True)
        with open(marker, "w") as f:
            json.dump(
                {
                    "database_id": ownership.database_id(),
                    "dataset_id": str(dataset._doc.id),
                },
                f,
            )
    return folder


def _orphan_adapter_folders(db, datasets, dry_run) -> list[str]:
    import json

    found = []
    root = os.path.join(constants.home_dir(), ADAPTERS)
    for dataset_id in _listdir(root):
        folder = os.path.join(root, dataset_id)
        try:
            with open(os.path.join(folder, ADAPTERS_OWNER)) as f:
                owner = json.load(f)
        except (OSError, ValueError):
            continue
        if owner.get("database_id") != db or dataset_id in datasets:
            continue
        if _dataset_exists(dataset_id):
            continue
        found.append(folder)
        if not dry_run:
            shutil.rmtree(folder, ignore_errors=True)
    return found


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _rmdir_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass
