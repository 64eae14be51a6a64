"""Eager PyTorch on CPU, CUDA or MPS: autocast precisions, channels-last, optional compile."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from i3d.backends.base import (
    PRECISIONS,
    TORCH_DTYPES,
    Availability,
    BackendError,
    ClipRunner,
    check_input,
    check_normalisation,
    check_options,
    check_precision,
    labels_of,
    normalise_uint8,
    preprocessing_of,
    resolve_model,
    thread_count,
)
from i3d.backends.float32 import REDUCED_FLOAT32, float32_mode
from i3d.models.layers import ConvBN

DEFAULT_BATCH_SIZE = 8
_BOOL_WORDS = {"true", "false", "1", "0", "yes", "no"}

TORCH_OPTIONS = {
    "channels_last": "bool, run convs in channels_last_3d memory format",
    "autocast": "bool (default true); false casts weights and inputs to the precision instead",
    "fuse_bn": "bool, fold eval-mode BatchNorm into the preceding conv",
    "compile": "bool or a torch.compile mode, compile the model on the first batch",
    "threads": "int, torch intra-op threads (process-wide)",
}


def resolve_device(device: str | None) -> torch.device:
    """A torch device that exists here, or a :class:`BackendError` saying what does."""
    name = device or "cpu"
    if name.split(":")[0].strip().lower() == "npu":
        raise BackendError(f"device {name!r} is an Ascend NPU; use --backend npu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise BackendError(f"invalid device {name!r}; expected cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendError(
                f"device {name!r} requested but CUDA is not available (torch {torch.__version__}, "
                f"built with CUDA {torch.version.cuda}); use --device cpu or a CUDA build of torch"
            )
        count = torch.cuda.device_count()
        index = 0 if dev.index is None else dev.index
        if index >= count:
            raise BackendError(
                f"device {name!r} does not exist: {count} CUDA device(s) visible "
                f"(cuda:0 to cuda:{count - 1}); check CUDA_VISIBLE_DEVICES"
            )
        return torch.device("cuda", index)
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise BackendError(
                f"device {name!r} requested but MPS is not available on this machine"
            )
        return dev
    raise BackendError(f"the torch backend does not run on {dev.type!r}; use cpu, cuda:N or mps")


def fuse_conv_bn(model: nn.Module) -> None:
    """Fold every eval-mode ``ConvBN``'s BatchNorm into its conv, in place."""
    for module in model.modules():
        if isinstance(module, ConvBN) and module.bn is not None:
            module.conv = torch.nn.utils.fusion.fuse_conv_bn_eval(module.conv, module.bn)
            module.bn = None


def parse_flag(options: dict[str, Any], key: str, default: bool) -> bool:
    """A boolean option that may arrive as a string from the command line."""
    value = options.get(key, default)
    if isinstance(value, str):
        lowered = value.lower()
        if lowered not in _BOOL_WORDS:
            raise BackendError(f"option {key} must be true or false, got {value!r}")
        return lowered in {"true", "1", "yes"}
    return bool(value)


class TorchRunner(ClipRunner):
    """A private copy of the model placed, converted and (optionally) compiled for one device."""

    backend = "torch"

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        precision: str,
        batch_size: int,
        options: dict[str, Any],
        autocast_device_type: str | None = None,
    ) -> None:
        super().__init__(batch_size, preprocessing_of(model))
        self.labels = labels_of(model)
        self.device = str(device)
        self.precision = precision
        self.dtype = TORCH_DTYPES[precision]
        self.channels_last = parse_flag(options, "channels_last", False)
        self.reduced = precision not in ("fp32", *REDUCED_FLOAT32)  # bf16 / fp16 dtypes
        self.autocast = parse_flag(options, "autocast", True) and self.reduced
        threads = thread_count(options, self.backend)
        if threads is not None:
            torch.set_num_threads(threads)
        model = copy.deepcopy(model).eval()
        if parse_flag(options, "fuse_bn", False):
            fuse_conv_bn(model)
        model = model.to(device)
        if self.reduced and not self.autocast:
            model = model.to(self.dtype)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        compile_mode = options.get("compile", False)
        if isinstance(compile_mode, str) and compile_mode.lower() in _BOOL_WORDS:
            compile_mode = parse_flag(options, "compile", False)
        if compile_mode:
            mode = compile_mode if isinstance(compile_mode, str) else None
            # static shapes: each clip shape compiles once (inductor's dynamic-shape path
            # fails on these strided 3D pools in torch 2.13)
            model = torch.compile(model, mode=mode, dynamic=False)
        self.model = model
        self._device = device
        self._autocast_type = autocast_device_type or device.type

    @property
    def torch_device(self) -> torch.device:
        """The device the model runs on (where :meth:`logits_on_device` leaves its logits)."""
        return self._device

    def _input(self, batch: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The batch where it is: uint8 crosses to the device as uint8 and is normalised
        there (a quarter of float32's bytes to copy, and no host time spent normalising)."""
        x = check_input(batch)
        check_normalisation(x, self.preprocessing)
        return x

    def _run(self, clips: torch.Tensor) -> torch.Tensor:
        return self.logits_on_device(clips)

    def logits_on_device(
        self,
        clips: torch.Tensor,
        prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits (M, K) of clips (M, C, T, H, W), left on the device and not waited for.

        ``clips`` may be on the host (copied, non-blocking) or already on the device;
        ``prepare`` maps them to model input there (the normalisation a caller chose), else
        uint8 clips are normalised with the weights' preprocessing and floats taken as is.
        """
        x = clips.to(self._device, non_blocking=True)
        if prepare is not None:
            x = prepare(x)
        elif x.dtype == torch.uint8:
            check_normalisation(x, self.preprocessing)
            assert self.preprocessing is not None
            x = normalise_uint8(x, self.preprocessing)
        x = x.to(self.dtype if self.reduced and not self.autocast else torch.float32)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        amp = (
            torch.autocast(self._autocast_type, dtype=self.dtype)
            if self.autocast
            else contextlib.nullcontext()
        )
        try:
            with torch.inference_mode(), amp, float32_mode(self._device, self.precision):
                return self.model(x).float()
        except RuntimeError as exc:  # e.g. clips too short/small for the strides, out of memory
            raise BackendError(f"the model failed on clips {tuple(clips.shape)}: {exc}") from exc


class TorchBackend:
    """The default backend: the PyTorch model itself, eager or compiled."""

    name = "torch"

    def is_available(self) -> Availability:
        devices = ["cpu"]
        if torch.cuda.is_available():
            devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if torch.backends.mps.is_available():
            devices.append("mps")
        return Availability(
            ok=True, reason="devices: " + ", ".join(devices), version=torch.__version__
        )

    def load(
        self,
        weights_or_model: Any,
        device: str | None,
        precision: str,
        batch_size: int | None,
        **options: Any,
    ) -> TorchRunner:
        check_options(options, TORCH_OPTIONS, self.name)
        check_precision(precision, PRECISIONS, self.name)
        dev = resolve_device(device)
        if precision in REDUCED_FLOAT32 and dev.type != "cuda":
            raise BackendError(
                f"precision {precision} (TF32 tensor cores) is for cuda devices, not {dev}; "
                "use fp32 there, or bf16 where the device has bf16 units"
            )
        model = resolve_model(weights_or_model)
        return TorchRunner(model, dev, precision, batch_size or DEFAULT_BATCH_SIZE, options)
