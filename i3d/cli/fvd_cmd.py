"""``i3d fvd REAL FAKE`` and ``i3d fvd-stats REAL -o FILE``: Fréchet Video Distance."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from i3d.cli.common import err_console, fail_on_errors
from i3d.cli.video_common import ERRORS, BatchOpt, DeviceOpt, WeightsOpt, count_videos

console = Console(soft_wrap=True, highlight=False)

ProtocolOpt = Annotated[
    str,
    typer.Option(
        help="tf (google-research reference, default), stylegan-v, cd-fvd, common-metrics or "
        "common-metrics-videogpt."
    ),
]
FramesOpt = Annotated[
    int | None,
    typer.Option(
        "--frames",
        min=1,
        help="Frames per clip (default: the protocol's; tf, cd-fvd and common-metrics read "
        "each video whole, stylegan-v takes 16).",
    ),
]
SeedOpt = Annotated[int, typer.Option(help="Seed of the protocol's clip sampling (stylegan-v).")]
FvdWorldSizeOpt = Annotated[
    int,
    typer.Option(
        "--world-size",
        min=1,
        help="Local processes, one per device, each embedding a share of the videos; the "
        "statistics are merged in input order, so the FVD is the same.",
    ),
]

INPUT_HELP = (
    "A folder of videos or of frame folders, a video file, an .npy/.npz uint8 array "
    "(N, T, H, W, 3), or statistics saved by i3d fvd-stats (.safetensors)."
)


def _errors() -> tuple[type[BaseException], ...]:
    from i3d.fvd.extract import DetectorError, ExtractError
    from i3d.fvd.inputs import FVDInputError
    from i3d.fvd.protocols import ClipError

    return (*ERRORS, FVDInputError, ClipError, DetectorError, ExtractError)


def _source(path: Path) -> Any:
    """The API's input for a command-line path (a stats file or a video source)."""
    from i3d.fvd.api import STATS_SUFFIX, load_stats

    if path.suffix == STATS_SUFFIX and not path.is_dir():
        return load_stats(path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    return str(path)


def _show_warnings(caught: list[warnings.WarningMessage]) -> None:
    for item in caught:
        err_console.print(f"[yellow]warning:[/yellow] {escape(str(item.message))}")


def _write_json(path: Path, record: dict[str, Any]) -> None:
    from i3d.utils.files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def fvd(
    real: Annotated[Path, typer.Argument(help="Reference videos. " + INPUT_HELP)],
    fake: Annotated[Path, typer.Argument(help="Generated videos. " + INPUT_HELP)],
    protocol: ProtocolOpt = "tf",
    frames: FramesOpt = None,
    seed: SeedOpt = 0,
    weights: WeightsOpt = None,
    batch_size: BatchOpt = 1,
    device: DeviceOpt = None,
    world_size: FvdWorldSizeOpt = 1,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the JSON record to this file.")
    ] = None,
) -> None:
    """Fréchet Video Distance between two video sets, with the record of how it was made."""
    from i3d.fvd.api import StatsMismatchError
    from i3d.fvd.api import fvd as compute_fvd

    with (
        fail_on_errors(*_errors(), StatsMismatchError),
        warnings.catch_warnings(record=True) as seen,
    ):
        warnings.simplefilter("always")
        result = compute_fvd(
            _source(real), _source(fake), protocol=protocol, frames=frames,
            weights=weights, seed=seed, device=device, batch_size=batch_size,
            world_size=world_size,
        )  # fmt: skip
        if json_out is not None:
            _write_json(json_out, result.record)
    _show_warnings(seen)
    console.print(
        f"FVD {result.fvd:.4f} (protocol {protocol}; real: {count_videos(result.real.videos)}, "
        f"{result.real.frames} frames"
        + (f", {result.real.discarded} too short, left out" if result.real.discarded else "")
        + f"; fake: {count_videos(result.fake.videos)}, {result.fake.frames} frames)"
    )
    typer.echo(json.dumps(result.record, indent=2))


def fvd_stats(
    videos: Annotated[Path, typer.Argument(help=INPUT_HELP)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Statistics file (.safetensors).")],
    role: Annotated[
        str, typer.Option(help="real or fake: the set's side (stylegan-v samples them apart).")
    ] = "real",
    protocol: ProtocolOpt = "tf",
    frames: FramesOpt = None,
    seed: SeedOpt = 0,
    weights: WeightsOpt = None,
    batch_size: BatchOpt = 1,
    device: DeviceOpt = None,
    world_size: FvdWorldSizeOpt = 1,
) -> None:
    """Save one set's FVD statistics (float64 mean and covariance, with the protocol record)."""
    from i3d.fvd.api import STATS_SUFFIX, compute_stats, save_stats
    from i3d.fvd.inputs import FVDInputError
    from i3d.utils.files import refuse_overwriting

    with fail_on_errors(*_errors()):
        if output.suffix != STATS_SUFFIX:
            raise FVDInputError(f"the statistics file must end in {STATS_SUFFIX}, got {output}")
        if role not in ("real", "fake"):
            raise FVDInputError(f"--role is real or fake, not {role!r}")
        refuse_overwriting(output, videos)
        stats = compute_stats(
            _source(videos), role=role, protocol=protocol, frames=frames,  # type: ignore[arg-type]
            weights=weights, seed=seed, device=device, batch_size=batch_size,
            world_size=world_size,
        )  # fmt: skip
        save_stats(output, stats)
    summary = stats.summary
    console.print(
        f"{count_videos(summary.videos)} ({summary.frames} frames"
        + (f", {summary.discarded} too short, left out" if summary.discarded else "")
        + f") → {output} (protocol {protocol}, weights {stats.weights_sha256[:12]}…)"
    )


def register(app: typer.Typer) -> None:
    app.command()(fvd)
    app.command("fvd-stats")(fvd_stats)
