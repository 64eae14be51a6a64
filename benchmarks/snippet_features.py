"""Snippets/s and peak memory of streaming snippet features against decoding the whole video first.

``i3d.features`` streams a video into snippets: frames are decoded in order, resized and
cropped 16 at a time, kept in a window buffer only while a pending snippet needs them and
copied into a batch when a window is complete (``i3d.features.snippets``), so memory is one
batch plus one window of frames whatever the video's length. The naive way decodes every
frame into one array (PyAV, ``frame.to_ndarray``), resizes, centre-crops and normalises them
all, then cuts the windows by hand and runs them through the same model in batches of the same
size: its memory grows with the video.

This generates 340×256 25 fps H.264 videos of ``--short`` (60) and ``--seconds`` (600)
seconds and runs each approach on each in a fresh process, which reports its peak RSS
(VmHWM) and the wall time of the extraction (model loaded and warmed up beforehand, in both).
Protocol ``SnippetProtocol(16, 16)``: 16-frame windows every 16 frames, short side 256, centre
crop 224, mmaction mean/std, on a randomly initialised ResNet3d-18 I3D at width 8
(``base_channels=8``), small so that the decode/resize/window pipeline is a sizeable share of
the time. It prints snippets/s and peak MiB per case, the streaming/naive ratios, peak memory
of the long video over the short one, and the largest difference between the two approaches'
features (float32 noise expected), with the CPU it ran on.

    python benchmarks/snippet_features.py [--seconds 600] [--short 60] [--batch-size 8]
        [--threads 2] [--videos DIR] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import cpu_model, make_video

FPS = 25
WINDOW = STRIDE = 16
WIDTH, HEIGHT = 340, 256
SHORT_SIDE, CROP = 256, 224


def tiny_weights(path: Path) -> Path:
    """A seeded random ResNet3d-18 I3D at width 8 whose test protocol is short side 256,
    centre crop 224 (as tests/tinymodel.py builds its width-4 one)."""
    import attrs
    import torch

    from i3d.models import build_model, get_preset
    from i3d.weights.format import WeightsInfo, save_weights
    from i3d.weights.preprocessing import MMACTION_K400

    torch.manual_seed(0)
    config = get_preset("i3d_r50", depth=18, base_channels=8)
    prep = attrs.evolve(
        MMACTION_K400,
        clip_len=WINDOW,
        frame_interval=1,
        num_clips=1,
        num_crops=1,
        resize_short=SHORT_SIDE,
        crop_size=CROP,
        input_size=CROP,
    )
    return save_weights(path, build_model(config).state_dict(), WeightsInfo(config, None, prep))


def peak_mib() -> float:
    """This process's peak RSS so far (VmHWM), in MiB."""
    with open("/proc/self/status", encoding="utf-8") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def streaming(model, video: str, batch_size: int) -> tuple[np.ndarray, float, dict]:
    """Features from ``SnippetExtractor.video`` (decoded in this process); its wall time."""
    from i3d.features import SnippetExtractor, SnippetProtocol

    extractor = SnippetExtractor(model, SnippetProtocol(WINDOW, STRIDE), batch_size)  # probes once
    before = peak_mib()
    start = time.perf_counter()
    result = extractor.video(video)
    wall = time.perf_counter() - start
    if not result.ok:
        sys.exit(f"streaming extraction failed: {result.error}")
    return result.features, wall, {"before_mib": before}


def naive(model, video: str, batch_size: int) -> tuple[np.ndarray, float, dict]:
    """Every frame decoded into one array, all resized, cropped and normalised, then windows
    cut by hand and run in batches; the wall time and that of each phase."""
    import av
    import torch

    from i3d.data import transforms as T
    from i3d.features.extract import default_endpoint

    prep = model.weights_info.preprocessing
    endpoint = default_endpoint(model)
    device = next(model.parameters()).device
    with torch.no_grad():  # warm up, as the extractor's probe does
        probe = torch.zeros(1, 3, WINDOW, prep.input_size, prep.input_size, device=device)
        model.endpoints(probe, [endpoint])
    before = peak_mib()
    start = time.perf_counter()
    with av.open(video) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # as i3d's PyAV reader decodes
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    decoded = time.perf_counter()
    resized = T.resize_short(torch.from_numpy(frames), prep.resize_short, prep.interpolation)
    x = T.center_crop(resized, prep.input_size).to(torch.float32)  # (N, h, w, 3)
    low, high = prep.value_range
    if (low, high) != (0.0, 255.0):
        x.mul_((high - low) / 255.0).add_(low)
    x.sub_(torch.tensor(prep.mean)).div_(torch.tensor(prep.std))
    prepared = time.perf_counter()
    starts = list(range(0, len(x) - WINDOW + 1, STRIDE))
    parts = []
    with torch.no_grad():
        for i in range(0, len(starts), batch_size):
            clips = torch.stack([x[s : s + WINDOW] for s in starts[i : i + batch_size]])
            clips = clips.permute(0, 4, 1, 2, 3).to(device)
            maps = model.endpoints(clips, [endpoint])[endpoint]
            parts.append(maps.flatten(2).mean(dim=2).cpu())
    end = time.perf_counter()
    phases = {
        "before_mib": before,
        "decode_s": decoded - start,
        "prepare_s": prepared - decoded,
        "model_s": end - prepared,
        "resize_identity": bool(resized.data_ptr() == torch.from_numpy(frames).data_ptr()),
    }
    return torch.cat(parts).numpy(), end - start, phases


def child(
    mode: str, video: str, weights: str, out: str, batch_size: int, threads: int, device: str
) -> None:
    """One case in this fresh process: features to ``out``, a JSON report on stdout."""
    import torch

    from i3d.weights.format import load_model

    torch.set_num_threads(threads)
    model = load_model(weights, device)
    run = streaming if mode == "streaming" else naive
    features, wall, extra = run(model, video, batch_size)
    report = {"snippets": len(features), "wall_s": wall, "peak_mib": peak_mib(), **extra}
    np.save(out, features)
    print(json.dumps(report))


def available_gib() -> float:
    with open("/proc/meminfo", encoding="utf-8") as info:
        kib = next(int(line.split()[1]) for line in info if line.startswith("MemAvailable:"))
    return kib / 2**20


def naive_need_gib(seconds: int) -> float:
    """Rough peak of the naive case: decoded frames twice (the list np.stack copies, whose
    memory the allocator may keep), their float32 crops, ~1 GiB for torch, model, batches."""
    frames = seconds * FPS
    raw = frames * WIDTH * HEIGHT * 3
    crops = frames * CROP * CROP * 3 * 4
    return (2 * raw + crops + 2**30) / 2**30


def length(seconds: int) -> str:
    return f"{seconds // 60} min" if seconds % 60 == 0 else f"{seconds} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=600, help="Long video, seconds at 25 fps.")
    parser.add_argument("--short", type=int, default=60, help="Short video, seconds at 25 fps.")
    parser.add_argument("--batch-size", type=int, default=8, help="Snippets per forward pass.")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in cases.")
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    parser.add_argument("--videos", type=Path, help="Keep the videos here (reused if present).")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "VIDEO", "W", "OUT"), help="-")
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.batch_size, args.threads, args.device)
        return
    begin = time.perf_counter()
    print(f"CPU: {cpu_model()}; torch threads {args.threads}; model on {args.device}")
    print(
        f"protocol: SnippetProtocol({WINDOW}, {STRIDE}), short side {SHORT_SIDE}, centre crop "
        f"{CROP}, batch {args.batch_size}; model: random ResNet3d-18 I3D, base_channels 8 "
        f"(small on purpose, so the pipeline is a sizeable share of the time)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.videos or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        weights = tiny_weights(Path(tmp) / "resnet18_w8.safetensors")
        videos = {}
        for seconds in (args.short, args.seconds):
            video = folder / f"{seconds}s_{WIDTH}x{HEIGHT}.mp4"
            if not video.is_file():
                start = time.perf_counter()
                make_video(video, seconds, FPS)
                print(f"generated {video.name} in {time.perf_counter() - start:.0f} s")
            videos[seconds] = video
        results: dict[tuple[str, int], dict] = {}
        features: dict[tuple[str, int], np.ndarray] = {}
        for seconds, video in videos.items():
            for mode in ("streaming", "naive"):
                if mode == "naive" and naive_need_gib(seconds) > 0.9 * available_gib():
                    print(
                        f"naive {length(seconds)} skipped: needs ~{naive_need_gib(seconds):.1f} "
                        f"GiB, {available_gib():.1f} GiB available"
                    )
                    continue
                out = Path(tmp) / f"{mode}_{seconds}.npy"
                command = [sys.executable, __file__, "--child", mode, str(video), str(weights)]
                command += [str(out), f"--batch-size={args.batch_size}"]
                command += [f"--threads={args.threads}", f"--device={args.device}"]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    sys.exit(f"{mode} {length(seconds)} failed:\n{done.stderr[-3000:]}")
                results[mode, seconds] = json.loads(done.stdout.strip().splitlines()[-1])
                features[mode, seconds] = np.load(out)
    print()
    print(
        f"{'case':<10} {'video':>7} {'snippets':>9} {'snippets/s':>11} {'peak MiB':>9} "
        f"{'at start':>9}"
    )
    for (mode, seconds), r in results.items():
        print(
            f"{mode:<10} {length(seconds):>7} {r['snippets']:>9} "
            f"{r['snippets'] / r['wall_s']:>11.2f} {r['peak_mib']:>9.0f} {r['before_mib']:>9.0f}"
        )
    print("(at start: peak RSS after imports, model load and warm-up, before the video is read)")
    print()
    for seconds in videos:
        n = results.get(("naive", seconds))
        if n is not None:
            print(
                f"naive {length(seconds)} phases: decode {n['decode_s']:.1f} s, resize+crop+"
                f"normalise {n['prepare_s']:.1f} s, model {n['model_s']:.1f} s "
                f"(model alone {n['snippets'] / n['model_s']:.2f} snippets/s)"
            )
    if any(r.get("resize_identity") for r in results.values()):
        print(
            f"(a {WIDTH}x{HEIGHT} frame already has short side {SHORT_SIDE}: the resize is a no-op)"
        )
    for seconds in videos:
        s, n = results.get(("streaming", seconds)), results.get(("naive", seconds))
        if s is None or n is None:
            continue
        speed = (s["snippets"] / s["wall_s"]) / (n["snippets"] / n["wall_s"])
        a, b = features["streaming", seconds], features["naive", seconds]
        diff = float(np.abs(a - b).max()) if a.shape == b.shape else float("nan")
        print(
            f"{length(seconds)}: streaming/naive speed x{speed:.2f}, peak memory "
            f"x{s['peak_mib'] / n['peak_mib']:.3f}; features {a.shape} vs {b.shape}, max abs "
            f"diff {diff:.3g} (max |feature| {float(np.abs(b).max()):.3g})"
        )
    for mode in ("streaming", "naive"):
        short, long = results.get((mode, args.short)), results.get((mode, args.seconds))
        if short is not None and long is not None:
            print(
                f"{mode} peak memory {length(args.seconds)} / {length(args.short)}: "
                f"x{long['peak_mib'] / short['peak_mib']:.2f}"
            )
    print(f"total wall time {time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    main()
