"""Which device a rank runs on, from ``--backend`` and ``--device``: shared by sharded
prediction, features and FVD."""

from __future__ import annotations

from typing import Any

#: a rank's device type → the process-group device (``npu`` covers the ``om`` backend)
_GROUP_DEVICE = {"cpu": "cpu", "cuda": "cuda", "npu": "npu"}


def group_device(backend: str, device: str | None) -> str:
    """The device kind the launcher gives the ranks (cpu, cuda or npu), from
    ``--backend/--device``. ``om`` ranks open ``npu:<local rank>`` through ais_bench
    themselves, so they need no torch_npu: the launcher treats them as cpu ranks."""
    if backend == "om":
        return "cpu"
    if backend == "npu":
        return "npu"
    kind = (device or "cpu").split(":")[0]
    if kind not in _GROUP_DEVICE:
        raise ValueError(
            f"--world-size runs one process per cpu, cuda or npu device, not {device!r}"
        )
    return _GROUP_DEVICE[kind]


def rank_device(backend: str, device: str | None, ctx: Any) -> str | None:
    """This rank's device: its own ``cuda:N`` / ``npu:N`` (local rank), or the cpu."""
    if backend == "om":
        return f"npu:{ctx.local_rank}" if ctx.distributed else device
    return device if ctx.device.type == "cpu" else str(ctx.device)
