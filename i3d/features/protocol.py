"""How a video becomes a sequence of snippets: windows, stride, frame rate, tail, crops.

A video of N frames on its timeline (the frames at ``fps``, or all of them) gives snippets
of ``window`` consecutive timeline frames every ``stride`` frames. With ``anchor="start"``
snippet j covers frames [j·S, j·S + W); with ``anchor="center"`` it is centred on frame j·S
(frames [j·S − ⌊W/2⌋, j·S − ⌊W/2⌋ + W)), one snippet per S frames. ``tail`` says what
happens where a window runs past the video:

- ``drop``: only windows inside the video, ⌊(N − W) / S⌋ + 1 of them (none when N < W);
- ``pad``: windows until one reaches the last frame, 1 + ⌈max(N − W, 0) / S⌉ of them, the
  frames past the end zero in the model's input space (after normalisation);
- ``repeat``: the same windows, the frames past the end copies of the last frame (and of
  the first before the start, for centred windows);
- ``loop``: the same windows, a window's frames past the end its own frames again from its
  first (a short window looped, as RTFM's ``LoopPad``).

``lookahead`` frames after a window must exist too for ``drop`` (video_features reads W + 1
frames per stack, for the flow pair of its last frame): ⌊(N − W − lookahead) / S⌋ + 1.

Centred windows give ⌈N / S⌉ snippets (one per frame at stride 1) and pad or repeat at both
ends; they cannot ``drop`` or ``loop``. For the flow stream they stay centred on frames (flow
tick t from frame t to t + 1), and flow past the edges is zero: copies of a frame do not move.

The spatial fields (None: the weights' test protocol) say how frames are resized, cropped and
normalised, and ``pool`` how the endpoint's map becomes a vector; see
:mod:`i3d.features.frames`.
"""

from __future__ import annotations

from typing import Literal

import attrs
import numpy as np

Tail = Literal["drop", "pad", "repeat", "loop"]
Anchor = Literal["start", "center"]
TAILS = ("drop", "pad", "repeat", "loop")
ANCHORS = ("start", "center")
CROPS = (1, 3, 10)
RESAMPLERS = ("cv2-bilinear", "pil-bilinear", "pil-lanczos")
SIZE_RULES = ("round", "floor")
CROP_ORDERS = ("mmaction", "torchvision", "oversample")
FLOW_RESOLUTIONS = ("resized", "source")
POOLS = ("mean", "i3d")


def _positive(_instance: object, attribute: attrs.Attribute, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{attribute.name} must be a positive integer, got {value!r}")


def _one_of(choices: tuple) -> object:
    def check(_instance: object, attribute: attrs.Attribute, value: object) -> None:
        if value not in choices:
            raise ValueError(f"{attribute.name} must be one of {choices}, got {value!r}")

    return check


def _optional_pair(value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    width, height = value  # type: ignore[misc]
    return int(width), int(height)


def _optional_floats(value: object) -> tuple[float, ...] | None:
    return None if value is None else tuple(float(v) for v in value)  # type: ignore[union-attr]


def _optional_eps(_instance: object, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{attribute.name} must be > 0 (or None: the weights' own), got {value}")


def _optional_rate(_instance: object, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and not (isinstance(value, int | float) and 0 < value <= 1000):
        raise ValueError(f"{attribute.name} must be a frame rate in (0, 1000], got {value!r}")


@attrs.frozen
class SnippetProtocol:
    """Everything that decides a video's snippets and their features (recorded with them).

    Spatial (None: the weights' test protocol): ``frame_size`` (width, height) resizes every
    frame to a fixed size, aspect ignored; else ``resize_short`` scales the short side, the
    long one rounded (``size_rule="round"``, mmcv) or truncated (``"floor"``, torchvision and
    PIL-based extractors); ``resampler`` is OpenCV's INTER_LINEAR (bit-exact) or Pillow's
    filter; ``crops`` of ``crop_size``, 10 crops in ``crop_order``; pixels mapped to
    ``value_range`` then ``(x - mean) / std``. ``endpoint`` (None: the model's last feature
    map before its classifier) becomes one vector per snippet and crop by ``pool``: ``mean``
    over time and space, or ``i3d`` (AvgPool3d (2, 7, 7), stride 1, then the mean of what is
    left: pytorch-i3d's and kinetics-i3d's feature head). ``batchnorm_eps`` (None: the
    weights' own) replaces every BatchNorm's epsilon, for protocols whose extractor runs a port
    of the network that normalises differently (video_features' I3D keeps PyTorch's 1e-5).
    ``flow_resolution`` says where the flow stream's optical flow is computed: on the resized
    frames (DeepMind's recipe), or on the decoded ones, the field of pixel displacements then
    resized as a frame is (OpenCV, vectors not rescaled) and cropped (MS-TCN's extractor).
    """

    window: int = attrs.field(validator=_positive)
    stride: int = attrs.field(validator=_positive)
    fps: float | None = attrs.field(default=None, validator=_optional_rate)
    tail: Tail = attrs.field(default="drop", validator=_one_of(TAILS))
    anchor: Anchor = attrs.field(default="start", validator=_one_of(ANCHORS))
    crops: int = attrs.field(default=1, validator=_one_of(CROPS))
    lookahead: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    endpoint: str | None = None
    pool: str = attrs.field(default="mean", validator=_one_of(POOLS))
    resize_short: int | None = None
    frame_size: tuple[int, int] | None = attrs.field(default=None, converter=_optional_pair)
    size_rule: str = attrs.field(default="round", validator=_one_of(SIZE_RULES))
    resampler: str | None = attrs.field(default=None, validator=_one_of((None, *RESAMPLERS)))
    crop_size: int | None = None
    crop_order: str = attrs.field(default="mmaction", validator=_one_of(CROP_ORDERS))
    value_range: tuple[float, float] | None = attrs.field(default=None, converter=_optional_floats)
    mean: tuple[float, ...] | None = attrs.field(default=None, converter=_optional_floats)
    std: tuple[float, ...] | None = attrs.field(default=None, converter=_optional_floats)
    batchnorm_eps: float | None = attrs.field(default=None, validator=_optional_eps)
    flow_resolution: str = attrs.field(default="resized", validator=_one_of(FLOW_RESOLUTIONS))

    def __attrs_post_init__(self) -> None:
        if self.anchor == "center" and self.tail in ("drop", "loop"):
            raise ValueError(
                "centred windows cover the start and end of the video with frames that are not "
                "there: use tail 'pad' or 'repeat' with anchor 'center'"
            )
        if self.flow_resolution == "source" and not (self.resampler or "cv2-").startswith("cv2-"):
            raise ValueError(
                "flow computed on the decoded frames is resized with OpenCV: use a cv2 "
                f"resampler with flow_resolution 'source', not {self.resampler!r}"
            )

    def count(self, frames: int) -> int:
        """Number of snippets of a video with ``frames`` frames on its timeline."""
        if frames < 0:
            raise ValueError(f"a video cannot have {frames} frames")
        if frames == 0:
            return 0
        if self.anchor == "center":
            return -(-frames // self.stride)
        if self.tail == "drop":
            usable = frames - self.lookahead
            return 0 if usable < self.window else (usable - self.window) // self.stride + 1
        return 1 + -(-max(frames - self.window, 0) // self.stride)

    def starts(self, frames: int) -> np.ndarray:
        """First timeline frame of each snippet (negative for centred windows at the start)."""
        first = self.window // 2 if self.anchor == "center" else 0
        return np.arange(self.count(frames), dtype=np.int64) * self.stride - first

    def to_dict(self) -> dict[str, object]:
        """JSON-able settings (tuples as lists), as the manifest records them."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.asdict(self).items()}
