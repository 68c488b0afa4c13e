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
"""

from prelabel.constants import BACKEND_NAME, PLUGIN_NAME
from prelabel.index.brain import register_backend as _register_backend
from prelabel.mistakes import (
    find_label_mistakes,
    high_confidence_mistakes,
    suspicious_labels,
)
from prelabel.preannotate import evaluate, preannotate
from prelabel.sync import sync_index

_register_backend()

__all__ = [
    "BACKEND_NAME",
    "PLUGIN_NAME",
    "evaluate",
    "find_label_mistakes",
    "high_confidence_mistakes",
    "preannotate",
    "suspicious_labels",
    "sync_index",
]
