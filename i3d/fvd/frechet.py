"""The Fréchet distance between two Gaussians, with a matrix square root that cannot go complex.

FVD needs ``tr(sqrt(S1 S2))``. ``scipy.linalg.sqrtm`` of the non-symmetric product can return
complex values or NaN when the covariances are singular (fewer videos than dimensions) and
its result changed between scipy versions. Here ``S1`` is split as ``A A`` with ``A`` its
symmetric PSD square root; ``S1 S2`` has the eigenvalues of the symmetric PSD ``A S2 A``, so
the trace is the sum of the square roots of ``A S2 A``'s eigenvalues (LAPACK ``syevd`` through
``numpy.linalg.eigh``), with round-off negatives clipped to 0. This is exact arithmetic's
value, real and finite for every pair of PSD inputs.

TF-GAN (the ``tf`` protocol's reference) forms the same two square roots by SVD and leaves
singular values below 1e-10 un-rooted (``_symmetric_matrix_square_root``'s ``eps``); with
``root_floor=TFGAN_ROOT_FLOOR`` the eigenvalues are treated the same way, which moves FVDs
whose covariances have directions below 1e-10 (few videos, or nearly flat activations).
"""

from __future__ import annotations

import numpy as np

TFGAN_ROOT_FLOOR = 1e-10
"""TF-GAN's ``_symmetric_matrix_square_root`` eps: smaller singular values are not rooted."""


def _check_covariance(name: str, cov: np.ndarray, dim: int) -> np.ndarray:
    cov = np.asarray(cov, dtype=np.float64)
    if cov.shape != (dim, dim):
        raise ValueError(f"{name} must be ({dim}, {dim}), got {cov.shape}")
    if not np.isfinite(cov).all():
        raise ValueError(f"{name} contains NaN or inf")
    return (cov + cov.T) / 2


def _roots(eigenvalues: np.ndarray, root_floor: float) -> np.ndarray:
    """Square roots of a symmetric matrix's eigenvalues: round-off negatives as 0 (floor 0),
    or as TF-GAN's SVD takes them (|λ| below the floor unchanged, else sign(λ)·√|λ|)."""
    if root_floor == 0.0:
        return np.sqrt(np.clip(eigenvalues, 0.0, None))
    size = np.abs(eigenvalues)
    return np.where(size < root_floor, eigenvalues, np.sign(eigenvalues) * np.sqrt(size))


def psd_sqrt(cov: np.ndarray, root_floor: float = 0.0) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (see :func:`_roots` for the floor)."""
    w, v = np.linalg.eigh(cov)
    return (v * _roots(w, root_floor)) @ v.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray, root_floor: float = 0.0) -> float:
    """``tr(sqrt(cov1 @ cov2))`` of two PSD matrices, from the eigenvalues of ``A cov2 A``;
    ``root_floor`` :data:`TFGAN_ROOT_FLOOR` reproduces TF-GAN's ``trace_sqrt_product``."""
    root = psd_sqrt(cov1, root_floor)
    inner = root @ cov2 @ root
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(_roots(eig, root_floor).sum())


def frechet_distance(
    mean1: np.ndarray,
    cov1: np.ndarray,
    mean2: np.ndarray,
    cov2: np.ndarray,
    root_floor: float = 0.0,
) -> float:
    """``|m1 - m2|² + tr(C1 + C2 - 2 sqrt(C1 C2))`` in float64, finite and >= 0
    (``root_floor``: see :func:`trace_sqrt_product`). Identical statistics give exactly 0:
    the square roots' round-off (up to ~1e-3 for 400-d covariances of a few videos, and
    different on every BLAS) would otherwise show as a distance between a set and itself."""
    mean1 = np.asarray(mean1, dtype=np.float64)
    mean2 = np.asarray(mean2, dtype=np.float64)
    if mean1.ndim != 1 or mean1.shape != mean2.shape:
        raise ValueError(f"means must be two (D,) vectors, got {mean1.shape} and {mean2.shape}")
    dim = mean1.size
    cov1 = _check_covariance("cov1", cov1, dim)
    cov2 = _check_covariance("cov2", cov2, dim)
    if not (np.isfinite(mean1).all() and np.isfinite(mean2).all()):
        raise ValueError("means contain NaN or inf")
    if np.array_equal(mean1, mean2) and np.array_equal(cov1, cov2):
        return 0.0
    diff = mean1 - mean2
    value = float(diff @ diff) + float(np.trace(cov1) + np.trace(cov2))
    value -= 2.0 * trace_sqrt_product(cov1, cov2, root_floor)
    return max(value, 0.0)  # the distance is >= 0; only round-off goes below
