"""Which index belongs to which similarity run, and proof of it.

Every index prelabel creates carries a marker (``index.json`` in an
embedded index folder, the collection's metadata on a server) naming its
owner: the database, the dataset, the brain key and an ``index_id`` that
the run's config stores too. Everything that deletes or writes an index
checks the marker first:

- a new run never takes a folder (or collection) that holds something
  else: a non-empty folder that is not a prelabel index, or another run's
  index, is refused;
- deleting a run deletes its index only when the marker says it is that
  run's, and only prelabel's own files in the folder;
- a cloned dataset starts with its original's run documents, which point
  to the original's index: the clone's run is moved to an index of its
  own (a copy, or a fresh sync when the original cannot be copied) the
  first time it is loaded, so it can never change or delete the
  original's.
"""

from __future__ import annotations

import logging
import os
import uuid

import fiftyone.core.odm as foo
import fiftyone.core.utils as fou

from prelabel import constants
from prelabel.index.base import VectorIndex
from prelabel.index.locking import ProcessId

logger = logging.getLogger(__name__)

#: the folder of the embedded indexes under prelabel's home
INDEXES = "indexes"


def database_id() -> str:
    """The id of the FiftyOne database (its config document), so that a
    home folder shared by two databases never mixes their indexes."""
    doc = foo.get_db_conn().config.find_one({}, {"_id": 1}) or {}
    return str(doc.get("_id", ""))


def new_index_id() -> str:
    return uuid.uuid4().hex


def owner_of(dataset, brain_key: str, index_id: str) -> dict:
    """The marker entries naming ``dataset``'s run ``brain_key``."""
    return {
        "database_id": database_id(),
        "dataset_id": str(dataset._doc.id),
        "brain_key": brain_key,
        "index_id": index_id,
    }


def indexes_root() -> str:
    return os.path.join(constants.home_dir(), INDEXES)


def default_index_path(dataset, brain_key: str | None) -> str:
    """Where an embedded index of ``dataset`` under ``brain_key`` lives."""
    return os.path.join(
        indexes_root(), str(dataset._doc.id), brain_key or "unnamed"
    )


def default_collection_name(dataset, brain_key: str | None) -> str:
    """The server collection of ``dataset``'s run ``brain_key``."""
    return f"prelabel-{fou.to_slug(dataset.name)}-{brain_key or 'unnamed'}"


def check_path(path) -> str:
    """The absolute folder of a ``path=`` argument.

    Raises:
        ValueError: ``path`` is empty, not a string, or an existing file
    """
    if path is None:
        raise ValueError("path is required")
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ValueError(
            f"path={path!r} is not a folder; pass the folder to keep the "
            "index in, or leave it out for the default"
        )
    resolved = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.exists(resolved) and not os.path.isdir(resolved):
        raise ValueError(
            f"path={str(path)!r} is a file, not a folder; name a new or "
            "empty folder"
        )
    if resolved == os.path.abspath(os.path.expanduser("~")) or (
        resolved == os.path.dirname(resolved)
    ):
        raise ValueError(
            f"path={str(path)!r} is a home or root folder; name a new or "
            "empty folder for the index"
        )
    return resolved


def is_owned_by(meta: dict | None, config, dataset) -> bool:
    """Whether an index's marker says it is the index of the run whose
    config is ``config`` on ``dataset``.

    An index from before markers named their owner is accepted when the
    run is on the dataset its default folder names (or a folder of its
    own choosing) and the run was never moved to another dataset.
    """
    if meta is None:
        return False
    dataset_id = str(dataset._doc.id)
    if meta.get("index_id"):
        return (
            meta["index_id"] == getattr(config, "index_id", None)
            and meta.get("dataset_id") == dataset_id
        )
    return not is_foreign_run(config, dataset)


def is_foreign_run(config, dataset) -> bool:
    """Whether a run document on ``dataset`` was made for another dataset
    (it came with a clone of that dataset)."""
    dataset_id = str(dataset._doc.id)
    recorded = getattr(config, "dataset_id", None)
    if recorded:
        return recorded != dataset_id
    path = getattr(config, "path", None)
    if config.location == "embedded" and path:
        parent = os.path.dirname(os.path.dirname(path))
        if os.path.abspath(parent) == os.path.abspath(indexes_root()):
            return os.path.basename(os.path.dirname(path)) != dataset_id
    return False


def free_default_path(dataset, brain_key: str) -> str:
    """The default folder of a new run, or a sibling of it when the
    default is taken (e.g. by a run renamed away from this key)."""
    from prelabel.index.edge import inspect_folder

    path = default_index_path(dataset, brain_key)
    while inspect_folder(path).kind not in ("missing", "empty"):
        path = (
            f"{default_index_path(dataset, brain_key)}-{uuid.uuid4().hex[:8]}"
        )
    return path


def adoptable(meta: dict | None, dataset, brain_key: str) -> bool:
    """Whether an existing index is one this dataset's first sync of
    ``brain_key`` started and did not finish (its process was killed):
    the next first sync of that key takes it over and resumes."""
    return bool(
        meta
        and meta.get("complete") is False
        and meta.get("dataset_id") == str(dataset._doc.id)
        and meta.get("brain_key") == brain_key
        and meta.get("database_id") == database_id()
    )


def creator() -> dict:
    """The process creating an index, recorded until its first sync is
    complete."""
    return ProcessId.current().to_dict()


def drop_if_owned(index: VectorIndex, config, dataset) -> bool:
    """Deletes ``index`` if its marker says it belongs to the run of
    ``config`` on ``dataset``; otherwise logs why it was left.

    Returns:
        whether it was deleted
    """
    state = index.state()
    if state.kind == "missing":
        return False
    owned = is_owned_by(state.meta, config, dataset)
    if not owned and state.kind == "unreadable":
        # prelabel's files with a damaged marker, at the run's own place:
        # only this run's config names it (a clone's would be foreign)
        owned = not is_foreign_run(config, dataset)
    if not owned:
        logger.warning(
            "Left %s in place: it is not the index of this run (it belongs "
            "to another run or dataset, or to nobody prelabel knows)",
            index.name,
        )
        return False
    index.drop()
    if index.location == "embedded":
        _remove_empty_parent(index.path)
    return True


def _remove_empty_parent(path: str) -> None:
    parent = os.path.dirname(path)
    if os.path.dirname(parent) == indexes_root():
        try:
            os.rmdir(parent)
        except OSError:
            pass


# ---- a run's index ------------------------------------------------------


def open_index_for(config, label: str | None = None) -> VectorIndex:
    """The :class:`VectorIndex` a run config points to.

    Args:
        config: a
            :class:`prelabel.index.brain.PrelabelQdrantSimilarityConfig`
        label (None): how messages name the index
    """
    if config.location == "embedded":
        from prelabel.index.edge import EdgeIndex

        return EdgeIndex(
            config.path,
            metric=config.metric,
            hnsw_config=config.hnsw_config,
            quantization=config.quantization,
            label=label,
        )
    from prelabel.index.server import ServerIndex, connect

    if config.url is None:
        config.load_credentials()
    client = connect(
        config.url,
        api_key=config.api_key,
        prefer_grpc=config.prefer_grpc,
        grpc_port=config.grpc_port,
    )
    return ServerIndex(
        client,
        config.collection_name,
        metric=config.metric,
        shard_number=config.shard_number,
        replication_factor=config.replication_factor,
        write_consistency_factor=config.write_consistency_factor,
        hnsw_config=config.hnsw_config,
        quantization=config.quantization,
        url=config.url,
    )


def place_new_run(config, dataset, brain_key: str | None) -> None:
    """Chooses where a new run's index lives and gives it an id: the
    folder (or collection) named by the config, else the default one. An
    index that this dataset's first sync of ``brain_key`` left unfinished
    there is taken over (its id kept); a place holding anything else is
    refused when named, skipped when it is the default.

    Raises:
        ValueError: the named place holds something that is not this
            run's to take
    """
    config.dataset_id = str(dataset._doc.id)
    config.index_id = new_index_id()
    if config.location == "embedded":
        named = config.path is not None
        if named:
            config.path = check_path(config.path)
        else:
            config.path = default_index_path(dataset, brain_key)
    else:
        named = config.collection_name is not None
        if not named:
            config.collection_name = default_collection_name(
                dataset, brain_key
            )
    while True:
        state = open_index_for(config).state()
        if state.kind in ("missing", "empty"):
            return
        if adoptable(state.meta, dataset, brain_key):
            config.index_id = state.meta["index_id"]
            return
        if named:
            raise ValueError(_taken_message(config, state))
        _next_default(config, dataset, brain_key)


def _taken_message(config, state) -> str:
    if config.location == "embedded":
        what = f"path={config.path!r}"
        if state.kind == "foreign":
            return (
                f"{what} is a folder that holds other files; name a new or "
                "empty folder for the index (prelabel never deletes files "
                "it did not write)"
            )
    else:
        what = f"collection_name={config.collection_name!r}"
        if state.kind == "foreign":
            return (
                f"{what} names an existing collection that prelabel did not "
                "create; choose another collection name"
            )
    owner = state.meta or {}
    return (
        f"{what} already holds the index of brain key "
        f"{owner.get('brain_key')!r} (dataset id "
        f"{owner.get('dataset_id')}); choose another one"
    )


def _next_default(config, dataset, brain_key) -> None:
    suffix = uuid.uuid4().hex[:8]
    if config.location == "embedded":
        config.path = f"{default_index_path(dataset, brain_key)}-{suffix}"
    else:
        config.collection_name = (
            f"{default_collection_name(dataset, brain_key)}-{suffix}"
        )


def run_lock(dataset, brain_key: str):
    """The lock that one process holds while it creates (or moves) the
    index of ``dataset``'s run ``brain_key``."""
    from prelabel.index.edge import default_lock_timeout
    from prelabel.index.locking import FolderLock

    path = os.path.join(
        constants.home_dir(),
        "locks",
        f"run-{dataset._doc.id}-{brain_key}.lock",
    )
    return FolderLock(
        path,
        timeout=default_lock_timeout(),
        what=f"The creation of brain key {brain_key!r} of dataset "
        f"'{dataset.name}'",
    )


def rehome_clone(results) -> None:
    """Gives the run of a cloned dataset an index of its own.

    The run document came with the clone and points to the original
    dataset's index. The clone gets a copy of that index (when it is the
    index this run document named and it can be read), else a new index
    synced from the clone's own embeddings; the run's config then points
    to it. Two processes loading the clone's run at once end with one
    copy.
    """
    dataset = results.samples._root_dataset
    with run_lock(dataset, results.key):
        stored = dataset.get_brain_info(results.key).config
        if not is_foreign_run(stored, dataset):
            # another process moved it while this one waited
            for name in ("path", "collection_name", "dataset_id", "index_id"):
                setattr(results.config, name, getattr(stored, name))
            return
        _rehome(results)


def _rehome(results) -> None:
    config = results.config
    dataset = results.samples._root_dataset
    key = results.key
    source = open_index_for(config)
    source_state = _safe_state(source)
    copyable = (
        source_state.kind == "ours"
        and source_state.meta.get("index_id") in (config.index_id, None)
        and source_state.meta.get("complete", True)
    )
    cloned_from = config.index_id
    config.path = None if config.location == "embedded" else config.path
    if config.location == "server":
        config.collection_name = None
    place_new_run(config, dataset, key)
    owner = owner_of(dataset, key, config.index_id)
    owner["cloned_from"] = cloned_from
    target = open_index_for(config)
    if target.state().kind not in ("missing", "empty"):
        target.drop()  # an unfinished copy this clone's run left
    if copyable:
        name = (
            config.path
            if config.location == "embedded"
            else (config.collection_name)
        )
        source.copy_to(name, complete=True, **owner)
    else:
        _resync(results, target, owner)
    logger.info(
        "Brain key %r of dataset '%s' came with a clone: it now has its "
        "own index %s",
        key,
        dataset.name,
        target.name,
    )
    results.save_config()


def _safe_state(index):
    from prelabel.index.edge import FolderState

    try:
        return index.state()
    except Exception:  # an unreachable server: nothing to copy
        return FolderState("missing")


def _resync(results, target, owner) -> None:
    """A new index for a clone whose original could not be copied."""
    from prelabel.index.sync import embedding_dim, sync_points

    config = results.config
    dataset = results.samples._root_dataset
    patches = config.patches_field
    dim = embedding_dim(dataset, config.embeddings_field, patches)
    if dim is None:
        return  # nothing to index yet: the next sync creates it
    target.create(dim, owner=dict(owner, complete=False))
    sync_points(
        target,
        dataset,
        config.embeddings_field,
        config.label_field,
        dim,
        progress=False,
        patches_field=patches,
    )
    target.update_meta(complete=True)


def adopt_legacy(results) -> None:
    """Gives a run made before indexes named their owner an index id, and
    writes the owner into its marker."""
    config = results.config
    dataset = results.samples._root_dataset
    config.dataset_id = str(dataset._doc.id)
    config.index_id = new_index_id()
    index = open_index_for(config)
    if _safe_state(index).kind == "ours":
        index.update_meta(**owner_of(dataset, results.key, config.index_id))
    results.save_config()
