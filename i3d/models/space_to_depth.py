"""Strided stem convolutions rewritten as space-to-depth + a stride-1 convolution (exact).

A stem convolution sees 3 input channels (RGB) or 2 (flow). Matrix units such as AMX
multiply tiles that are 32 bf16 values deep, so a convolution reducing over 3 channels leaves
most of each tile empty: on an AMX Xeon, OpenVINO ran ResNet-50 I3D's 3×5×7×7 stem at a
fifth of the bf16 peak, 45% of a clip's time for 21% of its FLOPs. Folding each stride-s
block of the input into channels (s_t·s_h·s_w times as many) turns a k-wide kernel of stride
s into a ⌈k/s⌉-wide kernel of stride 1 that computes the same sums. The zero taps add FLOPs
(1.57× for ResNet's stem), which fp32 does not win back, so OpenVINO's bf16 and int8 use the
rewrite on AMX CPUs (NL-R50 on an AMX Xeon: bf16 13.0 → 15.9 clips/s, int8 16.2 → 27.3) and
fp32 does not.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

MAX_STEM_CHANNELS = 4
"""Convolutions with at most this many input channels are rewritten (RGB and flow stems)."""


class SpaceToDepthConv3d(nn.Module):
    """The same map as a strided ``nn.Conv3d`` (groups 1, dilation 1), computed as
    space-to-depth of the padded input by the stride, then a stride-1 convolution."""

    def __init__(self, conv: nn.Conv3d) -> None:
        super().__init__()
        if conv.groups != 1 or conv.dilation != (1, 1, 1) or conv.padding_mode != "zeros":
            raise ValueError("only ungrouped, undilated, zero-padded convolutions are rewritten")
        if isinstance(conv.padding, str):
            raise ValueError("string padding cannot be rewritten; give explicit pads")
        self.kernel = tuple(int(k) for k in conv.kernel_size)
        self.stride = tuple(int(s) for s in conv.stride)
        self.padding = tuple(int(p) for p in conv.padding)
        self.taps = tuple(math.ceil(k / s) for k, s in zip(self.kernel, self.stride, strict=True))
        weight = conv.weight.detach()
        out_channels, in_channels = weight.shape[:2]
        (at, ah, aw), (st, sh, sw) = self.taps, self.stride
        extra = [a * s - k for a, s, k in zip(self.taps, self.stride, self.kernel, strict=True)]
        padded = F.pad(weight, [0, extra[2], 0, extra[1], 0, extra[0]])  # zero taps
        folded = padded.reshape(out_channels, in_channels, at, st, ah, sh, aw, sw)
        folded = folded.permute(0, 1, 3, 5, 7, 2, 4, 6)
        self.weight = nn.Parameter(
            folded.reshape(out_channels, in_channels * st * sh * sw, at, ah, aw).contiguous(),
            requires_grad=False,
        )
        bias = conv.bias.detach() if conv.bias is not None else None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, *size = x.shape
        blocks, pads = [], []
        for d in (2, 1, 0):  # F.pad lists the last dimension first
            k, s, p, a = self.kernel[d], self.stride[d], self.padding[d], self.taps[d]
            out = (size[d] + 2 * p - k) // s + 1
            used = (out + a - 1) * s  # input positions the folded kernel reads
            pads += [p, used - size[d] - p]  # a negative right pad drops what is never read
            blocks.insert(0, used // s)
        x = F.pad(x, pads)
        (t, h, w), (st, sh, sw) = blocks, self.stride
        x = x.reshape(n, c, t, st, h, sh, w, sw).permute(0, 1, 3, 5, 7, 2, 4, 6)
        x = x.reshape(n, c * st * sh * sw, t, h, w)
        return F.conv3d(x, self.weight, self.bias)


def space_to_depth_stem(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose strided convolutions with at most
    :data:`MAX_STEM_CHANNELS` input channels are :class:`SpaceToDepthConv3d`; the
    original is untouched, and a model without such a convolution comes back as a copy."""
    rewritten = copy.deepcopy(model)
    for parent in list(rewritten.modules()):
        for name, child in list(parent.named_children()):
            if (
                isinstance(child, nn.Conv3d)
                and child.in_channels <= MAX_STEM_CHANNELS
                and any(s > 1 for s in child.stride)
                and child.groups == 1
                and child.dilation == (1, 1, 1)
                and not isinstance(child.padding, str)
            ):
                setattr(parent, name, SpaceToDepthConv3d(child))
    return rewritten
