"""FVD on 1 and 2 processes: the per-video activations are merged in input order in float64,
so the number is the same (at equal thread counts: spawned CPU ranks use cores / N each)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from tinymodel import save_random_inception

import i3d
from i3d.fvd import compute_stats

pytestmark = pytest.mark.filterwarnings("ignore::i3d.fvd.FVDWarning")


def test_one_and_two_processes_give_the_same_fvd(tmp_path):
    weights = save_random_inception(tmp_path / "tiny.safetensors")
    rng = np.random.default_rng(1)
    real = rng.integers(0, 256, size=(3, 18, 24, 32, 3), dtype=np.uint8)
    fake = rng.integers(0, 256, size=(2, 9, 24, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "real.npy", real)
    # stylegan-v samples real clips at seeded offsets: the ranks must draw the same ones
    kwargs = {"protocol": "stylegan-v", "frames": 9, "seed": 3, "weights": weights}
    two_real = compute_stats(tmp_path / "real.npy", world_size=2, **kwargs)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))  # what each spawned rank uses
    try:
        one_real = compute_stats(tmp_path / "real.npy", **kwargs)
        fake_stats = compute_stats(fake, role="fake", **kwargs)
    finally:
        torch.set_num_threads(threads)
    assert two_real.summary == one_real.summary
    np.testing.assert_allclose(two_real.stats.mean, one_real.stats.mean, rtol=1e-12, atol=0)
    one = i3d.fvd(one_real, fake_stats, protocol="stylegan-v", frames=9).fvd
    two = i3d.fvd(two_real, fake_stats, protocol="stylegan-v", frames=9).fvd
    assert one > 0 and two == pytest.approx(one, rel=1e-9)
