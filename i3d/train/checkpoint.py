"""Resumable training checkpoints: atomic writes, restricted loading, newest-valid lookup.

A checkpoint holds the model, optimiser, LR scheduler and grad-scaler states, the epoch and
global step, every RNG state (python, numpy, torch, cuda) and the training config. Files are
read with ``torch.load(weights_only=True)``, torch's restricted unpickler that only rebuilds
tensors and plain containers, so a checkpoint can never run code.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from i3d.utils.files import OutputError, atomic_path
from i3d.weights.format import WeightsError

CHECKPOINT_FORMAT = "i3d-train-1"
_NAME = re.compile(r"^epoch(\d+)_step(\d+)\.pt$")
#: lines of torch's load errors that suggest unsafe loading or filing a torch issue
_TORCH_ADVICE = ("weights_only", "Please file an issue", "Check the documentation")


class CheckpointError(WeightsError):
    """A training checkpoint is missing, unreadable or belongs to a different run."""


def checkpoint_dir(work_dir: str | os.PathLike[str]) -> Path:
    return Path(work_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    """Every RNG state a run consumes, as tensors and plain values."""
    version, keys, gauss = random.getstate()
    name, mt, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(keys), gauss],
        "numpy": [name, torch.from_numpy(mt.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    npu = _npu()
    if npu is not None:  # dropout on an NPU draws from the NPU generators
        state["npu"] = npu.get_rng_state_all()
    return state


def _npu() -> Any:
    """``torch.npu`` once torch_npu is loaded and sees a device, else None."""
    npu = getattr(torch, "npu", None)
    return npu if npu is not None and npu.is_available() else None


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, mt, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, mt.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    npu = _npu()
    if "npu" in state and npu is not None:
        npu.set_rng_state_all(state["npu"])


def save_checkpoint(work_dir: str | os.PathLike[str], state: dict[str, Any], keep: int = 3) -> Path:
    """Write ``state`` atomically as ``checkpoints/epochE_stepS.pt``; keep the newest ``keep``.

    A failed write (disk full, read-only directory) raises :class:`OutputError` and leaves
    every earlier checkpoint untouched.
    """
    folder = checkpoint_dir(work_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"epoch{state['epoch']:04d}_step{state['step']:09d}.pt"
    previous = list_checkpoints(work_dir)
    kept = f"; the previous checkpoint {previous[0]} is intact" if previous else ""
    hint = "Free space (or raise the quota or file-size limit) and run again with --resume auto"
    try:
        with atomic_path(path, hint + kept) as tmp:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp)
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"could not write checkpoint {path}: {exc}{kept}") from exc
    if keep > 0:
        for old in list_checkpoints(work_dir)[keep:]:
            with contextlib.suppress(OSError):
                old.unlink()
    return path


def list_checkpoints(work_dir: str | os.PathLike[str]) -> list[Path]:
    """Checkpoint files of a work dir, newest (highest step) first."""
    folder = checkpoint_dir(work_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(2)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint with the restricted unpickler; raise :class:`CheckpointError` if bad."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol notices for foreign files
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CheckpointError(
            f"{path} is not a readable i3d training checkpoint ({_load_failure(exc)}); resume "
            "from a checkpoints/epoch*_step*.pt file written by `i3d train`"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an i3d training checkpoint ({CHECKPOINT_FORMAT})")
    missing = {"model", "optimizer", "scheduler", "scaler", "epoch", "step", "rng", "config"} - set(
        state
    )
    if missing:
        raise CheckpointError(f"{path} lacks {sorted(missing)}; it is incomplete")
    return state


def _load_failure(exc: Exception) -> str:
    """The reason torch gave, without its advice to unpickle with weights_only=False.

    That advice would run the file's code; a checkpoint is untrusted input.
    """
    lines = [line.strip() for line in str(exc).splitlines()]
    kept = [
        line.removeprefix("WeightsUnpickler error:").strip()
        for line in lines
        if line and not any(marker in line for marker in _TORCH_ADVICE)
    ]
    reason = next((line for line in kept if line), type(exc).__name__).split(". ")[0].rstrip(".")
    if isinstance(exc, pickle.UnpicklingError):
        return f"the restricted unpickler refused it: {reason}"
    return reason


def resolve_resume(
    resume: str | None, work_dir: str | os.PathLike[str]
) -> tuple[Path, dict[str, Any]] | None:
    """``auto`` → newest readable checkpoint in the work dir (None if there is none); a path
    → that checkpoint; None → no resume."""
    if resume is None:
        return None
    if resume != "auto":
        return Path(resume), load_checkpoint(resume)
    for path in list_checkpoints(work_dir):
        try:
            return path, load_checkpoint(path)
        except CheckpointError:
            continue
    return None
