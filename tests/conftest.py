"""Shared fixtures: an isolated FiftyOne database and real images on disk.

The environment is set before FiftyOne is imported. Unless
``FIFTYONE_DATABASE_URI`` is set, the session starts a private ``mongod``
(the one FiftyOne uses, on a free port, data in a temp folder): the tests
and the subprocesses they start talk to a real MongoDB that no other
process starts or stops under them, and a user's datasets are never
touched. Every embedded index lives in a temporary folder.
"""

import atexit
import os
import tempfile
import uuid

_SESSION_DIR = tempfile.mkdtemp(prefix="prelabel-tests-")
#: the private mongod of this session, if one was started
_MONGOD = []


def _remove_session_dir() -> None:
    """At exit: stops the private mongod, then removes the session's
    folder (its database files alone are about 300 MB; every run used to
    leave them in the temp folder)."""
    import shutil
    import subprocess

    for proc in _MONGOD:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


atexit.register(_remove_session_dir)
os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
os.environ.setdefault("FIFTYONE_DATABASE_NAME", "prelabel-tests")
os.environ["PRELABEL_HOME"] = os.path.join(_SESSION_DIR, "home")
os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")

import fiftyone as fo  # noqa: E402


def _start_private_mongod() -> None:
    import socket
    import subprocess
    import time

    import pymongo
    from fiftyone.core.service import DatabaseService

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    db_dir = os.path.join(_SESSION_DIR, "mongo")
    os.makedirs(db_dir)
    proc = subprocess.Popen(
        [
            DatabaseService.find_mongod(),
            "--dbpath",
            db_dir,
            "--port",
            str(port),
            "--bind_ip",
            "127.0.0.1",
            "--nounixsocket",
            "--logpath",
            os.path.join(db_dir, "mongod.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _MONGOD.append(proc)
    uri = f"mongodb://127.0.0.1:{port}"
    client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=500)
    deadline = time.monotonic() + 60
    while True:
        try:
            client.admin.command("ping")
            break
        except pymongo.errors.PyMongoError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "could not start a private mongod for the tests; see "
                    + os.path.join(db_dir, "mongod.log")
                ) from None
            time.sleep(0.2)
    client.close()
    os.environ["FIFTYONE_DATABASE_URI"] = uri
    fo.config.database_uri = uri
    fo.config.database_validation = False


if not os.environ.get("FIFTYONE_DATABASE_URI"):
    _start_private_mongod()
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
