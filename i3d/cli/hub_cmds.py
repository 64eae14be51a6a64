"""``i3d weights list`` / ``pull`` (the named pretrained weights in the user cache) and
``combine`` (a two-stream file from an RGB and a Flow file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from i3d.cli.common import fail_on_errors
from i3d.weights import hub


class _SizedOnly(ProgressColumn):
    """A column shown only while the step has a known size (a download): the pip fetch,
    extraction and conversion steps show their spinner, name and time, not "0/? bytes"."""

    def __init__(self, column: ProgressColumn) -> None:
        super().__init__()
        self.column = column

    def render(self, task: Task) -> Text:
        return self.column.render(task) if task.total is not None else Text("")


console = Console(soft_wrap=True)  # log lines stay whole when redirected
status = Console(stderr=True, soft_wrap=True)
weights_app = typer.Typer(
    help="Pretrained weights: list them, pull them into the cache, combine two streams.",
    no_args_is_help=True,
)


def _sha(entry: hub.HubEntry) -> str:
    return entry.sha256 if len(entry.sha256) == 64 else f"{entry.sha256}... (prefix)"


def _row(e: hub.HubEntry, problem: str | None) -> dict[str, object]:
    """One entry of `i3d weights list`; ``problem``: why its cached file is unreadable."""
    return {
        "name": e.name,
        "architecture": e.architecture,
        "source": e.source,
        "url": e.where,
        "sha256": e.sha256,
        "top1": e.top1,
        "top1_note": e.top1_note,
        "license": e.license,
        "pulled": hub.weights_path(e).is_file() and problem is None,
        "damaged": problem is not None,
    }


@weights_app.command("list")
def list_weights(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the pullable weights: architecture, source, SHA-256, reported top-1, license."""
    rows = [_row(e, hub.damage(e)) for e in hub.REGISTRY.values()]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"pretrained weights (cache: {hub.cache_dir()})")
    table.add_column("name", no_wrap=True)
    for column in ("architecture", "source", "SHA-256", "top-1", "license", "pulled"):
        table.add_column(column, overflow="fold")
    for entry, row in zip(hub.REGISTRY.values(), rows, strict=True):
        table.add_row(
            entry.name,
            entry.architecture,
            entry.source,
            _sha(entry),
            "-" if entry.top1 is None else f"{entry.top1:.2f}",
            entry.license,
            "yes" if row["pulled"] else "damaged" if row["damaged"] else "",
        )
    console.print(table)
    if any(row["damaged"] for row in rows):
        console.print("damaged: the cached file is unreadable; `i3d weights pull NAME` replaces it")
    for note in dict.fromkeys(e.top1_note for e in hub.REGISTRY.values() if e.top1_note):
        console.print(f"top-1 as reported: {note}")


@weights_app.command("pull")
def pull(
    name: Annotated[str, typer.Argument(help="Weights name (see `i3d weights list`).")],
    from_file: Annotated[
        Path | None,
        typer.Option(
            "--from-file", help="Use an already downloaded file (offline); still verified."
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Convert again even if already in the cache.")
    ] = False,
    mirror: Annotated[
        str | None,
        typer.Option(help=f"Base URL replacing the download URL's directory (${hub.MIRROR_ENV})."),
    ] = None,
    trust_prefix: Annotated[
        bool,
        typer.Option(
            "--trust-prefix",
            help="Accept a file checked only by the 8-hex (32-bit) hash prefix its publisher "
            "gives (mmaction2): a forged file can match 32 bits in about an hour of CPU.",
        ),
    ] = False,
) -> None:
    """Download (once), verify and convert named weights into the cache; print the file's path."""
    with fail_on_errors():
        entry = hub.get_entry(name)
        if hub.is_pulled(entry) and not force:
            status.print(f"{entry.name} is already pulled (use --force to convert again)")
            typer.echo(str(hub.weights_path(entry)))
            return
        if trust_prefix and entry.prefix_only:
            status.print(f"[yellow]warning:[/yellow] {escape(hub.prefix_risk(entry))}")
        problem = hub.damage(entry)
        if problem is not None:
            status.print(
                f"the cached copy of {entry.name} is damaged ({escape(problem)}); pulling again"
            )
        with Progress(
            SpinnerColumn(),
            "[progress.description]{task.description}",
            _SizedOnly(BarColumn()),
            _SizedOnly(DownloadColumn()),
            _SizedOnly(TransferSpeedColumn()),
            TimeElapsedColumn(),
            console=status,
            transient=True,
        ) as bar:
            task = bar.add_task(f"pulling {entry.name}", total=None)

            def progress(done: int, total: int | None) -> None:
                bar.update(task, completed=done, total=total)

            def stage(what: str) -> None:
                bar.update(task, description=what, completed=0, total=None)
                if not status.is_terminal:  # no live bar: one line per step
                    status.print(what, highlight=False)

            path = hub.pull(
                entry, from_file=from_file, force=force, mirror=mirror, progress=progress,
                stage=stage, trust_prefix=trust_prefix,
            )
    status.print(f"[green]pulled[/green] {entry.name}")
    typer.echo(str(path))


@weights_app.command("combine")
def combine(
    rgb: Annotated[Path, typer.Argument(help="RGB-stream Inception I3D (.safetensors).")],
    flow: Annotated[Path, typer.Argument(help="Flow-stream Inception I3D (.safetensors).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Two-stream weight file.")],
) -> None:
    """Build a two-stream (RGB + flow) weight file; its logits are the streams' summed."""
    from i3d.weights.two_stream import combine_two_stream

    with fail_on_errors():
        path = combine_two_stream(rgb, flow, output)
    console.print(f"[green]wrote[/green] {path} (inception_i3d_two_stream)", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(weights_app, name="weights")
