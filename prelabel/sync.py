"""Deprecated: syncing moved to :mod:`prelabel.indexing` (``sync_index``)
and :mod:`prelabel.index.sync` (the diff and the writes)."""

from prelabel.deprecation import moved

_SYNC = "prelabel.index.sync"
__getattr__ = moved(
    __name__,
    {
        "SyncStats": _SYNC,
        "sync_points": _SYNC,
        "read_chunk": _SYNC,
        "payloads_for": _SYNC,
        "check_index_dim": _SYNC,
        "sync_index": "prelabel.indexing",
        "check_sync_index": "prelabel.indexing",
    },
)
