"""From a video to model input: decode → sample → resize → crop → views → normalise.

``build_pipeline(weights_info.preprocessing, mode)`` reproduces the protocol a set of weights
expects (mmaction's K400 test/val/train pipelines, DeepMind's all-frames protocol); any field
of :class:`~i3d.weights.preprocessing.Preprocessing` and a few pipeline options can be
overridden by keyword.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import attrs
import numpy as np
import torch

from i3d.data import transforms as T
from i3d.data.decode import VideoReader, open_video
from i3d.data.sampling import DenseSampleFrames, SampleFrames
from i3d.weights.preprocessing import Preprocessing

Mode = Literal["test", "val", "train"]
MODES = ("test", "val", "train")
CROP_COUNTS = (1, 3, 10)

PIPELINE_OPTIONS = {
    "decoder": "pyav",
    "flip_ratio": 0.5,
    "scales": (1.0, 0.8),
    "max_wh_scale_gap": 0,
    "random_crop": False,
    "twice_sample": False,
    "out_of_bound_opt": "loop",
}
"""Knobs that are not part of the weights' preprocessing (defaults: mmaction I3D configs)."""


@attrs.frozen
class Pipeline:
    """Callable turning a video path (or open reader) into (V, C, T, H, W) float32 views."""

    preprocessing: Preprocessing
    mode: Mode
    sampler: SampleFrames | None
    """None: every frame of the video (resampled to ``preprocessing.fps`` when set)."""
    num_crops: int
    crop_size: int
    decoder: str = "pyav"
    flip_ratio: float = 0.5
    scales: tuple[float, ...] = (1.0, 0.8)
    max_wh_scale_gap: int = 0
    random_crop: bool = False

    @property
    def clips_per_crop(self) -> int:
        """Temporal views per spatial crop."""
        return 1 if self.sampler is None else self.sampler.num_views

    @property
    def num_views(self) -> int:
        """Views per video: crops × clips (crop-major, as mmaction's FormatShape)."""
        return self.num_crops * self.clips_per_crop

    def __call__(
        self, source: str | os.PathLike[str] | VideoReader, rng: np.random.Generator | None = None
    ) -> torch.Tensor:
        return self.normalize(self.frames(source, rng))

    def normalize(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 views → float32 normalised as the preprocessing says."""
        p = self.preprocessing
        return T.normalize(views, p.mean, p.std, p.value_range)

    def frames(
        self, source: str | os.PathLike[str] | VideoReader, rng: np.random.Generator | None = None
    ) -> torch.Tensor:
        """uint8 views (V, C, T, H, W) before normalisation."""
        if isinstance(source, VideoReader):
            return self._views(source, rng)
        with open_video(source, backend=self.decoder) as reader:
            return self._views(reader, rng)

    def frame_indices(self, reader: VideoReader, rng: np.random.Generator | None) -> np.ndarray:
        """0-based indices of the frames this pipeline reads, clip-major."""
        if self.sampler is not None:
            return self.sampler(reader.num_frames, rng).astype(np.int64)
        total, target, source_fps = reader.num_frames, self.preprocessing.fps, reader.fps
        if target is None or source_fps is None or abs(target - source_fps) < 1e-3:
            return np.arange(total)
        count = max(1, int(total * target / source_fps))
        return np.minimum(np.floor(np.arange(count) * (source_fps / target)), total - 1).astype(
            np.int64
        )

    def _views(self, reader: VideoReader, rng: np.random.Generator | None) -> torch.Tensor:
        if self.mode == "train" and rng is None:
            raise ValueError("the train pipeline needs a numpy Generator (see i3d.data.rng)")
        inds = self.frame_indices(reader, rng)
        unique, inverse = np.unique(inds, return_inverse=True)
        frames = torch.from_numpy(reader.get_frames(unique))
        frames = T.resize_short(
            frames, self.preprocessing.resize_short, self.preprocessing.interpolation
        )
        height, width = frames.shape[1:3]
        if self.mode == "train":
            assert rng is not None
            box = T.multi_scale_box(
                width,
                height,
                rng,
                self.crop_size,
                self.scales,
                self.max_wh_scale_gap,
                self.random_crop,
            )
            size = (self.crop_size, self.crop_size)
            crop = T.resize(T.crop(frames, box), size, self.preprocessing.interpolation)
            crops = [T.flip(crop) if rng.random() < self.flip_ratio else crop]
        elif self.num_crops == 1:
            crops = [T.center_crop(frames, self.crop_size)]
        elif self.num_crops == 3:
            crops = T.three_crop(frames, self.crop_size)
        else:
            crops = T.ten_crop(frames, self.crop_size)
        return T.to_views(crops, self.clips_per_crop, torch.from_numpy(inverse.reshape(-1)))


def _split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    fields = {f.name for f in attrs.fields(Preprocessing)}
    unknown = sorted(set(overrides) - fields - set(PIPELINE_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown pipeline options {unknown}; valid: {sorted(fields | set(PIPELINE_OPTIONS))}"
        )
    prep = {k: v for k, v in overrides.items() if k in fields}
    options = {**PIPELINE_OPTIONS, **{k: v for k, v in overrides.items() if k not in fields}}
    return prep, options


def build_pipeline(preprocessing: Preprocessing, mode: Mode = "test", **overrides: Any) -> Pipeline:
    """The pipeline a set of weights expects in ``mode`` (test | val | train), with overrides.

    test: ``num_clips`` clips × ``num_crops`` crops (1 centre, 3 along the long side, 10 =
    corners + centre and their flips) of ``crop_size``. val: one clip (unless ``num_clips``
    is given), centre crop of ``input_size``. train: one random clip, MultiScaleCrop of
    ``scales`` resized to ``input_size``, horizontal flip with ``flip_ratio``.
    """
    if mode not in MODES:
        raise ValueError(f"unknown pipeline mode {mode!r}; choose one of {MODES}")
    prep_overrides, options = _split_overrides(overrides)
    if mode != "test":
        prep_overrides.setdefault("num_clips", 1)
    try:
        prep = attrs.evolve(preprocessing, **prep_overrides)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid preprocessing override: {exc}") from exc
    num_crops = prep.num_crops if mode == "test" else 1
    if num_crops not in CROP_COUNTS:
        raise ValueError(f"num_crops must be one of {CROP_COUNTS}, got {num_crops}")
    crop_size = prep.crop_size if mode == "test" else prep.input_size
    if not 0 < crop_size <= prep.resize_short and mode != "train":
        raise ValueError(
            f"crop size {crop_size} must be positive and fit in the resized short side "
            f"{prep.resize_short}"
        )
    if num_crops == 3 and mode == "test" and crop_size != prep.resize_short:
        raise ValueError(
            f"three crops span the short side: crop_size ({crop_size}) must equal resize_short "
            f"({prep.resize_short}); override one of them, or use 1 or 10 crops"
        )
    if prep.interpolation not in T.INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {prep.interpolation!r}: {T.INTERPOLATIONS}")
    return Pipeline(
        preprocessing=prep,
        mode=mode,
        sampler=_sampler(prep, mode, options),
        num_crops=num_crops,
        crop_size=crop_size,
        decoder=options["decoder"],
        flip_ratio=float(options["flip_ratio"]),
        scales=tuple(float(s) for s in options["scales"]),
        max_wh_scale_gap=int(options["max_wh_scale_gap"]),
        random_crop=bool(options["random_crop"]),
    )


def _sampler(prep: Preprocessing, mode: Mode, options: dict[str, Any]) -> SampleFrames | None:
    if prep.clip_len is None:  # every frame; with a clip_len, "all" means one uniform clip
        if mode == "train":
            raise ValueError("training needs a fixed clip_len; set clip_len=N")
        return None
    common = {
        "clip_len": prep.clip_len,
        "frame_interval": prep.frame_interval,
        "num_clips": prep.num_clips,
        "test_mode": mode != "train",
        "out_of_bound_opt": options["out_of_bound_opt"],
    }
    try:
        if prep.sampling == "dense":
            return DenseSampleFrames(**common)
        return SampleFrames(**common, twice_sample=bool(options["twice_sample"]))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid sampling settings: {exc}") from exc
