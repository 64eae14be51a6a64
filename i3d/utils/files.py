"""File helpers: atomic writes and hashing, so user files are never half-written."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


class OutputError(OSError):
    """An output file could not be written (missing or read-only directory, disk full)."""


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside ``dst``; on success it is renamed onto ``dst``, else removed.

    The temp file lives in the destination directory so the final rename is atomic and a
    crash or a full disk never leaves a truncated ``dst`` behind.
    """
    dst = Path(dst)
    if dst.is_dir():
        raise OutputError(f"output {dst} is a directory; give a file path")
    parent = dst.parent if str(dst.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output directory {parent} does not exist; create it first")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise OutputError(f"cannot write to {parent}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def ensure_dir(path: str | os.PathLike[str]) -> Path:
    """Create output folder ``path`` (and parents) if needed; a file in the way is an error."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"cannot make output folder {path}: {folder} is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot make output folder {path}: {exc.strerror or exc}") from exc
    return path


def refuse_overwriting(dst: str | os.PathLike[str], *sources: str | os.PathLike[str]) -> None:
    """Raise :class:`OutputError` if output ``dst`` is one of the input files ``sources``."""
    dst = Path(dst)
    for src in sources:
        src = Path(src)
        same = dst.exists() and src.exists() and os.path.samefile(dst, src)
        if same or dst.resolve() == src.resolve():
            raise OutputError(
                f"the output {dst} is the input {src}; writing it would destroy the input — "
                "choose another output path"
            )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def exclusive_lock(lock: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Hold an advisory lock (``flock`` on file ``lock``) while one run writes ``what``; a
    second run at the same time gets an :class:`OutputError` instead of mixing its writes in.
    Without POSIX locks (Windows) runs are not guarded."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise OutputError(f"cannot create the lock file {lock}: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise OutputError(
                f"another i3d run ({holder}) is writing {what}; wait for it to finish, or "
                "write to another output"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the file releases the lock


def remove_stale_temporaries(folder: str | os.PathLike[str], name: str | None = None) -> int:
    """Remove what :func:`atomic_path` leaves when a run is killed mid-write: ``.NAME.*.tmp``
    files in ``folder`` (of output ``name``, or of any). Call it only while holding the
    output's lock, so no live writer's temp file is taken. Returns how many were removed."""
    folder = Path(folder)
    prefix = f".{name}." if name is not None else "."
    removed = 0
    try:
        entries = list(folder.iterdir())
    except OSError:
        return 0
    for entry in entries:
        if entry.name.startswith(prefix) and entry.name.endswith(".tmp") and entry.is_file():
            with contextlib.suppress(OSError):
                entry.unlink()
                removed += 1
    return removed
