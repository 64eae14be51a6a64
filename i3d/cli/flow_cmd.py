"""``i3d flow``: DeepMind-recipe TV-L1 optical flow per video, one ``.npy`` each, resumable."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console

from i3d.cli.common import fail_on_errors
from i3d.cli.video_common import ERRORS, report_written
from i3d.data.decode import VideoDecodeError
from i3d.flow.recipe import FlowConfig
from i3d.flow.tvl1_opencv import OpenCVMissingError, opencv_optflow
from i3d.flow.video import iter_video_flow
from i3d.predict import VIDEO_ERRORS, InputError, expand_inputs
from i3d.utils.files import OutputError, atomic_path, ensure_dir

console = Console(soft_wrap=True)


class Impl(str, Enum):
    torch = "torch"
    opencv = "opencv"


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"


def output_names(paths: list[Path]) -> dict[Path, str]:
    """``<stem>.npy`` per video; two inputs with one stem are an error (one would overwrite)."""
    names: dict[Path, str] = {}
    seen: dict[str, Path] = {}
    for path in paths:
        name = f"{path.stem if path.is_file() else path.name}.npy"
        if name in seen:
            raise InputError(f"{seen[name]} and {path} would both be written as {name}; rename one")
        seen[name] = path
        names[path] = name
    return names


def write_flow(
    path: Path, dst: Path, config: FlowConfig, fps: float | None, size: int | None,
    crop_size: int | None, dtype: str,
) -> tuple[int, int, int]:  # fmt: skip
    """Compute one video's flow and write it to ``dst`` atomically; returns (T-1, H, W)."""
    chunks = [chunk.astype(dtype) for chunk in iter_video_flow(path, config, fps, size, crop_size)]
    flow = np.concatenate(chunks)
    with atomic_path(dst) as tmp, open(tmp, "wb") as handle:
        np.save(handle, flow)
    return flow.shape[:3]


def flow(
    inputs: Annotated[
        list[str],
        typer.Argument(help="Video files, directories, globs, or folders of extracted frames."),
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for one <video>.npy per video.")
    ],
    impl: Annotated[
        Impl, typer.Option(help="TV-L1 implementation: torch (any device) or opencv (reference).")
    ] = Impl.torch,
    fps: Annotated[
        float | None,
        typer.Option(help="Resample to F fps first (DeepMind: 25); 0 keeps the video's frames."),
    ] = 25.0,
    size: Annotated[
        int | None,
        typer.Option(min=3, help="Resize the short side to S first, as for RGB (e.g. 256)."),
    ] = None,
    crop: Annotated[
        int | None, typer.Option(min=1, help="Centre-crop the flow to C×C (e.g. 224).")
    ] = None,
    device: Annotated[str, typer.Option(help="Torch device for --impl torch.")] = "cpu",
    batch_size: Annotated[int, typer.Option(min=1, help="Frame pairs per TV-L1 batch.")] = 8,
    dtype: Annotated[DType, typer.Option(help="Stored dtype of the [-1, 1] flow.")] = (
        DType.float32
    ),
    overwrite: Annotated[
        bool, typer.Option(help="Recompute videos whose .npy exists (default: skip them).")
    ] = False,
) -> None:
    """TV-L1 flow as DeepMind's I3D Flow stream takes it: (T-1, H, W, 2), x then y, in [-1, 1].

    Greyscale frames, TV-L1 (OpenCV's DualTVL1 defaults) from each frame to the next,
    clipped to ±20 pixels and divided by 20.
    """
    with fail_on_errors(InputError, OutputError, OpenCVMissingError, VideoDecodeError):
        paths = expand_inputs(inputs)
        names = output_names(paths)
        if impl is Impl.opencv:
            opencv_optflow()  # fail once, up front, when opencv-contrib is missing
        config = FlowConfig(impl=impl.value, device=device, batch_size=batch_size)
        folder = ensure_dir(output)
    todo = [p for p in paths if overwrite or not (folder / names[p]).exists()]
    failed: list[tuple[Path, str]] = []
    for path in todo:
        dst = folder / names[path]
        try:
            frames, height, width = write_flow(
                path, dst, config, fps or None, size, crop, dtype.value
            )
        except (*VIDEO_ERRORS, *ERRORS) as exc:
            failed.append((path, str(exc)))
            continue
        console.print(f"{path} → {dst} ({frames} × {height}×{width} × 2)", highlight=False)
    report_written(len(todo) - len(failed), len(paths) - len(todo), output, failed)


def register(app: typer.Typer) -> None:
    """Add ``i3d flow`` to the ``i3d`` command."""
    app.command("flow")(flow)
