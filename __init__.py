"""The @prelabel/qdrant FiftyOne plugin: registration only.

FiftyOne imports this file under a synthetic module name (as a package, so
the relative imports below work). Every operator is a thin form around the
importable ``prelabel`` package (``pip install -e .``), which holds all the
logic and the brain backend that other processes re-import.
"""

from .operators import OPERATORS
from .panels import MistakesPanel


def register(p):
    for operator in OPERATORS:
        p.register(operator)
    p.register(MistakesPanel)
