"""One way to report progress: a tqdm bar, nothing, or a callback.

The package reports ``(fraction, label)``; the App operators pass a callback
that forwards it to ``ctx.set_progress``; Python users get a bar.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressArg = bool | Callable[[float, str], None] | None


class Progress:
    """Reports progress of ``total`` steps.

    Args:
        progress: ``True`` for a tqdm bar, ``False``/``None`` for silence, or
            a callable ``progress(fraction, label)``
        total: the number of steps
        label: what is being done
        start (0.0), span (1.0): map this stage into a part of a larger job
            when ``progress`` is a callable
        unit ("sample"): what a step is, for the bar
    """

    def __init__(
        self,
        progress: ProgressArg,
        total: int,
        label: str,
        start: float = 0.0,
        span: float = 1.0,
        unit: str = "sample",
    ):
        self.total = max(int(total), 0)
        self.label = label
        self.done = 0
        self._callback = progress if callable(progress) else None
        self._start, self._span = start, span
        self._bar = None
        if progress is True:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=label, unit=unit)
        self._report()

    def update(self, n: int) -> None:
        self.done += int(n)
        if self._bar is not None:
            self._bar.update(n)
        self._report()

    def _report(self):
        if self._callback is not None:
            fraction = self.done / self.total if self.total else 1.0
            self._callback(
                self._start + self._span * min(fraction, 1.0),
                f"{self.label} ({min(self.done, self.total):,}/"
                f"{self.total:,})",
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *args):
        self.close()


def sub(progress: ProgressArg, start: float, span: float) -> ProgressArg:
    """A callback for one stage of a job (``start`` to ``start + span``)."""
    if not callable(progress):
        return progress
    return lambda f, label: progress(start + span * f, label)
