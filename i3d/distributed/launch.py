"""One process per device through torch.distributed: spawn locally or join a torchrun job.

Shared by training (DDP) and sharded inference (:mod:`i3d.distributed.sharded`).

Process-group backends: gloo (cpu), nccl (cuda), hccl (npu, via Ascend's ``torch_npu``).
``--world-size N`` on one machine spawns N workers with ``torch.multiprocessing``; when the
``env://`` variables of a launcher (torchrun) are present, this process joins that job. A
failing worker takes every other worker down (the spawner terminates them; collectives time
out after ``timeout_s``), and the process group is destroyed on success and on error.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import attrs
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PG_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
_ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A device or a distributed job could not be set up, or a worker failed."""


@attrs.frozen
class DistContext:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def device_for(backend: str, local_rank: int = 0) -> torch.device:
    """The torch device of ``backend`` for this local rank, after checking it exists."""
    if backend == "cpu":
        return torch.device("cpu")
    if backend == "npu":
        from i3d.backends import BackendUnavailable
        from i3d.backends.npu_backend import import_torch_npu

        try:
            import_torch_npu()  # registers torch.npu and the "npu" device
        except BackendUnavailable as exc:
            raise DistributedError(f"--backend npu: {exc}") from None
    if backend not in ("cuda", "npu"):
        raise DistributedError(f"unknown backend {backend!r}; use cpu, cuda or npu")
    module = getattr(torch, backend)
    if not module.is_available():
        raise DistributedError(f"no {backend} device is visible to this process; use --backend cpu")
    if local_rank >= module.device_count():
        raise DistributedError(
            f"local rank {local_rank} needs {backend}:{local_rank} but only "
            f"{module.device_count()} {backend} devices are visible; lower --world-size"
        )
    module.set_device(local_rank)
    return torch.device(backend, local_rank)


def env_launched() -> bool:
    """True inside a torchrun-style job (the env:// rendezvous variables are set)."""
    return all(key in os.environ for key in _ENV_KEYS)


def _init(backend: str, timeout_s: float, group: bool = True) -> DistContext:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = device_for(backend, local_rank)
    if world > 1 and group:
        dist.init_process_group(
            PG_BACKENDS[backend],
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=timeout_s),
        )
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def _shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _spawned(
    local_rank: int,
    worker: Callable[[DistContext, Any], Any],
    payload: Any,
    backend: str,
    world_size: int,
    port: int,
    timeout_s: float,
    results: Any,
    passthrough: tuple[type[BaseException], ...],
    group: bool,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(world_size),
    )
    if backend == "cpu":  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    agreed = False  # every rank reached the same end, so they can leave the group together
    try:
        ctx = _init(backend, timeout_s, group)
        output = worker(ctx, payload)
        agreed = True
        if ctx.is_main:
            results.put(("ok", local_rank, output, None))
    except passthrough as exc:  # an agreed stop: every rank exits cleanly, rank 0 reports it
        agreed = True
        results.put(("error", local_rank, _describe(exc), _portable(exc)))
    except BaseException as exc:
        results.put(("error", local_rank, _describe(exc), None))
        raise
    finally:
        if agreed and dist.is_initialized():
            dist.barrier()  # no rank tears its connections down while a peer still uses them
        _shutdown()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _portable(exc: BaseException) -> BaseException | None:
    """``exc`` if it survives pickling (to be raised again in the launcher), else None."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return None
    return exc


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _CtrlC:
    """The launcher's SIGINT/SIGTERM handler while spawned workers run: the first signal is
    passed to the workers (they finish their current step and save; from a terminal they
    got Ctrl-C already), a second one aborts the launcher, which then terminates them."""

    def __init__(self) -> None:
        self.presses = 0
        self.processes: list[Any] = []

    def __call__(self, signum: int, _frame: Any) -> None:
        self.presses += 1
        if self.presses > 1:
            raise KeyboardInterrupt
        for process in self.processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[_CtrlC]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def launch(
    worker: Callable[[DistContext, Any], Any],
    payload: Any,
    backend: str = "cpu",
    world_size: int = 1,
    timeout_s: float = 600.0,
    passthrough: tuple[type[BaseException], ...] = (),
    group: bool = True,
    poll: Callable[[], None] | None = None,
) -> Any:
    """Run ``worker(ctx, payload)`` on every rank; return rank 0's result.

    ``worker`` must be a module-level function (spawned workers import it). An exception of a
    ``passthrough`` type raised by rank 0 reaches the caller as it is (other failures become a
    :class:`DistributedError` naming the rank). ``group=False`` starts the ranks without a
    process group (they get their rank and device only, and no collective, so none can wait
    on a peer): for jobs whose ranks share their work through files. Spawned ranks are still
    watched, and one that dies terminates the others. ``poll`` is called about twice a
    second while spawned ranks run (a progress display in the launching process).
    """
    if env_launched():
        ctx = _init(backend, timeout_s, group)
        try:
            return worker(ctx, payload)
        finally:
            _shutdown()
    if world_size == 1:
        return worker(DistContext(device=device_for(backend, 0)), payload)
    results = mp.get_context("spawn").SimpleQueue()
    port = free_port()
    args = (worker, payload, backend, world_size, port, timeout_s, results, passthrough, group)
    with _CtrlC().installed() as ctrl_c:
        context = mp.start_processes(
            _spawned, args=args, nprocs=world_size, join=False, start_method="spawn"
        )
        ctrl_c.processes = context.processes
        try:
            while not context.join(timeout=0.5 if poll is not None else None):
                if poll is not None:
                    poll()
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
            reported = _drain(results)
            if _outcome(reported) is not None:  # decided before a crash on the way out
                return _finish(reported)
            # the rank torch saw fail first; the others' errors are usually its consequences
            first = exc.error_index
            errors = sorted((r for r in reported if r[0] == "error"), key=lambda r: r[1] != first)
            if errors:
                raise DistributedError(
                    f"worker rank {errors[0][1]} failed: {errors[0][2]}"
                ) from None
            oom = (
                " (out of memory? the kernel's OOM killer sends it)"
                if "SIGKILL" in str(exc)
                else ""
            )
            raise DistributedError(f"a worker died: {exc}{oom}") from None
        except KeyboardInterrupt:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            raise
    return _finish(_drain(results))


def _outcome(reported: list[tuple[str, int, Any, BaseException | None]]) -> tuple | None:
    """Rank 0's result, or its passthrough exception, among what the workers reported."""
    return next((r for r in reported if r[0] == "ok" or (r[1] == 0 and r[3] is not None)), None)


def _finish(reported: list[tuple[str, int, Any, BaseException | None]]) -> Any:
    """Return rank 0's result or raise its passthrough exception."""
    outcome = _outcome(reported)
    if outcome is None:
        raise DistributedError("the workers finished without a result from rank 0")
    status, _, output, exc = outcome
    if status == "ok":
        return output
    raise exc from None


def _drain(queue: Any) -> list[tuple[str, int, Any, BaseException | None]]:
    items = []
    while not queue.empty():
        items.append(queue.get())
    return items


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (identity when not distributed)."""
    if not ctx.distributed:
        return list(values)
    dtype = torch.float32 if ctx.device.type == "npu" else torch.float64  # hccl lacks fp64
    tensor = torch.tensor(values, dtype=dtype, device=ctx.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
