"""torch.distributed below training and inference: the launcher, devices and sharded runs.

:mod:`i3d.distributed.launch` starts one process per device (spawned locally, or joining a
torchrun job); :mod:`i3d.distributed.devices` picks each rank's device from ``--backend/--device``;
:mod:`i3d.distributed.shard` splits inputs over the ranks by their cost;
:mod:`i3d.distributed.sharded` runs a per-item job on every rank, with per-item result files
that make it resumable, and merges them in input order.
"""

from i3d.distributed.launch import (
    PG_BACKENDS,
    DistContext,
    DistributedError,
    all_reduce_sum,
    barrier,
    device_for,
    env_launched,
    free_port,
    launch,
)

__all__ = [
    "PG_BACKENDS",
    "DistContext",
    "DistributedError",
    "all_reduce_sum",
    "barrier",
    "device_for",
    "env_launched",
    "free_port",
    "launch",
]
