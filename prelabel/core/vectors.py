"""Vectors: the label-free maps of embeddings and exact neighbor search.

Pure numpy; nothing here reads a label or imports FiftyOne.
"""

from __future__ import annotations

import numpy as np


def signed_sqrt_l2(X: np.ndarray) -> np.ndarray:
    """The signed square root of each value (the Hellinger map, which tames
    the bursty ReLU activations of CNN features), then unit rows."""
    A = np.asarray(X, dtype=np.float32)
    A = np.sign(A) * np.sqrt(np.abs(A))
    norms = np.linalg.norm(A, axis=1, keepdims=True)
    return A / np.where(norms > 0, norms, 1.0)


def normalize(A: np.ndarray) -> np.ndarray:
    """Unit rows (a zero row stays zero)."""
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
    A = signed_sqrt_l2(X)
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


def whitened_features(
    X: np.ndarray,
    dim: int = 256,
    shrinkage: float = 1.0,
    max_fit: int = 20000,
    seed: int = 0,
) -> np.ndarray:
    """Label-free features for neighbor search: signed square root, L2,
    centering, PCA to ``dim`` and whitening with shrinkage (each
    component scaled by ``1 / sqrt(variance + shrinkage * mean
    variance)``, so weak, noisy directions are not blown up), then L2.

    Args:
        X: raw embeddings ``(n, D)``
        dim (256): at most this many components
        shrinkage (1.0): the regularization of the whitening, in units of
            the mean variance (0 = full whitening)
        max_fit (20000): the PCA is fitted on at most this many rows
        seed (0): which rows, when there are more

    Returns:
        float32 ``(n, d)``, unit rows
    """
    A = signed_sqrt_l2(X)
    fit = A
    if len(A) > max_fit:
        fit = A[np.random.default_rng(seed).choice(len(A), max_fit, False)]
    mean = fit.mean(axis=0, dtype=np.float64).astype(np.float32)
    C = fit - mean
    cov = (C.T @ C).astype(np.float64) / len(C)
    vals, vecs = np.linalg.eigh(cov)
    d = int(min(dim, len(fit) - 1, A.shape[1]))
    order = np.argsort(vals)[::-1][:d]
    lam = np.maximum(vals[order], 0.0)
    scale = 1.0 / np.sqrt(lam + shrinkage * max(vals.mean(), 1e-12))
    W = (vecs[:, order] * scale).astype(np.float32)
    return normalize((A - mean) @ W).astype(np.float32)


#: similarities computed at once, at most (a block of queries times the
#: rows searched: 256 MB of float32)
MAX_BLOCK_CELLS = 64_000_000


def _rows_per_block(block: int, n: int) -> int:
    """Queries per matrix product: ``block``, fewer against many rows."""
    return max(1, min(block, MAX_BLOCK_CELLS // max(n, 1)))


def exact_neighbors(
    V: np.ndarray, k: int = 10, block: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest other rows by cosine similarity.

    Returns:
        ``(indices, similarities)`` ``(n, k)``
    """
    V = normalize(np.asarray(V, dtype=np.float32))
    n = len(V)
    k = int(min(k, n - 1))
    block = _rows_per_block(block, n)
    idx = np.empty((n, k), dtype=np.int64)
    sims = np.empty((n, k), dtype=np.float32)
    for a in range(0, n, block):
        S = V[a : a + block] @ V.T
        rows = np.arange(S.shape[0])
        S[rows, a + rows] = -np.inf
        part = np.argpartition(-S, k - 1, axis=1)[:, :k]
        idx[a : a + block] = part
        sims[a : a + block] = np.take_along_axis(S, part, 1)
    return idx, sims


def nearest_rows(
    Q: np.ndarray,
    R: np.ndarray,
    k: int,
    self_rows: np.ndarray | None = None,
    block: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` nearest rows of ``R`` by cosine similarity,
    closest first.

    Args:
        Q: queries ``(q, d)``
        R: rows searched ``(n, d)``
        k: neighbors per query
        self_rows (None): per query, its own row of ``R`` (never returned),
            or ``-1``
        block (2048): queries per matrix product (fewer when ``R`` is so
            large that their similarities would pass
            :data:`MAX_BLOCK_CELLS`)

    Returns:
        ``(indices, similarities)`` ``(q, min(k, n))``
    """
    Qn = normalize(np.asarray(Q, dtype=np.float32))
    Rn = normalize(np.asarray(R, dtype=np.float32))
    k = int(min(k, len(Rn)))
    block = _rows_per_block(block, len(Rn))
    idx = np.empty((len(Qn), k), dtype=np.int64)
    sims = np.empty((len(Qn), k), dtype=np.float32)
    for a in range(0, len(Qn), block):
        S = Qn[a : a + block] @ Rn.T
        if self_rows is not None:
            own = np.asarray(self_rows[a : a + block])
            rows = np.flatnonzero(own >= 0)
            S[rows, own[rows]] = -np.inf
        part = np.argpartition(-S, k - 1, axis=1)[:, :k]
        s = np.take_along_axis(S, part, 1)
        order = np.argsort(-s, axis=1, kind="stable")
        idx[a : a + block] = np.take_along_axis(part, order, 1)
        sims[a : a + block] = np.take_along_axis(s, order, 1)
    return idx, sims
