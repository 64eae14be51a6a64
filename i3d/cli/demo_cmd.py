"""``i3d demo``: classify DeepMind's cricket sample (or any video) and print the top classes."""

from __future__ import annotations

import math
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from i3d.cli.common import fail_on_errors
from i3d.data.decode import VideoDecodeError, VideoReader, open_video
from i3d.data.pipeline import Pipeline, build_pipeline
from i3d.models.recognizer import InputShapeError, Recognizer, average_views
from i3d.weights.format import WeightsError, load_model
from i3d.weights.preprocessing import Preprocessing

DEFAULT_MODEL = "i3d_inception_k400_rgb"
SAMPLE_GIF = "v_CricketShot_g04_c01_rgb.gif"

console = Console(soft_wrap=True)  # log lines stay whole when redirected


class ClipError(ValueError):
    """The clip cannot be decoded, or is too short or small for the model."""


class _FirstFrames(VideoReader):
    """The first ``count`` frames of another reader, so nothing after them is decoded."""

    def __init__(self, reader: VideoReader, count: int) -> None:
        self._reader = reader
        self.path, self.fps, self.size = reader.path, reader.fps, reader.size
        self.num_frames = min(count, reader.num_frames)

    def _iter_frames(self, wanted: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        return self._reader.iter_frames(wanted)

    def close(self) -> None:
        self._reader.close()


def demo_pipeline(prep: Preprocessing, size: tuple[int, int]) -> Pipeline:
    """The weights' test pipeline; a clip already cut to the crop size is used as it is.

    DeepMind's sample clip is stored 224x224 after their resize-256 + centre-224 step, so
    scaling it up again would blur it; such a clip only gets the value scaling.
    """
    pipeline = build_pipeline(prep, "test")
    if pipeline.num_crops == 1 and size == (pipeline.crop_size, pipeline.crop_size):
        return build_pipeline(prep, "test", resize_short=pipeline.crop_size)
    return pipeline


def _source_frames(pipeline: Pipeline, reader: VideoReader, frames: int) -> int:
    """How many source frames give the first ``frames`` frames after fps resampling."""
    target, fps = pipeline.preprocessing.fps, reader.fps
    if target is None or fps is None:
        return frames
    return math.ceil(frames * fps / target) + 1


def clip_views(path: Path, prep: Preprocessing, frames: int | None = None) -> torch.Tensor:
    """Normalised views (V, C, T, H, W) of the video ``path`` as the weights expect them.

    With ``frames``, only the first ``frames`` frames of each view are kept (and, for an
    every-frame protocol, only the frames they come from are decoded).
    """
    try:
        with open_video(path) as reader:
            pipeline = demo_pipeline(prep, reader.size)
            source: VideoReader = reader
            if frames is not None and pipeline.sampler is None:
                source = _FirstFrames(reader, _source_frames(pipeline, reader, frames))
            views = pipeline.frames(source)
    except VideoDecodeError as exc:
        raise ClipError(f"cannot read {path} as a video: {exc}") from None
    if frames is not None:
        views = views[:, :, :frames]
    return pipeline.normalize(views)


def classify(
    model: Recognizer, views: torch.Tensor, source: str, frames: int | None
) -> torch.Tensor:
    """Class probabilities (K,) of one clip's views, averaged as the weights say."""
    prep = model.weights_info.preprocessing
    try:
        with torch.no_grad():
            scores = average_views(model(views[None]), prep.average_clips)[0]
    except InputShapeError as exc:
        _, _, t, h, w = views.shape
        fix = "raise --frames" if frames is not None else "use a longer clip"
        raise ClipError(
            f"{source} gives {t} frames of {w}x{h} after preprocessing, too few or too small "
            f"for this model ({str(exc).split(';')[0]}); {fix}"
        ) from None
    return scores if prep.average_clips == "prob" else scores.softmax(dim=-1)


def default_weights() -> Path:
    """The pulled DeepMind Kinetics-400 RGB model from the local weights cache."""
    from i3d.weights.hub import resolve

    try:
        return resolve(DEFAULT_MODEL)
    except WeightsError as exc:
        raise type(exc)(f"{exc}, or pass --weights PATH") from None


def demo(
    weights: Annotated[
        Path | None,
        typer.Option(help=f"Project .safetensors weights (default: the pulled {DEFAULT_MODEL})."),
    ] = None,
    clip: Annotated[
        Path | None,
        typer.Option(
            help="Video (mp4, webm, avi, gif, ...) or frame folder to classify "
            "(default: the bundled cricket clip)."
        ),
    ] = None,
    frames: Annotated[
        int | None,
        typer.Option(min=1, help="Use only the first N frames after preprocessing (default: all)."),
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="How many classes to show.")] = 5,
) -> None:
    """Classify a short clip (DeepMind's cricket sample by default) and print the top-k classes."""
    with fail_on_errors(ClipError):
        path = weights if weights is not None else default_weights()
        model = load_model(path)
        if not isinstance(model, Recognizer) or model.in_channels != 3:
            raise WeightsError(f"{path} is not a single-stream RGB model; the demo clip is RGB")
        info = model.weights_info
        source = clip if clip is not None else resources.files("i3d.assets").joinpath(SAMPLE_GIF)
        name = Path(str(source)).name
        views = clip_views(Path(str(source)), info.preprocessing, frames)
        probs = classify(model, views, name, frames)
    labels = info.labels or tuple(f"class {i}" for i in range(probs.numel()))
    values, indices = probs.topk(min(top_k, probs.numel()))
    shown = f"{views.shape[2]} frames" + (f" x {views.shape[0]} views" if len(views) > 1 else "")
    console.print(f"{name}: {shown}, weights {path.name}", highlight=False)
    table = Table()
    table.add_column("rank", justify="right")
    table.add_column("class")
    table.add_column("probability", justify="right")
    for rank, (p, i) in enumerate(zip(values.tolist(), indices.tolist(), strict=True), start=1):
        table.add_row(str(rank), labels[i], f"{p:.4f}")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
