"""On a CUDA device, the CPU's results: predictions, snippet features, FVD, TV-L1 flow, a
one-rank NCCL job, a training step; fp32 is IEEE float32 there and tf32 is not. These run
where a GPU is (``benchmarks/gpu_run.sh`` on a lent one) and skip elsewhere, as in CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tinymodel import save_random_inception, save_tiny_weights
from typer.testing import CliRunner
from videogen import pattern_frame, write_video

import i3d
from i3d.backends import load_runner
from i3d.cli.main import app
from i3d.features import SnippetProtocol, iter_snippets
from i3d.flow import FlowConfig, TVL1Params, deepmind_flow
from i3d.inference import Predictor
from i3d.models import build_model, get_preset

#: ``I3D_CUDA_TESTS_ON=cpu`` dry-runs this file on the CPU (the script, not the numbers)
DEVICE = os.environ.get("I3D_CUDA_TESTS_ON", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
)
runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    weights = save_tiny_weights(root / "tiny.safetensors", ("a", "b", "c"))
    video = write_video(root / "clip.mp4", 40, width=64, height=48)
    return root, weights, video


def _relative(got: torch.Tensor | np.ndarray, want: torch.Tensor | np.ndarray) -> float:
    got, want = (torch.as_tensor(np.asarray(v), dtype=torch.float64) for v in (got, want))
    return float((got - want).abs().max() / want.abs().max())


def test_fp32_is_ieee_on_the_gpu_and_tf32_is_not():
    torch.manual_seed(0)
    model = build_model(get_preset("inception_i3d_rgb")).eval()
    clips = torch.rand(2, 3, 16, 224, 224) * 2 - 1
    with torch.no_grad():
        want = model.double()(clips.double())
    model.float()
    before = torch.backends.cudnn.conv.fp32_precision
    fp32 = load_runner(model, "torch", DEVICE).logits_on_device(clips).cpu()
    if DEVICE != "cuda":
        return
    tf32 = load_runner(model, "torch", DEVICE, precision="tf32").logits_on_device(clips).cpu()
    assert torch.backends.cudnn.conv.fp32_precision == before  # the process keeps its own
    print(f"fp32 vs float64: {_relative(fp32, want):.2e}; tf32: {_relative(tf32, want):.2e}")
    assert _relative(fp32, want) < 1e-5
    if torch.cuda.get_device_capability()[0] >= 8:  # TF32 units: Ampere and later
        assert _relative(tf32, want) > 10 * _relative(fp32, want)


def test_predict_and_the_cli_on_cuda_equal_the_cpu(files):
    _, weights, video = files
    cpu = Predictor(weights, device="cpu").scores(video)
    gpu = Predictor(weights, device=DEVICE).scores(video)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-5, atol=1e-6)
    args = ["predict", str(video), "--weights", str(weights), "--json", "--all-scores"]
    result = runner.invoke(app, [*args, "--device", DEVICE])
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(json.loads(result.output)["scores"], cpu, rtol=1e-5, atol=1e-6)


def test_snippet_features_on_cuda_equal_the_cpu(files):
    _, weights, video = files
    protocol = SnippetProtocol(8, 4, tail="pad", endpoint="layer4")
    (cpu,) = iter_snippets([video], protocol, weights=weights, device="cpu")
    (gpu,) = iter_snippets([video], protocol, weights=weights, device=DEVICE)
    assert gpu.features.shape == cpu.features.shape == (9, 32)
    np.testing.assert_array_equal(gpu.times, cpu.times)
    assert _relative(gpu.features, cpu.features) < 1e-5


def test_fvd_on_cuda_is_the_cpus_number(files):
    root, _, _ = files
    weights = save_random_inception(root / "inception.safetensors")
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, size=(3, 10, 64, 80, 3), dtype=np.uint8)
    fake = np.clip(real.astype(int) + rng.integers(-50, 50, real.shape), 0, 255).astype(np.uint8)
    with pytest.warns(i3d.fvd.FVDWarning):
        cpu = i3d.fvd(real, fake, weights=weights, device="cpu", batch_size=3)
        gpu = i3d.fvd(real, fake, weights=weights, device=DEVICE, batch_size=3)
    print(f"FVD cpu {cpu.fvd!r} cuda {gpu.fvd!r}")  # a small FVD: float32 noise weighs more
    assert gpu.fvd == pytest.approx(cpu.fvd, rel=1e-4)


def test_torch_tvl1_on_cuda_is_the_cpus_flow():
    frames = np.stack([pattern_frame(i * 2, 96, 80) for i in range(4)])
    params = TVL1Params(nscales=3, warps=2, outer_iterations=2)
    cpu = deepmind_flow(frames, FlowConfig(tvl1=params))
    gpu = deepmind_flow(frames, FlowConfig(tvl1=params, device=DEVICE))
    epe = float(((gpu - cpu) * 20).norm(dim=1).mean())  # in pixels (the recipe divides by 20)
    print(f"torch TV-L1 cuda vs cpu: mean EPE {epe:.2e} px")
    assert gpu.shape == cpu.shape and epe < 1e-3


def test_a_one_rank_nccl_job_writes_what_one_process_writes(files, tmp_path):
    """torchrun, one rank on cuda:0 (one GPU cannot hold two NCCL ranks; cuda's process
    group is NCCL's): the predictions are the unsharded run's."""
    from i3d.distributed.launch import free_port

    _, weights, video = files
    common = [str(video), "--weights", str(weights), "--device", DEVICE, "--csv"]
    one = runner.invoke(app, ["predict", *common, str(tmp_path / "one.csv")])
    assert one.exit_code == 0, one.output
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
                "--master-port", str(free_port()), "-m", "i3d"]  # fmt: skip
    proc = subprocess.run(
        [*launcher, "predict", *common, str(tmp_path / "nccl.csv")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "nccl.csv").read_text() == (tmp_path / "one.csv").read_text()


def test_a_training_step_on_cuda_with_amp(tmp_path):
    from i3d.data.toy import ToySpec, make_toy_dataset

    toy = tmp_path / "toy"
    spec = ToySpec(classes=2, videos_per_class=4, val_per_class=2, frames=8, size=32)
    make_toy_dataset(toy, spec)
    work = tmp_path / "work"
    result = runner.invoke(app, [
        "train", "--train-list", str(toy / "train.txt"), "--val-list", str(toy / "val.txt"),
        "--data-root", str(toy), "--labels", str(toy / "labels.txt"), "--depth", "18",
        "--base-channels", "8", "--clip-len", "8", "--frame-interval", "1", "--size", "32",
        "--epochs", "1", "--batch-size", "4", "--workers", "0", "--backend", DEVICE,
        *(["--amp"] if DEVICE == "cuda" else []), "--work-dir", str(work),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert any(work.rglob("*.safetensors")), sorted(p.name for p in work.rglob("*"))
