"""What ``fp32`` means in i3d: IEEE float32 convolutions and matrix products on every device.

PyTorch runs float32 convolutions and matrix products at reduced precision unless told not
to: cuDNN convolutions use TF32 by default on Ampere and later GPUs, torch_npu's use HF32 by
default on Ascend, and ``torch.set_float32_matmul_precision("high")`` or ``("medium")``, common
in training scripts, turns on TF32 or bf16 matrix products on GPUs and CPUs alike. Their
10-bit mantissa moves logits by ~1e-3 relative, FVD in its third digit, and features from one
device to another. So i3d's forward passes run inside :func:`float32_mode`, which sets IEEE
float32 (or, for precision ``tf32``, the reduced mode) and gives the process its own settings
back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

#: precisions whose float32 work runs on TF32 (cuda) or HF32 (npu) tensor cores
REDUCED_FLOAT32 = ("tf32",)


def _switches(kind: str) -> list[tuple[Any, str, Any, Any]]:
    """(namespace, attribute, IEEE value, reduced value) of each switch for ``kind`` devices."""
    backends = torch.backends
    if kind == "cuda":
        if hasattr(backends.cudnn, "conv"):  # torch >= 2.9: per-operator fp32_precision
            return [
                (backends.cudnn.conv, "fp32_precision", "ieee", "tf32"),
                (backends.cuda.matmul, "fp32_precision", "ieee", "tf32"),
            ]
        return [
            (backends.cudnn, "allow_tf32", False, True),
            (backends.cuda.matmul, "allow_tf32", False, True),
        ]
    if kind == "npu":  # torch_npu's switches, present once it is imported
        npu = getattr(torch, "npu", None)
        return [
            (space, "allow_hf32", False, True)
            for space in (getattr(npu, "conv", None), getattr(npu, "matmul", None))
            if hasattr(space, "allow_hf32")
        ]
    if kind == "cpu" and hasattr(backends.mkldnn, "conv"):
        return [
            (backends.mkldnn.conv, "fp32_precision", "ieee", None),
            (backends.mkldnn.matmul, "fp32_precision", "ieee", None),
        ]
    return []


@contextlib.contextmanager
def float32_mode(device: torch.device | str, precision: str = "fp32") -> Iterator[None]:
    """Run float32 work on ``device`` as ``precision`` says (``fp32``: IEEE; ``tf32``: TF32 /
    HF32 tensor cores), restoring the process's settings on exit; other precisions (bf16,
    fp16) leave the settings alone."""
    if precision != "fp32" and precision not in REDUCED_FLOAT32:
        yield
        return
    kind = device.type if isinstance(device, torch.device) else str(device).split(":")[0]
    switches = _switches(kind)  # (a string: "npu" is a device type only once torch_npu loads)
    saved = [getattr(space, name) for space, name, _, _ in switches]
    try:
        for space, name, exact, reduced in switches:
            wanted = exact if precision == "fp32" else reduced
            if wanted is not None:
                setattr(space, name, wanted)
        yield
    finally:
        for (space, name, _, _), value in zip(switches, saved, strict=True):
            setattr(space, name, value)
