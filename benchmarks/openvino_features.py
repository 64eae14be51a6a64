"""Time and agreement of endpoint features on OpenVINO against torch, pooled and snippets.

One process, one video and one model (by default the pulled DeepMind Inception,
``i3d_inception_k400_rgb``, at ``Mixed_5c``), as ``i3d features`` runs them:

- pooled: ``video_features`` of 10 views of 3×16×224² (``--clips 10 --clip-len 16``), all
  in one call (``--batch-size 10``: OpenVINO's throughput mode);
- snippets: a ``SnippetExtractor`` of 16-frame windows every 16 frames (``--window 16``,
  batch 8), built (its probe runs one snippet) and run on the video.

OpenVINO's first call converts the model truncated at the endpoint into an empty cache (a
temporary ``I3D_CACHE``); every later OpenVINO case builds a new runner, which imports the
compiled model from that cache, as a second ``i3d features`` run does (the snippets have the
same clip shape, endpoint and mode, so they convert nothing either). Torch and cached OpenVINO
run round-robin ``--rounds`` times; the median time is printed with its speed against
torch's in the same run, the largest feature difference relative to torch's largest
magnitude, and the CPU it ran on. Process start-up and model loading (the same for both,
about 7 s here) are not counted.

    python benchmarks/openvino_features.py [--weights W] [--video V] [--endpoint E]
        [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np
from common import cpu_model

SAMPLE = "v_CricketShot_g04_c01_rgb.gif"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, help="Default: the pulled default weights.")
    parser.add_argument("--video", type=Path, help="Default: the bundled DeepMind sample clip.")
    parser.add_argument("--endpoint", default="Mixed_5c")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["I3D_CACHE"] = str(Path(tmp) / "cache")  # converts on the first call
        run(args, Path(tmp))


def run(args: argparse.Namespace, tmp: Path) -> None:
    import openvino

    from i3d.data.pipeline import build_pipeline
    from i3d.features import SnippetExtractor, SnippetProtocol
    from i3d.features.pooled import video_features
    from i3d.inference.inputs import default_weights
    from i3d.weights.format import load_model

    weights = args.weights or default_weights()
    video = args.video
    if video is None:
        video = tmp / SAMPLE
        video.write_bytes(resources.files("i3d.assets").joinpath(SAMPLE).read_bytes())
    model = load_model(weights)
    pipeline = build_pipeline(model.weights_info.preprocessing, "test", num_clips=10, clip_len=16)

    def pooled(backend: str) -> np.ndarray:
        return video_features(model, pipeline, video, args.endpoint, batch_size=10,
                              backend=backend).numpy()  # fmt: skip

    def snippets(backend: str) -> np.ndarray:
        protocol = SnippetProtocol(16, 16, endpoint=args.endpoint)
        result = SnippetExtractor(model, protocol, 8, backend=backend).video(video)
        assert result.features is not None, result.error
        return result.features

    print(f"CPU: {cpu_model()}; openvino {openvino.get_version()}")
    print(f"weights {weights.name}, endpoint {args.endpoint}, video {video.name}")
    start = time.perf_counter()
    first = pooled("openvino")
    first_s = time.perf_counter() - start
    times: dict[str, list[float]] = {}
    results: dict[str, np.ndarray] = {}
    for _ in range(args.rounds):
        for kind, case in (("pooled", pooled), ("snippets", snippets)):
            for backend in ("torch", "openvino"):
                start = time.perf_counter()
                results[f"{backend} {kind}"] = case(backend)
                times.setdefault(f"{backend} {kind}", []).append(time.perf_counter() - start)

    def relative(got: np.ndarray, kind: str) -> str:
        want = results[f"torch {kind}"]
        return f"{float(np.abs(got - want).max() / np.abs(want).max()):.2g}"

    print("| case | s (median) | speed × torch | features vs torch (max rel.) |")
    print("|---|---|---|---|")
    base = statistics.median(times["torch pooled"])
    print(f"| openvino pooled, first call (converts) | {first_s:.1f} | {base / first_s:.2f} "
          f"| {relative(first, 'pooled')} |")  # fmt: skip
    for kind in ("pooled", "snippets"):
        base = statistics.median(times[f"torch {kind}"])
        for backend in ("torch", "openvino"):
            name = f"{backend} {kind}"
            took = statistics.median(times[name])
            print(f"| {name} | {took:.1f} | {base / took:.2f} | {relative(results[name], kind)} |")


if __name__ == "__main__":
    main()
