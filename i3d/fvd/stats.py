"""Streaming float64 mean and covariance of activation vectors, mergeable exactly.

An :class:`ActivationStats` holds the count, the mean and the sum of outer products of the
deviations from the mean (``m2``) of every vector added so far, all in float64, so any number
of videos fits in O(D²) memory. Batches are folded in with Chan, Golub & LeVeque's pairwise
update (the same rule merges two accumulators), which stays accurate where the textbook
``E[xxᵀ] - μμᵀ`` loses digits to cancellation.
"""

from __future__ import annotations

import numpy as np


class ActivationStats:
    """Count, mean (D,) and centred second moment ``m2`` (D, D) of the vectors seen, in float64."""

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"activation dimension must be >= 1, got {dim}")
        self.dim = dim
        self.count = 0
        self.mean = np.zeros(dim, dtype=np.float64)
        self.m2 = np.zeros((dim, dim), dtype=np.float64)

    @classmethod
    def from_parts(cls, count: int, mean: np.ndarray, m2: np.ndarray) -> ActivationStats:
        """Rebuild an accumulator from stored parts (checked: shapes, finiteness, count)."""
        mean = np.asarray(mean, dtype=np.float64)
        m2 = np.asarray(m2, dtype=np.float64)
        if mean.ndim != 1 or m2.shape != (mean.size, mean.size):
            raise ValueError(
                f"statistics need a mean (D,) and m2 (D, D), got {mean.shape} and {m2.shape}"
            )
        if count < 0 or not (np.isfinite(mean).all() and np.isfinite(m2).all()):
            raise ValueError("statistics hold a negative count or non-finite values")
        stats = cls(mean.size)
        stats.count, stats.mean, stats.m2 = int(count), mean.copy(), m2.copy()
        return stats

    def add(self, vectors: np.ndarray) -> None:
        """Fold in a batch (N, D) (or one vector (D,)) of activations."""
        x = np.asarray(vectors, dtype=np.float64)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected activations (N, {self.dim}), got shape {x.shape}")
        if x.shape[0] == 0:
            return
        if not np.isfinite(x).all():
            raise ValueError("activations contain NaN or inf; the detector's output is broken")
        batch_mean = x.mean(axis=0)
        centred = x - batch_mean
        self._merge(x.shape[0], batch_mean, centred.T @ centred)

    def merge(self, other: ActivationStats) -> ActivationStats:
        """A new accumulator holding the vectors of both (exact pairwise update)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge {self.dim}-d and {other.dim}-d statistics")
        out = ActivationStats.from_parts(self.count, self.mean, self.m2)
        out._merge(other.count, other.mean, other.m2)
        return out

    def _merge(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
        if count == 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + np.outer(delta, delta) * (self.count * count / total)
        self.mean = self.mean + delta * (count / total)
        self.count = total

    def covariance(self, ddof: int = 1) -> np.ndarray:
        """The covariance ``m2 / (count - ddof)``: ddof 1 is the unbiased estimate, 0 the biased."""
        if self.count - ddof < 1:
            raise ValueError(
                f"a covariance with ddof={ddof} needs at least {ddof + 1} videos, got {self.count}"
            )
        cov = self.m2 / (self.count - ddof)
        return (cov + cov.T) / 2  # exactly symmetric
