"""Tushar-N/pytorch-resnet3d I3Res50 (RTFM's ResNet-50 I3D): its stem pool and its converter.

The reference below is written from pytorch-resnet3d's ``models/resnet.py`` facts with plain
``torch.nn.functional`` ops, independently of i3d's modules, and run on a synthetic state dict
in that repository's key layout (small width, non-trivial BatchNorm statistics).
"""

from __future__ import annotations

import json
import os
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from i3d import load_model, read_info
from i3d.cli.main import app
from i3d.models import build_model, get_preset
from i3d.models.config import ConfigError, ResNet3dConfig, config_from_dict, config_to_dict
from i3d.weights.convert import convert, detect_format
from i3d.weights.format import FORMAT_VERSION, WeightsError, WeightsInfo
from i3d.weights.pytorch_resnet3d import tushar_config

# I3Res50: (planes multiplier, temp_conv per block); spatial stride 2 on layer2..4's block 0
TEMP_CONV = ((1, 1, 1), (1, 0, 1, 0), (1, 0, 1, 0, 1, 0), (0, 1, 0))
WIDTH = 4  # conv1's output channels (64 in the real checkpoint)


def tushar_state_dict(width: int = WIDTH, classes: int = 400, seed: int = 0) -> dict:
    """Random tensors in pytorch-resnet3d's key layout and shapes (float64)."""
    g = torch.Generator().manual_seed(seed)

    def conv(cout, cin, kt, k):
        fan_in = cin * kt * k * k
        return (
            torch.randn(cout, cin, kt, k, k, generator=g, dtype=torch.float64)
            * (2.0 / fan_in) ** 0.5
        )

    def bn(prefix, c):
        sd[f"{prefix}.weight"] = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
        sd[f"{prefix}.bias"] = torch.randn(c, generator=g, dtype=torch.float64) * 0.1
        sd[f"{prefix}.running_mean"] = torch.randn(c, generator=g, dtype=torch.float64) * 0.2
        sd[f"{prefix}.running_var"] = torch.rand(c, generator=g, dtype=torch.float64) * 1.5 + 0.5
        sd[f"{prefix}.num_batches_tracked"] = torch.tensor(1000)

    sd: dict[str, torch.Tensor] = {"conv1.weight": conv(width, 3, 5, 7)}
    bn("bn1", width)
    inplanes = width
    for i, temps in enumerate(TEMP_CONV):
        planes = width * 2**i
        for j, t in enumerate(temps):
            p = f"layer{i + 1}.{j}"
            sd[f"{p}.conv1.weight"] = conv(planes, inplanes, 1 + 2 * t, 1)
            bn(f"{p}.bn1", planes)
            sd[f"{p}.conv2.weight"] = conv(planes, planes, 1, 3)
            bn(f"{p}.bn2", planes)
            sd[f"{p}.conv3.weight"] = conv(planes * 4, planes, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if j == 0:
                sd[f"{p}.downsample.0.weight"] = conv(planes * 4, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    sd["fc.weight"] = torch.randn(classes, inplanes, generator=g, dtype=torch.float64) * 0.05
    sd["fc.bias"] = torch.randn(classes, generator=g, dtype=torch.float64) * 0.05
    return sd


def reference_forward(sd: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """I3Res50.forward in eval mode: (layer4 map, logits)."""

    def bn(y, p):
        return F.batch_norm(
            y, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
            sd[f"{p}.bias"], training=False, eps=1e-5,
        )  # fmt: skip

    x = F.relu(bn(F.conv3d(x, sd["conv1.weight"], stride=2, padding=(2, 3, 3)), "bn1"))
    x = F.max_pool3d(x, kernel_size=(2, 3, 3), stride=(2, 2, 2), padding=0)
    for i, temps in enumerate(TEMP_CONV):
        for j, t in enumerate(temps):
            p = f"layer{i + 1}.{j}"
            s = 2 if i > 0 and j == 0 else 1
            out = F.relu(bn(F.conv3d(x, sd[f"{p}.conv1.weight"], padding=(t, 0, 0)), f"{p}.bn1"))
            out = F.conv3d(out, sd[f"{p}.conv2.weight"], stride=(1, s, s), padding=(0, 1, 1))
            out = bn(F.conv3d(F.relu(bn(out, f"{p}.bn2")), sd[f"{p}.conv3.weight"]), f"{p}.bn3")
            residual = x
            if f"{p}.downsample.0.weight" in sd:
                ds = F.conv3d(x, sd[f"{p}.downsample.0.weight"], stride=(1, s, s))
                residual = bn(ds, f"{p}.downsample.1")
            x = F.relu(out + residual)
        if i == 0:
            x = F.max_pool3d(x, kernel_size=(2, 1, 1), stride=(2, 1, 1))
    pooled = F.adaptive_avg_pool3d(x, 1).flatten(1)  # dropout is the identity in eval
    return x, F.linear(pooled, sd["fc.weight"], sd["fc.bias"])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tushar")
    sd = tushar_state_dict()
    src = tmp / "i3d_r50_kinetics.pth"
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, src)
    dst = convert(src, tmp / "rtfm.safetensors")
    return sd, src, dst


def test_converted_model_equals_an_independent_i3res50_forward(converted):
    sd, _, dst = converted
    model = load_model(dst).double()
    # the file stores float32: compare against the reference on the same float32-rounded values
    sd32 = {k: v.float().double() if v.is_floating_point() else v for k, v in sd.items()}
    x = torch.randn(
        2, 3, 8, 64, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    with torch.no_grad():
        feats, logits = reference_forward(sd32, x)
        out = model.endpoints(x, ["layer4", "logits"])
    assert out["layer4"].shape == feats.shape == (2, WIDTH * 32, 1, 2, 2)
    torch.testing.assert_close(out["layer4"], feats, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["logits"], logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(x), logits, rtol=1e-12, atol=1e-12)


def test_converted_file_records_config_labels_and_rtfm_normalisation(converted):
    _, src, dst = converted
    info = read_info(dst)
    assert info.config == tushar_config(base_channels=WIDTH)
    assert (info.config.pool1_kernel_t, info.config.pool1_padding) == (2, (0, 0, 0))
    assert info.config.depth == 50 and info.config.head.num_classes == 400
    assert info.labels is not None and info.labels[227] == "playing cricket"
    prep = info.preprocessing
    assert prep.value_range == (0.0, 255.0)
    assert prep.mean == (114.75,) * 3 and prep.std == (57.375,) * 3
    assert info.provenance.source_format == "pytorch-resnet3d-state-dict"
    assert info.provenance.source_name == src.name and len(info.provenance.source_sha256) == 64
    assert detect_format(src) == "pytorch-resnet3d"


def test_stem_gives_55x55_on_224_as_pytorch_resnet3d_does():
    x = torch.zeros(1, 3, 32, 224, 224)
    with torch.no_grad():
        tushar = build_model(tushar_config(base_channels=2)).eval().endpoints(x, ["stem"])
        mmaction = build_model(get_preset("i3d_r50", base_channels=2)).eval().endpoints(x, ["stem"])
    # conv1 stride 2: 16×112²; pool (2,3,3)/2 unpadded: ⌊(16−2)/2⌋+1 = 8, ⌊(112−3)/2⌋+1 = 55
    assert tushar["stem"].shape == (1, 2, 8, 55, 55)
    assert mmaction["stem"].shape == (1, 2, 8, 56, 56)  # mmaction's (1,3,3) pool padded by 1
    small = torch.zeros(1, 3, 8, 64, 64)  # 4×32² after conv1 → ⌊(4−2)/2⌋+1 = 2, ⌊29/2⌋+1 = 15
    with torch.no_grad():
        out = build_model(tushar_config(base_channels=2)).eval().endpoints(small, ["stem"])
    assert out["stem"].shape == (1, 2, 2, 15, 15)


def _save(tmp_path, sd, name="i3d_r50_kinetics.pth", wrap=None):
    src = tmp_path / name
    torch.save(sd if wrap is None else {wrap: sd}, src)
    return src


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda sd: sd.pop("layer3.2.bn2.running_var"),
            "missing keys (1): layer3.2.bn2.running_var",
        ),
        (
            lambda sd: sd.update({"layer2.0.conv1.weight": sd["layer2.0.conv1.weight"][:, :, :1]}),
            "shape mismatches (1): layer2.0.conv1.weight: file (8, 16, 1, 1, 1) vs I3Res50 "
            "(8, 16, 3, 1, 1)",
        ),
        (
            lambda sd: sd.update({"layer2.1.nl.g.weight": torch.zeros(1)}),
            "unexpected keys (1): layer2.1.nl.g.weight",
        ),
    ],
    ids=["missing", "shape", "unexpected"],
)
def test_converter_refuses_a_state_dict_that_does_not_fit_and_writes_nothing(
    tmp_path, edit, message
):
    sd = tushar_state_dict(seed=2)
    edit(sd)
    src = _save(tmp_path, sd)
    dst = tmp_path / "out" / "w.safetensors"
    dst.parent.mkdir()
    with pytest.raises(WeightsError, match=re.escape(message)):
        convert(src, dst)
    assert list(dst.parent.iterdir()) == []
    result = CliRunner().invoke(app, ["convert-weights", str(src), "-o", str(dst)])
    assert result.exit_code != 0 and "does not fit pytorch-resnet3d's I3Res50" in result.output
    assert list(dst.parent.iterdir()) == []


def test_wrapped_and_ddp_prefixed_checkpoints_convert_through_the_cli(tmp_path):
    sd = tushar_state_dict(seed=3, classes=7)
    del sd["bn1.num_batches_tracked"]  # older PyTorch saved none
    src = _save(tmp_path, {f"module.{k}": v for k, v in sd.items()}, wrap="state_dict")
    dst = tmp_path / "w.safetensors"
    result = CliRunner().invoke(app, ["convert-weights", str(src), "-o", str(dst)])
    assert result.exit_code == 0, result.output
    model = load_model(dst)
    assert model.config == tushar_config(base_channels=WIDTH, num_classes=7)
    assert model.weights_info.labels is None  # no bundled list for 7 classes
    assert torch.equal(model.state_dict()["cls_head.fc_cls.weight"], sd["fc.weight"].float())
    assert torch.equal(
        model.state_dict()["backbone.layer4.0.downsample.bn.running_var"],
        sd["layer4.0.downsample.1.running_var"].float(),
    )
    with pytest.raises(WeightsError, match="leave out --preset"):
        convert(src, tmp_path / "p.safetensors", preset="i3d_r50")


def test_a_2d_torchvision_layout_is_still_detected_as_torchvision(tmp_path):
    src = tmp_path / "resnet50.pth"
    torch.save(
        {"conv1.weight": torch.zeros(4, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(1)}, src
    )
    assert detect_format(src) == "torchvision-2d"


@pytest.mark.parametrize("stem_dims", [4, 5])
def test_auto_detected_torchvision_layouts_are_unpickled_once(tmp_path, monkeypatch, stem_dims):
    """Telling 2D from pytorch-resnet3d needs the stem's shape: the conversion reuses that load."""
    import i3d.weights.pytorch_resnet3d as tushar
    import i3d.weights.safe_pickle as safe_pickle

    loads = []
    real = safe_pickle.load_checkpoint

    def counting(path, *args, **kwargs):
        loads.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safe_pickle, "load_checkpoint", counting)
    monkeypatch.setattr(tushar, "load_checkpoint", counting)
    if stem_dims == 5:
        sd = {k: v.float() if v.is_floating_point() else v for k, v in tushar_state_dict().items()}
    else:
        sd = {"conv1.weight": torch.zeros(2, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(1)}
    src = tmp_path / "checkpoint.pth"
    torch.save(sd, src)
    if stem_dims == 5:
        convert(src, tmp_path / "out.safetensors")
    else:  # a toy 2D dict: inflation refuses it, after the single load
        with pytest.raises(WeightsError):
            convert(src, tmp_path / "out.safetensors")
    assert len(loads) == 1


def test_pool1_fields_are_validated_and_round_trip():
    config = tushar_config()
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config
    default = ResNet3dConfig()
    assert (default.pool1_kernel_t, default.pool1_padding) == (1, (0, 1, 1))
    pool = build_model(get_preset("i3d_r50", base_channels=2)).backbone.maxpool
    assert (pool.kernel_size, pool.stride, pool.padding) == ((1, 3, 3), (2, 2, 2), (0, 1, 1))
    for kwargs, message in [
        ({"pool1_kernel_t": 0}, "pool1_kernel_t must be >= 1, got 0"),
        ({"pool1_kernel_t": 2.0}, "ResNet3dConfig.pool1_kernel_t must be an int, got 2.0"),
        ({"pool1_padding": (0, 1)}, "pool1_padding must have 3 entries (t, h, w), got [0, 1]"),
        ({"pool1_padding": "011"}, "ResNet3dConfig.pool1_padding must be a list of ints"),
        ({"pool1_padding": (1, 1, 1)}, "the t padding must be 0..0 (at most half the pool"),
        ({"pool1_padding": (0, 2, 1)}, "the h padding must be 0..1"),
        ({"pool1_padding": (0, 1, -1)}, "the w padding must be 0..1"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            ResNet3dConfig(**kwargs)
    assert ResNet3dConfig(pool1_kernel_t=3, pool1_padding=(1, 0, 0)).pool1_padding == (1, 0, 0)


def test_weight_metadata_from_before_the_pool1_fields_still_loads():
    data = config_to_dict(get_preset("i3d_r50"))
    del data["pool1_kernel_t"], data["pool1_padding"]
    meta = {"i3d.format": FORMAT_VERSION, "i3d.config": json.dumps(data)}
    assert WeightsInfo.from_metadata(meta, "old.safetensors").config == get_preset("i3d_r50")


def test_the_stem_pool_changes_no_state_dict_key_or_shape():
    # the mmaction presets' own keys and shapes are pinned by tests/test_resnet3d_conformance.py
    with torch.device("meta"):
        mmaction = build_model(get_preset("i3d_r50")).state_dict()
        tushar = build_model(tushar_config()).state_dict()
    assert [(k, v.shape) for k, v in tushar.items()] == [(k, v.shape) for k, v in mmaction.items()]


# -- video-nonlocal-net's Caffe2 pickle, which i3d_r50_kinetics.pth was converted from ---------

BN_BLOBS = {"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"}


def caffe2_name(key: str) -> str:
    """The Caffe2 blob of an I3Res50 key, by pytorch-resnet3d's convert_weights.py rules."""
    stem = {"conv1.weight": "conv1_w", "fc.weight": "pred_w", "fc.bias": "pred_b"}
    if key in stem:
        return stem[key]
    if key.startswith("bn1."):
        return f"res_conv1_bn_{BN_BLOBS[key[4:]]}"
    layer, block, module, *rest = key.split(".")
    prefix = f"res{int(layer[5:]) + 1}_{block}_"
    if module == "downsample":
        index, suffix = rest
        return prefix + ("branch1_w" if index == "0" else f"branch1_bn_{BN_BLOBS[suffix]}")
    (suffix,) = rest
    branch = "branch2" + "abc"[int(module[-1]) - 1]
    return prefix + (
        f"{branch}_w" if module.startswith("conv") else f"{branch}_bn_{BN_BLOBS[suffix]}"
    )


class Py2Array:
    """Pickles as a numpy array saved by Python 2 (its bytes a str, read back as latin-1)."""

    def __init__(self, array):
        self.array = np.ascontiguousarray(array)

    def __reduce__(self):
        core = getattr(np, "_core", None) or np.core
        data = self.array.tobytes().decode("latin1")
        state = (1, self.array.shape, self.array.dtype, False, data)
        return core.multiarray._reconstruct, (np.ndarray, (0,), b"b"), state


def _caffe2_pickle(path, sd, extra=None):
    blobs = {
        caffe2_name(k): Py2Array(v.float().numpy()) for k, v in sd.items()
        if "num_batches_tracked" not in k
    }  # fmt: skip
    blobs["pred_w_momentum"] = Py2Array(np.zeros((3,), np.float32))  # solver state: left out
    blobs.update(extra or {})
    with open(path, "wb") as fh:
        pickle.dump({"blobs": blobs}, fh, protocol=2)
    return path


def test_the_caffe2_pickle_converts_to_what_its_pth_conversion_gives(converted, tmp_path):
    sd, _, from_pth = converted
    pkl = _caffe2_pickle(tmp_path / "i3d_baseline_32x2_IN_pretrain_400k.pkl", sd)
    assert detect_format(pkl) == "video-nonlocal"
    dst = tmp_path / "from_pkl.safetensors"
    result = CliRunner().invoke(app, ["convert-weights", str(pkl), "-o", str(dst)])
    assert result.exit_code == 0, result.output
    want, got = load_model(from_pth).state_dict(), load_model(dst).state_dict()
    assert want.keys() == got.keys()
    # the .pth counts BatchNorm batches; Caffe2 saved none (a count no eval-mode BN reads)
    differ = [k for k in want if not torch.equal(want[k], got[k])]
    assert differ and all(k.endswith("num_batches_tracked") for k in differ)
    assert read_info(dst).provenance.source_format == "video-nonlocal-caffe2-pkl"
    assert read_info(dst).preprocessing == read_info(from_pth).preprocessing


def test_caffe2_pickles_that_are_not_the_baseline_or_not_safe_are_refused(tmp_path):
    sd = tushar_state_dict(seed=4)
    nonlocal_blob = {"nonlocal_conv3_1_theta_w": Py2Array(np.zeros((2, 2), np.float32))}
    pkl = _caffe2_pickle(tmp_path / "i3d_nonlocal.pkl", sd, nonlocal_blob)
    with pytest.raises(WeightsError, match=r"non-local blocks .* only the I3D baseline"):
        convert(pkl, tmp_path / "out.safetensors")
    short = {k: v for k, v in sd.items() if k != "layer4.2.bn3.running_var"}
    pkl = _caffe2_pickle(tmp_path / "short.pkl", short)
    with pytest.raises(WeightsError, match=re.escape("missing keys (1): layer4.2.bn3.running_var")):
        convert(pkl, tmp_path / "out.safetensors")

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = tmp_path / "evil.pkl"
    with open(evil, "wb") as fh:
        pickle.dump({"blobs": {"conv1_w": Evil()}}, fh, protocol=2)
    with pytest.raises(WeightsError, match="refusing to load"):
        convert(evil, tmp_path / "out.safetensors")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out.safetensors").exists()
