"""A third-party backend, installed as a throwaway distribution, is found through entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import attrs
import pytest
import torch
from typer.testing import CliRunner
from videogen import write_video

from i3d.backends import BackendError, get_backend, list_backends, load_runner
from i3d.cli.main import app
from i3d.models import build_model, get_preset
from i3d.weights.format import WeightsInfo, save_weights
from i3d.weights.preprocessing import Preprocessing

PLUGIN = textwrap.dedent(
    """
    import torch
    from i3d.backends.base import Availability


    class EchoRunner:
        backend, device, precision = "echo", "cpu", "fp32"

        def predict(self, batch):
            batch = torch.as_tensor(batch, dtype=torch.float32)
            logits = torch.zeros(*batch.shape[:-4], 7)
            logits[..., 6] = 1.0 + batch.abs().mean()  # recognisable: always class 6
            return logits


    class EchoBackend:
        name = "echo"

        def is_available(self):
            return Availability(ok=True, reason="always", version="9.9.9")

        def load(self, weights_or_model, device, precision, batch_size, **options):
            return EchoRunner()
    """
)


def make_distribution(root: Path, name: str, entry_points: str, module: str | None) -> Path:
    """A minimal installed distribution: a package plus ``<name>-1.0.dist-info``."""
    site = root / "site"
    dist_info = site / f"{name}-1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(entry_points)
    if module is not None:
        (site / name).mkdir()
        (site / name / "__init__.py").write_text(module)
    return site


@pytest.fixture
def echo_site(tmp_path, monkeypatch):
    site = make_distribution(
        tmp_path, "i3d_echo_plugin", "[i3d.backends]\necho = i3d_echo_plugin:EchoBackend\n", PLUGIN
    )
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("i3d_echo_plugin", None)


def test_plugin_is_discovered_and_loaded(echo_site):
    assert "echo" in list_backends()
    assert get_backend("echo").is_available().version == "9.9.9"
    runner = load_runner("ignored", backend="echo")
    logits = runner.predict(torch.ones(2, 3, 3, 4, 8, 8))
    assert logits.shape == (2, 3, 7) and torch.all(logits.argmax(-1) == 6)
    result = CliRunner().invoke(app, ["backends"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "echo" in result.output and "9.9.9" in result.output


def test_cli_bench_uses_the_plugin(echo_site, tmp_path):
    args = ["bench", "--backend", "echo", "--json", "--clip-len", "4", "--size", "8"]
    result = CliRunner().invoke(app, [*args, "--iters", "2", "--weights", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["backend"] == "echo" and report["input_shape"] == [1, 3, 4, 8, 8]


def test_cli_predict_runs_the_plugin_in_a_fresh_process(echo_site, tmp_path):
    labels = tuple(f"class{i}" for i in range(7))
    prep = Preprocessing(clip_len=4, frame_interval=1, num_clips=1, num_crops=1)
    prep = attrs.evolve(prep, resize_short=32, crop_size=32, input_size=32)
    config = get_preset("i3d_r50", base_channels=4, num_classes=7)
    weights = tmp_path / "tiny.safetensors"
    state = build_model(config).state_dict()
    state["cls_head.fc_cls.bias"][6] = -1e4  # the real model can never pick class 6
    save_weights(weights, state, WeightsInfo(config=config, labels=labels, preprocessing=prep))
    video = tmp_path / "clip.mp4"
    write_video(video, 8, width=48, height=40)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(echo_site), *sys.path])}
    command = [sys.executable, "-m", "i3d", "predict", str(video), "--weights", str(weights)]
    command += ["--backend", "echo", "--json", "--top-k", "1"]
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["top"][0]["label"] == "class6"  # only the echo backend scores class 6


def test_broken_and_conflicting_plugins_are_reported(tmp_path, monkeypatch):
    broken = make_distribution(
        tmp_path / "a", "i3d_broken_plugin", "[i3d.backends]\nbroken = i3d_nowhere:Backend\n", None
    )
    monkeypatch.syspath_prepend(str(broken))
    with pytest.raises(
        BackendError, match=r"backend 'broken' \(i3d_nowhere:Backend\) failed to import"
    ):
        get_backend("broken")
    result = CliRunner().invoke(app, ["backends"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "broken" in result.output
    clash = make_distribution(
        tmp_path / "b", "i3d_clash_plugin", "[i3d.backends]\ntorch = i3d_clash:Torch\n", None
    )
    monkeypatch.syspath_prepend(str(clash))
    with pytest.raises(BackendError, match="two installed packages register backend 'torch'"):
        list_backends()
