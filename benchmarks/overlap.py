"""Loader → model hand-off: how long the model waits for data per chunk, against production.

``i3d predict``'s own path runs (:class:`~i3d.inference.Predictor`: DataLoader workers,
uint8 pieces, pinned memory and a one-piece-ahead copy on a side stream for cuda, the
normalisation on the model's device), with the model replaced by one of the same output
shape that costs nothing (``noop``: the pipeline's own ceiling) or a fixed time per chunk
without host CPU (``sleep``: an accelerator a bit slower than the loader; the host sleeps on
the CPU, ``torch.cuda._sleep`` spins the GPU on cuda). Inputs are generated 340×256 H.264
videos (``--seconds`` long) through the K400 10×3 protocol (30 views of 3×32×256×256).

Printed: the CPU model; one worker's production time per chunk (in-process, one thread);
per scenario the model's wait per chunk (the gap between the end of one chunk's model call
and the start of the next: host time on the CPU, CUDA events on the GPU), mean, median and
95th percentile at steady state (the first ``--workers`` + 1 chunks left out), model busy
fraction and clips/s; the bytes per clip through shared memory and to the device, uint8
against float32; and the host time per chunk that normalising used to take on the consumer
(now on the device). ``--device cuda`` also checks that the device normalisation equals the
host's bit for bit.

    python benchmarks/overlap.py [--device cpu|cuda] [--videos 6] [--seconds 10]
                                 [--workers 2] [--batch-size 6]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import cpu_model
from data_pipeline import make_video
from torch import nn

import i3d.inference.predictor as predictor_module
from i3d.data import transforms as T
from i3d.data.datasets import iter_pieces
from i3d.inference import Predictor
from i3d.models import build_model, get_preset
from i3d.weights.format import WeightsInfo, save_weights
from i3d.weights.preprocessing import DEEPMIND_K400, MMACTION_K400

CLASSES = 400


class StandIn(nn.Module):
    """Logits of zeros (N, CLASSES) after ``seconds`` per call (0: none): the model's place."""

    def __init__(self, seconds: float, gpu_cycles_per_s: float | None) -> None:
        super().__init__()
        self.seconds, self.cycles_per_s = seconds, gpu_cycles_per_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.seconds and self.cycles_per_s is not None:
            torch.cuda._sleep(int(self.seconds * self.cycles_per_s))
        elif self.seconds:
            time.sleep(self.seconds)
        return x.new_zeros((len(x), CLASSES), dtype=torch.float32)


class Marks:
    """When each chunk's model call started and ended (host clock, or CUDA events)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.starts: list[Any] = []
        self.ends: list[Any] = []

    def now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def wrap(self, call: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def timed(*args: Any, **kwargs: Any) -> torch.Tensor:
            self.starts.append(self.now())
            out = call(*args, **kwargs)
            self.ends.append(self.now())
            return out

        return timed

    def seconds(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1000 if self.cuda else b - a

    def gaps(self, skip: int) -> list[float]:
        """Idle time before each chunk's call (after the previous call ended)."""
        if self.cuda:
            torch.cuda.synchronize()
        pairs = zip(self.ends[:-1], self.starts[1:], strict=True)
        return [self.seconds(end, start) for end, start in pairs][skip:]

    def busy(self) -> float:
        return sum(self.seconds(a, b) for a, b in zip(self.starts, self.ends, strict=True))


def tiny_weights(path: Path) -> Path:
    """A saved model with the K400 10×3 protocol (its layers are replaced by :class:`StandIn`)."""
    config = get_preset("i3d_r50", depth=18, base_channels=4, num_classes=CLASSES)
    labels = tuple(str(i) for i in range(CLASSES))
    info = WeightsInfo(config, labels, MMACTION_K400)
    return save_weights(path, build_model(config).state_dict(), info)


def production(predictor: Predictor, videos: list[Path]) -> tuple[float, float, int]:
    """(wall, CPU) seconds one worker (one thread) needs per chunk, and chunks per video."""
    walls, cpus, chunks = [], [], 0
    for video in videos[:2]:
        wall, cpu = time.perf_counter(), time.process_time()
        pieces = predictor.pipeline.pieces(video, clips_per_piece=predictor.clips_per_piece)
        chunks = sum(len(piece.views.split(predictor.batch_size)) for piece in pieces)
        walls.append((time.perf_counter() - wall) / chunks)
        cpus.append((time.process_time() - cpu) / chunks)
    return statistics.mean(walls), statistics.mean(cpus), chunks


def gpu_cycles_per_second() -> float:
    """Cycles of ``torch.cuda._sleep`` per second on this GPU, from CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # warm-up
    start.record()
    torch.cuda._sleep(50_000_000)
    end.record()
    torch.cuda.synchronize()
    return 50_000_000 / (start.elapsed_time(end) / 1000)


def scenario(
    predictor: Predictor, videos: list[Path], workers: int, seconds: float, cuda: bool
) -> dict[str, float]:
    """Run the videos through predict's path with a stand-in model taking ``seconds``."""
    runner = predictor.runner
    runner.model = StandIn(seconds, gpu_cycles_per_second() if cuda and seconds else None)
    marks = Marks(cuda)
    original = runner.logits_on_device
    runner.logits_on_device = marks.wrap(original)  # normalisation counts as model work
    waits: list[float] = []
    predictor_module.iter_pieces = functools.partial(waited, waits, iter_pieces)
    try:
        wall = time.perf_counter()
        results = list(predictor.iter_scores(videos, workers))
        wall = time.perf_counter() - wall
    finally:
        runner.logits_on_device = original
        predictor_module.iter_pieces = iter_pieces
    failed = [r for r in results if isinstance(r, str)]
    if failed:
        raise SystemExit(f"a video failed: {failed[0]}")
    gaps = marks.gaps(skip=workers + 1)
    clips = len(videos) * predictor.pipeline.num_views
    return {
        "loader": statistics.mean(waits[workers + 1 :]),
        "mean": statistics.mean(gaps),
        "median": statistics.median(gaps),
        "p95": sorted(gaps)[int(0.95 * (len(gaps) - 1))],
        "busy": marks.busy() / wall,
        "clips_per_s": clips / wall,
        "chunks": len(marks.starts),
    }


def waited(waits: list[float], make: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The items of ``make(*args)``, each one's wait appended to ``waits`` (seconds)."""
    items = iter(make(*args, **kwargs))
    while True:
        start = time.perf_counter()
        item = next(items, None)
        if item is None:
            return
        waits.append(time.perf_counter() - start)
        yield item


def normalise_cost(predictor: Predictor, video: Path, repeats: int = 3) -> float:
    """Host seconds per chunk that the consumer spent normalising before the model ran."""
    piece = next(iter(predictor.pipeline.pieces(video, clips_per_piece=predictor.clips_per_piece)))
    chunk = piece.views[: predictor.batch_size]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.pipeline.normalize(chunk)
        best = min(best, time.perf_counter() - start)
    return best


def device_matches_host(device: str) -> str:
    """Whether normalising on ``device`` gives the host's float32 bytes, per protocol."""
    views = torch.randint(0, 256, (6, 3, 32, 64, 64), dtype=torch.uint8)
    words = []
    for name, p in (("mmaction", MMACTION_K400), ("deepmind", DEEPMIND_K400)):
        host = T.normalize(views, p.mean, p.std, p.value_range)
        there = T.normalize(views.to(device), p.mean, p.std, p.value_range).cpu()
        same = torch.equal(host, there)
        diff = float((host - there).abs().max())
        words.append(f"{name} {'bit-identical' if same else f'max |diff| {diff:.3g}'}")
    return ", ".join(words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--videos", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=6, help="views per model call")
    parser.add_argument("--slower", type=float, default=1.25,
                        help="sleep model: its time per chunk over the loader's")  # fmt: skip
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    torch.set_num_threads(1)
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; device {args.device}")
    if cuda:
        print(f"GPU: {torch.cuda.get_device_name(args.device)}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        videos = [
            make_video(folder / f"v{i}.mp4", 340, 256, args.seconds, "h264")
            for i in range(args.videos)
        ]
        weights = tiny_weights(folder / "standin.safetensors")
        predictor = Predictor(weights, batch_size=args.batch_size, device=args.device)
        assert predictor.feed is not None
        wall, cpu, chunks = production(predictor, videos)
        piece = next(iter(predictor.pipeline.pieces(videos[0], clips_per_piece=1)))
        clip_bytes = piece.views[0].nbytes
        print(
            f"K400 10x3 on 340x256 H.264 {args.seconds} s: {predictor.pipeline.num_views} views "
            f"per video, {args.batch_size} per chunk, {chunks} chunks per video"
        )
        print(
            f"production, one worker: {wall * 1000:.1f} ms wall, {cpu * 1000:.1f} ms CPU per "
            f"chunk; {args.workers} workers: one chunk every {wall / args.workers * 1000:.1f} ms"
        )
        print(
            f"bytes per clip (3x32x256x256) through shared memory and to the device: uint8 "
            f"{clip_bytes / 2**20:.2f} MiB, float32 {4 * clip_bytes / 2**20:.2f} MiB (4x); "
            f"pinned copies with a side stream: {predictor.feed.overlaps}"
        )
        print(
            f"normalising one chunk on the host (one thread), which the consumer did before "
            f"every float32 copy and a cuda/npu device now does: "
            f"{normalise_cost(predictor, videos[0]) * 1000:.1f} ms"
        )
        if cuda:
            print(f"device normalisation vs host: {device_matches_host(args.device)}")
        model_time = args.slower * wall / args.workers
        print(f"\n{'model':<24}{'loader wait':>12}{'model idle':>12}{'median':>9}{'p95':>9}"
              f"{'busy':>7}{'clips/s':>9}   (per chunk, steady state)")  # fmt: skip
        models = (("noop", 0.0), (f"sleep {model_time * 1000:.0f} ms/chunk", model_time))
        for name, seconds in models:
            row = scenario(predictor, videos, args.workers, seconds, cuda)
            print(
                f"{name:<24}{row['loader'] * 1000:>9.1f} ms{row['mean'] * 1000:>9.1f} ms"
                f"{row['median'] * 1000:>6.1f} ms{row['p95'] * 1000:>6.1f} ms"
                f"{row['busy']:>7.0%}{row['clips_per_s']:>9.1f}"
            )
        print(
            "loader wait: the consumer blocked on the loader for the next piece; model idle: "
            "from the end of one chunk's model call (normalisation included) to the start of "
            "the next. On the CPU the 'device' is the host: normalising and freeing the float "
            "input are host work there."
        )


if __name__ == "__main__":
    main()
