"""Ascend NPU in eager PyTorch through torch_npu, imported only when this backend is used.

Not run on real Ascend hardware: the device, precision and option plumbing is tested with a
fake ``torch_npu`` module (tests/test_backends_npu_om.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from types import ModuleType
from typing import Any

import torch

from i3d.backends.base import (
    PRECISIONS,
    Availability,
    BackendError,
    BackendUnavailable,
    check_options,
    check_precision,
    first_line,
    resolve_model,
)
from i3d.backends.torch_backend import DEFAULT_BATCH_SIZE, TORCH_OPTIONS, TorchRunner, parse_flag

_TORCH_RELEASE = torch.__version__.split("+")[0]
TORCH_NPU_HINT = (
    f"pip install torch-npu=={_TORCH_RELEASE} (the release matching torch {_TORCH_RELEASE}; "
    "see https://gitcode.com/ascend/pytorch); on x86 torch must be the CPU build: pip install "
    f"torch=={_TORCH_RELEASE} --index-url https://download.pytorch.org/whl/cpu"
)
CANN_HINT = (
    "install the Ascend CANN toolkit and driver, then `source "
    "/usr/local/Ascend/ascend-toolkit/set_env.sh` before running i3d"
)
CPU_TORCH_HINT = (
    "install the CPU build of torch next to torch_npu: pip install "
    f"torch=={_TORCH_RELEASE} --index-url https://download.pytorch.org/whl/cpu"
)

NPU_OPTIONS = {
    **{k: v for k, v in TORCH_OPTIONS.items() if k != "compile"},
    "jit_compile": "bool, torch_npu.npu.set_compile_mode(jit_compile=...) (false: binary kernels)",
    "allow_internal_format": "bool, torch_npu.npu.config.allow_internal_format",
}


def import_torch_npu() -> ModuleType:
    """Import torch_npu, sorting every way it fails on a broken setup into a one-line error.

    The message is ``what went wrong; how to fix it`` (:class:`BackendUnavailable`).
    """
    if importlib.util.find_spec("torch_npu") is None:
        raise BackendUnavailable(f"torch_npu is not installed; {TORCH_NPU_HINT}")
    try:
        return importlib.import_module("torch_npu")
    except (ImportError, OSError) as exc:  # libhccl.so / libascendcl.so not found
        text = first_line(exc)
        if re.search(r"lib(ascend|hccl|acl|ge_|runtime|opapi)|Ascend|\.so", text, re.IGNORECASE):
            raise BackendUnavailable(
                f"torch_npu is installed but the CANN runtime is missing ({text}); {CANN_HINT}"
            ) from exc
        raise BackendUnavailable(f"torch_npu failed to import ({text}); {TORCH_NPU_HINT}") from exc
    except RuntimeError as exc:  # a CUDA build of torch already owns the accelerator slot
        text = first_line(exc)
        if re.search(r"accelerator|cuda", text, re.IGNORECASE):
            raise BackendUnavailable(
                f"torch_npu cannot load into a CUDA build of torch ({text}); {CPU_TORCH_HINT}"
            ) from exc
        raise BackendUnavailable(f"torch_npu failed to import ({text}); {TORCH_NPU_HINT}") from exc
    except Exception as exc:  # torch_npu raises a bare Exception for a wrong ASCEND_HOME_PATH
        text = first_line(exc)
        if "ASCEND" in text.upper():
            raise BackendUnavailable(
                f"torch_npu rejected the CANN setup ({text}); {CANN_HINT}"
            ) from exc
        raise BackendUnavailable(f"torch_npu failed to import ({text}); {TORCH_NPU_HINT}") from exc


def parse_npu_device(device: str | None) -> int:
    """``npu``, ``npu:N`` or ``N`` → the device index."""
    text = (device or "npu:0").strip().lower()
    match = re.fullmatch(r"(?:npu(?::(\d+))?|(\d+))", text)
    if match is None:
        raise BackendError(f"invalid NPU device {device!r}; expected npu, npu:N or N")
    return int(match.group(1) or match.group(2) or 0)


def npu_placement(index: int) -> tuple[torch.device, str]:
    """The torch device for NPU ``index`` and the autocast device type to use there."""
    return torch.device("npu", index), "npu"


def _set_switches(torch_npu: ModuleType, options: dict[str, Any]) -> None:
    if "jit_compile" in options:
        torch_npu.npu.set_compile_mode(jit_compile=parse_flag(options, "jit_compile", False))
    if "allow_internal_format" in options:
        torch_npu.npu.config.allow_internal_format = parse_flag(
            options, "allow_internal_format", True
        )


class NpuBackend:
    """Eager PyTorch on an Ascend NPU (``npu:N``), with autocast bf16/fp16."""

    name = "npu"

    def is_available(self) -> Availability:
        try:
            torch_npu = import_torch_npu()
        except BackendUnavailable as exc:
            text = str(exc)
            hint = next(h for h in (CANN_HINT, CPU_TORCH_HINT, TORCH_NPU_HINT) if text.endswith(h))
            reason = text.removesuffix(hint).removesuffix("; ")
            return Availability(ok=False, reason=reason, install_hint=hint)
        version = getattr(torch_npu, "__version__", None)
        count = torch_npu.npu.device_count()
        if count == 0:
            return Availability(
                ok=False,
                reason="torch_npu imported but no NPU is visible (check `npu-smi info`)",
                version=version,
                install_hint=CANN_HINT,
            )
        return Availability(ok=True, reason=f"{count} NPU device(s)", version=version)

    def load(
        self,
        weights_or_model: Any,
        device: str | None,
        precision: str,
        batch_size: int | None,
        **options: Any,
    ) -> TorchRunner:
        check_options(options, NPU_OPTIONS, self.name)
        check_precision(precision, PRECISIONS, self.name)
        index = parse_npu_device(device)
        torch_npu = import_torch_npu()
        count = torch_npu.npu.device_count()
        if index >= count:
            raise BackendError(
                f"device npu:{index} does not exist: {count} NPU device(s) visible; "
                "check `npu-smi info` and ASCEND_RT_VISIBLE_DEVICES"
            )
        if precision == "bf16" and not torch_npu.npu.is_bf16_supported():
            raise BackendError(
                f"npu:{index} has no bf16 (torch.npu.is_bf16_supported() is false, as on a "
                "310P), where torch silently turns autocast off; use precision fp16"
            )
        torch_npu.npu.set_device(index)
        _set_switches(torch_npu, options)
        device_obj, autocast_type = npu_placement(index)
        model = resolve_model(weights_or_model)
        runner_options = {k: v for k, v in options.items() if k in TORCH_OPTIONS}
        runner = TorchRunner(
            model,
            device_obj,
            precision,
            batch_size or DEFAULT_BATCH_SIZE,
            runner_options,
            autocast_device_type=autocast_type,
        )
        runner.backend, runner.device = self.name, f"npu:{index}"
        return runner
