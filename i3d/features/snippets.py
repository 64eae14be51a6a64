"""A video's snippets as model input, streamed: decoder → resize/crop → window buffer.

Frames are decoded once, in order, and only as far as the last snippet needs; each is
resized and cut into its crops once, kept while a pending window still needs it, and copied
into a batch when a window is complete. Memory is one batch plus one window of frames and a
chunk of decoded frames, whatever the video's length.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import attrs
import numpy as np
import torch
from einops import rearrange

from i3d.data import transforms as T
from i3d.data.decode import VideoDecodeError, VideoReader
from i3d.data.pipeline import chunked
from i3d.data.sampling import resampled_timeline
from i3d.features.frames import FrameTransform
from i3d.features.protocol import SnippetProtocol
from i3d.utils.memory import empty_frames

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
    return Timeline(reader.num_frames, reader.fps, reader.fps if fps is None else fps, source)


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


def snippet_batches(
    reader: VideoReader,
    timeline: Timeline,
    protocol: SnippetProtocol,
    transform: FrameTransform,
    batch_size: int,
) -> Iterator[SnippetBatch]:
    """The video's snippets in order, ``batch_size`` at a time (see the module docstring)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    ticks = timeline.ticks
    starts = protocol.starts(ticks)
    if starts.size == 0:
        return
    window = protocol.window
    fill = protocol.tail != "pad"  # repeat / loop copy frames into the window's tail
    # a snippet is complete once the last tick inside the video it covers has arrived
    ready_at = np.minimum(starts + window, ticks) - 1
    last_tick = int(ready_at.max())
    wanted = np.unique(timeline.source[: last_tick + 1])
    held: dict[int, torch.Tensor] = {}  # tick -> its crops (crops, h, w, 3), while needed
    boxes: list[tuple[T.Box, bool]] = []
    batch: torch.Tensor | None = None
    pad_rows: list[np.ndarray] = []
    filled = 0
    done = 0  # snippets copied into batches so far
    for chunk in chunked(reader.iter_frames(wanted), _CHUNK):
        frames = torch.from_numpy(np.stack([frame for _, frame in chunk]))
        frames = transform.resize(frames)
        if not boxes:
            boxes = transform.boxes(frames.shape[2], frames.shape[1])
        cuts = [T.crop(frames, box) for box, _ in boxes]
        crops = torch.stack(
            [
                T.flip(cut) if flipped else cut
                for cut, (_, flipped) in zip(cuts, boxes, strict=True)
            ],
            dim=1,
        )  # (n, crops, h, w, 3)
        for i, (index, _) in enumerate(chunk):
            lo, hi = np.searchsorted(timeline.source, [index, index + 1])
            for tick in range(int(lo), min(int(hi), last_tick + 1)):
                held[tick] = crops[i]
        newest = max(held)
        while done < starts.size and ready_at[done] <= newest:
            if batch is None:
                count = min(batch_size, starts.size - done)
                batch = empty_frames((count, window, *crops.shape[1:]))
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


def snippet_times(timeline: Timeline, protocol: SnippetProtocol) -> np.ndarray:
    """(snippets, 6) float64 per snippet: first and one-past-last timeline frame, the same in
    seconds (NaN without a frame rate), and the first and one-past-last decoded frame read."""
    starts = protocol.starts(timeline.ticks)
    ends = starts + protocol.window
    last = timeline.ticks - 1
    first_read = timeline.source[np.clip(starts, 0, last)]
    end_read = timeline.source[np.clip(ends - 1, 0, last)] + 1
    rate = timeline.fps or math.nan
    columns = [starts, ends, starts / rate, ends / rate, first_read, end_read]
    return np.stack([np.asarray(c, dtype=np.float64) for c in columns], axis=1)
