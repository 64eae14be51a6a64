"""From a video to model input: decode → sample → resize → crop → views → normalise.

``build_pipeline(weights_info.preprocessing, mode)`` reproduces the protocol a set of weights
expects (mmaction's K400 test/val/train pipelines, DeepMind's all-frames protocol); any field
of :class:`~i3d.weights.preprocessing.Preprocessing` and a few pipeline options can be
overridden by keyword.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Literal, TypeVar

import attrs
import numpy as np
import torch
from einops import rearrange

from i3d.data import transforms as T
from i3d.data.decode import VideoReader, open_video
from i3d.data.sampling import DenseSampleFrames, FrameWindows, SampleFrames, resampled_timeline
from i3d.utils.memory import empty_frames
from i3d.weights.preprocessing import Preprocessing

Mode = Literal["test", "val", "train"]
MODES = ("test", "val", "train")
CROP_COUNTS = (1, 3, 10)
_CHUNK = 16  # decoded frames resized and placed together
_Item = TypeVar("_Item")

PIPELINE_OPTIONS = {
    "decoder": "pyav",
    "flip_ratio": 0.5,
    "scales": (1.0, 0.8),
    "max_wh_scale_gap": 0,
    "random_crop": False,
    "twice_sample": False,
    "out_of_bound_opt": "loop",
    "window_len": 250,
    "max_windows": 10,
}
"""Knobs that are not part of the weights' preprocessing (defaults: mmaction I3D configs).

``window_len`` and ``max_windows`` bound every-frame protocols (``clip_len=None``): see
:class:`~i3d.data.sampling.FrameWindows`; 250 frames is the 10 s Kinetics clip at 25 fps
that DeepMind evaluated whole.
"""


@attrs.frozen
class ViewPiece:
    """Every crop of clips ``start`` to ``stop`` (exclusive) of a video's ``clips``.

    ``views`` is uint8 (crops × (stop − start), C, T, H, W), crop-major as
    :meth:`Pipeline.frames`; :func:`join_pieces` puts per-view results of a video's pieces
    back in the order of ``frames``.
    """

    views: torch.Tensor = attrs.field(repr=lambda v: f"<{tuple(v.shape)} {v.dtype}>")
    start: int
    stop: int
    clips: int
    crops: int
    warnings: tuple[str, ...] = ()
    """The video's :attr:`~i3d.data.decode.VideoReader.warnings` (a truncated file)."""

    @property
    def last(self) -> bool:
        """Whether this is the video's final piece."""
        return self.stop == self.clips

    @property
    def num_views(self) -> int:
        """Views of the whole video (crops × clips)."""
        return self.crops * self.clips

    def pin_memory(self) -> ViewPiece:
        """This piece with its views in page-locked memory, for an asynchronous copy to a
        cuda or npu device (``DataLoader(pin_memory=True)``'s pin thread calls it)."""
        return attrs.evolve(self, views=self.views.pin_memory())


def join_pieces(outputs: list[torch.Tensor], crops: int) -> torch.Tensor:
    """Per-view results of a video's pieces, in order, as one crop-major tensor.

    ``outputs[i]`` has a row per view of piece i (crops × its clips, crop-major); the result
    has the rows of ``Pipeline.frames``'s views: crop 0's clips, then crop 1's, ...
    """
    if len(outputs) == 1:
        return outputs[0]
    parts = [out.reshape(crops, -1, *out.shape[1:]) for out in outputs]
    joined = torch.cat(parts, dim=1)
    return joined.reshape(-1, *joined.shape[2:])


@attrs.frozen
class Pipeline:
    """Callable turning a video path (or open reader) into (V, C, T, H, W) float32 views."""

    preprocessing: Preprocessing
    mode: Mode
    sampler: SampleFrames | None
    """None: every frame of the video, cut into ``windows``."""
    num_crops: int
    crop_size: int
    decoder: str = "pyav"
    flip_ratio: float = 0.5
    scales: tuple[float, ...] = (1.0, 0.8)
    max_wh_scale_gap: int = 0
    random_crop: bool = False
    windows: FrameWindows = attrs.field(factory=FrameWindows)
    """How an every-frame protocol (no sampler) cuts a long video into views."""

    @property
    def clips_per_crop(self) -> int:
        """Temporal views per spatial crop (every-frame: at most; shorter videos give fewer)."""
        return self.windows.max_windows if self.sampler is None else self.sampler.num_views

    @property
    def num_views(self) -> int:
        """Views per video: crops × clips (crop-major, as mmaction's FormatShape); at most."""
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
        """uint8 views (V, C, T, H, W) before normalisation, all held at once."""
        (piece,) = self.pieces(source, rng, clips_per_piece=None)
        return piece.views

    def pieces(
        self,
        source: str | os.PathLike[str] | VideoReader,
        rng: np.random.Generator | None = None,
        clips_per_piece: int | None = 1,
    ) -> Iterator[ViewPiece]:
        """The uint8 views of ``frames``, streamed ``clips_per_piece`` clips at a time.

        Each piece holds every crop of its clips, and is yielded as soon as the decoder has
        passed its last frame, so a caller that runs and drops each piece holds one piece
        (plus the frames the next one shares with it) whatever the number of clips: an
        every-frame video in windows holds one window. The video is still decoded in one
        forward pass (no extra seeks). ``None``: a single piece of all the clips.
        """
        if isinstance(source, VideoReader):
            yield from self._pieces(source, rng, clips_per_piece)
            return
        with open_video(source, backend=self.decoder) as reader:
            yield from self._pieces(reader, rng, clips_per_piece)

    def frame_indices(self, reader: VideoReader, rng: np.random.Generator | None) -> np.ndarray:
        """0-based indices of the frames this pipeline reads, clip-major."""
        return self.clip_indices(reader, rng).reshape(-1)

    def clip_indices(self, reader: VideoReader, rng: np.random.Generator | None) -> np.ndarray:
        """(clips, frames) 0-based frame indices: the sampler's clips, or the windows.

        Both pick from the video's frames resampled to ``preprocessing.fps`` (when set), so
        clips of consecutive frames play at the rate the weights were trained at.
        """
        timeline = self._timeline(reader)
        if self.sampler is None:
            return timeline[self.windows(timeline.size)]
        picks = self.sampler(timeline.size, rng).astype(np.int64)
        return timeline[picks].reshape(self.sampler.num_views, -1)

    def _timeline(self, reader: VideoReader) -> np.ndarray:
        """Source frame of each frame at ``preprocessing.fps`` (all frames when unset)."""
        return resampled_timeline(reader.num_frames, reader.fps, self.preprocessing.fps)

    def _pieces(
        self, reader: VideoReader, rng: np.random.Generator | None, clips_per_piece: int | None
    ) -> Iterator[ViewPiece]:
        """Decode each needed frame once and place its crops straight into the output views.

        Frames stream from the decoder in chunks: each chunk is resized, cut into every crop
        and copied to all the output positions that use it, so neither the whole video nor
        all its decoded frames are ever held at once. Output positions belong to pieces of
        ``clips_per_piece`` clips, each allocated at its first frame and handed out once
        every frame it needs (frames come in ascending order) has been placed.
        """
        if self.mode == "train" and rng is None:
            raise ValueError("the train pipeline needs a numpy Generator (see i3d.data.rng)")
        clips = self.clip_indices(reader, rng)
        count, length = clips.shape
        size = count if clips_per_piece is None else max(1, min(clips_per_piece, count))
        starts = list(range(0, count, size))
        # piece p is complete once frame ends[p] (and so those of all earlier pieces) is in
        ends = np.maximum.accumulate([clips[a : a + size].max() for a in starts]).tolist()
        inds = clips.reshape(-1)
        unique, inverse = np.unique(inds, return_inverse=True)
        order = np.argsort(inverse.reshape(-1), kind="stable")
        splits = np.cumsum(np.bincount(inverse.reshape(-1)))[:-1]
        piece_rows = size * length
        rows = {  # frame -> [(piece, row in that piece)] of every output position using it
            index: list(zip((at // piece_rows).tolist(), (at % piece_rows).tolist(), strict=True))
            for index, at in zip(unique.tolist(), np.split(order, splits), strict=True)
        }
        outs: dict[int, torch.Tensor] = {}
        plan: list[tuple[T.Box, bool]] = []
        width = height = 0
        done = 0  # pieces handed out
        p = self.preprocessing
        buffer: torch.Tensor | None = None  # reused for every chunk: no fresh pages per chunk
        for chunk in chunked(reader.iter_frames(unique), _CHUNK):
            if buffer is None:  # decoded frames are resized straight into it
                src_h, src_w, channels = chunk[0][1].shape
                resized = T.rescale_size(src_w, src_h, p.resize_short)
                buffer = torch.empty((_CHUNK, resized[1], resized[0], channels), dtype=torch.uint8)
            frames = buffer[: len(chunk)]
            decoded = [frame for _, frame in chunk]
            T.resize_each(decoded, resized, p.interpolation, out=frames.numpy())
            if not plan:
                plan = self._crop_plan(frames.shape[2], frames.shape[1], rng)
                width, height = self._output_size(plan[0][0])
            for k, (box, flipped) in enumerate(plan):
                cut = T.crop(frames, box)
                if self.mode == "train":
                    cut = T.resize(cut, (self.crop_size, self.crop_size), p.interpolation)
                if flipped:
                    cut = T.flip(cut)
                for i, (index, _) in enumerate(chunk):
                    for piece, row in rows[index]:  # per-row copies beat index_copy_ ~10x here
                        out = outs.get(piece)
                        if out is None:
                            rows_in = (min(count, starts[piece] + size) - starts[piece]) * length
                            out = outs[piece] = empty_frames((len(plan), rows_in, height, width, 3))
                        out[k, row].copy_(cut[i])
            while done < len(starts) and ends[done] <= chunk[-1][0]:
                first = starts[done]
                out = outs.pop(done)
                views = rearrange(out, "n (k t) h w c -> (n k) c t h w", t=length)
                stop = min(count, first + size)
                yield ViewPiece(views, first, stop, count, len(plan), reader.warnings)
                done += 1
        assert done == len(starts)  # iter_frames yields every wanted frame or raises

    def _crop_plan(
        self, width: int, height: int, rng: np.random.Generator | None
    ) -> list[tuple[T.Box, bool]]:
        """(box, flipped) of every spatial crop on the resized (width × height) frames."""
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
            return [(box, bool(rng.random() < self.flip_ratio))]
        return T.view_boxes(width, height, self.crop_size, self.num_crops)

    def _output_size(self, box: T.Box) -> tuple[int, int]:
        """(width, height) of one view's frames."""
        if self.mode == "train":
            return self.crop_size, self.crop_size
        x1, y1, x2, y2 = box
        return x2 - x1, y2 - y1


def chunked(items: Iterator[_Item], size: int) -> Iterator[list[_Item]]:
    """Consecutive lists of ``size`` items (the last one shorter)."""
    chunk: list[_Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


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

    Every-frame protocols (``clip_len=None``, DeepMind's) read the whole video in at most
    ``max_windows`` windows of at most ``window_len`` frames, in test and val mode alike;
    ``num_clips=N`` sets ``max_windows``. Giving such weights a ``clip_len`` samples
    ``num_clips`` (default ``max_windows``) clips of it instead, one in val mode.
    ``num_crops=3`` alone on weights whose crop is smaller than the short side resizes the
    short side to the crop size, so the three crops span it.
    """
    if mode not in MODES:
        raise ValueError(f"unknown pipeline mode {mode!r}; choose one of {MODES}")
    prep_overrides, options = _split_overrides(overrides)
    _set_clip_count(preprocessing, mode, prep_overrides, options, "max_windows" in overrides)
    three_crops_alone = prep_overrides.get("num_crops") == 3 and not (
        {"crop_size", "resize_short"} & set(prep_overrides)
    )
    try:
        prep = attrs.evolve(preprocessing, **prep_overrides)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid preprocessing override: {exc}") from exc
    num_crops = prep.num_crops if mode == "test" else 1
    if num_crops not in CROP_COUNTS:
        raise ValueError(f"num_crops must be one of {CROP_COUNTS}, got {num_crops}")
    crop_size = prep.crop_size if mode == "test" else prep.input_size
    if three_crops_alone and mode == "test" and 0 < crop_size < prep.resize_short:
        prep = attrs.evolve(prep, resize_short=crop_size)  # as mmaction's ThreeCrop requires
    if not 0 < crop_size <= prep.resize_short and mode != "train":
        raise ValueError(
            f"crop size {crop_size} must be positive and fit in the resized short side "
            f"{prep.resize_short}"
        )
    if num_crops == 3 and mode == "test" and crop_size != prep.resize_short:
        raise ValueError(
            f"three crops span the short side: crop_size ({crop_size}) must equal resize_short "
            f"({prep.resize_short}); set both to one value, or override neither (then "
            "num_crops=3 resizes the short side to the crop size), or use 1 or 10 crops"
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
        windows=_windows(options),
    )


def _set_clip_count(
    base: Preprocessing,
    mode: Mode,
    prep: dict[str, Any],
    options: dict[str, Any],
    windows_given: bool,
) -> None:
    """Give ``num_clips`` its meaning for the protocol in use (edits ``prep`` / ``options``).

    Every-frame (no clip_len): an explicit ``num_clips`` caps the windows. A clip_len given
    to every-frame weights: ``max_windows`` clips of it in test mode. val/train: one clip.
    """
    clip_len = prep.get("clip_len", base.clip_len)
    if clip_len is None:
        if "num_clips" in prep:
            count = prep.pop("num_clips")
            if windows_given and options["max_windows"] != count:
                raise ValueError(
                    f"num_clips={count} and max_windows={options['max_windows']} both set the "
                    "number of windows of this every-frame protocol; give one of them"
                )
            options["max_windows"] = count
    elif mode != "test":
        prep.setdefault("num_clips", 1)
    elif base.clip_len is None:
        prep.setdefault("num_clips", options["max_windows"])


def _windows(options: dict[str, Any]) -> FrameWindows:
    """The every-frame windows the options ask for, or a ValueError naming the bad one."""
    try:
        return FrameWindows(int(options["window_len"]), int(options["max_windows"]))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid every-frame windows: {exc}") from exc


def _sampler(prep: Preprocessing, mode: Mode, options: dict[str, Any]) -> SampleFrames | None:
    if prep.clip_len is None:  # every frame; with a clip_len, "all" means uniform clips
        if mode == "train":
            raise ValueError("training needs a fixed clip_len; set clip_len=N")
        if prep.num_clips != 1:
            raise ValueError(
                f"this every-frame protocol (no clip_len) stores num_clips={prep.num_clips}, but "
                "it reads the whole video as windows: store num_clips=1 and pass num_clips=N "
                "(CLI --clips N) for at most N windows, or set clip_len (CLI --clip-len T) for "
                "clips of T frames"
            )
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
