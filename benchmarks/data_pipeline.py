"""K400 test pipeline (10 clips × 32 frames × interval 2, short side 256, 3 crops of 256).

Compares i3d's seek-and-decode-only-needed-frames pipeline against a baseline that decodes the
whole video and then indexes it, both measured in this run on generated 340×256 H.264 videos
(g=64, x264 defaults otherwise, like the reference clip). The baseline converts frames with
PyAV's usual ``frame.to_ndarray(format="rgb24")``; a second baseline row reuses one swscale
context as i3d's reader does, to show how much of the gain is seeking alone. Peak memory is
the RSS growth during one call in a fresh process, for a 10 s and a 60 s video.

    python benchmarks/data_pipeline.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
from common import make_video


def run_pipeline(path: Path) -> torch.Tensor:
    """i3d: decode only the frames the 10×32 clips need."""
    from i3d.data.pipeline import build_pipeline
    from i3d.weights.preprocessing import MMACTION_K400

    return build_pipeline(MMACTION_K400, "test").frames(path)


def run_baseline(path: Path, shared_context: bool = False) -> torch.Tensor:
    """Baseline: decode every frame into memory, then sample, resize and crop the same way."""
    from av.video.reformatter import VideoReformatter

    from i3d.data import transforms as T
    from i3d.data.pipeline import build_pipeline
    from i3d.weights.preprocessing import MMACTION_K400

    pipe = build_pipeline(MMACTION_K400, "test")
    rgb = VideoReformatter()
    with av.open(str(path)) as container:
        frames = np.stack(
            [
                rgb.reformat(f, format="rgb24", threads=1).to_ndarray()
                if shared_context
                else f.to_ndarray(format="rgb24")
                for f in container.decode(video=0)
            ]
        )
    assert pipe.sampler is not None
    inds = pipe.sampler(len(frames))
    clip = T.resize_short(torch.from_numpy(frames[inds]), 256)
    return T.to_views(T.three_crop(clip, 256), pipe.clips_per_crop)


def run_baseline_shared_context(path: Path) -> torch.Tensor:
    """The baseline with one reused swscale context for the RGB conversion."""
    return run_baseline(path, shared_context=True)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(x for x in status if x.startswith(field + ":"))
    return int(line.split()[1])


def _peak_rss(fn_name: str, path: str, queue: multiprocessing.Queue) -> None:
    torch.set_num_threads(1)
    fn = globals()[fn_name]
    fn(Path(path))  # warm-up: imports, allocator pools
    try:  # reset the peak (VmHWM) so only the measured call counts
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
        fn(Path(path))
        queue.put((_status_kib("VmHWM") - before) / 1024)
    except OSError:  # not Linux: whole-process peak instead
        fn(Path(path))
        queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def peak_mb(fn_name: str, path: Path) -> float:
    """Peak RSS growth (MiB) while a fresh process runs ``fn_name(path)`` (after a warm-up)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss, args=(fn_name, str(path), queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def best_time(fn, path: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(path)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        short = make_video(Path(tmp) / "10s.mp4", 10)
        long = make_video(Path(tmp) / "60s.mp4", 60)
        assert torch.equal(run_pipeline(short), run_baseline(short)), "outputs differ"
        ours = best_time(run_pipeline, short, args.repeats)
        base = best_time(run_baseline, short, args.repeats)
        shared = best_time(run_baseline_shared_context, short, args.repeats)
        print(f"10 s video, K400 test pipeline (30 uint8 views 32x256x256), best of {args.repeats}")
        print(f"  i3d (seek + decode needed frames):  {ours:.3f} s")
        print(f"  baseline (decode all, then index):  {base:.3f} s   speed-up {base / ours:.2f}x")
        print(
            f"  same, one reused swscale context:   {shared:.3f} s   speed-up {shared / ours:.2f}x"
        )
        ours_long = best_time(run_pipeline, long, 1)
        base_long = best_time(run_baseline, long, 1)
        print(
            f"60 s video: i3d {ours_long:.3f} s, baseline {base_long:.3f} s "
            f"({base_long / ours_long:.2f}x)"
        )
        print("peak memory growth during one call (fresh process, MiB; the output is 180 MiB):")
        for name in ("run_pipeline", "run_baseline"):
            a, b = peak_mb(name, short), peak_mb(name, long)
            print(f"  {name:13s} 10 s: {a:7.0f}   60 s: {b:7.0f}   (60 s / 10 s = {b / a:.2f})")


if __name__ == "__main__":
    main()
