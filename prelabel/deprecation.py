"""Names that moved when the package was rebuilt in layers: they still
import from their old module, with a ``DeprecationWarning`` saying where
they live now."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable


def moved(old: str, names: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` serving names that moved.

    Args:
        old: the module the names were in
        names: name -> ``"new.module"`` or ``"new.module:new_name"``

    Returns:
        the ``__getattr__`` to assign in the old module
    """

    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        module, _, attr = names[name].partition(":")
        attr = attr or name
        warnings.warn(
            f"{old}.{name} moved to {module}.{attr}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(module), attr)

    return __getattr__
