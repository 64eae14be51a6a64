"""Where FVD's videos come from: uint8 arrays in memory, .npy/.npz files, video files and
frame folders; each a picklable :class:`VideoSet` a rank can read single videos from.

Array files are untrusted: their header (dtype, shape) is read and checked against the file
size before any data is mapped, and they are never unpickled.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from i3d.utils.untrusted import read_npy_header

ARRAY_SUFFIXES = (".npy", ".npz")
NPZ_KEY = "videos"
"""The array an .npz with several members must name ``videos``."""


class FVDInputError(ValueError):
    """An FVD input is not uint8 RGB videos (N, T, H, W, 3), or cannot be read."""


def _check_video_shape(shape: Sequence[int], what: str) -> None:
    if len(shape) != 5 or shape[-1] != 3 or min(shape) < 1:
        raise FVDInputError(
            f"{what} must be uint8 RGB videos (N, T, H, W, 3), got shape {tuple(shape)}"
        )


def _float_hint(dtype: Any) -> str:
    return (
        f"videos must be uint8 in [0, 255], got {dtype}: convert generator output first, e.g. "
        "((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8) for [-1, 1] or "
        "(x.clamp(0, 1) * 255).round().to(torch.uint8) for [0, 1] (FVD protocols scale "
        "the values themselves, so scaled input would be scaled twice)"
    )


class VideoSet:
    """N videos; ``num_frames(i)`` and ``frames(i, indices)`` → (T, H, W, 3) uint8."""

    description = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def num_frames(self, index: int) -> int:
        raise NotImplementedError

    def frames(self, index: int, indices: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def name(self, index: int) -> str:
        """How errors name video ``index``."""
        return f"{self.description} video {index}"


class ArrayVideos(VideoSet):
    """Videos held in memory: one (N, T, H, W, 3) array, or a list of (T, H, W, 3) arrays."""

    def __init__(self, videos: Any, description: str = "array") -> None:
        self.description = description
        if isinstance(videos, list | tuple):
            self.videos = [_as_uint8(v, f"{description}[{i}]", 4) for i, v in enumerate(videos)]
        else:
            array = _as_uint8(videos, description, 5)
            self.videos = list(array)
        if not self.videos:
            raise FVDInputError(f"{description} holds no videos")

    def __len__(self) -> int:
        return len(self.videos)

    def num_frames(self, index: int) -> int:
        return int(self.videos[index].shape[0])

    def frames(self, index: int, indices: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.videos[index][indices])


def _as_uint8(value: Any, what: str, ndim: int) -> np.ndarray:
    """A uint8 numpy view of a tensor or array, with its shape checked."""
    if hasattr(value, "detach"):  # a torch tensor, on any device
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype != np.uint8:
        raise FVDInputError(f"{what}: {_float_hint(array.dtype)}")
    if array.ndim != ndim:
        want = "(N, T, H, W, 3)" if ndim == 5 else "(T, H, W, 3)"
        raise FVDInputError(f"{what} must be uint8 RGB videos {want}, got shape {array.shape}")
    _check_video_shape(array.shape if ndim == 5 else (1, *array.shape), what)
    return array


def _npy_header(fh: BinaryIO, what: str) -> tuple[tuple[int, ...], int]:
    """(shape, data offset) of an .npy stream, refusing anything but C-order uint8."""
    try:
        shape, fortran, dtype = read_npy_header(fh)
    except ValueError as exc:
        raise FVDInputError(f"{what} is not a readable .npy array ({exc})") from None
    if dtype != np.uint8 or dtype.hasobject:
        raise FVDInputError(f"{what}: {_float_hint(dtype)}")
    if fortran:
        raise FVDInputError(f"{what} is stored in Fortran order; save it C-contiguous")
    _check_video_shape(shape, what)
    return tuple(int(s) for s in shape), fh.tell()


class NpyVideos(VideoSet):
    """An (N, T, H, W, 3) uint8 .npy file, memory-mapped video by video."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.description = str(self.path)
        with open(self.path, "rb") as fh:
            self.shape, offset = _npy_header(fh, self.description)
        need = offset + int(np.prod(self.shape))
        if self.path.stat().st_size < need:
            raise FVDInputError(
                f"{self.path} claims shape {self.shape} ({need} bytes) but holds "
                f"{self.path.stat().st_size} bytes; the file is truncated"
            )
        self._array: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}  # each process maps the file itself

    def _mapped(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        return self._array

    def __len__(self) -> int:
        return self.shape[0]

    def num_frames(self, index: int) -> int:
        return self.shape[1]

    def frames(self, index: int, indices: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self._mapped()[index][indices])


class NpzVideos(VideoSet):
    """The (N, T, H, W, 3) uint8 member of an .npz (the only one, or ``videos``), read by
    seeking to one video at a time."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.description = str(self.path)
        try:
            with zipfile.ZipFile(self.path) as archive:
                names = [n for n in archive.namelist() if n.endswith(".npy")]
                if len(names) == 1:
                    self.member = names[0]
                elif f"{NPZ_KEY}.npy" in names:
                    self.member = f"{NPZ_KEY}.npy"
                else:
                    raise FVDInputError(
                        f"{self.path} holds arrays {[n[:-4] for n in names]}; save one array, or "
                        f"name the videos {NPZ_KEY!r}"
                    )
                info = archive.getinfo(self.member)
                with archive.open(self.member) as fh:
                    self.shape, self.offset = _npy_header(fh, f"{self.path}:{self.member}")
        except (zipfile.BadZipFile, OSError) as exc:
            raise FVDInputError(f"{self.path} is not a readable .npz ({exc})") from None
        self.video_bytes = int(np.prod(self.shape[1:]))
        if info.file_size < self.offset + self.video_bytes * self.shape[0]:
            raise FVDInputError(
                f"{self.path}:{self.member} claims shape {self.shape} but holds "
                f"{info.file_size} bytes; the array is truncated"
            )

    def __len__(self) -> int:
        return self.shape[0]

    def num_frames(self, index: int) -> int:
        return self.shape[1]

    def frames(self, index: int, indices: np.ndarray) -> np.ndarray:
        with zipfile.ZipFile(self.path) as archive, archive.open(self.member) as fh:
            fh.seek(self.offset + index * self.video_bytes)
            data = fh.read(self.video_bytes)
        if len(data) != self.video_bytes:
            raise FVDInputError(f"{self.path}: video {index} is truncated")
        video = np.frombuffer(data, dtype=np.uint8).reshape(self.shape[1:])
        return np.ascontiguousarray(video[indices])


class FileVideos(VideoSet):
    """Video files and folders of extracted frames, decoded with the project's readers."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]], description: str) -> None:
        self.paths = [Path(p) for p in paths]
        self.description = description
        if not self.paths:
            raise FVDInputError(f"{description} holds no videos")
        self._lengths: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        return str(self.paths[index])

    def num_frames(self, index: int) -> int:
        if index not in self._lengths:
            from i3d.data.decode import open_video

            with open_video(self.paths[index]) as reader:
                self._lengths[index] = int(reader.num_frames)
        return self._lengths[index]

    def frames(self, index: int, indices: np.ndarray) -> np.ndarray:
        from i3d.data.decode import open_video

        with open_video(self.paths[index]) as reader:
            return reader.get_frames(indices)


def open_videos(source: Any, description: str | None = None) -> VideoSet:
    """A :class:`VideoSet` from an array / tensor / list of clips, or a path: a .npy or .npz
    array file, a folder of videos or frame folders, a video file, or a frame folder."""
    if isinstance(source, VideoSet):
        return source
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.suffix.lower() == ".npy" and path.is_file():
            return NpyVideos(path)
        if path.suffix.lower() == ".npz" and path.is_file():
            return NpzVideos(path)
        from i3d.inference.inputs import expand_inputs

        return FileVideos(expand_inputs([path]), description or str(path))
    return ArrayVideos(source, description or "array")
