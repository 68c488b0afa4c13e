"""The Python panels of the @prelabel/qdrant plugin."""

from .mistakes_panel import MistakesPanel

__all__ = ["MistakesPanel"]
