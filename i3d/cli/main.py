"""The ``i3d`` command: a thin typer layer over the Python API.

Each command group lives in its own module and registers itself here.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="i3d",
    help="I3D video action recognition: convert weights, inspect, predict, export, train.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# command modules: each defines `register(app)`
from i3d.cli import weights_cmds  # noqa: E402

weights_cmds.register(app)
# (register further command modules below)
from i3d.cli import predict_cmds  # noqa: E402

predict_cmds.register(app)
from i3d.cli import backend_cmds  # noqa: E402

backend_cmds.register(app)
from i3d.cli import demo_cmd  # noqa: E402

demo_cmd.register(app)
from i3d.cli import hub_cmds  # noqa: E402

hub_cmds.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
