"""Parsing text that comes from files the user did not write (weights metadata, feature
stores, statistics files, prediction lists): bounded in size and nesting, one-line errors."""

from __future__ import annotations

import json
from typing import Any, BinaryIO

import numpy as np

MAX_JSON_BYTES = 64 << 20
"""Largest JSON text read from a file's metadata or a record (64 MiB: labels of tens of
thousands of classes, or a feature store's video list, fit many times over)."""


def load_json(text: str | bytes, what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """``json.loads`` that refuses oversized text and nesting deeper than Python can parse
    (a ``RecursionError`` deep inside the parser otherwise) with a ``ValueError`` naming
    ``what``; malformed JSON is a ``json.JSONDecodeError`` (a ``ValueError``) as usual."""
    if len(text) > max_bytes:
        raise ValueError(
            f"{what} is {len(text):,} bytes of JSON, more than the {max_bytes:,} read from a file"
        )
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{what} is JSON nested too deeply to be real metadata") from None


def read_npy_header(fh: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) of an ``.npy`` stream, which is left at the data; only
    the header is parsed (never a pickle), so callers check sizes before reading. A damaged
    or unknown header is a ``ValueError``."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    if version in ((2, 0), (3, 0)):
        return np.lib.format.read_array_header_2_0(fh)
    raise ValueError(f"unsupported .npy version {version}")
