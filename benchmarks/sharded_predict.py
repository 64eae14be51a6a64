"""Videos/s of ``i3d predict`` in one process and sharded over N processes, in the same run.

Generates short H.264 videos of uneven length, saves a ResNet3d I3D at a small width with a
mmaction-style protocol, and times ``i3d predict --json`` (fresh processes, so start-up is
counted as a user sees it) with ``--world-size 1`` and ``N``. Prints the CPU it ran on.

    python benchmarks/sharded_predict.py [--videos 24] [--world-size 2] [--width 16]
        [--device cuda]

``--device cuda`` runs each rank on its own GPU (NCCL), so N processes need N GPUs; with
fewer, the N-process case is skipped and only the one-process figure is printed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs
import av
import numpy as np
import torch
from common import cpu_model

from i3d.models import build_model, get_preset
from i3d.weights.format import WeightsInfo, save_weights
from i3d.weights.preprocessing import MMACTION_K400


def make_videos(folder: Path, count: int) -> None:
    """``count`` 160×120 videos of 40 to 160 frames (uneven, as real data sets are)."""
    rng = np.random.default_rng(0)
    for i in range(count):
        frames = int(rng.integers(40, 161))
        with av.open(str(folder / f"v{i:03d}.mp4"), mode="w") as container:
            stream = container.add_stream("libx264", rate=25)
            stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
            for t in range(frames):
                image = ((np.indices((120, 160)).sum(0) + 3 * t) % 256).astype(np.uint8)
                frame = av.VideoFrame.from_ndarray(np.stack([image] * 3, -1), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())


def timed(args: list[str]) -> float:
    tic = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "i3d", *args], check=True, stdout=subprocess.DEVNULL
    )
    return time.perf_counter() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--width", type=int, default=16, help="ResNet3d base channels.")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per rank)")
    args = parser.parse_args()
    gpus = torch.cuda.device_count() if args.device.startswith("cuda") else None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_videos(root, args.videos)
        config = get_preset("i3d_r50", base_channels=args.width, num_classes=10)
        prep = attrs.evolve(
            MMACTION_K400, clip_len=16, num_clips=3, num_crops=1, resize_short=112,
            crop_size=112, input_size=112,
        )  # fmt: skip
        weights = save_weights(
            root / "w.safetensors",
            build_model(config).state_dict(),
            WeightsInfo(config, tuple(f"c{i}" for i in range(10)), prep),
        )
        common = ["predict", str(root), "--weights", str(weights), "--json"]
        common += ["--device", args.device]
        one = timed(common)
        fits = gpus is None or gpus >= args.world_size
        many = timed([*common, "--world-size", str(args.world_size)]) if fits else None
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; device {args.device}")
    print(f"{args.videos} videos, i3d_r50 width {args.width}, 3 clips x 16 frames at 112 px")
    print(f"1 process : {args.videos / one:6.2f} videos/s ({one:.1f} s)")
    if many is None:
        print(f"{args.world_size} processes: skipped, {gpus} GPU(s) here (one per rank)")
        return
    print(f"{args.world_size} processes: {args.videos / many:6.2f} videos/s ({many:.1f} s)")
    print(f"speed-up  : {one / many:.2f}x")


if __name__ == "__main__":
    main()
