"""Test helper: small real videos whose frames carry their own index as an 8-bit code."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

BITS = 8


def pattern_frame(index: int, width: int, height: int) -> np.ndarray:
    """RGB frame: a colour ramp that moves with ``index`` and the index as 8 black/white blocks."""
    ys, xs = np.mgrid[0:height, 0:width]
    frame = np.stack(
        [(xs * 3 + index * 7) % 256, (ys * 5 + index * 3) % 256, np.full_like(xs, 90)], axis=-1
    ).astype(np.uint8)
    block_w, top = width // BITS, height // 2
    for bit in range(BITS):
        on = (index >> (BITS - 1 - bit)) & 1
        frame[top:, bit * block_w : (bit + 1) * block_w] = 255 if on else 0
    return frame


def read_index(frame: np.ndarray) -> int:
    """The index drawn by :func:`pattern_frame` (blocks sampled away from their edges)."""
    height, width = frame.shape[:2]
    block_w, top = width // BITS, height // 2
    value = 0
    for bit in range(BITS):
        x0, x1 = bit * block_w + block_w // 4, (bit + 1) * block_w - block_w // 4
        block = frame[top + (height - top) // 4 : height - (height - top) // 4, x0:x1]
        value = (value << 1) | int(block.mean() > 128)
    return value


def write_video(
    path: Path,
    num_frames: int,
    width: int = 64,
    height: int = 48,
    fps: int = 25,
    codec: str = "libx264",
    gop: int = 12,
    pts: list[int] | None = None,
) -> Path:
    """Encode ``num_frames`` pattern frames; ``pts`` (in 1/1000 s) makes the frame rate variable."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        odd = width % 2 or height % 2
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv444p" if odd else "yuv420p"
        if codec != "gif":
            stream.gop_size = gop
            stream.bit_rate = 2_000_000
        if codec == "libx264":
            stream.options = {"crf": "12", "preset": "veryfast"}
        if codec == "libx265":
            stream.options = {"x265-params": "log-level=error"}
        if pts is not None:
            stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(pattern_frame(i, width, height), format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path
