"""2D ResNet → I3D inflation: weights, report, and the defining per-frame property."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from i3d.models import build_model
from i3d.models.config import RESNET_STAGE_BLOCKS
from i3d.weights.format import WeightsError, load_model, read_info
from i3d.weights.inflate import (
    convert_torchvision_2d,
    infer_resnet2d,
    inflate_conv2d,
    inflate_resnet2d,
)

# ---------------------------------------------------------------- a torchvision-layout 2D ResNet


class Basic2d(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(inplanes, planes, stride, self.expansion)

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck2d(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5: stride on 3x3
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = _downsample(inplanes, planes, stride, self.expansion)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


def _downsample(inplanes: int, planes: int, stride: int, expansion: int) -> nn.Module | None:
    if stride == 1 and inplanes == planes * expansion:
        return None
    return nn.Sequential(
        nn.Conv2d(inplanes, planes * expansion, 1, stride, bias=False),
        nn.BatchNorm2d(planes * expansion),
    )


class ResNet2d(nn.Module):
    """torchvision ``resnetXX(width_per_group=...)`` key layout, any width (no torchvision here)."""

    def __init__(self, depth: int, width: int, num_classes: int = 10) -> None:
        super().__init__()
        block = Basic2d if depth < 50 else Bottleneck2d
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = width
        for i, n in enumerate(RESNET_STAGE_BLOCKS[depth]):
            planes = width * 2**i
            layers = []
            for b in range(n):
                layers.append(block(inplanes, planes, 2 if i > 0 and b == 0 else 1))
                inplanes = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
        self.fc = nn.Linear(inplanes, num_classes)
        _random_bn(self, depth * 1000 + width)


def _random_bn(net: nn.Module, seed: int) -> None:
    """Non-trivial BN statistics, so that copying them matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.2, 0.2, generator=gen)
                m.running_mean.uniform_(-0.2, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.num_batches_tracked.fill_(7)


def _endpoints_2d(net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stem and stage outputs of a torchvision-layout 2D ResNet."""
    out = {"stem": net.maxpool(torch.relu(net.bn1(net.conv1(x))))}
    x = out["stem"]
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = out[name] = getattr(net, name)(x)
    return out


def _resnet2d(depth: int, width: int) -> ResNet2d:
    torch.manual_seed(depth + width)
    return ResNet2d(depth, width).eval()


# ---------------------------------------------------------------- inflate_conv2d


def test_inflate_conv2d_average_and_center():
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    avg = inflate_conv2d(w, 5)
    assert avg.shape == (4, 3, 5, 3, 3)
    for t in range(5):
        assert torch.equal(avg[:, :, t], w / 5)
    center = inflate_conv2d(w, 3, mode="center")
    assert torch.equal(center[:, :, 1], w)
    assert not center[:, :, 0].any() and not center[:, :, 2].any()
    assert torch.allclose(center.sum(2), w) and torch.allclose(avg.sum(2), w)
    with pytest.raises(WeightsError, match="4-D"):
        inflate_conv2d(torch.zeros(4, 3, 3), 3)
    with pytest.raises(ValueError, match="average"):
        inflate_conv2d(w, 3, mode="edge")


# ---------------------------------------------------------------- weights and report


def test_r50_every_backbone_tensor_inflated_or_copied():
    net = _resnet2d(50, 8)
    sd2 = net.state_dict()
    sd3, report = inflate_resnet2d(sd2, "i3d_r50")
    assert (report.config.depth, report.config.base_channels) == (50, 8)
    model_keys = list(build_model(report.config).state_dict())
    assert list(sd3) == model_keys
    # r50: nothing in the backbone left at init; only the (untrained) head and the 2D fc
    assert set(report.not_inflated) == {"cls_head.fc_cls.weight", "cls_head.fc_cls.bias"}
    assert set(report.unused_2d) == {"fc.weight", "fc.bias"}
    assert len(report.inflated) == 318 and len(sd2) == 320
    convs = 0
    for key3 in report.inflated:
        name = key3.removeprefix("backbone.")
        if name.endswith(".conv.weight"):
            base = name.removesuffix(".conv.weight")
            key2 = f"{base}.0.weight" if base.endswith("downsample") else f"{base}.weight"
            w2, w3 = sd2[key2], sd3[key3]
            assert torch.equal(w3, w2.unsqueeze(2).expand_as(w3) / w3.shape[2]), key3
            convs += 1
        else:
            base, _, buf = name.rpartition(".bn.")
            parent, _, leaf = base.rpartition(".")
            bn2 = f"{base}.1" if leaf == "downsample" else f"{parent}.{leaf.replace('conv', 'bn')}"
            assert torch.equal(sd3[key3], sd2[f"{bn2.lstrip('.')}.{buf}"]), key3
    assert convs == 53
    kt = {k: sd3[k].shape[2] for k in report.inflated if k.endswith("conv.weight")}
    assert kt["backbone.conv1.conv.weight"] == 5
    assert kt["backbone.layer1.0.conv1.conv.weight"] == 3
    assert kt["backbone.layer2.1.conv1.conv.weight"] == 1


def test_nl_dot_product_leaves_exactly_the_nonlocal_keys(reference):
    sd2 = _resnet2d(50, 8).state_dict()
    sd3, report = inflate_resnet2d(sd2, "i3d_r50_nl_dot_product")
    backbone_left = [
        k.removeprefix("backbone.") for k in report.not_inflated if "cls_head" not in k
    ]
    expected = json.loads((reference / "mmaction/nl-dot-product/manifest.json").read_text())
    nl_keys = [k for k, *_ in expected["state_dict"] if ".non_local_block." in k]
    assert len(backbone_left) == 60
    assert sorted(f"backbone.{k}" for k in backbone_left) == sorted(nl_keys)
    # non-local blocks keep mmcv's init: zeroed output BN (identity at the start of training)
    fresh = build_model(report.config).state_dict()
    for key in nl_keys:
        if "conv_out.bn.weight" in key:
            assert not sd3[key].any()
        assert sd3[key].shape == fresh[key].shape


def test_config_keeps_preset_pattern_and_takes_size_from_2d():
    sd3, report = inflate_resnet2d(_resnet2d(18, 8).state_dict(), "i3d_r50_heavy", num_classes=7)
    c = report.config
    assert (c.depth, c.base_channels, c.head.num_classes) == (18, 8, 7)
    assert c.block_flags("inflate", as_int=True) == ((1, 1),) * 4 and c.conv1_stride_t == 1
    _, report = inflate_resnet2d(_resnet2d(18, 8).state_dict(), "i3d_r50_nl_gaussian")
    flags = report.config.block_flags
    assert flags("inflate", as_int=True) == ((1, 1), (1, 0), (1, 0), (0, 1))
    assert flags("non_local", as_int=True) == ((0, 0), (0, 1), (0, 1), (0, 0))
    assert sd3["cls_head.fc_cls.weight"].shape == (7, 8 * 8)


# ---------------------------------------------------------------- the defining property


def _check_per_frame(net: nn.Module, preset: str, frames: int, margin: int) -> None:
    """A clip of one repeated frame gives the 2D activations on every frame away from the ends."""
    net = net.double().eval()
    sd3, report = inflate_resnet2d(net.state_dict(), preset, dtype=torch.float64)
    model = build_model(report.config).double().eval()
    model.load_state_dict(sd3)
    image = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    clip = image[:, :, None].expand(1, 3, frames, 32, 32).contiguous()
    names = ["stem", "layer1", "layer2", "layer3", "layer4"]
    with torch.no_grad():
        ref = _endpoints_2d(net, image)
        out = model.endpoints(clip, names)
    for name in names:
        got = out[name]
        assert got.shape[2] > 2 * margin, (name, got.shape)
        central = got[:, :, margin : got.shape[2] - margin]
        want = ref[name][:, :, None].expand_as(central)
        scale = want.abs().max()
        assert torch.allclose(central, want, rtol=0, atol=1e-12 * scale), name
        # ...and the zero temporal padding does change the first frame (so the test can fail)
        if name == "stem":
            assert not torch.allclose(got[:, :, 0], ref[name], rtol=0, atol=1e-6 * scale)


@pytest.mark.parametrize(
    ("depth", "width", "preset", "frames", "margin"),
    [(50, 8, "i3d_r50", 160, 9), (18, 8, "i3d_r50", 192, 10), (50, 8, "i3d_r50_heavy", 48, 10)],
)
def test_constant_clip_reproduces_2d_activations(depth, width, preset, frames, margin):
    _check_per_frame(_resnet2d(depth, width), preset, frames, margin)


def test_torchvisions_own_resnet50_inflates(tmp_path):
    """torchvision's ResNet-50 itself (not a look-alike), saved as its checkpoints are, converts
    and keeps the per-frame property (runs where torchvision imports: CI's torchvision stage)."""
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    net = models.resnet50(weights=None)
    _random_bn(net, 50)
    src = tmp_path / "resnet50.pth"
    torch.save(net.state_dict(), src)
    dst, report = convert_torchvision_2d(src, tmp_path / "init.safetensors", "i3d_r50")
    assert (report.config.depth, report.config.base_channels) == (50, 64)
    assert len(report.inflated) == 318 and set(report.unused_2d) == {"fc.weight", "fc.bias"}
    assert load_model(dst).state_dict().keys() == build_model(report.config).state_dict().keys()
    _check_per_frame(net, "i3d_r50", 160, 9)


def test_deeper_net_inflates_and_runs():
    net = _resnet2d(101, 4)
    sd3, report = inflate_resnet2d(net.state_dict(), "i3d_r50")
    assert (report.config.depth, report.config.base_channels) == (101, 4)
    assert report.config.block_flags("inflate", as_int=True)[2] == tuple(
        1 - b % 2 for b in range(23)
    )
    assert set(report.not_inflated) == {"cls_head.fc_cls.weight", "cls_head.fc_cls.bias"}
    w2 = net.state_dict()["layer3.22.conv1.weight"]
    w3 = sd3["backbone.layer3.22.conv1.conv.weight"]
    assert w3.shape[2] == 3 and torch.equal(w3, w2.unsqueeze(2).expand_as(w3) / 3)
    model = build_model(report.config).eval()
    model.load_state_dict(sd3)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 8, 32, 32)).shape == (1, 400)


# ---------------------------------------------------------------- key layouts and errors


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "module.", "model.", "backbone."])
def test_wrappers_and_prefixes(wrap):
    sd2 = _resnet2d(18, 4).state_dict()
    if wrap in ("state_dict", "model"):
        obj = {wrap: sd2, "meta": {"epoch": 3}}
    elif wrap.endswith("."):
        obj = {f"{wrap}{k}": v for k, v in sd2.items()}
    else:
        obj = sd2
    sd3, report = inflate_resnet2d(obj, "i3d_r50")
    assert report.config.depth == 18 and len(report.not_inflated) == 2
    assert torch.equal(
        sd3["backbone.layer1.0.conv1.bn.running_var"], sd2["layer1.0.bn1.running_var"]
    )


def test_timm_layout_without_num_batches_tracked():
    """timm resnets share torchvision's keys; some releases drop ``num_batches_tracked``."""
    sd2 = {k: v for k, v in _resnet2d(18, 4).state_dict().items() if "num_batches" not in k}
    sd3, report = inflate_resnet2d(sd2, "i3d_r50")
    left = [k for k in report.not_inflated if not k.startswith("cls_head")]
    assert left and all(k.endswith("num_batches_tracked") for k in left)
    assert int(sd3[left[0]]) == 0


def _expect_error(sd, match):
    with pytest.raises(WeightsError, match=match):
        inflate_resnet2d(sd, "i3d_r50")


def test_errors_for_wrong_checkpoints():
    sd2 = _resnet2d(18, 4).state_dict()
    _expect_error({"backbone.conv1.conv.weight": torch.zeros(4, 3, 5, 7, 7)}, "no 'conv1.weight'")
    _expect_error([1, 2], "expected a state dict")
    no_stage = {k: v for k, v in sd2.items() if not k.startswith("layer4")}
    _expect_error(no_stage, r"layer1..layer4")
    gap = {k: v for k, v in sd2.items() if not k.startswith("layer2.0.")}
    _expect_error(gap, "non-consecutive")
    odd = {k: v for k, v in sd2.items() if not k.startswith("layer3.1.")}
    _expect_error(odd, r"\(2, 2, 1, 2\) blocks per stage has no known depth")
    grouped = dict(sd2, **{"layer2.1.conv1.weight": torch.zeros(8, 4, 3, 3)})
    _expect_error(grouped, r"shape mismatches \(1\): layer2.1.conv1.weight \(8, 4, 3, 3\)")
    missing = {k: v for k, v in sd2.items() if k != "layer1.1.bn2.running_var"}
    _expect_error(missing, r"missing 2D tensors \(1\): layer1.1.bn2.running_var")
    se = dict(sd2, **{"layer1.0.se.fc1.weight": torch.zeros(2, 4, 1, 1)})
    _expect_error(se, r"no place in a plain ResNet \(1\): layer1.0.se.fc1.weight")


# ---------------------------------------------------------------- file conversion


def test_convert_file_roundtrip(tmp_path):
    net = _resnet2d(50, 8)
    src = tmp_path / "resnet50.pth"
    torch.save({"state_dict": net.state_dict()}, src)
    dst, report = convert_torchvision_2d(src, tmp_path / "init.safetensors", "i3d_r50_nl_gaussian")
    info = read_info(dst)
    assert info.labels is None and info.provenance.source_format == "torchvision-2d"
    assert info.config == report.config and info.preprocessing.clip_len == 32
    assert "not inflated" in str(report) and "fc.weight" in str(report)
    model = load_model(dst)
    w3 = model.state_dict()["backbone.layer1.0.conv1.conv.weight"]
    assert torch.equal(w3, net.state_dict()["layer1.0.conv1.weight"].unsqueeze(2).expand_as(w3) / 3)
    labels = tuple(f"c{i}" for i in range(5))
    dst, _ = convert_torchvision_2d(src, tmp_path / "five.safetensors", "i3d_r50", labels=labels)
    assert read_info(dst).labels == labels and read_info(dst).config.head.num_classes == 5


def test_convert_refuses_code_in_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    src = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": Evil()}, src)
    with pytest.raises(WeightsError, match="refusing"):
        convert_torchvision_2d(src, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_infer_depth_of_every_layout():
    assert infer_resnet2d(_resnet2d(18, 4).state_dict()) == (18, 4, 3)
    assert infer_resnet2d(_resnet2d(50, 4).state_dict()) == (50, 4, 3)


def test_cli_convert_weights_prints_report(tmp_path):
    from typer.testing import CliRunner

    from i3d.cli.main import app

    src = tmp_path / "resnet50.pth"
    torch.save(_resnet2d(50, 4).state_dict(), src)
    dst = tmp_path / "init.safetensors"
    args = ["convert-weights", str(src), "--from", "torchvision-2d"]
    result = CliRunner().invoke(app, [*args, "--preset", "i3d_r50_nl_dot_product", "-o", str(dst)])
    assert result.exit_code == 0, result.output
    assert "318 tensors inflated/copied, 62 kept" in result.output
    assert "layer3.5.non_local_block.conv_out.bn.weight" in result.output
    assert read_info(dst).config.non_local_mode == "dot_product"
    bad = CliRunner().invoke(app, [*args, "--preset", "no_such_preset", "-o", str(dst)])
    assert bad.exit_code == 1 and "unknown preset" in bad.output
