"""fp32 is IEEE float32: the switches that let PyTorch run float32 convolutions and matrix
products on TF32 / HF32 / bf16 units are set for i3d's forward passes and given back after."""

from __future__ import annotations

import types

import pytest
import torch
from tinymodel import save_random_inception

from i3d.backends import load_runner
from i3d.backends.base import BackendError
from i3d.backends.float32 import float32_mode
from i3d.features.maps import endpoint_maps
from i3d.fvd.extract import Detector
from i3d.models import build_model, get_preset

B = torch.backends
SWITCHES = {
    "cudnn.conv": (B.cudnn.conv, "fp32_precision"),
    "cuda.matmul": (B.cuda.matmul, "fp32_precision"),
    "mkldnn.conv": (B.mkldnn.conv, "fp32_precision"),
    "mkldnn.matmul": (B.mkldnn.matmul, "fp32_precision"),
}


def _state() -> dict[str, str]:
    return {key: getattr(space, name) for key, (space, name) in SWITCHES.items()}


@pytest.fixture
def lowered():
    """The process as a training script leaves it: ``set_float32_matmul_precision("medium")``
    (bf16 matrix products on CPUs, TF32 on GPUs) and cuDNN's TF32 convolutions."""
    before = _state()
    torch.set_float32_matmul_precision("medium")
    B.mkldnn.conv.fp32_precision = "bf16"
    yield _state()
    for key, (space, name) in SWITCHES.items():
        setattr(space, name, before[key])


def test_each_device_gets_ieee_float32_and_the_settings_back(lowered):
    assert lowered == {
        "cudnn.conv": "tf32", "cuda.matmul": "tf32", "mkldnn.conv": "bf16", "mkldnn.matmul": "bf16",
    }  # fmt: skip
    with float32_mode("cuda:0"):
        assert _state() == {**lowered, "cudnn.conv": "ieee", "cuda.matmul": "ieee"}
    assert _state() == lowered
    with float32_mode(torch.device("cpu")):
        assert _state() == {**lowered, "mkldnn.conv": "ieee", "mkldnn.matmul": "ieee"}
    assert _state() == lowered
    B.cudnn.conv.fp32_precision = "ieee"
    with float32_mode("cuda", "tf32"):
        assert _state()["cudnn.conv"] == "tf32" and _state()["cuda.matmul"] == "tf32"
    assert _state()["cudnn.conv"] == "ieee"
    with float32_mode("cuda", "bf16"), float32_mode("cpu", "fp16"):  # autocast's business
        assert _state() == {**lowered, "cudnn.conv": "ieee"}
    with pytest.raises(KeyError), float32_mode("cpu"):
        raise KeyError("the settings come back on errors too")
    assert _state() == {**lowered, "cudnn.conv": "ieee"}


def test_ascend_hf32_is_switched_off_for_fp32_and_on_for_tf32(monkeypatch):
    """torch_npu's switches (torch.npu.conv / matmul.allow_hf32; conv defaults to HF32)."""
    npu = types.SimpleNamespace(
        conv=types.SimpleNamespace(allow_hf32=True), matmul=types.SimpleNamespace(allow_hf32=False)
    )
    monkeypatch.setattr(torch, "npu", npu, raising=False)
    with float32_mode("npu:3"):
        assert (npu.conv.allow_hf32, npu.matmul.allow_hf32) == (False, False)
    with float32_mode("npu", "tf32"):
        assert (npu.conv.allow_hf32, npu.matmul.allow_hf32) == (True, True)
    assert (npu.conv.allow_hf32, npu.matmul.allow_hf32) == (True, False)


def _small_resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(get_preset("i3d_r50", depth=18, base_channels=4, num_classes=3)).eval()


def test_runner_features_and_fvd_forward_in_ieee_float32(lowered, tmp_path, monkeypatch):
    seen: list[dict[str, str]] = []
    conv3d = torch.nn.functional.conv3d

    def noting(*args, **kwargs):
        seen.append(_state())
        return conv3d(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv3d", noting)
    weights = save_random_inception(tmp_path / "tiny.safetensors")
    clips = torch.randn(2, 3, 8, 32, 32)
    forwards = {
        "runner": lambda: load_runner(_small_resnet(), "torch", "cpu").logits_on_device(clips),
        "features": lambda: endpoint_maps(_small_resnet(), "layer4")(clips),
        "fvd": lambda: Detector(weights)(torch.rand(1, 3, 9, 193, 193) * 2 - 1),
    }
    ieee = {**lowered, "mkldnn.conv": "ieee", "mkldnn.matmul": "ieee"}
    for name, forward in forwards.items():
        seen.clear()
        forward()
        assert seen and all(state == ieee for state in seen), name
        assert _state() == lowered, name


def test_tf32_is_for_cuda_and_refused_elsewhere_in_one_line():
    with pytest.raises(BackendError, match=r"precision tf32 .* is for cuda devices, not cpu"):
        load_runner(_small_resnet(), backend="torch", device="cpu", precision="tf32")
    for backend in ("onnx", "openvino"):
        with pytest.raises(BackendError, match="does not support precision 'tf32'"):
            load_runner(_small_resnet(), backend=backend, precision="tf32")
