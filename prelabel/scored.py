"""Deprecated: the second pre-annotation path is gone; every option goes
through :func:`prelabel.preannotate` (see :mod:`prelabel.scorers`)."""

from prelabel.deprecation import moved

__getattr__ = moved(
    __name__,
    {
        "MODES": "prelabel.constants",
        "MAX_CALIBRATION": "prelabel.scorers",
        "check_scored_args": "prelabel.preannotate:check_options",
        "check_adapt_index": "prelabel.adapt",
        "adapt_index": "prelabel.adapt",
    },
)
