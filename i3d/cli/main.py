"""The ``i3d`` command: a thin typer layer over the Python API.

Each command group lives in its own module, which defines ``register(app)``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

import typer

app = typer.Typer(
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
