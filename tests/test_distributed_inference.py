"""Sharded inference: balanced shards, cost probes, per-input result files, resume, faults."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from videogen import write_video

from i3d.distributed import DistContext, DistributedError, free_port
from i3d.distributed.shard import balanced_shards, shard_of, video_cost
from i3d.distributed.sharded import (
    Failed,
    ResultFolder,
    RunIncomplete,
    ShardedRunError,
    run_sharded,
)

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# -- processors (module level: spawned ranks import them) ----------------------------------
def _result(item: int):
    """Arrays for even inputs, JSON records for odd ones; negative inputs fail."""
    if item < 0:
        raise ValueError(f"input {item} is negative")
    if item == 7:
        return Failed("seven is refused")
    if item % 2 == 0:
        return np.arange(item, dtype=np.float32) / 3
    return {"n": item, "square": item * item}


def counting(ctx: DistContext, calls: str, stop_after: int | None = None):
    """Leaves a marker file per input it runs; Ctrl-C once ``stop_after`` markers exist."""

    def process(items):
        for item in items:
            if stop_after is not None and len(os.listdir(calls)) == stop_after:
                raise KeyboardInterrupt
            value = _result(item)  # a negative input raises before leaving its marker
            Path(calls, f"{item}-{os.getpid()}-{time.monotonic_ns()}").touch()
            yield value

    return process


def killing(ctx: DistContext, calls: str):
    """Rank 1 kills itself with SIGKILL at its first input; rank 0 is slow."""

    def process(items):
        for item in items:
            if ctx.rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.25)
            Path(calls, f"{item}-{os.getpid()}").touch()
            yield _result(item)

    return process


def _calls(folder: Path) -> list[int]:
    return sorted(int(name.split("-")[0]) for name in os.listdir(folder))


def _items_files(folder: Path) -> dict[str, bytes]:
    items = folder / "items"
    return {name: (items / name).read_bytes() for name in sorted(os.listdir(items))}


# -- sharding ------------------------------------------------------------------------------
def test_shards_balance_cost_and_are_deterministic():
    costs = [5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 3]
    shards = balanced_shards(costs, 3)
    assert sorted(i for s in shards for i in s) == list(range(len(costs)))
    loads = [sum(costs[i] for i in s) for s in shards]
    assert max(loads) - min(loads) <= 1 and loads == [7, 7, 7]
    assert all(s == sorted(s) for s in shards)
    assert balanced_shards(list(costs), 3) == shards  # same on every rank
    assert [shard_of(costs, r, 3) for r in range(3)] == shards

    huge = [1000, 1, 1, 1, 1, 1]  # one long video: a rank of its own, the rest share
    assert balanced_shards(huge, 2) == [[0], [1, 2, 3, 4, 5]]
    assert balanced_shards([1, 1], 4) == [[0], [1], [], []]  # fewer inputs than ranks
    assert balanced_shards([], 2) == [[], []]
    # equal (or zero) costs: ties by index, and the count of inputs keeps ranks even
    assert balanced_shards([0] * 5, 2) == [[0, 2, 4], [1, 3]]
    assert balanced_shards([2, 2, 2, 2, 2], 2) == [[0, 2, 4], [1, 3]]
    for bad in ([-1], [float("nan")], [float("inf")]):
        with pytest.raises(ValueError, match="finite"):
            balanced_shards(bad, 2)
    with pytest.raises(ValueError, match="world size"):
        balanced_shards([1], 0)


def test_video_cost_reads_headers_and_counts_frame_files(tmp_path):
    video = write_video(tmp_path / "v.mp4", 37)
    assert video_cost(video) == 37
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(5):
        (frames / f"img_{i + 1:05d}.jpg").write_bytes(b"")
    (frames / "notes.txt").write_text("x")
    (frames / ".hidden.jpg").write_bytes(b"")
    assert video_cost(frames) == 5
    assert video_cost(tmp_path / "missing.mp4") == 1
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    assert video_cost(tmp_path / "junk.mp4") == 1


# -- result files, resume ------------------------------------------------------------------
ITEMS = [4, 3, -2, 0, 7, 10, 1, 6, 5]


def _check_outcomes(outcomes):
    assert [o.index for o in outcomes] == list(range(len(ITEMS)))
    for item, outcome in zip(ITEMS, outcomes, strict=True):
        if item < 0:
            assert outcome.error == f"ValueError: input {item} is negative"
        elif item == 7:
            assert outcome.error == "seven is refused" and outcome.value is None
        elif item % 2 == 0:
            assert outcome.ok and outcome.value.dtype == np.float32
            assert outcome.value.tobytes() == (np.arange(item, dtype=np.float32) / 3).tobytes()
        else:
            assert outcome.ok and outcome.value == {"n": item, "square": item * item}


def test_interrupted_run_resumes_with_only_the_rest(tmp_path):
    calls = tmp_path / "calls"
    calls.mkdir()
    folder = tmp_path / "parts"
    stopping = functools.partial(counting, calls=str(calls), stop_after=4)
    with pytest.raises(RunIncomplete, match="4 of 9 inputs not run") as info:
        run_sharded(ITEMS, stopping, folder, fingerprint="w1")
    assert info.value.missing == [5, 6, 7, 8]
    assert _calls(calls) == [0, 3, 4, 7]  # -2 raised before leaving its marker
    assert ResultFolder(folder).done() == {0, 1, 3}  # the failures (-2, 7) are retried

    for marker in calls.iterdir():
        marker.unlink()
    outcomes = run_sharded(
        ITEMS,
        functools.partial(counting, calls=str(calls)),
        folder,
        fingerprint="w1",
        costs=[abs(x) for x in ITEMS],
    )
    _check_outcomes(outcomes)
    assert _calls(calls) == sorted([7, 10, 1, 6, 5])  # -2 raises before its marker
    # done: a rerun runs nothing but the failures, and gives the same outcomes
    for marker in calls.iterdir():
        marker.unlink()
    again = run_sharded(
        ITEMS, functools.partial(counting, calls=str(calls)), folder, fingerprint="w1"
    )
    assert _calls(calls) == [7]  # Failed("...") is retried too; the ValueError leaves none
    _check_outcomes(again)

    with pytest.raises(ShardedRunError, match="other settings"):
        run_sharded(ITEMS, stopping, folder, fingerprint="w2")
    with pytest.raises(ShardedRunError, match="other inputs"):
        run_sharded([*ITEMS, 1], stopping, folder, fingerprint="w1")


def test_two_ranks_give_the_files_and_outcomes_of_one(tmp_path):
    calls = tmp_path / "calls"
    calls.mkdir()
    process = functools.partial(counting, calls=str(calls))
    one = run_sharded(ITEMS, process, tmp_path / "one", costs=[abs(x) for x in ITEMS])
    start = time.monotonic()
    two = run_sharded(ITEMS, process, tmp_path / "two", costs=[abs(x) for x in ITEMS], world_size=2)
    print(f"2 spawned ranks: {time.monotonic() - start:.1f} s")
    _check_outcomes(one)
    _check_outcomes(two)
    assert _items_files(tmp_path / "one") == _items_files(tmp_path / "two")
    # every input ran exactly once per run, the 2-rank run's on two processes
    ran = [name.split("-") for name in os.listdir(calls)]
    assert sorted(int(n) for n, *_ in ran) == sorted(2 * [x for x in ITEMS if x >= 0])
    assert len({pid for _, pid, _ in ran}) == 3


def test_a_killed_rank_stops_the_job_and_a_rerun_finishes_it(tmp_path):
    calls = tmp_path / "calls"
    calls.mkdir()
    items = list(range(40))  # rank 0 alone would take 20 × 0.25 s
    start = time.monotonic()
    with pytest.raises(DistributedError, match=r"a worker died.*SIGKILL"):
        run_sharded(
            items, functools.partial(killing, calls=str(calls)), tmp_path / "parts", world_size=2
        )
    elapsed = time.monotonic() - start
    assert elapsed < 30, elapsed  # the launcher terminated rank 0; nobody waited on rank 1
    done = ResultFolder(tmp_path / "parts").done()
    assert done == set(_calls(calls)) and len(done) < 20  # rank 0 stopped early

    for marker in calls.iterdir():
        marker.unlink()
    outcomes = run_sharded(items, functools.partial(counting, calls=str(calls)), tmp_path / "parts")
    assert _calls(calls) == sorted(set(items) - done)
    assert [o.error for o in outcomes if not o.ok] == ["seven is refused"]
    assert [o.value for o in outcomes if o.index % 2 and o.ok] == [
        {"n": i, "square": i * i} for i in items if i % 2 and i != 7
    ]


_TORCHRUN_JOB = """
import functools, json, sys
from i3d.distributed.sharded import run_sharded
from test_distributed_inference import ITEMS, counting
out = run_sharded(ITEMS, functools.partial(counting, calls=sys.argv[2]), sys.argv[1],
                  costs=[abs(x) for x in ITEMS], world_size=7)  # torchrun decides
if out is not None:
    print(json.dumps([[o.index, o.error] for o in out]))
"""


def test_torchrun_ranks_agree_on_the_plan_and_rank_0_merges(tmp_path):
    calls = tmp_path / "calls"
    calls.mkdir()
    one = tmp_path / "one"
    run_sharded(ITEMS, functools.partial(counting, calls=str(calls)), one)
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(_TORCHRUN_JOB))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launcher += ["--master-port", str(free_port()), str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    proc = subprocess.run(
        [*launcher, str(tmp_path / "two"), str(calls)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("[[")]  # rank 0 alone
    assert [i for i, _ in __import__("json").loads(line)] == list(range(len(ITEMS)))
    assert _items_files(one) == _items_files(tmp_path / "two")
    assert len(_calls(calls)) == 2 * len([x for x in ITEMS if x >= 0])
