"""``export_om`` against ATC's rules: no -inf Pad, opsets down to 11, precision flags, the
name ATC gives its output. ATC itself is a shell stand-in (no CANN here)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

from i3d.export import ExportError, atc_command, export_om, read_om_build
from i3d.models.inception import InceptionModule, MaxPool3dSame, Unit3D

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


class _TinyInception(nn.Module):
    """Inception's stem pool and one Inception block at width 8: both TF-SAME max-pool sites."""

    in_channels = 3

    def __init__(self) -> None:
        super().__init__()
        self.conv = Unit3D(3, 8, kernel=(3, 3, 3), stride=(2, 2, 2))
        self.pool = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.block = InceptionModule(8, (2, 2, 2, 2, 2, 2))
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.pool(self.conv(x))).mean(dim=(2, 3, 4)))


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    model = _TinyInception().eval()
    with torch.no_grad():  # random BN statistics, so the ReLU outputs are not all zero
        for module in model.modules():
            if isinstance(module, nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
    return model


def _fake_atc(tmp_path: Path, writes: str) -> dict[str, str]:
    """PATH with an ``atc`` that records its arguments and writes ``writes`` (a shell word
    using $OUT, the --output stem) as its .om files."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    atc = bin_dir / "atc"
    atc.write_text(
        "#!/bin/sh\n"
        f'echo "$@" > {tmp_path}/atc_args\n'
        'for a in "$@"; do case "$a" in --output=*) OUT="${a#--output=}";; esac; done\n'
        f"for f in {writes}; do echo OM > \"$f\"; done\n"
    )
    atc.chmod(atc.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


@pytest.mark.parametrize("opset", [18, 11])
def test_om_graph_has_no_inf_pad_and_converts_to_opset(tiny, tmp_path, opset):
    heard: list[str] = []
    report = export_om(
        tiny, tmp_path / "m.om", clip_len=6, size=20, opset=opset, simplify=False,
        stage=heard.append,
    )  # fmt: skip
    assert report.om_path is None and report.onnx.opset == opset and report.onnx.rel_diff < 1e-4
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == opset
    nodes = proto.graph.node
    assert "Pad" not in {node.op_type for node in nodes}  # the stem pool's (0, 1) went in it
    pads = [list(a.ints) for n in nodes if n.op_type == "MaxPool" for a in n.attribute]
    assert [0, 0, 0, 0, 1, 1] in pads
    assert heard[-2:] == [
        f"preparing the graph for atc (opset {opset})",
        "checking onnxruntime against torch",
    ]


def test_fold_leaves_a_zero_pad_alone(tmp_path):
    from onnx import TensorProto, helper

    from i3d.export import fold_pads_into_pools

    def graph_with(value: float) -> object:
        nodes = [
            helper.make_node("Pad", ["x", "pads", "value"], ["p"], mode="constant"),
            helper.make_node("MaxPool", ["p"], ["y"], kernel_shape=[3], strides=[2]),
        ]
        inits = [
            helper.make_tensor("pads", TensorProto.INT64, [6], [0, 0, 0, 0, 0, 1]),
            helper.make_tensor("value", TensorProto.FLOAT, [], [value]),
        ]
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 6])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 3])
        return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits))

    zero, inf = graph_with(0.0), graph_with(-float("inf"))
    assert fold_pads_into_pools(zero) == 0 and len(zero.graph.node) == 2
    assert fold_pads_into_pools(inf) == 1
    (pool,) = inf.graph.node
    assert list(pool.input) == ["x"] and list(pool.attribute[-1].ints) == [0, 1]


def test_om_opset_range_is_checked_before_exporting(tiny, tmp_path):
    with pytest.raises(ExportError, match="--format om takes --opset 11 to 18, got 10"):
        export_om(tiny, tmp_path / "m.om", opset=10)
    assert list(tmp_path.iterdir()) == []


def test_om_export_simplifies_when_onnxsim_is_installed(tiny, tmp_path):
    pytest.importorskip("onnxsim")
    heard: list[str] = []
    export_om(tiny, tmp_path / "m.om", clip_len=6, size=20, stage=heard.append)
    assert "simplifying the graph (onnxsim)" in heard


def test_atc_precision_flags():
    shape = (1, 3, 8, 32, 32)
    assert atc_command("m.onnx", "m", shape, "Ascend310P3")[-1] == "--precision_mode=force_fp16"
    expected = {
        ("fp32", False): "--precision_mode=must_keep_origin_dtype",
        ("mixed", False): "--precision_mode=allow_mix_precision",
        ("fp32", True): "--precision_mode_v2=origin",
        ("fp16", True): "--precision_mode_v2=fp16",
        ("mixed", True): "--precision_mode_v2=mixed_float16",
    }
    for (precision, v2), flag in expected.items():
        assert atc_command("m.onnx", "m", shape, "Ascend310P3", precision, v2)[-1] == flag
    with pytest.raises(ExportError, match="OM precision must be one of fp32, fp16, mixed"):
        atc_command("m.onnx", "m", shape, "Ascend310P3", "bf16")


def test_atc_output_with_os_and_arch_suffix_is_found(tiny, tmp_path, monkeypatch):
    env = _fake_atc(tmp_path, '"${OUT}_linux_x86_64.om"')
    monkeypatch.setenv("PATH", env["PATH"])
    out = tmp_path / "m.om"
    report = export_om(
        tiny, out, clip_len=6, size=20, simplify=False, precision="fp32", precision_v2=True
    )
    assert report.om_path == out and out.read_text() == "OM\n" and report.precision == "fp32"
    assert "--precision_mode_v2=origin" in (tmp_path / "atc_args").read_text()
    assert read_om_build(tmp_path / "m.onnx") == {"precision": "fp32", "soc": "Ascend310P3"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_atc_writing_two_oms_is_an_error(tiny, tmp_path, monkeypatch):
    env = _fake_atc(tmp_path, '"${OUT}.om" "${OUT}_linux_aarch64.om"')
    monkeypatch.setenv("PATH", env["PATH"])
    with pytest.raises(ExportError, match=r"wrote 2 \.om files \(m\.om, m_linux_aarch64\.om\)"):
        export_om(tiny, tmp_path / "m.om", clip_len=6, size=20, simplify=False)
    assert not (tmp_path / "m.om").exists()


def test_downgrade_rewrites_changed_ops_and_refuses_unknown_ones():
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from i3d.export import downgrade_opset

    def model(*extra: object) -> object:
        nodes = [
            helper.make_node("Reshape", ["x", "shape"], ["r"], allowzero=1),
            helper.make_node("ReduceMean", ["r", "axes"], ["m"], keepdims=0),
            helper.make_node("Relu", ["m"], ["y"]),
            *extra,
        ]
        inits = [
            helper.make_tensor("shape", TensorProto.INT64, [2], [2, -1]),
            helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
        ]
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
        graph = helper.make_graph(nodes, "g", [x], [y], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])

    proto = model()
    downgrade_opset(proto, 11)
    onnx.checker.check_model(proto)
    reduce = proto.graph.node[1]
    assert list(reduce.input) == ["r"]
    assert [a.name for a in reduce.attribute] == ["keepdims", "axes"]
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    np.testing.assert_allclose(got, np.maximum(x.mean((1, 2)), 0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ExportError, match="cannot take Softmax from opset 18 to 11"):
        downgrade_opset(model(helper.make_node("Softmax", ["y"], ["s"])), 11)
    ints = helper.make_node("Constant", [], ["c"], value_ints=[1])  # value_ints: opset 12+
    downgrade_opset(model(ints), 13)
    with pytest.raises(ExportError, match=r"Constant with \['value_ints'\] to opset 11"):
        downgrade_opset(model(ints), 11)


def test_precision_flags_need_format_om(tmp_path):
    from typer.testing import CliRunner

    from i3d.cli.main import app

    out = tmp_path / "m.onnx"
    args = ["export", "--preset", "i3d_r50", "--precision", "fp32", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "need --format om; an ONNX export is always fp32" in result.output
    assert not out.exists()
