"""TV-L1 optical flow (i3d.flow): known motion, OpenCV agreement, DeepMind's recipe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from videogen import pattern_frame

from i3d.flow import (
    OPENCV_DEFAULTS,
    FlowConfig,
    TVL1Params,
    deepmind_flow,
    end_point_error,
    opencv_available,
    opencv_tvl1_flow,
    rgb_to_gray,
    scale_flow,
    tvl1_flow,
)
from i3d.flow.image_ops import median_filter, resize_linear, scaled_size, warp_bicubic
from i3d.flow.synthetic import moving_pair, smooth_texture, swirl, translation

H, W = 48, 64
#: few scales and iterations: the tests' budget, and still the full algorithm
FAST = TVL1Params(nscales=3, warps=3, inner_iterations=20, outer_iterations=3)
needs_opencv = pytest.mark.skipif(not opencv_available(), reason="opencv-contrib not installed")


def _torch_flow(a: np.ndarray, b: np.ndarray, params: TVL1Params = FAST) -> np.ndarray:
    return tvl1_flow(torch.from_numpy(a), torch.from_numpy(b), params).numpy()


def test_recovers_a_subpixel_translation():
    truth = translation(H, W, 1.5, -0.75)
    a, b = moving_pair(H, W, truth)
    flow = _torch_flow(a[None], b[None])[0]
    assert flow.shape == (2, H, W)
    assert end_point_error(flow, truth) < 0.1  # measured 0.059 (0.015 away from the border)
    assert end_point_error(flow[:, 4:-4, 4:-4], truth[:, 4:-4, 4:-4]) < 0.03


def test_recovers_a_smooth_flow_field():
    truth = swirl(H, W, 1.5)
    a, b = moving_pair(H, W, truth, seed=1)
    flow = _torch_flow(a[None], b[None])[0]
    assert end_point_error(flow, truth) < 0.4  # measured 0.26
    assert end_point_error(np.zeros_like(truth), truth) > 1.0  # the bound means something


def test_default_parameters_recover_a_translation():
    truth = translation(H, W, -2.0, 1.0)
    a, b = moving_pair(H, W, truth, seed=2)
    flow = _torch_flow(a[None], b[None], OPENCV_DEFAULTS)[0]
    assert end_point_error(flow[:, 4:-4, 4:-4], truth[:, 4:-4, 4:-4]) < 0.05


def test_a_batch_gives_what_each_pair_gives_alone():
    a0, b0 = moving_pair(H, W, translation(H, W, 1.0, 0.5), seed=3)
    a1, b1 = moving_pair(H, W, swirl(H, W, 1.0), seed=4)
    loose = TVL1Params(nscales=2, warps=2, inner_iterations=15, outer_iterations=2, epsilon=0.05)
    batch = _torch_flow(np.stack([a0, a1]), np.stack([b0, b1]), loose)
    alone = [_torch_flow(a[None], b[None], loose)[0] for a, b in ((a0, b0), (a1, b1))]
    for got, want in zip(batch, alone, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_cpu_threads_share_out_pairs_with_single_core_ops(monkeypatch):
    # intra-op OpenMP teams spun at every op's barrier on a loaded machine (60 s per 256² pair
    # on 2 threads against 1.7 s on 1): each thread must solve its pairs with one-core ops
    import i3d.flow.tvl1_torch as solver

    seen = []
    one_scale = solver._one_scale

    def recording(*args):
        seen.append(torch.get_num_threads())
        return one_scale(*args)

    monkeypatch.setattr(solver, "_one_scale", recording)
    monkeypatch.setattr(solver, "CPU_BATCH_PIXELS", H * W, raising=False)  # 1 pair a batch
    pairs = [moving_pair(H, W, translation(H, W, 1.0, 0.5), seed=s) for s in range(3)]
    first, second = (np.stack(side) for side in zip(*pairs, strict=True))
    loose = TVL1Params(nscales=2, warps=1, inner_iterations=5, outer_iterations=1)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        threaded = _torch_flow(first, second, loose)
        assert torch.get_num_threads() == 2  # the caller's setting comes back
        assert seen and set(seen) == {1}
        torch.set_num_threads(1)
        np.testing.assert_array_equal(threaded, _torch_flow(first, second, loose))
    finally:
        torch.set_num_threads(previous)


def test_identical_frames_give_zero_flow():
    frame = np.rint(smooth_texture(H, W)).astype(np.uint8)[None]
    assert np.abs(_torch_flow(frame, frame)).max() < 1e-4


def test_median_filter_is_the_median_of_each_window():
    field = torch.from_numpy(np.random.default_rng(0).random((2, 9, 11)).astype(np.float32))
    padded = np.pad(field.numpy(), ((0, 0), (2, 2), (2, 2)), mode="edge")
    want = np.median(
        np.lib.stride_tricks.sliding_window_view(padded, (5, 5), axis=(1, 2)).reshape(2, 9, 11, 25),
        axis=-1,
    )
    np.testing.assert_array_equal(median_filter(field, 5).numpy(), want)


def test_gray_is_opencvs_rgb2gray_on_known_colours():
    colours = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [1, 1, 1]]])
    assert rgb_to_gray(colours.astype(np.uint8)).tolist() == [[76, 150, 29, 255, 1]]


def test_deepmind_flow_clips_scales_and_lays_out():
    frames = np.stack([pattern_frame(i, W, H) for i in range(3)])
    config = FlowConfig(tvl1=FAST, batch_size=1)
    tchw = deepmind_flow(frames, config)
    assert tchw.shape == (2, 2, H, W) and tchw.dtype == torch.float32
    assert tchw.abs().max() <= 1.0
    cthw = deepmind_flow(frames, config, layout="cthw")
    torch.testing.assert_close(cthw, tchw.permute(1, 0, 2, 3))
    raw = torch.tensor([-45.0, -20.0, -5.0, 0.0, 10.0, 30.0])
    assert scale_flow(raw).tolist() == [-1.0, -1.0, -0.25, 0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="at least 2 frames"):
        deepmind_flow(frames[:1], config)


def test_settings_are_validated():
    with pytest.raises(ValueError):
        FlowConfig(impl="raft")
    with pytest.raises(ValueError, match="gamma"):
        TVL1Params(gamma=0.1)
    with pytest.raises(ValueError, match="odd"):
        TVL1Params(median_filtering=4)
    with pytest.raises(ValueError, match="shape"):
        tvl1_flow(torch.zeros(1, 8, 8), torch.zeros(1, 8, 9))


@needs_opencv
def test_image_operators_match_opencv():
    import cv2

    rng = np.random.default_rng(5)
    image = (rng.random((H, W)) * 255).astype(np.float32)
    small = cv2.resize(image, None, fx=0.8, fy=0.8, interpolation=cv2.INTER_LINEAR)
    ours = resize_linear(torch.from_numpy(image)[None], scaled_size(H, W, 0.8), (1.25, 1.25))
    np.testing.assert_allclose(ours[0].numpy(), small, atol=1e-3)
    up = cv2.resize(small, (W, H), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(resize_linear(ours, (H, W))[0].numpy(), up, atol=1e-3)
    np.testing.assert_array_equal(
        median_filter(torch.from_numpy(image)[None], 5)[0].numpy(), cv2.medianBlur(image, 5)
    )
    fx, fy = (rng.standard_normal((2, H, W)) * 3).astype(np.float32)
    xs, ys = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))
    want = cv2.remap(image, xs + fx, ys + fy, cv2.INTER_CUBIC)
    got = warp_bicubic(
        torch.from_numpy(image)[None, None], torch.from_numpy(fx)[None], torch.from_numpy(fy)[None]
    )
    np.testing.assert_allclose(got[0, 0].numpy(), want, atol=1e-2)
    colours = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(rgb_to_gray(colours), cv2.cvtColor(colours, cv2.COLOR_RGB2GRAY))


@needs_opencv
def test_agrees_with_opencv_with_the_same_parameters():
    video = [rgb_to_gray(pattern_frame(i, W, H)) for i in (3, 4)]
    tex0, tex1 = moving_pair(H, W, swirl(H, W, 1.5), seed=6)
    first, second = np.stack([video[0], tex0]), np.stack([video[1], tex1])
    ours = _torch_flow(first, second)
    reference = opencv_tvl1_flow(first, second, FAST)
    assert end_point_error(ours, reference) < 0.01  # measured 4e-5 px on such pairs


@needs_opencv
def test_agrees_with_opencv_at_its_defaults():
    a, b = moving_pair(H, W, swirl(H, W, 1.5))
    ours = _torch_flow(a[None], b[None], OPENCV_DEFAULTS)
    reference = opencv_tvl1_flow(a[None], b[None])
    assert end_point_error(ours, reference) < 0.1  # measured 0.04 px
