"""Fréchet Video Distance with named, recorded protocols (``i3d.fvd(real, fake)``).

``stats`` (streaming float64 mean/covariance), ``frechet`` (the distance, with a stable
matrix square root), ``protocols`` (tf, stylegan-v, cd-fvd, common-metrics,
common-metrics-videogpt), ``resize`` (each protocol's resize), ``inputs`` (arrays, array
files, video folders), ``extract`` (detector activations on 1 or N processes) and ``api``
(:func:`fvd`, statistics files).
"""

import sys
import types
from typing import Any

from i3d.fvd.api import (
    FVDResult,
    FVDStats,
    FVDWarning,
    StatsMismatchError,
    compute_stats,
    fvd,
    fvd_from_stats,
    load_stats,
    save_stats,
)
from i3d.fvd.frechet import frechet_distance, trace_sqrt_product
from i3d.fvd.protocols import PROTOCOLS, ClipError, Protocol, get_protocol
from i3d.fvd.stats import ActivationStats

__all__ = [
    "PROTOCOLS",
    "ActivationStats",
    "ClipError",
    "FVDResult",
    "FVDStats",
    "FVDWarning",
    "Protocol",
    "StatsMismatchError",
    "compute_stats",
    "frechet_distance",
    "fvd",
    "fvd_from_stats",
    "get_protocol",
    "load_stats",
    "save_stats",
    "trace_sqrt_product",
]


class _CallablePackage(types.ModuleType):
    """``i3d.fvd`` is this package and, called, :func:`i3d.fvd.api.fvd`: ``i3d.fvd(real, fake)``."""

    def __call__(self, *args: Any, **kwargs: Any) -> FVDResult:
        return fvd(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
