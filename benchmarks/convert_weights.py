"""Convert a full-size mmaction2 I3D checkpoint: wall time and peak memory vs file size.

Usage: python benchmarks/convert_weights.py [--preset i3d_r50_nl_dot_product]
Writes a random-weight checkpoint in mmaction's layout (35.4 M parameters for the NL preset),
then converts it in a fresh process and reports time and peak RSS growth over the process'
baseline (imports done) as a ratio to the checkpoint size. A plain ``torch.load`` of the same
file in another fresh process is the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
from i3d.weights.mmaction import convert_mmaction
def rss_mb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
base = rss_mb()
t0 = time.perf_counter()
if sys.argv[1] == "convert":
    convert_mmaction(sys.argv[2], sys.argv[3], preset=sys.argv[4])
else:
    sd = torch.load(sys.argv[2], map_location="cpu", weights_only=True)
elapsed = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": elapsed, "peak_growth_mb": peak - base}))
"""


def run(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="i3d_r50_nl_dot_product")
    args = parser.parse_args()
    import torch

    from i3d.models import build_model, get_preset

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"{args.preset}.pth"
        model = build_model(get_preset(args.preset))
        torch.save({"meta": {"epoch": 100}, "state_dict": model.state_dict()}, src)
        del model
        size_mb = src.stat().st_size / 2**20
        t0 = time.perf_counter()
        load = run("load", str(src))
        conv = run("convert", str(src), str(Path(tmp) / "out.safetensors"), args.preset)
        total = time.perf_counter() - t0
    print(f"checkpoint: {args.preset}, {size_mb:.1f} MiB")
    print(
        f"torch.load baseline : {load['seconds']:.2f} s, peak +{load['peak_growth_mb']:.0f} MiB "
        f"({load['peak_growth_mb'] / size_mb:.2f}x file)"
    )
    print(
        f"i3d convert         : {conv['seconds']:.2f} s, peak +{conv['peak_growth_mb']:.0f} MiB "
        f"({conv['peak_growth_mb'] / size_mb:.2f}x file)"
    )
    print(
        f"convert / load time : {conv['seconds'] / load['seconds']:.2f}x  (both runs {total:.1f} s)"
    )


if __name__ == "__main__":
    main()
