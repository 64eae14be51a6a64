"""Throughput and latency of a runner: warm-up, timed calls, percentiles, peak memory."""

from __future__ import annotations

import resource
import sys
import time

import attrs
import numpy as np
import torch

from i3d.backends.base import BackendError, Runner

DEFAULT_CLIP_LEN = 32
DEFAULT_SIZE = 224


@attrs.frozen
class BenchResult:
    """One benchmark: what ran, how fast (clips/s, latency percentiles in ms), peak memory."""

    backend: str
    device: str
    precision: str
    input_shape: tuple[int, ...]
    iters: int
    clips_per_s: float
    latency_ms_p50: float
    latency_ms_p90: float
    latency_ms_p99: float
    peak_memory_mb: float
    memory_kind: str

    def to_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


def compiled_input_shape(runner: Runner) -> tuple[int | None, ...] | None:
    """The input a compiled .onnx/.om model was built for (None per symbolic dim), else None."""
    shape = getattr(runner, "input_shape", None)  # onnx / om runners of a compiled file
    return None if shape is None else tuple(None if d is None else int(d) for d in shape)


def bench_input_shape(
    compiled: tuple[int | None, ...] | None,
    batch_size: int | None = None,
    clip_len: int | None = None,
    size: int | None = None,
    source: str = "the model",
) -> tuple[int, ...]:
    """Shape of the random benchmark batch: (B, C, T, S, S), or (B, V, C, T, H, W).

    Options that are given win; otherwise a compiled model's static dims (batch, views,
    channels, T, H, W) are used, then batch 1 and 32x224x224 clips. An option that
    contradicts a static dim is an error, since the compiled model cannot run it.
    """
    if compiled is None:
        side = size or DEFAULT_SIZE
        return (batch_size or 1, 3, clip_len or DEFAULT_CLIP_LEN, side, side)
    if len(compiled) not in (5, 6):
        raise BackendError(
            f"{source} takes input of rank {len(compiled)}; expected (B, C, T, H, W) or "
            "(B, V, C, T, H, W)"
        )
    channels, frames, height, width = compiled[-4:]
    for flag, value, dims in (
        ("--clip-len", clip_len, (frames,)),
        ("--size", size, (height, width)),
    ):
        if value is not None and any(d is not None and d != value for d in dims):
            fixed = "×".join("?" if d is None else str(d) for d in (frames, height, width))
            raise BackendError(
                f"{source} was compiled for clips of T×H×W = {fixed}; {flag} {value} does "
                f"not match (leave {flag} out to use the model's own shape)"
            )
    views = (compiled[1] or 1,) if len(compiled) == 6 else ()
    return (
        batch_size or compiled[0] or 1,
        *views,
        channels or 3,
        clip_len or frames or DEFAULT_CLIP_LEN,
        size or height or DEFAULT_SIZE,
        size or width or DEFAULT_SIZE,
    )


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB


#: backends whose device memory goes through torch's allocator (an OM or ONNX session's does not)
TORCH_ALLOCATOR_BACKENDS = frozenset({"torch", "npu"})


def _device_module(backend: str, device: str) -> object | None:
    if backend not in TORCH_ALLOCATOR_BACKENDS:
        return None
    kind = device.split(":")[0]
    module = getattr(torch, kind, None) if kind in {"cuda", "npu"} else None
    return module if module is not None and hasattr(module, "max_memory_allocated") else None


def benchmark(runner: Runner, batch: torch.Tensor, iters: int = 10, warmup: int = 2) -> BenchResult:
    """Time ``runner.predict(batch)`` ``iters`` times after ``warmup`` untimed calls.

    Memory is torch's peak allocation on cuda/npu for the torch and npu backends, else the
    process's peak RSS (which includes everything the process loaded before, e.g. the model
    in other backends): torch's allocator never sees an OM session's memory.
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0, got {iters}, {warmup}")
    device_mod = _device_module(runner.backend, runner.device)
    for _ in range(warmup):
        runner.predict(batch)
    if device_mod is not None:
        device_mod.synchronize()
        device_mod.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        runner.predict(batch)  # returns CPU logits, so device work has finished
        times.append(time.perf_counter() - start)
    if device_mod is not None:
        peak, kind = device_mod.max_memory_allocated() / 2**20, f"{runner.device} max allocated"
    else:
        peak, kind = _peak_rss_mb(), "process peak RSS"
    clips = int(np.prod(batch.shape[:-4]))
    ms = np.asarray(times) * 1e3
    return BenchResult(
        backend=runner.backend,
        device=runner.device,
        precision=runner.precision,
        input_shape=tuple(batch.shape),
        iters=iters,
        clips_per_s=clips * iters / float(np.sum(times)),
        latency_ms_p50=float(np.percentile(ms, 50)),
        latency_ms_p90=float(np.percentile(ms, 90)),
        latency_ms_p99=float(np.percentile(ms, 99)),
        peak_memory_mb=peak,
        memory_kind=kind,
    )
