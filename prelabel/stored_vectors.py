"""FiftyOne's stored vectors, read fast.

FiftyOne keeps a ``VectorField``'s arrays as zlib-compressed ``.npy``
bytes and decodes each one with ``np.load``, whose header parse costs more
than the data at 1,280 floats (6 s of a 60,000-sample sync). Here the raw
values are read in the same query and the header is parsed once per
field.
"""

from __future__ import annotations

import ast
import io
import zlib

import numpy as np

_NPY_MAGIC = b"\x93NUMPY"
_npy_headers: dict[bytes, tuple[np.dtype, tuple, int] | None] = {}


def _npy_layout(raw: bytearray) -> tuple[np.dtype, tuple, int] | None:
    """``(dtype, shape, data offset)`` of an ``.npy`` payload whose array
    is C-ordered and holds no Python objects, else None; parsed once per
    distinct header (a field's vectors share one)."""
    if raw[:6] != _NPY_MAGIC:
        return None
    size = 2 if raw[6] == 1 else 4
    end = 8 + size + int.from_bytes(raw[8 : 8 + size], "little")
    header = bytes(raw[8 + size : end])
    if header not in _npy_headers:
        layout = None
        try:
            meta = ast.literal_eval(header.decode("latin1"))
            dtype = np.dtype(meta["descr"])
            if not meta["fortran_order"] and not dtype.hasobject:
                layout = (dtype, tuple(meta["shape"]), end)
        except (ValueError, SyntaxError, KeyError, TypeError):
            layout = None
        if len(_npy_headers) > 256:  # vectors of many shapes
            _npy_headers.clear()
        _npy_headers[header] = layout
    return _npy_headers[header]


def decode_vector(value):
    """A stored vector as an array: FiftyOne keeps a vector field's
    arrays as zlib-compressed ``.npy`` bytes; this reads them without
    ``np.load`` (whose header parse costs more than the data at 1,280
    floats). Lists, arrays and None pass through."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return value
    raw = bytearray(zlib.decompress(value))  # writable, as np.load's
    layout = _npy_layout(raw)
    if layout is None:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    dtype, shape, offset = layout
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)


def values_with_vectors(view, paths: list[str], vector_path: str) -> list:
    """``view.values(paths)`` for sample-level ``paths``: ``"id"``,
    ``"tags"``, string or number fields such as ``"gt.label"``, and the
    vector field ``vector_path`` (one of them), read raw from the
    database with the vectors decoded here (FiftyOne's own decoding of
    each vector costs more than the read; the values are the same).

    Returns:
        one list per path, in the order of ``paths``
    """
    if vector_path not in paths:
        raise ValueError(f"{vector_path!r} is not one of {paths}")
    columns = [list(c) for c in view.values(list(paths), _raw=True)]
    i = paths.index(vector_path)
    columns[i] = [decode_vector(v) for v in columns[i]]
    return columns
