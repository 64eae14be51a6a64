"""Frame sampling vs mmaction2's SampleFrames / DenseSampleFrames fixtures; seeded RNG."""

from __future__ import annotations

import json

import numpy as np
import pytest

from i3d.data.rng import sample_rng
from i3d.data.sampling import DenseSampleFrames, SampleFrames


@pytest.fixture(scope="module")
def grid(reference):
    return json.loads((reference / "pipeline" / "sample_frames.json").read_text())


def _build(case):
    cls = SampleFrames if case["transform"] == "SampleFrames" else DenseSampleFrames
    return cls(**case["kwargs"], start_index=case["inputs"]["start_index"])


def test_test_mode_indices_equal_mmaction(grid):
    cases = grid["test_mode_cases"]
    assert len(cases) == 932
    for case in cases:
        sampler = _build(case)
        total = case["inputs"]["total_frames"]
        if "error" in case:
            with pytest.raises(ValueError, match="twice_sample"):
                sampler(total)
            continue
        inds = sampler(total)
        assert inds.dtype == np.int32
        assert inds.tolist() == case["frame_inds"], case
        assert sampler.num_views == case["num_views"]


def test_round_half_even_cases_are_covered(grid):
    assert sum(bool(c.get("round_half_even_matters")) for c in grid["test_mode_cases"]) == 38


def test_train_mode_ranges_match_mmaction(grid):
    for stats in grid["train_mode_stats"]:
        sampler = _build({**stats, "inputs": {"start_index": 0}})
        sampler = type(sampler)(**{**stats["kwargs"], "test_mode": False})
        total = stats["inputs"]["total_frames"]
        clip_len = stats["kwargs"]["clip_len"]
        firsts, per_clip = [], []
        for draw in range(2000):
            inds = sampler(total, np.random.default_rng([7, draw]))
            assert inds.shape == (sampler.num_views * clip_len,)
            assert inds.min() >= 0 and inds.max() < total
            firsts.append(int(inds[0]))
            per_clip.append(inds[::clip_len])
        expected = stats["first_index"]
        assert (min(firsts), max(firsts)) == (expected["min"], expected["max"]), stats["kwargs"]
        assert set(map(str, firsts)) <= set(expected["histogram"])
        assert np.mean(firsts) == pytest.approx(
            expected["mean"], abs=0.05 * max(expected["max"], 1)
        )
        if "per_clip_first_index" in stats:
            got = np.array(per_clip)
            for clip, ref in enumerate(stats["per_clip_first_index"]):  # tails are rare: means
                tolerance = 0.05 * (ref["max"] - ref["min"] + 1) + 0.1
                assert got[:, clip].mean() == pytest.approx(ref["mean"], abs=tolerance)


def test_train_mode_needs_a_generator_and_is_reproducible():
    sampler = SampleFrames(clip_len=8, frame_interval=2, num_clips=2)
    with pytest.raises(ValueError, match="Generator"):
        sampler(100)
    a = sampler(100, sample_rng(3, 1, 42))
    assert np.array_equal(a, sampler(100, sample_rng(3, 1, 42)))
    draws = {tuple(sampler(100, sample_rng(3, epoch, 42))) for epoch in range(20)}
    assert len(draws) > 10


def test_repeat_last_and_keep_tail():
    sampler = SampleFrames(
        clip_len=4, frame_interval=3, test_mode=True, out_of_bound_opt="repeat_last"
    )
    assert sampler(5).tolist() == [0, 3, 3, 3]
    tail = SampleFrames(clip_len=4, frame_interval=1, num_clips=2, keep_tail_frames=True)
    for seed in range(50):
        inds = tail(10, np.random.default_rng(seed))
        assert 0 <= inds[0] <= 3 and 3 <= inds[4] <= 6


def test_invalid_settings():
    with pytest.raises(ValueError, match="clip_len"):
        SampleFrames(clip_len=0)
    with pytest.raises(ValueError, match="0 frames"):
        SampleFrames(clip_len=4, test_mode=True)(0)
    with pytest.raises(ValueError, match="seed, epoch"):
        sample_rng(-1, 0, 0)
