"""Per-item jobs (predict, evaluate, features) on N ranks, resumable, merged in input order.

:func:`run_sharded` runs under :func:`~i3d.distributed.launch.launch`: every rank builds
its processor once (``make_processor(ctx)``: load the weights on ``ctx.device``), runs its
share of the inputs (:func:`~i3d.distributed.shard.balanced_shards` by cost) and writes each
result as soon as it has it, atomically, to a file named by the input's index:

    FOLDER/manifest.json            the input keys and the settings fingerprint
    FOLDER/items/00000012.npy       input 12's result, a numpy array (bit-exact dtype/shape)
    FOLDER/items/00000012.json      ... or a JSON value
    FOLDER/items/00000013.failed.json   input 13 failed: {"reason": ...}
    FOLDER/items/00000012.warnings.json what was wrong with input 12 though it has a result
    FOLDER/ranks/rank-1.json        rank 1 is through its share (torchrun jobs)

With ``log_dir``, every rank also appends to ``LOG_DIR/rank-R.log``: when it starts (device,
share), each input with its time and outcome, and the warnings and log records of the
process (a truncated video, a backend's notes), so a slow or failing rank can be read apart.

Results do not depend on which rank made them, so a rerun, with any world size, runs only the
inputs without a result (failed ones are retried), and the merge reads the files in input
order: the same records, byte for byte, as one process. Ranks never wait on each other while
they work (no collective; a torchrun job uses its process group once, at the start, to agree
on what is left to run): a spawned rank that dies makes the launcher terminate the others, and
torchrun does the same for its workers. Ctrl-C (SIGINT) stops every rank in its current
input, and :class:`RunIncomplete` says how many inputs are left for a rerun; SIGTERM (or a
kill) ends a rank at once. Either way every result written stays, and a rerun runs the rest.
The folder must be shared by all ranks (one machine, or a shared file system).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from i3d.distributed.launch import DistContext, env_launched, launch
from i3d.distributed.shard import shard_of
from i3d.utils.files import atomic_path, ensure_dir

MANIFEST_VERSION = 1

log = logging.getLogger(__name__)

#: ``make_processor(ctx)`` returns a function that takes a rank's inputs in order and yields
#: one result for each (a JSON value, a numpy array, a tensor, or :class:`Failed`)
ProcessorFactory = Callable[[DistContext], Callable[[Sequence[Any]], Iterable[Any]]]


class ShardedRunError(RuntimeError):
    """A sharded run cannot start or continue (another run's folder, a faulty processor)."""


class RunIncomplete(ShardedRunError):
    """The run stopped (interrupted) before every input had a result; a rerun finishes it."""

    def __init__(self, missing: Sequence[int], total: int) -> None:
        super().__init__(list(missing), total)
        self.missing, self.total = list(missing), total

    def __str__(self) -> str:
        return (
            f"stopped with {len(self.missing)} of {self.total} inputs not run; run it again "
            "to finish them (inputs with results are kept)"
        )


@attrs.frozen
class Failed:
    """What a processor yields for an input it could not process, with the reason."""

    reason: str


@attrs.frozen
class Noted:
    """What a processor yields for an input it processed with warnings (a video read only
    in part): the result, and the warnings, which the merge hands back beside it."""

    value: Any
    warnings: tuple[str, ...]


@attrs.frozen
class Outcome:
    """Input ``index``'s result: ``value`` (JSON value or numpy array), or ``error``;
    ``warnings`` where the processor noted some."""

    index: int
    value: Any = attrs.field(default=None, eq=False)
    error: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None


class ResultFolder:
    """The per-input result files of one run (see the module docstring for the layout)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.items = self.path / "items"
        self.ranks = self.path / "ranks"

    # -- the manifest: which inputs, made how -------------------------------------------------
    def claim(self, keys: Sequence[str], fingerprint: str) -> None:
        """Write the manifest, or check that an existing one is for these inputs and settings."""
        ensure_dir(self.items)
        ensure_dir(self.ranks)
        manifest = self.path / "manifest.json"
        ours = {"version": MANIFEST_VERSION, "fingerprint": fingerprint, "keys": list(keys)}
        if manifest.is_file():
            try:
                stored = json.loads(manifest.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ShardedRunError(f"{manifest} is not readable ({exc})") from exc
            if stored != ours:
                what = "settings" if stored.get("keys") == ours["keys"] else "inputs"
                raise ShardedRunError(
                    f"{self.path} holds partial results of a run with other {what}; use "
                    "another folder, or delete it to start over"
                )
            return
        with atomic_path(manifest) as tmp:
            tmp.write_text(json.dumps(ours) + "\n", encoding="utf-8")

    # -- per-input files ----------------------------------------------------------------------
    def _names(self) -> set[str]:
        try:
            return set(os.listdir(self.items))
        except FileNotFoundError:
            return set()

    def done(self) -> set[int]:
        """Indices of the inputs that have a result (failed ones are not done)."""
        outcomes = (_outcome_file(name) for name in self._names())
        return {o[0] for o in outcomes if o is not None and o[1] != "failed.json"}

    def finished(self) -> int:
        """How many inputs have a result or failed."""
        return sum(1 for name in self._names() if _outcome_file(name) is not None)

    def remove_temporaries(self) -> None:
        """Remove the half-written files of a killed rank (only while no rank runs)."""
        for name in self._names():
            if name.startswith(".") and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    (self.items / name).unlink()

    def put(self, index: int, value: Any) -> None:
        """Record input ``index``'s result (or :class:`Failed`, or :class:`Noted`) atomically;
        a result's warnings are written before it, so a result never lacks its warnings."""
        if isinstance(value, Failed):
            self.fail(index, value.reason)
            return
        notes = self.items / f"{index:08d}.warnings.json"
        if isinstance(value, Noted):
            with atomic_path(notes) as tmp:
                tmp.write_text(json.dumps(list(value.warnings)), encoding="utf-8")
            value = value.value
        else:
            with contextlib.suppress(FileNotFoundError):  # an earlier try's warnings
                notes.unlink()
        if _is_tensor(value):
            value = value.detach().cpu().numpy()
        stem = self.items / f"{index:08d}"
        if isinstance(value, np.ndarray):
            with atomic_path(stem.with_suffix(".npy")) as tmp, open(tmp, "wb") as fh:
                np.save(fh, value, allow_pickle=False)
        else:
            try:
                text = json.dumps(value)
            except (TypeError, ValueError) as exc:
                raise ShardedRunError(
                    f"result of input {index} is neither a numpy array nor JSON ({exc})"
                ) from exc
            with atomic_path(stem.with_suffix(".json")) as tmp:
                tmp.write_text(text, encoding="utf-8")
        with contextlib.suppress(FileNotFoundError):  # a retry that now succeeded
            (self.items / f"{index:08d}.failed.json").unlink()

    def fail(self, index: int, reason: str) -> None:
        with atomic_path(self.items / f"{index:08d}.failed.json") as tmp:
            tmp.write_text(json.dumps({"reason": reason}), encoding="utf-8")
        with contextlib.suppress(FileNotFoundError):  # an earlier try's warnings
            (self.items / f"{index:08d}.warnings.json").unlink()

    def outcome(self, index: int, names: set[str] | None = None) -> Outcome | None:
        """Input ``index``'s outcome, or None when it has not been run."""
        names = self._names() if names is None else names
        stem = f"{index:08d}"
        warnings: tuple[str, ...] = ()
        if f"{stem}.warnings.json" in names:
            text = (self.items / f"{stem}.warnings.json").read_text("utf-8")
            warnings = tuple(str(w) for w in json.loads(text))
        if f"{stem}.npy" in names:
            value = np.load(self.items / f"{stem}.npy", allow_pickle=False)
            return Outcome(index, value, warnings=warnings)
        if f"{stem}.json" in names:
            value = json.loads((self.items / f"{stem}.json").read_text("utf-8"))
            return Outcome(index, value, warnings=warnings)
        if f"{stem}.failed.json" in names:
            text = (self.items / f"{stem}.failed.json").read_text("utf-8")
            return Outcome(index, error=json.loads(text)["reason"])
        return None

    def iter_outcomes(self, count: int) -> Iterator[Outcome]:
        """Outcomes of inputs ``0..count-1`` in order; :class:`RunIncomplete` if any is missing."""
        names = self._names()
        missing = [
            i
            for i in range(count)
            if not {f"{i:08d}.npy", f"{i:08d}.json", f"{i:08d}.failed.json"} & names
        ]
        if missing:
            raise RunIncomplete(missing, count)
        for index in range(count):
            outcome = self.outcome(index, names)
            assert outcome is not None
            yield outcome

    # -- rank markers (torchrun jobs: rank 0 waits for them before merging) ------------------
    def mark_rank(self, rank: int, token: str) -> None:
        with atomic_path(self.ranks / f"rank-{rank}.json") as tmp:
            tmp.write_text(json.dumps({"token": token}), encoding="utf-8")

    def ranks_through(self, world_size: int, token: str) -> bool:
        for rank in range(world_size):
            try:
                marker = json.loads((self.ranks / f"rank-{rank}.json").read_text("utf-8"))
            except (OSError, ValueError):
                return False
            if marker.get("token") != token:
                return False
        return True


def _outcome_file(name: str) -> tuple[int, str] | None:
    """(input index, suffix) of an items/ file holding an input's result (``npy``, ``json``)
    or failure (``failed.json``); None for temporary files and a result's warnings."""
    stem, _, suffix = name.partition(".")
    if stem.isdigit() and suffix in ("npy", "json", "failed.json"):
        return int(stem), suffix
    return None


def _is_tensor(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor)


@attrs.frozen
class _Job:
    """What every rank gets (pickled to spawned ranks)."""

    folder: str
    items: tuple[Any, ...]
    make_processor: ProcessorFactory
    catch: tuple[type[BaseException], ...]
    pending: tuple[int, ...] | None  # None: a torchrun job; rank 0 decides at the start
    costs: tuple[float, ...] | None
    cost_of: Callable[[Any], float] | None
    keys: tuple[str, ...]
    fingerprint: str
    token: str
    log_dir: str | None = None


def _plan(job: _Job) -> _Job:
    """Claim the folder and fix what is left to run, with its costs (one process does this)."""
    folder = ResultFolder(job.folder)
    folder.claim(job.keys, job.fingerprint)
    folder.remove_temporaries()  # no rank runs yet: these are left by ranks that were killed
    done = folder.done()
    pending = tuple(i for i in range(len(job.items)) if i not in done)
    if job.cost_of is not None:
        costs = tuple(float(job.cost_of(job.items[i])) for i in pending)
    elif job.costs is not None:
        costs = tuple(job.costs[i] for i in pending)
    else:
        costs = tuple(1.0 for _ in pending)
    return attrs.evolve(job, pending=pending, costs=costs, token=uuid.uuid4().hex)


def _agree(ctx: DistContext, job: _Job) -> _Job:
    """torchrun: rank 0 plans, every rank receives the plan; then the process group goes."""
    import torch.distributed as dist

    if not dist.is_initialized():  # one process
        return _plan(job)
    box: list[Any] = [None]
    if ctx.is_main:
        try:
            planned = _plan(job)
            box = [(planned.pending, planned.costs, planned.token, None)]
        except Exception as exc:
            box = [(None, None, None, f"{type(exc).__name__}: {exc}")]
    dist.broadcast_object_list(box, src=0)
    dist.barrier()
    dist.destroy_process_group()  # no collective while the ranks do uneven work
    pending, costs, token, error = box[0]
    if error is not None:
        raise ShardedRunError(f"rank 0 could not plan the run: {error}")
    return attrs.evolve(job, pending=pending, costs=costs, token=token)


def _run_rank(ctx: DistContext, job: _Job) -> tuple[int, int, str]:
    """Every rank: run this rank's share; return (rank, world size, run token)."""
    if job.pending is None:
        job = _agree(ctx, job)
    assert job.pending is not None and job.costs is not None
    folder = ResultFolder(job.folder)
    mine = [job.pending[i] for i in shard_of(job.costs, ctx.rank, ctx.world_size)]
    with _rank_log(job.log_dir, ctx), _first_ctrl_c_only(ctx.distributed):
        log.info(
            "rank %d of %d on %s: %d of %d inputs to run",
            ctx.rank, ctx.world_size, ctx.device, len(mine), len(job.pending),
        )  # fmt: skip
        try:
            if mine:
                _run_share(ctx, job, folder, mine)
        except KeyboardInterrupt:  # Ctrl-C: keep what is written, stop
            log.info("interrupted")
        folder.mark_rank(ctx.rank, job.token)
        log.info("through its share")
    return ctx.rank, ctx.world_size, job.token


@contextlib.contextmanager
def _rank_log(log_dir: str | None, ctx: DistContext) -> Iterator[None]:
    """Append this rank's records, and the process's warnings, to ``LOG_DIR/rank-R.log``;
    warnings still reach stderr as before."""
    if log_dir is None:
        yield
        return
    ensure_dir(Path(log_dir))
    handler = logging.FileHandler(Path(log_dir) / f"rank-{ctx.rank}.log", encoding="utf-8")
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s rank {ctx.rank} %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    console = None if root.handlers else logging.StreamHandler()  # what lastResort printed
    if console is not None:
        console.setLevel(logging.WARNING)
        root.addHandler(console)
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.setLevel(level)
        root.removeHandler(handler)
        if console is not None:
            root.removeHandler(console)
        handler.close()


@contextlib.contextmanager
def _first_ctrl_c_only(active: bool) -> Iterator[None]:
    """In a rank of many, only the first SIGINT interrupts: a Ctrl-C in a terminal reaches a
    spawned rank twice (from the terminal and passed on by the launcher), and the second must
    not break the rank's orderly stop. The launcher's own second Ctrl-C terminates the ranks."""
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = False

    def interrupt(_signum: int, _frame: Any) -> None:
        nonlocal pressed
        if not pressed:
            pressed = True
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _run_share(ctx: DistContext, job: _Job, folder: ResultFolder, mine: list[int]) -> None:
    """Run ``mine`` in order. An exception of ``job.catch`` fails the input it came with,
    and the processor starts again on the inputs after it."""
    process = job.make_processor(ctx)
    pos = 0
    while pos < len(mine):
        results: Iterator[Any] | None = None
        started = time.monotonic()
        try:
            while pos < len(mine):
                try:
                    if results is None:
                        results = iter(process([job.items[i] for i in mine[pos:]]))
                    value = next(results)
                except StopIteration:
                    raise ShardedRunError(
                        f"the processor stopped after {pos} of {len(mine)} inputs"
                    ) from None
                except job.catch as exc:
                    folder.fail(mine[pos], f"{type(exc).__name__}: {exc}")
                    log.info("input %d failed after %.2f s: %s: %s", mine[pos],
                             time.monotonic() - started, type(exc).__name__, exc)  # fmt: skip
                    pos += 1
                    break
                folder.put(mine[pos], value)  # outside the try: a full disk stops the job
                outcome = f"failed: {value.reason}" if isinstance(value, Failed) else "done"
                if isinstance(value, Noted):
                    outcome += f" with {len(value.warnings)} warning(s)"
                log.info("input %d (%s) %s in %.2f s", mine[pos], job.keys[mine[pos]],
                         outcome, time.monotonic() - started)  # fmt: skip
                pos += 1
                started = time.monotonic()
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()  # a generator left behind runs its cleanup now


def run_sharded(
    items: Sequence[Any],
    make_processor: ProcessorFactory,
    folder: str | os.PathLike[str],
    *,
    costs: Sequence[float] | Callable[[Any], float] | None = None,
    keys: Sequence[str] | None = None,
    fingerprint: str = "",
    world_size: int = 1,
    backend: str = "cpu",
    timeout_s: float = 600.0,
    catch: tuple[type[BaseException], ...] = (Exception,),
    wait_s: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    log_dir: str | os.PathLike[str] | None = None,
) -> list[Outcome] | None:
    """Run every input through ``make_processor(ctx)`` on ``world_size`` ranks (or the ranks
    of the torchrun job this process belongs to); rank 0 gets the outcomes in input order,
    the other ranks of a torchrun job None.

    ``items`` (and ``make_processor``, a module-level function or a ``functools.partial`` of
    one) are pickled to spawned ranks. ``costs`` (a list, or a function of an item such as
    :func:`~i3d.distributed.shard.video_cost`, probed once for the inputs still to run)
    balance the shards; without them every input costs the same. ``keys`` (default
    ``str(item)``) and ``fingerprint`` (what else decides the results: weights, protocol)
    identify the run in ``folder``: a folder of another run is refused. An exception of a
    ``catch`` type while an input runs fails that input with its reason; other exceptions
    stop the job. ``wait_s`` bounds how long rank 0 of a torchrun job waits for its peers
    after its own share (torchrun stops every worker when one fails). Raises
    :class:`RunIncomplete` when the ranks were stopped (Ctrl-C) before the end, and
    :class:`~i3d.distributed.launch.DistributedError` when a rank failed or died.
    ``on_progress(finished, total)`` hears, while the ranks run, how many inputs have a
    result or failed (in the launcher, or on rank 0 of a torchrun job once its share is done).
    ``log_dir`` keeps a log per rank (``rank-R.log``, appended; see the module docstring).
    """
    items = tuple(items)
    keys = tuple(str(item) for item in items) if keys is None else tuple(keys)
    if len(keys) != len(items):
        raise ValueError(f"{len(keys)} keys for {len(items)} inputs")
    if costs is not None and not callable(costs) and len(costs) != len(items):
        raise ValueError(f"{len(costs)} costs for {len(items)} inputs")
    job = _Job(
        folder=str(folder),
        items=items,
        make_processor=make_processor,
        catch=catch,
        pending=None,
        costs=None if costs is None or callable(costs) else tuple(float(c) for c in costs),
        cost_of=costs if callable(costs) else None,
        keys=keys,
        fingerprint=fingerprint,
        token="",
        log_dir=None if log_dir is None else str(Path(log_dir).absolute()),
    )
    torchrun = env_launched()
    if not torchrun:  # the launcher sees the job before any rank starts: it plans
        job = attrs.evolve(_plan(job), cost_of=None)
    results = ResultFolder(folder)
    poll = None
    if on_progress is not None:

        def poll() -> None:
            on_progress(results.finished(), len(items))

    rank, world, token = launch(
        _run_rank, job, backend, world_size, timeout_s, group=torchrun, poll=poll
    )
    if torchrun:
        if rank != 0:
            return None
        _wait_for_ranks(results, world, token, wait_s, poll)
    if poll is not None:
        poll()
    return list(results.iter_outcomes(len(items)))


def _wait_for_ranks(
    folder: ResultFolder,
    world: int,
    token: str,
    wait_s: float | None,
    poll: Callable[[], None] | None,
) -> None:
    start = time.monotonic()
    with contextlib.suppress(KeyboardInterrupt):
        while not folder.ranks_through(world, token):
            if poll is not None:
                poll()
            if wait_s is not None and time.monotonic() - start > wait_s:
                raise ShardedRunError(
                    f"rank 0 waited {wait_s:.0f} s for the other ranks to finish their shares"
                )
            time.sleep(0.2)
