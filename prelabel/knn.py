"""Deprecated: voting moved to :mod:`prelabel.core.voting`."""

from prelabel.deprecation import moved

_VOTING = "prelabel.core.voting"
__getattr__ = moved(
    __name__,
    {
        name: _VOTING
        for name in ("VOTES", "Votes", "encode", "vote", "own_label_scores")
    },
)
