"""The operators of the @prelabel/qdrant plugin, one per module, in the
order of the workflow."""

from .adapt_embeddings import AdaptEmbeddings
from .compute_embeddings import ComputeEmbeddings
from .find_label_mistakes import FindLabelMistakes
from .knn_preannotate import KnnPreannotate
from .open_mistakes_panel import OpenMistakesPanel
from .select_for_labeling import SelectForLabeling
from .sync_index import SyncIndex

#: the operators in workflow order, as ``register`` adds them
OPERATORS = (
    ComputeEmbeddings,
    SyncIndex,
    AdaptEmbeddings,
    KnnPreannotate,
    FindLabelMistakes,
    SelectForLabeling,
    OpenMistakesPanel,
)

__all__ = [
    "OPERATORS",
    "AdaptEmbeddings",
    "ComputeEmbeddings",
    "FindLabelMistakes",
    "KnnPreannotate",
    "OpenMistakesPanel",
    "SelectForLabeling",
    "SyncIndex",
]
