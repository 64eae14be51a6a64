"""FVD protocols: each resize against its definition, clip selection, protocol facts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from i3d.fvd.protocols import PROTOCOLS, ClipError, Protocol, get_protocol
from i3d.fvd.resize import (
    short_side_center_crop,
    short_side_size,
    stylegan_v_detector_resize,
    tf1_resize_bilinear,
    tf1_resize_bilinear_float,
    tf1_source_positions,
    torch_bilinear,
)


def _row_clip(values, height=1):
    """A (1, height, W, 3) uint8 clip whose every row and channel is ``values``."""
    row = np.asarray(values, dtype=np.uint8)
    return torch.from_numpy(
        np.broadcast_to(row[None, None, :, None], (1, height, len(row), 3)).copy()
    )


def _tf1_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 legacy resize_bilinear written pixel by pixel from its documented rule:
    source = dst * (in / out) in float32, neighbours floor and min(floor + 1, in - 1),
    interpolated along x in both rows, then along y."""
    in_h, in_w = image.shape[:2]
    sy, sx = np.float32(in_h) / np.float32(out_h), np.float32(in_w) / np.float32(out_w)
    out = np.zeros((out_h, out_w, image.shape[2]), dtype=np.float32)
    for y in range(out_h):
        fy = np.float32(y) * sy
        y0 = int(np.floor(fy))
        y1, wy = min(y0 + 1, in_h - 1), np.float32(fy - np.float32(y0))
        for x in range(out_w):
            fx = np.float32(x) * sx
            x0 = int(np.floor(fx))
            x1, wx = min(x0 + 1, in_w - 1), np.float32(fx - np.float32(x0))
            top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * wx
            bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * wx
            out[y, x] = top + (bottom - top) * wy
    return out


def test_tf1_positions_by_hand():
    # downsample 4 -> 2: scale 2, sources 0 and 2 (no half-pixel offset)
    lo, hi, w = tf1_source_positions(4, 2)
    assert lo.tolist() == [0, 2] and hi.tolist() == [1, 3] and w.tolist() == [0, 0]
    # upsample 2 -> 4: scale 0.5, sources 0, .5, 1, 1.5; the upper neighbour clamps at 1
    lo, hi, w = tf1_source_positions(2, 4)
    assert lo.tolist() == [0, 0, 1, 1] and hi.tolist() == [1, 1, 1, 1]
    assert w.tolist() == [0.0, 0.5, 0.0, 0.5]


@pytest.mark.parametrize(
    ("row", "size", "want"),
    [
        ([0, 100], 4, [0, 50, 100, 100]),  # torch's half-pixel rule gives 0, 25, 75, 100
        ([0, 10, 20, 30], 2, [0, 20]),  # sources 0 and 2: samples, no averaging
        ([0, 30, 60], 2, [0, 45]),  # sources 0 and 1.5
    ],
)
def test_tf1_bilinear_rows_by_hand(row, size, want):
    out = tf1_resize_bilinear_float(_row_clip(row).float(), (1, size))
    assert out[0, 0, :, 0].tolist() == want


def test_tf1_bilinear_2d_by_hand():
    image = torch.tensor([[0.0, 100.0], [200.0, 255.0]])[None, :, :, None]
    out = tf1_resize_bilinear_float(image, (4, 4))[0, :, :, 0]
    # rows at y = 0, .5, 1, 1 (clamped) of columns at x = 0, .5, 1, 1
    want = [
        [0, 50, 100, 100],
        [100, 138.75, 177.5, 177.5],
        [200, 227.5, 255, 255],
        [200, 227.5, 255, 255],
    ]
    assert out.tolist() == [[float(v) for v in r] for r in want]


@pytest.mark.parametrize(
    ("shape", "out"), [((5, 7), (3, 4)), ((3, 4), (7, 9)), ((6, 6), (224, 224))]
)
def test_tf1_bilinear_matches_per_pixel_definition(shape, out):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*shape, 3)).astype(np.float32)
    ours = tf1_resize_bilinear_float(torch.from_numpy(image)[None], out)[0].numpy()
    np.testing.assert_array_equal(ours, _tf1_reference(image, *out))


def test_tf1_protocol_scales_to_minus_one_one():
    clip = _row_clip([0, 255], height=2)
    out = tf1_resize_bilinear(clip, 4)
    assert out.shape == (3, 1, 4, 4) and out.dtype == torch.float32
    assert out[0, 0, 0].tolist() == [-1.0, 0.0, 1.0, 1.0]  # 2 * (0, 127.5, 255, 255) / 255 - 1


def test_torch_bilinear_is_half_pixel_by_hand():
    out = torch_bilinear(_row_clip([0, 255]), 4)
    # sources (d + .5) / 2 - .5 = -.25 (clamped to 0), .25, .75, 1.25 (clamped to 1)
    want = [2 * v / 255 - 1 for v in (0.0, 63.75, 191.25, 255.0)]
    np.testing.assert_allclose(out[0, 0, 0].numpy(), want, atol=1e-6)


def test_short_side_center_crop_by_hand():
    assert short_side_size(4, 8, 2) == (2, 4)
    # the source computes ceil(300 * (224 / 200)) in float64: 336.00000000000006 -> 337
    assert short_side_size(300, 200, 224) == (337, 224)
    assert short_side_size(240, 320, 224) == (224, 299)  # ceil(298.67)
    # 4x8 -> 2x4: halving averages pixel pairs (sources 2d + .5); the centre crop keeps columns 1, 2
    row = [0, 20, 40, 60, 80, 100, 120, 140]
    out = short_side_center_crop(_row_clip(row, height=4), 2)
    want = [(v / 255 - 0.5) * 2 for v in (50.0, 90.0)]
    np.testing.assert_allclose(out[0, 0, 0].numpy(), want, atol=1e-6)
    assert out.shape == (3, 1, 2, 2)


def test_stylegan_v_resize_is_per_frame_bilinear_of_rescaled_values():
    rng = np.random.default_rng(3)
    clip = torch.from_numpy(rng.integers(0, 256, size=(3, 20, 30, 3), dtype=np.uint8))
    out = stylegan_v_detector_resize(clip, 16)
    frames = clip.float().permute(0, 3, 1, 2) / 127.5 - 1
    want = F.interpolate(frames, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, want.permute(1, 0, 2, 3), rtol=0, atol=1e-6)


def test_resizes_refuse_float_frames():
    with pytest.raises(ValueError, match="uint8"):
        tf1_resize_bilinear(torch.zeros(2, 4, 4, 3), 224)


def test_protocol_facts():
    tf, sg, cd, cm = (PROTOCOLS[n] for n in ("tf", "stylegan-v", "cd-fvd", "common-metrics"))
    assert (tf.resize, tf.frames, tf.covariance_ddof, tf.size) == ("tf1_bilinear", None, 1, 224)
    assert (sg.frames, sg.real_start, sg.fake_start, sg.short_real, sg.covariance_ddof) == (
        16, "random", "first", "discard", 0,
    )  # fmt: skip
    assert (cd.resize, cd.covariance_ddof) == ("torch_bilinear", 0)
    # TF-GAN's SVD root floor for tf only; VideoGPT's pytorch_i3d BatchNorm eps for cd-fvd only
    assert [p.root_floor for p in (tf, sg, cd, cm)] == [1e-10, 0.0, 0.0, 0.0]
    assert [p.batchnorm_eps for p in (tf, sg, cd, cm)] == [None, None, 1e-5, None]
    assert (cm.resize, cm.min_frames, cm.covariance_ddof) == ("short_side_center_crop", 10, 1)
    # common_metrics' videogpt method: its frames as method='styleganv', VideoGPT's detector
    # (cd-fvd's) and TF-GAN's square roots, unbiased covariance
    vg = PROTOCOLS["common-metrics-videogpt"]
    assert (vg.resize, vg.min_frames, vg.covariance_ddof) == (cm.resize, 10, 1)
    assert (vg.batchnorm_eps, vg.root_floor) == (1e-5, 1e-10)
    with pytest.raises(ValueError, match="unknown FVD protocol"):
        get_protocol("fid")
    with pytest.raises(ClipError, match="at least 9"):
        get_protocol("tf", frames=8)
    with pytest.raises(ValueError, match="unknown resize"):
        Protocol(name="x", resize="nearest")


def test_clip_selection():
    tf, sg = PROTOCOLS["tf"], PROTOCOLS["stylegan-v"]
    assert tf.clip_indices(12, "real", 0, 0).tolist() == list(range(12))
    assert get_protocol("tf", 10).clip_indices(30, "real", 0, 0).tolist() == list(range(10))
    starts = {int(sg.clip_indices(40, "real", 7, i)[0]) for i in range(50)}
    assert min(starts) >= 0 and max(starts) <= 24 and len(starts) > 10  # uniform in [0, 40 - 16]
    again = [int(sg.clip_indices(40, "real", 7, i)[0]) for i in range(5)]
    assert again == [int(sg.clip_indices(40, "real", 7, i)[0]) for i in range(5)]  # seeded
    assert again != [int(sg.clip_indices(40, "real", 8, i)[0]) for i in range(5)]
    assert sg.clip_indices(40, "fake", 7, 3).tolist() == list(range(16))  # fakes: first frames
    assert sg.clip_indices(15, "real", 0, 0) is None  # StyleGAN-V discards short real videos
    with pytest.raises(ClipError, match="16-frame clips"):
        sg.clip_indices(15, "fake", 0, 0, "gen.mp4")
    with pytest.raises(ClipError, match=r"a\.mp4 has 8 frames.*at least 9"):
        tf.clip_indices(8, "real", 0, 0, "a.mp4")
    with pytest.raises(ClipError, match="at least 10"):
        PROTOCOLS["common-metrics"].clip_indices(9, "real", 0, 0)
    with pytest.raises(ClipError, match="--frames"):
        tf.clip_indices(5000, "real", 0, 0)
