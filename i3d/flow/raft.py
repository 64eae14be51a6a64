"""Optional RAFT optical flow through torchvision, from a local checkpoint (never downloaded).

I3D's Flow stream was trained on TV-L1 flow (DeepMind's recipe, :mod:`i3d.flow.recipe`);
RAFT (Teed & Deng, ECCV 2020) is here for users who prefer it, not as what the released flow
weights saw. torchvision's ``raft_large`` or ``raft_small`` (told apart by the checkpoint's
tensors) is built with ``weights=None`` and given the user's checkpoint: torchvision's own
``raft_large_C_T_SKHT_V2-ff5fadd5.pth`` / ``raft_small_C_T_V2-01064c6d.pth`` (read with the
restricted unpickler) or the same tensors as ``.safetensors``. Frames go in as torchvision's
``OpticalFlow`` preset makes them (RGB, x / 255 normalised with mean 0.5 and std 0.5, so in
[-1, 1]), edge-padded to a multiple of 8 (and to at least 128, below which torchvision's
4-level correlation pyramid is refused) and the flow cropped back; the flow is the last of
:data:`RAFT_UPDATES` refinements, in pixels, x then y. The recipe's clipping and scaling
follow in :func:`i3d.flow.recipe.frame_flow`'s callers, as for TV-L1. torchvision is an
optional dependency: without it the RAFT path fails with one line saying what to install.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from i3d.backends.float32 import float32_mode
from i3d.utils.files import sha256_file
from i3d.weights.format import WeightsError

RAFT_UPDATES = 12
"""Flow refinements per pair (torchvision's ``num_flow_updates`` default)."""
MAX_WEIGHTS_BYTES = 256 << 20
"""Largest RAFT checkpoint read (torchvision's: 21 MB large, 4 MB small)."""
_MULTIPLE = 8  # RAFT's encoders downsample by 8
_MIN_SIDE = 128  # 16 cells at 1/8, pooled 3 times by the correlation pyramid, leave 2


class RaftMissingError(ImportError):
    """torchvision (which holds RAFT) is not installed, or does not import with this torch."""


def torchvision_optical_flow() -> ModuleType:
    """``torchvision.models.optical_flow``, or a one-line error saying what to install."""
    hint = (
        f"the raft flow needs torchvision built for torch {torch.__version__}: pip install "
        "torchvision (the release matching this torch), or use the torch TV-L1"
    )
    try:
        from torchvision.models import optical_flow
    except ModuleNotFoundError:
        raise RaftMissingError(hint) from None
    except (ImportError, RuntimeError, OSError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RaftMissingError(f"{hint} (this torchvision fails to import: {first})") from None
    return optical_flow


@attrs.frozen(eq=False)
class RaftCheckpoint:
    """A checked RAFT checkpoint: which torchvision model it fits, its bytes' SHA-256, tensors."""

    arch: str
    sha256: str
    state: dict[str, torch.Tensor]


def read_raft_checkpoint(path: str) -> RaftCheckpoint:
    """The RAFT checkpoint at ``path``, read once per process (per file version); a missing,
    oversized, unreadable or non-RAFT file is a one-line :class:`WeightsError`."""
    return _read(*_file_key(path))


def raft_recorded(path: str) -> dict[str, Any]:
    """What decides RAFT's flow, as flow folders and feature outputs record it: the model,
    the checkpoint's SHA-256 (not its path) and the refinements."""
    checkpoint = read_raft_checkpoint(path)
    return {"model": checkpoint.arch, "weights_sha256": checkpoint.sha256, "updates": RAFT_UPDATES}


def raft_model(path: str, device: str = "cpu") -> torch.nn.Module:
    """torchvision's RAFT for the checkpoint at ``path`` on ``device``, in eval mode, built
    once per process; what does not fit the model is one line before anything runs."""
    return _built(*_file_key(path), device)


def raft_flow(
    frames0: np.ndarray, frames1: np.ndarray, weights: str, device: str = "cpu", batch_size: int = 8
) -> torch.Tensor:
    """RAFT flow in pixels, (N, 2, H, W) float32 on the CPU, from (N, H, W, 3) uint8 RGB
    pairs, ``batch_size`` pairs per call of the model on ``device``."""
    if frames0.shape != frames1.shape or frames0.ndim != 4 or frames0.shape[-1] != 3:
        raise ValueError(
            f"RAFT needs two (N, H, W, 3) RGB stacks of one shape, got {frames0.shape} and "
            f"{frames1.shape}"
        )
    if frames0.dtype != np.uint8 or frames1.dtype != np.uint8:
        raise ValueError(f"RAFT needs uint8 RGB frames, got {frames0.dtype} and {frames1.dtype}")
    model = raft_model(weights, device)
    where = torch.device(device)
    parts = []
    for start in range(0, len(frames0), batch_size):
        stop = start + batch_size
        first, second = (_model_input(f[start:stop], where) for f in (frames0, frames1))
        parts.append(_solve(model, first, second))
    return torch.cat(parts)


def _model_input(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (n, H, W, 3) → float32 (n, 3, H, W) as torchvision's ``OpticalFlow`` preset:
    x / 255, then (x − 0.5) / 0.5."""
    rgb = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2)
    return (rgb.float() / 255 - 0.5) / 0.5


def _solve(model: torch.nn.Module, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The final flow (n, 2, H, W) on the CPU of a batch, padded for RAFT and cropped back."""
    height, width = first.shape[-2:]
    pad_h, pad_w = _padded(height) - height, _padded(width) - width
    top, left = pad_h // 2, pad_w // 2
    sides = (left, pad_w - left, top, pad_h - top)
    if pad_h or pad_w:
        first, second = (F.pad(x, sides, mode="replicate") for x in (first, second))
    with torch.inference_mode(), float32_mode(first.device):
        flow = model(first, second, num_flow_updates=RAFT_UPDATES)[-1]
    return flow[:, :, top : top + height, left : left + width].float().cpu()


def _padded(side: int) -> int:
    """The side RAFT is run at: a multiple of 8, at least 128."""
    return max(_MIN_SIDE, -(-side // _MULTIPLE) * _MULTIPLE)


def _file_key(path: str) -> tuple[str, int, int]:
    """(resolved path, size, mtime) of a RAFT checkpoint: the caches' key, so an edited file
    is read again; a missing or oversized one is refused before anything is read."""
    file = Path(path)
    if not file.is_file():
        raise WeightsError(
            f"RAFT weights {file} do not exist; give a local torchvision RAFT checkpoint "
            "(e.g. raft_large_C_T_SKHT_V2-ff5fadd5.pth, downloaded beforehand)"
        )
    stat = file.stat()
    if stat.st_size > MAX_WEIGHTS_BYTES:
        raise WeightsError(
            f"RAFT weights {file} are {stat.st_size:,} bytes, more than a RAFT checkpoint "
            f"({MAX_WEIGHTS_BYTES:,} at most); refusing to read them"
        )
    return str(file.resolve()), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _read(path: str, size: int, mtime_ns: int) -> RaftCheckpoint:
    """Read and check a RAFT checkpoint (the cache of :func:`read_raft_checkpoint`)."""
    state = _tensors(Path(path))
    if any(key.startswith("mask_predictor.") for key in state):
        arch = "raft_large"  # only the large model learns its upsampling mask
    elif any(key.startswith("feature_encoder.") for key in state):
        arch = "raft_small"
    else:
        raise WeightsError(
            f"{path} is not a torchvision RAFT checkpoint (no feature_encoder.* tensors); give "
            "torchvision's raft_large_*.pth or raft_small_*.pth"
        )
    return RaftCheckpoint(arch, sha256_file(path), state)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """The name → tensor mapping of a ``.safetensors`` file or a torch pickle (restricted
    unpickler: no code runs, tensors may claim no more bytes than the file has)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise WeightsError(f"{path} is not a readable .safetensors file: {exc}") from None
    from i3d.weights.safe_pickle import load_checkpoint

    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items()
    ):
        raise WeightsError(
            f"{path} is not a RAFT state dict (a mapping of names to tensors, as torchvision "
            f"saves them); it holds a {type(checkpoint).__name__}"
        )
    return dict(checkpoint)


@functools.lru_cache(maxsize=4)
def _built(path: str, size: int, mtime_ns: int, device: str) -> torch.nn.Module:
    """torchvision's model for a checkpoint on ``device`` (the cache of :func:`raft_model`)."""
    checkpoint = _read(path, size, mtime_ns)
    model = getattr(torchvision_optical_flow(), checkpoint.arch)(weights=None)
    _check_fits(model.state_dict(), checkpoint, path)
    model.load_state_dict(checkpoint.state)
    return model.eval().requires_grad_(False).to(torch.device(device))


def _check_fits(
    expected: Mapping[str, torch.Tensor], checkpoint: RaftCheckpoint, path: str
) -> None:
    """One line naming what a checkpoint lacks, has extra or has of another shape."""
    given = checkpoint.state
    missing = sorted(expected.keys() - given.keys())
    extra = sorted(given.keys() - expected.keys())
    common = expected.keys() & given.keys()
    shaped = sorted(k for k in common if expected[k].shape != given[k].shape)
    problems = [
        f"{len(names)} tensors {what} (first: {names[0]})"
        for names, what in ((missing, "missing"), (extra, "unexpected"), (shaped, "of other shape"))
        if names
    ]
    if problems:
        raise WeightsError(
            f"{path} does not fit torchvision's {checkpoint.arch}: {'; '.join(problems)}"
        )
