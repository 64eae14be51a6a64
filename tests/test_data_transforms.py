"""Transforms and pipelines vs mmaction2 fixtures (resize bit-exact to OpenCV x86, crops, views)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import av
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from videogen import read_index, write_video

from i3d.data import transforms as T
from i3d.data.decode import open_video
from i3d.data.pipeline import build_pipeline
from i3d.data.rng import sample_rng
from i3d.weights.preprocessing import DEEPMIND_K400, MMACTION_K400


@pytest.fixture(scope="module")
def pipe_ref(reference):
    return reference / "pipeline"


@pytest.fixture(scope="module")
def resize_npz(pipe_ref):
    return dict(np.load(pipe_ref / "resize.npz"))


def test_resize_is_bit_exact_to_opencv(resize_npz):
    src = torch.from_numpy(resize_npz["src_frames"])
    assert torch.equal(T.resize_short(src, 256), src)
    outputs = {
        "resize_short128": T.resize_short(src, 128),  # exact 2x: (a+b+c+d+2)>>2
        "resize_short200": T.resize_short(src, 200),
        "resize_224x224_noratio": T.resize(src, (224, 224)),
        "crop320x240_resize_short256": T.resize_short(T.center_crop(src, (320, 240)), 256),
    }
    for key, out in outputs.items():
        assert np.array_equal(out.numpy(), resize_npz[key]), key


def test_float_bilinear_is_within_one_of_opencv(resize_npz):
    """The documented bound for non-OpenCV resizers (torch/PIL): ±1 on a minority of pixels."""
    src = T.rearrange(torch.from_numpy(resize_npz["src_frames"]), "t h w c -> t c h w").float()
    out = F.interpolate(src, size=(200, 266), mode="bilinear", align_corners=False)
    out = T.rearrange(out.round().clamp(0, 255).byte(), "t c h w -> t h w c").numpy()
    diff = np.abs(out.astype(int) - resize_npz["resize_short200"])
    assert diff.max() == 1 and 0 < (diff > 0).mean() < 0.2


def test_interpolations_are_mmcvs_opencv_codes(resize_npz):
    """Each name means what mmcv's ``imresize`` does with it (its ``cv2_interp_codes``)."""
    src = torch.from_numpy(resize_npz["src_frames"][:2])
    codes = {"nearest": 0, "bilinear": 1, "bicubic": 2, "area": 3, "lanczos": 4}
    assert set(T.INTERPOLATIONS) == set(codes)
    for mode, code in codes.items():
        out = T.resize_short(src, 128, mode)
        assert out.shape == (2, 128, 170, 3) and out.dtype == torch.uint8
        for frame, got in zip(src.numpy(), out.numpy(), strict=True):
            assert np.array_equal(got, cv2.resize(frame, (170, 128), interpolation=code)), mode
    grey = T.resize(src[..., :1].contiguous(), (85, 64))
    assert grey.shape == (2, 64, 85, 1)
    with pytest.raises(ValueError, match="interpolation"):
        T.resize(src, (10, 10), "nearest-ish")
    with pytest.raises(ValueError, match="uint8 frames"):
        T.resize(src.float(), (10, 10))


@pytest.mark.parametrize("codec", ["libx264", "libvpx-vp9"])
def test_real_resolution_three_crop_equals_decode_all_and_cv2(tmp_path, codec):
    """640×360 (resized to 455×256, unlike the 340×256 fixtures): the pipeline's bytes equal
    mmaction's recipe done by hand: every frame decoded to rgb24, ``cv2.resize`` to mmcv's
    rescaled size, then ThreeCrop's boxes."""
    path = write_video(
        tmp_path / f"v.{'webm' if 'vpx' in codec else 'mp4'}", 24, 640, 360, codec=codec
    )
    pipe = build_pipeline(
        MMACTION_K400, "test", clip_len=4, frame_interval=2, num_clips=2, crop_size=256
    )
    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    with open_video(path) as reader:
        clips = pipe.clip_indices(reader, None)
    assert T.rescale_size(640, 360, 256) == (455, 256)
    expected = []
    for x1, _, x2, _ in T.three_boxes(455, 256, 256):
        for clip in clips:
            frames = [
                cv2.resize(decoded[i], (455, 256), interpolation=cv2.INTER_LINEAR) for i in clip
            ]
            expected.append(np.stack(frames)[:, :, x1:x2].transpose(3, 0, 1, 2))
    assert np.array_equal(pipe.frames(path).numpy(), np.stack(expected))


def test_rescale_size_table(pipe_ref):
    rows = json.loads((pipe_ref / "multiscalecrop.json").read_text())["rescale_size_table"]["rows"]
    for row in rows:
        for short in (256, 128, 224, 320):
            assert list(T.rescale_size(*row["in_wh"], short)) == row[f"short{short}_out_wh"]


def test_three_and_center_crop_boxes():
    assert T.three_boxes(170, 128, 128) == [(0, 0, 128, 128), (42, 0, 170, 128), (21, 0, 149, 128)]
    assert T.three_boxes(128, 171, 128) == [(0, 0, 128, 128), (0, 42, 128, 170), (0, 21, 128, 149)]
    assert T.center_box(170, 128, 112) == (29, 8, 141, 120)
    with pytest.raises(ValueError, match="short side"):
        T.three_boxes(300, 200, 128)


def test_ten_crop_order_and_flip():
    frames = torch.arange(2 * 6 * 8 * 3, dtype=torch.int32).reshape(2, 6, 8, 3).to(torch.uint8)
    crops = T.ten_crop(frames, 4)
    boxes = T.five_boxes(8, 6, 4)
    assert boxes == [(0, 0, 4, 4), (4, 0, 8, 4), (0, 0, 4, 4), (4, 0, 8, 4), (2, 0, 6, 4)]
    for i, box in enumerate(boxes):
        assert torch.equal(crops[2 * i], T.crop(frames, box))
        assert torch.equal(crops[2 * i + 1], T.crop(frames, box).flip(2))


def test_flip_matches_mmaction_example(pipe_ref):
    example = json.loads((pipe_ref / "multiscalecrop.json").read_text())["flip"]["example"]
    out = T.flip(torch.tensor(example["input_imgs"], dtype=torch.uint8))
    assert out.tolist() == example["output_imgs"]


def test_multiscale_crop_boxes_and_frequencies(pipe_ref):
    ref = json.loads((pipe_ref / "multiscalecrop.json").read_text())
    possible = {
        tuple(c["crop_bbox"])
        for key in ("calls_random_seed0", "calls_random_seed1")
        for c in ref[key]
    }
    rng = np.random.default_rng(0)
    draws = Counter(
        T.multi_scale_box(340, 256, rng, 224, (1, 0.8), max_wh_scale_gap=0) for _ in range(3000)
    )
    expected = {
        (0, 0, 256, 256),
        (84, 0, 340, 256),
        (42, 0, 298, 256),
        (0, 0, 204, 204),
        (136, 0, 340, 204),
        (0, 52, 204, 256),
        (136, 52, 340, 256),
        (68, 26, 272, 230),
    }
    assert set(draws) == expected and possible <= expected
    assert draws[(0, 0, 256, 256)] / 3000 == pytest.approx(0.5 * 2 / 5, abs=0.03)
    box = T.multi_scale_box(340, 256, rng, 224, (1, 0.8), 0, random_crop=True)
    assert box[0] >= 0 and box[2] <= 340 and box[3] <= 256


def test_normalize_matches_mmaction_preprocessor(reference):
    ref = json.loads((reference / "pipeline" / "average_clip.json").read_text())[
        "data_preprocessor"
    ]
    x = torch.tensor(ref["input_uint8"], dtype=torch.uint8)
    out = T.normalize(x, ref["kwargs"]["mean"], ref["kwargs"]["std"])
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor(ref["output"], dtype=torch.float32)[0])
    scaled = T.normalize(torch.tensor([[[[[0, 255]]]]], dtype=torch.uint8), [0.0], [1.0], (-1, 1))
    assert scaled.flatten().tolist() == [-1.0, 1.0]


def test_pipeline_centercrop_equals_mmaction(pipe_ref):
    ref = np.load(pipe_ref / "test_pipeline_centercrop.npz")
    pipe = build_pipeline(
        MMACTION_K400, "test", clip_len=8, num_clips=3, resize_short=128, num_crops=1, crop_size=112
    )
    assert np.array_equal(pipe.frames(pipe_ref / "clip.mp4").numpy(), ref["imgs"])


def test_pipeline_threecrop_equals_mmaction(pipe_ref):
    meta = json.loads((pipe_ref / "meta.json").read_text())["test_pipelines"]["threecrop"]
    pipe = build_pipeline(
        MMACTION_K400, "test", clip_len=8, num_clips=3, resize_short=128, num_crops=3, crop_size=128
    )
    views = pipe(pipe_ref / "clip.mp4")
    assert views.shape == (9, 3, 8, 128, 128) and views.dtype == torch.float32
    raw = pipe.frames(pipe_ref / "clip.mp4").numpy()
    assert hashlib.sha256(raw.tobytes()).hexdigest() == meta["imgs_sha256"]
    mean = torch.tensor(MMACTION_K400.mean).view(3, 1, 1, 1)
    std = torch.tensor(MMACTION_K400.std).view(3, 1, 1, 1)
    assert torch.equal(views, (torch.from_numpy(raw).float() - mean) / std)


def test_presets_shapes_and_view_order(tmp_path):
    path = write_video(tmp_path / "v.mp4", 60, width=80, height=64)
    small = {"clip_len": 4, "resize_short": 64, "crop_size": 48, "input_size": 40}
    test = build_pipeline(
        MMACTION_K400, "test", num_clips=2, num_crops=3, **{**small, "crop_size": 64}
    )
    assert test.num_views == 6 and test(path).shape == (6, 3, 4, 64, 64)
    ten = build_pipeline(MMACTION_K400, "test", num_clips=2, num_crops=10, **small)
    assert ten(path).shape == (20, 3, 4, 48, 48)
    val = build_pipeline(MMACTION_K400, "val", **small)
    assert val(path).shape == (1, 3, 4, 40, 40)
    dense = build_pipeline(
        MMACTION_K400, "test", sampling="dense", num_clips=1, num_crops=1, **small
    )
    assert dense(path).shape == (10, 3, 4, 48, 48)
    # crop-major view order: view v = crop v // num_clips of clip v % num_clips
    pipe = build_pipeline(
        MMACTION_K400,
        "test",
        clip_len=2,
        frame_interval=1,
        num_clips=2,
        num_crops=3,
        resize_short=64,
        crop_size=64,
    )
    raw = pipe.frames(path)
    with open_video(path) as reader:
        clips = [torch.from_numpy(reader.get_frames(inds)) for inds in ([0, 1], [58, 59])]
    assert [read_index(c[0].numpy()) for c in clips] == [0, 58]
    for view in range(6):
        expected = T.three_crop(clips[view % 2], 64)[view // 2]
        assert torch.equal(raw[view], T.rearrange(expected, "t h w c -> c t h w"))


def test_train_pipeline_is_reproducible(tmp_path):
    path = write_video(tmp_path / "v.mp4", 40, width=80, height=64)
    train = build_pipeline(MMACTION_K400, "train", clip_len=4, resize_short=64, input_size=32)
    a = train(path, sample_rng(0, 0, 5))
    assert a.shape == (1, 3, 4, 32, 32)
    assert torch.equal(a, train(path, sample_rng(0, 0, 5)))
    assert any(not torch.equal(a, train(path, sample_rng(0, e, 5))) for e in range(1, 6))
    with pytest.raises(ValueError, match="Generator"):
        train(path)


def test_deepmind_all_frames_resampled_to_25fps(tmp_path):
    path = write_video(tmp_path / "v30.mp4", 30, width=80, height=64, fps=30)
    pipe = build_pipeline(DEEPMIND_K400, "test", resize_short=64, crop_size=48)
    views = pipe(path)
    assert views.shape == (1, 3, 25, 48, 48)
    assert views.min() >= -1 and views.max() <= 1
    with open_video(path) as reader:
        inds = pipe.frame_indices(reader, None)
    assert inds.tolist() == [int(i * 30 / 25) for i in range(25)]
    fixed = build_pipeline(DEEPMIND_K400, "test", clip_len=16, resize_short=64, crop_size=48)
    assert fixed(path).shape == (10, 3, 16, 48, 48)  # a clip_len gives 10 clips of it


def test_bad_overrides():
    with pytest.raises(ValueError, match="unknown pipeline options"):
        build_pipeline(MMACTION_K400, "test", clips=3)
    with pytest.raises(ValueError, match="num_crops"):
        build_pipeline(MMACTION_K400, "test", num_crops=5)
    with pytest.raises(ValueError, match="must equal resize_short"):
        build_pipeline(MMACTION_K400, "test", crop_size=224)
    with pytest.raises(ValueError, match="fit"):
        build_pipeline(MMACTION_K400, "test", crop_size=300)
    with pytest.raises(ValueError, match="mode"):
        build_pipeline(MMACTION_K400, "eval")
    with pytest.raises(ValueError, match="clip_len"):
        build_pipeline(DEEPMIND_K400, "train")


@pytest.mark.parametrize("mode, crops", [("test", 10), ("test", 3), ("train", 1)])
def test_streamed_views_equal_whole_clip_transforms(tmp_path, mode, crops):
    """Chunked decode-and-place gives what resizing and cropping the stacked clip gives."""
    path = write_video(tmp_path / "v.mp4", 70, width=171, height=128)
    size = 64 if crops == 3 else 48
    pipe = build_pipeline(
        MMACTION_K400,
        mode,
        clip_len=8,
        num_clips=3,
        num_crops=crops,
        resize_short=64,
        crop_size=size,
        input_size=40,
    )
    views = pipe.frames(path, sample_rng(3, 1, 7))
    rng = sample_rng(3, 1, 7)
    with open_video(path) as reader:
        inds = pipe.frame_indices(reader, rng)
        assert np.unique(inds).size > 16  # more than one decode chunk
        clip = T.resize_short(torch.from_numpy(reader.get_frames(inds)), 64)
    height, width = clip.shape[1:3]
    if mode == "train":
        box = T.multi_scale_box(width, height, rng, 40, pipe.scales, pipe.max_wh_scale_gap)
        cut = T.resize(T.crop(clip, box), (40, 40))
        expected = [T.flip(cut) if rng.random() < pipe.flip_ratio else cut]
    else:
        expected = T.ten_crop(clip, size) if crops == 10 else T.three_crop(clip, size)
    assert torch.equal(views, T.to_views(expected, pipe.clips_per_crop))
