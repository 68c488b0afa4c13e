"""Browser tests. A package, so that ``tests/browser/conftest.py`` is
imported as ``browser.conftest`` and does not replace ``tests/conftest.py``
as the module ``conftest`` that other test modules import from."""
