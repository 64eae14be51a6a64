"""Per-sample random generators: any training sample can be reproduced on its own."""

from __future__ import annotations

import numpy as np


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Generator for sample ``index`` in ``epoch``; independent of worker, rank and order."""
    if min(seed, epoch, index) < 0:
        raise ValueError(f"seed, epoch and index must be >= 0, got {seed}, {epoch}, {index}")
    return np.random.default_rng([seed, epoch, index])
