"""Flow on disk: a lossless ``.npy`` per video, or mmaction2's raw-frame JPEG folders.

Two layouts, one per video under a flow folder, with the settings that made them in
``flow.json`` beside them:

- ``npy`` (i3d's own, lossless up to its dtype): ``<video>.npy`` of (ticks, H, W, 2) flow in
  DeepMind's [-1, 1] (pixels / bound), x then y, flow t from frame t to t + 1. float32 keeps
  exactly what the Flow stream is fed; float16 rounds it by at most 2^-11 of the bound
  (0.01 px at bound 20), far below the 0.007–0.13 px by which two TV-L1 implementations
  differ.
- ``mmaction`` (mmaction2's rawframes, written by its denseflow): ``<video>/flow_x_00001.jpg``,
  ``flow_y_00001.jpg``, ... (1-based; flow i from frame i to i + 1) and, when the RGB frames
  are kept, ``img_00001.jpg``, ... Each flow component is quantised as denseflow's
  ``convertFlowToImage`` does: round(255 (f + bound) / (2 bound)) for f in pixels, clipped to
  [0, 255], i.e. steps of 2·bound/255 = 0.157 px at bound 20.

Files are written atomically (temporary name, then rename); files read back are untrusted:
an ``.npy`` header is checked against the file size before it is mapped, and JPEGs are
opened only through the frame-folder reader (allow-listed image formats, size limit).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import numpy as np
from PIL import Image

from i3d.data.decode import VideoDecodeError, open_frames_dir
from i3d.utils.files import OutputError, atomic_path, ensure_dir, no_room_as_output_error, reserve
from i3d.utils.untrusted import load_json, read_npy_header

FORMATS = ("npy", "mmaction")
NPY_DTYPES = ("float16", "float32")
FLOW_X = "flow_x_{:05d}.jpg"
FLOW_Y = "flow_y_{:05d}.jpg"
FLOW_TEMPLATES = ("flow_{}_{:05d}.jpg", "{}_{:05d}.jpg")
"""Flow file names a rawframes folder may use, ``{}`` standing for x / y: denseflow's and
``i3d flow``'s (``flow_x_00001.jpg``), and the ``filename_tmpl='{}_{:05d}.jpg'`` of
mmaction2's flow configs (``x_00001.jpg``)."""
IMAGE = "img_{:05d}.jpg"
START_INDEX = 1
"""mmaction2's rawframes (and denseflow's files) count from 1."""
JPEG_QUALITY = 95
"""OpenCV's ``imwrite`` default, which denseflow writes with."""
SETTINGS_NAME = "flow.json"
_Chunk = tuple[np.ndarray, np.ndarray]
"""(flow (n, H, W, 2), RGB frames (m, H, W, 3)) of consecutive ticks."""


class FlowStoreError(ValueError):
    """A flow folder or file is unusable: other settings, a damaged file, a missing video."""


def quantize(flow: np.ndarray) -> np.ndarray:
    """[-1, 1] flow (pixels / bound) → uint8 as denseflow: round(255 (f + b) / 2b), clipped."""
    return np.clip(np.rint((np.asarray(flow, dtype=np.float64) + 1.0) * 127.5), 0, 255).astype(
        np.uint8
    )


def dequantize(values: np.ndarray) -> np.ndarray:
    """uint8 flow images → float32 [-1, 1] flow: f / bound = 2 v / 255 − 1."""
    return (values.astype(np.float32) * np.float32(2 / 255) - 1).astype(np.float32)


@attrs.frozen
class FlowSettings:
    """What made a flow folder: recorded in ``flow.json`` so a later run can reuse or refuse it."""

    format: str = attrs.field(validator=attrs.validators.in_(FORMATS))
    fps: float | None
    size: int | None
    """Short side the frames were resized to (bilinear), None: as decoded."""
    crop: int | None
    impl: str
    tvl1: dict[str, Any] | None
    """The TV-L1 parameters; None for RAFT."""
    bound: float
    raft: dict[str, Any] | None = None
    """RAFT's model, weights SHA-256 and refinements; None (not written) for a TV-L1."""

    def to_dict(self) -> dict[str, Any]:
        """The ``flow.json`` record (a TV-L1 folder's has no ``raft``, as before RAFT was one)."""
        record = attrs.asdict(self)
        if record["raft"] is None:
            del record["raft"]
        return record

    def differences(self, other: FlowSettings) -> list[str]:
        """``field: ours vs theirs`` for every field that differs."""
        return [
            f"{name} {getattr(self, name)!r} vs {getattr(other, name)!r}"
            for name in (f.name for f in attrs.fields(FlowSettings))
            if getattr(self, name) != getattr(other, name)
        ]


def read_settings(folder: Path) -> FlowSettings | None:
    """The settings a flow folder records, None when it has none yet."""
    path = folder / SETTINGS_NAME
    if not path.exists():
        return None
    try:
        data = load_json(path.read_bytes(), str(path))
        return FlowSettings(**data)
    except (OSError, TypeError, ValueError) as exc:
        raise FlowStoreError(f"{path} is not a flow settings file ({exc}); remove it") from None


def layout_of(folder: Path) -> str:
    """The layout of a flow folder: what its ``flow.json`` says, ``npy`` for a new one."""
    settings = read_settings(folder) if folder.is_dir() else None
    return settings.format if settings is not None else "npy"


def claim_folder(folder: Path, settings: FlowSettings) -> None:
    """Record ``settings`` in a new flow folder, or refuse one made with other settings."""
    found = read_settings(folder)
    if found is None:
        with atomic_path(folder / SETTINGS_NAME) as tmp:
            tmp.write_text(json.dumps(settings.to_dict(), indent=2) + "\n")
        return
    differ = settings.differences(found)
    if differ:
        raise FlowStoreError(
            f"{folder} holds flow made with other settings ({'; '.join(differ)}, this run vs "
            "the folder); use another folder or the same settings"
        )


def open_npy(path: Path) -> np.ndarray:
    """A read-only memory map of a flow ``.npy`` (ticks, H, W, 2), header and size checked
    first (float16/float32, C order, no pickles), so a damaged file costs no memory."""
    try:
        with open(path, "rb") as fh:
            shape, fortran, dtype = read_npy_header(fh)
            offset = fh.tell()
    except (OSError, ValueError) as exc:
        raise FlowStoreError(f"{path} is not a readable .npy flow file ({exc})") from None
    if dtype.name not in NPY_DTYPES or fortran or len(shape) != 4 or shape[-1] != 2:
        raise FlowStoreError(
            f"{path} holds {dtype} {'Fortran' if fortran else 'C'}-order {tuple(shape)}; flow "
            "files are C-order float16/float32 (ticks, H, W, 2): remove it to recompute"
        )
    need = offset + int(np.prod(shape)) * dtype.itemsize
    if path.stat().st_size < need:
        raise FlowStoreError(
            f"{path} claims {tuple(shape)} {dtype} ({need:,} bytes) but holds "
            f"{path.stat().st_size:,}; the file is truncated: remove it to recompute"
        )
    return np.load(path, mmap_mode="r", allow_pickle=False)


@contextmanager
def npy_writer(path: Path, shape: tuple[int, ...], dtype: str) -> Iterator[np.ndarray]:
    """A writable memory map of ``shape`` in a temporary file, renamed onto ``path`` when the
    block completes (removed when it fails), so a long video never sits in memory whole."""
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        reserve(tmp)
        try:
            yield out
            out.flush()
        finally:
            del out


def write_mmaction(
    folder: Path, flow: np.ndarray, first: int, frames: np.ndarray | None = None
) -> None:
    """Flow ticks ``first``, ``first + 1``, ... ((n, H, W, 2) in [-1, 1]) as denseflow's JPEGs
    (1-based names), and uint8 RGB ``frames`` (m, H, W, 3) of positions ``first``, ... as
    ``img_`` JPEGs (a video of N frames has N images and N − 1 flow pairs)."""
    for i, field in enumerate(quantize(flow)):
        number = START_INDEX + first + i
        _write_jpeg(folder / FLOW_X.format(number), field[..., 0])
        _write_jpeg(folder / FLOW_Y.format(number), field[..., 1])
    for i, frame in enumerate(frames if frames is not None else ()):
        _write_jpeg(folder / IMAGE.format(START_INDEX + first + i), frame)


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    """One JPEG; callers write into a temporary folder that is renamed once complete. It is
    encoded in memory first: Pillow's JPEG encoder writing to a file ignores a failed write
    (a full disk left truncated images, and no error)."""
    encoded = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(encoded, "JPEG", quality=JPEG_QUALITY)
    path.write_bytes(encoded.getbuffer())


def rawframes_flow_template(folder: Path) -> str | None:
    """Which of :data:`FLOW_TEMPLATES` a rawframes folder's flow files follow; None: none."""
    for template in FLOW_TEMPLATES:
        if (folder / template.format("x", START_INDEX)).is_file():
            return template
    return None


def mmaction_ticks(folder: Path, template: str = FLOW_TEMPLATES[0]) -> int:
    """Flow fields in an mmaction rawframes folder (consecutive x files from 1)."""
    try:
        with open_frames_dir(folder, template.replace("{}", "x", 1), START_INDEX) as reader:
            return reader.num_frames
    except VideoDecodeError as exc:
        raise FlowStoreError(f"{folder}: not an mmaction flow folder ({exc})") from None


def read_mmaction_levels(
    folder: Path, ticks: np.ndarray, template: str = FLOW_TEMPLATES[0]
) -> np.ndarray:
    """The uint8 levels (n, H, W, 2) of flow ticks (0-based) of an mmaction rawframes folder,
    read through the frame-folder reader (allow-listed image formats, frame size limit)."""
    components = []
    for axis in "xy":
        name = template.replace("{}", axis, 1)
        try:
            with open_frames_dir(folder, name, START_INDEX) as reader:
                components.append(reader.get_frames(ticks)[..., 0])
        except (VideoDecodeError, ValueError) as exc:
            raise FlowStoreError(f"{folder}: cannot read flow {name} ({exc})") from None
    if components[0].shape != components[1].shape:
        raise FlowStoreError(f"{folder}: flow x and y images differ in size")
    return np.stack(components, axis=-1)


def read_mmaction(folder: Path, ticks: np.ndarray) -> np.ndarray:
    """Flow ticks (0-based) of an mmaction rawframes folder as float32 (n, H, W, 2) in [-1, 1]."""
    return dequantize(read_mmaction_levels(folder, ticks))


@attrs.frozen
class FlowFolder:
    """Per-video flow under ``path`` in the layout ``settings.format`` names, claimed for
    ``settings`` (``flow.json``); ``dtype`` is what new ``.npy`` files are written as."""

    path: Path
    settings: FlowSettings
    dtype: str = attrs.field(default="float16", validator=attrs.validators.in_(NPY_DTYPES))

    def claim(self) -> None:
        """Create the folder and record its settings, or refuse one made with others."""
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"{self.path} is a file; give a folder for the flow")
        ensure_dir(self.path)
        claim_folder(self.path, self.settings)

    def recorded(self) -> dict[str, Any]:
        """Where flow came from, as feature outputs record it: this folder's absolute path
        and the settings of its ``flow.json``."""
        return {"path": str(self.path.resolve()), **self.settings.to_dict()}

    def entry(self, name: str) -> Path:
        """Where video ``name``'s flow lives: ``<name>.npy`` or the folder ``<name>/``."""
        return self.path / (f"{name}.npy" if self.settings.format == "npy" else name)

    def has(self, name: str) -> bool:
        return self.entry(name).exists()

    def ticks(self, name: str) -> int:
        """Flow fields stored for video ``name``."""
        if self.settings.format == "npy":
            return len(open_npy(self.entry(name)))
        return mmaction_ticks(self.entry(name))

    def read(self, name: str, ticks: np.ndarray) -> np.ndarray:
        """float32 [-1, 1] flow (n, H, W, 2) of the 0-based ``ticks`` of video ``name``."""
        if self.settings.format == "npy":
            return np.asarray(open_npy(self.entry(name))[ticks], dtype=np.float32)
        return read_mmaction(self.entry(name), ticks)

    def write(
        self,
        name: str,
        shape: tuple[int, int, int],
        chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    ) -> None:
        """Video ``name``'s flow from (flow, frames) chunks (see
        :func:`i3d.flow.video.iter_timeline_flow`), ``shape`` = (ticks, H, W); atomically, so
        an interrupted run leaves nothing a later one would take for finished."""
        dst = self.entry(name)
        if self.settings.format == "npy":
            with npy_writer(dst, (*shape, 2), self.dtype) as out:
                done = 0
                for flow, _ in chunks:
                    out[done : done + len(flow)] = flow
                    done += len(flow)
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=self.path))
        try:
            done = 0
            with no_room_as_output_error(dst):
                for flow, frames in chunks:
                    write_mmaction(tmp, flow, done, frames)
                    done += len(frames)
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
