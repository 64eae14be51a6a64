"""TV-L1 parameters, with OpenCV's ``DualTVL1OpticalFlow_create`` defaults and their meaning.

The defaults are those of ``cv::optflow::DualTVL1OpticalFlow::create`` (opencv_contrib 4.x /
5.x, ``modules/optflow/src/tvl1flow.cpp`` constructor; read back from
``cv2.optflow.DualTVL1OpticalFlow_create()`` getters on opencv-contrib-python 5.0.0), which is
what DeepMind-style TV-L1 extraction (mmaction2's denseflow, video_features) runs unchanged.
"""

from __future__ import annotations

import attrs


def _positive(instance: object, attribute: attrs.Attribute, value: float) -> None:
    if value <= 0:
        raise ValueError(f"TV-L1 {attribute.name} must be positive, got {value}")


def _at_least_one(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if value < 1:
        raise ValueError(f"TV-L1 {attribute.name} must be at least 1, got {value}")


def _median_size(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if value > 1 and value % 2 == 0:
        raise ValueError(f"TV-L1 median_filtering must be odd (or <= 1 for none), got {value}")


@attrs.frozen
class TVL1Params:
    """Dual TV-L1 settings (Zach, Pock & Bischof 2007; Sánchez et al., IPOL 2013)."""

    tau: float = attrs.field(default=0.25, validator=_positive)
    """Time step of the primal-dual scheme (stable for tau <= 1/4)."""
    lambda_: float = attrs.field(default=0.15, validator=_positive)
    """Weight of the data (L1 brightness) term: smaller gives smoother flow."""
    theta: float = attrs.field(default=0.3, validator=_positive)
    """Coupling between the flow u and its auxiliary copy v (the thresholding step)."""
    nscales: int = attrs.field(default=5, validator=_at_least_one)
    """Pyramid levels (fewer when a level would be under 16 pixels on a side)."""
    warps: int = attrs.field(default=5, validator=_at_least_one)
    """Times per level that I1 and its gradient are re-warped by the current flow."""
    epsilon: float = attrs.field(default=0.01, validator=_positive)
    """Stop a warp once the mean squared flow update falls to epsilon²."""
    inner_iterations: int = attrs.field(default=30, validator=_at_least_one)
    """Primal-dual iterations between two median filterings."""
    outer_iterations: int = attrs.field(default=10, validator=_at_least_one)
    """Median-filter rounds per warp (so at most inner × outer iterations a warp)."""
    scale_step: float = attrs.field(default=0.8)
    """Size ratio of consecutive pyramid levels."""
    gamma: float = 0.0
    """Weight of the illumination term; OpenCV's default 0 (none) is the only one supported."""
    median_filtering: int = attrs.field(default=5, validator=_median_size)
    """Median filter size applied to the flow before each outer round (<= 1: none)."""
    use_initial_flow: bool = False
    """Start from a given flow; OpenCV's default False (start at zero) is the one supported."""

    def __attrs_post_init__(self) -> None:
        if not 0 < self.scale_step < 1:
            raise ValueError(f"TV-L1 scale_step must be in (0, 1), got {self.scale_step}")
        if self.gamma != 0:
            raise ValueError("TV-L1 gamma (illumination term) other than 0 is not supported")
        if self.use_initial_flow:
            raise ValueError("TV-L1 use_initial_flow is not supported; flow starts at zero")


OPENCV_DEFAULTS = TVL1Params()
"""OpenCV's defaults: tau 0.25, lambda 0.15, theta 0.3, 5 scales, 5 warps, epsilon 0.01,
30 inner × 10 outer iterations, scale step 0.8, gamma 0, 5×5 median, no initial flow."""
