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


#: errnos that mean "no room": the disk is full, a quota is spent, or the file-size limit
#: (``ulimit -f``) is reached
NO_ROOM_ERRNOS = frozenset(
    code for code in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", None)) if code
)
_PROBE_BYTES = 1 << 16


def no_room_reason(exc: BaseException) -> str | None:
    """The kernel's words ("No space left on device", ...) if ``exc`` or an error in its chain
    failed for lack of room, else None. Libraries that do their own I/O (safetensors, torch's
    legacy writer) keep only the message, so that is read too."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in NO_ROOM_ERRNOS:
            return os.strerror(current.errno)
        text = str(current)
        for code in NO_ROOM_ERRNOS:
            if os.strerror(code) in text or f"(os error {code})" in text:
                return os.strerror(code)
        current = current.__cause__ or current.__context__
    return None


def _probe_no_room(path: Path) -> str | None:
    """Try to grow ``path`` (a temp file about to be removed) by 64 KiB: the kernel's words if
    it refuses for lack of room. For writers whose errors say nothing of why (torch's zip
    writer: "unexpected pos"; numpy: "N requested and M written")."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError:
        return None
    try:
        data = memoryview(bytes(_PROBE_BYTES))
        while data:
            data = data[os.write(fd, data) :]
    except OSError as exc:
        return os.strerror(exc.errno) if exc.errno in NO_ROOM_ERRNOS else None
    finally:
        os.close(fd)
    return None


def no_room_error(dst: Path, reason: str, hint: str = "") -> OutputError:
    """The one-line error for output ``dst`` that did not fit: what happened, that the
    previous file is kept, and what to do."""
    kept = f"the previous {dst.name} is unchanged" if dst.exists() else "nothing was written"
    todo = hint or "Free space there (or raise the quota or file-size limit), or write elsewhere"
    return OutputError(f"cannot write {dst}: {reason[:1].lower()}{reason[1:]}; {kept}. {todo}")


@contextlib.contextmanager
def no_room_as_output_error(
    dst: str | os.PathLike[str], probe: str | os.PathLike[str] | None = None, hint: str = ""
) -> Iterator[None]:
    """Turn a failure for lack of room (ENOSPC, EDQUOT, EFBIG) while writing ``dst`` into an
    :class:`OutputError` naming it; ``probe`` is the temp file being written, grown a little
    to learn whether an error that gives no reason was one. Other errors pass unchanged."""
    try:
        yield
    except OutputError:
        raise
    except Exception as exc:
        reason = no_room_reason(exc)
        if reason is None and probe is not None and not type(exc).__module__.startswith("i3d"):
            reason = _probe_no_room(Path(probe))
        if reason is None:
            raise
        raise no_room_error(Path(dst), reason, hint) from exc


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike[str], hint: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``dst``; on success it is renamed onto ``dst``, else removed.

    The temp file lives in the destination directory so the final rename is atomic and a
    crash or a full disk never leaves a truncated ``dst`` behind. Running out of room (disk,
    quota, file-size limit) is an :class:`OutputError` naming ``dst`` (``hint``: what to do).
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
        with no_room_as_output_error(dst, tmp, hint):
            yield tmp
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
            os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def reserve(path: str | os.PathLike[str]) -> None:
    """Allocate the disk blocks of file ``path`` at its size now, so a memory map of it fails
    here with an OSError on a full disk, not later with SIGBUS when a page is written."""
    size = os.path.getsize(path)
    if size == 0 or not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # no fallocate on this disk
            raise
    finally:
        os.close(fd)


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
