"""The ``i3d`` command: a thin typer layer over the Python API.

Each command group lives in its own module, which defines ``register(app)``.
"""

from __future__ import annotations

import importlib

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
    "backend_cmds",
    "train_cmds",
)
for _name in COMMAND_MODULES:
    importlib.import_module(f"i3d.cli.{_name}").register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
