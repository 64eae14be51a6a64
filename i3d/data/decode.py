"""Video decoding behind one small interface: only the frames a clip needs, as uint8 RGB.

``open_video(path)`` returns a :class:`VideoReader` for a video file (PyAV: mp4, webm, mkv,
avi, gif, ...) or a directory of extracted frames. PyAV readers index the stream once by
demuxing packets (no decoding), which gives an exact frame count even when the container
header lies, then decode a request by seeking to the keyframe before each needed frame and
decoding forward. A long video is therefore never decoded (or held in memory) whole.
"""

from __future__ import annotations

import bisect
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import av

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".gif", ".flv")
BACKENDS = ("pyav", "decord")

IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "WEBP")
"""Pillow decoders a frame folder may use. Pillow picks its decoder by content, not by name,
so without this list a "frame" could be PostScript (handed to Ghostscript) or another rarely
used, riskier format."""

VIDEO_FORMATS = (
    "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,gif,mpeg,mpegts,mpegvideo,flv,h264,hevc,"
    "m4v,mjpeg,ivf,ogg,asf,nut,yuv4mpegpipe,wav,mp3"
)
"""FFmpeg demuxers PyAV may use: container formats of video files. Playlist and indirection
demuxers (hls, concat, image sequences, ...) are not among them, and only the ``file``
protocol is allowed, so a video never makes FFmpeg open the network or other files."""

MAX_PIXELS_ENV = "I3D_MAX_FRAME_PIXELS"
DEFAULT_MAX_PIXELS = 8192 * 8192


AUTOROTATE_ENV = "I3D_AUTOROTATE"


def autorotate() -> bool:
    """Whether videos are turned upright by their display matrix, as players show them
    (default). ``I3D_AUTOROTATE=0`` reads the stored frames as they are, as mmaction2's
    decord and OpenCV readers do, for numbers that match theirs on rotated files."""
    return os.environ.get(AUTOROTATE_ENV, "1").strip().lower() not in ("0", "false", "no")


MAX_FRAMES_ENV = "I3D_MAX_FRAMES"
DEFAULT_MAX_FRAMES = 2_000_000


def _env_limit(name: str, default: int) -> int:
    """A positive whole-number limit from the environment variable ``name``."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        limit = int(value)
    except ValueError:
        raise VideoDecodeError(f"{name}={value!r} is not a whole number") from None
    if limit < 1:
        raise VideoDecodeError(f"{name} must be positive, got {limit}")
    return limit


def max_frame_pixels() -> int:
    """The largest frame (width × height) decoded: ``$I3D_MAX_FRAME_PIXELS``, else 8192²
    (twice 8K UHD). A file claiming more is refused before anything is allocated."""
    return _env_limit(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS)


def max_frames() -> int:
    """The most frames a video may have: ``$I3D_MAX_FRAMES``, else 2,000,000 (22 hours at
    25 fps). The packet index holds every frame (about 150 bytes each), so a file with more,
    or a header claiming more, is refused before it is indexed."""
    return _env_limit(MAX_FRAMES_ENV, DEFAULT_MAX_FRAMES)


def check_frame_count(path: Path, count: int) -> None:
    """Refuse a video of more than :func:`max_frames` frames (read or claimed)."""
    limit = max_frames()
    if count > limit:
        raise VideoDecodeError(
            f"{path}: more than {limit:,} frames ({count:,} claimed or read so far); raise the "
            f"limit with {MAX_FRAMES_ENV}=N if the file is trusted"
        )


def check_frame_size(path: Path, width: int, height: int) -> None:
    """Refuse a frame (or canvas) larger than :func:`max_frame_pixels` before decoding it."""
    limit = max_frame_pixels()
    if width * height > limit:
        raise VideoDecodeError(
            f"{path}: frames of {width}x{height} ({width * height:,} pixels) exceed the limit of "
            f"{limit:,} pixels; raise it with {MAX_PIXELS_ENV}=N if the file is trusted"
        )


def check_regular_file(path: Path, what: str = "video file") -> None:
    """Refuse what is not a regular file (a FIFO, device or socket would block or never end)."""
    if not path.exists():
        raise VideoDecodeError(f"{what} {path} does not exist")
    if not path.is_file():
        raise VideoDecodeError(f"{path} is not a regular file (a FIFO, device or folder?)")


def open_container(path: Path) -> av.container.InputContainer:
    """A PyAV input container with only :data:`VIDEO_FORMATS` and the file protocol allowed,
    for a file whose sample tables (MP4/MOV) claim no more than it holds."""
    import av

    from i3d.data.mp4_claims import SampleClaimError, check_sample_claims

    try:
        check_sample_claims(path)
    except SampleClaimError as exc:
        raise VideoDecodeError(str(exc)) from None
    options = {"protocol_whitelist": "file", "format_whitelist": VIDEO_FORMATS}
    return av.open(str(path), mode="r", options=options)


def decoder_threads() -> int:
    """Threads a decoder uses here: torch's intra-op count, the cores this process was given."""
    import torch

    return max(1, torch.get_num_threads())


class VideoDecodeError(ValueError):
    """A video (or frame directory) cannot be opened or the requested frames cannot be decoded."""


class VideoReader(ABC):
    """Random access to one video's frames: ``get_frames(indices)`` → (T, H, W, 3) uint8 RGB."""

    path: Path
    num_frames: int
    fps: float | None
    size: tuple[int, int]
    """(width, height) of the decoded frames."""
    warnings: tuple[str, ...] = ()
    """What is wrong with the video but did not stop it being read (a truncated file), one
    line each without the path: results made from it carry them."""

    def get_frames(self, indices: Iterable[int] | np.ndarray) -> np.ndarray:
        """Frames at 0-based ``indices`` (any order, repeats allowed), stacked as (T, H, W, 3)."""
        inds = self._check_indices(indices)
        if inds.size == 0:
            raise ValueError("no frame indices requested")
        frames = dict(self.iter_frames(inds))
        return np.stack([frames[int(i)] for i in inds])

    def iter_frames(self, indices: Iterable[int] | np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Each distinct frame of ``indices`` once, as (index, (H, W, 3) uint8), as decoded.

        Streaming lets callers crop and place each frame while the decoder works on the next,
        without holding every decoded frame at once.
        """
        wanted = sorted(set(self._check_indices(indices).tolist()))
        shape = None
        for index, frame in self._iter_frames(wanted):
            if shape is None:
                shape = frame.shape
            elif frame.shape != shape:
                raise VideoDecodeError(
                    f"{self.path}: frame {index} is {frame.shape[1]}x{frame.shape[0]}, earlier "
                    f"frames are {shape[1]}x{shape[0]}; frames must all have one size"
                )
            yield index, frame

    @abstractmethod
    def _iter_frames(self, wanted: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        """Decode the sorted, distinct, in-range ``wanted`` frames, yielding (index, frame)."""

    @abstractmethod
    def close(self) -> None:
        """Release the underlying file."""

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_indices(self, indices: Iterable[int] | np.ndarray) -> np.ndarray:
        inds = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices)
        if inds.ndim != 1:
            raise ValueError(f"frame indices must be 1-D, got shape {inds.shape}")
        inds = inds.astype(np.int64)
        bad = inds[(inds < 0) | (inds >= self.num_frames)]
        if bad.size:
            raise VideoDecodeError(
                f"{self.path}: frame indices {sorted(set(bad.tolist()))[:5]} out of range "
                f"(the video has {self.num_frames} frames)"
            )
        return inds


class PyAVReader(VideoReader):
    """PyAV (FFmpeg) reader: packet index from demuxing, seek + decode-forward per request."""

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        """``threads``: FFmpeg decoding threads; None takes torch's intra-op thread count, so
        a loader worker (one torch thread) decodes on one core and the main process on all
        it was given."""
        import av
        from av.video.reformatter import VideoReformatter

        self.path = Path(path)
        check_regular_file(self.path)
        try:
            self._container = open_container(self.path)
        except av.ArgumentError:  # what FFmpeg says when a demuxer is not allowed
            raise VideoDecodeError(
                f"{self.path}: not a readable video (not one of the container formats i3d "
                "opens: mp4/mov, mkv/webm, avi, gif, mpeg, flv, ogg, ... ; or damaged)"
            ) from None
        except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
            raise VideoDecodeError(f"{self.path}: not a readable video ({exc})") from exc
        try:
            if not self._container.streams.video:
                raise VideoDecodeError(f"{self.path}: the file has no video stream")
            self._stream = self._container.streams.video[0]
            codec = self._stream.codec_context
            check_frame_size(self.path, int(codec.width or 0), int(codec.height or 0))
            check_frame_count(self.path, int(self._stream.frames or 0))
            count = decoder_threads() if threads is None else threads
            if count > 1:  # frame and slice threads, whichever the codec supports
                self._stream.thread_type = "AUTO"
                self._stream.codec_context.thread_count = count
            self._index_packets()
            #: counter-clockwise quarter turns that show the frames upright (display matrix)
            self.quarter_turns = self._quarter_turns() if autorotate() else 0
        except BaseException:
            self._container.close()
            raise
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.fps = float(rate) if rate else None
        ctx = self._stream.codec_context
        width, height = int(ctx.width), int(ctx.height)
        self.size = (height, width) if self.quarter_turns % 2 else (width, height)
        # One reformatter keeps its swscale context between frames (a fresh one per frame
        # costs ~8x the conversion itself); single-threaded because frames are small.
        self._reformatter = VideoReformatter()
        self.header_frames = int(self._stream.frames or 0)
        self.claimed_frames, slack = self._claimed_frames()
        if self.claimed_frames is not None and self.num_frames < self.claimed_frames - slack:
            self.warnings = (
                f"ends early (truncated?): {self.num_frames} of the {self.claimed_frames} frames "
                "its header claims could be read; using those",
            )
            log.warning("warning: %s %s", self.path, self.warnings[0])

    def _quarter_turns(self) -> int:
        """The display rotation of the first frame (phones store upright video sideways and
        say so in side data) as counter-clockwise quarter turns."""
        import av

        try:
            self._container.seek(0, stream=self._stream, backward=True, any_frame=False)
            first = next(iter(self._decoded()), None)
        except (av.FFmpegError, OSError) as exc:
            raise VideoDecodeError(f"{self.path}: decoding failed ({exc})") from exc
        return round((first.rotation if first is not None else 0) / 90) % 4

    def _claimed_frames(self) -> tuple[int | None, int]:
        """(the frame count the container's header states, how far it may be off): mp4/mov
        and avi store the count; for Matroska/WebM it follows from the stored duration,
        which is rounded (2% and a frame of slack). None where the header says nothing."""
        if self.header_frames > 0:
            return self.header_frames, 0
        duration = self._container.duration  # microseconds
        if duration is None or not self.fps or "matroska" not in self._container.format.name:
            return None, 0
        estimate = duration / 1e6 * self.fps
        return round(estimate), 1 + int(0.02 * estimate)

    def _index_packets(self) -> None:
        """Presentation timestamps of every frame and which of them are keyframes."""
        import av

        pts: list[int] = []
        keys: list[int] = []
        has_pts = True
        complete = 0  # packets up to the last one FFmpeg read whole
        limit = max_frames()
        try:
            for packet in self._container.demux(self._stream):
                if packet.size == 0:
                    continue
                if len(pts) == limit:
                    check_frame_count(self.path, limit + 1)
                if packet.pts is None:
                    has_pts = False
                pts.append(packet.pts if packet.pts is not None else len(pts))
                if packet.is_keyframe:
                    keys.append(pts[-1])
                if not packet.is_corrupt:
                    complete = len(pts)
        except (av.FFmpegError, OSError) as exc:
            raise VideoDecodeError(f"{self.path}: corrupt video stream ({exc})") from exc
        #: packets of a file cut short that FFmpeg read only in part: never decoded
        self._cut = set(pts[complete:])
        if self._cut:  # keep the frames shown before the first one lost: no gap in time
            pts = [p for p in pts[:complete] if p < min(self._cut)]
            keys = [k for k in keys if k < min(self._cut)]
        if not pts:
            raise VideoDecodeError(f"{self.path}: the video stream holds no frames")
        order = sorted(pts)
        # Frames are matched by pts; without unique pts fall back to counting decoded frames.
        self._seekable = has_pts and len(set(order)) == len(order) and bool(keys)
        self._pts = order
        self._index_of = {p: i for i, p in enumerate(order)}
        self._key_indices = sorted(self._index_of[k] for k in keys) if self._seekable else [0]
        self.num_frames = len(order)

    def _keyframe_before(self, index: int) -> int:
        """Presentation index of the last keyframe at or before frame ``index``."""
        pos = bisect.bisect_right(self._key_indices, index) - 1
        return self._key_indices[max(pos, 0)]

    def _iter_frames(self, wanted: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        done: set[int] = set()
        if self._seekable:
            i = 0
            while i < len(wanted):
                i = yield from self._decode_run(self._keyframe_before(wanted[i]), wanted, i, done)
        missing = [i for i in wanted if i not in done]
        if missing:  # no usable index, or a seek misbehaved: decode the needed span from the start
            yield from self._decode_from_start(missing, done)
            missing = [i for i in wanted if i not in done]
        if missing:
            raise VideoDecodeError(
                f"{self.path}: frames {missing[:5]} could not be decoded (damaged stream?)"
            )

    def _decode_run(
        self, key: int, wanted: list[int], i: int, done: set[int]
    ) -> Generator[tuple[int, np.ndarray], None, int]:
        """Decode forward from keyframe ``key`` yielding ``wanted[i:]``; return the next ``i``.

        Stops when the next wanted frame lies beyond a later keyframe (seeking there is
        cheaper than decoding on). Frames the decoder never outputs are left out of ``done``.
        """
        import av

        try:
            self._container.seek(
                self._pts[key], stream=self._stream, backward=True, any_frame=False
            )
            for frame in self._decoded():
                index = self._index_of.get(frame.pts)
                if index is None or index < key:
                    continue  # leading pictures of an open GOP reference frames before the seek
                while i < len(wanted) and wanted[i] < index:
                    i += 1
                if i == len(wanted):
                    return i
                if wanted[i] == index:
                    done.add(index)
                    yield index, self._to_rgb(frame)
                    i += 1
                    if i == len(wanted) or self._keyframe_before(wanted[i]) > index + 1:
                        return i
        except (av.FFmpegError, OSError) as exc:
            raise VideoDecodeError(f"{self.path}: decoding failed ({exc})") from exc
        return len(wanted)

    def _decoded(self) -> Iterator[av.VideoFrame]:
        """Frames from the current position to the end (``container.decode``), leaving out
        the packets a file cut short holds only in part: FFmpeg fails on them."""
        for packet in self._container.demux(self._stream):
            if not (packet.is_corrupt and packet.pts in self._cut):
                yield from packet.decode()

    def _to_rgb(self, frame: av.VideoFrame) -> np.ndarray:
        """The decoded picture as (H, W, 3) uint8 RGB."""
        rgb = self._reformatter.reformat(frame, format="rgb24", threads=1).to_ndarray()
        if self.quarter_turns:
            return np.ascontiguousarray(np.rot90(rgb, self.quarter_turns))
        return rgb

    def _decode_from_start(
        self, wanted: list[int], done: set[int]
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Decode sequentially from the first frame, yielding only ``wanted`` (streaming)."""
        import av

        pending = set(wanted)
        last = max(wanted)
        try:
            self._container.seek(0, stream=self._stream, backward=True, any_frame=False)
            for count, frame in enumerate(self._decoded()):
                index = self._index_of.get(frame.pts, count) if self._seekable else count
                if index in pending:
                    pending.discard(index)
                    done.add(index)
                    yield index, self._to_rgb(frame)
                if index >= last:
                    break
        except (av.FFmpegError, OSError) as exc:
            raise VideoDecodeError(f"{self.path}: decoding failed ({exc})") from exc

    def close(self) -> None:
        self._container.close()


def _template_regex(template: str) -> re.Pattern[str]:
    """A regex matching the file names a ``str.format`` template with one int field produces."""
    parts = re.split(r"\{[^}]*\}", template)
    if len(parts) != 2:
        raise ValueError(f"frame name template {template!r} needs exactly one {{}} field")
    return re.compile(re.escape(parts[0]) + r"(\d+)" + re.escape(parts[1]) + r"$")


class FrameDirReader(VideoReader):
    """Extracted frames ``template.format(start_index + i)`` in one directory, read with Pillow."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        template: str = "img_{:05d}.jpg",
        start_index: int = 1,
        num_frames: int | None = None,
        fps: float | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise VideoDecodeError(f"frame directory {self.path} does not exist")
        self.template = template
        self.start_index = start_index
        self.fps = fps
        if num_frames is None:
            pattern = _template_regex(template)
            names = {n for n in os.listdir(self.path) if pattern.match(n)}
            num_frames = 0
            while template.format(start_index + num_frames) in names:
                num_frames += 1
        if num_frames <= 0:
            raise VideoDecodeError(
                f"{self.path}: no frames named like {template.format(start_index)!r}, "
                f"{template.format(start_index + 1)!r}, ...; rename the frames to that pattern, "
                "or set the frame name template / start index to match the files"
            )
        self.num_frames = num_frames
        first = self._load(0)
        self.size = (first.shape[1], first.shape[0])

    def _load(self, index: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        file = self.path / self.template.format(self.start_index + index)
        check_regular_file(file, "frame")
        try:
            with Image.open(file, formats=IMAGE_FORMATS) as img:
                check_frame_size(file, *img.size)
                if img.mode.startswith("I"):  # 16/32-bit grey: RGB conversion would clip at 255
                    grey = (np.asarray(img).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
                    return np.repeat(grey[..., None], 3, axis=-1)
                return np.asarray(img.convert("RGB"))
        except UnidentifiedImageError:
            raise VideoDecodeError(
                f"cannot read frame {file}: not a {'/'.join(IMAGE_FORMATS)} image (other formats "
                "are not opened)"
            ) from None
        except (OSError, Image.DecompressionBombError) as exc:
            raise VideoDecodeError(f"cannot read frame {file}: {exc}") from exc

    def _iter_frames(self, wanted: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        for index in wanted:
            yield index, self._load(index)

    def close(self) -> None:
        """Nothing is held open between reads."""


class DecordReader(VideoReader):
    """decord reader (optional extra ``i3d[decord]``): its own index and random access."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            import decord
        except ImportError as exc:
            raise ImportError(
                "the decord backend needs the decord package: pip install 'i3d[decord]'"
            ) from exc
        self.path = Path(path)
        if not self.path.is_file():
            raise VideoDecodeError(f"video file {self.path} does not exist")
        try:
            self._reader = decord.VideoReader(str(self.path), num_threads=1)
        except (decord.DECORDError, RuntimeError) as exc:
            raise VideoDecodeError(f"{self.path}: not a readable video ({exc})") from exc
        self.num_frames = len(self._reader)
        if self.num_frames == 0:
            raise VideoDecodeError(f"{self.path}: the video stream holds no frames")
        self.fps = float(self._reader.get_avg_fps()) or None
        h, w = self._reader[0].shape[:2]
        self.size = (int(w), int(h))

    def _iter_frames(self, wanted: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        yield from zip(wanted, self._reader.get_batch(wanted).asnumpy(), strict=True)

    def close(self) -> None:
        del self._reader


def open_frames_dir(
    path: str | os.PathLike[str],
    template: str = "img_{:05d}.jpg",
    start_index: int = 1,
    num_frames: int | None = None,
    fps: float | None = None,
) -> FrameDirReader:
    """Reader over a directory of extracted frames (mmaction rawframes layout by default)."""
    return FrameDirReader(path, template, start_index, num_frames, fps)


def open_video(path: str | os.PathLike[str], backend: str = "pyav") -> VideoReader:
    """Open a video file (``backend``: pyav | decord) or a frame directory for reading."""
    path = Path(path)
    if path.is_dir():
        return open_frames_dir(path)
    if backend == "pyav":
        return PyAVReader(path)
    if backend == "decord":
        return DecordReader(path)
    raise ValueError(f"unknown video backend {backend!r}; choose one of {', '.join(BACKENDS)}")
