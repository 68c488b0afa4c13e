"""Writing sample fields all at once: a job writes temporary fields chunk
by chunk and they replace the real ones only when every chunk succeeded,
so a failed or interrupted job never leaves a half-written field."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import fiftyone as fo

#: the ``fields`` entry of a Classification field
CLASSIFICATION = (
    fo.EmbeddedDocumentField,
    {"embedded_doc_type": fo.Classification},
)


@contextmanager
def staged_fields(dataset, fields: dict) -> Iterator[dict[str, str]]:
    """Temporary fields that replace ``fields`` when the block succeeds.

    Args:
        dataset: the dataset to write
        fields: final field name -> ``(field type, add_sample_field
            keyword arguments)``

    Yields:
        final field name -> the temporary field to write instead

    On success every final field is replaced by its temporary one; on any
    exception (``KeyboardInterrupt`` included) the temporary fields are
    deleted and the final ones are left as they were.
    """
    tag = uuid.uuid4().hex[:8]
    tmp = {name: f"prelabel_tmp_{i}_{tag}" for i, name in enumerate(fields)}
    try:
        for name, (ftype, kwargs) in fields.items():
            dataset.add_sample_field(tmp[name], ftype, **kwargs)
        yield tmp
        for name, staged in tmp.items():
            if dataset.has_sample_field(name):
                dataset.delete_sample_field(name)
            dataset.rename_sample_field(staged, name)
    except BaseException:
        for staged in tmp.values():
            if dataset.has_sample_field(staged):
                dataset.delete_sample_field(staged)
        raise
