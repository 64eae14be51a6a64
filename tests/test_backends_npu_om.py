"""npu and om backends against FAKE torch_npu / ais_bench modules (no Ascend hardware here).

These check the plumbing only: device parsing, switches, install messages, input layout,
static-batch splitting and error surfacing. Nothing here ran on a real NPU.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from i3d.backends import BackendError, BackendUnavailable, get_backend, load_runner, npu_backend
from i3d.models import build_model, get_preset


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(get_preset("i3d_r50", base_channels=4, num_classes=5)).eval()


class _FakeNpu:
    """Records what the backend asked torch_npu to do."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.bf16 = True
        self.calls: list[tuple[str, object]] = []
        self.config = types.SimpleNamespace(allow_internal_format=True)

    def device_count(self) -> int:
        return self.count

    def is_bf16_supported(self) -> bool:
        return self.bf16

    def set_device(self, index: int) -> None:
        self.calls.append(("set_device", index))

    def set_compile_mode(self, jit_compile: bool) -> None:
        self.calls.append(("jit_compile", jit_compile))


@pytest.fixture
def fake_torch_npu(monkeypatch):
    module = types.ModuleType("torch_npu")
    module.__version__ = "0.0.fake"
    module.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)  # find_spec sees it
    module.npu = _FakeNpu(count=2)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    # a CPU stand-in for the npu device: the real one only exists once torch_npu is loaded
    monkeypatch.setattr(npu_backend, "npu_placement", lambda index: (torch.device("cpu"), "cpu"))
    return module


def test_npu_runner_sets_device_and_switches(fake_torch_npu, tiny):
    assert get_backend("npu").is_available().ok
    x = torch.randn(2, 3, 8, 32, 32)
    runner = load_runner(
        tiny,
        backend="npu",
        device="npu:1",
        precision="bf16",
        jit_compile="false",
        allow_internal_format=False,
    )
    assert runner.backend == "npu" and runner.precision == "bf16"
    calls = fake_torch_npu.npu.calls
    assert ("set_device", 1) in calls and ("jit_compile", False) in calls
    assert fake_torch_npu.npu.config.allow_internal_format is False
    with torch.no_grad():
        expected = tiny(x)
    got = runner.predict(x)
    assert float((got - expected).abs().max() / expected.abs().max()) < 3e-2


def test_npu_device_errors(fake_torch_npu, tiny):
    with pytest.raises(BackendError, match=r"npu:5 does not exist: 2 NPU device\(s\)"):
        load_runner(tiny, backend="npu", device="npu:5")
    with pytest.raises(BackendError, match="invalid NPU device 'cuda:0'"):
        load_runner(tiny, backend="npu", device="cuda:0")
    with pytest.raises(BackendError, match="unknown option"):
        load_runner(tiny, backend="npu", compile=True)
    fake_torch_npu.npu.bf16 = False  # a 310P: torch would run bf16 autocast as fp32
    with pytest.raises(BackendError, match=r"npu:1 has no bf16 .*; use precision fp16"):
        load_runner(tiny, backend="npu", device="npu:1", precision="bf16")
    fake_torch_npu.npu.count = 0
    info = get_backend("npu").is_available()
    assert not info.ok and "no NPU is visible" in info.reason


def test_npu_without_torch_npu_or_cann_says_which(tmp_path, monkeypatch, tiny):
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    if npu_backend.importlib.util.find_spec("torch_npu") is None:
        with pytest.raises(BackendUnavailable, match="torch_npu is not installed; pip install"):
            load_runner(tiny, backend="npu")
    broken = tmp_path / "torch_npu"
    broken.mkdir()
    (broken / "__init__.py").write_text(
        "raise ImportError('libascendcl.so: cannot open shared object file')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BackendUnavailable, match=r"CANN runtime is missing.*set_env\.sh"):
        load_runner(tiny, backend="npu")
    info = get_backend("npu").is_available()
    assert not info.ok and "set_env.sh" in info.install_hint


def _broken_torch_npu_site(root: Path) -> Path:
    """A site dir with a fake torch_npu 2.13.0 shaped like the real wheel on a host without CANN.

    Its dist-info declares torch's ``torch.backends`` entry point ``torch_npu:_autoload`` and
    its ``import torch_npu.npu`` fails as the real one does when libhccl.so cannot be found.
    """
    site = root / "site"
    pkg = site / "torch_npu"
    (pkg / "npu").mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "import torch\nimport torch_npu.npu\n\n\ndef _autoload():\n    pass\n"
    )
    (pkg / "npu" / "__init__.py").write_text(
        "raise ImportError('libhccl.so: cannot open shared object file: No such file or "
        "directory. Please check that the cann package is installed.')\n"
    )
    meta = site / "torch_npu-2.13.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: torch_npu\nVersion: 2.13.0\n")
    (meta / "entry_points.txt").write_text("[torch.backends]\ntorch_npu = torch_npu:_autoload\n")
    return site


#: one process, commands run as the console script runs them (``from i3d.cli.main import app``)
CLI_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from typer.testing import CliRunner
    from i3d.cli.main import app
    runs = [CliRunner().invoke(app, args) for args in json.loads(sys.argv[1])]
    print(json.dumps([[r.exit_code, r.stdout] for r in runs]))
    """
)


def test_cli_runs_next_to_a_torch_npu_without_cann(tmp_path, monkeypatch):
    from tinymodel import save_tiny_weights
    from videogen import write_video

    site = _broken_torch_npu_site(tmp_path)
    with monkeypatch.context() as patch:  # the fake fails in torch's auto-load as the wheel does
        patch.syspath_prepend(str(site))
        with pytest.raises(RuntimeError, match="Failed to load the backend extension: torch_npu"):
            torch._import_device_backends()
    env = {**os.environ, "COLUMNS": "400"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    env.pop("TORCH_DEVICE_BACKEND_AUTOLOAD", None)  # this process's `import i3d` set it
    weights = save_tiny_weights(tmp_path / "w.safetensors", ("a", "b"))
    video = write_video(tmp_path / "v.mp4", 20, width=48, height=32)
    predict = ["predict", str(video), "--weights", str(weights), "--device", "cpu", "--json"]
    commands = json.dumps([["--help"], ["backends"], predict])
    done = subprocess.run(
        [sys.executable, "-c", CLI_SCRIPT, commands],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    (help_code, _), (list_code, listing), (predict_code, predicted) = json.loads(done.stdout)
    assert help_code == 0 and list_code == 0 and predict_code == 0, predicted
    (row,) = [line for line in listing.splitlines() if line.strip("│ ").startswith("npu")]
    assert "torch_npu is installed but the CANN runtime is missing (libhccl.so" in row
    assert "set_env.sh" in row
    assert {t["label"] for t in json.loads(predicted)["top"]} == {"a", "b"}


@pytest.mark.parametrize(
    ("raising", "expected"),
    [
        (
            "ImportError('libascendcl.so: cannot open shared object file')",
            r"CANN runtime is missing \(libascendcl\.so.*; install the Ascend CANN",
        ),
        (
            "OSError('libhccl.so: cannot open shared object file')",
            r"CANN runtime is missing \(libhccl\.so.*; install the Ascend CANN",
        ),
        (
            "RuntimeError('Cannot register two accelerators: CUDA is already in use')",
            r"CUDA build of torch .*; install the CPU build of torch next to torch_npu",
        ),
        (
            "Exception('ASCEND_HOME_PATH /opt/nowhere is not a CANN install')",
            r"rejected the CANN setup \(ASCEND_HOME_PATH.*; install the Ascend CANN",
        ),
    ],
)
def test_every_torch_npu_import_failure_is_one_line(tmp_path, monkeypatch, raising, expected):
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    broken = tmp_path / "torch_npu"
    broken.mkdir()
    (broken / "__init__.py").write_text(f"raise {raising}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BackendUnavailable, match=expected) as caught:
        npu_backend.import_torch_npu()
    assert "\n" not in str(caught.value)
    info = get_backend("npu").is_available()
    assert not info.ok and info.reason and info.install_hint in str(caught.value)
    assert not str(caught.value).startswith(info.install_hint)


FAKE_INTERFACE = textwrap.dedent(
    """
    import os

    import numpy as np

    LOG = []


    def _chatter(text):  # as ais_bench's logger (Python) and aclruntime (C, fd 1) do
        print(f"[INFO] {text}")
        os.write(1, f"[INFO] acl {text}\\n".encode())

    class _Node:
        def __init__(self, name, shape):
            self.name, self.shape, self.datatype = name, shape, "FLOAT32"

    class InferSession:
        shape = [2, 3, 3, 8, 16, 16]
        fail = False

        def __init__(self, device_id, model_path):
            LOG.append(("init", device_id, model_path))
            _chatter("load model success")

        def free_resource(self):
            LOG.append(("free",))
            _chatter("free resource success")

        def get_inputs(self):
            return [_Node("clips", list(self.shape))]

        def infer(self, feeds, mode="static"):
            (x,) = feeds
            LOG.append(("infer", x.shape, x.dtype))
            _chatter("infer done")
            if self.fail:
                raise RuntimeError("aclmdlExecute failed, error code 507011")
            # logits k of a clip = mean of the clip * (k + 1): checkable, layout (B, V, K)
            means = x.reshape(*self.shape[:-4], -1).mean(-1)
            return [means[..., None] * np.arange(1, 5, dtype=np.float32)]
    """
)


@pytest.fixture
def fake_ais_bench(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_site" / "ais_bench"
    (pkg / "infer").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "infer" / "__init__.py").write_text("")
    (pkg / "infer" / "interface.py").write_text("import aclruntime\n" + FAKE_INTERFACE)
    (tmp_path / "fake_site" / "aclruntime.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "fake_site"))
    om = tmp_path / "model.om"
    om.write_bytes(b"not really an om")
    om.chmod(0o640)
    import ais_bench.infer.interface as interface

    yield interface, om
    for name in [m for m in sys.modules if m.startswith(("ais_bench", "aclruntime"))]:
        del sys.modules[name]


def _expected(x: np.ndarray) -> np.ndarray:
    means = x.reshape(*x.shape[:-4], -1).mean(-1)
    return means[..., None] * np.arange(1, 5, dtype=np.float32)


def test_om_runner_regroups_views_and_pads_static_batch(fake_ais_bench):
    interface, om = fake_ais_bench
    assert get_backend("om").is_available().ok
    runner = load_runner(om, backend="om", device="npu:3")
    x = np.random.default_rng(0).standard_normal((5, 3, 3, 8, 16, 16)).astype(np.float32)
    got = runner.predict(x)  # 15 clips, 6 per call (B=2 x V=3): 3 calls, the last padded
    assert got.shape == (5, 3, 4)
    np.testing.assert_allclose(got.numpy(), _expected(x), rtol=1e-5, atol=1e-6)
    infers = [entry for entry in interface.LOG if entry[0] == "infer"]
    assert len(infers) == 3
    assert all(shape == (2, 3, 3, 8, 16, 16) and dtype == np.float32 for _, shape, dtype in infers)
    assert ("init", 3, str(om)) in interface.LOG


def test_om_runner_with_a_5d_model_and_uint8_free_float64_input(fake_ais_bench):
    interface, om = fake_ais_bench
    interface.InferSession.shape = [4, 3, 8, 16, 16]
    runner = load_runner(om, backend="om")
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 16, 16))  # float64 is converted
    got = runner.predict(x)
    assert got.shape == (2, 4) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), _expected(x.astype(np.float32)), rtol=1e-5, atol=1e-6)


def test_om_errors_surface_clearly(fake_ais_bench, tiny):
    interface, om = fake_ais_bench
    interface.InferSession.shape = [1, 3, 8, 16, 16]
    runner = load_runner(om, backend="om")
    with pytest.raises(
        BackendError, match=r"compiled for clips .* \(3, 8, 16, 16\), got \(3, 8, 32, 32\)"
    ):
        runner.predict(torch.zeros(1, 3, 8, 32, 32))
    interface.InferSession.fail = True
    with pytest.raises(BackendError, match=r"ais_bench inference failed.*507011"):
        runner.predict(torch.zeros(1, 3, 8, 16, 16))
    with pytest.raises(BackendError, match=r"runs compiled \.om files"):
        load_runner(tiny, backend="om")
    with pytest.raises(BackendError, match="does not exist"):
        load_runner(om.with_name("missing.om"), backend="om")
    with pytest.raises(BackendError, match="does not support precision 'bf16'"):
        load_runner(om, backend="om", precision="bf16")


def test_om_without_ais_bench_says_how_to_install(tmp_path):
    if npu_backend.importlib.util.find_spec("ais_bench") is not None:
        pytest.skip("ais_bench is installed here")
    om = tmp_path / "m.om"
    om.write_bytes(b"")
    with pytest.raises(
        BackendUnavailable, match="ais_bench is not installed; install the aclruntime"
    ):
        load_runner(om, backend="om")


def test_predict_on_an_om_file_reads_labels_from_the_onnx_beside_it(fake_ais_bench, tmp_path):
    pytest.importorskip("onnxruntime")
    import attrs
    from typer.testing import CliRunner
    from videogen import write_video

    from i3d.cli.main import app
    from i3d.export import export_onnx
    from i3d.weights.format import WeightsInfo, save_weights
    from i3d.weights.preprocessing import MMACTION_K400

    interface, om = fake_ais_bench
    interface.InferSession.shape = [1, 3, 8, 32, 32]
    video = write_video(tmp_path / "v.mp4", 20, width=48, height=32)
    args = ["predict", str(video), "--weights", str(om), "--backend", "om", "--json"]
    result = CliRunner().invoke(app, [*args, "--top-k", "4"])
    assert result.exit_code == 1 and "records no preprocessing" in result.output
    config = get_preset("i3d_r50", base_channels=4, num_classes=4)
    prep = attrs.evolve(
        MMACTION_K400, clip_len=8, num_clips=2, num_crops=1, resize_short=32, crop_size=32
    )
    labels = ("up", "down", "left", "right")
    weights = save_weights(
        tmp_path / "w.safetensors",
        build_model(config).state_dict(),
        WeightsInfo(config, labels, prep),
    )
    export_onnx(weights, om.with_suffix(".onnx"), clip_len=8, size=32)  # as export_om leaves it
    result = CliRunner().invoke(app, [*args, "--top-k", "4"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)  # ais_bench's log lines went to stderr
    assert "[INFO] infer done" in result.stderr
    assert sorted(t["label"] for t in record["top"]) == sorted(labels)
    assert sum(t["score"] for t in record["top"]) == pytest.approx(1.0, abs=1e-5)
    infers = [entry for entry in interface.LOG if entry[0] == "infer"]
    assert len(infers) == 2 and infers[0][1] == (1, 3, 8, 32, 32)  # 2 clips × 1 crop


def test_om_keeps_ais_bench_logs_off_stdout_and_frees_the_session(fake_ais_bench, capfd):
    interface, om = fake_ais_bench
    interface.InferSession.shape = [1, 3, 8, 16, 16]
    runner = load_runner(om, backend="om")
    assert runner.precision == "unknown"  # no .onnx beside it records what ATC built
    runner.predict(torch.zeros(2, 3, 8, 16, 16))
    runner.close()
    runner.close()
    streams = capfd.readouterr()
    assert streams.out == ""
    for line in ("[INFO] load model success", "[INFO] acl infer done", "[INFO] free resource"):
        assert line in streams.err
    assert interface.LOG.count(("free",)) == 1
    with pytest.raises(BackendError, match="was closed; load it again"):
        runner.predict(torch.zeros(1, 3, 8, 16, 16))


def test_om_reports_the_precision_atc_built(fake_ais_bench):
    from onnx import TensorProto, helper, save

    from i3d.export import OM_BUILD_KEY

    interface, om = fake_ais_bench
    interface.InferSession.shape = [1, 3, 8, 16, 16]
    x = helper.make_tensor_value_info("clips", TensorProto.FLOAT, [1, 3, 8, 16, 16])
    graph = helper.make_graph([helper.make_node("Identity", ["clips"], ["y"])], "g", [x], [x])
    proto = helper.make_model(graph)
    entry = proto.metadata_props.add()
    entry.key, entry.value = OM_BUILD_KEY, json.dumps({"precision": "mixed", "soc": "Ascend310P3"})
    save(proto, str(om.with_suffix(".onnx")))
    assert load_runner(om, backend="om").precision == "mixed"


def test_om_model_path_rules_say_which_failed(fake_ais_bench, tmp_path, monkeypatch):
    interface, om = fake_ais_bench
    odd = tmp_path / "modèle v2.om"
    odd.write_bytes(b"x")
    with pytest.raises(BackendError, match=r"\[A-Za-z0-9_./-\]; .* has ' è': rename it"):
        load_runner(odd, backend="om")
    link = tmp_path / "link.om"
    link.symlink_to(om)
    with pytest.raises(BackendError, match=f"refuses symlinked models; .* links to {om}"):
        load_runner(link, backend="om")
    om.chmod(0o664)
    with pytest.raises(BackendError, match=r"mode -rw-rw-r--: chmod go-w"):
        load_runner(om, backend="om")
    om.chmod(0o600)
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    with pytest.raises(BackendError, match=r"belongs to uid \d+, not 4242: copy it"):
        load_runner(om, backend="om")
    monkeypatch.undo()
    os.truncate(om, 10 * 2**30 + 1)  # sparse: no disk used
    with pytest.raises(BackendError, match=r"refuses models over 10 GB; .* has 10.0 GiB"):
        load_runner(om, backend="om")
    assert not [entry for entry in interface.LOG if entry[0] == "init"]


def test_om_tells_aclruntime_missing_from_cann_missing(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "ais_bench" / "infer").mkdir(parents=True)
    (site / "ais_bench" / "__init__.py").write_text("")
    (site / "ais_bench" / "infer" / "__init__.py").write_text("")
    (site / "ais_bench" / "infer" / "interface.py").write_text("import aclruntime\n")
    monkeypatch.syspath_prepend(str(site))
    om = tmp_path / "m.om"
    om.write_bytes(b"")
    om.chmod(0o600)
    try:
        missing = r"unavailable: aclruntime \(the runtime ais_bench drives\) is not installed"
        with pytest.raises(BackendUnavailable, match=missing):
            load_runner(om, backend="om")
        (site / "aclruntime.py").write_text(
            "raise ImportError('libascendcl.so: cannot open shared object file')\n"
        )
        importlib.invalidate_caches()
        with pytest.raises(
            BackendUnavailable, match=r"CANN runtime is missing \(libascendcl\.so.*set_env\.sh"
        ):
            load_runner(om, backend="om")
        assert "CANN runtime is missing" in get_backend("om").is_available().reason
    finally:
        for name in [m for m in sys.modules if m.startswith(("ais_bench", "aclruntime"))]:
            del sys.modules[name]


def test_bench_on_om_reports_host_rss_not_torch_npus_allocator(fake_ais_bench, monkeypatch):
    from i3d.backends.bench import benchmark

    interface, om = fake_ais_bench
    interface.InferSession.shape = [1, 3, 8, 16, 16]
    allocator = types.SimpleNamespace(
        max_memory_allocated=lambda: 123 * 2**20, synchronize=lambda: None,
        reset_peak_memory_stats=lambda: None,
    )  # fmt: skip
    monkeypatch.setattr(torch, "npu", allocator, raising=False)
    result = benchmark(load_runner(om, backend="om"), torch.zeros(1, 3, 8, 16, 16), iters=2)
    assert result.memory_kind == "process peak RSS" and result.peak_memory_mb != 123


def test_seeds_offline_protocol_export_then_evaluate_on_om(fake_ais_bench, tmp_path):
    """The seeds' NL-R50 OM protocol (V=10 clips × centre crop per call) at a tiny size: export
    prints the atc command for (1, 10, 3, T, S, S), evaluate --backend om feeds exactly that."""
    pytest.importorskip("onnxruntime")
    import attrs
    from typer.testing import CliRunner
    from videogen import write_video

    from i3d.cli.main import app
    from i3d.weights.format import WeightsInfo, save_weights
    from i3d.weights.preprocessing import MMACTION_K400

    interface, om = fake_ais_bench
    interface.InferSession.shape = [1, 10, 3, 8, 32, 32]
    torch.manual_seed(0)
    config = get_preset("i3d_r50_nl_dot_product", base_channels=4, num_classes=4)
    prep = attrs.evolve(
        MMACTION_K400, clip_len=8, num_clips=10, num_crops=1, resize_short=32, crop_size=32
    )
    weights = save_weights(
        tmp_path / "nl.safetensors",
        build_model(config).state_dict(),
        WeightsInfo(config, ("a", "b", "c", "d"), prep),
    )
    export = ["export", "--format", "om", "--weights", str(weights), "--views", "10"]
    export += ["--no-simplify", "--batch", "1", "--soc", "Ascend310P3", "-o", str(om)]
    result = CliRunner().invoke(app, export, env={"PATH": str(tmp_path / "no-atc")})
    assert result.exit_code == 0, result.output
    assert "--input_shape=clips:1,10,3,8,32,32" in result.stdout
    assert "--soc_version=Ascend310P3 --precision_mode=force_fp16" in result.stdout
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("v0.mp4", "v1.mp4"):
        write_video(videos / name, 24, width=40, height=32)
    (tmp_path / "val.txt").write_text("v0.mp4 3\nv1.mp4 0\n")
    evaluate = ["evaluate", str(tmp_path / "val.txt"), "--data-root", str(videos)]
    evaluate += ["--weights", str(om), "--backend", "om", "--crops", "1", "--batch-size", "10"]
    result = CliRunner().invoke(app, [*evaluate, "-o", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["samples"] == 2 and 0 <= metrics["top1"] <= 1
    infers = [entry for entry in interface.LOG if entry[0] == "infer"]
    assert [shape for _, shape, _ in infers] == [(1, 10, 3, 8, 32, 32)] * 2  # one call a video
