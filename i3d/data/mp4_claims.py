"""Sample counts an MP4/MOV file claims, checked against the bytes it holds before FFmpeg
opens it.

ISO media files describe their samples in compact tables: ``stsz`` can give one size for
every sample and a count, ``trun`` (fragmented files) a count with default sizes, so a file
of a few KB can claim 50 million frames. FFmpeg's mov demuxer builds its index for every
claimed sample while opening the file (24 bytes each): 3.5 GB and seconds of CPU for a
2 KB file, before any check of ours could run. Every sample takes at least one byte of the
file (a constant size: that many), so a file claiming more is refused here first. Only box
headers and those three small tables are read; other files pass unchecked.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

_TOP = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"styp", b"sidx", b"moof"}
_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"moof", b"traf"}
_MAX_BOXES = 1_000_000  # a file of more boxes is left to FFmpeg (no claim found that far)


class SampleClaimError(ValueError):
    """The file's sample tables claim more samples than the file can hold."""


def check_sample_claims(path: str | os.PathLike[str]) -> None:
    """Refuse an MP4/MOV file whose sample tables claim more sample bytes than its size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        first = fh.read(8)
        if len(first) < 8 or first[4:8] not in _TOP:
            return
        claimed = _claimed_bytes(fh, 0, size, size)
    if claimed > size:
        raise SampleClaimError(
            f"{path}: its sample tables claim at least {claimed:,} bytes of frames and audio, "
            f"more than the {size:,}-byte file holds (forged or damaged); refusing to open it"
        )


def _claimed_bytes(fh: BinaryIO, start: int, end: int, size: int) -> int:
    """The least number of bytes the samples claimed by the boxes in [start, end) occupy."""
    total, visited, pos = 0, 0, start
    while pos + 8 <= end and visited < _MAX_BOXES and total <= size:
        fh.seek(pos)
        header = fh.read(16)
        if len(header) < 8:
            break
        length, kind = struct.unpack(">I4s", header[:8])
        skip = 8
        if length == 1 and len(header) == 16:
            length, skip = struct.unpack(">Q", header[8:16])[0], 16
        elif length == 0:
            length = end - pos
        if length < skip:
            break  # damaged: FFmpeg reports it
        visited += 1
        if kind in _CONTAINERS:
            total += _claimed_bytes(fh, pos + skip, min(pos + length, end), size)
        elif kind in (b"stsz", b"stz2", b"trun"):
            fh.seek(pos + skip)
            total += _table_claim(kind, fh.read(12))
        pos += length
    return total


def _table_claim(kind: bytes, body: bytes) -> int:
    """Least bytes of one sample table: count × the constant sample size (at least 1)."""
    if kind == b"trun" and len(body) >= 8:
        return struct.unpack(">I", body[4:8])[0]
    if kind == b"stsz" and len(body) >= 12:
        sample_size, count = struct.unpack(">II", body[4:12])
        return count * max(sample_size, 1)
    if kind == b"stz2" and len(body) >= 12:
        return struct.unpack(">I", body[8:12])[0]
    return 0
