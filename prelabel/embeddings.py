"""Step 1 of the workflow: compute an embedding for every image.

Images are decoded and transformed by a torch ``DataLoader`` in worker
processes while the main process runs the model, and the vectors are
written to a ``VectorField`` of the dataset every ``write_every`` samples,
so memory stays flat however large the dataset is.

Nothing is lost and no field ever mixes two models:

- a new field, or the same model with ``skip_existing=True``, is written in
  place chunk by chunk: an interrupted run resumes where it stopped;
- a recompute (``skip_existing=False``) writes a temporary field and swaps
  it in when every vector is written
  (:func:`prelabel.fields.staged_fields`), so a failure or a kill at any
  instant leaves the old vectors whole;
- an image that cannot be read (missing, empty, truncated, not an image)
  gets no vector and the sample tag ``embedding_failed``; the run goes on
  and counts it (or, with ``skip_failures=False``, fails and names it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import NamedTuple

import fiftyone as fo
import fiftyone.core.collections as foc
import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, default_collate

from prelabel import fields, records, units
from prelabel.constants import DEFAULT_EMBEDDINGS_FIELD, DEFAULT_MODEL
from prelabel.models import (
    EmbeddingModel,
    check_model_name,
    load_model,
    resolve_device,
)
from prelabel.progress import Progress, ProgressArg
from prelabel.slicing import IdRange, split_by_id
from prelabel.validation import (
    RESERVED_FIELDS,
    check_identifier,
    check_positive_int,
)

logger = logging.getLogger(__name__)

#: how many vectors are held in memory before they are written
DEFAULT_WRITE_EVERY = 1000

#: the sample tag of images that could not be read
FAILED_TAG = "embedding_failed"

#: the keys of :attr:`prelabel.models.EmbeddingModel.info`: a field whose
#: info has them all was written by prelabel (before it kept records)
_MODEL_INFO_KEYS = frozenset({"model", "dim", "image_size", "weights"})


class EmbeddingCount(int):
    """The number of samples embedded, and the samples that could not be.

    It is an ``int`` (the number embedded), so ``n == 40`` and ``n + 1``
    work as before; the failures ride along.

    Attributes:
        failures: sample id -> why its image could not be read
    """

    def __new__(cls, num_embedded: int, failures: dict | None = None):
        count = super().__new__(cls, num_embedded)
        count.failures = dict(failures or {})
        return count

    @property
    def num_failed(self) -> int:
        """How many images could not be read (they got no vector)."""
        return len(self.failures)

    @property
    def failed_ids(self) -> list[str]:
        """The ids of the samples whose image could not be read."""
        return list(self.failures)

    def __str__(self) -> str:
        # printed and formatted as the plain number it stands for
        return str(int(self))

    def __repr__(self) -> str:
        return f"EmbeddingCount({int(self)}, num_failed={self.num_failed})"


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
    """``(index, transformed image, None)`` for each file, decoded in a
    worker; ``(index, None, reason)`` for a file that cannot be read.
    With ``boxes`` (relative ``[x, y, w, h]`` per item), the crop of each
    box is transformed instead of the whole image."""

    def __init__(
        self,
        paths: _PathArray,
        transform: Callable,
        boxes: np.ndarray | None = None,
    ):
        self.paths = paths
        self.transform = transform
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple:
        try:
            image = _decode(self.paths[i])
            if self.boxes is not None:
                image = _crop(image, self.boxes[i])
        except Exception as e:  # whatever is wrong with the file or box
            return i, None, _reason(e)
        return i, self.transform(image), None


def _crop(image: Image.Image, box) -> Image.Image:
    """The pixels of a relative ``[x, y, w, h]`` box (at least one)."""
    if not np.all(np.isfinite(box)):
        raise ValueError("the box has no bounding_box")
    w, h = image.size
    x0 = min(max(int(round(box[0] * w)), 0), w - 1)
    y0 = min(max(int(round(box[1] * h)), 0), h - 1)
    x1 = max(min(int(round((box[0] + box[2]) * w)), w), x0 + 1)
    y1 = max(min(int(round((box[1] + box[3]) * h)), h), y0 + 1)
    return image.crop((x0, y0, x1, y1))


def _decode(path: str) -> Image.Image:
    """The whole image, decoded and upright (raises for a bad file)."""
    with Image.open(path) as image:
        # exif_transpose loads every pixel and returns a new image, so a
        # truncated file fails here and the result outlives the file
        return ImageOps.exif_transpose(image)


def _reason(error: Exception) -> str:
    if isinstance(error, FileNotFoundError):
        return "file not found"
    return f"{type(error).__name__}: {error}"


def _collate(items: list[tuple]) -> tuple:
    """``(indices, batch or None, [(index, reason), ...])``."""
    good = [(i, x) for i, x, _ in items if x is not None]
    failed = [(i, reason) for i, x, reason in items if x is None]
    indices = [i for i, _ in good]
    batch = default_collate([x for _, x in good]) if good else None
    return indices, batch, failed


class _Plan(NamedTuple):
    """How a run writes: the samples to embed, and whether it writes in
    place or through a staged field (merged, or replacing it whole)."""

    todo: foc.SampleCollection
    staged: bool
    replace: bool


def compute_embeddings(
    samples: foc.SampleCollection,
    model: str | EmbeddingModel = DEFAULT_MODEL,
    embeddings_field: str = DEFAULT_EMBEDDINGS_FIELD,
    batch_size: int = 64,
    num_workers: int | None = None,
    skip_existing: bool = True,
    progress: ProgressArg = True,
    image_size: int | None = None,
    weights: str | None = None,
    write_every: int = DEFAULT_WRITE_EVERY,
    skip_failures: bool = True,
    overwrite: bool = False,
    patches_field: str | None = None,
    device: str = "auto",
) -> EmbeddingCount:
    """Computes image embeddings and stores them in a ``VectorField``.

    The raw (unnormalized) float32 features are stored; the index compares
    them by cosine similarity. The field's ``info`` (and prelabel's record
    of the field in ``dataset.info``) names the model, its input size and
    weights, and one field never holds the vectors of two models:

    - a new field, or one of the same model with ``skip_existing=True``,
      is written in place, chunk by chunk; a killed run resumes;
    - ``skip_existing=False`` recomputes every sample of ``samples`` into
      a temporary field that replaces the old vectors only when all are
      written: a failure or a kill leaves the old vectors whole. When
      ``samples`` is a view, the field's vectors outside it must come from
      the same model (or pass ``overwrite=True``);
    - a ``VectorField`` that prelabel did not write is refused unless
      ``overwrite=True``, which recomputes every sample of ``samples`` and
      replaces the field whole (samples outside ``samples`` lose theirs).

    Images that cannot be read (missing, empty, truncated, not an image)
    get no vector (``None``) and the sample tag ``embedding_failed``, and
    are counted in the result; samples embedded in this run lose that
    tag. With ``skip_failures=False`` such an image fails the run instead.

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
        skip_failures (True): skip (tag and count) images that cannot be
            read; ``False`` raises a ``ValueError`` naming them instead
            (missing files before anything is embedded; a recompute then
            writes nothing)
        overwrite (False): allow replacing a ``VectorField`` prelabel did
            not write, or the vectors of another model outside ``samples``
        patches_field (None): embed the crop of each box of this
            ``Detections`` field instead of the whole image, into the
            attribute ``embeddings_field`` of each box (FiftyOne's own
            layout for patch embeddings, which ``sync_index(...,
            patches_field=...)`` and ``compute_similarity`` read). Written
            in place, box by box, and resumed by a new run; an attribute
            holding another model's vectors (or vectors prelabel did not
            write) is refused: choose another ``embeddings_field``
        device ("auto"): where the model runs: ``"auto"`` (a CUDA GPU when
            torch sees one, else the CPU), ``"cpu"``, ``"cuda"`` or
            ``"cuda:N"``. On a GPU, half precision is used when the first
            batch shows it keeps every vector within 1e-3 cosine of
            float32 (:data:`prelabel.models.HALF_TOLERANCE`); a model
            given as an :class:`EmbeddingModel` is moved there

    Returns:
        an :class:`EmbeddingCount`: an ``int``, the number of samples
        embedded, with ``num_failed``, ``failed_ids`` and ``failures``
        (sample id -> reason) for the images that could not be read

    Raises:
        ValueError: bad input, a field that may not be written, or (with
            ``skip_failures=False``) images that cannot be read
        prelabel.fields.FieldBusyError: another live process is writing
            ``embeddings_field``
    """
    num_workers = _check_args(
        batch_size,
        write_every,
        num_workers,
        skip_existing=skip_existing,
        skip_failures=skip_failures,
        overwrite=overwrite,
    )
    check_image_collection(samples)
    device = resolve_device(device)
    dataset = samples._dataset
    if patches_field is None:
        check_embeddings_output(dataset, embeddings_field)
    else:
        check_identifier(embeddings_field, "embeddings_field")
        units.check_patches_field(samples, patches_field)
    emb_model = _ready_model(model, image_size, weights, device)
    if patches_field is not None:
        return _embed_boxes(
            samples,
            units.Patches(patches_field),
            embeddings_field,
            emb_model,
            skip_existing,
            skip_failures,
            dict(
                batch_size=batch_size,
                num_workers=num_workers,
                write_every=write_every,
                progress=progress,
            ),
        )

    plan = _plan(
        samples, embeddings_field, emb_model, skip_existing, overwrite
    )
    ids, paths = plan.todo.values(["id", "filepath"])
    if not ids:
        logger.info("All samples already have %s", embeddings_field)
        return EmbeddingCount(0)
    if not skip_failures:
        _check_files_exist(paths)
    tagged = set(plan.todo.match_tags(FAILED_TAG).values("id"))

    def job(write_field: str) -> dict:
        failures = _embed(
            _loader(paths, emb_model, batch_size, num_workers),
            ids,
            emb_model,
            lambda vectors: dataset.set_values(
                write_field, vectors, key_field="id"
            ),
            write_every,
            progress,
        )
        if failures and not skip_failures:
            _raise_failures(failures, len(ids), plan.staged)
        return failures

    if plan.staged:
        failures = _run_staged(dataset, embeddings_field, emb_model, plan, job)
    else:
        failures = _run_direct(dataset, embeddings_field, emb_model, job)
    _update_tags(dataset, failures, tagged)
    return _counted(len(ids), failures, emb_model, embeddings_field)


def plan_embedding_runs(
    samples: foc.SampleCollection,
    num_runs: int,
    model: str | EmbeddingModel = DEFAULT_MODEL,
    embeddings_field: str = DEFAULT_EMBEDDINGS_FIELD,
    image_size: int | None = None,
    weights: str | None = None,
    overwrite: bool = False,
    patches_field: str | None = None,
) -> list[IdRange]:
    """Splits the embedding of ``samples`` between ``num_runs`` processes
    that run at once: FiftyOne delegated workers, on one machine or many.

    The field (or box attribute) is created and recorded as ``model``'s
    here, so the runs never race to create it, and the samples that still
    lack a vector are split into slices of sample ids that do not overlap.
    Each slice is then embedded by its own process with::

        compute_embeddings(
            run.of(samples), model, embeddings_field, skip_existing=True
        )

    which writes its samples in place, as a resumed run does. A run that
    dies leaves its slice partly written and every other slice whole;
    rerun it, or plan again, and only what is missing is embedded. The
    ``compute_embeddings`` operator does all of this with ``num_runs``.

    Args:
        samples: a FiftyOne dataset or view of images
        num_runs: how many processes will embed at once (at least 1)
        model ("efficientnet_lite0"): the model every run will use
        embeddings_field ("embeddings"): the vector field to write
        image_size (None): the model's input size; its default if None
        weights (None): a local checkpoint, as in
            :func:`compute_embeddings`
        overwrite (False): as in :func:`compute_embeddings`
        patches_field (None): split the boxes of this ``Detections``
            field instead (by the sample that holds them)

    Returns:
        at most ``num_runs`` :class:`prelabel.slicing.IdRange` of nearly
        equal size, in id order; empty when every sample has a vector

    Raises:
        ValueError: bad input, or a field that can only be replaced whole
            (a ``VectorField`` prelabel did not write), which one run must
            do: ``compute_embeddings(..., overwrite=True)``
    """
    check_positive_int(num_runs, "num_runs")
    check_image_collection(samples)
    dataset = samples._dataset
    if patches_field is not None:
        check_identifier(embeddings_field, "embeddings_field")
        units.check_patches_field(samples, patches_field)
        emb_model = _ready_model(model, image_size, weights, "cpu")
        boxes = units.Patches(patches_field)
        rows = _box_rows(samples, boxes, embeddings_field, emb_model, True)
        ids = sorted({r[1] for r in rows})
        if ids:
            _declare_field(
                dataset,
                boxes.path(samples, embeddings_field),
                emb_model,
                boxes.record_name(embeddings_field),
            )
        return split_by_id(ids, num_runs)
    check_embeddings_output(dataset, embeddings_field)
    emb_model = _ready_model(model, image_size, weights, "cpu")
    plan = _plan(samples, embeddings_field, emb_model, True, overwrite)
    if plan.staged:
        raise ValueError(
            f"embeddings_field={embeddings_field!r} holds vectors "
            f"prelabel did not write; replacing them is one write of the "
            f"whole field, which runs split between workers cannot share. "
            f"Choose another embeddings_field, or run it as one job "
            f"(num_runs=1) with overwrite=True"
        )
    ids = plan.todo.values("id")
    if ids:
        _declare_field(dataset, embeddings_field, emb_model)
    return split_by_id(ids, num_runs)


def _loader(paths, model, batch_size, num_workers, boxes=None) -> DataLoader:
    """Batches of the images (or of the crops of ``boxes``) decoded in
    ``num_workers`` processes, pinned for a GPU."""
    return DataLoader(
        _ImageFiles(_PathArray(paths), model.transform, boxes),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=model.device != "cpu",
    )


def _counted(total, failures, model, field) -> EmbeddingCount:
    """Logs a run's outcome and returns its :class:`EmbeddingCount`."""
    embedded = total - len(failures)
    _log_result(embedded, failures, model, field)
    return EmbeddingCount(
        embedded, {i: reason for i, (_, reason) in failures.items()}
    )


def _ready_model(model, image_size, weights, device: str) -> EmbeddingModel:
    """The model (a name, loaded here, or a loaded model) on ``device``."""
    if not isinstance(model, EmbeddingModel):
        check_model_name(model)
        model = load_model(model, image_size=image_size, weights=weights)
    return model.to(device)


def _check_args(
    batch_size: int,
    write_every: int,
    num_workers: int | None,
    **flags: bool,
) -> int:
    """Checks the plain arguments (``flags``: the True/False ones);
    returns the number of workers."""
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
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(
                f"{name} must be True or False, got {value!r}; pass e.g. "
                f"{name}=True."
            )
    return num_workers


def _check_positive(name: str, value: int, example: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{name} must be a positive whole number, got {value!r}; pass "
            f"e.g. {name}={example}."
        )


def _plan(
    samples: foc.SampleCollection,
    field_name: str,
    model: EmbeddingModel,
    skip_existing: bool,
    overwrite: bool,
) -> _Plan:
    """Decides what to embed and how to write it, refusing any write that
    would lose vectors someone else wrote or mix two models in a field."""
    dataset = samples._dataset
    # a write that a dead process left half done is finished or undone
    # first, so that the field is seen as it will stay
    fields.recover(dataset)
    if records.get(dataset, records.PENDING, field_name) is not None:
        raise fields._busy(dataset, field_name)
    existing = dataset.get_field(field_name)
    if existing is None:
        return _Plan(samples, staged=False, replace=False)
    if not _is_ours(dataset, field_name, existing):
        fields.check_output_field(
            samples,
            field_name,
            "embeddings_field",
            records.EMBEDDINGS,
            overwrite=overwrite,
        )
        return _Plan(samples, staged=True, replace=True)
    if skip_existing:
        _check_compatible(dataset, field_name, existing, model)
        return _Plan(samples.exists(field_name, False), False, False)
    outside = _other_model_outside(samples, field_name, existing, model)
    if outside and not overwrite:
        recorded = _recorded_info(dataset, field_name, existing)
        raise ValueError(
            f"embeddings_field={field_name!r} holds vectors from "
            f"{_describe(recorded)} on {outside} samples outside these "
            f"samples; recomputing only these with {_describe(model.info)} "
            f"would mix two models in one field. Recompute the whole "
            f"dataset, choose another embeddings_field, or pass "
            f"overwrite=True to drop the vectors outside these samples."
        )
    return _Plan(samples, staged=True, replace=bool(outside))


def _is_ours(dataset: fo.Dataset, field_name: str, field) -> bool:
    """Whether prelabel's compute_embeddings wrote the field: its record
    says so, or (written before records were kept) its info describes a
    prelabel model."""
    owner = records.writer_of(dataset, field_name)
    if owner is not None:
        return owner == records.EMBEDDINGS
    info = field.info or {}
    return isinstance(info, dict) and _MODEL_INFO_KEYS <= set(info)


def _recorded_info(dataset: fo.Dataset, field_name: str, field) -> dict:
    """The model description of a field prelabel wrote ({} if none)."""
    info = dict(field.info or {})
    if info.get("model") is not None:
        return info
    return dict(records.get(dataset, records.EMBEDDINGS, field_name) or {})


def _other_model_outside(
    samples: foc.SampleCollection,
    field_name: str,
    field,
    model: EmbeddingModel,
) -> int:
    """How many samples outside ``samples`` hold vectors of another model
    than ``model`` (0 when the field holds ``model``'s vectors)."""
    dataset = samples._dataset
    recorded = _recorded_info(dataset, field_name, field)
    same = bool(recorded) and _same_source(recorded, model.info)
    first = dataset.exists(field_name).limit(1).values(field_name)
    if first and len(first[0]) != model.dim:
        same = False
    if same:
        return 0
    inside = samples.exists(field_name).count()
    return dataset.exists(field_name).count() - inside


def _run_direct(
    dataset: fo.Dataset,
    field_name: str,
    model: EmbeddingModel,
    job: Callable[[str], dict],
) -> dict:
    """Writes the vectors into the field itself (new, or same model)."""
    _declare_field(dataset, field_name, model)
    failures = job(field_name)
    records.put(dataset, records.EMBEDDINGS, field_name, model.info)
    return failures


def _declare_field(
    dataset: fo.Dataset,
    path: str,
    model: EmbeddingModel,
    record_name: str | None = None,
) -> None:
    """Creates the vector field (or box attribute) ``path`` written in
    place, and records it as ``model``'s before any vector is written, so
    that the field of a killed run is known as ours."""
    field = dataset.get_field(path)
    if field is None:
        dataset.add_sample_field(path, fo.VectorField, info=model.info)
    elif dict(field.info or {}) != model.info:
        field.info = model.info
        field.save()
    records.put(dataset, records.EMBEDDINGS, record_name or path, model.info)


def _box_rows(
    samples, boxes: units.Patches, attr: str, model, skip_existing: bool
) -> list[tuple]:
    """The boxes of ``samples`` to embed into ``attr`` (those without a
    vector, with ``skip_existing``), after refusing an attribute that
    holds another model's vectors or values prelabel did not write."""
    dataset = samples._dataset
    path = boxes.path(samples, attr)
    fields.recover(dataset)
    existing = dataset.get_field(path)
    if existing is not None:
        name = boxes.record_name(attr)
        recorded = records.get(dataset, records.EMBEDDINGS, name) or {}
        if not isinstance(existing, fo.VectorField) or not _same_source(
            recorded, model.info
        ):
            what = (
                f"vectors of {_describe(recorded)}"
                if recorded
                else "values prelabel did not write"
            )
            raise ValueError(
                f"embeddings_field={attr!r}: the boxes' {path!r} holds "
                f"{what}; choose another embeddings_field for "
                f"{_describe(model.info)} (nothing was written)"
            )
    rows = boxes.rows(samples, [attr])
    if skip_existing:
        rows = [r for r in rows if r[3] is None]
    return rows


def _run_staged(
    dataset: fo.Dataset,
    field_name: str,
    model: EmbeddingModel,
    plan: _Plan,
    job: Callable[[str], dict],
) -> dict:
    """Writes the vectors aside; they replace the old ones only when every
    one is written (merged, or replacing the field whole)."""
    spec = {field_name: (fo.VectorField, {"info": model.info})}
    with fields.staged_fields(dataset, spec, replace=plan.replace) as staging:
        failures = job(staging[field_name])
        staging.record(records.EMBEDDINGS, field_name, model.info)
    return failures


def _embed(
    loader: DataLoader,
    ids: list[str],
    model: EmbeddingModel,
    write: Callable[[dict], None],
    write_every: int,
    progress: ProgressArg,
) -> dict[str, tuple[str, str]]:
    """Embeds every image (or box) of ``loader``, handing ``write`` the
    vectors by id a chunk at a time; an image that cannot be read gets
    ``None``.

    Returns:
        id -> ``(filepath, reason)`` for the images not read
    """
    total = len(ids)
    paths = loader.dataset.paths
    what = "boxes" if loader.dataset.boxes is not None else "images"
    label = f"Embedding {what} with {model.name}"
    pending = {}
    failures = {}
    with Progress(progress, total, label, unit="img") as bar:
        for indices, batch, failed in loader:
            if batch is not None:
                vectors = model.embed(batch)
                for i, vector in zip(indices, vectors, strict=True):
                    pending[ids[i]] = vector
            for i, reason in failed:
                pending[ids[i]] = None
                failures[ids[i]] = (paths[i], reason)
            if len(pending) >= write_every:
                write(pending)
                pending = {}
            bar.update(len(indices) + len(failed))
        if pending:
            write(pending)
    return failures


def _embed_boxes(
    samples,
    boxes: units.Patches,
    attr: str,
    model,
    skip_existing,
    skip_failures,
    opts: dict,
) -> EmbeddingCount:
    """:func:`compute_embeddings` of the crops of ``boxes``, written into
    the attribute ``attr`` of each box, in place."""
    dataset = samples._dataset
    path = boxes.path(samples, attr)
    rows = _box_rows(samples, boxes, attr, model, skip_existing)
    if not rows:
        logger.info("All boxes already have %s", path)
        return EmbeddingCount(0)
    filepath = dict(zip(*samples.values(["id", "filepath"]), strict=True))
    paths = [filepath[r[1]] for r in rows]
    if not skip_failures:
        _check_files_exist(sorted(set(paths)))
    _declare_field(dataset, path, model, boxes.record_name(attr))
    boxes = np.array(
        [r[2] if r[2] else [np.nan] * 4 for r in rows], dtype=np.float64
    )
    failures = _embed(
        _loader(paths, model, opts["batch_size"], opts["num_workers"], boxes),
        [r[0] for r in rows],
        model,
        lambda vectors: dataset.set_label_values(path, vectors),
        opts["write_every"],
        opts["progress"],
    )
    if failures and not skip_failures:
        _raise_failures(failures, len(rows), staged=False)
    parent = {r[0]: r[1] for r in rows}
    tagged = set(samples.match_tags(FAILED_TAG).values("id"))
    failed_samples = {parent[i]: f for i, f in failures.items()}
    _update_tags(dataset, failed_samples, tagged & {r[1] for r in rows})
    return _counted(len(rows), failures, model, path)


def _raise_failures(failures: dict, total: int, staged: bool) -> None:
    shown = "; ".join(
        f"{path} ({reason})" for path, reason in list(failures.values())[:3]
    )
    more = f" and {len(failures) - 3} more" if len(failures) > 3 else ""
    written = (
        "Nothing was written."
        if staged
        else "The images that could be read were embedded."
    )
    raise ValueError(
        f"{len(failures)} of the {total} images to embed could not be read: "
        f"{shown}{more}. Fix or remove these files (or exclude their "
        f"samples from the view), or pass skip_failures=True to skip them "
        f"and tag their samples {FAILED_TAG!r}. {written}"
    )


def _update_tags(
    dataset: fo.Dataset, failures: dict, tagged: set[str]
) -> None:
    """Tags the samples whose image failed; untags the ones embedded now
    (``tagged``: the samples of the run that had the tag before)."""
    if failures:
        dataset.select(list(failures)).tag_samples(FAILED_TAG)
    fixed = [i for i in tagged if i not in failures]
    if fixed:
        dataset.select(fixed).untag_samples(FAILED_TAG)


def _log_result(
    embedded: int, failures: dict, model: EmbeddingModel, field_name: str
) -> None:
    logger.info(
        "Embedded %d samples with %s into %s",
        embedded,
        model.name,
        field_name,
    )
    if failures:
        path, reason = next(iter(failures.values()))
        logger.warning(
            "%d images could not be read and have no %r vector; their "
            "samples are tagged %r (first: %s: %s)",
            len(failures),
            field_name,
            FAILED_TAG,
            path,
            reason,
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


def check_embeddings_output(dataset: fo.Dataset, field_name: str) -> None:
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
    if (
        "." in field_name
        or field_name.startswith(("_", "$"))
        or not field_name.isidentifier()
    ):
        raise ValueError(
            f"embeddings_field={field_name!r} is not a plain top-level field "
            f"name; use letters, digits and underscores, e.g. 'embeddings'."
        )
    reserved = RESERVED_FIELDS | set(dataset._get_default_sample_fields())
    if field_name in reserved or field_name.startswith(fields.TMP_PREFIX):
        raise ValueError(
            f"embeddings_field={field_name!r} is a built-in FiftyOne field "
            f"or one prelabel reserves; choose another name, e.g. "
            f"embeddings_field='embeddings'."
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
    recorded = _recorded_info(dataset, field_name, field)
    if recorded.get("model") is not None and not _same_source(
        recorded, model.info
    ):
        raise ValueError(
            f"embeddings_field={field_name!r} holds embeddings from "
            f"{_describe(recorded)}, not {_describe(model.info)}; pass "
            f"skip_existing=False to recompute them all (in one job) or "
            f"choose another embeddings_field."
        )
    sample = dataset.exists(field_name).limit(1).values(field_name)
    if sample and len(sample[0]) != model.dim:
        raise ValueError(
            f"embeddings_field={field_name!r} holds {len(sample[0])}-d "
            f"vectors but {model.name} makes {model.dim}-d ones; pass "
            f"skip_existing=False to recompute them all (in one job) or "
            f"choose another embeddings_field."
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
    if not info.get("model"):
        return "an unknown model"
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
            f"from the view, or pass skip_failures=True to skip them. "
            f"Nothing was written."
        )
