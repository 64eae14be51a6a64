"""Options and helpers that ``i3d predict``, ``evaluate`` and ``features`` share: the
model and protocol options, progress bars, and running a job on N ranks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from i3d.cli.common import err_console
from i3d.data.datasets import AnnotationError
from i3d.data.decode import VideoDecodeError
from i3d.distributed import DistributedError
from i3d.distributed.sharded import ShardedRunError
from i3d.inference.inputs import InputError, ViewProgress

ERRORS = (
    InputError,
    AnnotationError,
    VideoDecodeError,
    ImportError,
    ValueError,
    DistributedError,
    ShardedRunError,
)


WeightsOpt = Annotated[
    Path | None,
    typer.Option(help="Project .safetensors weights (default: the pulled i3d_inception_k400_rgb)."),
]
ClipsOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Temporal clips per video (default: the weights'). Every-frame weights (DeepMind's) "
        "read the whole video as at most N windows of up to 250 frames (default 10), or, with "
        "--clip-len, as N clips (default 10).",
    ),
]
ClipLenOpt = Annotated[
    int | None,
    typer.Option(
        "--clip-len",
        min=1,
        help="Frames per clip T (default: the weights'). Every-frame weights then take N "
        "(--clips, default 10) clips of T consecutive frames instead of windows.",
    ),
]
CropsOpt = Annotated[
    int | None,
    typer.Option(
        help="Spatial crops per clip: 1, 3 or 10 (default: the weights'). 3 crops span the "
        "short side: weights that crop less than it (DeepMind's 224 of 256) get the short "
        "side resized to the crop size."
    ),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Clips per forward pass.")]
BackendOpt = Annotated[str, typer.Option(help="Execution backend (see `i3d backends`).")]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        min=0, help="Processes decoding ahead of the model (default: 0 for one video, else auto)."
    ),
]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        help="fp32 (IEEE float32, never TF32/HF32), or what the backend offers: tf32 on cuda "
        "(HF32 on npu), bf16 / fp16 where the device has the units, int8 on openvino (with "
        "-O calibration=LIST); see `i3d backends`."
    ),
]
BackendOptionOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--option", "-O", help="Backend option key=value (repeatable; see `i3d backends`)."
    ),
]
DeviceOpt = Annotated[
    str | None, typer.Option(help="Device, e.g. cpu, cuda:0, npu:0 (default: the backend's).")
]
FlowImplOpt = Annotated[
    str,
    typer.Option(
        help="Flow and two-stream weights: the flow stream's flow, TV-L1 torch (on --device) "
        "or opencv (reference, CPU), or raft (torchvision RAFT from --raft-weights, on "
        "--device; not the TV-L1 the I3D flow weights were trained on)."
    ),
]
RaftWeightsOpt = Annotated[
    Path | None,
    typer.Option(
        help="--flow-impl raft: a local torchvision RAFT checkpoint (raft_large_*.pth, "
        "raft_small_*.pth or .safetensors); nothing is downloaded."
    ),
]
FlowDirOpt = Annotated[
    Path | None,
    typer.Option(
        help="Flow and two-stream weights: read each video's flow from this folder, and keep "
        "it there when computed (`i3d flow` fills one too)."
    ),
]
WorldSizeOpt = Annotated[
    int,
    typer.Option(
        "--world-size",
        min=1,
        help="Processes, one per device (cpu, cuda:N, npu:N), each taking a share of the "
        "videos; under torchrun the job's ranks. Results are kept per video (OUT.parts/, "
        "snippet folders: DIR/.i3d-parts/) so a rerun finishes only what is missing.",
    ),
]


LogDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--log-dir",
        file_okay=False,
        help="With --world-size N or torchrun: each rank appends its log to "
        "LOG_DIR/rank-R.log (device, each video's time and outcome, warnings).",
    ),
]


def check_log_dir(log_dir: Path | None, world_size: int) -> None:
    """Refuse --log-dir for a one-process run, whose log is the terminal."""
    if log_dir is not None and not is_sharded(world_size):
        raise InputError(
            "--log-dir keeps one log per rank of a --world-size N or torchrun run; a "
            "one-process run logs to the terminal (drop --log-dir, or add --world-size N)"
        )


def is_sharded(world_size: int) -> bool:
    """Whether this run goes through torch.distributed ranks (--world-size N or torchrun)."""
    from i3d.distributed import env_launched

    return world_size > 1 or env_launched()


def parts_folder(output: Path | None) -> Path:
    """Where a sharded run keeps its per-video results: ``OUT.parts`` beside the output, or
    a new temporary folder."""
    if output is not None:
        return output.with_name(output.name + ".parts")
    import tempfile

    return Path(tempfile.mkdtemp(prefix="i3d-parts-"))


def job_progress(progress: Progress, what: str, total: int) -> Callable[[int, int], None]:
    """One bar for the whole job: videos finished on every rank."""
    task = progress.add_task(what, total=total)

    def update(done: int, count: int) -> None:
        progress.update(task, completed=done, total=count)

    return update


class RateColumn(ProgressColumn):
    """Items per second of a task (videos/s on a job's bar), blank until rich has a rate."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:.2f}/s", style="progress.data.speed")


def new_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )


def run_sharded_job(
    run: Callable[..., Any],
    todo: list[Path],
    spec: Any,
    folder: Path,
    world_size: int,
    on_progress: Callable[[int, int], None],
    log_dir: Path | None = None,
) -> Any:
    """``run`` (sharded_scores / sharded_features); an interrupted or failed job says that
    the videos it finished are kept, and how to do the rest."""
    from i3d.distributed.sharded import RunIncomplete

    kept = f"the finished ones are kept in {folder}/; run the same command again to do the rest"
    try:
        return run(todo, spec, folder, world_size, on_progress, log_dir=log_dir)
    except (RunIncomplete, KeyboardInterrupt) as exc:
        left = (
            f"{len(exc.missing)} of {exc.total} videos"
            if isinstance(exc, RunIncomplete)
            else ("the rest")
        )
        err_console.print(f"interrupted: {left} not done; {kept}")
        raise typer.Exit(130) from None
    except DistributedError as exc:
        raise DistributedError(f"{exc}; {kept}") from None


def view_progress(progress: Progress, name: str) -> ViewProgress:
    """A bar of one video's views, saying "decoding" until its first views run."""
    task = progress.add_task(f"{name}: decoding", total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total, description=f"{name}: views")

    return update


def count_videos(count: int) -> str:
    """``1 video`` / ``3 videos``."""
    return f"{count} video{'' if count == 1 else 's'}"


def print_failure(path: Path | str, error: str | None) -> None:
    """One indented line per failed input; the path is not repeated when the error names it."""
    line = error if error and str(path) in error else f"{path}: {error}"
    err_console.print(f"  {escape(line)}", highlight=False, soft_wrap=True)


def report_written(
    written: int, kept: int, output: Path, failed: list[tuple[Path | str, str | None]]
) -> None:
    """The end of a run that writes per-video outputs: how many were written and kept, then
    each failed video on its own line, and exit code 1 when any failed."""
    from rich.console import Console

    Console(soft_wrap=True).print(
        f"{count_videos(written)} written to {output} ({kept} already there)", highlight=False
    )
    if failed:
        err_console.print(f"[red]{count_videos(len(failed))} failed:[/red]")
        for path, error in failed:
            print_failure(path, error)
        raise typer.Exit(1)
