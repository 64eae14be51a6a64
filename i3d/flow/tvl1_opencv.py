"""The reference TV-L1: OpenCV's ``cv2.optflow.DualTVL1OpticalFlow`` (opencv-contrib, optional)."""

from __future__ import annotations

from types import ModuleType

import numpy as np

from i3d.flow.params import OPENCV_DEFAULTS, TVL1Params

INSTALL_HINT = (
    "the opencv TV-L1 needs opencv-contrib: pip install opencv-contrib-python-headless "
    "(or use --impl torch)"
)


class OpenCVMissingError(ImportError):
    """opencv-contrib (``cv2.optflow``) is not installed."""


def opencv_optflow() -> ModuleType:
    """The ``cv2`` module if it has the contrib ``optflow`` module, else a clear error."""
    try:
        import cv2
    except ImportError:
        raise OpenCVMissingError(INSTALL_HINT) from None
    if not hasattr(cv2, "optflow"):
        raise OpenCVMissingError(
            f"cv2 {cv2.__version__} has no optflow module (plain opencv-python); {INSTALL_HINT}"
        )
    return cv2


def opencv_available() -> bool:
    """Whether the OpenCV reference can run here (cv2 with the contrib optflow module)."""
    try:
        opencv_optflow()
    except OpenCVMissingError:
        return False
    return True


def opencv_tvl1_solver(params: TVL1Params = OPENCV_DEFAULTS) -> object:
    """A ``DualTVL1OpticalFlow`` object set to ``params`` (reusable across pairs)."""
    cv2 = opencv_optflow()
    return cv2.optflow.DualTVL1OpticalFlow_create(
        tau=params.tau,
        lambda_=params.lambda_,
        theta=params.theta,
        nscales=params.nscales,
        warps=params.warps,
        epsilon=params.epsilon,
        innnerIterations=params.inner_iterations,  # (sic) OpenCV's keyword
        outerIterations=params.outer_iterations,
        scaleStep=params.scale_step,
        gamma=params.gamma,
        medianFiltering=params.median_filtering,
        useInitialFlow=params.use_initial_flow,
    )


def opencv_tvl1_flow(
    frames0: np.ndarray, frames1: np.ndarray, params: TVL1Params = OPENCV_DEFAULTS
) -> np.ndarray:
    """OpenCV TV-L1 per pair of (N, H, W) uint8 greyscale frames → (N, 2, H, W) float32 flow."""
    if frames0.shape != frames1.shape or frames0.ndim != 3:
        raise ValueError(
            f"TV-L1 needs two (N, H, W) stacks of one shape, got {frames0.shape} and "
            f"{frames1.shape}"
        )
    solver = opencv_tvl1_solver(params)
    flows = [
        solver.calc(np.ascontiguousarray(a), np.ascontiguousarray(b), None)
        for a, b in zip(frames0, frames1, strict=True)
    ]
    return np.stack(flows).transpose(0, 3, 1, 2).astype(np.float32, copy=False)
