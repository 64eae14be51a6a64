"""The ``i3d`` command: a thin typer layer over the Python API.

Each command group lives in its own module, which defines ``register(app)``.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any

import typer
from rich.markup import escape

from i3d.cli.common import err_console, no_room_message
from i3d.utils.files import OutputError


class _App(typer.Typer):
    """The typer app; an output that cannot be written (no room on the disk, quota, ``ulimit
    -f``, a missing folder) ends any command with one line naming it, not a traceback."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            message = str(exc) if isinstance(exc, OutputError) else no_room_message(exc)
            if message is None:
                raise
            err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
            sys.exit(1)


app = _App(
    name="i3d",
    help="I3D video action recognition: convert weights, inspect, predict, export, train.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

COMMAND_MODULES = (
    "weights_cmds",
    "hub_cmds",
    "demo_cmd",
    "predict_cmds",
    "features_cmd",
    "backend_cmds",
    "train_cmds",
    "fvd_cmd",
    "flow_cmd",
)
for _name in COMMAND_MODULES:
    importlib.import_module(f"i3d.cli.{_name}").register(app)


def _print_version(value: bool) -> None:
    """``--version``: print the installed package's version and exit."""
    if value:
        try:
            typer.echo(f"i3d {version('i3d')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            from i3d import __version__

            typer.echo(f"i3d {__version__} (not installed)")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """I3D video action recognition: convert weights, inspect, predict, export, train."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
