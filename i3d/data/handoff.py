"""How loader workers hand decoded items to the main process, through shared memory.

A DataLoader worker puts each item on a multiprocessing queue whose feeder thread pickles
it, and torch's pickling moves every tensor into a shared-memory segment (``/dev/shm``)
there. A segment that could not be made (``/dev/shm`` full: ENOSPC from torch's
``posix_fallocate``; a file-size limit, ``ulimit -f``: EFBIG) raised in that thread, which
only prints the error and drops the item: the worker lived on, so the main process waited
for that item for ever. Here the worker moves the item into shared memory itself, before
it is queued, and when that fails sends a small note instead (no tensor, so it needs no
shared memory), which the main process raises as a one-line :class:`SharedMemoryError`.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Callable, Iterator
from multiprocessing.reduction import ForkingPickler
from typing import Any

import attrs
import torch
from torch.utils.data import DataLoader, get_worker_info
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from i3d.utils.files import OutputError, no_room_reason

SHM_DIR = "/dev/shm"


class SharedMemoryError(OutputError):
    """Loader workers could not hand a decoded item over through shared memory."""


@attrs.frozen
class _Unshared:
    """What a worker sends in place of an item it could not put in shared memory: why."""

    reason: str


class _Sharer(ForkingPickler):
    """Walks an item as the queue's pickling will, moving each tensor it reaches into shared
    memory now (the stream is thrown away; the queue's pickling then finds them shared)."""

    def persistent_id(self, obj: Any) -> int | None:
        """Share a tensor or storage (and write only a placeholder); None for the rest."""
        if isinstance(obj, torch.Tensor | torch.UntypedStorage | torch.TypedStorage):
            obj.share_memory_()
            return 0
        return None


def share_tensors(item: Any) -> None:
    """Move every tensor in ``item`` (any picklable structure) into shared memory, raising
    torch's RuntimeError here when a segment cannot be made."""
    _Sharer(io.BytesIO()).dump(item)


@attrs.frozen
class SharingCollate:
    """A loader's ``collate_fn`` that, in a worker, leaves its result in shared memory, or
    gives an :class:`_Unshared` note when it cannot (in the main process it only collates).

    torch's collate already makes a batch in shared memory in a worker, so a collate error
    for lack of room (ENOSPC, EFBIG, EDQUOT) is a shared-memory failure too.
    """

    collate: Callable[[Any], Any]

    def __call__(self, batch: Any) -> Any:
        """The collated ``batch``, shared; or why it could not be."""
        if get_worker_info() is None:
            return self.collate(batch)
        try:
            data = self.collate(batch)
        except RuntimeError as exc:
            if no_room_reason(exc) is None:
                raise
            return _Unshared(str(exc))
        try:
            share_tensors(data)
        except RuntimeError as exc:
            return _Unshared(str(exc))
        return data


class _WorkerIter(_MultiProcessingDataLoaderIter):
    """torch's worker iterator, cleaned up when making it fails part-way (a queue's
    semaphore did not fit in ``/dev/shm``): its own ``__del__`` would then print an ignored
    AttributeError about what it had not made yet, and leave started workers running."""

    def __init__(self, loader: DataLoader) -> None:
        try:
            super().__init__(loader)
        except BaseException:
            self._shutdown = True  # what torch's __del__ checks first: nothing left to do
            for worker in getattr(self, "_workers", ()):
                worker.terminate()
                worker.join()
            raise


class WorkerLoader(DataLoader):
    """A DataLoader whose workers hand items over with :class:`SharingCollate`: an item that
    did not fit in shared memory, or queues that could not be made there, end the iteration
    with :class:`SharedMemoryError` instead of a hang or a traceback."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.collate_fn = SharingCollate(self.collate_fn)

    def _get_iterator(self) -> Any:
        """torch's iterator for this loader; :class:`_WorkerIter` when it has workers."""
        if self.num_workers == 0:
            return super()._get_iterator()
        self.check_worker_number_rationality()
        return _WorkerIter(self)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        """The loader's items; raises :class:`SharedMemoryError` where a worker's did not fit."""
        try:
            items = super().__iter__()
        except OSError as exc:  # the queues' semaphores live in /dev/shm too
            if no_room_reason(exc) is None:
                raise
            raise SharedMemoryError(shared_memory_message(str(exc))) from None
        for item in items:
            if isinstance(item, _Unshared):
                raise SharedMemoryError(shared_memory_message(item.reason))
            yield item


def shared_memory_message(reason: str) -> str:
    """The one line for a failed hand-off: what was wrong (from torch's or the kernel's
    ``reason``) and what to do."""
    if os.strerror(errno.ENOSPC) in reason:
        return (
            f"shared memory ({SHM_DIR}) is full: the loader workers cannot hand decoded clips "
            "to this process; free space there (or make it larger, e.g. docker run "
            "--shm-size), or decode in this process with --workers 0"
        )
    if os.strerror(errno.EFBIG) in reason:
        return (
            "the file-size limit (ulimit -f) is too small for the loader workers to hand "
            f"decoded clips over through shared memory ({SHM_DIR}); raise it, or decode in "
            "this process with --workers 0"
        )
    detail = reason.strip().splitlines()[0] if reason.strip() else "unknown error"
    return (
        f"the loader workers cannot hand decoded clips over through shared memory "
        f"({SHM_DIR}): {detail}; decode in this process with --workers 0"
    )
