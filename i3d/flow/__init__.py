"""Optical flow for the I3D Flow stream: TV-L1 (PyTorch or OpenCV) or RAFT, DeepMind's recipe."""

from i3d.flow.metrics import end_point_error
from i3d.flow.params import OPENCV_DEFAULTS, TVL1Params
from i3d.flow.recipe import (
    FLOW_BOUND,
    IMPLEMENTATIONS,
    FlowConfig,
    check_flow,
    deepmind_flow,
    frame_flow,
    pair_flow,
    rgb_to_gray,
    scale_flow,
)
from i3d.flow.tvl1_opencv import OpenCVMissingError, opencv_available, opencv_tvl1_flow
from i3d.flow.tvl1_torch import tvl1_flow
from i3d.flow.video import iter_video_flow, video_flow

__all__ = [
    "FLOW_BOUND",
    "IMPLEMENTATIONS",
    "OPENCV_DEFAULTS",
    "FlowConfig",
    "OpenCVMissingError",
    "TVL1Params",
    "check_flow",
    "deepmind_flow",
    "end_point_error",
    "frame_flow",
    "iter_video_flow",
    "opencv_available",
    "opencv_tvl1_flow",
    "pair_flow",
    "rgb_to_gray",
    "scale_flow",
    "tvl1_flow",
    "video_flow",
]
