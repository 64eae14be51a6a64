"""The openvino backend: conversion checked against torch, the on-disk cache, precision
refusals, the CLI, and the message when openvino is not installed."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from tinymodel import save_tiny_weights
from typer.testing import CliRunner
from videogen import write_video

from i3d.backends import BackendError, BackendUnavailable, get_backend, load_runner
from i3d.backends import openvino_backend as ovb
from i3d.cli.main import app
from i3d.models.space_to_depth import SpaceToDepthConv3d

LABELS = ("walk", "run", "jump", "swim", "sit")
CLIP = (3, 8, 32, 32)  # the tiny weights' test clip (C, T, H, W)
cli = CliRunner()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private i3d cache for the module (the openvino cache lives under it)."""
    root = tmp_path_factory.mktemp("i3d_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("I3D_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def converted(cache, tmp_path_factory):
    """Tiny weights converted once and their logits on two samples × 2 views (4 clips: the
    auto mode compiles for throughput)."""
    pytest.importorskip("openvino")
    weights = save_tiny_weights(tmp_path_factory.mktemp("w") / "tiny.safetensors", LABELS)
    x = torch.randn(2, 2, *CLIP, generator=torch.Generator().manual_seed(0))
    runner = load_runner(weights, backend="openvino")
    return weights, x, runner, runner.predict(x)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_fp32_conversion_matches_torch_and_keeps_views_and_labels(converted):
    weights, x, runner, logits = converted
    expected = load_runner(weights, backend="torch").predict(x)
    assert logits.shape == (2, 2, len(LABELS))
    assert _rel(logits, expected) <= 1e-4
    assert runner.labels == LABELS and runner.precision == "fp32"
    assert runner.sources == {(CLIP, "throughput"): "converted"}
    assert not any(isinstance(m, SpaceToDepthConv3d) for m in runner.model.modules())


def test_second_load_imports_the_compiled_model_from_the_cache(converted, cache):
    weights, x, _, logits = converted
    again = load_runner(weights, backend="openvino")
    assert torch.equal(again.predict(x), logits)
    assert again.sources == {(CLIP, "throughput"): "compiled cache"}
    files = sorted(p.suffix for p in (cache / "openvino").iterdir())
    assert files == [".bin", ".blob", ".xml"]  # no temp files left behind


def test_other_mode_compiles_from_the_cached_ir(converted):
    weights, x, _, logits = converted
    runner = load_runner(weights, backend="openvino", mode="latency")
    assert _rel(runner.predict(x), logits) <= 1e-5
    auto = load_runner(weights, backend="openvino")
    auto.predict(x[:1, 0])  # one clip: latency
    assert runner.sources == {(CLIP, "latency"): "ir cache"}
    assert auto.sources == {(CLIP, "latency"): "compiled cache"}


def test_a_damaged_compiled_model_is_rebuilt(converted, cache):
    weights, x, _, logits = converted
    for blob in (cache / "openvino").glob("*-fp32-throughput-*.blob"):
        blob.write_bytes(b"not a compiled model")
    runner = load_runner(weights, backend="openvino")
    assert _rel(runner.predict(x), logits) <= 1e-5
    assert runner.sources == {(CLIP, "throughput"): "ir cache"}


def test_other_weights_or_clip_shape_convert_again(converted, tmp_path):
    weights, x, _, _ = converted
    other = save_tiny_weights(tmp_path / "other.safetensors", LABELS[:4])
    runner = load_runner(other, backend="openvino")
    runner.predict(x[:1, 0])
    longer = load_runner(weights, backend="openvino")
    longer.predict(torch.randn(1, 3, 10, 32, 32))
    assert runner.sources == {(CLIP, "latency"): "converted"}
    assert longer.sources == {((3, 10, 32, 32), "latency"): "converted"}


def test_in_memory_models_are_not_cached_unless_asked(converted):
    weights, _, _, _ = converted
    from i3d import load_model

    assert load_runner(load_model(weights), backend="openvino").cache is None
    assert load_runner(load_model(weights), backend="openvino", cache="true").cache is not None


def test_an_unusable_cache_folder_is_one_line(converted, monkeypatch, tmp_path):
    weights, x, _, _ = converted
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("I3D_CACHE", str(blocker))
    runner = load_runner(weights, backend="openvino")
    with pytest.raises(BackendError, match=r"cannot use the openvino cache .*cache=false"):
        runner.predict(x)


def test_reduced_precision_is_refused_without_the_cpu_units(converted, monkeypatch):
    weights, _, _, _ = converted
    monkeypatch.setattr(ovb, "cpu_capabilities", lambda core: ("FP32", "INT8"))
    for precision in ("bf16", "fp16"):
        with pytest.raises(BackendError, match=rf"{precision} needs a CPU with {precision} units"):
            load_runner(weights, backend="openvino", precision=precision)
    with pytest.raises(BackendError, match="does not support precision 'int4'"):
        load_runner(weights, backend="openvino", precision="int4")


def test_a_precision_the_cpu_silently_drops_is_refused(converted, monkeypatch):
    weights, x, _, _ = converted
    core = ovb.import_openvino().Core()
    if "BF16" in ovb.cpu_capabilities(core):
        pytest.skip("this CPU has bf16 units")
    monkeypatch.setattr(ovb, "cpu_capabilities", lambda core: ("FP32", "BF16"))
    runner = load_runner(weights, backend="openvino", precision="bf16")
    with pytest.raises(BackendError, match="compiled the model for f32, not the bf16"):
        runner.predict(x)


def test_bf16_runs_where_the_cpu_has_bf16(converted):
    weights, x, _, logits = converted
    if "BF16" not in ovb.cpu_capabilities(ovb.import_openvino().Core()):
        pytest.skip("this CPU has no bf16 units")
    runner = load_runner(weights, backend="openvino", precision="bf16")
    got = runner.predict(x)  # refused if OpenVINO compiled anything but bf16
    # on AMX bf16 converts the model with its RGB stem as space-to-depth (cached apart from
    # fp32's); without AMX it compiles fp32's cached model
    rewritten = any(isinstance(m, SpaceToDepthConv3d) for m in runner.model.modules())
    assert rewritten == ovb.amx_units()
    assert runner.sources == {(CLIP, "throughput"): "converted" if rewritten else "ir cache"}
    assert _rel(got, logits) <= 0.05  # bf16 keeps about 3 significant digits


def test_int8_is_calibrated_on_the_listed_videos_and_reports_its_cost(converted, tmp_path):
    pytest.importorskip("nncf")
    weights, x, _, _ = converted
    for i in range(2):
        write_video(tmp_path / f"c{i}.mp4", 20 + 4 * i, width=48, height=32)
    listing = tmp_path / "calibration.txt"
    listing.write_text("# my videos\nc0.mp4\n\nc1.mp4\n")
    runner = load_runner(weights, backend="openvino", precision="int8", calibration=listing)
    assert runner.predict(x[:1, 0]).isfinite().all()
    agree, rel = runner.int8_cost[CLIP]
    assert 0 <= agree <= 1 and 0 < rel < 0.5
    assert runner.sources == {(CLIP, "latency"): "converted"}
    rewritten = any(isinstance(m, SpaceToDepthConv3d) for m in runner.model.modules())
    assert rewritten == ovb.amx_units()  # the space-to-depth stem on AMX only
    again = load_runner(weights, backend="openvino", precision="int8", calibration=listing)
    again.predict(x[:1, 0])
    assert again.sources == {(CLIP, "latency"): "compiled cache"}


def test_every_frame_weights_calibrate_from_videos_of_other_lengths(tmp_path):
    """DeepMind's every-frame clips are as long as each video: calibration cuts clips of the
    compiled length from every video, as predict --clip-len does (it refused all videos but
    those of exactly that length), and names what it found for a shape it cannot cut."""
    import attrs

    from i3d.weights.preprocessing import DEEPMIND_K400

    prep = attrs.evolve(DEEPMIND_K400, resize_short=32, crop_size=32, input_size=32)
    videos = tuple(write_video(tmp_path / f"c{n}.mp4", n, width=48, height=32) for n in (9, 40))
    clips = ovb.calibration_clips(videos, prep, (3, 12, 32, 32))
    assert clips and all(c.shape == (3, 12, 32, 32) for c in clips)
    assert clips[0].min() >= -1 and clips[0].max() <= 1  # DeepMind's [-1, 1]
    with pytest.raises(BackendError, match=r"give clips of 3×12×32×32.* runs 3×12×40×40"):
        ovb.calibration_clips(videos, prep, (3, 12, 40, 40))


def test_only_bf16_and_int8_on_amx_rewrite_the_stem(monkeypatch):
    for amx in (True, False):
        monkeypatch.setattr(ovb, "amx_units", lambda amx=amx: amx)
        chosen = {p: ovb.rewrites_stem(p) for p in ("fp32", "bf16", "fp16", "int8")}
        assert chosen == {"fp32": False, "bf16": amx, "fp16": False, "int8": amx}


def test_int8_needs_a_calibration_list_of_existing_videos_and_nncf(
    converted, monkeypatch, tmp_path
):
    weights, _, _, _ = converted
    with pytest.raises(BackendError, match="int8 needs calibration videos"):
        load_runner(weights, backend="openvino", precision="int8")
    with pytest.raises(BackendError, match="calibration is for precision int8"):
        load_runner(weights, backend="openvino", calibration="list.txt")
    listing = tmp_path / "calibration.txt"
    listing.write_text("gone.mp4\n")
    with pytest.raises(BackendError, match=r"names .*gone\.mp4, which does not exist"):
        load_runner(weights, backend="openvino", precision="int8", calibration=listing)
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(BackendUnavailable, match=r"needs nncf.*i3d\[openvino-int8\]"):
        load_runner(weights, backend="openvino", precision="int8", calibration=listing)


def test_option_and_device_errors_are_one_line(converted):
    weights, _, _, _ = converted
    with pytest.raises(BackendError, match="mode must be auto, latency or throughput"):
        load_runner(weights, backend="openvino", mode="fast")
    with pytest.raises(BackendError, match="unknown option"):
        load_runner(weights, backend="openvino", channels_last=True)
    with pytest.raises(BackendError, match="runs on cpu, not 'cuda:0'"):
        load_runner(weights, backend="openvino", device="cuda:0")


def test_without_openvino_the_backend_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` fail
    info = get_backend("openvino").is_available()
    assert not info.ok and 'pip install "i3d[openvino]"' in info.install_hint
    with pytest.raises(BackendUnavailable, match=r"openvino is not installed.*i3d\[openvino\]"):
        load_runner(tmp_path / "w.safetensors", backend="openvino")
    result = cli.invoke(app, ["bench", "--backend", "openvino", "--iters", "1"])
    assert result.exit_code != 0
    assert "openvino is not installed" in result.output and "Traceback" not in result.output


def test_cli_predict_and_bench_run_on_openvino(converted, tmp_path):
    weights, _, _, _ = converted
    video = write_video(tmp_path / "v.mp4", 24, width=48, height=32)
    common = [str(video), "--weights", str(weights), "--json", "--all-scores"]
    torch_out = cli.invoke(app, ["predict", *common])
    ov_out = cli.invoke(app, ["predict", *common, "--backend", "openvino", "--batch-size", "2"])
    assert torch_out.exit_code == 0 and ov_out.exit_code == 0, ov_out.output
    want, got = (json.loads(r.stdout.splitlines()[-1]) for r in (torch_out, ov_out))
    assert [t["label"] for t in got["top"]] == [t["label"] for t in want["top"]]
    assert _rel(torch.tensor(got["scores"]), torch.tensor(want["scores"])) <= 1e-4
    bench = cli.invoke(
        app,
        ["bench", "--backend", "openvino", "--weights", str(weights), "--iters", "1",
         "--warmup", "0", "--json", "-O", "mode=throughput"],
    )  # fmt: skip
    assert bench.exit_code == 0, bench.output
    result = json.loads(bench.stdout.splitlines()[-1])
    assert result["backend"] == "openvino" and result["input_shape"] == [1, *CLIP]



def test_every_runner_shares_the_process_one_openvino_core(converted):
    """Each Core installs the CPU plugin's signal stack and restores the one it found when it
    is destroyed; runners dropped first-in first-out left a freed stack installed, and the next
    SIGCHLD (a loader worker exiting) was a SIGSEGV that killed the whole process."""
    weights, _, runner, _ = converted
    again = load_runner(weights, backend="openvino")
    assert again.core is runner.core is ovb.shared_core()


@pytest.fixture(scope="module")
def ov_features(cache, tmp_path_factory):
    """Pooled layer2 features of a short video by torch and by OpenVINO (the first
    conversion of that endpoint), and the weights and video."""
    pytest.importorskip("openvino")
    root = tmp_path_factory.mktemp("features")
    weights = save_tiny_weights(root / "tiny.safetensors", LABELS)
    video = write_video(root / "v.mp4", 24, width=48, height=32)
    common = ["features", str(video), "--weights", str(weights), "--endpoint", "layer2"]
    runs = {}
    for backend in ("torch", "openvino"):
        out = root / f"{backend}.safetensors"
        runs[backend] = cli.invoke(app, [*common, "--backend", backend, "-o", str(out)])
        assert runs[backend].exit_code == 0, runs[backend].output
    return weights, video, common, root, runs


def _features(path):
    from safetensors.torch import load_file

    return load_file(str(path))["0"]


def test_pooled_features_on_openvino_equal_torch_and_reuse_the_cache(ov_features):
    _, _, common, root, runs = ov_features
    converting = "converting the model up to endpoint layer2 for clips 3×8×32×32"
    assert converting in runs["openvino"].output
    want, got = _features(root / "torch.safetensors"), _features(root / "openvino.safetensors")
    assert got.shape == want.shape == (8,)
    assert _rel(got, want) <= 1e-4
    # a second run (per-view maps this time: pooling stays in torch) reads the converted model
    maps = cli.invoke(app, [*common, "--backend", "openvino", "--pool", "none", "-o",
                            str(root / "maps.safetensors")])  # fmt: skip
    assert maps.exit_code == 0, maps.output
    assert "converting" not in maps.output
    per_view = _features(root / "maps.safetensors")
    assert per_view.shape == (1, 8, 1, 4, 4)  # one centre view (val mode): a layer2 map
    assert _rel(per_view.flatten(2).mean(dim=2).mean(dim=0), got) <= 1e-6


def test_snippet_features_on_openvino_equal_torch(ov_features):
    weights, video, _, root, _ = ov_features
    common = ["features", str(video), "--weights", str(weights), "--window", "8",
              "--endpoint", "layer2"]  # fmt: skip
    for backend in ("torch", "openvino"):
        out = cli.invoke(app, [*common, "--backend", backend, "-o", str(root / f"s-{backend}")])
        assert out.exit_code == 0, out.output
    want, got = (torch.from_numpy(np.load(root / f"s-{b}/v.npy")) for b in ("torch", "openvino"))
    assert got.shape == want.shape == (3, 8)  # 24 frames: 3 snippets of 8
    assert _rel(got, want) <= 1e-4


def test_an_endpoint_openvino_cannot_convert_is_a_one_line_error(
    ov_features, monkeypatch, tmp_path
):
    weights, video, _, _, _ = ov_features
    monkeypatch.setenv("I3D_CACHE", str(tmp_path / "fresh"))  # nothing converted there yet

    def refuse(*args, **kwargs):
        raise RuntimeError(
            "Model wasn't fully converted. Failed operations detailed log:\n"
            "-- aten::max_pool3d with a message:\nNo conversion rule found"
        )

    monkeypatch.setattr(ovb.import_openvino(), "convert_model", refuse)
    out = tmp_path / "f.safetensors"
    result = cli.invoke(
        app,
        ["features", str(video), "--weights", str(weights), "--endpoint", "stem",
         "--backend", "openvino", "-o", str(out)],
    )  # fmt: skip
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "convert_model failed at endpoint stem: RuntimeError: aten::max_pool3d" in lines[0]
    assert "--backend torch" in lines[0] and not out.exists()
