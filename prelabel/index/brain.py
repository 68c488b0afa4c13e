"""Our index as a FiftyOne brain similarity backend.

Three classes, paired by name as FiftyOne expects: the config (what is
stored in the run document), the factory, and the index (what
``dataset.load_brain_results(key)`` returns, in any process). They live in
the importable package, not the plugin folder, because FiftyOne re-imports
the config's class path in the App server and in delegated workers.

Credentials (``url``, ``api_key``) are never serialized; they come from the
arguments, FiftyOne's brain config (``similarity_backends.prelabel_qdrant``),
``FIFTYONE_BRAIN_SIMILARITY_PRELABEL_QDRANT_URL`` / ``..._API_KEY``, or
``PRELABEL_QDRANT_URL`` / ``PRELABEL_QDRANT_API_KEY``.
"""

from __future__ import annotations

import logging
import os

import fiftyone.brain as fob
import fiftyone.brain.internal.core.utils as fbu
import fiftyone.core.utils as fou
import numpy as np
from fiftyone.brain.similarity import (
    DuplicatesMixin,
    Similarity,
    SimilarityConfig,
    SimilarityIndex,
)

from prelabel import constants
from prelabel.index import base, ownership
from prelabel.index.base import IndexFilter, VectorIndex
from prelabel.index.locking import Lease
from prelabel.index.sync import (
    SyncStats,
    patch_payloads,
    payloads_for,
    sync_points,
)
from prelabel.stored_vectors import values_with_vectors

logger = logging.getLogger(__name__)

#: a view up to this size is sent as an id filter; larger ones are
#: post-filtered locally from an oversampled query
MAX_ID_FILTER = 2000

#: neighbors asked first for a radius query; four times more while the
#: farthest returned still lies within the radius
RADIUS_START = 16

#: points queried at once when computing every point's neighbors
GRAPH_BATCH = 256

_CREDENTIALS = ("url", "api_key", "prefer_grpc", "grpc_port")


class PrelabelQdrantSimilarityConfig(SimilarityConfig):
    """Configuration of the prelabel Qdrant similarity backend.

    Args:
        embeddings_field (None): the sample field holding the embeddings
        label_field (None): the ``Classification`` field whose labels are
            stored in the payloads (the reference labels for kNN votes)
        metric ("cosine"): ``"cosine"``, ``"dotproduct"`` or ``"euclidean"``
        location (None): ``"embedded"`` (Qdrant Edge on disk) or
            ``"server"``; defaults to ``"server"`` when a URL is given
        path (None): the embedded index folder; defaults to
            ``<prelabel home>/indexes/<dataset id>/<brain key>``
        collection_name (None): the server collection (and the name the
            App shows); defaults to ``prelabel-<dataset slug>-<brain key>``
        shard_number (None): shards of a new server collection
        replication_factor (None): replicas of a new server collection
        write_consistency_factor (None): of a new server collection
        hnsw_config (None): dict of HNSW settings (``m``,
            ``ef_construct``, ``full_scan_threshold``) over
            :data:`prelabel.index.base.DEFAULT_HNSW`
        quantization ("int8"): ``"int8"`` (scalar quantization, the top
            candidates rescored with the float32 vectors: see
            :data:`prelabel.index.base.DEFAULT_QUANTIZATION`) or ``None``
            (float32 vectors only)
        url (None): the Qdrant server URL (never stored)
        api_key (None): the Qdrant API key (never stored)
        prefer_grpc (None): use gRPC to talk to the server
        grpc_port (None): the server's gRPC port
        dataset_id (None): the dataset the run was made for (set when the
            run is created; a clone of the dataset has another id, which is
            how its copy of the run is recognized)
        index_id (None): the id written in the index's marker (set when
            the run is created)
        **kwargs: keyword arguments for
            :class:`fiftyone.brain.similarity.SimilarityConfig`
    """

    def __init__(
        self,
        embeddings_field=None,
        label_field=None,
        metric="cosine",
        location=None,
        path=None,
        collection_name=None,
        shard_number=None,
        replication_factor=None,
        write_consistency_factor=None,
        hnsw_config=None,
        quantization=base.DEFAULT_QUANTIZATION,
        url=None,
        api_key=None,
        prefer_grpc=None,
        grpc_port=None,
        dataset_id=None,
        index_id=None,
        **kwargs,
    ):
        if metric not in base.METRICS:
            raise ValueError(
                f"metric={metric!r} is not supported; use one of "
                f"{base.METRICS}"
            )
        base.check_quantization(quantization)
        if location is None:
            location = "server" if url else "embedded"
        if location not in ("embedded", "server"):
            raise ValueError(
                f"location={location!r} is not supported; use 'embedded' "
                "or 'server'"
            )
        super().__init__(embeddings_field=embeddings_field, **kwargs)
        # the points of a patches index carry the boxes' own labels
        self.label_field = label_field or self.patches_field
        self.metric = metric
        self.location = location
        self.path = path
        self.collection_name = collection_name
        self.shard_number = shard_number
        self.replication_factor = replication_factor
        self.write_consistency_factor = write_consistency_factor
        self.hnsw_config = hnsw_config
        self.quantization = quantization
        self.dataset_id = dataset_id
        self.index_id = index_id
        # private, so they are never serialized into the run document
        self._url = url
        self._api_key = api_key
        self._prefer_grpc = prefer_grpc
        self._grpc_port = grpc_port

    @property
    def method(self):
        return constants.BACKEND_NAME

    @property
    def max_k(self):
        return None

    @property
    def supports_least_similarity(self):
        return True

    @property
    def supported_aggregations(self):
        return ("mean",)

    url = property(lambda self: self._url)
    api_key = property(lambda self: self._api_key)
    prefer_grpc = property(lambda self: self._prefer_grpc)
    grpc_port = property(lambda self: self._grpc_port)

    @url.setter
    def url(self, value):
        self._url = value

    @api_key.setter
    def api_key(self, value):
        self._api_key = value

    @prefer_grpc.setter
    def prefer_grpc(self, value):
        self._prefer_grpc = value

    @grpc_port.setter
    def grpc_port(self, value):
        self._grpc_port = value

    def load_credentials(
        self, url=None, api_key=None, prefer_grpc=None, grpc_port=None
    ):
        self._load_parameters(
            url=url,
            api_key=api_key,
            prefer_grpc=prefer_grpc,
            grpc_port=grpc_port,
        )
        for name in _CREDENTIALS:
            if getattr(self, name) is None:
                for var in (
                    "FIFTYONE_BRAIN_SIMILARITY_PRELABEL_QDRANT_"
                    + name.upper(),
                    "PRELABEL_QDRANT_" + name.upper(),
                ):
                    if os.environ.get(var):
                        setattr(self, name, _parse_env(os.environ[var]))
                        break


class PrelabelQdrantSimilarity(Similarity):
    """Factory of :class:`PrelabelQdrantSimilarityIndex` instances.

    Args:
        config: a :class:`PrelabelQdrantSimilarityConfig`
    """

    def ensure_requirements(self):
        fou.ensure_package("qdrant-client>=1.16")
        if self.config.location == "embedded":
            fou.ensure_package("qdrant-edge-py>=0.9")

    def ensure_usage_requirements(self):
        self.ensure_requirements()

    def cleanup(self, samples, key):
        # called by ``delete_brain_run``: the index goes with the run, if
        # its marker says it is this run's (a clone's copy of the run
        # document points to the original's index, which stays)
        if self.config.location == "embedded" and self.config.path is None:
            return
        ownership.drop_if_owned(
            ownership.open_index_for(self.config),
            self.config,
            samples._root_dataset,
        )

    def rename(self, samples, key, new_key):
        index = ownership.open_index_for(self.config)
        state = index.state()
        if ownership.is_owned_by(
            state.meta, self.config, samples._root_dataset
        ):
            index.update_meta(brain_key=new_key)

    def initialize(self, samples, brain_key):
        dataset = samples._root_dataset
        if self.config.index_id is None:
            ownership.place_new_run(self.config, dataset, brain_key)
        results = PrelabelQdrantSimilarityIndex(
            samples, self.config, brain_key, backend=self
        )
        if brain_key is not None and brain_key in dataset.list_brain_runs():
            results.save_config()  # registered first (compute_similarity)
        return results


class PrelabelQdrantSimilarityIndex(SimilarityIndex, DuplicatesMixin):
    """A FiftyOne similarity index backed by a prelabel vector index.

    Args:
        samples: the :class:`fiftyone.core.collections.SampleCollection`
        config: the :class:`PrelabelQdrantSimilarityConfig`
        brain_key: the brain key
        backend (None): a :class:`PrelabelQdrantSimilarity`
    """

    def __init__(self, samples, config, brain_key, backend=None):
        self._index: VectorIndex | None = None
        self._ids = None
        self._label_ids = None
        self._parents = None
        self._graph = None
        SimilarityIndex.__init__(
            self, samples, config, brain_key, backend=backend
        )
        DuplicatesMixin.__init__(self)
        if brain_key is not None and config.index_id is not None:
            if ownership.is_foreign_run(config, samples._root_dataset):
                ownership.rehome_clone(self)
        elif brain_key is not None and self._registered():
            ownership.adopt_legacy(self)
        if brain_key is not None:
            self._warn_if_damaged()

    def _warn_if_damaged(self) -> None:
        """The cheap check at load: the marker (no shard opened). Loading
        never fails on damage, so that a rebuild can load the run."""
        try:
            self.index.state()
            if self.config.location == "embedded":
                self.index.meta  # noqa: B018 - raises on a bad marker
        except Exception as e:  # damaged, or a server not reachable now
            logger.warning("%s", e)

    def _registered(self) -> bool:
        return self.key in self.samples._root_dataset.list_brain_runs()

    # ---- the underlying index -----------------------------------------

    @property
    def index(self) -> VectorIndex:
        """The :class:`prelabel.index.base.VectorIndex` behind this run."""
        if self._index is None:
            dataset = self.samples._root_dataset
            label = (
                f"The index of brain key {self.key!r} of dataset "
                f"'{dataset.name}'"
            )
            self._index = ownership.open_index_for(self.config, label=label)
            self._index.repair_hint = (
                "rebuild it with prelabel.sync_index(dataset, "
                f"brain_key={self.key!r}, rebuild=True)"
            )
        return self._index

    @property
    def last_sync(self) -> SyncStats | None:
        """The :class:`prelabel.index.sync.SyncStats` of the last sync in
        this process, or None."""
        return getattr(self, "_last_sync", None)

    @property
    def is_external(self):
        return True

    @property
    def total_index_size(self):
        return self.index.count()

    def sync(
        self, samples=None, progress=True, batch_size=2000, verify="sample"
    ) -> SyncStats:
        """Brings the index (which must exist) up to date with ``samples``
        (default: the dataset): new and changed embeddings and labels are
        written, deleted samples removed, damaged points repaired, nothing
        else re-sent.

        Returns:
            a :class:`prelabel.index.sync.SyncStats`
        """
        if samples is None:
            samples = self.samples._root_dataset
        stats = sync_points(
            self.index,
            samples,
            embeddings_field=self.config.embeddings_field,
            label_field=self.config.label_field,
            dim=self.index.dim,
            batch_size=batch_size,
            progress=progress,
            verify=verify,
            patches_field=self.config.patches_field,
        )
        self._last_sync = stats
        self.reload()
        return stats

    # ---- what the index holds -------------------------------------------

    @property
    def sample_ids(self):
        """The ids of the samples in the index (of each patch's sample, for
        a patches index), read from the index once and again after
        :meth:`reload`."""
        if self._ids is None:
            self._read_ids()
        return self._ids

    @property
    def label_ids(self):
        """The ids of the patches in a patches index, else None."""
        if self.config.patches_field is None:
            return None
        if self._ids is None:
            self._read_ids()
        return self._label_ids

    def _read_ids(self) -> None:
        with Lease(self.index):
            if self.config.patches_field is None:
                ids = [sid for sid, _ in self.index.iter_payloads([])]
                self._ids = np.array(ids, dtype=object)
                return
            pairs = [
                (p.get(base.SAMPLE_ID), lid)
                for lid, p in self.index.iter_payloads([base.SAMPLE_ID])
            ]
        self._ids = np.array([s for s, _ in pairs], dtype=object)
        self._label_ids = np.array([lid for _, lid in pairs], dtype=object)

    def _point_ids(self, current: bool = True):
        """The ids the index's points carry: label ids for patches."""
        if self.config.patches_field is None:
            return self.current_sample_ids if current else self.sample_ids
        return self.current_label_ids if current else self.label_ids

    def _points_of(self, sample_ids, label_ids) -> list[str]:
        """The ids of the points given by ``label_ids``, else those of
        the samples ``sample_ids`` (every patch of them, for patches)."""
        if label_ids is not None:
            return list(_id_array(label_ids))
        if self.config.patches_field is None:
            return list(_id_array(sample_ids))
        wanted = set(_id_array(sample_ids))
        return [
            lid
            for sid, lid in zip(self.sample_ids, self.label_ids, strict=True)
            if sid in wanted
        ]

    def _parent_ids(self, label_ids) -> list[str]:
        """The sample id of each patch."""
        if self._parents is None:
            self._parents = dict(
                zip(self.label_ids, self.sample_ids, strict=True)
            )
        return [self._parents[lid] for lid in label_ids]

    def reload(self):
        self._ids = self._label_ids = self._parents = None
        self._graph = None
        super().reload()

    # ---- the SimilarityIndex contract ----------------------------------

    def add_to_index(
        self,
        embeddings,
        sample_ids,
        label_ids=None,
        overwrite=True,
        allow_existing=True,
        warn_existing=False,
        reload=True,
        batch_size=2000,
    ):
        patches_field = self.config.patches_field
        if (label_ids is None) != (patches_field is None):
            raise ValueError(
                "label_ids are needed for a patches index (patches_field="
                f"{patches_field!r}) and refused otherwise"
            )
        embeddings = base.as_matrix(embeddings)
        sample_ids = _id_array(sample_ids)
        point_ids = sample_ids if label_ids is None else _id_array(label_ids)
        if not len(sample_ids) == len(point_ids) == len(embeddings):
            raise ValueError(
                f"Got {len(embeddings)} embeddings for {len(sample_ids)} "
                f"sample_ids and {len(point_ids)} ids; pass one of each "
                "per embedding"
            )
        index = self.index
        if not index.exists():
            index.create(
                embeddings.shape[1],
                owner=ownership.owner_of(
                    self.samples._root_dataset,
                    self.key,
                    self.config.index_id,
                ),
            )
        keep = _new_or_overwritten(
            point_ids,
            set(self._point_ids(current=False)),
            overwrite=overwrite,
            allow_existing=allow_existing,
            warn_existing=warn_existing,
        )
        embeddings = embeddings[keep]
        sample_ids, point_ids = sample_ids[keep], point_ids[keep]
        dataset = self.samples._root_dataset
        if self.config.embeddings_field is not None and len(point_ids):
            # as FiftyOne's backends do: the field the run names holds what
            # the index holds (a later prelabel.sync_index reads it)
            fbu.add_embeddings(
                dataset,
                embeddings,
                list(sample_ids),
                None if patches_field is None else list(point_ids),
                self.config.embeddings_field,
                patches_field=patches_field,
            )
        for start in range(0, len(point_ids), batch_size):
            stop = start + batch_size
            ids = list(point_ids[start:stop])
            vecs = embeddings[start:stop]
            if patches_field is None:
                payloads = payloads_for(
                    dataset, ids, vecs, self.config.label_field
                )
            else:
                payloads = patch_payloads(
                    dataset,
                    list(sample_ids[start:stop]),
                    ids,
                    vecs,
                    patches_field,
                )
            index.upsert(ids, vecs, payloads)
        index.optimize()
        self._ids = self._label_ids = self._parents = None
        if reload:
            self.reload()

    def remove_from_index(
        self,
        sample_ids=None,
        label_ids=None,
        allow_missing=True,
        warn_missing=False,
        reload=True,
    ):
        patches_field = self.config.patches_field
        if patches_field is None and label_ids is not None:
            raise ValueError("This index holds samples, not label_ids")
        ids = self._points_of(
            sample_ids if sample_ids is not None else [], label_ids
        )
        present = set(self._point_ids(current=False))
        missing = [s for s in ids if s not in present]
        if missing and not allow_missing:
            raise ValueError(
                f"Found {len(missing)} ids (eg {missing[0]}) that are not "
                "in the index"
            )
        if missing and warn_missing:
            logger.warning("Skipping %d missing ids", len(missing))
        ids = [s for s in ids if s in present]
        if not ids:
            return
        self.index.delete(ids)
        if self.config.embeddings_field is not None:
            fbu.remove_embeddings(
                self.samples._root_dataset,
                self.config.embeddings_field,
                sample_ids=ids if patches_field is None else None,
                label_ids=ids if patches_field is not None else None,
                patches_field=patches_field,
            )
        self._ids = self._label_ids = self._parents = None
        if reload:
            self.reload()

    def get_embeddings(
        self,
        sample_ids=None,
        label_ids=None,
        allow_missing=True,
        warn_missing=False,
    ):
        patches_field = self.config.patches_field
        if patches_field is None and label_ids is not None:
            raise ValueError("This index holds samples, not label_ids")
        if sample_ids is None and label_ids is None:
            ids = list(self._point_ids(current=False))
        else:
            ids = self._points_of(sample_ids, label_ids)
        found, vectors = self._vectors_as_added(ids)
        missing = len(ids) - len(found)
        if missing and not allow_missing:
            raise ValueError(f"{missing} of the ids are not in the index")
        if missing and warn_missing:
            logger.warning("Skipping %d ids not in the index", missing)
        if patches_field is None:
            return vectors, np.array(found), None
        return vectors, np.array(self._parent_ids(found)), np.array(found)

    def cleanup(self):
        ownership.drop_if_owned(
            self.index, self.config, self.samples._root_dataset
        )

    def _kneighbors(
        self,
        query=None,
        k=None,
        reverse=False,
        aggregation=None,
        return_dists=False,
    ):
        if aggregation not in (None, "mean"):
            raise ValueError(
                f"Unsupported aggregation {aggregation!r}; supported "
                "values are ('mean',)"
            )
        if k is not None and (
            isinstance(k, bool)
            or not isinstance(k, (int, np.integer))
            or k < 1
        ):
            raise ValueError(
                f"k must be a positive whole number (or None for all); got "
                f"{k!r}"
            )
        if query is None:
            if aggregation is not None:
                raise ValueError(
                    "Full index queries do not support aggregation"
                )
            if reverse:
                raise ValueError(
                    "Full index queries do not support reverse=True"
                )
            inds, dists = self._graph_for(k, thresh=None)
            return (inds, dists) if return_dists else inds

        query = self._query_vectors(query)
        if aggregation == "mean" and query.ndim == 2:
            query = query.mean(axis=0)
        single = query.ndim == 1
        queries = query[None, :] if single else query

        view_ids = self._view_ids()
        if k is None:
            k = len(view_ids) if view_ids is not None else self.index.count()
        k = max(int(k), 1)

        if reverse:
            ids, dists = self._farthest(queries, k, view_ids)
        else:
            ids, scores = self._search(queries, k, view_ids)
            dists = [self._to_dists(s) for s in scores]
        return self._answer(ids, dists, single, return_dists)

    def _radius_neighbors(self, query=None, thresh=None, return_dists=False):
        if thresh is None:
            raise ValueError("thresh must be a distance; got None")
        if query is None:
            inds, dists = self._graph_for(None, thresh=float(thresh))
            return (inds, dists) if return_dists else inds

        query = self._query_vectors(query)
        single = query.ndim == 1
        queries = query[None, :] if single else query
        view_ids = self._view_ids()
        ids, dists = [], []
        for q in queries:
            row_ids, row_dists = self._within(q, float(thresh), view_ids)
            ids.append(row_ids)
            dists.append(row_dists)
        return self._answer(ids, dists, single, return_dists)

    # ---- helpers -------------------------------------------------------

    def _answer(self, ids, dists, single, return_dists):
        """``(sample_ids, label_ids[, dists])`` from rows of point ids."""
        if self.config.patches_field is None:
            sample_ids, label_ids = ids, None
        else:
            sample_ids, label_ids = [self._parent_ids(r) for r in ids], ids
        if single:
            sample_ids, dists = sample_ids[0], dists[0]
            label_ids = label_ids[0] if label_ids is not None else None
        if return_dists:
            return sample_ids, label_ids, dists
        return sample_ids, label_ids

    def _view_ids(self) -> set | None:
        return set(self._point_ids()) if self.has_view else None

    def _vectors_as_added(self, sample_ids) -> tuple[list, np.ndarray]:
        """The vectors of the ids found, as they were added: a cosine index
        keeps unit vectors, and each point's payload its norm."""
        found, vectors, payloads = self.index.retrieve(sample_ids, [base.NORM])
        if self.config.metric != "cosine" or not found:
            return found, vectors
        norms = np.array(
            [p.get(base.NORM, np.nan) for p in payloads], dtype=np.float32
        )
        vectors = vectors * np.nan_to_num(norms, nan=1.0)[:, None]
        older = np.flatnonzero(np.isnan(norms))
        if older.size:
            vectors[older] = self._field_vectors(
                [found[i] for i in older], vectors[older]
            )
        return found, vectors

    def _field_vectors(self, ids, stored) -> np.ndarray:
        """Points written before the index kept norms: their embeddings
        field, where it still holds a vector in the same direction."""
        field = self.config.embeddings_field
        if field is None:
            logger.warning(
                "%d points of %s were written before the index kept their "
                "norms; they come back unit length (rebuild the index to "
                "keep them whole)",
                len(ids),
                self.index.name,
            )
            return stored
        values = dict(
            zip(
                *values_with_vectors(
                    self.samples._root_dataset.select(ids),
                    ["id", field],
                    field,
                ),
                strict=True,
            )
        )
        out = stored.copy()
        for j, sid in enumerate(ids):
            vec = values.get(sid)
            if vec is None:
                continue
            vec = np.asarray(vec, dtype=np.float32)
            norm = float(np.linalg.norm(vec))
            if norm > 0 and np.allclose(vec / norm, stored[j], atol=1e-4):
                out[j] = vec
        return out

    def _query_vectors(self, query) -> np.ndarray:
        if isinstance(query, str):
            query = [query]
        arr = np.asarray(query)
        if np.issubdtype(arr.dtype, np.number):
            return arr.astype(np.float32)
        ids = [str(q) for q in arr]
        found, vectors = self._vectors_as_added(ids)
        if len(found) < len(ids):
            missing = sorted(set(ids) - set(found))
            raise ValueError(
                f"Query IDs {missing[:3]} are not in the index; sync the "
                "index (prelabel.sync_index) first"
            )
        return vectors[0] if len(ids) == 1 else vectors

    def _search(self, queries, k, view_ids):
        index = self.index
        if view_ids is None:
            res = index.query(queries, k)
            return res.sample_ids, _rows(res.scores, res.sample_ids)
        if len(view_ids) <= MAX_ID_FILTER:
            res = index.query(
                queries, k, IndexFilter(sample_ids=tuple(view_ids))
            )
            return res.sample_ids, _rows(res.scores, res.sample_ids)

        # a large view: ask for more than k and keep the view's members,
        # growing the request until k are found or the index is exhausted
        total = index.count()
        fraction = max(len(view_ids) / max(total, 1), 1e-3)
        limit = min(total, int(k / fraction * 1.5) + 10)
        while True:
            res = index.query(queries, limit)
            out_ids, out_scores, short = [], [], False
            for row_ids, row_scores in zip(
                res.sample_ids, res.scores, strict=True
            ):
                keep = [j for j, s in enumerate(row_ids) if s in view_ids][:k]
                out_ids.append([row_ids[j] for j in keep])
                out_scores.append(row_scores[keep])
                short |= len(keep) < k and len(row_ids) == limit
            if not short or limit >= total:
                return out_ids, out_scores
            limit = min(total, limit * 2)

    def _within(self, query, thresh, view_ids):
        """The points within distance ``thresh`` of one query vector,
        nearest first, asking the index for more until the farthest one
        returned lies beyond ``thresh``."""
        total = self.index.count()
        k = min(RADIUS_START, total)
        while True:
            ids, scores = self._search(query[None, :], k, view_ids)
            ids, dists = ids[0], np.asarray(self._to_dists(scores[0]))
            inside = dists <= thresh
            if not inside.all() or k >= total:
                return list(np.array(ids, dtype=object)[inside]), list(
                    dists[inside]
                )
            k = min(total, k * 4)

    def _graph_for(self, k, thresh):
        """Neighbors of every point of the current view among the others
        (never itself), as integer indexes into :meth:`current_sample_ids`
        (:meth:`current_label_ids` for patches)
        with their distances: the ``k`` nearest, or all within ``thresh``.

        The points are queried through the index in batches; the ``k``
        nearest are kept between calls, so that the repeated radius queries
        of :meth:`find_duplicates` ask again only for the points whose
        stored neighbors all lie within the new threshold.
        """
        ids = list(self._point_ids())
        where = {sid: i for i, sid in enumerate(ids)}
        view_ids = self._view_ids()
        graph = self._graph
        if graph is None or graph["ids"] != ids:
            graph = self._graph = {"ids": ids, "rows": [None] * len(ids)}
        if thresh is not None:
            want = RADIUS_START
        else:
            want = k if k is not None else max(len(ids) - 1, 1)
        rows = graph["rows"]

        def short(i):
            row = rows[i]
            if row is None or (row[2] < want and not row[3]):
                return True
            return (
                thresh is not None
                and not row[3]
                and len(row[1])
                and row[1][-1] <= thresh
            )

        todo = [i for i in range(len(ids)) if short(i)]
        with Lease(self.index) as lease:
            while todo:
                for start in range(0, len(todo), GRAPH_BATCH):
                    lease.tick()
                    batch = todo[start : start + GRAPH_BATCH]
                    self._fill_rows(batch, rows, ids, where, want, view_ids)
                todo = [i for i in todo if short(i)]
                if thresh is None:
                    break
        inds, dists = [], []
        for row in rows:
            if row is None:  # a point of the view with no stored vector
                inds.append(np.array([], int))
                dists.append(np.array([]))
                continue
            cut = (
                np.searchsorted(row[1], thresh, side="right")
                if thresh is not None
                else want
            )
            inds.append(row[0][:cut])
            dists.append(row[1][:cut])
        return inds, dists

    def _fill_rows(self, batch, rows, ids, where, want, view_ids) -> None:
        """Queries the points ``batch`` (positions in ``ids``) for more
        neighbors than their rows hold: ``(neighbor positions, distances,
        number asked, complete)`` each."""
        asked = max(want if rows[i] is None else 4 * rows[i][2] for i in batch)
        asked = min(asked, len(ids) - 1)
        found, vectors = self.index.get_vectors([ids[i] for i in batch])
        for i in set(batch) - {where[sid] for sid in found}:
            rows[i] = (np.array([], int), np.array([]), asked, True)
        if not found:
            return
        res_ids, scores = self._search(vectors, asked + 1, view_ids)
        for sid, row_ids, row_scores in zip(
            found, res_ids, scores, strict=True
        ):
            dists = np.asarray(self._to_dists(row_scores))
            keep = [
                j for j, s in enumerate(row_ids) if s != sid and s in where
            ][:asked]
            rows[where[sid]] = (
                np.array([where[row_ids[j]] for j in keep], int),
                dists[keep],
                asked,
                len(keep) < asked or asked >= len(ids) - 1,
            )

    def _farthest(self, queries, k, view_ids):
        """The ``k`` least similar points of each query, by an exact pass
        over the stored vectors in batches (no index structure answers
        this); memory holds ``k`` candidates per query."""
        metric = self.config.metric
        queries = np.asarray(queries, dtype=np.float32)
        if metric == "cosine":
            norms = np.linalg.norm(queries, axis=1, keepdims=True)
            queries = queries / np.where(norms > 0, norms, 1.0)
        flt = None
        if view_ids is not None and len(view_ids) <= MAX_ID_FILTER:
            flt = IndexFilter(sample_ids=tuple(view_ids))
        best_ids = [np.array([], dtype=object) for _ in queries]
        best = [np.array([], dtype=np.float32) for _ in queries]
        with Lease(self.index) as lease:
            for ids, vectors in self.index.iter_vectors(flt):
                lease.tick()
                ids = np.array(ids, dtype=object)
                if view_ids is not None and flt is None:
                    mask = np.fromiter((s in view_ids for s in ids), bool)
                    ids, vectors = ids[mask], vectors[mask]
                dists = _distances(queries, vectors, metric)
                for i in range(len(queries)):
                    cand_ids = np.concatenate([best_ids[i], ids])
                    cand = np.concatenate([best[i], dists[i]])
                    top = np.argsort(-cand, kind="stable")[:k]
                    best_ids[i], best[i] = cand_ids[top], cand[top]
        return [list(b) for b in best_ids], [list(map(float, d)) for d in best]

    def _to_dists(self, scores):
        scores = np.asarray(scores, dtype=float)
        if self.config.metric == "cosine":
            return list(1.0 - scores)
        # dotproduct: negated so that lower is closer; euclidean: the index
        # reports negated distances
        return list(-scores)

    @classmethod
    def _from_dict(cls, d, samples, config, brain_key):
        return cls(samples, config, brain_key)


def _id_array(ids) -> np.ndarray:
    if isinstance(ids, str):
        ids = [ids]
    return np.array([str(i) for i in ids], dtype=object)


def _new_or_overwritten(
    sample_ids, present: set, overwrite, allow_existing, warn_existing
) -> np.ndarray:
    """The positions of ``sample_ids`` to write, under FiftyOne's
    ``add_to_index`` options."""
    exists = np.fromiter((s in present for s in sample_ids), bool)
    if exists.any() and not allow_existing:
        first = sample_ids[np.flatnonzero(exists)[0]]
        raise ValueError(
            f"Found {int(exists.sum())} ids (eg {first}) that already exist "
            "in the index"
        )
    if exists.any() and warn_existing:
        logger.warning(
            "%s %d ids that already exist in the index",
            "Overwriting" if overwrite else "Skipping",
            int(exists.sum()),
        )
    if overwrite:
        return np.arange(len(sample_ids))
    return np.flatnonzero(~exists)


def _distances(queries, vectors, metric) -> np.ndarray:
    """Exact distances (lower is closer) of stored vectors to queries, as
    :meth:`PrelabelQdrantSimilarityIndex._to_dists` reports them."""
    dots = queries @ vectors.T
    if metric == "cosine":
        return 1.0 - dots
    if metric == "dotproduct":
        return -dots
    sq = (
        (queries**2).sum(axis=1)[:, None]
        + (vectors**2).sum(axis=1)[None, :]
        - 2.0 * dots
    )
    return np.sqrt(np.maximum(sq, 0.0))


def _rows(scores, ids):
    return [scores[i, : len(row)] for i, row in enumerate(ids)]


def _parse_env(value: str):
    low = value.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low.isdigit():
        return int(low)
    return value


def register_backend() -> None:
    """Makes ``fob.compute_similarity(..., backend="prelabel_qdrant")``
    work in this process."""
    backends = fob.brain_config.similarity_backends
    entry = backends.setdefault(constants.BACKEND_NAME, {})
    entry.setdefault(
        "config_cls",
        f"{PrelabelQdrantSimilarityConfig.__module__}."
        "PrelabelQdrantSimilarityConfig",
    )
