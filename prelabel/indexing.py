"""Step 2 of the workflow: a Qdrant index of a dataset's embeddings and
reference labels, registered as a FiftyOne similarity run.

:func:`sync_index` creates the run on its first call and afterwards sends
only what changed (see :mod:`prelabel.index.sync`). A first sync is
all or nothing: the run is registered only when its index is complete, a
first sync that fails deletes the index it started, and one that is
killed leaves an index marked unfinished that the next first sync of the
same key takes over and resumes. Two processes starting the same new key
at once end with one run and one index.
"""

from __future__ import annotations

import logging

from prelabel import constants, validation
from prelabel.index import ownership
from prelabel.index.brain import (
    PrelabelQdrantSimilarityConfig,
    PrelabelQdrantSimilarityIndex,
)
from prelabel.index.sync import check_index_dim
from prelabel.progress import ProgressArg
from prelabel.units import resolve, units_of

logger = logging.getLogger(__name__)

#: the parameters of a new index that ``sync_index`` passes to the config
INDEX_PARAMS = frozenset(
    {
        "location",
        "hnsw_config",
        "quantization",
        "shard_number",
        "replication_factor",
        "write_consistency_factor",
        "prefer_grpc",
        "grpc_port",
    }
)


def check_sync_index(
    samples,
    embeddings_field: str = constants.DEFAULT_EMBEDDINGS_FIELD,
    label_field: str | None = constants.DEFAULT_LABEL_FIELD,
    brain_key: str = constants.DEFAULT_BRAIN_KEY,
    url: str | None = None,
    api_key: str | None = None,
    require_embeddings: bool = True,
    path: str | None = None,
    patches_field: str | None = None,
):
    """Runs every check of :func:`sync_index` without writing anything, so
    that operator forms can show the reason up front.

    Args: as :func:`sync_index`, and
        require_embeddings (True): ``False`` skips the checks of the
            embeddings themselves, for a caller that computes them first

    Returns:
        the config of the existing run of ``brain_key``, or None when the
        sync would create a new run

    Raises:
        ValueError: one sentence saying what is wrong and what to do
    """
    validation.check_identifier(brain_key, "brain_key")
    if len(brain_key) > 100:
        raise ValueError(
            f"brain_key={brain_key[:20]!r}... is {len(brain_key)} characters "
            "long; use at most 100"
        )
    if path is not None:
        ownership.check_path(path)
    points, label_field = resolve(samples, patches_field, label_field)
    held = _held_patches(samples._root_dataset, brain_key)
    if held is not False and held != patches_field:
        raise ValueError(
            f"brain_key={brain_key!r} indexes "
            + ("whole samples" if held is None else f"the boxes of {held!r}")
            + "; pass "
            + (
                "no patches_field"
                if held is None
                else f"patches_field={held!r}"
            )
            + " or use another brain key"
        )
    dim = None
    if require_embeddings:
        dim = validation.check_embeddings_field(
            samples, points.path(samples, embeddings_field)
        )
    if label_field and patches_field is None:
        validation.check_classification_field(samples, label_field)
    dataset = samples._root_dataset
    if brain_key not in dataset.list_brain_runs():
        return None

    config = dataset.get_brain_info(brain_key).config
    if not isinstance(config, PrelabelQdrantSimilarityConfig):
        raise ValueError(
            f"brain_key={brain_key!r} is a run of another backend "
            f"({type(config).__name__}); choose another key"
        )
    if config.embeddings_field != embeddings_field:
        raise ValueError(
            f"brain_key={brain_key!r} indexes "
            f"{config.embeddings_field!r}, not {embeddings_field!r}; "
            "use another brain key for other embeddings"
        )
    if config.label_field != label_field:
        raise ValueError(
            f"brain_key={brain_key!r} stores labels of "
            f"{config.label_field!r}, not {label_field!r}; use another "
            "brain key, or delete this run first"
        )
    if dim is not None and not ownership.is_foreign_run(config, dataset):
        config.url, config.api_key = url or config.url, api_key
        index = ownership.open_index_for(config)
        try:
            check_index_dim(index, dim, embeddings_field)
        except ValueError as e:
            if "damaged" not in str(e):
                raise
    return config


def _held_patches(dataset, brain_key):
    """The patches field of an existing run (False: no such run)."""
    if brain_key not in dataset.list_brain_runs():
        return False
    return getattr(
        dataset.get_brain_info(brain_key).config, "patches_field", None
    )


def sync_index(
    samples,
    embeddings_field: str = constants.DEFAULT_EMBEDDINGS_FIELD,
    label_field: str | None = constants.DEFAULT_LABEL_FIELD,
    brain_key: str = constants.DEFAULT_BRAIN_KEY,
    path: str | None = None,
    url: str | None = None,
    api_key: str | None = None,
    collection_name: str | None = None,
    metric: str = "cosine",
    progress: ProgressArg = True,
    rebuild: bool = False,
    verify: bool | str = "sample",
    batch_size: int = 2000,
    patches_field: str | None = None,
    **index_kwargs,
) -> PrelabelQdrantSimilarityIndex:
    """Creates or updates the Qdrant index of ``samples`` under a brain key.

    The first call registers a FiftyOne similarity run (``brain_key``)
    backed by an embedded Qdrant Edge index (default) or a collection on a
    Qdrant server (``url``); later calls send only what changed since.

    Args:
        samples: a FiftyOne dataset or view (the run is registered on its
            dataset; the index mirrors ``samples``)
        embeddings_field ("embeddings"): the vector field to index
        label_field ("ground_truth"): the Classification field whose labels
            go in the payloads, so kNN can select the reference by filter;
            ``None`` for an index without labels
        brain_key ("prelabel_qdrant"): the brain key of the run
        path (None): the embedded index folder: a new or empty folder
            (stored as an absolute path); default: under FiftyOne's config
            folder, per dataset and brain key
        url (None): a Qdrant server URL; the index then lives there
        api_key (None): the server's API key (never stored)
        collection_name (None): the server collection name
        metric ("cosine"): the similarity metric of a new index
        progress (True): a bar, nothing, or ``progress(fraction, label)``
        rebuild (False): delete the run's index and build it again from
            the dataset, whatever state it is in (the way out of a damaged
            index)
        verify ("sample"): read back the stored vectors of a random
            sample of the points the sync leaves in place (every one as
            soon as one differs from the dataset, or with ``True``) and
            repair those that differ; ``False`` reads none back
        batch_size (2000): points read and written at a time
        patches_field (None): index the boxes of this ``Detections`` field
            instead of whole samples (a point per box, keyed by its label
            id, with the box's own label; ``embeddings_field`` is then the
            attribute of each box that ``compute_embeddings(...,
            patches_field=...)`` wrote, and ``label_field`` does not
            apply)
        **index_kwargs: other
            :class:`prelabel.index.brain.PrelabelQdrantSimilarityConfig`
            parameters of a new index (``hnsw_config``, ``quantization``,
            ``shard_number``, ``prefer_grpc``, ...)

    Returns:
        the :class:`prelabel.index.brain.PrelabelQdrantSimilarityIndex`; its
        ``last_sync`` property holds the
        :class:`prelabel.index.sync.SyncStats`
    """
    if not isinstance(rebuild, bool):
        raise ValueError(f"rebuild must be True or False; got {rebuild!r}")
    validation.check_positive_int(batch_size, "batch_size")
    unknown = sorted(set(index_kwargs) - INDEX_PARAMS)
    if unknown:
        raise ValueError(
            f"sync_index() has no parameter {unknown[0]!r}; the index "
            f"parameters are {sorted(INDEX_PARAMS)}"
        )
    config = check_sync_index(
        samples,
        embeddings_field=embeddings_field,
        label_field=label_field,
        brain_key=brain_key,
        url=url,
        api_key=api_key,
        path=path,
        patches_field=patches_field,
    )
    _, label_field = resolve(samples, patches_field, label_field)
    dataset = samples._root_dataset
    from prelabel.orphans import delete_orphans

    delete_orphans(keep=(dataset, brain_key))
    if config is None:
        with ownership.run_lock(dataset, brain_key):
            dataset.reload()  # another process may have made it meanwhile
            if brain_key not in dataset.list_brain_runs():
                return _first_sync(
                    samples,
                    dict(
                        embeddings_field=embeddings_field,
                        label_field=label_field,
                        patches_field=patches_field,
                        metric=metric,
                        path=path,
                        url=url,
                        api_key=api_key,
                        collection_name=collection_name,
                        **index_kwargs,
                    ),
                    brain_key,
                    progress,
                    batch_size,
                )
    results = dataset.load_brain_results(
        brain_key, url=url, api_key=api_key, cache=False
    )
    if rebuild:
        _recreate(results, samples)
    elif not results.index.exists():
        # the folder (or collection) was deleted: nothing left to keep
        _recreate(results, samples)
    results.sync(
        samples, progress=progress, verify=verify, batch_size=batch_size
    )
    results.save()
    return results


def _first_sync(samples, config_kwargs, brain_key, progress, batch_size):
    """Creates the index of a new run, fills it, and only then registers
    the run."""
    dataset = samples._root_dataset
    config = PrelabelQdrantSimilarityConfig(**config_kwargs)
    method = config.build()
    method.ensure_requirements()
    results = method.initialize(dataset, brain_key)
    index = results.index
    dim = _dim(samples, config)
    owner = ownership.owner_of(dataset, brain_key, config.index_id)
    try:
        if index.state().kind in ("missing", "empty"):
            index.create(
                dim,
                owner=dict(owner, complete=False, creator=ownership.creator()),
            )
        else:
            logger.info("Resuming the unfinished first sync of %s", index)
            check_index_dim(index, dim, config.embeddings_field)
        stats = results.sync(samples, progress=progress, batch_size=batch_size)
        index.update_meta(complete=True, creator=None)
        method.register_run(dataset, brain_key, overwrite=False)
        results.save()
    except BaseException:
        _discard(index, brain_key)
        raise
    results._last_sync = stats
    return results


def _dim(samples, config) -> int:
    points = units_of(config.patches_field)
    path = points.path(samples, config.embeddings_field)
    return validation.check_embeddings_field(samples, path)


def _discard(index, brain_key) -> None:
    """Deletes the index of a first sync that failed (it is ours: the
    first sync created or took it over)."""
    try:
        index.drop()
        if index.location == "embedded":
            ownership._remove_empty_parent(index.path)
    except Exception as e:  # the original error matters more
        logger.warning(
            "Could not delete the unfinished index of brain key %r (%s); "
            "prelabel.delete_orphans() removes it later",
            brain_key,
            e,
        )


def _recreate(results, samples) -> None:
    """Deletes the run's index (only prelabel's own files) and creates an
    empty one, to be filled by the sync that follows."""
    dataset = samples._root_dataset
    index = results.index
    config = results.config
    if ownership.is_foreign_run(config, dataset):
        raise ValueError(
            f"brain_key={results.key!r} points to another dataset's index; "
            "load it once (dataset.load_brain_results) to give it its own"
        )
    state = index.state()
    if state.kind == "foreign":
        raise ValueError(
            f"{index.name} holds files prelabel did not write; move them "
            "away or delete this run and sync a new one"
        )
    if state.kind != "missing":
        index.drop()
    dim = _dim(samples, config)
    index.create(
        dim, owner=ownership.owner_of(dataset, results.key, config.index_id)
    )
    logger.info("Rebuilding %s from the dataset", index.name)
