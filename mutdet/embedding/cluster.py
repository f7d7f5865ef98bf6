"""PCA + spherical k-means on proposal embeddings (METHOD.md step 4), persisted as plain arrays.

Fit, on ``(n, D)`` raw embeddings ``X`` (the stage passes a seeded sample of the pool):

1. PCA ``D -> pca_dim`` (scikit-learn's ``covariance_eigh`` solver, computed a block of rows at a time
   with a float64 covariance: exact, no randomness, scikit-learn's sign convention), no whitening:
   ``P = (X - mean) @ components.T``.
2. ``Z = P / ||P||`` (L2 per row).
3. Spherical k-means with ``k`` clusters on ``Z``: k-means++ seeding (squared chord distance
   ``2 - 2 cos``), then Lloyd steps that assign each vector to the centroid of **highest cosine** and
   move each centroid to the L2-normalised mean of its members, until no assignment changes (or
   ``max_iter``). Fitting and assignment thus use the same cosine rule; a cluster that empties takes
   the member worst served by its centroid (lowest cosine). Deterministic for a given seed.

Too small a pool is an error, not a clamp: ``pca_dim`` and ``k`` are consumed downstream (the
embedding width and the number of pseudo-classes of the pre-training detector), so silently changing
them would break that contract. Requirements: ``pca_dim <= D``, ``pca_dim < n`` (centred data has rank
``<= n - 1``), ``k <= n`` and at least ``k`` distinct vectors.

Distinctness is decided where it is exact, never by a BLAS kernel's rounding: rows of the raw input
are compared bit for bit (``-0.0 == 0.0``), and k-means++ gives every copy of a chosen row distance
exactly 0. Distinct rows whose normalised PCA vectors point the same way (squared chord distance
below :func:`same_direction_tolerance`, the rounding bound of a ``pca_dim``-term float32 dot product of unit
vectors) count as one vector too; a pool with fewer than ``k`` distinct vectors by this rule is an
error on every machine.

Persistence (:meth:`ClusterModel.save`, ``np.savez``, loadable with ``allow_pickle=False``):

    pca_mean (D,) float32, pca_components (pca_dim, D) float32, pca_explained_variance (pca_dim,) float32,
    pca_explained_variance_ratio (pca_dim,) float32, centroids (k, pca_dim) float32 (unit rows),
    meta_json () str: fit statistics and parameters as JSON
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from mutdet.io.atomic import atomic_path

__all__ = ["ClusterFitError", "ClusterModel", "fit_pca", "fit_spherical_kmeans", "fit_cluster_model", "l2_normalize",
           "row_ids", "same_direction_tolerance"]

ARRAYS = ("pca_mean", "pca_components", "pca_explained_variance", "pca_explained_variance_ratio", "centroids")
BLOCK_ROWS = 65536  # rows per block in projection/assignment: bounds the (rows, k) similarity matrix


def same_direction_tolerance(dim: int) -> float:
    """Squared chord distances ``2 - 2 cos`` below this are rounding, not a direction: ``cos`` of two
    unit float32 vectors of ``dim`` terms is off by at most about ``dim * eps``; twice that, doubled."""
    return 4.0 * dim * float(np.finfo(np.float32).eps)


class ClusterFitError(ValueError):
    """A pool too small (or too degenerate) for the configured ``pca_dim`` / ``k``."""


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (zero rows stay zero); float32."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


@dataclasses.dataclass(frozen=True)
class ClusterModel:
    """A fitted PCA + spherical k-means. Shapes: ``D`` embedding dim, ``d`` PCA dim, ``k`` clusters."""

    pca_mean: np.ndarray  # (D,)
    pca_components: np.ndarray  # (d, D), orthonormal rows
    pca_explained_variance: np.ndarray  # (d,)
    pca_explained_variance_ratio: np.ndarray  # (d,)
    centroids: np.ndarray  # (k, d), unit rows
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.pca_components.shape[0]

    @property
    def k(self) -> int:
        return self.centroids.shape[0]

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        """Raw embeddings ``(N, D)`` (any float dtype) -> L2-normalised PCA vectors ``(N, d)`` float32."""
        x = np.asarray(embeddings)
        if x.ndim != 2 or x.shape[1] != self.pca_mean.shape[0]:
            raise ValueError(f"ClusterModel.project: expected (N, {self.pca_mean.shape[0]}), got {x.shape}")
        out = np.empty((len(x), self.dim), np.float32)
        for s in range(0, len(x), BLOCK_ROWS):  # float32 one block at a time
            block = x[s:s + BLOCK_ROWS].astype(np.float32)
            out[s:s + BLOCK_ROWS] = l2_normalize((block - self.pca_mean) @ self.pca_components.T)
        return out

    def assign(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Normalised vectors ``(N, d)`` -> ``(cluster id (N,) int16, cosine to that centroid (N,) float32)``."""
        z = np.asarray(z, dtype=np.float32)
        ids, cos = np.empty(len(z), np.int16), np.empty(len(z), np.float32)
        for s in range(0, len(z), BLOCK_ROWS):
            sims = z[s:s + BLOCK_ROWS] @ self.centroids.T  # (rows, k)
            ids[s:s + BLOCK_ROWS] = sims.argmax(axis=1)
            cos[s:s + BLOCK_ROWS] = sims.max(axis=1)
        return ids, cos

    def save(self, path: str | Path) -> None:
        """Write the arrays and ``meta`` (as JSON text) to an ``.npz`` atomically; no pickles."""
        arrays = {name: getattr(self, name) for name in ARRAYS}
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays, meta_json=np.array(json.dumps(self.meta, sort_keys=True, default=str)))

    @classmethod
    def load(cls, path: str | Path) -> "ClusterModel":
        """Read a model written by :meth:`save`; errors name the file and the array."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: cluster model (pca_kmeans.npz) not found")
        with np.load(path, allow_pickle=False) as npz:
            missing = [n for n in (*ARRAYS, "meta_json") if n not in npz.files]
            if missing:
                raise ValueError(f"{path}: not a cluster model: missing arrays {missing}")
            arrays = {n: npz[n] for n in ARRAYS}
            meta = json.loads(str(npz["meta_json"]))
        d, big_d = arrays["pca_components"].shape
        expected = {"pca_mean": (big_d,), "pca_explained_variance": (d,), "pca_explained_variance_ratio": (d,)}
        for name, shape in expected.items():
            if arrays[name].shape != shape:
                raise ValueError(f"{path}: array {name} has shape {arrays[name].shape}, expected {shape}")
        if arrays["centroids"].ndim != 2 or arrays["centroids"].shape[1] != d:
            raise ValueError(f"{path}: array centroids has shape {arrays['centroids'].shape}, expected (k, {d})")
        return cls(**arrays, meta=meta)


def fit_pca(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact PCA of ``x`` ``(n, D)``; returns float32 ``(mean (D,), components (dim, D), variance (dim,),
    variance ratio (dim,))``. Requires ``dim <= D`` and ``dim < n`` (:class:`ClusterFitError` otherwise)."""
    n, big_d = x.shape
    if dim > big_d:
        raise ClusterFitError(f"cluster.pca_dim ({dim}) exceeds the embedding dimension ({big_d}); "
                              f"set cluster.pca_dim <= {big_d}")
    if dim >= n:
        raise ClusterFitError(f"cluster.pca_dim ({dim}) needs more than {dim} embeddings to fit, the fit sample "
                              f"has {n}; lower cluster.pca_dim or embed more proposals")
    # scikit-learn's covariance_eigh solver, a block of rows at a time, so that ``x`` may stay float16
    # (the embeddings' storage type: converting the sample to float32 doubled the stage's largest
    # array): the mean in float64, then the covariance of the centred rows, each block's product in
    # float32 accumulated in float64 (more accurate than centring X^T X afterwards), its eigenvectors
    # in decreasing order with scikit-learn's sign rule (the largest |entry| of each component > 0).
    mean = np.zeros(big_d, np.float64)
    for s in range(0, n, _PCA_BLOCK):
        mean += x[s:s + _PCA_BLOCK].sum(axis=0, dtype=np.float64)
    mean /= n
    mean32 = mean.astype(np.float32)
    cov = np.zeros((big_d, big_d), np.float64)
    for s in range(0, n, _PCA_BLOCK):
        block = x[s:s + _PCA_BLOCK].astype(np.float32) - mean32  # (rows, D)
        cov += block.T @ block
    cov /= n - 1
    eigenvalues, eigenvectors = np.linalg.eigh(cov)
    eigenvalues, eigenvectors = np.clip(eigenvalues[::-1], 0.0, None), eigenvectors[:, ::-1]
    components = eigenvectors[:, :dim].T  # (dim, D)
    rows = np.arange(dim)
    components = components * np.sign(components[rows, np.abs(components).argmax(axis=1)])[:, None]
    ratio = eigenvalues[:dim] / eigenvalues.sum()
    return tuple(np.asarray(a, dtype=np.float32) for a in (mean, components, eigenvalues[:dim], ratio))


_PCA_BLOCK = 8192  # rows per block of the PCA fit: bounds its float32 copies (64 MiB at D = 2048)


def row_ids(x: np.ndarray, block: int = 4096) -> tuple[np.ndarray, int]:
    """Exact identity of the rows of ``x`` ``(n, D)``: ``(id per row (n,) int64, number of distinct rows)``;
    rows get the same id iff they are equal value for value (``-0.0`` equals ``0.0``).

    Each row's bytes are hashed (BLAKE2b, 128 bits: a collision is not a practical concern), one block
    of rows at a time, so memory stays at one block beyond ``x``; sorting the rows instead (``np.unique``
    on a row view) copied the whole sample twice and was 4x slower on 50k x 2048 float32 rows."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"row_ids: expected (n, D), got {x.shape}")
    ids, seen = np.empty(len(x), np.int64), {}
    for s in range(0, len(x), block):
        rows = np.ascontiguousarray(x[s:s + block]) + 0  # + 0 turns -0.0 into 0.0: equal rows, equal bytes
        for i, row in enumerate(rows):
            ids[s + i] = seen.setdefault(hashlib.blake2b(row.data, digest_size=16).digest(), len(seen))
    return ids, len(seen)


def _too_few(k: int, distinct: int) -> ClusterFitError:
    return ClusterFitError(f"cluster.k ({k}): the fit sample has only {distinct} distinct embeddings; lower "
                           f"cluster.k or embed more proposals")


def _kmeans_pp(z: torch.Tensor, k: int, rng: np.random.Generator, ids: torch.Tensor) -> torch.Tensor:
    """k-means++ seeding on unit vectors ``(n, d)`` with squared chord distance ``2 - 2 cos``; ``(k, d)``.

    ``ids`` ``(n,)``: rows with the id of a chosen row are at distance exactly 0, and so is anything
    nearer than :func:`same_direction_tolerance`; so no direction is chosen twice and running out of distinct
    vectors is decided the same way on every machine."""
    n = len(z)
    tol = same_direction_tolerance(z.shape[1])

    def distance(pick: int) -> torch.Tensor:
        d = (2 - 2 * (z @ z[pick])).double()
        d[(d < tol) | (ids == ids[pick])] = 0.0
        return d

    chosen = [int(rng.integers(n))]
    dist = distance(chosen[0])  # (n,)
    for c in range(1, k):
        cumulative = np.cumsum(dist.numpy())
        total = float(cumulative[-1])
        if total <= 0:
            raise _too_few(k, c)
        # The first index whose cumulative sum exceeds u * total has positive weight: never a chosen row.
        pick = int(np.searchsorted(cumulative, rng.random() * total, side="right"))
        if pick == n:  # u * total rounded up to total: the last row of positive weight
            pick = int(np.flatnonzero(dist.numpy() > 0)[-1])
        chosen.append(pick)
        dist = torch.minimum(dist, distance(pick))
    return z[chosen].clone()


def _assign(z: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.empty(len(z), dtype=torch.int64)
    best = torch.empty(len(z), dtype=z.dtype)
    for s in range(0, len(z), BLOCK_ROWS):
        best[s:s + BLOCK_ROWS], labels[s:s + BLOCK_ROWS] = (z[s:s + BLOCK_ROWS] @ centroids.T).max(dim=1)
    return labels, best


def fit_spherical_kmeans(z: np.ndarray, k: int, *, seed: int, max_iter: int = 100,
                         ids: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Spherical k-means on unit rows ``z`` ``(n, d)`` (see the module docstring).

    ``ids`` ``(n,)``: which rows are copies of one vector (:func:`row_ids` of the raw input); default:
    the exact identity of the rows of ``z``.

    Returns:
        ``(centroids (k, d) float32 unit rows, info)`` with ``iterations``, ``converged`` and
        ``mean_cosine`` (mean cosine of each vector to its centroid, the objective).
    """
    n = len(z)
    if k > n:
        raise ClusterFitError(f"cluster.k ({k}) exceeds the number of embeddings in the fit sample ({n}); "
                              f"lower cluster.k or embed more proposals")
    if ids is None:
        ids = row_ids(z)[0]
    distinct = len(np.unique(ids))
    if distinct < k:
        raise _too_few(k, distinct)
    rng = np.random.default_rng(seed)
    zt = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))
    centroids = _kmeans_pp(zt, k, rng, torch.from_numpy(np.asarray(ids, dtype=np.int64)))
    labels = None
    converged = False
    iterations = 0
    for iterations in range(1, max_iter + 1):
        new_labels, best = _assign(zt, centroids)
        if labels is not None and torch.equal(new_labels, labels):
            converged = True
            break
        labels = new_labels
        sums = torch.zeros((k, zt.shape[1]), dtype=torch.float64)
        for s in range(0, n, BLOCK_ROWS):  # float64 one block at a time, not a copy of all of z
            sums.index_add_(0, labels[s:s + BLOCK_ROWS], zt[s:s + BLOCK_ROWS].double())
        counts = torch.bincount(labels, minlength=k)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            # Each empty cluster restarts at a vector its old centroid serves worst (distinct vectors).
            worst = torch.argsort(best, stable=True)[: len(empty)]
            sums[empty] = zt[worst].double()
        centroids = torch.from_numpy(l2_normalize(sums.numpy()))
    labels, best = _assign(zt, centroids)
    info = {"iterations": iterations, "converged": converged, "mean_cosine": float(best.double().mean())}
    return centroids.numpy(), info


def fit_cluster_model(x: np.ndarray, *, pca_dim: int, k: int, seed: int, max_iter: int = 100) -> ClusterModel:
    """PCA then spherical k-means on ``x`` ``(n, D)`` raw embeddings -> :class:`ClusterModel`."""
    mean, components, variance, ratio = fit_pca(x, pca_dim)
    model = ClusterModel(pca_mean=mean, pca_components=components, pca_explained_variance=variance,
                         pca_explained_variance_ratio=ratio, centroids=np.zeros((0, pca_dim), np.float32))
    ids, distinct = row_ids(x)
    if distinct < k <= len(x):
        raise _too_few(k, distinct)
    z = model.project(x)
    centroids, info = fit_spherical_kmeans(z, k, seed=seed, max_iter=max_iter, ids=ids)
    meta = {"fit_samples": int(len(x)), "input_dim": int(x.shape[1]), "pca_dim": pca_dim, "k": k,
            "kmeans_seed": seed, "max_iter": max_iter, "pca_explained_variance_ratio_total": float(ratio.sum()),
            "kmeans": info}
    return dataclasses.replace(model, centroids=centroids, meta=meta)
