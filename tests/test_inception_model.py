"""Inception-v1 I3D: TF-SAME padding, endpoints, head, input checks, flow and two-stream."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from i3d.models import InputShapeError, build_model, get_preset
from i3d.models.config import ConfigError, config_from_dict, config_to_dict
from i3d.models.inception import (
    InceptionI3d,
    InceptionI3dConfig,
    MaxPool3dSame,
    TwoStreamConfig,
    TwoStreamI3d,
    Unit3D,
    same_pads,
)

# (size, kernel, stride) -> (before, after), from the table in reference/deepmind/README.md §5
README_PADS = [
    (224, 7, 2, (2, 3)),  # Conv3d_1a_7x7, H/W
    (64, 7, 2, (2, 3)),  # Conv3d_1a_7x7, T even
    (32, 7, 2, (2, 3)),
    (79, 7, 2, (3, 3)),  # Conv3d_1a_7x7, T odd
    (112, 3, 2, (0, 1)),  # MaxPool3d_2a_3x3
    (56, 3, 2, (0, 1)),  # MaxPool3d_3a_3x3
    (28, 3, 2, (0, 1)),  # MaxPool3d_4a_3x3, H/W
    (40, 3, 2, (0, 1)),  # MaxPool3d_4a_3x3, T even
    (41, 3, 2, (1, 1)),  # MaxPool3d_4a_3x3, T odd
    (14, 2, 2, (0, 0)),  # MaxPool3d_5a_2x2, H/W
    (20, 2, 2, (0, 0)),  # MaxPool3d_5a_2x2, T even
    (9, 2, 2, (0, 1)),  # MaxPool3d_5a_2x2, T odd
    (7, 3, 1, (1, 1)),  # every 3x3x3 stride-1 conv / branch-3 pool
    (10, 1, 1, (0, 0)),
]


@pytest.mark.parametrize(("size", "kernel", "stride", "pads"), README_PADS)
def test_same_pads_match_readme_table(size, kernel, stride, pads):
    assert same_pads(size, kernel, stride) == pads
    before, after = pads
    assert (size + before + after - kernel) // stride + 1 == math.ceil(size / stride)


@pytest.mark.parametrize("shape", [(7, 9, 10), (8, 8, 11), (5, 12, 13)])
def test_unit3d_and_maxpool_pad_like_tf(shape):
    torch.manual_seed(0)
    x = torch.randn(1, 2, *shape) - 3.0  # mostly negative: a zero-padded max-pool would differ
    conv = Unit3D(2, 4, (7, 7, 7), (2, 2, 2), use_bn=False, activation=False, bias=True)
    pool = MaxPool3dSame((3, 3, 3), (2, 2, 2))
    conv_pads = [p for n in reversed(shape) for p in same_pads(n, 7, 2)]
    pool_pads = [p for n in reversed(shape) for p in same_pads(n, 3, 2)]
    want_conv = F.conv3d(F.pad(x, conv_pads), conv.conv3d.weight, conv.conv3d.bias, 2)
    want_pool = F.max_pool3d(F.pad(x, pool_pads, value=-math.inf), 3, 2)
    assert torch.allclose(conv(x), want_conv, atol=1e-5)
    assert torch.equal(pool(x), want_pool)
    assert tuple(want_pool.shape[2:]) == tuple(math.ceil(n / 2) for n in shape)
    sym = MaxPool3dSame((3, 3, 3), (1, 1, 1))(x)  # symmetric pads take the fast path
    assert torch.equal(sym, F.max_pool3d(F.pad(x, [1] * 6, value=-math.inf), 3, 1))


@pytest.fixture(scope="module")
def rgb_model() -> InceptionI3d:
    torch.manual_seed(0)
    return build_model(get_preset("inception_i3d_rgb", num_classes=10)).eval()


@pytest.mark.parametrize("frames", [16, 32])
def test_endpoint_shapes(rgb_model, frames):
    x = torch.randn(1, 3, frames, 64, 64)
    with torch.no_grad():
        out = rgb_model.endpoints(x, list(rgb_model.endpoint_names[:-1]))
    t = frames // 2
    want = {
        "Conv3d_1a_7x7": (64, t, 32, 32),
        "MaxPool3d_2a_3x3": (64, t, 16, 16),
        "Conv3d_2b_1x1": (64, t, 16, 16),
        "Conv3d_2c_3x3": (192, t, 16, 16),
        "MaxPool3d_3a_3x3": (192, t, 8, 8),
        "Mixed_3b": (256, t, 8, 8),
        "Mixed_3c": (480, t, 8, 8),
        "MaxPool3d_4a_3x3": (480, t // 2, 4, 4),
        "Mixed_4b": (512, t // 2, 4, 4),
        "Mixed_4c": (512, t // 2, 4, 4),
        "Mixed_4d": (512, t // 2, 4, 4),
        "Mixed_4e": (528, t // 2, 4, 4),
        "Mixed_4f": (832, t // 2, 4, 4),
        "MaxPool3d_5a_2x2": (832, t // 4, 2, 2),
        "Mixed_5b": (832, t // 4, 2, 2),
        "Mixed_5c": (1024, t // 4, 2, 2),
    }
    assert {k: tuple(v.shape[1:]) for k, v in out.items()} == want
    with torch.no_grad():
        assert torch.equal(rgb_model.features(x), out["Mixed_5c"])


@pytest.mark.parametrize(("frames", "t5"), [(79, 10), (64, 8), (32, 4), (9, 2)])
def test_temporal_length_after_mixed_5c(rgb_model, frames, t5):
    with torch.no_grad():
        assert rgb_model.features(torch.randn(1, 3, frames, 8, 8)).shape[2] == t5


def test_head_is_pooled_conv_averaged_over_time_and_space(rgb_model):
    m5c = torch.randn(2, 1024, 3, 8, 8)  # 3 steps -> two (2, 7, 7) windows; 8x8 -> 2x2 positions
    with torch.no_grad():
        got = rgb_model.head(m5c)
    t_weights = torch.tensor([0.5, 1.0, 0.5]) / 2  # the first/last step count half
    windows = F.avg_pool3d(m5c, (1, 7, 7), stride=1).mean(dim=(3, 4))
    pooled = (windows * t_weights).sum(dim=2)
    conv = rgb_model.logits.conv3d
    assert torch.allclose(got, pooled @ conv.weight.flatten(1).T + conv.bias, atol=1e-5)


def test_forward_at_smallest_valid_size(rgb_model):
    x = torch.randn(1, 3, 9, 193, 193)
    with torch.no_grad():
        out = rgb_model.endpoints(x, ["Mixed_5c", "Logits"])
        assert tuple(out["Mixed_5c"].shape) == (1, 1024, 2, 7, 7)
        assert torch.allclose(out["Logits"], rgb_model.head(out["Mixed_5c"]))
        assert torch.equal(rgb_model(x), out["Logits"])


@pytest.mark.parametrize("shape", [(8, 224, 224), (1, 224, 224), (16, 112, 112), (16, 224, 160)])
def test_short_or_small_clip_is_a_clear_error(rgb_model, shape):
    x = torch.randn(1, 3, *shape)
    with pytest.raises(InputShapeError, match="at least 9 frames"):
        rgb_model(x)
    with pytest.raises(InputShapeError, match="at least 9 frames"):
        rgb_model.endpoints(x, ["Logits"])


def test_wrong_channels_and_layout_are_clear_errors(rgb_model):
    with pytest.raises(InputShapeError, match="channels"):
        rgb_model(torch.randn(1, 16, 224, 224, 3))
    with pytest.raises(InputShapeError, match="fold views"):
        rgb_model.features(torch.randn(1, 2, 3, 9, 32, 32))


def test_flow_stream():
    flow = build_model("inception_i3d_flow")
    assert flow.in_channels == 2 and flow.Conv3d_1a_7x7.conv3d.weight.shape == (64, 2, 7, 7, 7)
    with torch.no_grad():
        assert flow.features(torch.randn(2, 2, 9, 32, 32)).shape == (2, 1024, 2, 1, 1)
    with pytest.raises(InputShapeError, match="expected 2 channels"):
        flow(torch.randn(1, 3, 9, 224, 224))


def test_layout_matches_pytorch_i3d():
    model = build_model("inception_i3d_rgb")
    state = model.state_dict()
    # README §7: 344 pytorch-i3d keys; 12,689,984 trainable values + one BN scale per channel
    assert len(state) == 344
    assert {
        "Conv3d_1a_7x7.conv3d.weight",
        "Mixed_3b.b1a.bn.running_mean",
        "logits.conv3d.bias",
    } <= set(state)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert len(bns) == 57 and all(m.eps == 1e-3 and not m.weight.requires_grad for m in bns)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 12_689_984


def test_two_stream_sums_stream_logits(monkeypatch):
    torch.manual_seed(0)
    model = build_model(get_preset("inception_i3d_two_stream")).eval()
    assert isinstance(model, TwoStreamI3d)
    maps = {"rgb": torch.randn(1, 1024, 3, 7, 7), "flow": torch.randn(1, 1024, 2, 7, 7)}
    for name in maps:  # the trunks are tested above; stub them to keep this test fast
        monkeypatch.setattr(getattr(model, name), "trunk", lambda x, name=name: maps[name])
    rgb, flow = torch.randn(1, 3, 17, 224, 224), torch.randn(1, 2, 10, 224, 224)
    with torch.no_grad():
        fused = model(rgb, flow)
        want = model.rgb.head(maps["rgb"]) + model.flow.head(maps["flow"])
        assert torch.equal(fused, want)
        assert torch.allclose(model.predict(rgb, flow), want.softmax(dim=-1))
    assert fused.shape == (1, 400)
    with pytest.raises(InputShapeError, match="same batch"):
        model(rgb, torch.randn(2, 2, 9, 224, 224))
    with pytest.raises(InputShapeError, match="expected 2 channels"):
        model(rgb, rgb)


def test_configs_round_trip_and_validate():
    for name in ("inception_i3d_rgb", "inception_i3d_flow", "inception_i3d_two_stream"):
        config = get_preset(name)
        assert config_from_dict(config_to_dict(config)) == config
    assert get_preset("inception_i3d_two_stream").flow.in_channels == 2
    with pytest.raises(ConfigError, match="share the class list"):
        TwoStreamConfig(flow=get_preset("inception_i3d_flow", num_classes=600))
    with pytest.raises(ConfigError, match="in_channels"):
        InceptionI3dConfig(in_channels=0)
