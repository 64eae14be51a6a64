"""Ascend offline models (.om from ATC) through ais_bench's ``InferSession``.

Layout as in the seeds' 310P3 deployment: the OM input is (B, V, 3, T, H, W) or (B, 3, T, H, W)
with a static batch, the output (B, V, K) or (B, K). Clips are regrouped, the last call is
zero-padded to the static batch and the padding's logits dropped.
Not run on real Ascend hardware: tested against a fake ``ais_bench``
(tests/test_backends_npu_om.py).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import re
import stat
import sys
import weakref
from collections.abc import Iterator
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
    first_line,
)
from i3d.backends.npu_backend import CANN_HINT, parse_npu_device
from i3d.weights.format import WeightsInfo

INSTALL_HINT = (
    "install the aclruntime and ais_bench wheels of ait's benchmark component "
    "(https://gitee.com/ascend/ait, ait/components/benchmark) on a machine with CANN set up"
)
#: ais_bench (2024-25) refuses model paths with other characters, and models over 10 GB
PATH_CHARACTERS = re.compile(r"[A-Za-z0-9_./-]")
MAX_MODEL_BYTES = 10 * 2**30


def import_infer_session() -> Any:
    """``ais_bench.infer.interface.InferSession``, or a clear error naming what is missing."""
    if importlib.util.find_spec("ais_bench") is None:
        raise BackendUnavailable(f"ais_bench is not installed; {INSTALL_HINT}")
    if importlib.util.find_spec("aclruntime") is None:
        raise BackendUnavailable(
            f"aclruntime (the runtime ais_bench drives) is not installed; {INSTALL_HINT}"
        )
    try:
        with stdout_to_stderr():  # ais_bench logs to stdout as it loads
            module = importlib.import_module("ais_bench.infer.interface")
    except (ImportError, OSError) as exc:  # aclruntime's libascendcl.so not found
        raise BackendUnavailable(
            f"aclruntime is installed but the CANN runtime is missing ({first_line(exc)}); "
            f"{CANN_HINT}"
        ) from exc
    return module.InferSession


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout in the block to stderr, C code's writes included.

    ais_bench and aclruntime log to stdout, where ``--json`` output goes.
    """
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 (a closed stdout): only Python-level writes to move
        saved = None
    if saved is not None:
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def check_model_path(path: Path) -> Path:
    """``path`` made absolute, once it passes ais_bench's model-path rules (else say which failed).

    ais_bench refuses a path outside [A-Za-z0-9_./-], a symlink, a file of another user or
    writable by group or others, and a model over 10 GB, with a log line instead of a reason.
    """
    absolute = Path(os.path.abspath(path))
    bad = sorted({c for c in str(absolute) if not PATH_CHARACTERS.fullmatch(c)})
    if bad:
        raise BackendError(
            f"ais_bench refuses model paths with characters other than [A-Za-z0-9_./-]; "
            f"{absolute} has {''.join(bad)!r}: rename it or move it to a plain path"
        )
    if absolute.is_symlink():
        raise BackendError(
            f"ais_bench refuses symlinked models; {absolute} links to {absolute.resolve()}: "
            "pass that file instead"
        )
    info = absolute.stat()
    user = os.geteuid()
    if user != 0 and info.st_uid != user:
        raise BackendError(
            f"ais_bench only loads models owned by the user running it; {absolute} belongs to "
            f"uid {info.st_uid}, not {user}: copy it (cp {absolute} ~/) and use the copy"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise BackendError(
            f"ais_bench refuses models writable by group or others; {absolute} has mode "
            f"{stat.filemode(info.st_mode)}: chmod go-w {absolute}"
        )
    if info.st_size > MAX_MODEL_BYTES:
        raise BackendError(
            f"ais_bench refuses models over 10 GB; {absolute} has {info.st_size / 2**30:.1f} "
            "GiB: export a smaller batch or fewer views"
        )
    return absolute


def _free(session: Any) -> None:
    with stdout_to_stderr():
        session.free_resource()


class OmRunner(ClipRunner):
    """Feeds static-batch chunks of clips to an ais_bench ``InferSession``."""

    backend = "om"

    def __init__(
        self,
        session: Any,
        path: Path,
        device_index: int,
        info: WeightsInfo | None = None,
        precision: str = "unknown",
    ) -> None:
        self.session = session
        self.path = path
        self.device = f"npu:{device_index}"
        self.precision = precision  # what ATC built (recorded by i3d export), not a choice here
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
        # the device memory is freed by close(), else when the runner goes or Python exits
        self._release = weakref.finalize(self, _free, session)

    def _run(self, clips: torch.Tensor) -> torch.Tensor:
        if not self._release.alive:
            raise BackendError(f"the om runner of {self.path} was closed; load it again")
        clip_shape = tuple(clips.shape[1:])
        if clip_shape != self.input_shape[-4:]:
            raise BackendError(
                f"{self.path} was compiled for clips (C, T, H, W) = {self.input_shape[-4:]}, "
                f"got {clip_shape}; re-export with matching --clip-len/--size"
            )
        feed = np.ascontiguousarray(clips.numpy().reshape(self.input_shape), dtype=np.float32)
        try:
            with stdout_to_stderr():
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

    def close(self) -> None:
        """Free the session's device memory and model now (ais_bench's ``free_resource``)."""
        self._release()


def om_info(path: Path) -> tuple[WeightsInfo | None, str]:
    """Labels/preprocessing and ATC precision of ``x.om``, from the ``x.onnx`` beside it.

    ATC drops ONNX metadata, so the source ONNX that ``i3d export`` leaves is the record.
    Without it (or without onnx installed) there is no WeightsInfo, so inputs must be
    normalised floats and labels are indices, and the precision is "unknown".
    """
    source = path.with_suffix(".onnx")
    if not source.is_file() or importlib.util.find_spec("onnx") is None:
        return None, "unknown"
    from i3d.export import ExportError, read_om_build, read_onnx_info

    try:
        build = read_om_build(source)
        return read_onnx_info(source), build["precision"] if build else "unknown"
    except ExportError as exc:
        raise BackendError(f"{path}: no labels/preprocessing from {source}: {exc}") from exc


class OmBackend:
    """Ascend inference cards (e.g. 310P3) running an ATC-compiled ``.om`` file."""

    name = "om"

    def is_available(self) -> Availability:
        try:
            import_infer_session()
        except BackendUnavailable as exc:
            text = str(exc)
            hint = CANN_HINT if text.endswith(CANN_HINT) else INSTALL_HINT
            return Availability(False, text.removesuffix(hint).removesuffix("; "), None, hint)
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
        path = check_model_path(path)
        index = parse_npu_device(device)
        info, built = om_info(path)
        infer_session = import_infer_session()
        try:
            with stdout_to_stderr():
                session = infer_session(index, str(path))
        except Exception as exc:  # device or model load failure inside aclruntime
            raise BackendError(f"ais_bench could not load {path} on npu:{index}: {exc}") from exc
        # a static model's own batch replaces batch_size
        try:
            return OmRunner(session, path, index, info, built)
        except BackendError:
            _free(session)
            raise
