"""The backend contract: what a backend is, what it loads, and the shared input handling.

A backend turns weights (or a model, or a compiled file) into a :class:`Runner` whose
``predict(batch)`` maps clips to logits. Batches are (N, C, T, H, W) or (N, V, C, T, H, W),
float (already normalised) or uint8, normalised with the weights' preprocessing: here, on
the host, for runtimes that take host floats (onnx, openvino, om), and on the device after
the (4x smaller) uint8 copy by the torch and npu runners.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import attrs
import numpy as np
import torch
from torch import nn

from i3d.data.transforms import normalize
from i3d.weights.preprocessing import Preprocessing

#: fp32 is IEEE float32 throughout; tf32 lets cuda (TF32) and npu (HF32) convolutions and
#: matrix products read 10-bit mantissas (:mod:`i3d.backends.float32`)
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
TORCH_DTYPES = {
    "fp32": torch.float32,
    "tf32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


class BackendError(RuntimeError):
    """A backend cannot do what was asked: bad device, precision, option, input or model file."""


class BackendUnavailable(BackendError):
    """A backend's runtime (library, driver, device) is missing; the message says how to get it."""


@attrs.frozen
class Availability:
    """Whether a backend can run here, why not, its runtime version and how to install it."""

    ok: bool
    reason: str = ""
    version: str | None = None
    install_hint: str = ""


@runtime_checkable
class Runner(Protocol):
    """A loaded model on one device: ``predict`` maps clips to logits (a CPU float32 tensor)."""

    backend: str
    device: str
    precision: str

    def predict(self, batch: torch.Tensor | np.ndarray) -> torch.Tensor: ...


@runtime_checkable
class Backend(Protocol):
    """An execution backend, registered under the ``i3d.backends`` entry-point group."""

    name: str

    def is_available(self) -> Availability: ...

    def load(
        self,
        weights_or_model: Any,
        device: str | None,
        precision: str,
        batch_size: int | None,
        **options: Any,
    ) -> Runner: ...


def check_precision(precision: str, supported: tuple[str, ...], backend: str) -> str:
    """Return ``precision`` if ``backend`` supports it, else raise a :class:`BackendError`."""
    if precision not in supported:
        raise BackendError(
            f"backend {backend!r} does not support precision {precision!r}; "
            f"choose one of: {', '.join(supported)}"
        )
    return precision


def check_options(options: dict[str, Any], accepted: dict[str, str], backend: str) -> None:
    """Reject options a backend does not know, listing the ones it does (name: meaning)."""
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        known = "; ".join(f"{k}: {v}" for k, v in accepted.items()) or "none"
        raise BackendError(
            f"backend {backend!r} got unknown option(s) {unknown}; accepted: {known}"
        )


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (else its type name): one-line errors."""
    lines = (line.strip() for line in str(exc).splitlines())
    return next((line for line in lines if line), type(exc).__name__)


def thread_count(options: dict[str, Any], backend: str) -> int | None:
    """The ``threads`` option as a positive int (it may arrive as a string), None if absent."""
    if "threads" not in options:
        return None
    value = options["threads"]
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if count < 1 or isinstance(value, bool | float):
        raise BackendError(
            f"backend {backend!r}: option threads must be a positive integer, got {value!r}"
        )
    return count


def resolve_model(weights_or_model: Any) -> nn.Module:
    """The caller's ``nn.Module`` as is, or an eval-mode CPU model from a ``.safetensors`` file.

    Backends copy a caller's module before changing its mode, device or dtype.
    """
    if isinstance(weights_or_model, nn.Module):
        model = weights_or_model
    elif isinstance(weights_or_model, str | os.PathLike):
        path = Path(weights_or_model)
        if path.suffix in {".onnx", ".om"}:
            raise BackendError(
                f"{path} is a compiled {path.suffix[1:]} model; run it with "
                f"--backend {path.suffix[1:]}, or pass .safetensors weights"
            )
        from i3d.weights.format import load_model

        model = load_model(path)
    else:
        raise BackendError(
            f"expected a model or a .safetensors weight file, got {type(weights_or_model).__name__}"
        )
    if getattr(getattr(model, "config", None), "arch", None) == "two_stream":
        raise BackendError(
            "a two-stream model takes two inputs (RGB clips and optical flow); backends run "
            "one stream at a time: pass model.rgb or model.flow, or that stream's weights"
        )
    return model


def preprocessing_of(model: nn.Module) -> Preprocessing | None:
    """The preprocessing stored with a model's weights (``None`` for a bare model)."""
    info = getattr(model, "weights_info", None)
    return getattr(info, "preprocessing", None)


def labels_of(model: nn.Module) -> tuple[str, ...] | None:
    """The class names stored with a model's weights (``None`` for a bare model)."""
    return getattr(getattr(model, "weights_info", None), "labels", None)


def normalise_uint8(frames: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 clips (channels at dim -4) → float32 mapped to ``value_range`` then (x-mean)/std,
    on the device the clips are on (:func:`i3d.data.transforms.normalize`)."""
    channels = frames.shape[-4]
    if channels != len(prep.mean):
        raise BackendError(
            f"uint8 input has {channels} channels at dim {frames.ndim - 4}, the weights' "
            f"normalisation has {len(prep.mean)}; frames must be NCTHW or NVCTHW"
        )
    return normalize(frames, prep.mean, prep.std, prep.value_range)


def check_input(batch: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A batch as a tensor of (N, C, T, H, W) or (N, V, C, T, H, W) float or uint8 clips,
    where it is (no copy, no normalisation), or a :class:`BackendError` saying what is wrong."""
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(batch)
    if not isinstance(batch, torch.Tensor):
        raise BackendError(f"expected a torch.Tensor or numpy array, got {type(batch).__name__}")
    if batch.ndim not in (5, 6):
        raise BackendError(
            "expected clips of shape (N, C, T, H, W) or (N, V, C, T, H, W), "
            f"got {batch.ndim} dims {tuple(batch.shape)}"
        )
    if batch.dtype != torch.uint8 and not batch.is_floating_point():
        raise BackendError(f"expected float or uint8 clips, got {batch.dtype}")
    return batch


def check_normalisation(batch: torch.Tensor, prep: Preprocessing | None) -> None:
    """Refuse uint8 clips for a model without the preprocessing that would normalise them."""
    if batch.dtype == torch.uint8 and prep is None:
        raise BackendError(
            "uint8 frames need the weights' normalisation, but this model has no "
            "preprocessing metadata; load .safetensors weights or pass normalised floats"
        )


def prepare_input(batch: torch.Tensor | np.ndarray, prep: Preprocessing | None) -> torch.Tensor:
    """Host float32 clips of a checked batch: uint8 is normalised here, on the CPU, for the
    backends whose runtime takes host floats (onnx, openvino, om)."""
    batch = check_input(batch).cpu()
    check_normalisation(batch, prep)
    if batch.dtype == torch.uint8:
        assert prep is not None
        return normalise_uint8(batch, prep)
    return batch.to(torch.float32)


class ClipRunner(abc.ABC):
    """Shared ``predict``: fold views into clips, run them in chunks, unfold the logits.

    ``labels`` are the class names when the weights carry them (else ``None``).
    Subclasses implement ``_run(clips (M, C, T, H, W) float32) -> logits (M, K)``. Each call
    gets at most ``chunk_clips`` clips; with ``pad_multiple`` > 1 a chunk is zero-padded to a
    multiple of it (static-shape compiled models) and the padding's logits are dropped.
    """

    backend: str
    device: str
    precision: str
    labels: tuple[str, ...] | None = None

    def __init__(
        self, chunk_clips: int, preprocessing: Preprocessing | None, pad_multiple: int = 1
    ) -> None:
        if chunk_clips < 1:
            raise BackendError(f"batch size must be at least 1, got {chunk_clips}")
        self.chunk_clips = chunk_clips
        self.pad_multiple = pad_multiple
        self.preprocessing = preprocessing

    def predict(self, batch: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Logits (N, K) for (N, C, T, H, W) input, (N, V, K) for (N, V, C, T, H, W)."""
        x = self._input(batch)
        lead = x.shape[:-4]
        clips = x.reshape(-1, *x.shape[-4:])
        if clips.shape[0] == 0:
            raise BackendError(f"empty batch {tuple(x.shape)}")
        outputs = [self._run_padded(chunk) for chunk in clips.split(self.chunk_clips)]
        logits = torch.cat(outputs)
        return logits.reshape(*lead, logits.shape[-1])

    def _input(self, batch: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The batch as ``_run`` takes it: host float32 (uint8 normalised on the CPU)."""
        return prepare_input(batch, self.preprocessing)

    def _run_padded(self, chunk: torch.Tensor) -> torch.Tensor:
        count = chunk.shape[0]
        missing = -count % self.pad_multiple
        if missing:
            chunk = torch.cat([chunk, chunk.new_zeros((missing, *chunk.shape[1:]))])
        logits = self._run(chunk)
        if logits.ndim != 2 or logits.shape[0] != chunk.shape[0]:
            raise BackendError(
                f"backend {self.backend!r} returned logits of shape {tuple(logits.shape)} "
                f"for {chunk.shape[0]} clips; expected ({chunk.shape[0]}, num_classes)"
            )
        return logits[:count].to(device="cpu", dtype=torch.float32)

    @abc.abstractmethod
    def _run(self, clips: torch.Tensor) -> torch.Tensor:
        """Logits (M, K) for clips (M, C, T, H, W) as :meth:`_input` gives them."""
