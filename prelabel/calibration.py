"""Deprecated: calibration moved to :mod:`prelabel.core.calibration`."""

from prelabel.deprecation import moved

_NAMES = (
    "expected_calibration_error",
    "precision_curve",
    "curve_points",
    "coverage_at_precision",
    "accept_threshold",
    "choose_score",
    "Calibrator",
    "Calibration",
    "calibrate",
)
__getattr__ = moved(
    __name__, {name: "prelabel.core.calibration" for name in _NAMES}
)
