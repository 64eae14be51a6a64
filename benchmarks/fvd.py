"""FVD feature extraction speed: videos/s of ``compute_stats`` vs a plain batched forward.

Both run the same Inception I3D (random weights unless ``--weights``; the speed does not
depend on the values) on the same 16×224² clips in the same process: the FVD path from
uint8 (N, 16, H, W, 3) arrays (the protocol's resize, scaling, float64 accumulation), the
baseline on already prepared float clips. The ratio is the FVD path's overhead.

    python benchmarks/fvd.py [--videos 8] [--size 256] [--batch-size 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import cpu_model

from i3d.backends.float32 import float32_mode
from i3d.fvd import compute_stats
from i3d.fvd.extract import Detector
from i3d.models import build_model, get_preset
from i3d.weights.format import WeightsInfo, save_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=256, help="input frame side (resized to 224)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--protocol", default="tf")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights
        if weights is None:
            torch.manual_seed(0)
            config = get_preset("inception_i3d_rgb")
            weights = save_weights(
                Path(tmp) / "inception.safetensors", build_model(config).state_dict(),
                WeightsInfo(config),
            )  # fmt: skip
        rng = np.random.default_rng(0)
        shape = (args.videos, args.frames, args.size, args.size, 3)
        videos = rng.integers(0, 256, size=shape, dtype=np.uint8)
        detector = Detector(weights, args.device, args.batch_size)
        clips = torch.rand(args.batch_size, 3, args.frames, 224, 224) * 2 - 1
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else lambda: None

        def plain() -> float:
            start = time.perf_counter()
            with torch.no_grad(), float32_mode(detector.device):  # as the Detector runs
                for i in range(0, args.videos, args.batch_size):
                    detector.model(
                        clips[: min(args.batch_size, args.videos - i)].to(detector.device)
                    )
            sync()
            return time.perf_counter() - start

        def fvd_path() -> float:
            start = time.perf_counter()
            compute_stats(videos, protocol=args.protocol, detector=detector)
            sync()
            return time.perf_counter() - start

        plain(), fvd_path()  # warm-up
        rounds = [(plain(), fvd_path()) for _ in range(3)]
        base = float(np.median([r[0] for r in rounds]))
        ours = float(np.median([r[1] for r in rounds]))
    print(f"device {args.device}; cpu: {cpu_model()}; threads {torch.get_num_threads()}")
    print(
        f"{args.videos} videos of {args.frames}x{args.size}² uint8, protocol {args.protocol}, "
        f"batch {args.batch_size}, median of 3 rounds"
    )
    print(f"plain batched forward : {args.videos / base:.3f} videos/s ({base:.2f} s)")
    print(f"FVD feature extraction: {args.videos / ours:.3f} videos/s ({ours:.2f} s)")
    print(f"overhead ratio        : {ours / base:.3f}x")


if __name__ == "__main__":
    main()
