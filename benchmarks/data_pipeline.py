"""The data pipeline at real resolutions: CPU and wall seconds per video against decode-all + cv2.

Inputs are generated in this run (textured, moving content, 25 fps, GOP 64): 340×256,
640×360, 1280×720 and 1920×1080, each as H.264 and VP9, ``--seconds`` long (10), plus one
``--long`` (60 s) 640×360 H.264. Protocols, each the project's own code path:

- ``k400-10x3``: mmaction's I3D test (10 clips × 32 frames × interval 2, short side 256,
  ThreeCrop 256): 30 views;
- ``om-10x1``: the seeds' offline-inference input (10 clips, centre crop 256): 10 views;
- ``snippet``: ``actionformer-thumos14`` frames (340×256, centre 224, 16-frame windows every
  4 frames), batches of 16 windows, no model.

The baseline is mmaction2's approach done with the same libraries: decode every frame with
PyAV to rgb24, ``cv2.resize`` the frames the views use, cut the crops, stack the views. Both
get the same decoder threads (torch's thread count: 1 by default, so CPU seconds are the
cost on one core). Outputs are compared byte for byte. Per protocol the table ends with what
one core sustains (videos/s) and the model clips/s it could feed, and how many such cores
feed 600 clips/s (about one H200 running NL-R50 32×224²). A second table times decoding
alone (every frame to rgb24) with PyAV, decord and torchcodec where installed, with whether
their frames are identical to PyAV's.

    python benchmarks/data_pipeline.py [--seconds 10] [--long 60] [--repeats 2] [--threads 1]
                                       [--protocols k400-10x3,om-10x1,snippet] [--videos DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av
import cv2
import numpy as np
import torch
from common import cpu_model

from i3d.data import transforms as T
from i3d.data.decode import open_video
from i3d.data.pipeline import build_pipeline
from i3d.features.frames import frame_transform
from i3d.features.presets import get_preset
from i3d.features.snippets import snippet_batches, video_timeline
from i3d.weights.preprocessing import DEEPMIND_K400, MMACTION_K400

SIZES = ((340, 256), (640, 360), (1280, 720), (1920, 1080))
CODECS = {"h264": ("libx264", "mp4"), "vp9": ("libvpx-vp9", "webm")}
TARGET_CLIPS_PER_S = 600


def make_video(path: Path, width: int, height: int, seconds: int, codec: str) -> Path:
    """Moving texture with a bouncing block: compresses and decodes like camera footage."""
    rng = np.random.default_rng(0)
    texture = cv2.resize(
        rng.integers(0, 256, (height // 8 + 8, width // 8 + 8, 3), dtype=np.uint8),
        (width + 64, height + 64),
        interpolation=cv2.INTER_CUBIC,
    )
    encoder, _ = CODECS[codec]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(encoder, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.gop_size = 64
        if codec == "h264":
            stream.options = {"crf": "23", "preset": "veryfast"}
        else:
            stream.options = {"crf": "32", "b": "0", "deadline": "realtime", "cpu-used": "8"}
        for t in range(seconds * 25):
            dx, dy = (3 * t) % 64, (2 * t) % 64
            frame = texture[dy : dy + height, dx : dx + width].copy()
            y, x = (t * 7) % (height - height // 5), (t * 11) % (width - width // 5)
            frame[y : y + height // 5, x : x + width // 5] = (230, 40, 40)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def decode_all(path: Path) -> list[np.ndarray]:
    """Every frame as rgb24, decoded in order (the baseline's first step)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if torch.get_num_threads() > 1:
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = torch.get_num_threads()
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)]


def baseline_clips(path: Path, pipe, boxes_of: Callable) -> torch.Tensor:
    """Decode everything, cv2-resize the sampled frames, crop, stack views crop-major."""
    frames = decode_all(path)
    with open_video(path) as reader:
        clips = pipe.clip_indices(reader, None)
    h, w = frames[0].shape[:2]
    size = T.rescale_size(w, h, pipe.preprocessing.resize_short)
    resized = {
        i: cv2.resize(frames[i], size, interpolation=cv2.INTER_LINEAR) for i in np.unique(clips)
    }
    views = [
        np.stack([resized[i][y1:y2, x1:x2] for i in clip])
        for x1, y1, x2, y2 in boxes_of(*size)
        for clip in clips
    ]
    return torch.from_numpy(np.stack(views).transpose(0, 4, 1, 2, 3))


def snippet_setup():
    preset = get_preset("actionformer-thumos14")
    return preset.protocol, frame_transform(preset.protocol, DEEPMIND_K400)


def ours_snippets(path: Path) -> list[torch.Tensor]:
    protocol, transform = snippet_setup()
    with open_video(path) as reader:
        timeline = video_timeline(reader, protocol.fps)
        return [b.views for b in snippet_batches(reader, timeline, protocol, transform, 16)]


def baseline_snippets(path: Path) -> list[torch.Tensor]:
    """Decode everything, cv2-resize to 340×256, centre-crop 224, cut 16-frame windows."""
    protocol = get_preset("actionformer-thumos14").protocol
    crops = []
    for frame in decode_all(path):
        small = cv2.resize(frame, (340, 256), interpolation=cv2.INTER_LINEAR)
        crops.append(small[16:240, 58:282])
    starts = range(0, len(crops) - protocol.window + 1, protocol.stride)
    windows = [np.stack(crops[s : s + protocol.window]) for s in starts]
    return [  # (snippets, C, window, H, W), as the model takes them
        torch.from_numpy(np.stack(windows[i : i + 16]).transpose(0, 4, 1, 2, 3))
        for i in range(0, len(windows), 16)
    ]


def protocols() -> dict[str, tuple[Callable, Callable, int]]:
    """name -> (i3d, baseline, model clips per video of 250 frames)."""
    k400 = build_pipeline(MMACTION_K400, "test")
    om = build_pipeline(MMACTION_K400, "test", num_crops=1, crop_size=256)
    return {
        "k400-10x3": (
            k400.frames,
            lambda p: baseline_clips(p, k400, lambda w, h: T.three_boxes(w, h, 256)),
            30,
        ),
        "om-10x1": (
            om.frames,
            lambda p: baseline_clips(p, om, lambda w, h: [T.center_box(w, h, 256)]),
            10,
        ),
        "snippet": (ours_snippets, baseline_snippets, 0),
    }


def timed(fn: Callable, path: Path, repeats: int) -> tuple[float, float, object]:
    """(best CPU s over all threads, best wall s, last output)."""
    cpu = wall = float("inf")
    out = None
    for _ in range(repeats):
        out = None
        c, w = time.process_time(), time.perf_counter()
        out = fn(path)
        cpu, wall = min(cpu, time.process_time() - c), min(wall, time.perf_counter() - w)
    return cpu, wall, out


def same(a: object, b: object) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b)


def decoder_rows(videos: list[tuple[str, Path]], repeats: int) -> None:
    print(
        "\ndecode every frame to RGB (no resize), CPU s per video; identical = same bytes as PyAV"
    )
    readers: dict[str, Callable[[Path], list[np.ndarray]]] = {"pyav": decode_all}
    try:
        import decord

        def decord_frames(p: Path) -> list[np.ndarray]:
            reader = decord.VideoReader(str(p), num_threads=torch.get_num_threads())
            return list(reader.get_batch(list(range(len(reader)))).asnumpy())

        readers["decord"] = decord_frames
    except ImportError:
        print("  decord: not installed")
    try:
        from torchcodec.decoders import VideoDecoder

        def torchcodec_frames(p: Path) -> list[np.ndarray]:
            decoder = VideoDecoder(str(p), dimension_order="NHWC", num_ffmpeg_threads=1)
            return list(decoder.get_frames_in_range(0, len(decoder)).data.numpy())

        readers["torchcodec"] = torchcodec_frames
    except Exception as exc:  # its PyPI wheel needs FFmpeg libraries and a matching torch build
        print(f"  torchcodec: unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
    print(f"  {'video':<16}" + "".join(f"{n:>22}" for n in readers))
    for name, path in videos:
        ref = None
        cells = []
        for fn in readers.values():
            try:
                cpu, _, frames = timed(fn, path, repeats)
            except Exception as exc:
                cells.append(f"{'failed: ' + type(exc).__name__:>22}")
                continue
            if ref is None:
                ref = frames
            ident = len(frames) == len(ref) and all(
                np.array_equal(x, y) for x, y in zip(frames, ref, strict=True)
            )
            cells.append(f"{cpu:>9.3f} s {'identical' if ident else 'DIFFERENT':>10}")
        print(f"  {name:<16}" + "".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--long", type=int, default=60, help="seconds of the long video (0: none)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch, OpenCV and decoder threads")
    parser.add_argument("--videos", type=Path, help="keep the generated videos here (reused)")
    parser.add_argument(
        "--protocols", default="k400-10x3,om-10x1,snippet", help="comma-separated subset"
    )
    parser.add_argument("--no-decoders", action="store_true", help="skip the decoder table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    print(
        f"CPU: {cpu_model()}; threads {args.threads}; "
        f"OpenCV {cv2.__version__}, PyAV {av.__version__}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.videos or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        videos = []
        for w, h in SIZES:
            for codec, (_, suffix) in CODECS.items():
                name = f"{w}x{h} {codec}"
                path = folder / f"{w}x{h}_{args.seconds}s_{codec}.{suffix}"
                if not path.exists():
                    make_video(path, w, h, args.seconds, codec)
                videos.append((name, path))
        if args.long:
            path = folder / f"640x360_{args.long}s_h264.mp4"
            if not path.exists():
                make_video(path, 640, 360, args.long, "h264")
            videos.append((f"640x360 h264 {args.long}s", path))
        chosen = args.protocols.split(",")
        for proto, (ours, base, clips) in protocols().items():
            if proto not in chosen:
                continue
            print(f"\n{proto}: seconds per video, best of {args.repeats} (CPU = all threads)")
            print(
                f"  {'video':<18}{'i3d cpu':>9}{'wall':>8}{'base cpu':>10}{'wall':>8}"
                f"{'speed-up':>11}  bytes"
            )
            worst = 0.0
            for name, path in videos:
                c1, w1, a = timed(ours, path, args.repeats)
                c2, w2, b = timed(base, path, args.repeats)
                ok = "identical" if same(a, b) else "DIFFERENT"
                worst = max(worst, c1 / c2)
                per_core = 1 / c1 * args.threads
                feed = f"  {per_core:.2f} videos/s/core" + (
                    f" = {per_core * clips:.0f} clips/s/core, "
                    f"{TARGET_CLIPS_PER_S / (per_core * clips):.1f} cores for {TARGET_CLIPS_PER_S}"
                    if clips
                    else ""
                )
                print(
                    f"  {name:<18}{c1:>9.3f}{w1:>8.3f}{c2:>10.3f}{w2:>8.3f}"
                    f"{c2 / c1:>10.2f}x  {ok}{feed}"
                )
            print(f"  worst i3d/baseline CPU ratio: {worst:.2f} (at most 1 is the target)")
        if not args.no_decoders:
            decoder_rows(videos[: len(SIZES) * len(CODECS)], args.repeats)


if __name__ == "__main__":
    main()
