"""Ascend offline models (.om from ATC) through ais_bench's ``InferSession``.

Layout as in the seeds' 310P3 deployment: the OM input is (B, V, 3, T, H, W) or (B, 3, T, H, W)
with a static batch, the output (B, V, K) or (B, K). Clips are regrouped, the last call is
zero-padded to the static batch and the padding's logits dropped.
Not run on real Ascend hardware: tested against a fake ``ais_bench``
(tests/test_backends_npu_om.py).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from i3d.backends.base import (
    Availability,
    BackendError,
    BackendUnavailable,
    ClipRunner,
    check_options,
    check_precision,
)
from i3d.backends.npu_backend import CANN_HINT, parse_npu_device
from i3d.weights.format import WeightsInfo

INSTALL_HINT = (
    "install the aclruntime and ais_bench wheels of ait's benchmark component "
    "(https://gitee.com/ascend/ait, ait/components/benchmark) on a machine with CANN set up"
)


def import_infer_session() -> Any:
    """``ais_bench.infer.interface.InferSession``, or a clear error naming what is missing."""
    if importlib.util.find_spec("ais_bench") is None:
        raise BackendUnavailable(f"ais_bench is not installed; {INSTALL_HINT}")
    try:
        module = importlib.import_module("ais_bench.infer.interface")
    except (ImportError, OSError) as exc:
        raise BackendUnavailable(
            f"ais_bench is installed but cannot load its runtime ({exc}); {CANN_HINT}"
        ) from exc
    return module.InferSession


class OmRunner(ClipRunner):
    """Feeds static-batch chunks of clips to an ais_bench ``InferSession``."""

    backend = "om"
    precision = "fp32"

    def __init__(
        self, session: Any, path: Path, device_index: int, info: WeightsInfo | None = None
    ) -> None:
        self.session = session
        self.path = path
        self.device = f"npu:{device_index}"
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise BackendError(f"{path}: expected a model with one input, it has {len(inputs)}")
        shape = [int(d) for d in inputs[0].shape]
        if len(shape) not in (5, 6) or min(shape) < 1:
            raise BackendError(
                f"{path}: input shape {shape} is not a static (B, C, T, H, W) or (B, V, C, T, H, W)"
            )
        self.input_shape = tuple(shape)
        clips_per_call = shape[0] * (shape[1] if len(shape) == 6 else 1)
        super().__init__(
            clips_per_call, info.preprocessing if info else None, pad_multiple=clips_per_call
        )
        self.labels = info.labels if info else None

    def _run(self, clips: torch.Tensor) -> torch.Tensor:
        clip_shape = tuple(clips.shape[1:])
        if clip_shape != self.input_shape[-4:]:
            raise BackendError(
                f"{self.path} was compiled for clips (C, T, H, W) = {self.input_shape[-4:]}, "
                f"got {clip_shape}; re-export with matching --clip-len/--size"
            )
        feed = np.ascontiguousarray(clips.numpy().reshape(self.input_shape), dtype=np.float32)
        try:
            outputs = self.session.infer([feed])
        except Exception as exc:  # ais_bench/aclruntime raise plain RuntimeError and more
            raise BackendError(f"ais_bench inference failed on {self.path}: {exc}") from exc
        if not outputs:
            raise BackendError(f"ais_bench returned no outputs for {self.path}")
        logits = np.asarray(outputs[0], dtype=np.float32)
        if logits.size % clips.shape[0]:
            raise BackendError(
                f"{self.path}: output shape {logits.shape} does not split into "
                f"{clips.shape[0]} clips"
            )
        return torch.from_numpy(logits.reshape(clips.shape[0], -1))


def om_info(path: Path) -> WeightsInfo | None:
    """Labels and preprocessing of ``x.om`` from the ``x.onnx`` that ``i3d export`` left beside it.

    ATC drops ONNX metadata, so the source ONNX is the record; None when it is gone or when
    onnx is not installed (then inputs must be normalised floats and labels are indices).
    """
    source = path.with_suffix(".onnx")
    if not source.is_file() or importlib.util.find_spec("onnx") is None:
        return None
    from i3d.export import ExportError, read_onnx_info

    try:
        return read_onnx_info(source)
    except ExportError as exc:
        raise BackendError(f"{path}: no labels/preprocessing from {source}: {exc}") from exc


class OmBackend:
    """Ascend inference cards (e.g. 310P3) running an ATC-compiled ``.om`` file."""

    name = "om"

    def is_available(self) -> Availability:
        try:
            import_infer_session()
        except BackendUnavailable as exc:
            return Availability(False, str(exc).split(";")[0], None, INSTALL_HINT)
        try:
            version = importlib.metadata.version("ais_bench")
        except importlib.metadata.PackageNotFoundError:
            version = None
        return Availability(True, "ais_bench InferSession importable", version, INSTALL_HINT)

    def load(
        self,
        weights_or_model: Any,
        device: str | None,
        precision: str,
        batch_size: int | None,
        **options: Any,
    ) -> OmRunner:
        check_options(options, {}, self.name)
        check_precision(precision, ("fp32",), self.name)
        if (
            not isinstance(weights_or_model, str | os.PathLike)
            or Path(weights_or_model).suffix != ".om"
        ):
            raise BackendError(
                "the om backend runs compiled .om files; create one with "
                "`i3d export --format om --soc Ascend310P3 --batch 1 ...`"
            )
        path = Path(weights_or_model)
        if not path.is_file():
            raise BackendError(f"OM model {path} does not exist")
        index = parse_npu_device(device)
        infer_session = import_infer_session()
        try:
            session = infer_session(index, str(path))
        except Exception as exc:  # device or model load failure inside aclruntime
            raise BackendError(f"ais_bench could not load {path} on npu:{index}: {exc}") from exc
        # a static model's own batch replaces batch_size
        return OmRunner(session, path, index, om_info(path))
