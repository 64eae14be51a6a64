"""Loader workers whose shared-memory hand-off fails end the run at once, with one line.

Each case runs the real condition in a child forked from the test process
(:func:`bounded.run_bounded`): a ``/dev/shm`` too small for a decoded clip, a full one (no
room even for the loader's queues), both on a private tmpfs in the child's own mount
namespace (the machine's ``/dev/shm`` is never touched), or a file-size limit
(RLIMIT_FSIZE) below a clip's size. Before the fix torch's queue feeder thread printed the
error and dropped the item, and the main process waited for it for ever.
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from bounded import MiB, Outcome, run_bounded
from tinymodel import save_tiny_weights
from videogen import write_video

CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
NO_NAMESPACE = 77  # the child's exit status when it cannot have a private /dev/shm
DEADLINE = 30  # s; the old code hung until this killed it
FULL = re.compile(
    r"error: shared memory \(/dev/shm\) is full: .*, or decode in this process .*--workers 0$"
)
FILE_LIMIT = re.compile(r"error: the file-size limit \(ulimit -f\) is too small .*--workers 0$")


def _private_shm(size: str) -> None:
    """In this (forked, single-threaded) process: a mount namespace of its own whose
    ``/dev/shm`` is a new tmpfs of ``size``; exit NO_NAMESPACE when that is impossible."""
    libc = ctypes.CDLL(None, use_errno=True)
    tmpfs = f"size={size}".encode()
    steps: list[tuple[str, Callable[[], int]]] = [
        ("unshare(CLONE_NEWNS)", lambda: libc.unshare(CLONE_NEWNS)),
        (
            "mount --make-rprivate /",
            lambda: libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None),
        ),
        ("mount tmpfs /dev/shm", lambda: libc.mount(b"tmpfs", b"/dev/shm", b"tmpfs", 0, tmpfs)),
    ]
    for what, call in steps:
        if call() != 0:
            print(f"{what}: {os.strerror(ctypes.get_errno())}", file=sys.stderr)
            os._exit(NO_NAMESPACE)


def _bounded(job: Callable[[], object], tmpdir: Path, **limits: int) -> Outcome:
    """``job`` in a bounded child (:func:`bounded.run_bounded`, DEADLINE seconds), this
    process's garbage collected first: an FFmpeg decoder an earlier test left in a reference
    cycle, freed in the child (by ``worker_loader``'s collection), waits there for good on
    decoding threads that only this process has."""
    gc.collect()
    return run_bounded(job, tmpdir, seconds=DEADLINE, **limits)


def _in_private_shm(size: str, job: Callable[[], object], tmpdir: Path, **limits: int) -> Outcome:
    """``job`` in a bounded child whose ``/dev/shm`` is a private tmpfs of ``size``; skips
    when this machine cannot make one (no CAP_SYS_ADMIN, no mount namespaces)."""

    def private() -> object:
        _private_shm(size)
        return job()

    done = _bounded(private, tmpdir, **limits)
    if done.status == NO_NAMESPACE:
        pytest.skip(f"cannot make a private /dev/shm here: {done.stderr.strip()}")
    return done


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, list[str]]:
    """Tiny weights whose clip (3 x 8 x 128², 384 KiB as uint8) outgrows a 256 KiB
    ``/dev/shm``, and three short videos."""
    root = tmp_path_factory.mktemp("shm")
    weights = save_tiny_weights(
        root / "w.safetensors", ("a", "b"), resize_short=128, crop_size=128, input_size=128
    )
    videos = [str(write_video(root / f"v{i}.mp4", 12, width=40, height=32)) for i in range(3)]
    return weights, videos


def _predict(weights: Path, videos: list[str]) -> Callable[[], object]:
    """``i3d predict`` with two loader workers, as a job."""
    from i3d.cli.main import app

    args = ["predict", *videos, "--weights", str(weights), "--workers", "2"]
    return lambda: app(args, prog_name="i3d")


def _one_line(done: Outcome, pattern: re.Pattern[str]) -> None:
    """Exit 1 well before the deadline, with one stderr line matching ``pattern``."""
    printed = done.stdout + done.stderr
    assert done.status == 1, f"status {done.status} after {done.seconds:.1f} s:\n{printed}"
    assert done.lines() and pattern.match(done.lines()[-1]), printed
    assert len(done.lines()) == 1 and "Traceback" not in printed, printed
    assert done.seconds < DEADLINE / 2, done.seconds


@pytest.mark.parametrize("size", ["256k", "4k"], ids=["no-room-for-a-clip", "full"])
def test_predict_with_workers_and_dev_shm_full_ends_with_one_line(inputs, tmp_path, size):
    """256 KiB holds the loader's queues but not a clip; 4 KiB not even the queues'
    semaphores (torch's half-made iterator printed an ignored AttributeError then)."""
    done = _in_private_shm(size, _predict(*inputs), tmp_path)
    _one_line(done, FULL)


def test_predict_with_workers_under_a_small_file_size_limit_ends_with_one_line(inputs, tmp_path):
    """A shared-memory segment is a file: ``ulimit -f`` below a clip's size fails it (EFBIG)."""
    done = _bounded(_predict(*inputs), tmp_path, file_size=64 * 1024)
    _one_line(done, FILE_LIMIT)


class _Clips(torch.utils.data.Dataset):
    """Four 256 KiB uint8 "clips"."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.full((256 * 1024,), index, dtype=torch.uint8)


def test_a_batched_worker_loader_with_dev_shm_full_raises_shared_memory_error(tmp_path):
    """The training loop's kind of loader (batches made by torch's collate, which allocates
    them in shared memory in the worker) raises SharedMemoryError with its one line."""
    from i3d.data.datasets import worker_loader
    from i3d.data.handoff import SharedMemoryError

    def job() -> None:
        try:
            list(worker_loader(_Clips(), 1, batch_size=2))
        except SharedMemoryError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)

    done = _in_private_shm("256k", job, tmp_path, memory=512 * MiB)
    _one_line(done, FULL)


def test_a_worker_loader_hands_over_the_same_items_through_shared_memory():
    """Where shared memory has room, items arrive as decoded, batched or not."""
    from i3d.data.datasets import worker_loader

    batches = list(worker_loader(_Clips(), 2, batch_size=2))
    assert [b[:, 0].tolist() for b in batches] == [[0, 1], [2, 3]]
    assert [int(x[0]) for x in worker_loader(_Clips(), 2, batch_size=None)] == [0, 1, 2, 3]
