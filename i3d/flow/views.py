"""Flow-stream views of a video, aligned with the RGB test pipeline's: same clips, crops, pieces.

The Flow stream sees, at each frame position of a clip, the flow from that timeline frame to
the next (DeepMind's sample clip: 79 RGB frames, 79 flow fields); the video's last frame has
no next one, so it reuses the flow into it. Flow is computed by DeepMind's recipe on the
resized full frames (greyscale and TV-L1, or RAFT, clipped to ±bound, divided by it) and cut into
the same crops as the RGB frames; a mirrored crop mirrors the field and negates x (as
mmaction's Flip inverts flow_x), so it shows the mirrored motion. With a flow folder
(:mod:`i3d.flow.store`) a video's flow is computed once, for its whole timeline, and read
from there afterwards. A sample that is an mmaction2 rawframes folder holding flow JPEGs
(an mmaction flow list's ``frame_dir``) gives its own flow.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterator
from pathlib import Path

import attrs
import numpy as np
import torch
from einops import rearrange

from i3d.data import transforms as T
from i3d.data.decode import VideoDecodeError, VideoReader, open_video
from i3d.data.pipeline import Pipeline, ViewPiece
from i3d.data.sampling import resampled_timeline
from i3d.flow.recipe import FlowConfig, frame_flow, scale_flow
from i3d.flow.store import (
    FlowFolder,
    FlowSettings,
    FlowStoreError,
    dequantize,
    layout_of,
    mmaction_ticks,
    rawframes_flow_template,
    read_mmaction_levels,
)
from i3d.flow.video import iter_timeline_flow
from i3d.weights.preprocessing import Preprocessing

STREAMS = ("rgb", "flow")


@attrs.frozen
class StreamPiece:
    """One piece of a video for each stream a model reads (None: a stream it does not read)."""

    rgb: ViewPiece | None
    flow: ViewPiece | None

    @property
    def first(self) -> ViewPiece:
        piece = self.rgb if self.rgb is not None else self.flow
        assert piece is not None
        return piece

    @property
    def last(self) -> bool:
        return self.first.last

    @property
    def crops(self) -> int:
        return self.first.crops

    @property
    def warnings(self) -> tuple[str, ...]:
        """The streams' warnings about the video (a truncated file), each once."""
        found = [p.warnings for p in (self.rgb, self.flow) if p is not None]
        return tuple(dict.fromkeys(w for ws in found for w in ws))


def clip_positions(pipeline: Pipeline, ticks: int) -> np.ndarray:
    """(clips, frames) timeline positions of a test pipeline's clips on ``ticks`` frames: the
    frames :meth:`Pipeline.clip_indices` reads, before they are mapped to decoded frames."""
    if pipeline.sampler is None:
        return pipeline.windows(ticks)
    return pipeline.sampler(ticks, None).astype(np.int64).reshape(pipeline.sampler.num_views, -1)


def flow_settings(pipeline: Pipeline, config: FlowConfig, layout: str = "npy") -> FlowSettings:
    """The settings a flow folder holds when it serves ``pipeline``: its frame rate and short
    side, full (uncropped) frames, ``config``'s flow (TV-L1 or RAFT)."""
    prep = pipeline.preprocessing
    if prep.interpolation != "bilinear":
        raise FlowStoreError(
            f"flow folders hold flow of bilinear-resized frames; these weights resize with "
            f"{prep.interpolation}: run without a flow folder"
        )
    return FlowSettings(
        format=layout, fps=prep.fps, size=prep.resize_short, crop=None, **config.recorded()
    )


def open_flow_dir(
    pipeline: Pipeline, config: FlowConfig, path: str | os.PathLike[str]
) -> FlowFolder:
    """The flow folder at ``path`` claimed for ``pipeline`` and ``config`` (created with
    their settings, in the layout it already has): other settings are refused now, not once
    per video."""
    folder = Path(path)
    store = FlowFolder(folder, flow_settings(pipeline, config, layout_of(folder)))
    store.claim()
    return store


def normalize_flow(views: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """[-1, 1] flow views (N, 2, T, H, W) normalised as a Flow-stream file's ``prep`` says
    (DeepMind's: mean 0, std 1, the views unchanged)."""
    if set(prep.mean) == {0.0} and set(prep.std) == {1.0}:
        return views
    shape = (len(prep.mean), 1, 1, 1)
    mean = torch.tensor(prep.mean, dtype=torch.float32).reshape(shape).to(views.device)
    std = torch.tensor(prep.std, dtype=torch.float32).reshape(shape).to(views.device)
    return (views - mean) / std


@attrs.frozen
class StreamPipeline:
    """The test pipeline's pieces for the streams in ``streams`` ("rgb", "flow" or both).

    With a ``store`` (a flow folder made for this pipeline: :func:`flow_settings`), a
    video's flow is read from it, and computed into it first when it is not there yet.
    """

    pipeline: Pipeline
    streams: tuple[str, ...]
    flow: FlowConfig = attrs.field(factory=FlowConfig)
    store: FlowFolder | None = None

    def __attrs_post_init__(self) -> None:
        if not self.streams or set(self.streams) - set(STREAMS):
            raise ValueError(f"streams must be some of {STREAMS}, got {self.streams}")
        if self.pipeline.mode == "train":
            raise ValueError("optical-flow views are made for testing; use a test or val pipeline")

    @property
    def num_crops(self) -> int:
        return self.pipeline.num_crops

    def pieces(
        self,
        source: str | os.PathLike[str],
        rng: np.random.Generator | None = None,
        clips_per_piece: int | None = 1,
    ) -> Iterator[StreamPiece]:
        """Each piece's views of every stream, as :meth:`Pipeline.pieces` cuts them."""
        rgb = self.pipeline.pieces(source, rng, clips_per_piece) if "rgb" in self.streams else None
        flow = self.flow_pieces(source, clips_per_piece) if "flow" in self.streams else None
        while True:
            rgb_piece = next(rgb, None) if rgb is not None else None
            flow_piece = next(flow, None) if flow is not None else None
            if rgb_piece is None and flow_piece is None:
                return
            yield StreamPiece(rgb_piece, flow_piece)

    def flow_pieces(
        self, source: str | os.PathLike[str], clips_per_piece: int | None = 1
    ) -> Iterator[ViewPiece]:
        """float32 flow views (crops × clips, 2, T, h, w) in [-1, 1], piece by piece.

        A rawframes folder that holds flow files (mmaction2's / denseflow's) gives its own
        flow; anything else gets flow from the flow folder or computed from its frames.
        """
        folder = Path(source)
        template = rawframes_flow_template(folder) if folder.is_dir() else None
        if template is not None:
            fields = _Rawframes(folder, template, self.pipeline)
            frames = fields.count + 1  # the frames the flow was computed between
            if "rgb" in self.streams:
                with open_video(folder) as reader:
                    if reader.num_frames != frames:
                        raise VideoDecodeError(
                            f"{folder}: {reader.num_frames} RGB frames but {fields.count} flow "
                            "fields; a two-stream sample needs one flow field fewer than frames"
                        )
            ticks = np.minimum(clip_positions(self.pipeline, frames), frames - 2)
            yield from self._cut(ticks, clips_per_piece, fields, ())
            return
        with open_video(source, backend=self.pipeline.decoder) as reader:
            prep = self.pipeline.preprocessing
            timeline = resampled_timeline(reader.num_frames, reader.fps, prep.fps)
            if timeline.size < 2:
                raise VideoDecodeError(f"{source}: optical flow needs at least 2 frames, it has 1")
            ticks = np.minimum(clip_positions(self.pipeline, timeline.size), timeline.size - 2)
            if self.store is not None:
                fields: _Fields = _Stored(self.store, Path(source), reader, timeline, self)
            else:
                fields = _Computed(reader, timeline, self.pipeline, self.flow)
            yield from self._cut(ticks, clips_per_piece, fields, reader.warnings)

    def _cut(
        self,
        ticks: np.ndarray,
        clips_per_piece: int | None,
        fields: _Fields,
        warnings: tuple[str, ...],
    ) -> Iterator[ViewPiece]:
        """Views of each piece's clips, cut from the flow fields of their ticks; the pieces
        carry the video's ``warnings``."""
        count = len(ticks)
        size = count if clips_per_piece is None else max(1, min(clips_per_piece, count))
        for first in range(0, count, size):
            piece = ticks[first : first + size]
            wanted = np.unique(piece)
            field = torch.from_numpy(fields.get(wanted))
            rows = torch.from_numpy(np.searchsorted(wanted, piece))  # (clips, T) into field
            height, width = field.shape[1:3]
            boxes = T.view_boxes(width, height, self.pipeline.crop_size, self.num_crops)
            views = []
            for box, mirrored in boxes:
                cut = T.crop(field, box)
                if mirrored:  # the mirrored picture moves the other way in x
                    cut = cut.flip(2) * torch.tensor([-1.0, 1.0])
                views.append(cut[rows])  # (clips, T, h, w, 2)
            out = rearrange(torch.stack(views), "k n t h w c -> (k n) c t h w").contiguous()
            yield ViewPiece(out, first, min(count, first + size), count, len(boxes), warnings)
            if first + size < count:
                fields.forget_below(int(ticks[first + size :].min()))


class _Fields(abc.ABC):
    """Flow fields of a video by tick: ``get`` float32 (n, H, W, 2) of ascending ticks."""

    @abc.abstractmethod
    def get(self, wanted: np.ndarray) -> np.ndarray:
        """The fields of ``wanted`` (sorted, unique 0-based ticks)."""

    @abc.abstractmethod
    def forget_below(self, tick: int) -> None:
        """Later pieces need no tick below ``tick``: fields held in memory can go."""


class _Stored(_Fields):
    """A video's flow from a flow folder, computed into it (whole timeline) if missing."""

    def __init__(
        self,
        store: FlowFolder,
        source: Path,
        reader: VideoReader,
        timeline: np.ndarray,
        views: StreamPipeline,
    ) -> None:
        store.claim()
        self.store = store
        self.name = source.stem if source.is_file() else source.name
        prep = views.pipeline.preprocessing
        if not store.has(self.name):
            width, height = T.rescale_size(*reader.size, prep.resize_short)
            chunks = iter_timeline_flow(
                reader, timeline, views.flow, prep.resize_short, prep.interpolation
            )
            store.write(self.name, (int(timeline.size) - 1, height, width), chunks)
        stored = store.ticks(self.name)
        if stored != timeline.size - 1:
            raise FlowStoreError(
                f"{store.entry(self.name)} holds {stored} flow fields but {source} gives "
                f"{timeline.size - 1} at this frame rate (another video of that name?); remove "
                "it to recompute"
            )

    def get(self, wanted: np.ndarray) -> np.ndarray:
        return self.store.read(self.name, wanted)

    def forget_below(self, tick: int) -> None:
        """Nothing is held: each piece reads its fields from the folder."""


class _Rawframes(_Fields):
    """Flow JPEGs in a sample's own rawframes folder (``flow_x_00001.jpg`` or ``x_00001.jpg``
    ...: 8-bit levels, bound 20), resized as mmaction's ``Resize`` does flow images: the levels,
    bilinear, to the weights' short side, values unchanged."""

    def __init__(self, folder: Path, template: str, pipeline: Pipeline) -> None:
        self.folder, self.template, self.pipeline = folder, template, pipeline
        self.count = mmaction_ticks(folder, template)
        if self.count < 1:
            raise VideoDecodeError(f"{folder}: no flow fields")

    def get(self, wanted: np.ndarray) -> np.ndarray:
        levels = torch.from_numpy(read_mmaction_levels(self.folder, wanted, self.template))
        prep = self.pipeline.preprocessing
        return dequantize(T.resize_short(levels, prep.resize_short, prep.interpolation).numpy())

    def forget_below(self, tick: int) -> None:
        """Nothing is held: each piece reads its fields from the folder."""


class _Computed(_Fields):
    """Flow of the ticks pieces ask for, computed on demand and kept while later pieces
    may still need them (sampled clips can overlap)."""

    def __init__(
        self, reader: VideoReader, timeline: np.ndarray, pipeline: Pipeline, config: FlowConfig
    ) -> None:
        self.reader, self.timeline, self.pipeline, self.config = reader, timeline, pipeline, config
        self.known: dict[int, np.ndarray] = {}

    def get(self, wanted: np.ndarray) -> np.ndarray:
        missing = np.array([t for t in wanted.tolist() if t not in self.known], dtype=np.int64)
        if missing.size:
            positions = np.unique(np.concatenate([missing, missing + 1]))
            frames = self._frames(self.timeline[positions])
            first = np.searchsorted(positions, missing)
            second = np.searchsorted(positions, missing + 1)
            pairs = frame_flow(frames[first], frames[second], self.config)
            flow = scale_flow(pairs, self.config.bound)
            for tick, field in zip(missing.tolist(), flow.permute(0, 2, 3, 1).numpy(), strict=True):
                self.known[tick] = field
        return np.stack([self.known[t] for t in wanted.tolist()])

    def forget_below(self, tick: int) -> None:
        for old in [t for t in self.known if t < tick]:
            del self.known[old]

    def _frames(self, sources: np.ndarray) -> np.ndarray:
        """uint8 RGB (n, H, W, 3) of source frames, resized as the RGB stream is."""
        prep = self.pipeline.preprocessing
        unique, inverse = np.unique(sources, return_inverse=True)
        frames = torch.from_numpy(self.reader.get_frames(unique))
        frames = T.resize_short(frames, prep.resize_short, prep.interpolation)
        return frames.numpy()[inverse.reshape(-1)]
