"""prelabel: kNN pre-annotation and label-mistake finding for FiftyOne,
on a Qdrant index (embedded Qdrant Edge by default, or a Qdrant server).

The workflow::

    import prelabel

    prelabel.compute_embeddings(dataset, model="efficientnet_lite0")
    index = prelabel.sync_index(dataset, label_field="ground_truth")
    prelabel.preannotate(
        dataset.match_tags("test"), index=index, reference="train",
        label_field="ground_truth", pred_field="prelabel",
    )
    view = prelabel.high_confidence_mistakes(
        dataset, "prelabel", "ground_truth"
    )

Pre-labels that can be accepted without review (learned from the
references alone: embeddings adapted to their labels, calibrated
confidence, and the threshold that keeps 99 % precision)::

    result = prelabel.preannotate(
        dataset.match_tags("test"), index=index, reference="train",
        mode="adapted", target_precision=0.99,
    )
    result.expected_coverage, result.num_accepted  # the rest: needs_review
"""

from prelabel.adapt import adapt_embeddings, adapt_index, adapter_record
from prelabel.constants import BACKEND_NAME, PLUGIN_NAME
from prelabel.fields import recover
from prelabel.health import check_index
from prelabel.index.brain import register_backend as _register_backend
from prelabel.indexing import sync_index
from prelabel.mistakes import (
    disagreeing_labels,
    find_label_mistakes,
    high_confidence_mistakes,
    suspicious_labels,
)
from prelabel.neighbors import load_index
from prelabel.orphans import delete_orphans
from prelabel.preannotate import evaluate, preannotate
from prelabel.selection import forecast_labeling, select_for_labeling
from prelabel.slicing import IdRange
from prelabel.units import embedding_coverage

_register_backend()

# torch is imported only when embeddings are computed: the App server and
# workers that merely load a similarity run never pay for it
_LAZY = {
    "compute_embeddings": "prelabel.embeddings",
    "list_models": "prelabel.models",
    "load_mnist_dataset": "prelabel.datasets",
    "plan_embedding_runs": "prelabel.embeddings",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prelabel' has no attribute {name!r}")


__all__ = [
    "BACKEND_NAME",
    "IdRange",
    "PLUGIN_NAME",
    "adapt_embeddings",
    "adapt_index",
    "adapter_record",
    "check_index",
    "compute_embeddings",
    "delete_orphans",
    "embedding_coverage",
    "list_models",
    "load_index",
    "load_mnist_dataset",
    "evaluate",
    "find_label_mistakes",
    "forecast_labeling",
    "high_confidence_mistakes",
    "plan_embedding_runs",
    "preannotate",
    "recover",
    "select_for_labeling",
    "disagreeing_labels",
    "suspicious_labels",
    "sync_index",
]
