"""Deprecated: label spreading moved to :mod:`prelabel.core.propagation`
(the graph's features and neighbors to :mod:`prelabel.core.vectors`)."""

from prelabel.deprecation import moved

_PROPAGATION = "prelabel.core.propagation"
__getattr__ = moved(
    __name__,
    {
        "ALPHAS": _PROPAGATION,
        "spread": _PROPAGATION,
        "PropagationChoice": _PROPAGATION,
        "candidates": _PROPAGATION,
        "choose": _PROPAGATION,
        "whitened_features": "prelabel.core.vectors",
        "knn_graph": "prelabel.core.vectors:exact_neighbors",
    },
)
