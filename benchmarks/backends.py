"""One I3D through every available backend and precision, in the same run.

Usage: python benchmarks/backends.py [--preset i3d_r50_nl_dot_product] [--clip-len 32]
       [--size 224] [--rounds 5] [--compile] [--reference /work/shared/reference] [--json OUT]

Speed: the full-size preset (random weights; speed does not depend on them) on one
(1, 3, T, S, S) clip. Configurations are timed round-robin (each round times every
configuration once, after one untimed warm-up call each) so that load from other processes
hits them alike; the median is reported, with clips/s as a ratio to torch fp32 eager.
Accuracy: the mmaction2 fixtures (r50 and nl-dot-product/eval_stable, base_channels=8,
input (2, 3, 16, 64, 64)) through the same configurations: top-1 agreement and max logit
difference against torch fp32 eager. Backends that are not available are listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from i3d.backends import get_backend, list_backends, load_runner
from i3d.export import export_onnx
from i3d.models import build_model, get_preset
from i3d.utils.files import atomic_path
from i3d.weights.mmaction import extract_state_dict
from i3d.weights.safe_pickle import load_checkpoint

#: (label, backend, precision, options); the first one is the baseline
CONFIGS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("torch fp32 eager", "torch", "fp32", {}),
    ("torch fp32 fuse_bn+channels_last", "torch", "fp32", {"fuse_bn": True, "channels_last": True}),
    ("torch bf16 autocast", "torch", "bf16", {}),
    ("torch bf16 autocast+channels_last", "torch", "bf16", {"channels_last": True}),
    (
        "torch bf16 cast+fuse_bn+channels_last",
        "torch",
        "bf16",
        {"autocast": False, "fuse_bn": True, "channels_last": True},
    ),
    ("torch fp16 autocast+channels_last", "torch", "fp16", {"channels_last": True}),
    ("onnx fp32 (onnxruntime CPU EP)", "onnx", "fp32", {}),
    ("npu bf16 (torch_npu)", "npu", "bf16", {}),
]
COMPILED = (
    "torch bf16 cast+fuse_bn+channels_last+compile",
    "torch",
    "bf16",
    {"autocast": False, "fuse_bn": True, "channels_last": True, "compile": True},
)
FIXTURES = {
    "r50": ("i3d_r50", "r50", None),
    "nl-dot-product/eval_stable": ("i3d_r50_nl_dot_product", "nl-dot-product", "eval_stable"),
}


def available_configs(with_compile: bool) -> tuple[list[tuple], list[str]]:
    """The configurations whose backend runs here, and a note for each skipped one."""
    configs = [*CONFIGS, COMPILED] if with_compile else list(CONFIGS)
    installed = set(list_backends())
    usable, skipped = [], []
    om = get_backend("om").is_available() if "om" in installed else None
    skipped.append(f"om: {om.reason if om and not om.ok else 'needs an ATC-compiled .om'}")
    for config in configs:
        name = config[1]
        info = get_backend(name).is_available() if name in installed else None
        if info is not None and info.ok:
            usable.append(config)
        else:
            skipped.append(f"{config[0]}: {info.reason if info else 'not installed'}")
    return usable, skipped


def make_runner(model: torch.nn.Module, config: tuple, clip: tuple[int, int], tmp: Path) -> Any:
    """A runner; for onnx a file is exported (and verified) for ``clip`` = (T, size) first."""
    _, backend, precision, options = config
    if backend == "onnx":
        path = tmp / f"model_{clip[0]}x{clip[1]}_{id(model)}.onnx"
        export_onnx(model, path, clip_len=clip[0], size=clip[1], batch="dynamic")
        return load_runner(path, backend="onnx", **options)
    return load_runner(model, backend=backend, precision=precision, batch_size=8, **options)


def time_configs(configs: list[tuple], preset: str, clip_len: int, size: int, rounds: int) -> dict:
    """Median latency per configuration, timed round-robin on the full-size model."""
    torch.manual_seed(0)
    model = build_model(get_preset(preset)).eval()
    x = torch.randn(1, 3, clip_len, size, size, generator=torch.Generator().manual_seed(0))
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            label = config[0]
            start = time.perf_counter()
            runners[label] = make_runner(model, config, (clip_len, size), Path(tmp))
            runners[label].predict(x)  # warm-up (and compilation)
            print(f"  ready: {label} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
        times: dict[str, list[float]] = {label: [] for label in runners}
        for _ in range(rounds):
            for label, runner in runners.items():
                start = time.perf_counter()
                runner.predict(x)
                times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}


def fixture_model(reference: Path, preset: str, folder: str, overlay: str | None):
    """A fixture's small model (base_channels=8) and its input."""
    base = reference / "mmaction" / folder
    state = extract_state_dict(load_checkpoint(base / "checkpoint.pth"))
    if overlay:
        state.update(load_checkpoint(base / overlay / "nl_override.pth"))
    model = build_model(get_preset(preset, base_channels=8))
    model.load_state_dict(state)
    return model.eval(), torch.from_numpy(np.load(base / "input.npy"))


def accuracy(configs: list[tuple], reference: Path) -> dict[str, dict[str, tuple]]:
    """Per fixture and configuration: (top-1 agreement, max |Δlogit|, Δ relative to max|fp32|)."""
    results: dict[str, dict[str, tuple]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fixture, (preset, folder, overlay) in FIXTURES.items():
            model, x = fixture_model(reference, preset, folder, overlay)
            base = None
            results[fixture] = {}
            for config in configs:
                label = config[0]
                runner = make_runner(model, config, (x.shape[2], x.shape[3]), Path(tmp))
                logits = runner.predict(x)
                base = logits if base is None else base
                diff = float((logits - base).abs().max())
                agree = float((logits.argmax(-1) == base.argmax(-1)).float().mean())
                results[fixture][label] = (agree, diff, diff / float(base.abs().max()))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="i3d_r50_nl_dot_product")
    parser.add_argument("--clip-len", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--reference", type=Path, default=Path("/work/shared/reference"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    configs, skipped = available_configs(args.compile)
    print(
        f"timing {args.preset} on (1, 3, {args.clip_len}, {args.size}, {args.size}), "
        f"{args.threads} threads, {args.rounds} rounds",
        file=sys.stderr,
    )
    acc = accuracy(configs, args.reference) if (args.reference / "mmaction").is_dir() else {}
    latency = time_configs(configs, args.preset, args.clip_len, args.size, args.rounds)

    baseline = latency[configs[0][0]]
    header = "| configuration | median s/clip | clips/s | × torch fp32 eager |"
    for fixture in acc:
        header += f" {fixture}: top-1 agree / max Δlogit (rel) |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for label, *_ in configs:
        row = f"| {label} | {latency[label]:.3f} | {1 / latency[label]:.2f} | "
        row += f"{baseline / latency[label]:.2f} |"
        for fixture in acc:
            agree, diff, rel = acc[fixture][label]
            row += f" {agree:.0%} / {diff:.3g} ({rel:.2%}) |"
        print(row)
    for note in skipped:
        print(f"skipped: {note}")
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps({"latency_s": latency, "accuracy": acc, "skipped": skipped}))


if __name__ == "__main__":
    main()
