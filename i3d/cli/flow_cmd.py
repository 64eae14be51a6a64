"""``i3d flow``: DeepMind-recipe TV-L1 (or RAFT) optical flow per video (``.npy`` or mmaction2
rawframes), resumable."""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console

from i3d.cli.common import fail_on_errors
from i3d.cli.video_common import ERRORS, report_written
from i3d.data.decode import VideoDecodeError, open_video
from i3d.data.transforms import center_box, rescale_size
from i3d.features.snippets import video_timeline
from i3d.flow.raft import RaftMissingError
from i3d.flow.recipe import FlowConfig, check_flow
from i3d.flow.store import FlowFolder, FlowSettings, FlowStoreError
from i3d.flow.tvl1_opencv import OpenCVMissingError
from i3d.flow.video import iter_timeline_flow
from i3d.inference.inputs import VIDEO_ERRORS, InputError, expand_inputs
from i3d.utils.files import OutputError

console = Console(soft_wrap=True)


class Impl(str, Enum):
    torch = "torch"
    opencv = "opencv"
    raft = "raft"


class Layout(str, Enum):
    npy = "npy"
    mmaction = "mmaction"


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"


def output_names(paths: list[Path]) -> dict[Path, str]:
    """The flow entry name (the video's stem) per video; two inputs with one stem are an
    error (one would overwrite the other)."""
    names: dict[Path, str] = {}
    seen: dict[str, Path] = {}
    for path in paths:
        name = path.stem if path.is_file() else path.name
        if name in seen:
            raise InputError(f"{seen[name]} and {path} would both be written as {name}; rename one")
        seen[name] = path
        names[path] = name
    return names


def _cropped(
    chunks: Iterator[tuple[np.ndarray, np.ndarray]], crop: int | None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(flow, frames) chunks centre-cropped to ``crop`` (None: as they are)."""
    for flow, frames in chunks:
        if crop is not None:
            height, width = frames.shape[1:3]
            if crop > min(height, width):
                raise ValueError(f"crop {crop} is larger than the {width}x{height} frames")
            x1, y1, x2, y2 = center_box(width, height, crop)
            flow, frames = flow[:, y1:y2, x1:x2], frames[:, y1:y2, x1:x2]
        yield flow, frames


def write_flow(
    path: Path, folder: FlowFolder, name: str, config: FlowConfig, fps: float | None,
    size: int | None, crop: int | None,
) -> tuple[int, int, int]:  # fmt: skip
    """Compute one video's flow into ``folder`` as ``name``, atomically; returns (T-1, H, W)."""
    with open_video(path) as reader:
        ticks = video_timeline(reader, fps).source
        width, height = reader.size if size is None else rescale_size(*reader.size, size)
        if crop is not None:
            width = height = crop
        shape = (int(ticks.size) - 1, height, width)
        folder.write(name, shape, _cropped(iter_timeline_flow(reader, ticks, config, size), crop))
    return shape


def flow(
    inputs: Annotated[
        list[str],
        typer.Argument(help="Video files, directories, globs, or folders of extracted frames."),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="Folder for one <video>.npy (or <video>/ folder) per video."
        ),
    ],
    layout: Annotated[
        Layout,
        typer.Option(
            "--format",
            help="npy: <video>.npy, float (lossless); mmaction: mmaction2 rawframes, "
            "<video>/img_00001.jpg, flow_x_00001.jpg, flow_y_00001.jpg, ... (uint8, bound 20).",
        ),
    ] = Layout.npy,
    impl: Annotated[
        Impl,
        typer.Option(
            help="TV-L1 implementation: torch (any device) or opencv (reference); or raft "
            "(torchvision RAFT, --raft-weights; not the TV-L1 I3D's flow weights saw)."
        ),
    ] = Impl.torch,
    raft_weights: Annotated[
        Path | None,
        typer.Option(
            help="--impl raft: a local torchvision RAFT checkpoint (raft_large_*.pth, "
            "raft_small_*.pth or .safetensors); nothing is downloaded."
        ),
    ] = None,
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
    device: Annotated[str, typer.Option(help="Torch device for --impl torch or raft.")] = "cpu",
    batch_size: Annotated[int, typer.Option(min=1, help="Frame pairs per flow batch.")] = 8,
    dtype: Annotated[DType, typer.Option(help="--format npy: dtype of the [-1, 1] flow.")] = (
        DType.float32
    ),
    overwrite: Annotated[
        bool, typer.Option(help="Recompute videos whose flow exists (default: skip them).")
    ] = False,
) -> None:
    """TV-L1 flow as DeepMind's I3D Flow stream takes it: (T-1, H, W, 2), x then y, in [-1, 1].

    Greyscale frames, TV-L1 (OpenCV's DualTVL1 defaults) from each frame to the next,
    clipped to ±20 pixels and divided by 20. The folder records these settings (flow.json)
    and refuses a run with others; `--size 256` without --crop makes the flow folder
    `i3d predict --flow-dir` reads for DeepMind's weights. `--impl raft` runs torchvision's
    RAFT on the RGB frames instead (same bound and scaling), which is not the flow DeepMind's
    weights were trained on.
    """
    errors = (
        InputError, OutputError, OpenCVMissingError, RaftMissingError, VideoDecodeError,
        FlowStoreError, ValueError,
    )  # fmt: skip
    with fail_on_errors(*errors):
        paths = expand_inputs(inputs)
        names = output_names(paths)
        config = FlowConfig(
            impl=impl.value, device=device, batch_size=batch_size, raft_weights=raft_weights
        )
        check_flow(config)  # fail once, up front: no opencv-contrib, torchvision or weights
        settings = FlowSettings(
            format=layout.value, fps=fps or None, size=size, crop=crop, **config.recorded()
        )
        folder = FlowFolder(output, settings, dtype.value)
        folder.claim()
    todo = [p for p in paths if overwrite or not folder.has(names[p])]
    failed: list[tuple[Path, str]] = []
    for path in todo:
        try:
            frames, height, width = write_flow(
                path, folder, names[path], config, fps or None, size, crop
            )
        except (*VIDEO_ERRORS, *ERRORS) as exc:
            failed.append((path, str(exc)))
            continue
        dst = folder.entry(names[path])
        console.print(f"{path} → {dst} ({frames} × {height}×{width} × 2)", highlight=False)
    report_written(len(todo) - len(failed), len(paths) - len(todo), output, failed)


def register(app: typer.Typer) -> None:
    """Add ``i3d flow`` to the ``i3d`` command."""
    app.command("flow")(flow)
