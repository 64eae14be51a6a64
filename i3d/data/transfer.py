"""Host-to-device transfer of uint8 view pieces, one piece ahead of the model.

On cuda and npu a piece's views are copied from page-locked memory (pinned by the
DataLoader's pin thread, or here), non-blocking, on a side stream; the compute stream waits
for that copy only where it first uses the views. :meth:`DeviceFeed.ahead` starts the copy
of piece n + 1 before it hands piece n to the model, so the copy runs while piece n's
forward does and the model never waits for a piece the loader already has. Elsewhere (cpu,
mps) it is a plain ``.to(device)``: nothing to overlap with.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import attrs
import torch

from i3d.data.pipeline import ViewPiece

STREAM_DEVICES = ("cuda", "npu")
"""Device types with streams and page-locked host memory (torch.cuda, torch_npu's torch.npu)."""

_Item = TypeVar("_Item")


def pins_memory(device: torch.device | str) -> bool:
    """Whether host tensors bound for ``device`` are worth pinning (cuda, npu)."""
    return torch.device(device).type in STREAM_DEVICES


@attrs.frozen
class Staged:
    """A tensor whose copy to the device may still run, and the event that marks its end."""

    tensor: torch.Tensor
    done: Any = None


class DeviceFeed:
    """Copies host tensors to ``device`` ahead of use (see the module docstring).

    ``streams`` is the device's stream module (``torch.cuda``, ``torch.npu``); by default it
    is looked up for cuda and npu devices, and None (plain copies) for the others.
    """

    def __init__(self, device: torch.device | str, streams: Any = None) -> None:
        self.device = torch.device(device)
        if streams is None and pins_memory(self.device):
            streams = getattr(torch, self.device.type)
        self._streams = streams
        self._side = streams.Stream(self.device) if streams is not None else None

    @property
    def overlaps(self) -> bool:
        """Whether copies run on a side stream (cuda, npu) rather than in line."""
        return self._side is not None

    def start(self, host: torch.Tensor) -> Staged:
        """Begin copying ``host`` to the device: pinned, non-blocking, on the side stream."""
        if self._side is None or host.device == self.device:
            return Staged(host.to(self.device))
        if host.device.type == "cpu" and not host.is_pinned():
            host = host.pin_memory()  # an async copy needs page-locked memory to be async
        with self._streams.stream(self._side):
            tensor = host.to(self.device, non_blocking=True)
            done = self._streams.Event()
            done.record(self._side)
        return Staged(tensor, done)

    def take(self, staged: Staged) -> torch.Tensor:
        """The staged tensor, usable on the current stream once its copy is done."""
        if staged.done is None:
            return staged.tensor
        current = self._streams.current_stream(self.device)
        current.wait_event(staged.done)
        staged.tensor.record_stream(current)  # its memory stays ours until that stream is past it
        return staged.tensor

    def ahead(self, items: Iterable[_Item]) -> Iterator[_Item]:
        """``items`` in order with each :class:`ViewPiece`'s views (bare, or in ``(index,
        piece)`` pairs) on the device; a piece is handed out only once the next piece's copy
        has started (other items, such as error texts, wait in line with it)."""
        if not self.overlaps:  # nothing to overlap with: each item goes on at once
            for item in items:
                piece = _piece_of(item)
                yield self._landed(item, self.start(piece.views) if piece is not None else None)
            return
        waiting: deque[tuple[_Item, Staged | None]] = deque()
        for item in items:
            piece = _piece_of(item)
            staged = self.start(piece.views) if piece is not None else None
            if staged is not None:
                while waiting:
                    yield self._landed(*waiting.popleft())
            waiting.append((item, staged))
        while waiting:
            yield self._landed(*waiting.popleft())

    def _landed(self, item: _Item, staged: Staged | None) -> _Item:
        """``item`` with its piece's views replaced by their device copy."""
        if staged is None:
            return item
        views = self.take(staged)
        if isinstance(item, ViewPiece):
            return attrs.evolve(item, views=views)  # type: ignore[return-value]
        index, piece = item  # type: ignore[misc]
        return (index, attrs.evolve(piece, views=views))  # type: ignore[return-value]


def _piece_of(item: object) -> ViewPiece | None:
    """The view piece an item carries: itself, the second of an (index, piece) pair, or none
    (an error text, a flow piece: those go to the model as they are)."""
    if isinstance(item, ViewPiece):
        return item
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], ViewPiece):
        return item[1]
    return None
