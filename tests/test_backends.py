"""Backend registry and the torch backend: layouts, batching, precisions, devices, options."""

from __future__ import annotations

import json

import attrs
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from i3d.backends import (
    Backend,
    BackendError,
    BackendUnavailable,
    get_backend,
    list_backends,
    load_runner,
)
from i3d.backends.base import normalise_uint8
from i3d.backends.torch_backend import resolve_device
from i3d.cli.main import app
from i3d.models import build_model, get_preset
from i3d.weights.format import WeightsInfo, save_weights
from i3d.weights.preprocessing import MMACTION_K400


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    config = get_preset("i3d_r50_nl_dot_product", base_channels=4, num_classes=5)
    return build_model(config).eval()


@pytest.fixture(scope="module")
def clips() -> torch.Tensor:
    return torch.randn(2, 3, 3, 8, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tiny_weights(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_weights(
        path, tiny.state_dict(), WeightsInfo(config=tiny.config, preprocessing=MMACTION_K400)
    )
    return path


def _ref(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_project_backends_are_registered_through_entry_points():
    assert {"torch", "onnx", "npu", "om"} <= set(list_backends())
    backend = get_backend("torch")
    assert isinstance(backend, Backend) and backend.name == "torch"
    assert backend.is_available().ok


def test_unknown_backend_lists_installed_ones():
    with pytest.raises(
        BackendError, match=r"unknown backend 'tensorrtx'.*npu, om, onnx, openvino, torch"
    ):
        get_backend("tensorrtx")


def test_views_are_folded_chunked_and_unfolded(tiny, clips):
    expected = _ref(tiny, clips)
    runner = load_runner(tiny, batch_size=4)  # 6 clips → chunks of 4 and 2
    got = runner.predict(clips)
    assert got.shape == (2, 3, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    single = runner.predict(clips[:, 0].numpy())  # numpy, (N, C, T, H, W)
    torch.testing.assert_close(single, expected[:, 0], rtol=1e-5, atol=1e-5)


def test_runner_does_not_modify_the_callers_model(tiny, clips):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    tiny.train()  # e.g. a training loop validating through a runner
    load_runner(tiny, precision="bf16", autocast=False, fuse_bn=True, channels_last=True)
    load_runner(tiny, backend="onnx")
    assert tiny.training
    tiny.eval()
    after = tiny.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    ("precision", "options", "tol"),
    [
        ("fp32", {"fuse_bn": True, "channels_last": True}, 1e-5),
        ("bf16", {}, 3e-2),
        ("bf16", {"autocast": "false", "fuse_bn": "true", "channels_last": "true"}, 3e-2),
        ("fp16", {}, 5e-3),
    ],
)
def test_precisions_stay_close_to_fp32(tiny, clips, precision, options, tol):
    expected = _ref(tiny, clips)
    got = load_runner(tiny, precision=precision, **options).predict(clips)
    assert got.dtype == torch.float32
    assert _rel(got, expected) < tol
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_uint8_frames_are_normalised_with_the_weights_preprocessing(tiny_weights, tiny):
    frames = torch.randint(0, 256, (1, 3, 8, 32, 32), dtype=torch.uint8)
    runner = load_runner(tiny_weights)
    mean = torch.tensor(MMACTION_K400.mean).reshape(3, 1, 1, 1)
    std = torch.tensor(MMACTION_K400.std).reshape(3, 1, 1, 1)
    expected = _ref(tiny, (frames.float() - mean) / std)
    torch.testing.assert_close(runner.predict(frames), expected, rtol=1e-5, atol=1e-5)


def test_uint8_value_range_maps_before_mean_std():
    prep = MMACTION_K400.__class__(mean=(0, 0, 0), std=(1, 1, 1), value_range=(-1, 1))
    frames = torch.tensor([0, 255], dtype=torch.uint8).reshape(1, 1, 1, 2).expand(3, 1, 1, 2)
    out = normalise_uint8(frames[None], prep)
    assert out.min() == -1 and out.max() == 1


def test_input_errors_are_specific(tiny):
    runner = load_runner(tiny)
    with pytest.raises(BackendError, match="uint8 frames need the weights' normalisation"):
        runner.predict(torch.zeros(1, 3, 8, 32, 32, dtype=torch.uint8))
    with pytest.raises(BackendError, match="expected float or uint8"):
        runner.predict(torch.zeros(1, 3, 8, 32, 32, dtype=torch.int32))
    with pytest.raises(BackendError, match=r"\(N, C, T, H, W\) or \(N, V, C, T, H, W\)"):
        runner.predict(np.zeros((3, 8, 32, 32), dtype=np.float32))
    with pytest.raises(BackendError, match="failed on clips"):
        runner.predict(torch.zeros(1, 3, 2, 32, 32))  # too short for the temporal strides
    two_stream = build_model(get_preset("inception_i3d_two_stream", num_classes=2))
    with pytest.raises(BackendError, match=r"pass model\.rgb or model\.flow"):
        load_runner(two_stream)
    assert load_runner(two_stream.rgb).predict(torch.zeros(1, 3, 9, 224, 224)).shape == (1, 2)


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda:1", "CUDA is not available" if not torch.cuda.is_available() else "does not exist"),
        ("gpu0", "invalid device 'gpu0'"),
        ("npu:0", "use --backend npu"),
    ],
)
def test_bad_devices_say_what_is_wrong(tiny, device, message):
    if device == "cuda:1" and torch.cuda.device_count() > 1:
        pytest.skip("this machine has a cuda:1")
    with pytest.raises(BackendError, match=message):
        resolve_device(device)
    with pytest.raises(BackendError, match=message):
        load_runner(tiny, device=device)


def test_bad_precision_and_option_are_rejected(tiny):
    with pytest.raises(BackendError, match="does not support precision 'int8'"):
        load_runner(tiny, precision="int8")
    with pytest.raises(BackendError, match=r"unknown option\(s\) \['warp_speed'\].*channels_last"):
        load_runner(tiny, warp_speed=True)
    with pytest.raises(BackendError, match="must be true or false"):
        load_runner(tiny, channels_last="maybe")


def test_missing_runtime_raises_unavailable_with_hint(tiny):
    with pytest.raises(BackendUnavailable, match="pip install torch-npu"):
        load_runner(tiny, backend="npu")


def test_cli_backends_lists_availability_and_hints():
    result = CliRunner().invoke(app, ["backends"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if "│" in line}
    assert "yes" in lines["torch"] and torch.__version__ in lines["torch"]
    assert "no" in lines["npu"] and "torch-npu" in lines["npu"]


def test_cli_bench_json_reports_throughput_latency_memory(tiny_weights):
    args = ["bench", "--weights", str(tiny_weights), "--clip-len", "8", "--size", "32"]
    result = CliRunner().invoke(app, [*args, "--iters", "3", "--warmup", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["backend"] == "torch" and report["input_shape"] == [1, 3, 8, 32, 32]
    assert report["clips_per_s"] > 0 and report["peak_memory_mb"] > 0
    assert report["latency_ms_p50"] <= report["latency_ms_p90"] <= report["latency_ms_p99"]


def test_cli_bench_and_export_take_the_clip_shape_from_the_weights(tiny, tmp_path, monkeypatch):
    import types

    import i3d.export
    import i3d.models

    prep = attrs.evolve(MMACTION_K400, clip_len=8, resize_short=32, crop_size=32)
    weights = save_weights(
        tmp_path / "w.safetensors", tiny.state_dict(), WeightsInfo(tiny.config, None, prep)
    )

    def export_onnx(_source, out, clip_len, size, *_args, **_kwargs):  # the shape it compiles
        shape = (1, 3, clip_len, size, size)
        return types.SimpleNamespace(
            path=out, input_shape=shape, opset=18, max_abs_diff=0.0, rel_diff=0.0
        )

    monkeypatch.setattr(i3d.export, "export_onnx", export_onnx)
    monkeypatch.setattr(i3d.models, "build_model", lambda _config: tiny)  # a quick "preset"
    out = str(tmp_path / "m.onnx")
    for source, shape in (
        (["--weights", str(weights)], "(1, 3, 8, 32, 32)"),
        (["--preset", "i3d_r50"], "(1, 3, 32, 224, 224)"),  # the fallback bench uses too
    ):
        result = CliRunner().invoke(app, ["export", *source, "-o", out])
        assert result.exit_code == 0 and f"input {shape}" in result.output, result.output
    assert _bench_json(["--weights", str(weights)])["input_shape"] == [1, 3, 8, 32, 32]


def test_cli_bench_errors_are_one_line(tiny_weights):
    result = CliRunner().invoke(
        app, ["bench", "--weights", str(tiny_weights), "--device", "cuda:7", "--backend", "torch"]
    )
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert result.exit_code == 1
    assert "error:" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["bench", "--backend", "nope", "-O", "x=1"])
    assert result.exit_code == 1 and "installed backends" in result.output


def _bench_json(args: list[str]) -> dict:
    result = CliRunner().invoke(app, ["bench", *args, "--iters", "2", "--warmup", "0", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


def test_cli_bench_takes_the_clip_shape_from_an_onnx_file(tiny, tmp_path):
    pytest.importorskip("onnxruntime")
    from i3d.export import export_onnx

    path = tmp_path / "v2.onnx"
    export_onnx(tiny, path, clip_len=8, size=32, views=2, batch="dynamic")
    args = ["--backend", "onnx", "--weights", str(path)]
    assert _bench_json(args)["input_shape"] == [1, 2, 3, 8, 32, 32]
    report = _bench_json([*args, "--batch-size", "2", "--clip-len", "8"])
    assert report["input_shape"] == [2, 2, 3, 8, 32, 32]
    result = CliRunner().invoke(app, ["bench", *args, "--size", "64"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "compiled for clips of T×H×W = 8×32×32; --size 64 does not match" in result.output


def test_bench_input_shape_prefers_options_then_static_dims_then_defaults():
    from i3d.backends.bench import bench_input_shape

    assert bench_input_shape(None) == (1, 3, 32, 224, 224)
    assert bench_input_shape(None, 2, 8, 64) == (2, 3, 8, 64, 64)
    assert bench_input_shape((4, 3, 16, 112, 112)) == (4, 3, 16, 112, 112)
    assert bench_input_shape((None, 3, None, 112, 112), clip_len=12) == (1, 3, 12, 112, 112)
    assert bench_input_shape((None, 2, 3, 8, 32, 32), batch_size=3) == (3, 2, 3, 8, 32, 32)
    with pytest.raises(BackendError, match=r"m\.onnx was compiled for .* = 16×\?×\?; --clip-len 8"):
        bench_input_shape((1, 3, 16, None, None), clip_len=8, source="m.onnx")
    with pytest.raises(BackendError, match="input of rank 4"):
        bench_input_shape((1, 3, 16, 16))


class _FakeInferSession:
    """ais_bench's InferSession for a static (B, V, C, T, H, W) OM: zero logits, 5 classes."""

    shape = (2, 3, 3, 4, 16, 16)

    def __init__(self, device_id: int, model_path: str) -> None:
        self.device_id = device_id

    def get_inputs(self) -> list:
        return [type("Node", (), {"name": "clips", "shape": list(self.shape)})()]

    def infer(self, feeds: list, mode: str = "static") -> list:
        return [np.zeros((*self.shape[:2], 5), dtype=np.float32)]

    def free_resource(self) -> None:
        pass


def test_cli_bench_takes_the_clip_shape_from_an_om_session(tmp_path, monkeypatch):
    import importlib.machinery
    import sys
    import types

    for name in ("aclruntime", "ais_bench", "ais_bench.infer", "ais_bench.infer.interface"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["ais_bench.infer.interface"].InferSession = _FakeInferSession
    om = tmp_path / "m.om"
    om.write_bytes(b"not really an om")
    report = _bench_json(["--backend", "om", "--weights", str(om)])
    assert report["input_shape"] == [2, 3, 3, 4, 16, 16] and report["device"] == "npu:0"
    result = CliRunner().invoke(
        app, ["bench", "--backend", "om", "--weights", str(om), "--clip-len", "8"]
    )
    assert result.exit_code == 1 and "--clip-len 8 does not match" in result.output


@pytest.mark.parametrize("threads", ["abc", "-4", "0", "1.5"])
def test_bad_thread_counts_are_one_line_errors(tiny_weights, threads):
    with pytest.raises(BackendError, match="option threads must be a positive integer"):
        load_runner(tiny_weights, threads=threads)
    args = ["bench", "--weights", str(tiny_weights), "-O", f"threads={threads}"]
    result = CliRunner().invoke(app, [*args, "--clip-len", "8", "--size", "32", "--iters", "1"])
    assert result.exit_code == 1 and result.exception is not None
    assert isinstance(result.exception, SystemExit)
    assert f"option threads must be a positive integer, got '{threads}'" in result.output


@pytest.mark.parametrize("batch_size", [0, -1])
def test_load_runner_refuses_non_positive_batch_sizes(tiny, batch_size):
    with pytest.raises(BackendError, match=f"batch size must be at least 1, got {batch_size}"):
        load_runner(tiny, batch_size=batch_size)
