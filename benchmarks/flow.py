"""TV-L1 flow throughput: the PyTorch TV-L1 against OpenCV's DualTVL1 on the same frames.

Frames come from a generated H.264 video with moving content (``common.make_video``),
centre-cropped to SIZE×SIZE greyscale. Prints frame pairs per second for OpenCV with 1 and
with all threads and for the PyTorch version on cpu (and cuda when present), all in one run,
plus the mean end-point error between the two implementations on these frames.

    python benchmarks/flow.py [--pairs 8] [--size 224] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import cpu_model, make_video

from i3d.data.decode import open_video
from i3d.flow import (
    FlowConfig,
    end_point_error,
    opencv_available,
    opencv_tvl1_flow,
    pair_flow,
    rgb_to_gray,
)


def load_frames(count: int, size: int) -> np.ndarray:
    """``count`` greyscale uint8 frames (count, size, size) from a generated moving video."""
    with tempfile.TemporaryDirectory() as tmp:
        path = make_video(Path(tmp) / "moving.mp4", seconds=max(1, -(-count // 25)))
        with open_video(path) as reader:
            frames = reader.get_frames(range(count))
    height, width = frames.shape[1:3]
    top, left = (height - size) // 2, (width - size) // 2
    return rgb_to_gray(frames[:, top : top + size, left : left + size])


def timed(label: str, pairs: int, run) -> np.ndarray:
    """Run ``run()`` once, print its pairs/s under ``label``, return its flow."""
    start = time.perf_counter()
    flow = np.asarray(run())
    seconds = time.perf_counter() - start
    print(f"  {label:<34} {pairs / seconds:7.2f} pairs/s  ({seconds:.1f} s)")
    return flow


def main() -> None:
    """Parse the options, time each implementation, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="frame pairs to time")
    parser.add_argument("--size", type=int, default=224, help="square frame side")
    parser.add_argument("--batch", type=int, default=8, help="pairs per torch TV-L1 batch")
    args = parser.parse_args()
    gray = load_frames(args.pairs + 1, args.size)
    first, second = gray[:-1], gray[1:]
    threads = len(os.sched_getaffinity(0))
    print(f"CPU: {cpu_model()}; torch {torch.__version__}")
    print(f"{args.pairs} pairs of {args.size}x{args.size}, OpenCV DualTVL1 defaults")
    reference = None
    if opencv_available():
        import cv2

        print(f"  (opencv {cv2.__version__})")
        for count in sorted({1, threads}):
            cv2.setNumThreads(count)
            reference = timed(
                f"opencv, {count} thread{'s' if count > 1 else ''}",
                args.pairs,
                lambda: opencv_tvl1_flow(first, second),
            )
    else:
        print("  opencv: not installed (pip install opencv-contrib-python-headless)")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for count in sorted({1, threads}) if device == "cpu" else [threads]:
            torch.set_num_threads(count)
            config = FlowConfig(impl="torch", device=device, batch_size=args.batch)
            label = f"torch {device}, batch {args.batch}" + (
                f", {count} thread{'s' if count > 1 else ''}" if device == "cpu" else ""
            )
            flow = timed(label, args.pairs, lambda c=config: pair_flow(first, second, c).numpy())
            if reference is not None:
                magnitude = float(np.sqrt((reference**2).sum(axis=1)).mean())
                print(
                    f"    mean EPE vs opencv: {end_point_error(flow, reference):.4f} px "
                    f"(opencv's mean flow magnitude {magnitude:.2f} px)"
                )


if __name__ == "__main__":
    main()
