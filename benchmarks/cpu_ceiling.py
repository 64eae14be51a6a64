"""CPU inference against the hardware limit: clips/s, and the fraction of peak FLOP/s reached.

Usage: python benchmarks/cpu_ceiling.py [--preset i3d_r50_nl_dot_product] [--clip-len 32]
       [--size 224] [--views 30] [--rounds 3] [--threads N] [--only LABEL ...] [--json OUT]
       [--no-profile]

The model's FLOPs at the input are counted (torch's FlopCounterMode, a multiply-add is 2).
One core's peak is measured with a short GEMM kernel (torch.mm, N=2048, one thread, CPU
time, best of 5 before and 5 after the timings) for each precision the CPU has units for
(bf16 only with avx512_bf16 or AMX: detected, not assumed; a precision without units is
skipped, as openvino refuses it). Every configuration runs the same seeded full-size model,
timed round-robin (each round times every configuration once) on one clip and on one video
of ``--views`` clips (all views in one call, as ``i3d predict --batch-size 30`` hands them
over). Reported: median clips/s; the fraction of peak, FLOPs per CPU-second (all the
process's threads: time other jobs take is not counted, spinning threads are) over one
core's peak; the video's clips/s as ratios to torch fp32 eager and to the best configuration
listed before it; logit agreement with torch fp32 on natural frames (random weights, so the
logits, not the classes, are what is compared). How busy the machine was with other jobs
during the timings is measured (/proc/stat's busy time less this process's CPU time), not
assumed. Each openvino precision is then profiled (its per-layer counters, one clip): the
share of time in convolutions and matmuls against the rest, and the FLOP/s the GEMM-like
layers reach in their own time, which says what keeps the whole model from the peak.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import cpu_model, make_video

from i3d.backends import BackendError, get_backend, list_backends, load_runner
from i3d.backends.check_input import natural_clips
from i3d.export import export_onnx
from i3d.models import build_model, get_preset
from i3d.utils.files import atomic_path
from i3d.weights.format import WeightsInfo
from i3d.weights.preprocessing import Preprocessing
from i3d.weights.stats import count_flops

#: (label, backend, precision, options); the first is the baseline
CONFIGS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("torch fp32 eager", "torch", "fp32", {}),
    ("torch fp32 fuse_bn+channels_last", "torch", "fp32", {"fuse_bn": True, "channels_last": True}),
    (
        "torch bf16 cast+fuse_bn+channels_last",
        "torch",
        "bf16",
        {"autocast": False, "fuse_bn": True, "channels_last": True},
    ),
    ("onnxruntime fp32", "onnx", "fp32", {}),
    ("openvino fp32 latency mode", "openvino", "fp32", {"cache": True, "mode": "latency"}),
    ("openvino fp32", "openvino", "fp32", {"cache": True}),  # auto: a video in throughput mode
    ("openvino bf16", "openvino", "bf16", {"cache": True}),
    ("openvino int8 (NNCF)", "openvino", "int8", {}),  # calibrated on generated videos
]
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            line = next((s for s in info if s.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def cpu_mhz() -> float | None:
    """The mean current clock of /proc/cpuinfo's cores, in MHz (None where unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            values = [float(s.split(":")[1]) for s in info if s.startswith("cpu MHz")]
    except (OSError, ValueError):
        return None
    return statistics.mean(values) if values else None


def gemm_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """One core's peak: best FLOP per CPU-second of an N×N×N matmul in ``dtype`` on one
    thread (CPU time, so other jobs on the machine do not lower it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        torch.mm(a, b)  # warm-up: packing
        best = float("inf")
        for _ in range(repeats):
            start = time.thread_time()
            torch.mm(a, b)
            best = min(best, time.thread_time() - start)
    finally:
        torch.set_num_threads(threads)
    return 2 * size**3 / best


def busy_jiffies() -> tuple[float, float] | None:
    """(busy, total) CPU time of the whole machine so far, in seconds (/proc/stat; None
    where unreadable): the baseline to tell other jobs' load from this process's."""
    try:
        with open("/proc/stat", encoding="utf-8") as stat:
            fields = [float(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return (sum(fields) - idle) / hz, sum(fields) / hz


def other_load(start: tuple[float, float] | None, own_cpu_s: float) -> float | None:
    """The share of the machine's CPU time since ``start`` that other processes used
    (0: idle apart from this benchmark), given this process's CPU seconds since then."""
    end = busy_jiffies()
    if start is None or end is None or end[1] <= start[1]:
        return None
    busy = end[0] - start[0]
    return max(0.0, busy - own_cpu_s) / (end[1] - start[1])


def conv_flops(ir: Any) -> dict[str, tuple[float, list[int]]]:
    """FLOPs (a multiply-add is 2) and weight shape of each convolution of an OpenVINO
    model, by node name, from its static shapes."""
    found = {}
    for op in ir.get_ops():
        if op.get_type_name() != "Convolution":
            continue
        weights = list(op.input(1).get_partial_shape().to_shape())
        count = 2.0 * math.prod(op.get_output_shape(0)) * math.prod(weights[1:])
        found[op.get_friendly_name()] = (count, weights)
    return found


def openvino_profile(runner: Any, clip: torch.Tensor, precision: str) -> dict[str, Any]:
    """Where one clip's time goes through openvino at ``precision`` (its per-layer
    counters, latency mode): milliseconds per kind of layer (``gemm``: convolutions and
    matmuls, with what the plugin fused into them), and the slowest layer with its FLOPs."""
    from i3d.backends.openvino_backend import compile_config

    ir = runner.source_model(tuple(clip.shape[1:]))
    config = {**compile_config(precision, "latency", None), "PERF_COUNT": "YES"}
    compiled = runner.core.compile_model(ir, "CPU", config)
    request = compiled.create_infer_request()
    request.infer([clip.numpy()])  # warm-up
    request.infer([clip.numpy()])
    spent: dict[str, float] = {}
    slowest = (0.0, "")
    for layer in request.profiling_info:
        if layer.status != layer.Status.EXECUTED:
            continue
        kind, ms = layer.node_type, layer.real_time.total_seconds() * 1e3
        if kind in ("Convolution", "GroupConvolution", "MatMul", "FullyConnected"):
            kind = "gemm"
        spent[kind] = spent.get(kind, 0.0) + ms
        slowest = max(slowest, (ms, layer.node_name))
    convs = conv_flops(ir)
    count, weights = convs.get(slowest[1], (0.0, []))
    return {
        "ms": spent,
        "slowest": {"ms": slowest[0], "flops": count, "weights": weights},
        "conv_flops": sum(c for c, _ in convs.values()),
    }


def rate_text(count: float, ms: float, threads: int, peak: float, of: str) -> str:
    """``count`` FLOPs in ``ms`` on ``threads`` threads, per thread and as a share of the
    ``of`` precision's one-core ``peak``."""
    per_thread = count / (ms / 1e3) / threads
    return f"{per_thread / 1e9:.0f} GFLOP/s a thread ({per_thread / peak:.0%} of the {of} peak)"


def peaks(flags: set[str]) -> dict[str, float | None]:
    """Measured one-core peak FLOP/s per precision; None where the CPU has no units for it."""
    has_bf16 = any(flag in flags for flag in BF16_FLAGS)
    return {
        "fp32": gemm_peak(torch.float32),
        "bf16": gemm_peak(torch.bfloat16) if has_bf16 else None,
    }


def usable(
    configs: list[tuple], only: list[str] | None, peak: dict[str, float | None]
) -> tuple[list[tuple], list[str]]:
    """The configurations that can run here, and why each other one cannot (a precision
    without CPU units only emulated, in torch, is skipped as openvino refuses it)."""
    installed = set(list_backends())
    keep, skipped = [], []
    for config in configs:
        label, backend, precision, _ = config
        if only and label not in only and config is not configs[0]:
            continue
        if precision in peak and peak[precision] is None:
            skipped.append(f"{label}: this CPU has no {precision} units")
            continue
        info = get_backend(backend).is_available() if backend in installed else None
        if info is None or not info.ok:
            skipped.append(f"{label}: {info.reason if info else 'not installed'}")
        else:
            keep.append(config)
    return keep, skipped


def make_runner(model: torch.nn.Module, config: tuple, x: torch.Tensor, tmp: Path) -> Any:
    """A runner for ``config``; onnx gets a verified export of ``model`` for ``x``'s clips."""
    _, backend, precision, options = config
    if backend == "onnx":
        path = tmp / "model.onnx"
        export_onnx(model, path, clip_len=x.shape[-3], size=x.shape[-1], batch="dynamic")
        return load_runner(path, backend="onnx", batch_size=8, **options)
    batch = 8 if backend == "torch" else None  # openvino: a whole video as async requests
    if precision == "int8":
        options = {**options, "calibration": calibration_list(model, x, tmp)}
    return load_runner(model, backend=backend, precision=precision, batch_size=batch, **options)


def calibration_list(model: torch.nn.Module, x: torch.Tensor, tmp: Path) -> Path:
    """Two generated videos listed for int8 calibration, and a centre-crop test protocol on
    ``model`` that cuts them into clips of ``x``'s shape (random weights carry none)."""
    clip_len, size = x.shape[-3], x.shape[-1]
    model.weights_info = WeightsInfo(
        model.config,
        preprocessing=Preprocessing(
            clip_len=clip_len, frame_interval=1, num_clips=3, num_crops=1,
            resize_short=size, crop_size=size, input_size=size,
        ),
    )  # fmt: skip
    for i in range(2):
        make_video(tmp / f"calibration{i}.mp4", seconds=2 + clip_len // 25)
    listing = tmp / "calibration.txt"
    listing.write_text("calibration0.mp4\ncalibration1.mp4\n")
    return listing


def median_times(
    runners: dict[str, Any], x: torch.Tensor, rounds: int
) -> dict[str, tuple[float, float]]:
    """Median (wall seconds, process CPU seconds) of ``runner.predict(x)`` per configuration,
    timed round-robin; CPU time sums every thread, the runtime's own included."""
    times: dict[str, list[tuple[float, float]]] = {label: [] for label in runners}
    for _ in range(rounds):
        for label, runner in runners.items():
            wall, cpu = time.perf_counter(), time.process_time()
            runner.predict(x)
            times[label].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {
        label: (statistics.median(w for w, _ in values), statistics.median(c for _, c in values))
        for label, values in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="i3d_r50_nl_dot_product")
    parser.add_argument("--clip-len", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--views", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", nargs="*", help="configuration labels to run (and the baseline)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--no-profile", action="store_true", help="skip openvino's per-layer profile"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    flags = cpu_flags()
    print(f"CPU: {cpu_model()}, {args.threads} threads, clock {cpu_mhz() or 0:.0f} MHz now")
    print("ISA: " + " ".join(f for f in ISA_FLAGS if f in flags))
    peak = peaks(flags)

    torch.manual_seed(0)  # the same weights every run, so openvino's cache is reused
    model = build_model(get_preset(args.preset)).eval()
    clip_shape = (3, args.clip_len, args.size, args.size)
    flops = count_flops(model, [(1, *clip_shape)])
    print(f"{args.preset} at 1×{'×'.join(map(str, clip_shape))}: {flops / 1e9:.1f} GFLOP/clip")

    configs, skipped = usable(CONFIGS, args.only, peak)
    clip = natural_clips((1, *clip_shape))
    video = natural_clips((1, args.views, *clip_shape))
    runners, logits = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            label = config[0]
            start = time.perf_counter()
            try:
                runners[label] = make_runner(model, config, clip, Path(tmp))
                logits[label] = runners[label].predict(clip)  # warm-up, conversion, compile
                runners[label].predict(video)  # openvino compiles a video's mode on first use
            except BackendError as exc:
                runners.pop(label, None)
                skipped.append(f"{label}: {exc}")
                continue
            print(f"  ready: {label} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
        start, own = busy_jiffies(), time.process_time()
        per_clip = median_times(runners, clip, args.rounds)
        per_video = median_times(runners, video, args.rounds)
        load = other_load(start, time.process_time() - own)
        profiles = {}
        for label, _, precision, _ in configs:
            wanted = label.startswith("openvino") and "latency" not in label  # same model
            if label in runners and wanted and not args.no_profile:
                profiles[label] = openvino_profile(runners[label], clip, precision)
    after = peaks(flags)  # the faster of two measurements
    peak = {k: max(v, after[k]) if v else None for k, v in peak.items()}
    for precision, value in peak.items():
        shown = f"{value / 1e9:.1f} GFLOP/s" if value else "no units (not measured)"
        print(f"peak {precision}, one core (torch.mm 2048³, CPU time, best of 10): {shown}")

    base = logits[configs[0][0]]
    base_rate = args.views / per_video[configs[0][0]][0]
    rows, best_before = [], 0.0
    for label, _, precision, _ in configs:
        if label not in runners:
            continue
        core_peak = peak.get(precision) or peak["fp32"]
        (clip_wall, clip_cpu), (video_wall, video_cpu) = per_clip[label], per_video[label]
        video_rate = args.views / video_wall
        rows.append(
            {
                "configuration": label,
                "clips_per_s": 1 / clip_wall,
                "clip_cpu_s": clip_cpu,
                "clip_fraction_of_peak": flops / clip_cpu / core_peak,
                "video_clips_per_s": video_rate,
                "video_cpu_s_per_clip": video_cpu / args.views,
                "video_fraction_of_peak": flops * args.views / video_cpu / core_peak,
                "s_per_video": video_wall,
                "x_torch_fp32": video_rate / base_rate,
                "x_previous_best": video_rate / best_before if best_before else None,
                "top1_agrees": bool((logits[label].argmax(-1) == base.argmax(-1)).all()),
                "logit_rel_diff": float((logits[label] - base).abs().max() / base.abs().max()),
            }
        )
        best_before = max(best_before, video_rate)

    if load is None:
        print(f"\nother jobs' load: not measurable here; {args.rounds} rounds")
    else:
        state = "idle" if load < 0.05 else "shared (wall times move; fractions use CPU time)"
        print(f"\nmachine {state}: other jobs used {load:.1%} of the CPU during the timings; "
              f"{args.rounds} rounds")  # fmt: skip
    print(
        f"| configuration | clips/s, 1 clip | of peak | clips/s, {args.views}-view video "
        "| of peak | s/video | × torch fp32 eager | × previous best | top-1 / max Δlogit (rel.) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        prev = f"{r['x_previous_best']:.2f}" if r["x_previous_best"] else "–"
        print(
            f"| {r['configuration']} | {r['clips_per_s']:.3f} | {r['clip_fraction_of_peak']:.0%} "
            f"| {r['video_clips_per_s']:.3f} | {r['video_fraction_of_peak']:.0%} "
            f"| {r['s_per_video']:.1f} | {r['x_torch_fp32']:.2f} | {prev} "
            f"| {'same' if r['top1_agrees'] else 'differs'} / {r['logit_rel_diff']:.1e} |"
        )
    if any(precision == "int8" for _, _, precision, _ in configs):
        print(
            "int8's fraction is of the fp32 peak: no int8 kernel is measured (torch's int8 "
            "matmul on the CPU is not a tuned one)"
        )
    for note in skipped:
        print(f"skipped: {note}")
    for label, profile in profiles.items():
        precision = next(p for lab, _, p, _ in configs if lab == label)
        spent, slowest = profile["ms"], profile["slowest"]
        total = sum(spent.values())
        others = sorted(((v, k) for k, v in spent.items() if k != "gemm"), reverse=True)
        of = precision if peak.get(precision) else "fp32"  # int8: no int8 peak is measured
        rate = functools.partial(rate_text, threads=args.threads, peak=peak[of], of=of)

        print(
            f"profile, {label}, one clip: {total:.0f} ms; convolutions and matmuls (with what "
            f"is fused into them) {spent['gemm'] / total:.0%} at {rate(flops, spent['gemm'])}; "
            + ", ".join(f"{k} {v / total:.0%}" for v, k in others[:4])
        )
        if slowest["flops"]:  # FLOPs of the converted convolutions, zero taps included
            conv_total = profile["conv_flops"]
            rest = rate(conv_total - slowest["flops"], spent["gemm"] - slowest["ms"])
            print(
                f"  slowest layer: conv {slowest['weights']}, {slowest['ms'] / total:.0%} of the "
                f"time for {slowest['flops'] / conv_total:.0%} of the convolution FLOPs as "
                f"converted at {rate(slowest['flops'], slowest['ms'])}; the other layers {rest}"
            )
    if args.json:
        record = {
            "cpu": cpu_model(), "flops_per_clip": flops, "peak_flops": peak, "rows": rows,
            "skipped": skipped, "clip_shape": list(clip_shape), "views": args.views,
            "other_load": load, "openvino_profile_ms": profiles,
        }  # fmt: skip
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
