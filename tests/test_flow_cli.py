"""``i3d flow``: one DeepMind-scaled .npy per video, resumable, one-line errors."""

from __future__ import annotations

import numpy as np
from typer.testing import CliRunner
from videogen import write_video

from i3d.cli import flow_cmd
from i3d.cli.main import app
from i3d.flow.tvl1_opencv import OpenCVMissingError

runner = CliRunner()
FEW = ["--fps", "0", "--batch-size", "2"]


def test_writes_flow_per_video_and_skips_it_next_time(tmp_path, monkeypatch):
    video = write_video(tmp_path / "clip.mp4", 4, width=32, height=24)
    monkeypatch.setattr(flow_cmd, "FlowConfig", _fast_config)
    out = tmp_path / "flow"
    result = runner.invoke(app, ["flow", str(video), "-o", str(out), *FEW, "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    flow = np.load(out / "clip.npy")
    assert flow.shape == (3, 24, 32, 2) and flow.dtype == np.float16
    assert np.abs(flow).max() <= 1.0 and np.abs(flow).max() > 0
    again = runner.invoke(app, ["flow", str(video), "-o", str(out), *FEW])
    assert again.exit_code == 0 and "1 already there" in again.output
    crop = ["--crop", "16", "--overwrite"]
    mixed = runner.invoke(app, ["flow", str(video), "-o", str(out), *FEW, *crop])
    assert mixed.exit_code == 1 and "other settings (crop 16 vs None" in mixed.output
    cropped = runner.invoke(app, ["flow", str(video), "-o", str(tmp_path / "crop"), *FEW, *crop])
    assert cropped.exit_code == 0, cropped.output
    assert np.load(tmp_path / "crop" / "clip.npy").shape == (3, 16, 16, 2)
    assert not list(out.glob(".*.tmp"))  # written atomically


def test_a_one_frame_video_fails_alone_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(flow_cmd, "FlowConfig", _fast_config)
    good = write_video(tmp_path / "good.mp4", 3, width=32, height=24)
    short = write_video(tmp_path / "short.mp4", 1, width=32, height=24)
    result = runner.invoke(app, ["flow", str(good), str(short), "-o", str(tmp_path / "o"), *FEW])
    assert result.exit_code == 1
    assert "at least 2 frames" in result.output and "Traceback" not in result.output
    assert (tmp_path / "o" / "good.npy").exists()


def test_input_and_missing_opencv_errors_are_one_line(tmp_path, monkeypatch):
    result = runner.invoke(app, ["flow", str(tmp_path / "nope.mp4"), "-o", str(tmp_path)])
    assert result.exit_code == 1 and "does not exist" in result.output
    video = write_video(tmp_path / "clip.mp4", 2, width=32, height=24)

    def missing() -> None:
        raise OpenCVMissingError("the opencv TV-L1 needs opencv-contrib")

    monkeypatch.setattr("i3d.flow.tvl1_opencv.opencv_optflow", missing)
    result = runner.invoke(app, ["flow", str(video), "-o", str(tmp_path), "--impl", "opencv"])
    assert result.exit_code == 1 and "needs opencv-contrib" in result.output
    assert "Traceback" not in result.output


def _fast_config(**kwargs) -> flow_cmd.FlowConfig:
    """The command's config with few scales and iterations (tiny frames, short tests)."""
    from i3d.flow import FlowConfig, TVL1Params

    fast = TVL1Params(nscales=2, warps=2, inner_iterations=10, outer_iterations=2)
    return FlowConfig(tvl1=fast, **kwargs)
