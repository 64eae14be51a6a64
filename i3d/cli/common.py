"""Shared CLI helpers: turn known errors into one clear line and a non-zero exit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.markup import escape

from i3d.models.config import ConfigError
from i3d.models.recognizer import InputShapeError
from i3d.utils.files import OutputError, no_room_reason
from i3d.weights.format import WeightsError

err_console = Console(stderr=True, soft_wrap=True)

#: errors whose message is meant for the user as is (no traceback)
USER_ERRORS: tuple[type[BaseException], ...] = (
    WeightsError,
    ConfigError,
    InputShapeError,
    OutputError,
    FileNotFoundError,
    PermissionError,
    KeyError,
)


@contextlib.contextmanager
def fail_on_errors(*extra: type[BaseException]) -> Iterator[None]:
    """Print ``error: <message>`` to stderr and exit 1 for user-facing errors."""
    try:
        yield
    except (*USER_ERRORS, *extra) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        err_console.print(
            f"[red]error:[/red] {escape(str(message))}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(1) from None


def no_room_message(exc: BaseException) -> str | None:
    """The one-line message for an error that came from an output not fitting (disk full,
    quota, file-size limit), else None: the file it names and what to do."""
    reason = no_room_reason(exc)
    if reason is None:
        return None
    where = getattr(exc, "filename", None)
    what = f"cannot write {where}" if where else "an output could not be written"
    return (
        f"{what}: {reason[:1].lower()}{reason[1:]}. Free space (or raise the quota or "
        "file-size limit), or write elsewhere"
    )
