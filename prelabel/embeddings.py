"""Step 1 of the workflow: compute an embedding for every image.

Images are decoded and transformed by a torch ``DataLoader`` in worker
processes while the main process runs the model, and the vectors are
written to a ``VectorField`` of the dataset every ``write_every`` samples,
so memory stays flat however large the dataset is. An interrupted run
resumes where it stopped: with ``skip_existing=True`` only samples without
a vector are embedded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import fiftyone as fo
import fiftyone.core.collections as foc
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from prelabel.constants import DEFAULT_EMBEDDINGS_FIELD, DEFAULT_MODEL
from prelabel.models import EmbeddingModel, check_model_name, load_model

logger = logging.getLogger(__name__)

#: fields that FiftyOne or prelabel's own workflow own; never overwritten
RESERVED_FIELDS = frozenset(
    {
        "id",
        "filepath",
        "tags",
        "metadata",
        "media_type",
        "created_at",
        "last_modified_at",
        "frames",
        "group",
    }
)

#: how many vectors are held in memory before they are written
DEFAULT_WRITE_EVERY = 1000

ProgressCallback = Callable[[float, str], None]


class _PathArray:
    """Filepaths packed in two numpy arrays.

    DataLoader workers forked from this process read the paths without
    touching Python refcounts, so the pages stay shared instead of being
    copied into every worker.
    """

    def __init__(self, paths: list[str]):
        encoded = [os.fsencode(p) for p in paths]
        lengths = np.fromiter((len(e) for e in encoded), np.int64, len(paths))
        self._offsets = np.concatenate([[0], np.cumsum(lengths)])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        start, stop = self._offsets[i], self._offsets[i + 1]
        return os.fsdecode(self._buffer[start:stop].tobytes())


class _ImageFiles(Dataset):
    """``(index, transformed image)`` for each file, decoded in a worker."""

    def __init__(self, paths: _PathArray, transform: Callable):
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        path = self.paths[i]
        try:
            with Image.open(path) as image:
                image = ImageOps.exif_transpose(image)
                return i, self.transform(image)
        except OSError as e:
            raise ValueError(
                f"Could not read the image {path} ({e}); fix or remove the "
                f"file, or exclude its sample from the view."
            ) from e


def compute_embeddings(
    samples: foc.SampleCollection,
    model: str | EmbeddingModel = DEFAULT_MODEL,
    embeddings_field: str = DEFAULT_EMBEDDINGS_FIELD,
    batch_size: int = 64,
    num_workers: int | None = None,
    skip_existing: bool = True,
    progress: bool | ProgressCallback = True,
    image_size: int | None = None,
    weights: str | None = None,
    write_every: int = DEFAULT_WRITE_EVERY,
) -> int:
    """Computes image embeddings and stores them in a ``VectorField``.

    The raw (unnormalized) float32 features are stored; the index compares
    them by cosine similarity. The field's ``info`` records the model, its
    input size and weights, and a later run with ``skip_existing=True``
    refuses to mix vectors from a different model into the field.

    Every file is checked before anything is written: if an image is
    missing, a ``ValueError`` names it and the dataset is left untouched.

    Args:
        samples: a FiftyOne dataset or view of images
        model ("efficientnet_lite0"): the name of a model from
            :func:`prelabel.models.list_models`, or an
            :class:`prelabel.models.EmbeddingModel` already loaded
        embeddings_field ("embeddings"): the sample field to store the
            vectors in; created as a ``VectorField`` if absent
        batch_size (64): how many images the model sees at once
        num_workers (None): how many processes decode images; ``0``
            decodes in this process. Defaults to ``min(2, os.cpu_count())``
        skip_existing (True): only embed samples whose field is ``None``;
            pass ``False`` to recompute every sample of ``samples``
        progress (True): ``True`` for a progress bar, ``False`` for none,
            or a callable ``progress(fraction, label)`` that receives the
            fraction done in ``[0, 1]`` and a short description, e.g. a
            wrapper of an operator's ``ctx.set_progress``
        image_size (None): the input size of the model in pixels; the
            model's default if ``None``. Ignored when ``model`` is an
            :class:`EmbeddingModel`
        weights (None): a local checkpoint to load instead of the model's
            default weights. Ignored when ``model`` is an
            :class:`EmbeddingModel`
        write_every (1000): how many vectors are held in memory before
            they are written to the database

    Returns:
        the number of samples embedded
    """
    _check_positive("batch_size", batch_size, 64)
    _check_positive("write_every", write_every, DEFAULT_WRITE_EVERY)
    if num_workers is None:
        num_workers = min(2, os.cpu_count() or 1)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int):
        raise ValueError(
            f"num_workers must be a whole number, got {num_workers!r}; pass "
            f"0 to decode images in this process or e.g. num_workers=2."
        )
    if num_workers < 0:
        raise ValueError(
            f"num_workers={num_workers} is negative; pass 0 to decode "
            f"images in this process or a positive number of workers."
        )
    check_image_collection(samples)
    dataset = samples._dataset
    check_embeddings_field(dataset, embeddings_field)

    if isinstance(model, EmbeddingModel):
        emb_model = model
    else:
        check_model_name(model)
        emb_model = load_model(model, image_size=image_size, weights=weights)

    existing = dataset.get_field(embeddings_field)
    if existing is not None and skip_existing:
        _check_compatible(dataset, embeddings_field, existing, emb_model)
        todo = samples.exists(embeddings_field, False)
    else:
        todo = samples

    ids, paths = todo.values(["id", "filepath"])
    total = len(ids)
    if total == 0:
        logger.info("All samples already have %s", embeddings_field)
        return 0
    _check_files_exist(paths)
    paths = _PathArray(paths)

    _declare_field(dataset, embeddings_field, existing, emb_model, total)

    loader = DataLoader(
        _ImageFiles(paths, emb_model.transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    label = f"Embedding images with {emb_model.name}"
    report, close = _make_reporter(progress, total, label)
    done = 0
    pending = {}
    try:
        report(0)
        for indices, batch in loader:
            vectors = emb_model.embed(batch)
            for i, vector in zip(indices.tolist(), vectors, strict=True):
                pending[ids[i]] = vector
            if len(pending) >= write_every:
                dataset.set_values(embeddings_field, pending, key_field="id")
                pending = {}
            done += len(indices)
            if done < total:
                report(done)
        if pending:
            dataset.set_values(embeddings_field, pending, key_field="id")
        report(total)
    finally:
        close()

    logger.info(
        "Embedded %d samples with %s into %s",
        total,
        emb_model.name,
        embeddings_field,
    )
    return total


def _check_positive(name: str, value: int, example: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{name} must be a positive whole number, got {value!r}; pass "
            f"e.g. {name}={example}."
        )


def check_image_collection(samples: foc.SampleCollection) -> None:
    """Raises a ``ValueError`` unless ``samples`` holds whole images.

    Args:
        samples: a FiftyOne dataset or view
    """
    media_type = samples.media_type
    if media_type == "group":
        raise ValueError(
            "Embeddings are computed on images, but this is a grouped "
            "collection; pass samples.select_group_slices(media_type="
            "'image') instead."
        )
    if media_type != "image":
        raise ValueError(
            f"Embeddings are computed on images, but this collection holds "
            f"{media_type} samples; pass a dataset or view of images."
        )
    if samples._is_patches:
        # a patch's filepath is its whole image: the vectors would be wrong
        raise ValueError(
            "Embeddings are computed on whole images, not object patches; "
            "pass the dataset (or a view of it) the patches came from."
        )


def check_embeddings_field(dataset: fo.Dataset, field_name: str) -> None:
    """Raises a ``ValueError`` unless ``field_name`` can hold embeddings.

    It must be a plain top-level name that is not a built-in field and
    either absent or already a ``VectorField``.

    Args:
        dataset: the dataset the field belongs to
        field_name: the proposed embeddings field
    """
    if not isinstance(field_name, str) or not field_name:
        raise ValueError(
            f"embeddings_field must be a non-empty field name, got "
            f"{field_name!r}; pass e.g. embeddings_field='embeddings'."
        )
    if "." in field_name or field_name.startswith(("_", "$")):
        raise ValueError(
            f"embeddings_field={field_name!r} is not a plain top-level field "
            f"name; use letters, digits and underscores, e.g. 'embeddings'."
        )
    reserved = RESERVED_FIELDS | set(dataset._get_default_sample_fields())
    if field_name in reserved:
        raise ValueError(
            f"embeddings_field={field_name!r} is a built-in FiftyOne field; "
            f"choose another name, e.g. embeddings_field='embeddings'."
        )
    field = dataset.get_field(field_name)
    if field is not None and not isinstance(field, fo.VectorField):
        kind = type(field).__name__
        document_type = getattr(field, "document_type", None)
        if document_type is not None:
            kind = f"{document_type.__name__} field"
        raise ValueError(
            f"embeddings_field={field_name!r} is an existing {kind} of this "
            f"dataset, not a VectorField; choose another name, e.g. "
            f"embeddings_field='embeddings', so it is not overwritten."
        )


def _check_compatible(
    dataset: fo.Dataset,
    field_name: str,
    field: fo.VectorField,
    model: EmbeddingModel,
) -> None:
    """Refuses to add vectors of one model to a field holding another's."""
    recorded = dict(field.info or {})
    if recorded.get("model") is not None and not _same_source(
        recorded, model.info
    ):
        raise ValueError(
            f"{field_name!r} holds embeddings from {_describe(recorded)}, "
            f"not {_describe(model.info)}; pass skip_existing=False to "
            f"recompute them all or choose another embeddings_field."
        )
    sample = dataset.exists(field_name).limit(1).values(field_name)
    if sample and len(sample[0]) != model.dim:
        raise ValueError(
            f"{field_name!r} holds {len(sample[0])}-d vectors but "
            f"{model.name} makes {model.dim}-d ones; pass "
            f"skip_existing=False to recompute them all or choose another "
            f"embeddings_field."
        )


def _same_source(a: dict, b: dict) -> bool:
    """Whether two field infos describe the same model and weights file.

    Weights are compared by file name, so a moved or reinstalled
    environment still matches.
    """

    def key(info: dict) -> tuple:
        weights = info.get("weights") or ""
        return (
            info.get("model"),
            info.get("dim"),
            info.get("image_size"),
            os.path.basename(weights),
        )

    return key(a) == key(b)


def _describe(info: dict) -> str:
    weights = info.get("weights")
    source = os.path.basename(weights) if weights else "?"
    return f"{info.get('model')} at {info.get('image_size')} px ({source})"


def _check_files_exist(paths: list[str]) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(
            f"{len(missing)} of the {len(paths)} images to embed are missing "
            f"({shown}{more}); restore the files or exclude their samples "
            f"from the view. Nothing was written."
        )


def _declare_field(
    dataset: fo.Dataset,
    field_name: str,
    field: fo.VectorField | None,
    model: EmbeddingModel,
    total: int,
) -> None:
    if field is None:
        dataset.add_sample_field(field_name, fo.VectorField, info=model.info)
        return
    recorded = dict(field.info or {})
    if recorded == model.info:
        return
    if recorded.get("model") is None or _same_source(recorded, model.info):
        field.info = model.info
        field.save()
        return
    others = dataset.exists(field_name).count()
    if others > total:
        logger.warning(
            "%d samples outside this run keep %r vectors from %s; "
            "recompute them with %s before indexing the whole dataset",
            others - total,
            field_name,
            _describe(recorded),
            _describe(model.info),
        )
    field.info = model.info
    field.save()


def _make_reporter(
    progress: bool | ProgressCallback, total: int, label: str
) -> tuple[Callable[[int], None], Callable[[], None]]:
    """``(report(done), close())`` for a callable, a bar or nothing."""
    if callable(progress):

        def report(done: int) -> None:
            progress(done / total, f"{label} ({done:,}/{total:,})")

        return report, lambda: None

    if not progress:
        return (lambda done: None), (lambda: None)

    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=label, unit="img")

    def report(done: int) -> None:
        bar.update(done - bar.n)

    return report, bar.close
