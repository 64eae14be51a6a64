"""Which rank runs which input: a deterministic split balanced by each input's cost.

Every rank computes the same split from the same costs (no communication): the greedy
longest-processing-time rule gives each input, costliest first (ties: lower index first), to
the rank with the least cost so far (ties: fewer inputs, then lower rank). One long video
therefore lands on a rank of its own instead of stalling a peer that also got a fair share of
the short ones, and with fewer inputs than ranks the spare ranks get empty lists.

The cost of a video is its frame count, read from the container header without decoding
(:func:`video_cost`): decoding grows with it, and so does the model under the every-frame
protocol. Under a fixed-views protocol (mmaction's 10 clips × 3 crops) the model's share is
the same for every video; add a per-video constant to the frame counts for that.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Sequence
from pathlib import Path

from i3d.data.decode import IMAGE_SUFFIXES


def balanced_shards(costs: Sequence[float], world_size: int) -> list[list[int]]:
    """Indices of ``costs`` for each of ``world_size`` ranks, each list ascending.

    Deterministic for given costs (ties broken by index, then rank); negative or
    non-finite costs are refused so every rank agrees on the order.
    """
    if world_size < 1:
        raise ValueError(f"world size must be at least 1, got {world_size}")
    for index, cost in enumerate(costs):
        if not (cost >= 0 and cost != float("inf")):  # also catches NaN
            raise ValueError(f"cost of input {index} must be finite and >= 0, got {cost!r}")
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    heap = [(0.0, 0, rank) for rank in range(world_size)]  # (load, count, rank)
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for index in order:
        load, count, rank = heapq.heappop(heap)
        shards[rank].append(index)
        heapq.heappush(heap, (load + costs[index], count + 1, rank))
    return [sorted(shard) for shard in shards]


def shard_of(costs: Sequence[float], rank: int, world_size: int) -> list[int]:
    """The ascending input indices rank ``rank`` runs (see :func:`balanced_shards`)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    return balanced_shards(costs, world_size)[rank]


def video_cost(path: str | os.PathLike[str]) -> int:
    """The frame count of a video file or frame folder, without decoding a frame (>= 1).

    A frame folder counts its image files. A video file gives the frame count its header
    records, else its duration × frame rate, else (a header with neither) a rough count from
    the file size. An input that cannot be opened costs 1: it fails fast when it is run.
    """
    path = Path(path)
    if path.is_dir():
        try:
            with os.scandir(path) as entries:
                count = sum(
                    1
                    for e in entries
                    if e.name.lower().endswith(IMAGE_SUFFIXES) and not e.name.startswith(".")
                )
        except OSError:
            return 1
        return max(1, count)
    return max(1, _header_frames(path))


def _header_frames(path: Path) -> int:
    import av

    from i3d.data.decode import open_container

    try:
        with open_container(path) as container:
            if not container.streams.video:
                return 1
            stream = container.streams.video[0]
            if stream.frames:
                return int(stream.frames)
            rate = stream.average_rate or stream.guessed_rate
            if rate and stream.duration and stream.time_base:
                return round(float(stream.duration * stream.time_base * rate))
            if rate and container.duration:  # in microseconds
                return round(container.duration / 1_000_000 * float(rate))
            pixels = int(stream.codec_context.width or 0) * int(stream.codec_context.height or 0)
            return path.stat().st_size // max(1, pixels // 10)  # about 0.8 bit per pixel
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError):
        return 1
