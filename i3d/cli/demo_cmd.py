"""``i3d demo``: classify DeepMind's cricket sample clip and print the top classes."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from PIL import Image, ImageSequence, UnidentifiedImageError
from rich.console import Console
from rich.table import Table

from i3d.cli.common import fail_on_errors
from i3d.models.recognizer import Recognizer
from i3d.weights.format import WeightsError, load_model
from i3d.weights.preprocessing import Preprocessing

DEFAULT_MODEL = "i3d_inception_k400_rgb"
SAMPLE_GIF = "v_CricketShot_g04_c01_rgb.gif"

console = Console()


class ClipError(ValueError):
    """The clip file cannot be decoded into equally sized RGB frames."""


def read_gif(path: Path) -> np.ndarray:
    """Every frame of a GIF as RGB uint8, shape (T, H, W, 3)."""
    try:
        with Image.open(path) as image:
            frames = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]
    except (OSError, UnidentifiedImageError) as exc:
        raise ClipError(f"cannot read {path} as an image sequence: {exc}") from exc
    if len({f.shape for f in frames}) != 1:
        raise ClipError(f"{path}: frames have different sizes")
    return np.stack(frames)


def frames_to_input(frames: np.ndarray, prep: Preprocessing) -> torch.Tensor:
    """(T, H, W, 3) uint8 → (1, 3, T, H, W) float32 scaled to ``value_range`` and normalised."""
    low, high = prep.value_range
    x = torch.from_numpy(frames).float() / 255.0 * (high - low) + low
    x = (x - torch.tensor(prep.mean)) / torch.tensor(prep.std)
    return x.permute(3, 0, 1, 2).unsqueeze(0).contiguous()


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
        typer.Option(help="GIF clip to classify (default: the bundled cricket clip)."),
    ] = None,
    frames: Annotated[
        int | None, typer.Option(min=1, help="Use only the first N frames (default: all).")
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
        video = read_gif(Path(str(source)))
        if frames is not None:
            video = video[:frames]
        with torch.no_grad():
            probs = model(frames_to_input(video, info.preprocessing)).softmax(dim=-1)[0]
    labels = info.labels or tuple(f"class {i}" for i in range(probs.numel()))
    values, indices = probs.topk(min(top_k, probs.numel()))
    table = Table(title=f"{Path(str(source)).name}: {len(video)} frames, {path.name}")
    table.add_column("rank", justify="right")
    table.add_column("class")
    table.add_column("probability", justify="right")
    for rank, (p, i) in enumerate(zip(values.tolist(), indices.tolist(), strict=True), start=1):
        table.add_row(str(rank), labels[i], f"{p:.4f}")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
