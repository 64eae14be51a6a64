"""ONNX export (non-local and TF-SAME padding), onnxruntime parity, static batches, OM export."""

from __future__ import annotations

import os
import stat
import sys

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from i3d.backends import BackendError, load_runner
from i3d.cli.main import app
from i3d.export import ExportError, atc_command, export_onnx
from i3d.models import build_model, get_preset
from i3d.models.inception import MaxPool3dSame, Unit3D
from i3d.weights.format import WeightsInfo, save_weights

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return build_model(get_preset("i3d_r50_nl_dot_product", base_channels=4, num_classes=5)).eval()


@pytest.fixture(scope="module")
def tiny_weights(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    labels = ("a", "b", "c", "d", "e")
    save_weights(path, tiny.state_dict(), WeightsInfo(config=tiny.config, labels=labels))
    return path


def _ref(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_nonlocal_model_exports_with_views_and_dynamic_batch(tiny, tmp_path):
    path = tmp_path / "nl.onnx"
    report = export_onnx(tiny, path, clip_len=8, size=32, views=3, batch="dynamic")
    assert path.is_file() and report.input_shape == ("dynamic", 3, 3, 8, 32, 32)
    assert report.rel_diff < 1e-4
    import onnx

    graph = onnx.load(str(path)).graph
    assert {"MatMul"} <= {node.op_type for node in graph.node}  # the non-local attention
    x = torch.randn(2, 3, 3, 8, 32, 32)
    got = load_runner(path, backend="onnx", batch_size=1).predict(x)
    torch.testing.assert_close(got, _ref(tiny, x), rtol=1e-4, atol=1e-4)


def test_export_reports_each_stage_as_it_starts_outside_the_muted_exporter(
    tiny, tmp_path, capsys
):
    heard: list[str] = []

    def stage(what: str) -> None:  # prints too: the exporter must not swallow it
        heard.append(what)
        print(what, file=sys.stderr)

    export_onnx(tiny, tmp_path / "staged.onnx", clip_len=8, size=32, stage=stage)
    assert heard == [
        "running torch once on a 1×3×8×32×32 input",
        "tracing the model (torch.export)",
        "saving staged.onnx",
        "checking onnxruntime against torch",
    ]
    assert capsys.readouterr().err.splitlines() == heard


def test_static_batch_model_pads_the_last_chunk(tiny, tmp_path):
    path = tmp_path / "b2.onnx"
    export_onnx(tiny, path, clip_len=8, size=32, batch=2)
    runner = load_runner(path, backend="onnx")
    x = torch.randn(5, 3, 8, 32, 32)  # 5 clips → calls of 2, 2, 1+padding
    torch.testing.assert_close(runner.predict(x), _ref(tiny, x), rtol=1e-4, atol=1e-4)
    with pytest.raises(
        BackendError, match=r"exported for clips .* \(3, 8, 32, 32\), got \(3, 8, 48, 48\)"
    ):
        runner.predict(torch.randn(1, 3, 8, 48, 48))


def test_runner_from_weights_exports_on_first_use(tiny_weights, tiny):
    runner = load_runner(tiny_weights, backend="onnx", threads=1)
    x = torch.randn(1, 2, 3, 8, 32, 32)
    torch.testing.assert_close(runner.predict(x), _ref(tiny, x), rtol=1e-4, atol=1e-4)
    with pytest.raises(BackendError, match="does not support precision 'bf16'"):
        load_runner(tiny_weights, backend="onnx", precision="bf16")
    with pytest.raises(BackendError, match="cpu or cuda"):
        load_runner(tiny_weights, backend="onnx", device="npu:0")


@pytest.mark.parametrize(("version", "tf32_off"), [("1.17.3", False), ("1.18.0", True)])
def test_the_cuda_provider_runs_ieee_float32_where_it_can_say_so(monkeypatch, version, tf32_off):
    """The CUDA EP's fp32 convolutions and GEMMs use TF32 unless ``use_tf32=0`` (ORT 1.18+)."""
    ort = pytest.importorskip("onnxruntime")
    from i3d.backends.onnx_backend import providers_for

    monkeypatch.setattr(ort, "__version__", version)
    offered = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: offered)
    (name, options), cpu = providers_for("cuda:1")
    assert (name, cpu, options["device_id"]) == ("CUDAExecutionProvider", offered[1], 1)
    assert options.get("use_tf32") == (0 if tf32_off else None)


def test_onnx_file_keeps_labels_and_preprocessing(tiny_weights, tiny, tmp_path):
    path = tmp_path / "meta.onnx"
    export_onnx(tiny_weights, path, clip_len=8, size=32, batch="dynamic")
    runner = load_runner(path, backend="onnx")
    assert runner.labels == ("a", "b", "c", "d", "e")
    frames = torch.randint(0, 256, (1, 3, 8, 32, 32), dtype=torch.uint8)
    torch_runner = load_runner(tiny_weights)
    assert torch_runner.labels == runner.labels
    torch.testing.assert_close(
        runner.predict(frames), torch_runner.predict(frames), rtol=1e-4, atol=1e-4
    )


class _SameStem(nn.Module):
    """Inception's first layers: TF-SAME conv and pooling, whose pads depend on the input size."""

    in_channels = 3

    def __init__(self) -> None:
        super().__init__()
        self.conv = Unit3D(3, 8, kernel=(7, 7, 7), stride=(2, 2, 2))
        self.pool = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(x)).mean(dim=(2, 3, 4)))


def test_tf_same_padding_exports(tmp_path):
    torch.manual_seed(0)
    model = _SameStem().eval()
    # even sizes: conv pads (2, 3) per dim, pool pads (0, 1) with -inf; both must survive export
    report = export_onnx(model, tmp_path / "same.onnx", clip_len=10, size=36, batch="dynamic")
    assert report.rel_diff < 1e-4
    import onnx

    ops = {node.op_type for node in onnx.load(str(tmp_path / "same.onnx")).graph.node}
    assert "Pad" in ops


@pytest.mark.slow
def test_full_inception_exports_with_views_and_dynamic_batch(tmp_path):
    model = build_model(get_preset("inception_i3d_rgb")).eval()
    report = export_onnx(
        model, tmp_path / "inc.onnx", clip_len=9, size=193, views=2, batch="dynamic"
    )
    assert report.rel_diff < 1e-4


def test_failed_verification_writes_nothing(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "strict.onnx"
    with pytest.raises(ExportError, match="onnxruntime disagrees with torch"):
        export_onnx(_SameStem().eval(), path, clip_len=8, size=32, rtol=0.0)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_simplified_export_is_verified_and_not_larger(tmp_path):
    pytest.importorskip("onnxsim", reason="--simplify needs the simplify extra")
    import onnx

    torch.manual_seed(0)
    tiny = _SameStem().eval()  # TF-SAME pads: shape arithmetic that onnxsim folds
    plain = export_onnx(tiny, tmp_path / "plain.onnx", clip_len=8, size=32)
    heard: list[str] = []
    simple = export_onnx(
        tiny, tmp_path / "simple.onnx", clip_len=8, size=32, simplify=True, stage=heard.append
    )
    assert simple.rel_diff < 1e-4
    assert heard[2:] == [
        "saving simple.onnx",
        "simplifying the graph (onnxsim)",
        "checking onnxruntime against torch",
    ]
    nodes = [len(onnx.load(str(r.path)).graph.node) for r in (plain, simple)]
    assert nodes[1] <= nodes[0]
    x = torch.randn(1, 3, 8, 32, 32)
    got = load_runner(simple.path, backend="onnx").predict(x)
    torch.testing.assert_close(got, _ref(tiny, x), rtol=1e-4, atol=1e-4)


def test_export_argument_errors(tiny, tmp_path):
    with pytest.raises(ExportError, match="opset must be at least 17"):
        export_onnx(tiny, tmp_path / "a.onnx", opset=13)
    with pytest.raises(ExportError, match="could not convert this model to opset 17"):
        export_onnx(_SameStem().eval(), tmp_path / "b.onnx", clip_len=10, size=36, opset=17)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ExportError, match="static batch"):
        atc_command("m.onnx", "m", ("dynamic", 3, 8, 32, 32), "Ascend310P3")


def _cli_export_om(weights, out, env_path):
    args = ["export", "--format", "om", "--weights", str(weights), "--soc", "Ascend310P3"]
    args += ["--no-simplify"]
    args += ["--batch", "1", "--views", "2", "--clip-len", "8", "--size", "32", "-o", str(out)]
    return CliRunner().invoke(app, args, env={"PATH": env_path, "COLUMNS": "400"})


def test_export_om_without_atc_prints_its_command_and_says_what_it_overwrote(
    tiny_weights, tmp_path
):
    out = tmp_path / "model.om"
    result = _cli_export_om(tiny_weights, out, str(tmp_path / "empty-bin"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model.onnx").is_file() and not out.exists()
    expected = (
        f"atc --framework=5 --model={tmp_path / 'model.onnx'} --output={tmp_path / 'model'} "
        "--input_format=NCHW --input_shape=clips:1,2,3,8,32,32 --soc_version=Ascend310P3"
    )
    assert expected in result.output
    assert "overwrote" not in result.output and "stays beside the .om" in result.output
    result = _cli_export_om(tiny_weights, out, str(tmp_path / "empty-bin"))
    assert result.exit_code == 0, result.output
    assert f"overwrote the existing {tmp_path / 'model.onnx'}" in result.output


def test_export_om_runs_atc_when_present(tiny_weights, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    atc = bin_dir / "atc"
    atc.write_text(  # a stand-in ATC: writes <output>.om and records its arguments
        "#!/bin/sh\n"
        f'echo "$@" > {tmp_path}/atc_args\n'
        'for a in "$@"; do case "$a" in --output=*) echo OM > "${a#--output=}.om";; esac; done\n'
    )
    atc.chmod(atc.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "model.om"
    result = _cli_export_om(tiny_weights, out, f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert result.exit_code == 0, result.output
    assert out.read_text() == "OM\n"
    args = (tmp_path / "atc_args").read_text()
    assert "--input_shape=clips:1,2,3,8,32,32" in args and "--soc_version=Ascend310P3" in args
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # redirected stderr: no spinner, one plain line per stage, in order; stdout has none
    assert result.stderr.splitlines() == [
        "running torch once on a 1×2×3×8×32×32 input",
        "tracing the model (torch.export)",
        "saving model.onnx",
        "checking onnxruntime against torch",
        "preparing the graph for atc (opset 18)",
        "checking onnxruntime against torch",
        "converting to model.om (atc, soc Ascend310P3)",
    ]
    assert "tracing" not in result.stdout and "wrote" in result.stdout


def test_too_small_clip_fails_before_export_in_one_line(tiny_weights, tmp_path, capfd):
    out = tmp_path / "small.onnx"
    args = ["export", "--format", "onnx", "--weights", str(tiny_weights), "-o", str(out)]
    result = CliRunner().invoke(app, [*args, "--clip-len", "1", "--size", "8"])
    assert result.exit_code == 1
    assert "cannot run on clips of 1×8×8 (T×H×W)" in result.output
    assert "use a longer --clip-len or a larger --size" in result.output
    # the stage it failed in, then the error in one line
    lines = result.output.strip().splitlines()
    assert lines[0] == "running torch once on a 1×3×1×8×8 input"
    assert len(lines) == 2 and lines[1].startswith("error:") and not out.exists()
    streams = capfd.readouterr()  # torch's loggers write to the process's own stderr
    assert "fake_tensor" not in streams.err + streams.out


class _DataDependent(nn.Module):
    """Runs in eager mode but cannot be traced: its output width depends on the input's values."""

    in_channels = 3

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = int(x.mean() > 0) + 1
        return self.fc(x.mean((2, 3, 4)))[:, :keep].repeat(1, 3 - keep)


def test_exporter_failure_is_one_line_without_torch_chatter(tmp_path, capfd):
    with pytest.raises(ExportError, match=r"torch\.onnx\.export failed: ") as info:
        export_onnx(_DataDependent().eval(), tmp_path / "dd.onnx", clip_len=2, size=4)
    assert "\n" not in str(info.value) and list(tmp_path.iterdir()) == []
    streams = capfd.readouterr()
    assert "def forward" not in streams.err and streams.err.strip() == ""


def test_export_needs_weights_or_preset(tmp_path):
    out = tmp_path / "x.onnx"
    result = CliRunner().invoke(app, ["export", "--format", "onnx", "-o", str(out)])
    assert result.exit_code == 1 and not out.exists()
    assert "--weights" in result.output and "--preset" in result.output


def test_atc_input_format_follows_the_input_rank():
    five = atc_command("m.onnx", "m", (1, 3, 8, 32, 32), "Ascend310P3")
    assert "--input_format=NCDHW" in five and "--input_shape=clips:1,3,8,32,32" in five
    six = atc_command("m.onnx", "m", (1, 2, 3, 8, 32, 32), "Ascend310P3")
    assert "--input_format=NCHW" in six


def test_export_never_writes_over_its_weights_or_to_a_non_onnx_name(tiny_weights, tmp_path):
    before = tiny_weights.read_bytes()
    base = ["export", "--weights", str(tiny_weights), "--clip-len", "8", "--size", "32"]
    result = CliRunner().invoke(app, [*base, "-o", str(tiny_weights)])
    assert result.exit_code == 1 and "is the input" in result.output
    assert tiny_weights.read_bytes() == before
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"keep me")
    result = CliRunner().invoke(app, [*base, "-o", str(other)])
    assert result.exit_code == 1 and "ONNX output must end in .onnx" in result.output
    assert other.read_bytes() == b"keep me"
    with pytest.raises(ExportError, match=r"must end in \.onnx"):
        export_onnx(tiny_weights, tmp_path / "model.txt", clip_len=8, size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.safetensors"]


def test_onnx_options_are_checked_when_loading(tiny_weights, tmp_path):
    with pytest.raises(BackendError, match="option threads must be a positive integer, got 'x'"):
        load_runner(tiny_weights, backend="onnx", threads="x")
    with pytest.raises(BackendError, match="optimization must be all, extended, basic"):
        load_runner(tiny_weights, backend="onnx", optimization="max")


def test_corrupt_onnx_metadata_is_named_once(tiny_weights, tmp_path):
    import onnx

    path = tmp_path / "meta.onnx"
    export_onnx(tiny_weights, path, clip_len=8, size=32)
    proto = onnx.load(str(path))
    for prop in proto.metadata_props:
        if prop.key == "i3d.labels":
            prop.value = "{not json"
    onnx.save(proto, str(path))
    with pytest.raises(BackendError, match="corrupt i3d metadata") as info:
        load_runner(path, backend="onnx")
    assert str(info.value).count(str(path)) == 1
