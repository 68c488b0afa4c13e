"""Reading stored vectors: the raw read decoded by prelabel gives what
FiftyOne's own read gives, for every way a vector can be stored."""

import io
import zlib

import fiftyone as fo
import numpy as np
import pytest

from prelabel.stored_vectors import decode_vector, values_with_vectors
from prelabel.units import Samples


def _npy(array, version=None) -> bytes:
    buf = io.BytesIO()
    if version is None:
        np.save(buf, array)
    else:
        np.lib.format.write_array(buf, array, version=version)
    return zlib.compress(buf.getvalue())


@pytest.mark.parametrize(
    "array",
    [
        np.arange(5, dtype=np.float32),
        np.arange(6, dtype=np.float64).reshape(2, 3),
        np.arange(4, dtype=">f4"),  # big-endian
        np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        np.zeros(0, dtype=np.float16),
    ],
)
def test_decode_matches_np_load(array):
    out = decode_vector(_npy(array))
    assert out.dtype == array.dtype and out.shape == array.shape
    np.testing.assert_array_equal(out, array)
    out[...] = 0  # writable, as np.load's arrays are


def test_decode_parses_a_plain_header_itself(monkeypatch):
    """The point of the decoder: no ``np.load`` for float vectors."""
    data = [_npy(np.full(4, i, dtype=np.float32)) for i in range(3)]

    def refuse(*args, **kwargs):
        raise AssertionError("np.load called")

    monkeypatch.setattr(np, "load", refuse)
    for i, b in enumerate(data):
        np.testing.assert_array_equal(decode_vector(b), np.full(4, i))


def test_decode_reads_npy_version_2_and_passes_other_values():
    array = np.arange(3, dtype=np.float32)
    np.testing.assert_array_equal(decode_vector(_npy(array, (2, 0))), array)
    assert decode_vector(None) is None
    assert decode_vector([1.0, 2.0]) == [1.0, 2.0]
    assert decode_vector(array) is array
    with pytest.raises(zlib.error):
        decode_vector(b"not compressed")


@pytest.fixture
def dataset():
    ds = fo.Dataset()
    rng = np.random.default_rng(0)
    samples = []
    for i in range(7):
        s = fo.Sample(filepath=f"/tmp/vr{i}.png", tags=["t"] * (i % 2))
        if i < 5:
            s["gt"] = fo.Classification(label=f"c{i % 2}")
        if i < 3:
            s["emb"] = rng.random(16).astype(np.float32)
        elif i == 3:
            s["emb"] = rng.random(16)  # float64
        samples.append(s)
    ds.add_samples(samples)
    ds.set_values("as_list", [[float(i), 1.0] for i in range(7)])
    yield ds
    ds.delete()


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            np.testing.assert_array_equal(x, y)
            assert np.asarray(x).dtype == np.asarray(y).dtype
        else:
            assert x == y


@pytest.mark.parametrize("field", ["emb", "as_list"])
def test_values_with_vectors_equal_fiftyones_values(dataset, field):
    paths = ["id", "tags", "gt.label", field]
    for view in (dataset, dataset.skip(2), dataset.exists("gt")):
        ours = values_with_vectors(view, paths, field)
        theirs = view.values(paths)
        for a, b in zip(ours, theirs, strict=True):
            _same(a, b)


def test_read_vectors_skips_missing_and_keeps_order(dataset):
    ids = dataset.values("id")
    found, X = Samples().read_vectors(dataset, ids, "emb")
    assert found == ids[:4] and X.shape == (4, 16)
    assert X.dtype == np.float32
    want = np.stack(
        [np.asarray(v, np.float32) for v in dataset.values("emb")[:4]]
    )
    np.testing.assert_array_equal(X, want)


def test_values_with_vectors_names_a_missing_vector_path(dataset):
    with pytest.raises(ValueError, match="'emb'"):
        values_with_vectors(dataset, ["id"], "emb")
