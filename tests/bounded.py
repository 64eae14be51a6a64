"""Test helper: run a job in a forked child under real kernel limits and measure it.

The child is forked from the test process, which has already imported torch, PyAV and the
CLI, so a case costs no import (about 3 s of CPU each in a fresh interpreter). Its address
space may grow by ``memory`` bytes past what it inherited (RLIMIT_AS, so an allocation the
code under test should never make fails instead of succeeding slowly), it is killed after
``seconds`` (SIGALRM), and its files cannot grow past ``file_size`` (RLIMIT_FSIZE: EFBIG,
as a full disk gives ENOSPC). ``peak_rss`` is how far its resident set grew at its peak:
the kernel's high-water mark (wait4's ru_maxrss, which starts at the RSS inherited at fork)
minus the RSS it had when the job started.
"""

from __future__ import annotations

import gc
import os
import resource
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import attrs

MiB = 2**20


@attrs.frozen
class Outcome:
    """What a bounded child did: exit status (negative: killed by that signal), its output,
    how far its RSS grew at the peak (bytes) and its wall time (s)."""

    status: int
    stdout: str
    stderr: str
    peak_rss: int
    seconds: float

    def lines(self) -> list[str]:
        """The non-blank lines it wrote to stderr."""
        return [line.strip() for line in self.stderr.splitlines() if line.strip()]


def _vm_kib(field: str) -> int:
    """A ``/proc/self/status`` size (VmRSS, VmSize) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _drain(fd: int, texts: dict[int, bytes]) -> None:
    """Read the pipe ``fd`` to its end into ``texts[fd]`` (a full pipe would stall the child)."""
    with open(fd, "rb") as fh:
        texts[fd] = fh.read()


def run_bounded(
    job: Callable[[], object],
    tmpdir: Path,
    *,
    memory: int = 512 * MiB,
    seconds: int = 60,
    file_size: int | None = None,
) -> Outcome:
    """Run ``job`` in a forked child with TMPDIR ``tmpdir`` under the limits above; a
    ``SystemExit`` gives its code, another exception prints its traceback and exits 71."""
    import torch

    pipes = [os.pipe() for _ in range(3)]  # stdout, stderr, the RSS at the start (KiB)
    (out_read, out_write), (err_read, err_write), (read, write) = pipes
    gc.collect()  # an earlier test's cycles (an FFmpeg decoder waiting on the parent's
    # threads) must not be freed in the child, where those threads do not exist
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 70
        try:
            for fd in (out_read, err_read, read):
                os.close(fd)
            os.dup2(out_write, 1)  # pipes, not files: those the file-size limit would stop
            os.dup2(err_write, 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            os.environ["TMPDIR"] = str(tmpdir)
            tempfile.tempdir = None
            torch.set_num_threads(1)  # as a DataLoader worker: no thread pool after fork
            resource.setrlimit(
                resource.RLIMIT_AS,
                (_vm_kib("VmSize") * 1024 + memory, resource.getrlimit(resource.RLIMIT_AS)[1]),
            )
            if file_size is not None:
                hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, hard))
            os.write(write, str(_vm_kib("VmRSS")).encode())
            os.close(write)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            signal.alarm(seconds)
            job()
            status = 0
        except SystemExit as exc:
            status = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            status = 71
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    for fd in (out_write, err_write, write):
        os.close(fd)
    texts: dict[int, bytes] = {}
    readers = [threading.Thread(target=_drain, args=(fd, texts)) for fd in (out_read, err_read)]
    for reader in readers:
        reader.start()
    _, wait_status, usage = os.wait4(pid, 0)
    seconds_taken = time.monotonic() - start
    for reader in readers:
        reader.join()
    with open(read, "rb") as fh:
        base_kib = int(fh.read() or 0)
    return Outcome(
        status=os.waitstatus_to_exitcode(wait_status),
        stdout=texts[out_read].decode(errors="replace"),
        stderr=texts[err_read].decode(errors="replace"),
        peak_rss=(usage.ru_maxrss - base_kib) * 1024,
        seconds=seconds_taken,
    )
