"""One entry point for every checkpoint converter, with source-format detection."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from i3d.utils.files import refuse_overwriting
from i3d.weights.format import WeightsError

Converter = Callable[..., Any]
"""``converter(src, dst, *, preset, labels) -> Path`` (``preset`` may be None); converters of
formats whose detection loads the file also take ``checkpoint=`` (its already-loaded content),
so a checkpoint is unpickled once."""


def _mmaction(src: Path, dst: Path, *, preset: str | None, labels: tuple[str, ...] | None) -> Path:
    from i3d.weights.mmaction import convert_mmaction

    return convert_mmaction(src, dst, preset=preset, labels=labels)


def _deepmind(src: Path, dst: Path, *, preset: str | None, labels: tuple[str, ...] | None) -> Path:
    from i3d.weights.deepmind import convert_deepmind

    return convert_deepmind(src, dst, labels=labels, preset=preset)


def _pytorch_i3d(
    src: Path, dst: Path, *, preset: str | None, labels: tuple[str, ...] | None
) -> Path:
    from i3d.weights.deepmind import convert_pytorch_i3d

    return convert_pytorch_i3d(src, dst, labels=labels, preset=preset)


def _pytorch_resnet3d(
    src: Path,
    dst: Path,
    *,
    preset: str | None,
    labels: tuple[str, ...] | None,
    checkpoint: Any = None,
) -> Path:
    from i3d.weights.pytorch_resnet3d import convert_pytorch_resnet3d

    return convert_pytorch_resnet3d(src, dst, labels=labels, preset=preset, checkpoint=checkpoint)


def _video_nonlocal(
    src: Path, dst: Path, *, preset: str | None, labels: tuple[str, ...] | None
) -> Path:
    from i3d.weights.pytorch_resnet3d import convert_video_nonlocal

    return convert_video_nonlocal(src, dst, labels=labels, preset=preset)


def _torchvision_2d(
    src: Path,
    dst: Path,
    *,
    preset: str | None,
    labels: tuple[str, ...] | None,
    checkpoint: Any = None,
) -> tuple[Path, Any]:
    from i3d.weights.inflate import convert_torchvision_2d

    return convert_torchvision_2d(
        src, dst, preset=preset or "i3d_r50", labels=labels, checkpoint=checkpoint
    )


#: source format name → converter; engineers add their formats here
CONVERTERS: dict[str, Converter] = {
    "mmaction": _mmaction,
    "deepmind": _deepmind,
    "pytorch-i3d": _pytorch_i3d,
    "pytorch-resnet3d": _pytorch_resnet3d,
    "torchvision-2d": _torchvision_2d,
    "video-nonlocal": _video_nonlocal,
}

#: byte markers in a checkpoint's pickle that identify its format (checked in order)
_MARKERS: tuple[tuple[bytes, str], ...] = (
    (b"backbone.conv1.conv.weight", "mmaction"),
    (b"Conv3d_1a_7x7.conv3d.weight", "pytorch-i3d"),
    (b"Conv3d_1a_7x7", "deepmind"),
    (b"layer1.0.conv1.weight", "torchvision-2d"),
    # video-nonlocal-net's Caffe2 blobs: each name precedes its array, so the first is early
    (b"_branch2", "video-nonlocal"),
    (b"_branch1_", "video-nonlocal"),
    (b"res_conv1_bn_", "video-nonlocal"),
    (b"conv1_w", "video-nonlocal"),
    (b"pred_w", "video-nonlocal"),
)


def detect_format(path: str | os.PathLike[str]) -> str:
    """Guess a checkpoint's source format from the key names in its pickle (loading it only
    when the key names alone cannot tell, as for torchvision-layout checkpoints)."""
    return _detect(Path(path))[0]


def _detect(path: Path) -> tuple[str, Any]:
    """The source format of ``path`` and, when telling it needed the file loaded, its content
    (else None), so the converter does not unpickle it a second time."""
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        raise WeightsError(f"{path} is already a .safetensors file; use `i3d inspect` on it")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith("data.pkl")]
            if names and zf.getinfo(names[0]).file_size <= path.stat().st_size:
                with zf.open(names[0]) as fh:
                    found = _markers_in(fh)
            else:  # none, or one inflating past the file: load_checkpoint says which
                found = set()
    else:
        with open(path, "rb") as fh:
            found = _markers_in(fh, limit=1 << 20)
    for marker, name in _MARKERS:
        if marker in found:
            return _torchvision_layout(path) if name == "torchvision-2d" else (name, None)
    _explain_unknown(path)
    raise AssertionError("unreachable")  # _explain_unknown always raises


def _torchvision_layout(path: Path) -> tuple[str, Any]:
    """``torchvision-2d`` or ``pytorch-resnet3d``: both use torchvision's key names, and only
    the stem conv's shape (4-D or 5-D) tells them apart, so the checkpoint is loaded (with the
    restricted unpickler) to look at it."""
    from i3d.weights.pytorch_resnet3d import stem_is_3d
    from i3d.weights.safe_pickle import load_checkpoint

    checkpoint = load_checkpoint(path)
    return ("pytorch-resnet3d" if stem_is_3d(checkpoint) else "torchvision-2d"), checkpoint


def _markers_in(stream: BinaryIO, limit: int | None = None, chunk: int = 1 << 20) -> set[bytes]:
    """The :data:`_MARKERS` in the first ``limit`` bytes of ``stream`` (all of it: None),
    read in chunks, so a compressed pickle is never inflated into memory whole."""
    keep = max(len(marker) for marker, _ in _MARKERS) - 1
    found: set[bytes] = set()
    tail, read = b"", 0
    while limit is None or read < limit:
        data = stream.read(chunk if limit is None else min(chunk, limit - read))
        if not data:
            break
        read += len(data)
        window = tail + data
        found.update(marker for marker, _ in _MARKERS if marker in window)
        tail = window[-keep:]
    return found


def _explain_unknown(path: Path) -> None:
    """Raise the most useful error for a file no marker matched: unsafe, unreadable or unknown."""
    from i3d.weights.safe_pickle import load_checkpoint

    content = load_checkpoint(path)  # restricted: its errors say what is unsafe or unreadable
    keys = _some_keys(content)
    raise WeightsError(
        f"cannot tell what kind of checkpoint {path} is (first keys: {keys or 'none'}); pass "
        f"--from with one of: {', '.join(sorted(CONVERTERS))}"
    )


def _some_keys(content: Any, limit: int = 4) -> list[str]:
    """A few key names of a (possibly nested ``state_dict``) checkpoint, for messages."""
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    return [str(k) for k in list(content)[:limit]] if isinstance(content, dict) else []


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    source_format: str = "auto",
    preset: str | None = None,
    labels: tuple[str, ...] | None = None,
) -> Any:
    """Convert ``src`` (any supported checkpoint) to a project ``.safetensors`` at ``dst``."""
    refuse_overwriting(dst, src)
    loaded = None
    if source_format == "auto":
        source_format, loaded = _detect(Path(src))
    converter = CONVERTERS.get(source_format)
    if converter is None:
        raise WeightsError(
            f"unknown source format {source_format!r}; "
            f"choose one of: {', '.join(sorted(CONVERTERS))}"
        )
    extra = {} if loaded is None else {"checkpoint": loaded}
    return converter(Path(src), Path(dst), preset=preset, labels=labels, **extra)
