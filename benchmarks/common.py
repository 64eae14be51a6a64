"""What several benchmarks share: a generated test video, and the CPU they ran on."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np


def make_video(path: Path, seconds: int, fps: int = 25) -> Path:
    """A 340×256 H.264 video with moving content (so frames compress like real video)."""
    width, height = 340, 256
    ys, xs = np.mgrid[0:height, 0:width]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "28", "g": "64", "preset": "veryfast"}
        for t in range(seconds * fps):
            frame = np.stack(
                [(xs + 3 * t) % 256, (ys + 2 * t) % 256, ((xs + ys) // 2 + t) % 256], axis=-1
            ).astype(np.uint8)
            frame[(t * 5) % 216 : (t * 5) % 216 + 40, 100:140] = (255, 0, 0)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, with the number of usable cores."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            name = next(
                (line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                "unknown",
            )
    except OSError:
        name = "unknown"
    return f"{name}, {len(os.sched_getaffinity(0))} cores usable"
