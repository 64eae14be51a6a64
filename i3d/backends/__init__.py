"""Execution backends, discovered only through the ``i3d.backends`` entry-point group.

i3d registers its own (torch, npu, onnx, om) in its package metadata; a third-party package
adds one by declaring, in its ``pyproject.toml``::

    [project.entry-points."i3d.backends"]
    mybackend = "my_package.module:MyBackend"

where ``MyBackend()`` (no arguments) implements :class:`i3d.backends.base.Backend`.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

from i3d.backends.base import (
    PRECISIONS,
    Availability,
    Backend,
    BackendError,
    BackendUnavailable,
    Runner,
)

GROUP = "i3d.backends"


def _entry_points() -> dict[str, EntryPoint]:
    """Registered backends by name; two distributions claiming one name is an error."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        previous = found.get(ep.name)
        if previous is not None and previous.value != ep.value:
            raise BackendError(
                f"two installed packages register backend {ep.name!r}: {previous.value} and "
                f"{ep.value}; uninstall one of them"
            )
        found[ep.name] = ep
    return found


def list_backends() -> list[str]:
    """Names of the installed backends (available or not), sorted."""
    return sorted(_entry_points())


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``; an unknown name lists the installed ones."""
    eps = _entry_points()
    if name not in eps:
        raise BackendError(
            f"unknown backend {name!r}; installed backends: {', '.join(sorted(eps)) or 'none'}"
        )
    try:
        target = eps[name].load()
    except Exception as exc:  # a broken plugin must not take the CLI down with a traceback
        raise BackendError(
            f"backend {name!r} ({eps[name].value}) failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    backend = target() if isinstance(target, type) else target
    if not isinstance(backend, Backend):
        raise BackendError(
            f"backend {name!r} ({eps[name].value}) does not implement the Backend protocol "
            "(name, is_available(), load())"
        )
    return backend


def require_backend(name: str) -> Backend:
    """The backend ``name`` if it can run here, else :class:`BackendUnavailable` with the fix."""
    impl = get_backend(name)
    availability = impl.is_available()
    if not availability.ok:
        hint = f"; {availability.install_hint}" if availability.install_hint else ""
        raise BackendUnavailable(f"backend {name!r} is unavailable: {availability.reason}{hint}")
    return impl


def load_runner(
    weights_or_model: Any,
    backend: str = "torch",
    device: str | None = None,
    precision: str = "fp32",
    batch_size: int | None = None,
    **options: Any,
) -> Runner:
    """Load weights, a model or a compiled file on ``backend``; ``runner.predict`` gives logits.

    ``device=None`` picks the backend's default (``cpu`` for torch/onnx, ``npu:0`` for
    npu/om); ``batch_size`` caps the clips per forward call (views are folded into clips).
    """
    if batch_size is not None and batch_size < 1:
        raise BackendError(f"batch size must be at least 1, got {batch_size}")
    impl = require_backend(backend)
    return impl.load(weights_or_model, device, precision, batch_size, **options)


__all__ = [
    "GROUP",
    "PRECISIONS",
    "Availability",
    "Backend",
    "BackendError",
    "BackendUnavailable",
    "Runner",
    "get_backend",
    "list_backends",
    "load_runner",
    "require_backend",
]
