"""Large output buffers that fill fast: transparent huge pages for frame tensors on Linux.

A K400 test sample is ~190 MB of uint8 views written once; with 4 KiB pages about half of
that write is page-fault handling. Advising the kernel to back the buffer with 2 MiB pages
(``MADV_HUGEPAGE``, honoured when THP is in ``madvise`` or ``always`` mode) halves the cost.
Elsewhere, or if the call fails, the buffer is an ordinary tensor.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


@functools.cache
def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """libc's madvise on Linux, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    func = libc.madvise
    func.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    func.restype = ctypes.c_int
    return func


def empty_frames(shape: tuple[int, ...], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """``torch.empty(shape, dtype)``, backed by huge pages where the platform allows."""
    out = torch.empty(shape, dtype=dtype)
    madvise = _madvise()
    nbytes = out.numel() * out.element_size()
    if madvise is not None and nbytes >= 4 * _HUGE_PAGE:
        start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        madvise(start, end - start, _MADV_HUGEPAGE)  # a hint: failure leaves normal pages
    return out
