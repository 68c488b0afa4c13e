"""Slices of a collection for processes that work on it at once.

A slice is a closed range of sample ids. Ids do not change when samples
are written, sorted or filtered, so a slice names the same samples in
every process that applies it (unlike ``skip``/``limit``, whose samples
move as soon as one process writes a field the view filters on), and the
slices of one split never overlap.
"""

from __future__ import annotations

from typing import NamedTuple

import fiftyone.core.collections as foc
from bson import ObjectId
from bson.errors import InvalidId
from fiftyone import ViewField as F

from prelabel.validation import check_positive_int


class IdRange(NamedTuple):
    """The samples whose id lies in ``[first, last]``.

    Args:
        first: the smallest id of the slice
        last: the largest id of the slice
        size (None): how many samples the split put in it
    """

    first: str
    last: str
    size: int | None = None

    def of(self, samples: foc.SampleCollection) -> foc.SampleCollection:
        """The samples of ``samples`` in this slice."""
        return samples.match(
            (F("_id") >= ObjectId(self.first))
            & (F("_id") <= ObjectId(self.last))
        )

    def to_dict(self) -> dict:
        """A JSON-serializable form (operator parameters)."""
        return self._asdict()

    @classmethod
    def from_dict(cls, value, param: str = "slice") -> IdRange:
        """Reads :meth:`to_dict`'s form, naming ``param`` when it is not
        one."""
        try:
            first, last = value["first"], value["last"]
            ObjectId(first), ObjectId(last)
        except (TypeError, KeyError, InvalidId) as e:
            raise ValueError(
                f"{param}={value!r} is not a slice of sample ids; pass "
                f"{{'first': <id>, 'last': <id>}} as split_by_id returns "
                f"them"
            ) from e
        if first > last:
            raise ValueError(
                f"{param}={value!r} is empty: 'first' comes after 'last'"
            )
        return cls(first, last, value.get("size"))


def split_by_id(ids: list[str], parts: int) -> list[IdRange]:
    """Splits sample ids into at most ``parts`` slices of nearly equal
    size (fewer when there are fewer ids).

    Args:
        ids: sample ids, in any order
        parts: how many slices to make, at least 1

    Returns:
        a list of :class:`IdRange`, in id order
    """
    check_positive_int(parts, "parts")
    # ObjectId strings are fixed-width hex: text order is id order
    ordered = sorted(ids)
    parts = min(parts, len(ordered))
    if not parts:
        return []
    bounds = [round(i * len(ordered) / parts) for i in range(parts + 1)]
    return [
        IdRange(ordered[lo], ordered[hi - 1], hi - lo)
        for lo, hi in zip(bounds, bounds[1:], strict=False)
    ]
