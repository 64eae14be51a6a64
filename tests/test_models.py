"""ResNet3d family: configs, every depth/inflation option, init, freezing, views, endpoints."""

from __future__ import annotations

import json
import re

import attrs
import numpy as np
import pytest
import torch
from fresh import in_fresh_python
from torch import nn
from typer.testing import CliRunner

from i3d.cli.main import app
from i3d.models import (
    ConfigError,
    HeadConfig,
    InputShapeError,
    ResNet3dConfig,
    average_views,
    build_model,
    config_from_dict,
    config_to_dict,
    get_preset,
    preset_names,
)
from i3d.models.nonlocal_block import NonLocal3d


def tiny(**kw) -> ResNet3dConfig:
    kw.setdefault("head", {"num_classes": 5})
    if isinstance(kw["head"], dict):
        kw["head"] = attrs.evolve(ResNet3dConfig().head, **kw["head"])
    return attrs.evolve(get_preset("i3d_r50", base_channels=4), **kw)


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_every_depth_builds_and_runs(depth):
    config = tiny(
        depth=depth, inflate=(1, 0, 1, 0), non_local=(0, 1, 0, 0), non_local_mode="gaussian"
    )
    model = build_model(config).eval()
    out = model(torch.randn(1, 3, 8, 32, 32))
    assert out.shape == (1, 5)
    assert model.features(torch.randn(1, 3, 8, 32, 32)).shape[1] == config.feature_channels


def test_inflate_styles_and_caffe_stride_placement():
    m = build_model(tiny(inflate_style="3x3x3"))
    block = m.backbone.layer1[0]
    assert block.conv1.conv.kernel_size == (1, 1, 1) and block.conv2.conv.kernel_size == (3, 3, 3)
    m = build_model(tiny(style="caffe"))
    block = m.backbone.layer2[0]
    assert block.conv1.conv.stride == (1, 2, 2) and block.conv2.conv.stride == (1, 1, 1)
    m = build_model(tiny(depth=18, inflate=(1, 0, 0, 0)))
    assert m.backbone.layer1[0].conv1.conv.kernel_size == (3, 3, 3)
    assert m.backbone.layer2[1].conv1.conv.kernel_size == (1, 3, 3)


def test_shapes_follow_mmaction_full_size_table():
    with torch.device("meta"):
        model = build_model("i3d_r50")
        maps = model.endpoints(torch.empty(1, 3, 32, 224, 224), ["stem", "layer1", "layer4"])
    assert maps["stem"].shape == (1, 64, 8, 56, 56)
    assert maps["layer1"].shape == (1, 256, 4, 56, 56)  # after pool2
    assert maps["layer4"].shape == (1, 2048, 4, 7, 7)
    with torch.device("meta"):
        heavy = build_model("i3d_r50_heavy")
        assert heavy.features(torch.empty(1, 3, 32, 224, 224)).shape == (1, 2048, 16, 7, 7)


@pytest.mark.parametrize("mode", ["dot_product", "embedded_gaussian", "gaussian"])
def test_nonlocal_blocks_start_as_identity(mode):
    block = NonLocal3d(16, mode=mode).eval()
    x = torch.randn(2, 16, 2, 6, 6)
    torch.testing.assert_close(block(x), x)
    assert block.conv_out.bn.weight.abs().sum() == 0
    assert (block.theta is None) == (mode == "gaussian")


def test_init_matches_mmaction_rules():
    torch.manual_seed(0)
    model = build_model(tiny(non_local=(0, 1, 0, 0), zero_init_residual=True))
    conv = model.backbone.layer3[0].conv2.conv.weight
    fan_out = conv.shape[0] * conv[0, 0].numel()
    assert abs(conv.std().item() - (2 / fan_out) ** 0.5) < 0.3 * (2 / fan_out) ** 0.5
    bn = model.backbone.conv1.bn
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert torch.all(model.backbone.layer1[0].conv3.bn.weight == 0)  # zero_init_residual
    fc = model.cls_head.fc_cls
    assert abs(fc.weight.std().item() - 0.01) < 0.002 and torch.all(fc.bias == 0)
    nl = model.backbone.layer2[1].non_local_block
    assert torch.all(nl.conv_out.bn.weight == 0) and nl.theta.conv.weight.std() < 0.02


def test_frozen_stages_and_norm_eval():
    model = build_model(tiny(frozen_stages=2, norm_eval=True)).train()
    assert not any(p.requires_grad for p in model.backbone.conv1.parameters())
    assert not any(p.requires_grad for p in model.backbone.layer2.parameters())
    assert all(p.requires_grad for p in model.backbone.layer3.parameters())
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm3d))
    assert model.cls_head.training


def test_views_and_average_modes():
    model = build_model(tiny()).eval()
    x = torch.randn(2, 3, 3, 8, 32, 32)
    with torch.no_grad():
        per_view = model(x)
        assert per_view.shape == (2, 3, 5)
        torch.testing.assert_close(per_view[1, 2], model(x[1, 2][None])[0])
        torch.testing.assert_close(model.predict(x, "score"), per_view.mean(1))
        torch.testing.assert_close(model.predict(x), per_view.softmax(-1).mean(1))
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    assert not torch.equal(average_views(logits, "prob"), average_views(logits, "score"))


def test_bad_inputs_give_clear_errors():
    model = build_model(tiny()).eval()
    with pytest.raises(InputShapeError, match="NTHWC"):
        model(torch.randn(1, 8, 32, 32, 3))
    with pytest.raises(InputShapeError, match="floating-point"):
        model(torch.zeros(1, 3, 8, 32, 32, dtype=torch.uint8))
    with pytest.raises(InputShapeError, match="dims"):
        model(torch.randn(3, 8, 32, 32))
    with pytest.raises(KeyError, match="available"):
        model.endpoints(torch.randn(1, 3, 8, 32, 32), ["layer9"])


def test_config_validation_and_round_trip():
    for preset in ("i3d_r50", "i3d_r50_heavy", "i3d_r50_nl_gaussian"):
        config = get_preset(preset)
        assert config_from_dict(config_to_dict(config)) == config
    assert (
        tiny(inflate=(1, 1, 1, 1)).inflate
        == tiny(inflate=((1,) * 3, (1,) * 4, (1,) * 6, (1,) * 3)).inflate
    )
    with pytest.raises(ConfigError, match="depth must be one of"):
        ResNet3dConfig(depth=42)
    with pytest.raises(ConfigError, match=r"inflate\[1\] has 2 flags but stage 2"):
        ResNet3dConfig(inflate=(1, (1, 0), 1, 1))
    with pytest.raises(ConfigError, match="non_local_mode"):
        ResNet3dConfig(non_local_mode="softmax")
    with pytest.raises(ConfigError, match="unknown config keys"):
        config_from_dict({**config_to_dict(ResNet3dConfig()), "depht": 50})
    with pytest.raises(ConfigError, match="unknown architecture"):
        config_from_dict({"arch": "vit"})
    with pytest.raises(KeyError, match="unknown preset"):
        get_preset("i3d_r51")


def test_models_command_lists_presets_with_params():
    result = CliRunner().invoke(app, ["models", "--json", "--no-flops"])
    assert result.exit_code == 0, result.output
    import json

    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["i3d_r50"]["parameters"] == 28_043_472
    assert rows["i3d_r50_nl_gaussian"]["parameters"] == 31_723_728


def test_models_table_says_how_flops_are_counted_and_version_is_printed(monkeypatch):
    from importlib.metadata import version

    import i3d.cli.weights_cmds

    monkeypatch.setattr(i3d.cli.weights_cmds, "preset_names", lambda: ["i3d_r50"])  # quick
    wide = {"COLUMNS": "200"}
    result = CliRunner().invoke(app, ["models", "--no-flops"], env=wide)
    assert result.exit_code == 0, result.output
    assert "GFLOPs (multiply-add = 2)" in result.output
    assert "multiply-add counts 2" in CliRunner().invoke(app, ["models", "--help"], env=wide).output
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"i3d {version('i3d')}\n"


def _two_stream(**kw):
    from i3d.models.inception import TwoStreamConfig

    return TwoStreamConfig(**kw)


def _inception(**kw):
    from i3d.models.inception import InceptionI3dConfig

    return InceptionI3dConfig(**kw)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ResNet3dConfig(base_channels="abc"), 'base_channels must be an int, got "abc"'),
        (lambda: ResNet3dConfig(depth=True), "depth must be an int, got True"),
        (
            lambda: get_preset("i3d_r50", depth="50"),
            'ResNet3dConfig.depth must be an int, got "50"',
        ),
        (lambda: HeadConfig(num_classes=3.7), "HeadConfig.num_classes must be an int, got 3.7"),
        (lambda: HeadConfig(num_classes="400"), 'num_classes must be an int, got "400"'),
        (lambda: get_preset("i3d_r50", num_classes=400.0), "num_classes must be an int"),
        (lambda: HeadConfig(dropout="0.5"), 'HeadConfig.dropout must be a number, got "0.5"'),
        (lambda: HeadConfig(init_std=False), "init_std must be a number, got False"),
        (lambda: ResNet3dConfig(with_pool1=1), "with_pool1 must be true or false, got 1 (int)"),
        (lambda: HeadConfig(spatial_pool="yes"), "spatial_pool must be true or false"),
        (lambda: ResNet3dConfig(style=3), 'style must be one of "pytorch", "caffe", got 3'),
        (lambda: ResNet3dConfig(style="keras"), 'style must be one of "pytorch", "caffe"'),
        (lambda: ResNet3dConfig(non_local_mode="softmax"), "non_local_mode must be one of"),
        (lambda: HeadConfig(average_clips="mean"), 'average_clips must be one of "prob", "score"'),
        (lambda: ResNet3dConfig(arch="vit"), 'arch must be one of "resnet3d"'),
        (lambda: ResNet3dConfig(head={"num_classes": 3}), "head must be an instance of HeadConfig"),
        (lambda: _two_stream(rgb=None), "TwoStreamConfig.rgb must be an instance of Inception"),
        (lambda: ResNet3dConfig(conv1_kernel="577"), 'conv1_kernel must be a list of ints, got "5'),
        (lambda: ResNet3dConfig(conv1_kernel=b"577"), "conv1_kernel must be a list of ints"),
        (lambda: ResNet3dConfig(conv1_kernel=5), "conv1_kernel must be a list of ints, got 5"),
        (lambda: ResNet3dConfig(spatial_strides=(1, 2.5, 2, 2)), "spatial_strides[1] must be"),
        (lambda: ResNet3dConfig(dilations=(1, True, 1, 1)), "dilations[1] must be an int"),
        (lambda: ResNet3dConfig(inflate=3), "inflate must be a list with one entry per stage"),
        (lambda: ResNet3dConfig(inflate="1111"), "inflate must be a list with one entry"),
        (lambda: ResNet3dConfig(inflate=(1, 2, 1, 1)), "inflate[1] must be a 0/1 flag"),
        (lambda: ResNet3dConfig(non_local=(0, 0, "a", 0)), "non_local[2] must be a 0/1 flag"),
        (lambda: ResNet3dConfig(inflate=(1, (1, 0.5, 1, 0), 1, 1)), "inflate[1][1] must be"),
        (lambda: _inception(in_channels="rgb"), "InceptionI3dConfig.in_channels must be an int"),
        (lambda: _inception(in_channels=2.0), "in_channels must be an int, got 2.0"),
        (lambda: _inception(head=None), "InceptionI3dConfig.head must be an instance of"),
        (lambda: get_preset("inception_i3d_rgb", in_channels=[3]), "in_channels must be an int"),
        (lambda: get_preset("inception_i3d_two_stream", num_classes="7"), "num_classes must be"),
        (lambda: _two_stream(arch="resnet3d"), 'arch must be one of "two_stream"'),
    ],
)
def test_config_fields_are_checked_against_their_types(build, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        build()
    assert "\n" not in str(info.value)


def test_config_field_edge_cases_are_accepted_and_normalised():
    config = ResNet3dConfig(
        depth=np.int64(18),
        base_channels=np.int32(8),
        conv1_kernel=[np.int64(3), 7, 7],
        inflate=[(1, 0), 1, [True, True], (0, 0)],
        non_local=(0, (1, 0), 0, 0),
        head=HeadConfig(num_classes=np.int16(5), dropout=0, init_std=np.float32(0.5)),
    )
    assert type(config.depth) is int and type(config.base_channels) is int
    assert config.conv1_kernel == (3, 7, 7) and type(config.conv1_kernel[0]) is int
    assert config.inflate == ((1, 0), 1, 1, 0) and config.non_local == (0, (1, 0), 0, 0)
    assert type(config.head.num_classes) is int and config.head.num_classes == 5
    assert type(config.head.dropout) is float and config.head.dropout == 0.0
    assert type(config.head.init_std) is float and config.head.init_std == 0.5
    assert config == ResNet3dConfig(**{**attrs.asdict(config, recurse=False)})
    assert json.loads(json.dumps(config_to_dict(config)))["depth"] == 18
    assert config_from_dict(config_to_dict(config)) == config
    uniform = ResNet3dConfig(inflate=((1, 1, 1), (1,) * 4, [1] * 6, (0, 0, 0)))
    assert uniform.inflate == (1, 1, 1, 0)
    assert get_preset("inception_i3d_flow", num_classes=np.int64(7)).head.num_classes == 7


def test_every_preset_round_trips_through_its_dict():
    for name in preset_names():
        config = get_preset(name)
        assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config


def test_weights_metadata_with_a_mistyped_config_is_reported_as_corrupt():
    from i3d.weights.format import FORMAT_VERSION, WeightsError, WeightsInfo

    data = config_to_dict(get_preset("i3d_r50"))
    data["head"]["num_classes"] = "400"
    meta = {"i3d.format": FORMAT_VERSION, "i3d.config": json.dumps(data)}
    with pytest.raises(WeightsError, match=r"corrupt .*HeadConfig\.num_classes must be an int"):
        WeightsInfo.from_metadata(meta, "w.safetensors")


def test_a_depth_override_keeps_one_flag_per_stage_of_the_preset():
    small = get_preset("i3d_r50_nl_dot_product", depth=18, base_channels=4)
    assert (small.inflate, small.non_local) == ((1, 1, 1, 1), (0, 1, 1, 0))
    build_model(small)  # the per-stage flags fit the depth-18 block counts
    chosen = get_preset("i3d_r50", depth=18, inflate=((1, 0), 0, 0, 0))
    assert chosen.inflate == ((1, 0), 0, 0, 0)
    assert get_preset("i3d_r50", depth=50).inflate == get_preset("i3d_r50").inflate


def test_structure_checks_on_meta_skip_the_random_init():
    """Checking a file's structure builds the model on meta: no values to draw, and a meta
    ``normal_`` would import torch._dynamo (1.5 s in every process that loads weights)."""
    in_fresh_python(
        "import sys",
        "from i3d.models import get_preset",
        "from i3d.weights.format import parameter_count",
        "for name in ('inception_i3d_rgb', 'i3d_r50_nl_dot_product', 'i3d_r50_nl_gaussian'):",
        "    assert parameter_count(get_preset(name)) > 10**7",
        "assert 'torch._dynamo' not in sys.modules",
    )
