"""FiftyOne-brain's own similarity-backend suite, offline, on every backend.

A port of ``tests/intensive/test_similarity.py`` of fiftyone-brain (which
needs CLIP, zoo datasets and the network) that runs each test side by side
on three backends:

- ``sklearn``: FiftyOne's reference backend;
- ``embedded``: ``prelabel_qdrant`` on Qdrant Edge in a folder (default);
- ``server``: ``prelabel_qdrant`` through qdrant-client, whose local mode
  (one shared in-memory client per test) stands in for a server, so that
  a run can be loaded again by its key.

In place of the zoo: real handwritten digits (conftest's ``digit_images``)
as the images dataset, and canvases tiled from digits at known spots, with
one ``Detection`` per digit, as the patches dataset. In place of CLIP:
prelabel's ``pixels`` model (the resized grayscale image, flattened)
behind FiftyOne's ``Model`` interface. It embeds no text, so where the
original queries by a text prompt, every backend must refuse the prompt
with the error FiftyOne raises for a model without prompts.

Besides the original's tests, the parts of the ``SimilarityIndex`` API it
does not reach: ``sample_ids`` / ``label_ids`` and the sizes under
``use_view``, ``get_embeddings`` giving back what was added, queries by
vector / id / several ids / least-similar first, duplicates, the
embeddings field a run names, patch queries, uniqueness and
representativeness through ``similarity_index=``. Results are checked
against exact search in numpy (the documented meaning) and against sklearn
queried the same way, ids in order and distances within 1e-4.

Where fiftyone-brain 0.25.0's sklearn backend departs from the documented
meaning, the test follows the documentation and the sklearn case is a
strict xfail naming the difference.
"""

import os
import random
import uuid
from dataclasses import dataclass, field

import fiftyone as fo
import fiftyone.brain as fob
import fiftyone.core.models as fom
import numpy as np
import pytest
import torch
from conftest import make_digits_dataset
from fiftyone import ViewField as F
from PIL import Image
from qdrant_client import QdrantClient

import prelabel  # noqa: F401 - registers the prelabel_qdrant backend
import prelabel.index.server as pis
from prelabel.models import load_model

SKLEARN, EMBEDDED, SERVER = "sklearn", "embedded", "server"
OURS = "prelabel_qdrant"
SERVER_URL = "http://qdrant.invalid:6333"
PIXELS = 16  # the model's input side: 256-d embeddings
DIM = PIXELS * PIXELS
N_IMAGES = 200
N_CANVASES = 48
CELL, GRID = 28, 3  # canvases of 3 x 3 cells of 28 px
ATOL = 1e-4
PROMPT = "a handwritten seven"
NO_PROMPTS = "does not support prompts"

# ---- where fiftyone-brain 0.25.0's sklearn departs from its docs --------

SK_CENTERED = (
    "fiftyone-brain 0.25.0 (voxel51/fiftyone-brain#258): sklearn answers a "
    "query by an id of the active index from distances between "
    "mean-centred embeddings, unlike a query by the same vector"
)
SK_UNIQUENESS = (
    "fiftyone-brain 0.25.0: for sklearn, compute_uniqueness takes a "
    "full-index kneighbors that leaves each point itself out, so "
    "dists[:, 1:] drops the nearest neighbour, and it measures on "
    "mean-centred embeddings (#258); for every other backend it queries "
    "each embedding (itself the first hit) and keeps the 3 nearest others"
)
SK_DUP_DISTS = (
    "fiftyone-brain 0.25.0: sklearn's find_duplicates gives a duplicate's "
    "distance to its nearest unique example as a euclidean distance from "
    "the un-normalised query embedding to mean-centred unit vectors (its "
    "stand-in for cosine): 2.15 for a pair at cosine distance 3e-5"
)
SK_IN_PLACE = (
    "fiftyone-brain 0.25.0: sklearn's NeighborsHelper centres the index's "
    "own embeddings array in place on the first query by an id of the "
    "active index, so get_embeddings no longer returns what was added"
)


# ---- the model ----------------------------------------------------------


class PixelModel(fom.Model, fom.EmbeddingsMixin):
    """prelabel's ``pixels`` model as a FiftyOne image model: the image
    resized to ``PIXELS`` x ``PIXELS`` grayscale in [0, 1], flattened. It
    embeds no prompts."""

    def __init__(self):
        self._net = load_model("pixels", image_size=PIXELS)
        self._preprocess = True

    @property
    def media_type(self):
        return "image"

    @property
    def has_embeddings(self):
        return True

    @property
    def ragged_batches(self):
        return False

    @property
    def transforms(self):
        return None

    @property
    def preprocess(self):
        return self._preprocess

    @preprocess.setter
    def preprocess(self, value):
        self._preprocess = value

    def predict(self, arg):
        raise NotImplementedError("an embedding model only")

    def embed(self, arg):
        return self.embed_all([arg])[0]

    def embed_all(self, args):
        batch = torch.stack(
            [self._net.transform(Image.fromarray(np.asarray(a))) for a in args]
        )
        return self._net.embed(batch)


@pytest.fixture(scope="session")
def model():
    return PixelModel()


# ---- the backends -------------------------------------------------------


@dataclass
class Backend:
    name: str
    kwargs: dict = field(default_factory=dict)

    @property
    def ours(self):
        return self.name != SKLEARN


@pytest.fixture
def backend(request, monkeypatch):
    """The backend of a test; for ``server``, one in-memory qdrant-client
    that every connection of the test gets (so a run can be loaded again
    by key), and its URL in the environment as a deployment sets it."""
    name = request.param
    if name == SKLEARN:
        yield Backend(name, {"backend": "sklearn"})
        return
    if name == EMBEDDED:
        yield Backend(name, {"backend": OURS})
        return
    shared = QdrantClient(location=":memory:")

    def connect(url=None, api_key=None, **kwargs):
        if url is None:
            raise ValueError("no url")
        return shared

    monkeypatch.setattr(pis, "connect", connect)
    monkeypatch.setenv("PRELABEL_QDRANT_URL", SERVER_URL)
    yield Backend(name, {"backend": OURS, "url": SERVER_URL})
    shared.close()


def _marks(reason):
    return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []


def on_backends(ours=None, sklearn=None):
    """Runs a test on the three backends; the arguments are the reasons
    of the expected failures (``ours``: both prelabel_qdrant cases)."""
    return pytest.mark.parametrize(
        "backend",
        [
            pytest.param(SKLEARN, marks=_marks(sklearn), id=SKLEARN),
            pytest.param(EMBEDDED, marks=_marks(ours), id=EMBEDDED),
            pytest.param(SERVER, marks=_marks(ours), id=SERVER),
        ],
        indirect=True,
    )


def on_backends_and_metrics(metrics, ours=None, sklearn=None):
    """Runs a test on every ``(backend, metric)``; ``ours`` / ``sklearn``
    map a metric to the reason of an expected failure."""
    ours, sklearn = ours or {}, sklearn or {}
    params = []
    for name in (SKLEARN, EMBEDDED, SERVER):
        reasons = sklearn if name == SKLEARN else ours
        for metric in metrics:
            params.append(
                pytest.param(
                    name,
                    metric,
                    marks=_marks(reasons.get(metric)),
                    id=f"{name}-{metric}",
                )
            )
    return pytest.mark.parametrize(
        "backend,metric", params, indirect=["backend"]
    )


@pytest.fixture
def scratch():
    """``scratch(dataset)``: deletes ``dataset`` after the test (after the
    runs of :func:`make_index`, which depends on this fixture)."""
    made = []

    def keep(dataset):
        made.append(dataset)
        return dataset

    yield keep
    for dataset in made:
        _delete(dataset)


@pytest.fixture
def make_index(backend, scratch):
    """``make_index(samples, **kwargs)``: ``fob.compute_similarity`` on the
    test's backend under a fresh brain key (``brain_key=None`` for an
    unregistered run); registered runs are deleted after the test,
    unregistered ones cleaned up, before :func:`scratch` deletes the
    test's datasets."""
    made = []

    def make(samples, brain_key="new", **kwargs):
        if brain_key == "new":
            brain_key = "sim_" + uuid.uuid4().hex[:8]
        # noted first: a run that fails half way is registered already
        made.append([samples._root_dataset, brain_key, None])
        made[-1][2] = fob.compute_similarity(
            samples, brain_key=brain_key, **backend.kwargs, **kwargs
        )
        return made[-1][2]

    yield make
    for dataset, key, index in made:
        if not fo.dataset_exists(dataset.name):
            continue
        if key is None and index is not None:
            index.cleanup()
        elif key is not None and key in dataset.list_brain_runs():
            dataset.delete_brain_run(key)


# ---- the datasets -------------------------------------------------------


def _delete(dataset):
    if fo.dataset_exists(dataset.name):
        dataset.delete()


@pytest.fixture(scope="module")
def images(digit_images, model):
    """200 real digits (``train`` / ``test`` tags, ``ground_truth``
    classifications) with the model's embeddings in ``embeddings``.
    Read-only: a test that writes fields works on a clone."""
    dataset = make_digits_dataset(digit_images, n=N_IMAGES, seed=7)
    dataset.compute_embeddings(
        model, embeddings_field="embeddings", batch_size=64, progress=False
    )
    yield dataset
    _delete(dataset)


@pytest.fixture
def images_copy(images, scratch):
    """A clone of ``images`` that the test may write to."""
    return scratch(images.clone(f"suite-copy-{uuid.uuid4().hex[:8]}"))


@pytest.fixture(scope="session")
def canvases(digit_images, session_dir):
    """``N_CANVASES`` RGB images of 84 x 84 px, each with 1 to 3 distinct
    real digits pasted into cells of a 3 x 3 grid: a list of ``(filepath,
    [(label, [x, y, w, h]), ...])`` (boxes relative, one per digit)."""
    out_dir = os.path.join(session_dir, "suite-canvases")
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(11)
    order = iter(rng.permutation(len(digit_images)))
    side = CELL * GRID
    items = []
    for i in range(N_CANVASES):
        canvas = Image.new("RGB", (side, side))
        boxes = []
        cells = rng.choice(GRID * GRID, size=1 + i % 3, replace=False)
        for cell in sorted(cells):
            row, col = divmod(int(cell), GRID)
            path, label = digit_images[next(order)]
            digit = Image.open(path).convert("RGB").resize((CELL, CELL))
            canvas.paste(digit, (col * CELL, row * CELL))
            boxes.append((label, [col / GRID, row / GRID, 1 / GRID, 1 / GRID]))
        path = os.path.join(out_dir, f"canvas-{i:03d}.png")
        canvas.save(path)
        items.append((path, boxes))
    return items


def _patches_dataset(canvases, n=None, name="suite-patches"):
    dataset = fo.Dataset(f"{name}-{uuid.uuid4().hex[:8]}")
    samples = []
    for path, boxes in canvases[:n]:
        detections = [
            fo.Detection(label=label, bounding_box=box) for label, box in boxes
        ]
        samples.append(
            fo.Sample(
                filepath=path,
                ground_truth=fo.Detections(detections=detections),
            )
        )
    dataset.add_samples(samples, progress=False)
    return dataset


@pytest.fixture(scope="module")
def patches(canvases, model):
    """The canvases with ``ground_truth`` detections whose patches have the
    model's embeddings in ``ground_truth.detections.embeddings``."""
    dataset = _patches_dataset(canvases)
    dataset.compute_patch_embeddings(
        model,
        "ground_truth",
        embeddings_field="embeddings",
        batch_size=8,
        force_square=True,
        progress=False,
    )
    yield dataset
    _delete(dataset)


# ---- exact search in numpy -----------------------------------------------


def _dists(matrix, query, metric):
    """The distances from ``query`` to every row of ``matrix`` as FiftyOne
    reports them (cosine: ``1 - cos``; euclidean: L2)."""
    mat = np.asarray(matrix, dtype=np.float64)
    q = np.asarray(query, dtype=np.float64)
    if metric == "cosine":
        mat = mat / np.linalg.norm(mat, axis=1, keepdims=True)
        return 1.0 - mat @ (q / np.linalg.norm(q))
    if metric == "euclidean":
        return np.linalg.norm(mat - q, axis=1)
    raise ValueError(metric)


@dataclass
class Exact:
    """The exact ranking of ``ids`` by distance to a query."""

    ids: list
    dists: np.ndarray
    by_id: dict

    @classmethod
    def of(cls, ids, matrix, query, metric="cosine", k=None, reverse=False):
        d = _dists(matrix, query, metric)
        order = np.argsort(d, kind="stable")
        if reverse:
            order = order[::-1]
        order = order[:k]
        return cls(
            [ids[i] for i in order],
            d[order],
            dict(zip(ids, d, strict=True)),
        )

    def check(self, got_ids, got_dists=None, what=""):
        """``got_ids`` (and their distances) are this ranking: the same ids
        in the same order, except that ids at equal distances (within
        ``ATOL``) may swap."""
        assert len(got_ids) == len(self.ids), what
        assert len(set(got_ids)) == len(got_ids), what
        if got_dists is not None:
            np.testing.assert_allclose(
                got_dists, self.dists, atol=ATOL, err_msg=what
            )
        for rank, (got, want) in enumerate(
            zip(got_ids, self.ids, strict=True)
        ):
            assert (
                got == want or abs(self.by_id[got] - self.by_id[want]) <= ATOL
            ), f"{what}: rank {rank} is {got}, expected {want}"


def _matrix(samples, field="embeddings"):
    ids, vecs = samples.values(["id", field])
    return ids, np.stack(vecs)


def _ranked(samples, key, query, k, reverse=False):
    """``(ids, dists)`` of ``samples.sort_by_similarity`` under ``key``
    (through a scratch distance field, deleted again)."""
    dist_field = "qd_" + uuid.uuid4().hex[:6]
    view = samples.sort_by_similarity(
        query, k=k, reverse=reverse, brain_key=key, dist_field=dist_field
    )
    ids, dists = view.values(["id", dist_field])
    samples._dataset.delete_sample_field(dist_field)
    return ids, np.asarray(dists, dtype=np.float64)


def _sklearn_twin(samples, metric="cosine", **kwargs):
    """FiftyOne's sklearn index of the same embeddings (the reference a
    prelabel_qdrant result is compared to), registered under a new key."""
    key = "twin_" + uuid.uuid4().hex[:8]
    fob.compute_similarity(
        samples,
        embeddings="embeddings",
        backend="sklearn",
        metric=metric,
        brain_key=key,
        **kwargs,
    )
    return key


def _query_vectors(images, model, digit_images, n=3):
    """Query vectors of digits that are not in ``images``."""
    inside = set(images.values("filepath"))
    outside = [p for p, _ in digit_images if p not in inside][:n]
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in outside]
    return model.embed_all(arrays)


# ---- the original suite ---------------------------------------------------


@on_backends()
def test_brain_config(backend):
    similarity_backends = fob.brain_config.similarity_backends
    assert "sklearn" in similarity_backends
    name = backend.kwargs["backend"]
    assert name in similarity_backends
    cls = similarity_backends[name]["config_cls"]
    config = fob.similarity._parse_config(name)
    assert f"{type(config).__module__}.{type(config).__name__}" == cls
    assert config.method == name


def _check_image_run(images, embeddings, sample_ids, key):
    """The second half of ``test_image_similarity_backends``: the run
    loaded again by key, read and shrunk."""
    images.clear_cache()
    index = images.load_brain_results(key)
    assert index.total_index_size == N_IMAGES

    got, got_ids, got_labels = index.get_embeddings()
    assert got.shape == (N_IMAGES, DIM)
    assert got_ids.shape == (N_IMAGES,)
    assert got_labels is None
    added = dict(zip(sample_ids, embeddings, strict=True))
    for sid, vec in zip(got_ids, got, strict=True):
        np.testing.assert_allclose(vec, added[sid], rtol=1e-5, atol=1e-6)

    ids = random.Random(0).sample(list(images.values("id")), 100)
    got, got_ids, _ = index.get_embeddings(sample_ids=ids)
    assert got.shape == (100, DIM)
    assert got_ids.shape == (100,)
    assert set(got_ids) == set(ids)
    by_id = dict(zip(got_ids, got, strict=True))
    np.testing.assert_allclose(
        np.stack([by_id[i] for i in ids]),
        np.stack([added[i] for i in ids]),
        rtol=1e-5,
        atol=1e-6,
    )

    index.remove_from_index(sample_ids=ids)
    assert index.total_index_size == 100
    index.cleanup()
    images.delete_brain_run(key)
    assert key not in images.list_brain_runs()


@on_backends()
def test_image_similarity_backends(images, backend, model):
    key = "pix_" + backend.name
    index = fob.compute_similarity(
        images,
        model=model,
        metric="euclidean",
        embeddings=False,
        brain_key=key,
        **backend.kwargs,
    )
    try:
        embeddings, sample_ids, _ = index.compute_embeddings(
            images, progress=False
        )
        assert embeddings.shape == (N_IMAGES, DIM)
        index.add_to_index(embeddings, sample_ids)
        index.save()
        index.reload()
        assert index.total_index_size == N_IMAGES
        assert index.index_size == N_IMAGES
        assert index.missing_size is None

        # the original sorts by a CLIP prompt; the pixel model has none,
        # so the query must be refused, as sklearn refuses it
        with pytest.raises(ValueError, match=NO_PROMPTS):
            images.sort_by_similarity(PROMPT, k=10, brain_key=key)
        view = images.sort_by_similarity(embeddings[3], k=10, brain_key=key)
        assert len(view) == 10

        del index
        _check_image_run(images, embeddings, list(sample_ids), key)
    finally:
        if key in images.list_brain_runs():
            images.delete_brain_run(key)


def _check_patch_run(patches, embeddings, label_ids, key, total):
    patches.clear_cache()
    index = patches.load_brain_results(key)
    assert index.total_index_size == total

    got, got_sids, got_lids = index.get_embeddings()
    assert got.shape == (total, DIM)
    assert got_sids.shape == (total,)
    assert got_lids.shape == (total,)
    added = dict(zip(label_ids, embeddings, strict=True))
    for lid, vec in zip(got_lids, got, strict=True):
        np.testing.assert_allclose(vec, added[lid], rtol=1e-5, atol=1e-6)

    ids = random.Random(0).sample(list(label_ids), 40)
    got, got_sids, got_lids = index.get_embeddings(label_ids=ids)
    assert got.shape == (40, DIM)
    assert got_sids.shape == (40,)
    assert got_lids.shape == (40,)
    assert set(got_lids) == set(ids)
    by_id = dict(zip(got_lids, got, strict=True))
    np.testing.assert_allclose(
        np.stack([by_id[i] for i in ids]),
        np.stack([added[i] for i in ids]),
        rtol=1e-5,
        atol=1e-6,
    )

    index.remove_from_index(label_ids=ids)
    assert index.total_index_size == total - 40
    index.cleanup()
    patches.delete_brain_run(key)


@on_backends()
def test_patch_similarity_backends(patches, backend, model):
    key = "gt_pix_" + backend.name
    total = patches.count("ground_truth.detections")
    index = fob.compute_similarity(
        patches,
        patches_field="ground_truth",
        model=model,
        metric="euclidean",
        embeddings=False,
        brain_key=key,
        **backend.kwargs,
    )
    try:
        embeddings, sample_ids, label_ids = index.compute_embeddings(
            patches, progress=False
        )
        assert embeddings.shape == (total, DIM)
        index.add_to_index(embeddings, sample_ids, label_ids=label_ids)
        index.save()
        index.reload()
        assert index.total_index_size == total
        assert index.index_size == total
        assert index.missing_size is None

        view = patches.to_patches("ground_truth")
        with pytest.raises(ValueError, match=NO_PROMPTS):
            view.sort_by_similarity(PROMPT, k=10, brain_key=key)
        assert (
            len(view.sort_by_similarity(embeddings[0], k=10, brain_key=key))
            == 10
        )

        del index
        _check_patch_run(patches, embeddings, list(label_ids), key, total)
    finally:
        if key in patches.list_brain_runs():
            patches.delete_brain_run(key)


@on_backends()
def test_images(images, make_index):
    index = make_index(images, embeddings="embeddings")
    key = index.key
    index = images.load_brain_results(key, cache=False)
    assert index.total_index_size == len(images)
    assert set(images.values("id")) == set(index.sample_ids)
    assert len(index.sample_ids) == len(images)


@on_backends()
def test_images_subset(images, make_index):
    index = make_index(images, embeddings="embeddings")
    index = images.load_brain_results(index.key, cache=False)
    view = images.take(10, seed=3)
    index.use_view(view)
    assert index.index_size == len(view)
    assert set(view.values("id")) == set(index.current_sample_ids)


@on_backends()
def test_images_missing(images, model, scratch, make_index):
    dataset = scratch(
        images.limit(4)
        .exclude_fields("embeddings")
        .clone(f"suite-missing-{uuid.uuid4().hex[:8]}")
    )
    dataset.add_samples(
        [fo.Sample(filepath=f"non-existent{i}.png") for i in range(4)],
        progress=False,
    )
    sample_ids = dataset[:4].values("id")

    index = make_index(dataset, brain_key=None, model=model, batch_size=1)
    assert index.total_index_size == 4
    assert set(sample_ids) == set(index.sample_ids)

    index = make_index(
        dataset,
        brain_key=None,
        model=model,
        embeddings="embeddings_missing",
        batch_size=1,
    )
    assert len(dataset.exists("embeddings_missing")) == 4
    assert index.index_size == 4
    assert set(sample_ids) == set(index.sample_ids)


@on_backends()
def test_images_embeddings(images, model, scratch, make_index, backend):
    dataset = scratch(
        images.limit(10)
        .exclude_fields("embeddings")
        .clone(f"suite-embs-{uuid.uuid4().hex[:8]}")
    )
    n = len(dataset)

    # embeddings computed on the fly and stored on the dataset
    index1 = make_index(dataset, embeddings="embeddings", model=model)
    assert index1.total_index_size == n
    # a Model instance (not a zoo name) cannot promise prompts in later
    # sessions, and this one has none in this session either
    assert index1.config.supports_prompts is not True
    assert index1.supports_prompts is False
    assert "embeddings" not in index1.serialize()

    # embeddings already on the dataset
    dataset.compute_embeddings(
        model, embeddings_field="embeddings2", progress=False
    )
    index2 = make_index(dataset, embeddings="embeddings2", model=model)
    assert index2.total_index_size == n
    assert index2.config.supports_prompts is not True
    assert "embeddings" not in index2.serialize()

    # embeddings stored in the index itself: sklearn keeps them in its
    # run results; prelabel_qdrant keeps them in Qdrant, never in the
    # run document
    index3 = make_index(dataset, model=model)
    assert index3.total_index_size == n
    assert index3.config.supports_prompts is not True
    assert ("embeddings" in index3.serialize()) is (not backend.ours)

    # embeddings stored on the dataset, in a field that does not exist
    # yet (the original lets the default zoo model run first; offline,
    # embeddings=False with the field named)
    index4 = make_index(
        dataset, embeddings_field="embeddings4", embeddings=False
    )
    rng = np.random.default_rng(4)
    index4.add_to_index(rng.normal(size=(n, DIM)), dataset.values("id"))
    assert index4.total_index_size == n
    assert index4.config.supports_prompts is not True
    assert "embeddings" not in index4.serialize()


@on_backends()
def test_patches(patches, make_index):
    index = make_index(
        patches, patches_field="ground_truth", embeddings="embeddings"
    )
    index = patches.load_brain_results(index.key, cache=False)
    label_ids = patches.values("ground_truth.detections.id", unwind=True)
    assert index.total_index_size == len(label_ids)
    assert set(label_ids) == set(index.label_ids)


@on_backends()
def test_patches_subset(patches, make_index):
    index = make_index(
        patches, patches_field="ground_truth", embeddings="embeddings"
    )
    index = patches.load_brain_results(index.key, cache=False)
    label_ids = patches.values("ground_truth.detections.id", unwind=True)
    assert index.total_index_size == len(label_ids)
    assert set(label_ids) == set(index.label_ids)

    view = patches.filter_labels("ground_truth", F("label") == "3")
    index.use_view(view)
    label_ids = view.values("ground_truth.detections.id", unwind=True)
    assert 0 < len(label_ids) < index.total_index_size
    assert index.index_size == len(label_ids)
    assert set(label_ids) == set(index.current_label_ids)


@on_backends()
def test_patches_missing(canvases, model, scratch, make_index):
    dataset = scratch(_patches_dataset(canvases, n=4, name="suite-pmiss"))
    dataset.add_samples(
        [fo.Sample(filepath=f"non-existent{i}.png") for i in range(4)],
        progress=False,
    )
    for sample in dataset[4:]:
        sample["ground_truth"] = fo.Detections(
            detections=[fo.Detection(bounding_box=[0.1, 0.1, 0.8, 0.8])]
        )
        sample.save()

    index = make_index(
        dataset,
        brain_key=None,
        patches_field="ground_truth",
        model=model,
        batch_size=1,
    )
    num_patches = dataset[:4].count("ground_truth.detections")
    label_ids = dataset[:4].values("ground_truth.detections.id", unwind=True)
    assert index.total_index_size == num_patches
    assert set(label_ids) == set(index.label_ids)

    index = make_index(
        dataset,
        brain_key=None,
        model=model,
        patches_field="ground_truth",
        embeddings="embeddings_missing",
        batch_size=1,
    )
    view = dataset.filter_labels(
        "ground_truth", F("embeddings_missing") != None  # noqa: E711
    )
    assert view.count("ground_truth.detections") == num_patches
    assert index.total_index_size == num_patches
    assert set(label_ids) == set(index.label_ids)


@on_backends()
def test_patches_embeddings(canvases, model, scratch, make_index, backend):
    dataset = scratch(_patches_dataset(canvases, n=10, name="suite-pembs"))
    n = dataset.count("ground_truth.detections")
    kwargs = dict(patches_field="ground_truth")

    index1 = make_index(
        dataset, embeddings="embeddings", model=model, **kwargs
    )
    assert index1.total_index_size == n
    assert index1.config.supports_prompts is not True
    assert "embeddings" not in index1.serialize()

    dataset.compute_patch_embeddings(
        model,
        "ground_truth",
        embeddings_field="embeddings2",
        progress=False,
    )
    index2 = make_index(
        dataset, embeddings="embeddings2", model=model, **kwargs
    )
    assert index2.total_index_size == n
    assert index2.config.supports_prompts is not True
    assert "embeddings" not in index2.serialize()

    index3 = make_index(dataset, model=model, **kwargs)
    assert index3.total_index_size == n
    assert index3.config.supports_prompts is not True
    assert ("embeddings" in index3.serialize()) is (not backend.ours)

    index4 = make_index(
        dataset, embeddings_field="embeddings4", embeddings=False, **kwargs
    )
    view = dataset.to_patches("ground_truth")
    sample_ids, label_ids = view.values(["sample_id", "id"])
    rng = np.random.default_rng(4)
    index4.add_to_index(
        rng.normal(size=(n, DIM)), sample_ids, label_ids=label_ids
    )
    assert index4.total_index_size == n
    assert index4.config.supports_prompts is not True
    assert "embeddings" not in index4.serialize()


# ---- the SimilarityIndex API the original does not reach -----------------


@on_backends()
def test_prompt_queries_are_refused(images, model, make_index):
    """The pixel model embeds no text: a prompt is refused by FiftyOne's
    own check (``ValueError: Invalid query ...; this model does not
    support prompts``), the same on every backend."""
    index = make_index(images, embeddings="embeddings", model=model)
    assert index.supports_prompts is False
    with pytest.raises(ValueError, match=NO_PROMPTS):
        images.sort_by_similarity(PROMPT, k=5, brain_key=index.key)
    with pytest.raises(ValueError, match=NO_PROMPTS):
        index.sort_by_similarity([PROMPT, "a three"], k=5)
    loaded = images.load_brain_results(index.key, cache=False)
    with pytest.raises(ValueError, match=NO_PROMPTS):
        loaded.sort_by_similarity(PROMPT, k=5)


@on_backends()
def test_sizes_when_part_of_the_view_is_indexed(images, make_index):
    ids, vecs = _matrix(images)
    index = make_index(images, embeddings=False)
    index.add_to_index(vecs[:150], ids[:150])
    index.save()
    assert index.total_index_size == 150
    assert index.index_size == 150
    assert index.missing_size is None
    assert sorted(index.sample_ids) == sorted(ids[:150])
    assert index.label_ids is None

    with index.use_view(images):  # the whole dataset is no restriction
        assert index.index_size == 150
        assert sorted(index.current_sample_ids) == sorted(ids[:150])

    # 10 indexed and 10 not
    view = images.select(ids[140:160])
    with index.use_view(view):
        assert index.index_size == 10
        assert index.missing_size == 10
        assert sorted(index.current_sample_ids) == sorted(ids[140:150])
        hits = index.sort_by_similarity(vecs[145], k=20)
        assert sorted(hits.values("id")) == sorted(ids[140:150])
    assert index.total_index_size == 150

    with index.use_view(images.select(ids[:10])):
        assert index.index_size == 10
        assert index.missing_size is None
    assert index.index_size == 150

    loaded = images.load_brain_results(index.key, cache=False)
    assert loaded.total_index_size == 150
    assert loaded.index_size == 150
    assert sorted(loaded.sample_ids) == sorted(ids[:150])


@on_backends_and_metrics(("cosine", "euclidean", "dotproduct"))
def test_get_embeddings_returns_what_was_added(images, make_index, metric):
    ids = images.values("id")
    rng = np.random.default_rng(5)
    # vectors of very different lengths, in float32 as an index keeps them
    vecs = rng.normal(size=(len(ids), 32)) * rng.uniform(
        0.2, 5.0, size=(len(ids), 1)
    )
    vecs = vecs.astype(np.float32)
    index = make_index(images, embeddings=False, metric=metric)
    index.add_to_index(vecs, ids)
    index.save()
    added = dict(zip(ids, vecs, strict=True))

    for results in (index, images.load_brain_results(index.key, cache=False)):
        got, got_ids, got_labels = results.get_embeddings()
        assert got.shape == (len(ids), 32)
        assert sorted(got_ids) == sorted(ids)
        assert got_labels is None
        np.testing.assert_allclose(
            got, np.stack([added[i] for i in got_ids]), rtol=1e-6, atol=1e-6
        )

        some = ids[50:60][::-1]
        got, got_ids, _ = results.get_embeddings(sample_ids=some)
        assert list(got_ids) == some
        np.testing.assert_allclose(
            got, np.stack([added[i] for i in some]), rtol=1e-6, atol=1e-6
        )


@on_backends_and_metrics(("cosine", "euclidean"))
def test_sort_by_vector_equals_exact_and_sklearn(
    images, model, digit_images, make_index, metric
):
    index = make_index(images, embeddings="embeddings", metric=metric)
    twin = _sklearn_twin(images, metric=metric)
    try:
        ids, mat = _matrix(images)
        view = images.match_tags("test")
        view_ids, view_mat = _matrix(view)
        queries = list(_query_vectors(images, model, digit_images)) + [mat[17]]
        for i, q in enumerate(queries):
            want = Exact.of(ids, mat, q, metric, k=10)
            got_ids, got_d = _ranked(images, index.key, q, 10)
            want.check(got_ids, got_d, f"query {i}")
            twin_ids, twin_d = _ranked(images, twin, q, 10)
            want.check(twin_ids, twin_d, f"sklearn, query {i}")

            # restricted to a view
            want = Exact.of(view_ids, view_mat, q, metric, k=10)
            got_ids, got_d = _ranked(view, index.key, q, 10)
            want.check(got_ids, got_d, f"view, query {i}")
    finally:
        images.delete_brain_run(twin)


@on_backends(sklearn=SK_CENTERED)
def test_sort_by_id_equals_exact(images, make_index):
    """A query by id means a query by that sample's embedding (the
    documented meaning). sklearn, when the id is in the active index,
    ranks by distances between mean-centred embeddings instead (#258);
    asked by the vector, it agrees with exact search."""
    index = make_index(images, embeddings="embeddings")
    twin = _sklearn_twin(images)
    try:
        ids, mat = _matrix(images)
        for row in (0, 33, 150):
            want = Exact.of(ids, mat, mat[row], k=10)
            twin_ids, twin_d = _ranked(images, twin, mat[row], 10)
            want.check(twin_ids, twin_d, "sklearn by vector")
            got_ids, got_d = _ranked(images, index.key, ids[row], 10)
            assert got_ids[0] == ids[row]
            want.check(got_ids, got_d, f"by id {ids[row]}")
    finally:
        images.delete_brain_run(twin)


@on_backends(sklearn=SK_IN_PLACE)
def test_get_embeddings_after_a_query_by_id(images, make_index):
    """Queries never change what the index holds."""
    ids = images.values("id")
    rng = np.random.default_rng(6)
    vecs = (rng.normal(size=(len(ids), 32)) + 1.0).astype(np.float32)
    index = make_index(images, embeddings=False, metric="euclidean")
    index.add_to_index(vecs, ids)
    index.sort_by_similarity(ids[0], k=5)
    index.sort_by_similarity(vecs[1], k=5)
    got, got_ids, _ = index.get_embeddings(sample_ids=ids)
    assert list(got_ids) == ids
    np.testing.assert_allclose(got, vecs, rtol=1e-6, atol=1e-6)


@on_backends()
def test_sort_by_several_ids_mean(images, make_index):
    """``aggregation="mean"`` (the default): the query is the mean of the
    query ids' embeddings."""
    index = make_index(images, embeddings="embeddings")
    twin = _sklearn_twin(images)
    try:
        ids, mat = _matrix(images)
        for rows in ((1, 2, 3), (10, 90, 190, 199)):
            query_ids = [ids[r] for r in rows]
            want = Exact.of(ids, mat, mat[list(rows)].mean(axis=0), k=10)
            twin_ids, twin_d = _ranked(images, twin, query_ids, 10)
            want.check(twin_ids, twin_d, f"sklearn {rows}")
            got_ids, got_d = _ranked(images, index.key, query_ids, 10)
            want.check(got_ids, got_d, f"ids {rows}")
            explicit = index.sort_by_similarity(
                query_ids, k=10, aggregation="mean"
            )
            assert explicit.values("id") == got_ids
    finally:
        images.delete_brain_run(twin)


@on_backends()
def test_sort_least_similar_first(images, model, digit_images, make_index):
    index = make_index(images, embeddings="embeddings")
    twin = _sklearn_twin(images)
    try:
        ids, mat = _matrix(images)
        for q in _query_vectors(images, model, digit_images, n=2):
            want = Exact.of(ids, mat, q, k=10, reverse=True)
            twin_ids, twin_d = _ranked(images, twin, q, 10, reverse=True)
            want.check(twin_ids, twin_d, "sklearn")
            got_ids, got_d = _ranked(images, index.key, q, 10, reverse=True)
            want.check(got_ids, got_d, "reverse")
    finally:
        images.delete_brain_run(twin)


# ---- duplicates ---------------------------------------------------------


@pytest.fixture
def with_duplicates(digit_images, model, tmp_path, scratch):
    """60 real digits, then 8 of them again, saved again with a little
    pixel noise (planted near-duplicates, added after their originals).

    Returns ``(dataset, originals, copies, thresh)``, ``copies`` mapping
    each copy's id to its original's id, ``thresh`` a cosine distance
    that every planted pair is under and every other pair above, by far.
    """
    dataset = scratch(make_digits_dataset(digit_images, n=60, seed=3))
    rng = np.random.default_rng(9)
    originals = dataset.values("id")
    rows = rng.choice(len(originals), size=8, replace=False)
    paths = dataset.values("filepath")
    samples = []
    for row in rows:
        arr = np.asarray(Image.open(paths[row]), dtype=np.int16)
        arr = np.clip(arr + rng.integers(-3, 4, size=arr.shape), 0, 255)
        path = str(tmp_path / f"copy-{row}.png")
        Image.fromarray(arr.astype(np.uint8)).save(path)
        samples.append(fo.Sample(filepath=path))
    copy_ids = dataset.add_samples(samples, progress=False)
    dataset.compute_embeddings(
        model, embeddings_field="embeddings", progress=False
    )
    copies = {
        cid: originals[row] for cid, row in zip(copy_ids, rows, strict=True)
    }

    ids, mat = _matrix(dataset)
    unit = mat / np.linalg.norm(mat, axis=1, keepdims=True)
    dist = 1.0 - unit @ unit.T
    pos = {sid: i for i, sid in enumerate(ids)}
    planted = np.zeros_like(dist, dtype=bool)
    for cid, oid in copies.items():
        planted[pos[cid], pos[oid]] = planted[pos[oid], pos[cid]] = True
    np.fill_diagonal(dist, np.inf)
    worst_planted = dist[planted].max()
    best_other = dist[~planted].min()
    assert worst_planted * 20 < best_other, (worst_planted, best_other)
    thresh = float(np.sqrt(worst_planted * best_other))
    return dataset, originals, copies, thresh


@on_backends()
def test_near_duplicates(with_duplicates, make_index):
    dataset, originals, copies, thresh = with_duplicates
    index = make_index(dataset, embeddings="embeddings")
    key = index.key

    results = fob.compute_near_duplicates(
        dataset, similarity_index=key, threshold=thresh
    )
    assert sorted(results.duplicate_ids) == sorted(copies)
    assert sorted(results.unique_ids) == sorted(originals)
    nearest = {
        dup: orig
        for orig, dups in results.neighbors_map.items()
        for dup, _ in dups
    }
    assert nearest == copies
    dup_view = results.duplicates_view()
    assert len(dup_view) == 2 * len(copies)

    index = dataset.load_brain_results(key, cache=False)
    index.find_duplicates(thresh=thresh)
    assert sorted(index.duplicate_ids) == sorted(copies)
    assert sorted(index.unique_ids) == sorted(originals)

    index.find_unique(len(originals))
    assert sorted(index.unique_ids) == sorted(originals)
    assert sorted(index.duplicate_ids) == sorted(copies)
    assert len(index.unique_view()) == len(originals)

    # and what sklearn finds on the same embeddings
    twin = dataset.load_brain_results(_sklearn_twin(dataset))
    twin.find_duplicates(thresh=thresh)
    assert sorted(twin.duplicate_ids) == sorted(results.duplicate_ids)
    assert sorted(twin.unique_ids) == sorted(results.unique_ids)
    twin.find_unique(len(originals))
    assert sorted(twin.unique_ids) == sorted(index.unique_ids)


@on_backends(sklearn=SK_DUP_DISTS)
def test_near_duplicate_distances(with_duplicates, make_index):
    """``neighbors_map`` gives each duplicate's distance to its nearest
    unique example, in the index's metric."""
    dataset, _, _, thresh = with_duplicates
    index = make_index(dataset, embeddings="embeddings")
    index.find_duplicates(thresh=thresh)
    assert index.neighbors_map
    ids, mat = _matrix(dataset)
    pos = {sid: i for i, sid in enumerate(ids)}
    for orig, dups in index.neighbors_map.items():
        for dup, dist in dups:
            want = _dists(mat[[pos[orig]]], mat[pos[dup]], "cosine")[0]
            assert dist == pytest.approx(want, abs=ATOL), (dup, orig)


# ---- the embeddings field a run names --------------------------------------


@on_backends()
def test_embeddings_field_is_written(
    images_copy, model, digit_images, make_index
):
    """sklearn writes the embeddings it adds into the field its config
    names (``add_to_index``, hence ``compute_similarity(model=...,
    embeddings="new_field")``), and clears them on ``remove_from_index``;
    the same is expected of every backend."""
    dataset = images_copy
    index = make_index(dataset, model=model, embeddings="new_field")
    assert index.config.embeddings_field == "new_field"
    assert len(dataset.exists("new_field")) == len(dataset)
    ids, want = _matrix(dataset, "embeddings")
    _, got = _matrix(dataset, "new_field")
    np.testing.assert_allclose(got, want, rtol=1e-6)

    inside = set(dataset.values("filepath"))
    extra = [
        fo.Sample(filepath=p) for p, _ in digit_images if p not in inside
    ][:5]
    new_ids = dataset.add_samples(extra, progress=False)
    embeddings, sample_ids, _ = index.compute_embeddings(
        dataset.select(new_ids), progress=False
    )
    index.add_to_index(embeddings, sample_ids)
    assert index.total_index_size == len(dataset)
    _, got = _matrix(dataset.select(new_ids, ordered=True), "new_field")
    np.testing.assert_allclose(got, embeddings, rtol=1e-6)

    index.remove_from_index(sample_ids=new_ids[:2])
    assert index.total_index_size == len(dataset) - 2
    assert len(dataset.exists("new_field")) == len(dataset) - 2
    assert set(dataset.exists("new_field", False).values("id")) == set(
        new_ids[:2]
    )


# ---- patch queries ---------------------------------------------------------


@on_backends()
def test_patch_sort_by_similarity(patches, make_index):
    index = make_index(
        patches, patches_field="ground_truth", embeddings="embeddings"
    )
    view = patches.to_patches("ground_truth")
    ids, mat = _matrix(view, "ground_truth.embeddings")
    sample_of = dict(zip(ids, view.values("sample_id"), strict=True))
    for row in (0, 7, 50):
        want = Exact.of(ids, mat, mat[row], k=5)
        got = view.sort_by_similarity(mat[row], k=5, brain_key=index.key)
        want.check(got.values("id"), what=f"patch {row}")
        assert got.values("id")[0] == ids[row]

        # on the images: the samples of the top patches, in the order of
        # their first patch, holding only those patches
        got = patches.sort_by_similarity(mat[row], k=5, brain_key=index.key)
        top = got.values("ground_truth.detections.id", unwind=True)
        assert sorted(top) == sorted(want.ids)
        order = list(dict.fromkeys(sample_of[i] for i in want.ids))
        assert got.values("id") == order

    label_view = view.filter_labels("ground_truth", F("label") == "3")
    l_ids, l_mat = _matrix(label_view, "ground_truth.embeddings")
    want = Exact.of(l_ids, l_mat, mat[0], k=3)
    got = label_view.sort_by_similarity(mat[0], k=3, brain_key=index.key)
    want.check(got.values("id"), what="patches with label 3")


# ---- uniqueness and representativeness -----------------------------------


def _intended_uniqueness(mat):
    """What ``compute_uniqueness`` computes from a similarity index: each
    embedding's cosine distances to its three nearest other points,
    weighted 0.6 / 0.3 / 0.1, averaged, divided by the maximum."""
    unit = mat / np.linalg.norm(mat, axis=1, keepdims=True)
    dist = 1.0 - unit @ unit.T
    np.fill_diagonal(dist, -np.inf)  # itself, the first hit of its query
    nearest = np.sort(dist, axis=1)[:, 1:4]
    scores = np.mean(nearest * [0.6, 0.3, 0.1], axis=1)
    return scores / scores.max()


@on_backends(sklearn=SK_UNIQUENESS)
def test_uniqueness_through_the_index(images_copy, make_index):
    dataset = images_copy
    index = make_index(dataset, embeddings="embeddings")
    fob.compute_uniqueness(
        dataset,
        uniqueness_field="uniq",
        similarity_index=index.key,
        progress=False,
    )
    ids, mat = _matrix(dataset)
    got = np.asarray(dataset.values("uniq"), dtype=np.float64)
    np.testing.assert_allclose(got, _intended_uniqueness(mat), atol=ATOL)


@on_backends()
def test_representativeness_through_the_index(images_copy, make_index):
    dataset = images_copy
    fob.compute_representativeness(
        dataset,
        representativeness_field="rep_ref",
        embeddings="embeddings",
        progress=False,
    )
    index = make_index(dataset, embeddings="embeddings")
    fob.compute_representativeness(
        dataset,
        representativeness_field="rep",
        similarity_index=index.key,
        progress=False,
    )
    np.testing.assert_allclose(
        dataset.values("rep"), dataset.values("rep_ref"), atol=ATOL
    )
