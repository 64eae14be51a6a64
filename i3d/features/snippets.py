"""A video's snippets as model input, streamed: decoder → resize/crop → window buffer.

Frames are decoded once, in order, and only as far as the last snippet needs; each is
resized and cut into its crops once, kept while a pending window still needs it, and copied
into a batch when a window is complete. Memory is one batch plus one window of frames and a
chunk of decoded frames, whatever the video's length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import numpy as np
import torch
from einops import rearrange

from i3d.data import transforms as T
from i3d.data.decode import VideoDecodeError, VideoReader, open_video
from i3d.data.pipeline import chunked
from i3d.data.sampling import resampled_timeline
from i3d.features.frames import FrameTransform
from i3d.features.protocol import SnippetProtocol
from i3d.utils.memory import empty_frames

if TYPE_CHECKING:
    from i3d.flow.recipe import FlowConfig
    from i3d.flow.store import FlowFolder

_CHUNK = 16  # decoded frames resized together


@attrs.frozen
class Timeline:
    """The frames a video's snippets are cut from: ``ticks`` frames at ``fps``.

    ``source`` maps each tick to the decoded frame it shows (all frames once at the native
    rate); ``fps`` is None for frame folders, which record no rate.
    """

    frames: int
    """Frames in the video (decoded count)."""
    source_fps: float | None
    fps: float | None
    source: np.ndarray = attrs.field(eq=False, repr=False)
    warnings: tuple[str, ...] = ()
    """The video's :attr:`~i3d.data.decode.VideoReader.warnings` (a truncated file)."""

    @property
    def ticks(self) -> int:
        return int(self.source.size)


def video_timeline(reader: VideoReader, fps: float | None) -> Timeline:
    """The timeline of ``reader``'s video at ``fps`` (None: its own frames and rate)."""
    if fps is not None and reader.fps is None:
        raise VideoDecodeError(
            f"{reader.path} records no frame rate (a folder of frames), so it cannot be "
            f"resampled to {fps:g} fps; extract its frames at {fps:g} fps, or read the video file"
        )
    source = resampled_timeline(reader.num_frames, reader.fps, fps)
    rate = reader.fps if fps is None else fps
    return Timeline(reader.num_frames, reader.fps, rate, source, reader.warnings)


@attrs.frozen
class SnippetBatch:
    """Snippets ``first`` to ``first + count`` of a video's ``total``, every crop of each.

    ``views`` is uint8 (count × crops, C, window, H, W), snippet-major; ``pad`` marks the
    window frames past the video's ends (``tail="pad"``: zero after normalisation), or is
    None when there are none.
    """

    views: torch.Tensor = attrs.field(repr=lambda v: f"<{tuple(v.shape)} {v.dtype}>")
    pad: torch.Tensor | None = attrs.field(repr=False)
    first: int
    count: int
    total: int

    @property
    def last(self) -> bool:
        return self.first + self.count == self.total

    def pin_memory(self) -> SnippetBatch:
        """This batch with its views in page-locked memory, for an asynchronous copy to a
        cuda or npu device (``DataLoader(pin_memory=True)``'s pin thread calls it)."""
        return attrs.evolve(self, views=self.views.pin_memory())


def snippet_batches(
    reader: VideoReader,
    timeline: Timeline,
    protocol: SnippetProtocol,
    transform: FrameTransform,
    batch_size: int,
    flow: FlowConfig | None = None,
    flow_store: FlowFolder | None = None,
) -> Iterator[SnippetBatch]:
    """The video's snippets in order, ``batch_size`` at a time (see the module docstring).

    With ``flow``, a snippet's frames are optical flow (DeepMind's recipe, on the resized
    frames, then cropped): flow tick t goes from timeline frame t to t + 1, so a video of N
    frames has N − 1 flow ticks and a window of W flow ticks reads W + 1 frames. With a
    ``flow_store`` (made for this timeline and resize), the fields are read from it, computed
    into it first for a video it lacks.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    ticks = timeline.ticks - (flow is not None)
    starts = snippet_starts(timeline, protocol, flow is not None)
    if starts.size == 0:
        return
    window = protocol.window
    # loop copies the window's own frames into its tail, repeat the edge frames; flow past
    # the edges is that between copies of one frame: no motion, zero (as pad)
    fill = protocol.tail == "loop" or (protocol.tail == "repeat" and flow is None)
    # a snippet is complete once the last tick inside the video it covers has arrived
    ready_at = np.minimum(starts + window, ticks) - 1
    last_tick = int(ready_at.max())
    last_frame = last_tick + (flow is not None)
    wanted = np.unique(timeline.source[: last_frame + 1])
    held: dict[int, torch.Tensor] = {}  # tick -> its crops (crops, h, w, channels), while needed
    batch: torch.Tensor | None = None
    pad_rows: list[np.ndarray] = []
    filled = 0
    done = 0  # snippets copied into batches so far
    at_source = flow is not None and protocol.flow_resolution == "source"
    chunks = _tick_crops(reader, timeline, wanted, transform, last_frame, at_source)
    if flow is None:
        items: Iterator[list[tuple[int, torch.Tensor]]] = (c.items for c in chunks)
    else:
        stored = (
            None if flow_store is None else _stored(reader, timeline, transform, flow, flow_store)
        )
        items = _flow_crops(chunks, transform, flow, stored, at_source)
    for group in items:
        for tick, crops in group:
            if tick <= last_tick:
                held[tick] = crops
        if not held:
            continue
        newest = max(held)
        while done < starts.size and ready_at[done] <= newest:
            if batch is None:
                count = min(batch_size, starts.size - done)
                sample = next(iter(held.values()))
                shape = (count, window, *sample.shape)
                batch = empty_frames(shape, sample.dtype)
                pad_rows, filled = [], 0
            ticks_of = _window_ticks(int(starts[done]), window, ticks, protocol.tail)
            inside = (ticks_of >= 0) & (ticks_of < ticks)
            for t, tick in enumerate(np.clip(ticks_of, 0, ticks - 1).tolist()):
                if inside[t] or fill:
                    batch[filled, t].copy_(held[tick])
                else:
                    batch[filled, t].zero_()
            pad_rows.append(~inside)
            filled += 1
            done += 1
            if filled == len(batch):
                yield _batch(batch, pad_rows, done - filled, starts.size, fill)
                batch = None
            following = int(starts[done]) if done < starts.size else ticks
            keep_from = max(0, min(following, ticks - 1))
            for tick in [t for t in held if t < keep_from]:
                del held[tick]
    if done < starts.size:
        raise VideoDecodeError(
            f"{reader.path}: the decoder stopped before frame {int(wanted[-1])} "
            f"({done} of {starts.size} snippets complete)"
        )


@attrs.frozen
class _Chunk:
    """A chunk of decoded frames: (tick, crops) of every tick they show, the resized frames
    (or, for flow computed on them, the decoded ones), and which of them each tick shows."""

    items: list[tuple[int, torch.Tensor]]
    frames: np.ndarray
    frame_of_tick: dict[int, int]


def _tick_crops(
    reader: VideoReader,
    timeline: Timeline,
    wanted: np.ndarray,
    transform: FrameTransform,
    last_tick: int,
    keep_decoded: bool = False,
) -> Iterator[_Chunk]:
    """Per chunk of decoded frames, (tick, its crops) of every tick up to ``last_tick`` they
    show: uint8 (crops, h, w, 3), resized and cut once per decoded frame; the chunk keeps
    the resized frames, or with ``keep_decoded`` the decoded ones."""
    boxes: list[tuple[T.Box, bool]] = []
    for chunk in chunked(reader.iter_frames(wanted), _CHUNK):
        decoded = [frame for _, frame in chunk]
        frames = transform.resize(decoded)
        if not boxes:
            boxes = transform.boxes(frames.shape[2], frames.shape[1])
        crops = _cut(frames, boxes)  # (n, crops, h, w, 3)
        items, frame_of_tick = [], {}
        for i, (index, _) in enumerate(chunk):
            lo, hi = np.searchsorted(timeline.source, [index, index + 1])
            for tick in range(int(lo), min(int(hi), last_tick + 1)):
                items.append((tick, crops[i]))
                frame_of_tick[tick] = i
        yield _Chunk(items, np.stack(decoded) if keep_decoded else frames.numpy(), frame_of_tick)


def _cut(frames: torch.Tensor, boxes: list[tuple[T.Box, bool]]) -> torch.Tensor:
    """Every crop of (n, H, W, C) frames, mirrored where the crop says: (n, crops, h, w, C)."""
    cuts = [T.crop(frames, box) for box, _ in boxes]
    return torch.stack(
        [T.flip(cut) if flipped else cut for cut, (_, flipped) in zip(cuts, boxes, strict=True)],
        dim=1,
    )


def _stored(
    reader: VideoReader,
    timeline: Timeline,
    transform: FrameTransform,
    flow: FlowConfig,
    store: FlowFolder,
) -> Callable[[list[int]], np.ndarray]:
    """Reads of a video's flow ticks from ``store``, after computing the whole timeline's
    into it (the resized full frames, as :func:`_flow_crops` computes them) if it lacks it."""
    from i3d.flow.store import FlowStoreError
    from i3d.flow.video import iter_timeline_flow

    path = Path(reader.path)
    name = path.name if path.is_dir() else path.stem
    if not store.has(name):
        width, height = transform.output_size(*reader.size)
        with open_video(path) as again:
            chunks = iter_timeline_flow(again, timeline.source, flow, transform.resize_short)
            store.write(name, (timeline.ticks - 1, height, width), chunks)
    count = store.ticks(name)
    if count != timeline.ticks - 1:
        raise FlowStoreError(
            f"{store.entry(name)} holds {count} flow fields but {path} gives "
            f"{timeline.ticks - 1} on this timeline (another video of that name?); remove it "
            "to recompute"
        )
    return lambda ticks: store.read(name, np.asarray(ticks, dtype=np.int64))


def _flow_crops(
    chunks: Iterator[_Chunk],
    transform: FrameTransform,
    flow: FlowConfig,
    stored: Callable[[list[int]], np.ndarray] | None = None,
    at_source: bool = False,
) -> Iterator[list[tuple[int, torch.Tensor]]]:
    """Flow tick t (timeline frame t to t + 1) of every tick pair, as float32 crops
    (crops, h, w, 2) in [-1, 1]: the resized frames' flow (greyscale TV-L1 or RAFT; with
    ``at_source`` the decoded frames', the field then resized), DeepMind's scaling (or the
    fields ``stored`` reads), then the same crops as the RGB stream (mirrored crops are
    mirrored, x not negated)."""
    from i3d.flow.recipe import frame_flow, scale_flow

    previous: tuple[int, np.ndarray | None] | None = None  # the last tick seen, its frame
    boxes: list[tuple[T.Box, bool]] = []
    for chunk in chunks:
        rgb = chunk.frames if stored is None else None
        firsts, seconds, flow_ticks = [], [], []
        for tick in sorted(chunk.frame_of_tick):
            frame = rgb[chunk.frame_of_tick[tick]] if rgb is not None else None
            if previous is not None and previous[0] == tick - 1:
                firsts.append(previous[1])
                seconds.append(frame)
                flow_ticks.append(tick - 1)
            previous = (tick, frame)
        if not flow_ticks:
            continue
        if stored is not None:
            field = torch.from_numpy(np.ascontiguousarray(stored(flow_ticks)))  # (n, H, W, 2)
        else:
            pairs = frame_flow(np.stack(firsts), np.stack(seconds), flow).permute(0, 2, 3, 1)
            if at_source:
                pairs = torch.from_numpy(transform.resize_flow(pairs.contiguous().numpy()))
            field = scale_flow(pairs, flow.bound).contiguous()
        if not boxes:
            boxes = transform.boxes(field.shape[2], field.shape[1])
        crops = _cut(field, boxes)
        yield list(zip(flow_ticks, crops, strict=True))


def _window_ticks(start: int, window: int, ticks: int, tail: str) -> np.ndarray:
    """Timeline frame at each window position; outside [0, ticks) where the video is not
    (``loop`` wraps them onto the window's own frames instead)."""
    positions = np.arange(start, start + window)
    if tail == "loop" and positions[-1] >= ticks:
        inside = ticks - start
        positions = start + (positions - start) % inside
    return positions


def _batch(
    batch: torch.Tensor, pad_rows: list[np.ndarray], first: int, total: int, filled: bool
) -> SnippetBatch:
    """Package rows (count, window, crops, h, w, 3) as model-layout views."""
    pad = np.stack(pad_rows)
    views = rearrange(batch, "n t k h w c -> (n k) c t h w")
    mask = None if filled or not pad.any() else torch.from_numpy(pad)
    return SnippetBatch(views, mask, first, len(pad_rows), total)


def snippet_starts(timeline: Timeline, protocol: SnippetProtocol, flow: bool) -> np.ndarray:
    """Each snippet's first window position. A flow window of W ticks reads W + 1 frames, so
    the flow stream has one tick fewer to place windows on. Two kinds of protocol keep the
    RGB snippets for flow instead: centred windows (on frames, flow tick t at frame t, one
    per frame; MS-TCN) and those that read a frame past each window (``lookahead``, which is
    there for the flow pair of the window's last frame; video_features)."""
    if flow and timeline.ticks < 2:  # no frame pair, no flow
        return np.empty(0, dtype=np.int64)
    as_rgb = protocol.anchor == "center" or protocol.lookahead > 0
    return protocol.starts(timeline.ticks - (flow and not as_rgb))


def snippet_times(timeline: Timeline, protocol: SnippetProtocol, flow: bool = False) -> np.ndarray:
    """(snippets, 6) float64 per snippet: first and one-past-last timeline frame, the same in
    seconds (NaN without a frame rate), and the first and one-past-last decoded frame read
    (a flow window reads one frame after its last flow tick)."""
    starts = snippet_starts(timeline, protocol, flow)
    ends = starts + protocol.window
    last = timeline.ticks - 1
    first_read = timeline.source[np.clip(starts, 0, last)]
    end_read = timeline.source[np.clip(ends - 1 + flow, 0, last)] + 1
    rate = timeline.fps or math.nan
    columns = [starts, ends, starts / rate, ends / rate, first_read, end_read]
    return np.stack([np.asarray(c, dtype=np.float64) for c in columns], axis=1)
