"""Shared fixtures: an isolated FiftyOne database and real images on disk.

The environment is set before FiftyOne is imported, so every test talks to
the real MongoDB but in a database of its own, and every embedded index
lives in a temporary folder.
"""

import os
import tempfile
import uuid

_SESSION_DIR = tempfile.mkdtemp(prefix="prelabel-tests-")
os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
os.environ.setdefault("FIFTYONE_DATABASE_NAME", "prelabel-tests")
os.environ["PRELABEL_HOME"] = os.path.join(_SESSION_DIR, "home")
os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")

import fiftyone as fo  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(scope="session")
def session_dir():
    return _SESSION_DIR


@pytest.fixture(scope="session")
def digit_images(session_dir):
    """Real handwritten digits (sklearn's 1,797 8x8 scans) as 32x32 PNGs.

    Returns a list of ``(filepath, label)``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    out_dir = os.path.join(session_dir, "digits")
    os.makedirs(out_dir, exist_ok=True)
    items = []
    for i, (img, label) in enumerate(
        zip(digits.images, digits.target, strict=True)
    ):
        path = os.path.join(out_dir, f"{i:04d}.png")
        arr = (img / 16.0 * 255).astype(np.uint8)
        Image.fromarray(arr).resize((32, 32), Image.BILINEAR).save(path)
        items.append((path, str(label)))
    return items


def make_digits_dataset(digit_images, n=300, train_frac=0.5, seed=0):
    """A fresh dataset of ``n`` real digits, ``ground_truth`` labels and
    ``train`` / ``test`` tags; deleted by the fixtures that use it."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digit_images))[:n]
    dataset = fo.Dataset(f"prelabel-test-{uuid.uuid4().hex[:8]}")
    samples = []
    for rank, i in enumerate(order):
        path, label = digit_images[i]
        tag = "train" if rank < int(n * train_frac) else "test"
        samples.append(
            fo.Sample(
                filepath=path,
                ground_truth=fo.Classification(label=label),
                tags=[tag],
            )
        )
    dataset.add_samples(samples, progress=False)
    return dataset


@pytest.fixture
def digits_dataset(digit_images):
    dataset = make_digits_dataset(digit_images)
    yield dataset
    if fo.dataset_exists(dataset.name):
        dataset.delete()
