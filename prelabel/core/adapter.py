"""Embeddings adapted to the user's labels: the numbers (pure numpy for
inference; torch, imported lazily, to train the heads).

Frozen image features (ImageNet models) put two digits of the same class
further apart than a neighbor vote would like. This module learns, from the
labeled references only, a small projection of the frozen embeddings whose
cosine neighbors agree with the labels (:mod:`prelabel.adapt` writes the
projected vectors as another embeddings field and keeps the adapter in a
file so that pre-annotation can use it again).

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
   ranking. References closer to each other than the other samples get to
   them (near-duplicates, see :mod:`prelabel.core.leakage`) share a fold,
   so that no head has seen a copy of a reference it scores.
3. output: the K heads' normalized outputs side by side (scaled by
   1/sqrt(K)), so the cosine similarity of two adapted vectors is the mean
   of the K heads' cosine similarities: kNN on the adapted field is kNN of
   an ensemble. Each head's class prototypes are kept, so the ensemble's
   class probabilities can be read off an adapted vector alone.

Targets' labels are never read: only the references' labels train the
heads, and the unsupervised step uses vectors only.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from prelabel.core import leakage
from prelabel.core.calibration import MAX_CALIBRATION
from prelabel.core.vectors import (
    exact_neighbors,
    fit_features,
    normalize,
    signed_sqrt_l2,
    whitened_features,
)
from prelabel.core.voting import vote
from prelabel.progress import Progress, ProgressArg


def stratified_folds(
    y: np.ndarray,
    folds: int,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """A fold index per sample: each class is spread evenly over the folds
    (a class with fewer members than folds leaves some folds without it).

    Args:
        y: class indices ``(n,)``
        folds: the number of folds
        seed (0): seeds the shuffles
        groups (None): a group id per sample (near-duplicates): a group
            is never split, each goes whole to the fold holding the fewest
            of its classes, largest groups first (all groups of one: the
            folds of no groups)
    """
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    out = np.empty(len(y), dtype=np.int64)
    if groups is None or len(np.unique(groups)) == len(groups):
        # no group of two: the folds of plain stratification
        offset = 0
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            idx = idx[rng.permutation(len(idx))]
            out[idx] = (np.arange(len(idx)) + offset) % folds
            offset += len(idx)
        return out
    _, g = np.unique(np.asarray(groups), return_inverse=True)
    by_group = np.argsort(g, kind="stable")
    starts = np.r_[0, np.cumsum(np.bincount(g))]
    order = rng.permutation(len(starts) - 1)
    order = order[np.argsort(-np.diff(starts)[order], kind="stable")]
    _, yc = np.unique(y, return_inverse=True)
    filled = np.zeros((yc.max() + 1 if len(y) else 0, folds))
    for grp in order:
        rows = by_group[starts[grp] : starts[grp + 1]]
        counts = np.bincount(yc[rows], minlength=filled.shape[0])
        load = counts @ filled + 1e-9 * filled.sum(axis=0)
        f = int(np.argmin(load))
        out[rows] = f
        filled[:, f] += counts
    return out


def reference_groups(
    Z_ref: np.ndarray,
    Z_other: np.ndarray | None,
    reference_ids: Sequence[str] | None,
    folds: int,
) -> np.ndarray | None:
    """Near-duplicate groups of the references that the cross-fitting
    keeps in one fold: those scored for calibration (the subset of
    :func:`prelabel.core.leakage.calibration_subset`) linked to their
    neighbors closer than the other samples (``Z_other``, standing for
    the targets) get (:func:`prelabel.core.leakage.groups`)."""
    if Z_other is None:
        return None
    ids = (
        list(reference_ids)
        if reference_ids is not None and len(reference_ids) == len(Z_ref)
        else [str(i) for i in range(len(Z_ref))]
    )
    rows = leakage.calibration_subset(ids, MAX_CALIBRATION)
    return leakage.groups(Z_ref, Z_other, folds, rows)


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
        return normalize(h @ self.w2 + self.b2)


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
            prototypes=normalize(protos.detach().numpy().astype(np.float32)),
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
        return (signed_sqrt_l2(X) - self.mean) @ self.basis

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
            z = normalize(V[:, j * m : (j + 1) * m])
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
    groups: np.ndarray | None = None,
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
        groups (None): a group id per reference: near-duplicates that
            share a fold (see :mod:`prelabel.core.leakage`); default
            found by exact search (:func:`reference_groups`) when
            ``X_unlabeled`` is given
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
    if groups is None:
        groups = reference_groups(
            Z,
            None if X_unlabeled is None else adapter.features(X_unlabeled),
            reference_ids,
            folds,
        )
    which = stratified_folds(y, folds, seed, groups)
    with Progress(
        progress, folds, "Learning adapted embeddings", unit="head"
    ) as bar:
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
            # references that share a fold with near-duplicates
            "near_duplicates": _grouped(groups),
            "dim": adapter.dim,
            "seconds": time.perf_counter() - t0,
        }
    )
    return adapter


def _grouped(groups: np.ndarray | None) -> int:
    """How many references share their group with another."""
    if groups is None:
        return 0
    _, inv, counts = np.unique(groups, return_inverse=True, return_counts=True)
    return int((counts[inv] > 1).sum())


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
      (:func:`prelabel.core.vectors.whitened_features`; the sample is not its
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
    y = np.asarray(y, dtype=np.int64)
    W = whitened_features(X, seed=seed)
    nb, sims = exact_neighbors(W, k=k)
    # similarity order, closest first, for the vote's tie rule
    order = np.argsort(-sims, axis=1, kind="stable")
    nb = np.take_along_axis(nb, order, 1)
    sims = np.take_along_axis(sims, order, 1)
    names = [str(c) for c in range(num_classes)]
    votes = vote(
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
