"""The space-to-depth stem rewrite computes what the strided convolution does."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from i3d.models import build_model, get_preset
from i3d.models.inception import Unit3D
from i3d.models.space_to_depth import SpaceToDepthConv3d, space_to_depth_stem


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "size", "bias"),
    [
        ((5, 7, 7), (2, 2, 2), (2, 3, 3), (12, 30, 31), False),  # ResNet-50 I3D's stem
        ((7, 7, 7), (2, 2, 2), (0, 0, 0), (15, 21, 20), True),  # Inception's, pads outside
        ((1, 7, 7), (1, 2, 2), (0, 3, 3), (5, 17, 18), False),  # stride 1 in time
        ((3, 3, 3), (3, 2, 1), (1, 0, 1), (10, 11, 9), True),
    ],
)
def test_it_equals_the_strided_convolution(kernel, stride, padding, size, bias):
    torch.manual_seed(0)
    conv = nn.Conv3d(3, 8, kernel, stride, padding, bias=bias).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        want, got = conv(x), SpaceToDepthConv3d(conv)(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_unsupported_convolutions_are_refused():
    with pytest.raises(ValueError, match="ungrouped, undilated"):
        SpaceToDepthConv3d(nn.Conv3d(4, 4, 3, 2, groups=2))
    with pytest.raises(ValueError, match="string padding"):
        SpaceToDepthConv3d(nn.Conv3d(3, 4, 3, 1, padding="same"))


def test_resnet_and_inception_stems_are_rewritten_and_the_logits_kept():
    """Only the strided RGB stem changes (ResNet's ConvBN conv, Inception's TF-SAME Unit3D);
    the original model is untouched and the outputs are the same."""
    torch.manual_seed(0)
    resnet = build_model(get_preset("i3d_r50", depth=18, base_channels=8)).double().eval()
    x = torch.randn(1, 3, 8, 48, 48, dtype=torch.float64)
    fast = space_to_depth_stem(resnet)
    assert isinstance(fast.backbone.conv1.conv, SpaceToDepthConv3d)
    assert isinstance(resnet.backbone.conv1.conv, nn.Conv3d)
    rewritten = [m for m in fast.modules() if isinstance(m, SpaceToDepthConv3d)]
    assert len(rewritten) == 1
    with torch.no_grad():
        torch.testing.assert_close(fast(x), resnet(x), rtol=0, atol=1e-10)
    unit = Unit3D(3, 8, (7, 7, 7), (2, 2, 2)).double().eval()
    holder = nn.Sequential(unit)
    fast_unit = space_to_depth_stem(holder)[0]
    assert isinstance(fast_unit.conv3d, SpaceToDepthConv3d)
    clip = torch.randn(1, 3, 9, 29, 30, dtype=torch.float64)  # uneven TF-SAME pads
    with torch.no_grad():
        torch.testing.assert_close(fast_unit(clip), unit(clip), rtol=0, atol=1e-10)
