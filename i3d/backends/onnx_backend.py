"""ONNX Runtime: runs an exported ``.onnx`` file, or exports a model on first use (CPU/CUDA EP)."""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from i3d.backends.base import (
    Availability,
    BackendError,
    BackendUnavailable,
    ClipRunner,
    check_options,
    check_precision,
    labels_of,
    preprocessing_of,
    resolve_model,
    thread_count,
)
from i3d.weights.format import WeightsError, WeightsInfo

INSTALL_HINT = "pip install onnxruntime (onnxruntime-gpu for the CUDA EP)"
ONNX_OPTIONS = {
    "threads": "int, onnxruntime intra-op threads",
    "optimization": "all (default), extended, basic or disable: graph optimisation level",
}
_OPT_LEVELS = {
    "all": "ORT_ENABLE_ALL",
    "extended": "ORT_ENABLE_EXTENDED",
    "basic": "ORT_ENABLE_BASIC",
}


def _ort_version() -> str | None:
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def providers_for(device: str | None) -> list[Any]:
    """Execution providers for ``cpu`` or ``cuda[:N]``, checked against what is installed."""
    import onnxruntime as ort

    name = (device or "cpu").strip().lower()
    if name == "cpu":
        return ["CPUExecutionProvider"]
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise BackendError(f"the onnx backend runs on cpu or cuda[:N], not {device!r}")
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise BackendError(
            f"device {device!r} needs onnxruntime's CUDAExecutionProvider, but this onnxruntime "
            f"offers {available}; pip install onnxruntime-gpu"
        )
    cuda = {"device_id": int(match.group(1) or 0)}
    if _release(ort.__version__) >= (1, 18):  # IEEE float32, as fp32 is everywhere in i3d
        cuda["use_tf32"] = 0  # (the CUDA EP's convolutions and GEMMs default to TF32)
    return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as ``1.18.1`` or ``1.20.0.dev2024``."""
    parts = re.findall(r"\d+", version)[:2]
    return tuple(int(p) for p in parts)


def _session_options(options: dict[str, Any]) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    threads = thread_count(options, "onnx")
    if threads is not None:
        so.intra_op_num_threads = threads
    level = str(options.get("optimization", "all")).lower()
    if level == "disable":
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif level in _OPT_LEVELS:
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[level])
    else:
        raise BackendError(f"optimization must be all, extended, basic or disable, got {level!r}")
    return so


def open_session(
    path: str | os.PathLike[str], providers: list[Any], options: dict[str, Any]
) -> Any:
    """An onnxruntime session for ``path``; load failures become a :class:`BackendError`."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise BackendError(f"ONNX model {path} does not exist")
    session_options = _session_options(options)
    try:
        return ort.InferenceSession(str(path), session_options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise BackendError(f"onnxruntime cannot load {path}: {exc}") from exc


def _weights_info(session: Any, path: str | os.PathLike[str]) -> WeightsInfo | None:
    """The i3d metadata ``export_onnx`` embedded (labels, preprocessing), if any."""
    meta = dict(session.get_modelmeta().custom_metadata_map)
    try:
        return WeightsInfo.from_metadata_if_any(meta, path)
    except WeightsError as exc:  # its message names the file already
        raise BackendError(str(exc)) from exc


class _Layout:
    """What an ONNX input accepts: rank 5 or 6, fixed views, fixed or symbolic batch."""

    def __init__(self, shape: list[Any], path: str) -> None:
        if len(shape) not in (5, 6):
            raise BackendError(
                f"{path}: input has rank {len(shape)}; "
                "expected (B, C, T, H, W) or (B, V, C, T, H, W)"
            )
        self.views = shape[1] if len(shape) == 6 else None
        if len(shape) == 6 and not isinstance(self.views, int):
            raise BackendError(f"{path}: the views axis must be static, got {self.views!r}")
        self.batch = shape[0] if isinstance(shape[0], int) else None
        self.clip = tuple(d if isinstance(d, int) else None for d in shape[-4:])
        self.path = path

    def check(self, clip: tuple[int, ...]) -> None:
        if any(want is not None and want != got for want, got in zip(self.clip, clip, strict=True)):
            wanted = tuple("?" if d is None else d for d in self.clip)
            raise BackendError(
                f"{self.path} was exported for clips (C, T, H, W) = {wanted}, got {clip}; "
                "re-export with matching --clip-len/--size or resize the input"
            )


class OnnxRunner(ClipRunner):
    """Runs clips through onnxruntime; a model (not a file) is exported per clip shape on demand."""

    backend = "onnx"
    precision = "fp32"

    def __init__(
        self,
        device: str,
        providers: list[Any],
        options: dict[str, Any],
        batch_size: int | None,
        *,
        onnx_path: str | os.PathLike[str] | None = None,
        model: nn.Module | None = None,
    ) -> None:
        self.providers = providers
        self.options = options
        self.device = device
        self.model = model
        self.sessions: dict[tuple[int, ...], tuple[Any, _Layout]] = {}
        self._fixed: tuple[Any, _Layout] | None = None
        if onnx_path is not None:
            session = open_session(onnx_path, providers, options)
            self._fixed = (session, _Layout(list(session.get_inputs()[0].shape), str(onnx_path)))
            layout = self._fixed[1]
            per_call = layout.views or 1
            chunk = layout.batch * per_call if layout.batch else (batch_size or 1) * per_call
            info = _weights_info(session, onnx_path)
            prep = info.preprocessing if info else None
            super().__init__(chunk, prep, pad_multiple=chunk if layout.batch else per_call)
            self.labels = info.labels if info else None
        elif model is not None:
            self._tmpdir = tempfile.mkdtemp(prefix="i3d-onnx-")
            weakref.finalize(self, shutil.rmtree, self._tmpdir, True)
            super().__init__(batch_size or 8, preprocessing_of(model))
            self.labels = labels_of(model)
        else:
            raise BackendError("OnnxRunner needs an ONNX file or a model")

    @property
    def input_shape(self) -> tuple[int | None, ...] | None:
        """An ONNX file's input shape (None per symbolic dim); None for a model exported here."""
        if self._fixed is None:
            return None
        dims = self._fixed[0].get_inputs()[0].shape
        return tuple(d if isinstance(d, int) else None for d in dims)

    def _session_for(self, clip: tuple[int, ...]) -> tuple[Any, _Layout]:
        if self._fixed is not None:
            self._fixed[1].check(clip)
            return self._fixed
        if clip not in self.sessions:
            from i3d.export import export_onnx

            _, clip_len, height, width = clip
            if height != width:
                raise BackendError(f"the onnx backend exports square clips; got {height}x{width}")
            path = Path(self._tmpdir) / f"model_{clip_len}x{height}.onnx"
            export_onnx(self.model, path, clip_len=clip_len, size=height, batch="dynamic")
            session = open_session(path, self.providers, self.options)
            self.sessions[clip] = (session, _Layout(list(session.get_inputs()[0].shape), str(path)))
        return self.sessions[clip]

    def _run(self, clips: torch.Tensor) -> torch.Tensor:
        session, layout = self._session_for(tuple(clips.shape[1:]))
        x = clips.numpy()
        if layout.views is not None:
            x = x.reshape(-1, layout.views, *x.shape[1:])
        name = session.get_inputs()[0].name
        try:
            out = session.run(None, {name: x})[0]
        except Exception as exc:  # onnxruntime's own exception types
            raise BackendError(f"onnxruntime failed on input {x.shape}: {exc}") from exc
        return torch.from_numpy(out.reshape(clips.shape[0], -1))


class OnnxBackend:
    """ONNX Runtime on CPU (or CUDA with onnxruntime-gpu)."""

    name = "onnx"

    def is_available(self) -> Availability:
        if importlib.util.find_spec("onnxruntime") is None:
            return Availability(False, "onnxruntime is not installed", None, INSTALL_HINT)
        import onnxruntime as ort

        providers = ", ".join(
            p.removesuffix("ExecutionProvider") for p in ort.get_available_providers()
        )
        return Availability(True, f"providers: {providers}", _ort_version(), INSTALL_HINT)

    def load(
        self,
        weights_or_model: Any,
        device: str | None,
        precision: str,
        batch_size: int | None,
        **options: Any,
    ) -> OnnxRunner:
        check_options(options, ONNX_OPTIONS, self.name)
        check_precision(precision, ("fp32",), self.name)
        if importlib.util.find_spec("onnxruntime") is None:
            raise BackendUnavailable(f"onnxruntime is not installed; {INSTALL_HINT}")
        _session_options(options)  # bad values fail here, not at the first export
        dev = device or "cpu"
        providers = providers_for(dev)
        if (
            isinstance(weights_or_model, str | os.PathLike)
            and Path(weights_or_model).suffix == ".onnx"
        ):
            return OnnxRunner(dev, providers, options, batch_size, onnx_path=weights_or_model)
        model = copy.deepcopy(resolve_model(weights_or_model)).eval()  # snapshot for export
        return OnnxRunner(dev, providers, options, batch_size, model=model)
