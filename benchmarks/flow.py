"""TV-L1 flow throughput: the PyTorch TV-L1 against OpenCV's DualTVL1 on the same frames.

Two sources: the bundled sample clip (real video: v_CricketShot_g04_c01, 224², resized to
SIZE² with OpenCV INTER_LINEAR when SIZE differs) and a generated H.264 video with moving
content (``common.make_video``, centre-cropped to SIZE²). For each it prints frame pairs per
second (wall) and CPU seconds per pair for OpenCV with 1 and with all threads and for the
PyTorch version on cpu (and cuda when present), all in one run, the ratio of each to OpenCV
with as many threads, plus the mean end-point error between the two implementations.
``--load K`` keeps K busy-looping processes running meanwhile, the state of a shared machine
(where intra-op OpenMP teams used to spin at every op's barrier).

    python benchmarks/flow.py [--pairs 8] [--size 224] [--batch 8] [--source clip generated]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
import torch
from common import cpu_model, make_video
from PIL import Image, ImageSequence

from i3d.data.decode import open_video
from i3d.flow import (
    FlowConfig,
    end_point_error,
    opencv_available,
    opencv_tvl1_flow,
    pair_flow,
    rgb_to_gray,
)

SAMPLE = "v_CricketShot_g04_c01_rgb.gif"


def clip_frames(count: int, size: int) -> np.ndarray:
    """The first ``count`` frames of the bundled sample clip, uint8 grey (count, size, size)."""
    with resources.files("i3d.assets").joinpath(SAMPLE).open("rb") as handle:
        frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(Image.open(handle))]
    if count > len(frames):
        raise SystemExit(f"the sample clip has {len(frames)} frames; ask for fewer --pairs")
    rgb = np.stack(frames[:count])
    if rgb.shape[1:3] != (size, size):
        rgb = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_LINEAR) for f in rgb])
    return rgb_to_gray(rgb)


def generated_frames(count: int, size: int) -> np.ndarray:
    """``count`` greyscale uint8 frames (count, size, size) from a generated moving video."""
    with tempfile.TemporaryDirectory() as tmp:
        path = make_video(Path(tmp) / "moving.mp4", seconds=max(1, -(-count // 25)))
        with open_video(path) as reader:
            frames = reader.get_frames(range(count))
    height, width = frames.shape[1:3]
    if min(height, width) < size:
        raise SystemExit(f"the generated video is {width}x{height}; ask for --size <= {height}")
    top, left = (height - size) // 2, (width - size) // 2
    return rgb_to_gray(frames[:, top : top + size, left : left + size])


def timed(label: str, pairs: int, run: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    """Run ``run()`` once, print its pairs/s and CPU s/pair under ``label``; (flow, pairs/s)."""
    start, cpu = time.perf_counter(), time.process_time()
    flow = np.asarray(run())
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    rate = pairs / seconds
    print(f"  {label:<34} {rate:7.3f} pairs/s  {cpu / pairs:6.2f} s CPU/pair", end="")
    return flow, rate


def _spin() -> None:
    while True:
        pass


def bench_source(name: str, gray: np.ndarray, batch: int, threads: int) -> None:
    """Time every implementation on the pairs of ``gray`` and print one block of the table."""
    first, second = gray[:-1], gray[1:]
    pairs = len(first)
    print(f"{name}: {pairs} pairs of {gray.shape[2]}x{gray.shape[1]}, OpenCV DualTVL1 defaults")
    reference: dict[int, float] = {}
    ref_flow = None
    counts = sorted({1, threads})
    if opencv_available():
        for count in counts:
            cv2.setNumThreads(count)
            ref_flow, reference[count] = timed(
                f"opencv, {count} thread{'s' if count > 1 else ''}",
                pairs,
                lambda: opencv_tvl1_flow(first, second),
            )
            print()
    else:
        print("  opencv: not installed (pip install opencv-contrib-python-headless)")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for count in counts if device == "cpu" else [threads]:
            torch.set_num_threads(count)
            config = FlowConfig(impl="torch", device=device, batch_size=batch)
            label = f"torch {device}, batch {batch}" + (
                f", {count} thread{'s' if count > 1 else ''}" if device == "cpu" else ""
            )
            flow, rate = timed(label, pairs, lambda c=config: pair_flow(first, second, c).numpy())
            if count in reference:
                print(f"  ×{rate / reference[count]:.2f} opencv", end="")
            print()
            if ref_flow is not None:
                magnitude = float(np.sqrt((ref_flow**2).sum(axis=1)).mean())
                print(
                    f"    mean EPE vs opencv: {end_point_error(flow, ref_flow):.4f} px "
                    f"(opencv's mean flow magnitude {magnitude:.2f} px)"
                )
    torch.set_num_threads(threads)


def main() -> None:
    """Parse the options, time each implementation on each source, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="frame pairs to time")
    parser.add_argument("--size", type=int, default=224, help="square frame side")
    parser.add_argument("--batch", type=int, default=8, help="pairs per torch TV-L1 batch")
    parser.add_argument(
        "--source", nargs="+", choices=("clip", "generated"), default=["clip", "generated"]
    )
    parser.add_argument("--load", type=int, default=0, help="busy processes to run meanwhile")
    args = parser.parse_args()
    threads = len(os.sched_getaffinity(0))
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; opencv {cv2.__version__}")
    print(f"load average at start {os.getloadavg()[0]:.2f}; {args.load} busy processes added")
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.load)]
    for spinner in spinners:
        spinner.start()
    try:
        for source in args.source:
            load = clip_frames if source == "clip" else generated_frames
            bench_source(source, load(args.pairs + 1, args.size), args.batch, threads)
    finally:
        for spinner in spinners:
            spinner.terminate()
            spinner.join()


if __name__ == "__main__":
    main()
