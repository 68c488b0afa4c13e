"""Embeddings adapted to the user's labels.

Frozen image features (ImageNet models) put two digits of the same class
further apart than a neighbor vote would like. This module learns, from the
labeled references only, a small projection of the frozen embeddings whose
cosine neighbors agree with the labels, writes the projected vectors as
another embeddings field (to be indexed like any other), and keeps what it
learned in a file so that pre-annotation can use it again.

The recipe (the defaults; each step is a standard one, none is fitted to a
particular dataset):

1. features: signed square root (the Hellinger map, which tames the bursty
   ReLU activations of CNN features), L2 normalization, centering and a
   PCA rotation to at most 256 dimensions. All of this is unsupervised and
   is fitted on every sample given (references and targets alike): it
   never reads a label.
2. heads: K = 5 small networks (256 -> 512 ReLU, dropout 0.5 -> 64,
   normalized) trained with a cosine softmax (scale 16, label smoothing
   0.1) on the references, each on the references outside one fold
   ("cross-fitting"). A reference is thus scored by a head that never saw
   its label, which gives honest scores for calibration and label-error
   ranking.
3. output: the K heads' normalized outputs side by side (scaled by
   1/sqrt(K)), so the cosine similarity of two adapted vectors is the mean
   of the K heads' cosine similarities: kNN on the adapted field is kNN of
   an ensemble. Each head's class prototypes are kept, so the ensemble's
   class probabilities can be read off an adapted vector alone.

Targets' labels are never read: only the references' labels train the
heads, and the unsupervised step uses vectors only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from prelabel import constants, records, validation
from prelabel.fields import check_output_field, staged_fields
from prelabel.progress import Progress, ProgressArg

logger = logging.getLogger(__name__)

#: where the adapters of a dataset are recorded in ``dataset.info``
INFO_KEY = records.ADAPTERS


def _signed_sqrt_l2(X: np.ndarray) -> np.ndarray:
    A = np.asarray(X, dtype=np.float32)
    A = np.sign(A) * np.sqrt(np.abs(A))
    norms = np.linalg.norm(A, axis=1, keepdims=True)
    return A / np.where(norms > 0, norms, 1.0)


def _normalize(A: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(A, axis=-1, keepdims=True)
    return A / np.where(norms > 0, norms, 1.0)


def fit_features(
    X: np.ndarray, dim: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """The unsupervised feature map (signed sqrt, L2, centering, PCA
    rotation), fitted on ``X``.

    Returns:
        ``(mean, basis)``: ``features(X) = (prep(X) - mean) @ basis``,
        scaled so that features have unit mean squared norm
    """
    A = _signed_sqrt_l2(X)
    mean = A.mean(axis=0, dtype=np.float64).astype(np.float32)
    A = A - mean
    d = int(min(dim, A.shape[0] - 1, A.shape[1]))
    if d < 1:
        raise ValueError("need at least 2 embeddings to fit the features")
    # the covariance's eigenvectors: cheap for D up to a few thousand
    cov = (A.T @ A).astype(np.float64) / A.shape[0]
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1][:d]
    basis = vecs[:, order]
    total = max(float(vals[order].sum()), 1e-12)
    return mean, (basis / np.sqrt(total)).astype(np.float32)


def stratified_folds(y: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """A fold index per sample: each class is spread evenly over the folds
    (a class with fewer members than folds leaves some folds without it)."""
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    out = np.empty(len(y), dtype=np.int64)
    offset = 0
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        out[idx] = (np.arange(len(idx)) + offset) % folds
        offset += len(idx)
    return out


@dataclass
class Head:
    """One trained head, as numpy arrays (inference needs no torch)."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    prototypes: np.ndarray

    def embed(self, Z: np.ndarray) -> np.ndarray:
        h = np.maximum(Z @ self.w1 + self.b1, 0.0)
        return _normalize(h @ self.w2 + self.b2)


def train_head(
    Z: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    hidden: int = 512,
    out_dim: int = 64,
    scale: float = 16.0,
    label_smoothing: float = 0.1,
    dropout: float = 0.5,
    weight_decay: float = 1e-4,
    lr: float = 3e-3,
    batch_size: int = 128,
    epochs: int = 15,
    min_steps: int = 300,
    max_steps: int = 1500,
    seed: int = 0,
) -> Head:
    """Trains one head (features -> hidden ReLU -> normalized ``out_dim``,
    cosine softmax over class prototypes) on ``(Z, y)``.

    The number of steps is ``epochs`` passes over the data, at least
    ``min_steps`` (small reference sets still converge) and at most
    ``max_steps`` (large ones stay fast).
    """
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    # the matrices are small: threads only add synchronization (measured
    # 4x slower with 2 threads than with 1 on 2 cores)
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    try:
        X = torch.as_tensor(np.asarray(Z, dtype=np.float32))
        t = torch.as_tensor(np.asarray(y, dtype=np.int64))
        net = torch.nn.Sequential(
            torch.nn.Linear(X.shape[1], hidden),
            torch.nn.ReLU(),
            torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden, out_dim),
        )
        protos = torch.nn.Parameter(
            0.1 * torch.randn(num_classes, out_dim, generator=gen)
        )
        opt = torch.optim.AdamW(
            list(net.parameters()) + [protos],
            lr=lr,
            weight_decay=weight_decay,
        )
        steps = int(np.ceil(len(X) / batch_size)) * epochs
        steps = int(np.clip(steps, min_steps, max_steps))
        bs = min(batch_size, len(X))
        net.train()
        for _ in range(steps):
            i = torch.randint(len(X), (bs,), generator=gen)
            z = F.normalize(net(X[i]), dim=1)
            logits = scale * z @ F.normalize(protos, dim=1).T
            loss = F.cross_entropy(
                logits, t[i], label_smoothing=label_smoothing
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        lin1, lin2 = net[0], net[3]
        return Head(
            w1=lin1.weight.detach().numpy().T.astype(np.float32),
            b1=lin1.bias.detach().numpy().astype(np.float32),
            w2=lin2.weight.detach().numpy().T.astype(np.float32),
            b2=lin2.bias.detach().numpy().astype(np.float32),
            prototypes=_normalize(protos.detach().numpy().astype(np.float32)),
        )
    finally:
        torch.random.set_rng_state(torch_state)
        torch.set_num_threads(threads)


@dataclass
class Adapter:
    """A learned projection of frozen embeddings (see the module doc).

    Attributes:
        mean, basis: the unsupervised feature map
        heads: the K cross-fitted :class:`Head` s
        classes: the class names, in the order of the probabilities
        scale: the cosine softmax scale
        reference_ids: the sample ids of the references it was trained on
        folds: the fold of each reference (its head never saw its label)
        info: what it was fitted from (fields, sizes, timings)
    """

    mean: np.ndarray
    basis: np.ndarray
    heads: list[Head]
    classes: list[str]
    scale: float = 16.0
    reference_ids: list[str] = field(default_factory=list)
    folds: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    info: dict = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    @property
    def head_dim(self) -> int:
        return int(self.heads[0].w2.shape[1])

    @property
    def dim(self) -> int:
        """The length of an adapted vector."""
        return self.num_heads * self.head_dim

    def features(self, X: np.ndarray) -> np.ndarray:
        """The unsupervised features of raw embeddings ``X``."""
        return (_signed_sqrt_l2(X) - self.mean) @ self.basis

    def transform(self, X: np.ndarray, batch_size: int = 10000) -> np.ndarray:
        """The adapted vectors (float32, ``(n, dim)``) of raw embeddings."""
        X = np.asarray(X)
        out = np.empty((len(X), self.dim), dtype=np.float32)
        for a in range(0, len(X), batch_size):
            Z = self.features(X[a : a + batch_size])
            parts = [h.embed(Z) for h in self.heads]
            out[a : a + batch_size] = np.concatenate(parts, axis=1) / np.sqrt(
                self.num_heads
            )
        return out

    def head_vectors(self, X: np.ndarray, head: int) -> np.ndarray:
        """One head's normalized output for raw embeddings ``X``."""
        return self.heads[head].embed(self.features(X))

    def proba(self, adapted: np.ndarray) -> np.ndarray:
        """The ensemble's class probabilities, read off adapted vectors:
        the softmax of the K heads' mean logits. Pooling logits (not
        probabilities) keeps the ensemble's confidence on the scale of one
        head's, so a threshold estimated from single cross-fitted heads on
        the references transfers to the ensemble on the targets."""
        V = np.asarray(adapted, dtype=np.float64)
        m = self.head_dim
        logits = np.zeros((len(V), len(self.classes)))
        for j, h in enumerate(self.heads):
            z = _normalize(V[:, j * m : (j + 1) * m])
            logits += self.scale * z @ h.prototypes.T
        return _softmax(logits / self.num_heads)

    def head_proba(self, head_vectors: np.ndarray, head: int) -> np.ndarray:
        """One head's class probabilities of its own normalized outputs."""
        return _softmax(
            self.scale * head_vectors @ self.heads[head].prototypes.T
        )

    def fold_of(self, sample_ids: Sequence[str]) -> np.ndarray:
        """The fold of each sample (-1: never a training reference)."""
        # no ids: an adapter fitted from arrays, every sample is "unseen"
        pos = dict(zip(self.reference_ids, self.folds.tolist(), strict=False))
        return np.array([pos.get(s, -1) for s in sample_ids], dtype=np.int64)

    def save(self, path: str) -> None:
        """Writes the adapter to ``path`` (an ``.npz`` file), atomically."""
        arrays = {"mean": self.mean, "basis": self.basis}
        for j, h in enumerate(self.heads):
            for name in ("w1", "b1", "w2", "b2", "prototypes"):
                arrays[f"h{j}_{name}"] = getattr(h, name)
        arrays["folds"] = np.asarray(self.folds, dtype=np.int64)
        meta = {
            "classes": list(self.classes),
            "scale": self.scale,
            "num_heads": self.num_heads,
            "reference_ids": list(self.reference_ids),
            "info": self.info,
        }
        arrays["meta"] = np.frombuffer(
            json.dumps(meta).encode(), dtype=np.uint8
        )
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}.npz"
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str) -> Adapter:
        """Reads an adapter written by :meth:`save`."""
        if not os.path.isfile(path):
            raise ValueError(
                f"the adapter file {path} is missing; run "
                "prelabel.adapt_embeddings again"
            )
        with np.load(path) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            heads = [
                Head(
                    **{
                        name: z[f"h{j}_{name}"]
                        for name in ("w1", "b1", "w2", "b2", "prototypes")
                    }
                )
                for j in range(meta["num_heads"])
            ]
            return cls(
                mean=z["mean"],
                basis=z["basis"],
                heads=heads,
                classes=meta["classes"],
                scale=meta["scale"],
                reference_ids=meta["reference_ids"],
                folds=z["folds"],
                info=meta.get("info", {}),
            )


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def fit_adapter(
    X_ref: np.ndarray,
    y_ref: Sequence[str],
    X_unlabeled: np.ndarray | None = None,
    reference_ids: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    folds: int = 5,
    dim: int = 256,
    hidden: int = 512,
    out_dim: int = 64,
    seed: int = 0,
    progress: ProgressArg = None,
    **train_kwargs,
) -> Adapter:
    """Learns an :class:`Adapter` from labeled references.

    Args:
        X_ref: raw embeddings of the references ``(n, D)``
        y_ref: their labels
        X_unlabeled (None): other embeddings (e.g. the targets): used only
            by the unsupervised feature map, never with a label
        reference_ids (None): the references' sample ids, so that later
            scores of a reference use the head that never saw it
        classes (None): the class order; default the sorted labels
        folds (5): heads, each trained without one fold of the references
        dim (256): at most this many PCA dimensions
        hidden (512), out_dim (64): the head's sizes
        seed (0): seeds the folds and the training
        progress (None): a bar, nothing, or ``progress(fraction, label)``
        **train_kwargs: other :func:`train_head` parameters

    Returns:
        an :class:`Adapter`
    """
    X_ref = np.asarray(X_ref)
    y_ref = [str(v) for v in y_ref]
    if classes is None:
        classes = sorted(set(y_ref))
    classes = list(classes)
    lookup = {c: i for i, c in enumerate(classes)}
    y = np.array([lookup[v] for v in y_ref], dtype=np.int64)
    if len(set(y.tolist())) < 2:
        raise ValueError(
            "the references hold fewer than 2 classes; label samples of at "
            "least two classes before adapting embeddings"
        )
    if len(y) < 2 * folds:
        folds = max(2, len(y) // 2)
    if len(y) < 4:
        raise ValueError(
            f"only {len(y)} references; label at least 4 samples before "
            "adapting embeddings"
        )
    t0 = time.perf_counter()
    X_fit = X_ref if X_unlabeled is None else np.vstack([X_ref, X_unlabeled])
    mean, basis = fit_features(X_fit, dim=dim)
    adapter = Adapter(
        mean=mean, basis=basis, heads=[], classes=classes, scale=16.0
    )
    Z = adapter.features(X_ref)
    which = stratified_folds(y, folds, seed)
    with Progress(progress, folds, "Learning adapted embeddings") as bar:
        for f in range(folds):
            train = which != f
            adapter.heads.append(
                train_head(
                    Z[train],
                    y[train],
                    len(classes),
                    hidden=hidden,
                    out_dim=out_dim,
                    seed=seed + f,
                    **train_kwargs,
                )
            )
            bar.update(1)
    adapter.scale = float(train_kwargs.get("scale", 16.0))
    adapter.folds = which
    adapter.reference_ids = (
        list(reference_ids) if reference_ids is not None else []
    )
    adapter.info.update(
        {
            "num_reference": int(len(y)),
            "num_fit": int(len(X_fit)),
            "folds": int(folds),
            "feature_dim": int(basis.shape[1]),
            "dim": adapter.dim,
            "seconds": time.perf_counter() - t0,
        }
    )
    return adapter


def cross_fitted_proba(
    adapter: Adapter, X_ref: np.ndarray, folds: np.ndarray
) -> np.ndarray:
    """Class probabilities of references, each from the head(s) that never
    saw its label: the head of its fold, or the whole ensemble for a sample
    that was not a training reference (fold -1)."""
    X_ref = np.asarray(X_ref)
    Z = adapter.features(X_ref)
    out = np.zeros((len(X_ref), len(adapter.classes)))
    unseen = folds < 0
    if unseen.any():
        out[unseen] = adapter.proba(adapter.transform(X_ref[unseen]))
    for f in range(adapter.num_heads):
        m = folds == f
        if m.any():
            out[m] = adapter.head_proba(adapter.heads[f].embed(Z[m]), f)
    return out


def cross_fitted_neighbors(
    adapter: Adapter,
    X_ref: np.ndarray,
    folds: np.ndarray,
    k: int,
    block: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest references of each reference in adapted space,
    without leaking: a reference of fold ``f`` is embedded by head ``f``
    (which never saw its label) and its neighbors are drawn from the other
    folds, the references head ``f`` was trained on: the situation of a
    target, which meets references the heads were trained on. A sample of
    no fold (-1) is embedded by the ensemble and its neighbors are every
    other reference.

    Returns:
        ``(indices, similarities)`` of shape ``(n, k)``, closest first;
        ``-1`` / NaN where fewer than ``k`` candidates exist
    """
    X_ref = np.asarray(X_ref)
    n = len(X_ref)
    idx = np.full((n, k), -1, dtype=np.int64)
    sims = np.full((n, k), np.nan)
    Z = adapter.features(X_ref)
    groups = [(f, adapter.heads[f].embed(Z)) for f in range(adapter.num_heads)]
    if (folds < 0).any():
        groups.append((-1, adapter.transform(X_ref).astype(np.float64)))
    for f, E in groups:
        rows = np.flatnonzero(folds == f)
        cand = np.flatnonzero(folds != f) if f >= 0 else np.arange(n)
        for a in range(0, len(rows), block):
            r = rows[a : a + block]
            S = E[r] @ E[cand].T
            if f < 0:
                S[cand[None, :] == r[:, None]] = -np.inf
            kk = min(k, len(cand) - (1 if f < 0 else 0))
            if kk < 1:
                continue
            part = np.argpartition(-S, kk - 1, axis=1)[:, :kk]
            s = np.take_along_axis(S, part, 1)
            order = np.argsort(-s, axis=1, kind="stable")
            idx[r, :kk] = cand[np.take_along_axis(part, order, 1)]
            sims[r, :kk] = np.take_along_axis(s, order, 1)
    return idx, sims


# --------------------------------------------------------------------------
# FiftyOne glue


@dataclass
class AdaptationResult:
    """What :func:`adapt_embeddings` did.

    Attributes:
        out_field: the vector field written
        embeddings_field: the frozen embeddings it was learned from
        path: the adapter file
        num_reference: references whose labels trained it
        num_written: samples given an adapted vector
        dim: the adapted vectors' length
        classes: the classes it knows
        reference_accuracy: cross-fitted accuracy of its classifier on the
            references (each scored by a head that never saw it)
        seconds: timings
    """

    out_field: str
    embeddings_field: str
    path: str
    num_reference: int = 0
    num_written: int = 0
    dim: int = 0
    classes: list[str] = field(default_factory=list)
    reference_accuracy: float | None = None
    seconds: dict = field(default_factory=dict)


def adapter_path(dataset, out_field: str) -> str:
    """Where the adapter of ``out_field`` of ``dataset`` is kept."""
    from prelabel.orphans import adapters_folder

    return os.path.join(adapters_folder(dataset), f"{out_field}.npz")


def adapter_record(dataset, embeddings_field: str) -> dict | None:
    """The record of the adapter that wrote ``embeddings_field``, if any."""
    return records.get(dataset, records.ADAPTERS, embeddings_field)


def load_adapter(dataset, embeddings_field: str) -> Adapter | None:
    """The adapter that wrote ``embeddings_field``, or None if that field
    was not written by :func:`adapt_embeddings`.

    A cloned dataset's records name its original's adapter file: the
    clone reads it and keeps a copy of its own, so that deleting either
    dataset's adapters never takes the other's.
    """
    from prelabel.orphans import adapters_folder

    record = adapter_record(dataset, embeddings_field)
    if record is None:
        return None
    adapter = Adapter.load(record["path"])
    if os.path.dirname(os.path.abspath(record["path"])) != adapters_folder(
        dataset
    ):
        own = adapter_path(
            dataset, f"{embeddings_field}.{uuid.uuid4().hex[:8]}"
        )
        adapter.save(own)
        records.put(
            dataset, records.ADAPTERS, embeddings_field, dict(record, path=own)
        )
    return adapter


def reference_view(samples, reference, label_field: str):
    """The labeled references among ``samples``: every labeled sample
    (``None``), those with one of the tags, or a view of labeled samples."""
    labeled = validation.labeled(samples, label_field)
    if reference is None:
        return labeled
    if isinstance(reference, str):
        return labeled.match_tags(reference)
    if isinstance(reference, (list, tuple)):
        return labeled.match_tags(list(reference))
    return validation.labeled(reference, label_field)


def check_adapt_embeddings(
    samples,
    reference=None,
    label_field: str = constants.DEFAULT_LABEL_FIELD,
    embeddings_field: str = constants.DEFAULT_EMBEDDINGS_FIELD,
    out_field: str | None = None,
    overwrite: bool = False,
):
    """Runs every check of :func:`adapt_embeddings` without writing.

    Returns:
        ``(out_field, references view)``

    Raises:
        ValueError: one sentence saying what is wrong and what to do
    """
    import fiftyone as fo

    out_field = out_field or f"{embeddings_field}_adapted"
    validation.check_embeddings_field(samples, embeddings_field)
    validation.check_classification_field(samples, label_field)
    check_output_field(
        samples,
        out_field,
        "out_field",
        records.ADAPTERS,
        overwrite=overwrite,
        never={
            embeddings_field: "the embeddings field it is learned from",
            label_field: "the ground-truth field (the labels it learns)",
        },
        types=(fo.VectorField,),
    )
    refs = reference_view(samples, reference, label_field).exists(
        embeddings_field
    )
    if len(refs) < 4 or len(set(refs.distinct(f"{label_field}.label"))) < 2:
        raise ValueError(
            f"the reference set has {len(refs)} embedded samples"
            + (f" with the tag(s) {reference!r}" if reference else "")
            + "; label at least 4 samples of 2 or more classes in "
            f"{label_field!r} first"
        )
    return out_field, refs


def adapt_embeddings(
    samples,
    reference=None,
    label_field: str = constants.DEFAULT_LABEL_FIELD,
    embeddings_field: str = constants.DEFAULT_EMBEDDINGS_FIELD,
    out_field: str | None = None,
    folds: int = 5,
    seed: int = 0,
    batch_size: int = 10000,
    progress: ProgressArg = True,
    overwrite: bool = False,
    **fit_kwargs,
) -> AdaptationResult:
    """Learns embeddings adapted to the labels of ``reference`` and writes
    them to ``out_field`` for every embedded sample of ``samples``.

    Only the references' labels are read; every other sample contributes
    its embedding to the unsupervised part of the map (centering, PCA),
    never a label. Index the new field with :func:`prelabel.sync_index`
    (another brain key) and pre-annotate from it with
    :func:`prelabel.preannotate`, which then also uses the learned
    classifier and calibrates by cross-fitting (see ``mode="adapted"``
    there for all of it in one call).

    The field is written aside and replaces the old one whole when every
    vector is written (one adapter per field, never a mix); the adapter
    file of the replaced field is deleted afterwards.

    Args:
        samples: the samples to write adapted vectors for (a dataset or
            view); they must have ``embeddings_field``
        reference (None): whose labels train the map: ``None`` for every
            sample of ``samples`` labeled in ``label_field``, a tag (or
            list of tags), or a view of labeled samples
        label_field ("ground_truth"): the Classification field of labels
        embeddings_field ("embeddings"): the frozen embeddings
        out_field (None): the vector field to write; default
            ``<embeddings_field>_adapted``
        folds (5): cross-fitted heads (see the module doc)
        seed (0): seeds the folds and the training
        batch_size (10000): samples read and written at a time
        progress (True): a bar, nothing, or ``progress(fraction, label)``
        overwrite (False): allow ``out_field`` to replace a field that
            prelabel did not write
        **fit_kwargs: other :func:`fit_adapter` parameters

    Returns:
        an :class:`AdaptationResult`
    """
    import fiftyone as fo

    t0 = time.perf_counter()
    out_field, refs = check_adapt_embeddings(
        samples, reference, label_field, embeddings_field, out_field, overwrite
    )
    validation.check_positive_int(batch_size, "batch_size")
    dataset = samples._dataset
    old = adapter_record(dataset, out_field)
    span = 0.8
    field_info = {"adapted_from": embeddings_field, "label_field": label_field}
    with staged_fields(
        dataset, {out_field: (fo.VectorField, {"info": field_info})}
    ) as tmp:
        data = _training_data(samples, refs, embeddings_field, label_field)
        t1 = time.perf_counter()
        adapter = fit_adapter(
            data.X_ref,
            data.labels,
            X_unlabeled=data.X_other,
            reference_ids=data.ids,
            classes=data.classes,
            folds=folds,
            seed=seed,
            progress=_sub_progress(progress, 0.0, span),
            **fit_kwargs,
        )
        t2 = time.perf_counter()
        adapter.info.update(
            embeddings_field=embeddings_field, label_field=label_field
        )
        record = _save_adapter(dataset, adapter, data, out_field, reference)
        record["embeddings_field"] = embeddings_field
        record["label_field"] = label_field
        tmp.record(records.ADAPTERS, out_field, record)
        staged = dataset.get_field(tmp[out_field])
        staged.info = dict(field_info, adapter=record["path"], dim=adapter.dim)
        staged.save()
        written = _write_adapted(
            samples.exists(embeddings_field),
            adapter,
            tmp[out_field],
            embeddings_field,
            batch_size,
            _sub_progress(progress, span, 1 - span),
        )
        t3 = time.perf_counter()
    if old and os.path.abspath(old["path"]) != record["path"]:
        _remove_own_file(dataset, old["path"])
    return AdaptationResult(
        out_field=out_field,
        embeddings_field=embeddings_field,
        path=record["path"],
        num_reference=len(data.ids),
        num_written=written,
        dim=adapter.dim,
        classes=data.classes,
        reference_accuracy=record["reference_accuracy"],
        seconds={
            "read": t1 - t0,
            "fit": t2 - t1,
            "write": t3 - t2,
            "total": time.perf_counter() - t0,
        },
    )


@dataclass
class _TrainingData:
    ids: list[str]
    labels: list[str]
    classes: list[str]
    X_ref: np.ndarray
    X_other: np.ndarray | None


def _training_data(samples, refs, embeddings_field, label_field):
    """The references' vectors and labels, and every other embedded
    sample's vector (for the label-free part of the map)."""
    ref_ids, ref_vecs, ref_labels = refs.values(
        ["id", embeddings_field, f"{label_field}.label"]
    )
    ref_set = set(ref_ids)
    all_ids, all_vecs = samples.exists(embeddings_field).values(
        ["id", embeddings_field]
    )
    X_ref = np.stack([np.asarray(v, dtype=np.float32) for v in ref_vecs])
    X_other = [
        np.asarray(v, dtype=np.float32)
        for sid, v in zip(all_ids, all_vecs, strict=True)
        if sid not in ref_set
    ]
    return _TrainingData(
        ids=ref_ids,
        labels=ref_labels,
        classes=sorted(set(ref_labels), key=_natural_key),
        X_ref=X_ref,
        X_other=np.stack(X_other) if X_other else None,
    )


def reference_digest(ids, labels) -> str:
    """A digest of a reference set: its sample ids and their labels."""
    h = hashlib.blake2b(digest_size=12)
    for sid, lbl in sorted(zip(ids, labels, strict=True)):
        h.update(f"{sid}:{lbl};".encode())
    return h.hexdigest()


def _save_adapter(dataset, adapter, data, out_field, reference) -> dict:
    """Saves the adapter in a file of its own (the field's old adapter
    stays until the new field replaces the old one) and returns the
    record of the field."""
    lookup = {c: i for i, c in enumerate(data.classes)}
    y_ref = np.array([lookup[v] for v in data.labels])
    oof = cross_fitted_proba(adapter, data.X_ref, adapter.folds)
    ref_acc = float((oof.argmax(axis=1) == y_ref).mean())
    adapter.info.update(
        {
            "reference": _describe_reference(reference),
            "reference_accuracy": ref_acc,
        }
    )
    path = adapter_path(dataset, f"{out_field}.{uuid.uuid4().hex[:8]}")
    adapter.save(path)
    return {
        "path": path,
        "reference": _describe_reference(reference),
        "reference_digest": reference_digest(data.ids, data.labels),
        "num_reference": len(data.ids),
        "classes": data.classes,
        "folds": adapter.num_heads,
        "dim": adapter.dim,
        "reference_accuracy": ref_acc,
    }


def _write_adapted(
    embedded, adapter, field, embeddings_field, batch_size, progress
) -> int:
    """Writes the adapted vector of every sample of ``embedded``."""
    dataset = embedded._dataset
    ids = embedded.values("id")
    with Progress(progress, len(ids), "Writing adapted embeddings") as bar:
        for a in range(0, len(ids), batch_size):
            chunk_ids, vecs = dataset.select(ids[a : a + batch_size]).values(
                ["id", embeddings_field]
            )
            V = adapter.transform(
                np.stack([np.asarray(v, dtype=np.float32) for v in vecs])
            )
            dataset.set_values(
                field,
                dict(zip(chunk_ids, list(V), strict=True)),
                key_field="id",
            )
            bar.update(len(chunk_ids))
    return len(ids)


def _remove_own_file(dataset, path: str) -> None:
    """Deletes an adapter file if it lies in ``dataset``'s own folder (a
    clone's record may name its original's file, which stays)."""
    from prelabel.orphans import adapters_folder

    folder = adapters_folder(dataset)
    if os.path.dirname(os.path.abspath(path)) == folder:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _describe_reference(reference):
    if reference is None or isinstance(reference, str):
        return reference
    if isinstance(reference, (list, tuple)):
        return list(reference)
    return "<view>"


def _natural_key(label: str):
    return (0, int(label)) if label.isdigit() else (1, label)


def _sub_progress(progress: ProgressArg, start: float, span: float):
    """A stage of a longer job: a callback is mapped into
    ``[start, start + span]``; a bar or nothing is passed on."""
    if not callable(progress):
        return progress

    def report(fraction: float, label: str) -> None:
        progress(start + span * fraction, label)

    return report


def label_error_scores(
    X: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    k: int = 15,
    folds: int = 5,
    seed: int = 0,
    **fit_kwargs,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """How likely each label is wrong, from two views that never use the
    label they score:

    - leave-one-out kNN vote in a label-free whitened space
      (:func:`prelabel.propagate.whitened_features`; the sample is not its
      own neighbor);
    - the cross-fitted classifier of an :class:`Adapter` trained on the
      labels themselves, each sample scored by the head trained without
      its fold.

    Args:
        X: raw embeddings ``(n, D)`` of the labeled samples
        y: their class indices
        num_classes: ``C``
        k (15): neighbors that vote
        folds (5), seed (0): the cross-fitting
        **fit_kwargs: other :func:`fit_adapter` parameters

    Returns:
        ``(scores, probs, neighbor indices, neighbor similarities)``:
        ``scores = 1 - probs[i, y[i]]`` (higher = more likely wrong),
        ``probs`` the mean of the two views' class distributions
    """
    from prelabel import knn
    from prelabel.propagate import knn_graph, whitened_features

    y = np.asarray(y, dtype=np.int64)
    W = whitened_features(X, seed=seed)
    nb, sims = knn_graph(W, k=k)
    # similarity order, closest first, for the vote's tie rule
    order = np.argsort(-sims, axis=1, kind="stable")
    nb = np.take_along_axis(nb, order, 1)
    sims = np.take_along_axis(sims, order, 1)
    names = [str(c) for c in range(num_classes)]
    votes = knn.vote(
        [[names[c] for c in row] for row in y[nb].tolist()],
        sims,
        names,
        nb.shape[1],
    )
    adapter = fit_adapter(
        X,
        [names[c] for c in y],
        classes=names,
        folds=folds,
        seed=seed,
        **fit_kwargs,
    )
    head = cross_fitted_proba(adapter, X, adapter.folds)
    probs = 0.5 * votes.probs + 0.5 * head
    scores = 1.0 - probs[np.arange(len(y)), y]
    return scores, probs, nb, sims


def delete_adapters(dataset, out_field: str | None = None) -> int:
    """Deletes the adapter files of ``dataset`` (or only the one of
    ``out_field``) and their records; the adapted fields stay. (The files
    of a deleted dataset go with :func:`prelabel.delete_orphans`.)

    Returns:
        the number of adapters deleted
    """
    from prelabel.orphans import adapters_folder

    found = records.read(dataset, records.ADAPTERS)
    names = [out_field] if out_field is not None else list(found)
    done = [name for name in names if name in found]
    for name in done:
        _remove_own_file(dataset, found[name]["path"])
    records.update(dataset, remove=[(records.ADAPTERS, n) for n in done])
    folder = adapters_folder(dataset)
    if set(os.listdir(folder)) <= {"owner.json"}:
        shutil.rmtree(folder, ignore_errors=True)
    return len(done)
