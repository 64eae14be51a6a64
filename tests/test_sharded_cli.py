"""`i3d predict / evaluate / features --world-size 2` as a user runs them: the same outputs,
byte for byte, as one process with the ranks' thread count."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from tinymodel import save_tiny_weights
from typer.testing import CliRunner
from videogen import write_video

from i3d.cli.main import app

LABELS = ("walk", "run", "jump")
runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharded")
    weights = save_tiny_weights(root / "tiny.safetensors", LABELS)
    videos = root / "videos"
    videos.mkdir()
    for i, frames in enumerate((40, 12, 20)):  # uneven lengths: balanced by frames
        write_video(videos / f"v{i}.mp4", frames, width=48, height=32)
    (videos / "v3_broken.mp4").write_bytes(b"not a video")
    lines = [f"v{i}.mp4 {i % 3}" for i in range(3)] + ["v3_broken.mp4 0"]
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return {"root": root, "weights": weights, "videos": videos}


@pytest.fixture
def rank_threads():
    """One process computes with the thread count each of 2 spawned ranks gets."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    yield
    torch.set_num_threads(before)


def _run(args: list[str]):
    result = runner.invoke(app, args)
    assert "Traceback" not in result.output, result.output
    return result


def test_predict_json_and_evaluate_match_one_process(setup, rank_threads, tmp_path):
    weights, videos, root = str(setup["weights"]), setup["videos"], setup["root"]
    one = _run(["predict", str(videos), "--weights", weights, "--json"])
    logs = tmp_path / "logs"
    two = _run(["predict", str(videos), "--weights", weights, "--json", "--world-size", "2",
                "--log-dir", str(logs)])  # fmt: skip
    assert one.exit_code == two.exit_code == 1  # the broken video fails, in both
    # one log per rank: its device and share, then each of its videos once, with its outcome
    ranks = [(logs / f"rank-{r}.log").read_text() for r in (0, 1)]
    assert all("of 2 on cpu" in text and "through its share" in text for text in ranks)
    logged = sorted(
        (Path(m[1]).name, m[2].split(":")[0])
        for text in ranks
        for m in re.finditer(r"input \d+ \((\S+\.mp4)\) (done|failed: .*) in [\d.]+ s$", text, re.M)
    )
    assert logged == [("v0.mp4", "done"), ("v1.mp4", "done"), ("v2.mp4", "done"),
                      ("v3_broken.mp4", "failed")]  # fmt: skip
    refused = _run(["predict", str(videos), "--weights", weights, "--log-dir", str(logs)])
    assert refused.exit_code == 1 and "--log-dir keeps one log per rank" in refused.output
    lines = [line for line in two.stdout.splitlines() if line.startswith("{")]
    assert lines == [line for line in one.stdout.splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    names = [Path(r["path"]).name for r in records]
    assert names == ["v0.mp4", "v1.mp4", "v2.mp4", "v3_broken.mp4"]
    assert "error" in records[3] and "top" in records[0]
    reports = {}
    for n in (1, 2):
        out = tmp_path / f"eval{n}"
        args = ["evaluate", str(root / "list.txt"), "--data-root", str(videos), "--weights",
                weights, "-o", str(out), "--world-size", str(n)]  # fmt: skip
        result = _run(args)
        assert result.exit_code == 0, result.output
        reports[n] = [(out / name).read_bytes() for name in ("predictions.jsonl", "metrics.json")]
        assert not Path(f"{out}.parts").exists()  # merged, then removed
    assert reports[1] == reports[2]
    assert json.loads(reports[2][1])["skipped"] == 1


def test_features_are_byte_identical_with_fewer_videos_than_ranks(setup, rank_threads, tmp_path):
    weights, videos = str(setup["weights"]), setup["videos"]
    files = {}
    for n in (1, 2):
        out = tmp_path / f"f{n}.safetensors"
        args = ["features", str(videos / "v1.mp4"), "--weights", weights, "--endpoint",
                "layer4", "-o", str(out), "--world-size", str(n)]  # fmt: skip
        result = _run(args)
        assert result.exit_code == 0, result.output
        files[n] = out.read_bytes()
    assert files[1] == files[2]


def test_a_parts_folder_of_other_settings_is_refused(setup, tmp_path):
    """The per-video results of an interrupted run resume only the same job."""
    from i3d.distributed.sharded import ResultFolder

    out = tmp_path / "scores.csv"
    ResultFolder(f"{out}.parts").claim(["x.mp4"], "another run")
    args = ["predict", str(setup["videos"] / "v1.mp4"), "--weights", str(setup["weights"]),
            "--csv", str(out), "--world-size", "2"]  # fmt: skip
    result = _run(args)
    assert result.exit_code == 1 and "partial results of a run with other" in result.output


def test_each_rank_gets_its_own_device():
    """cuda/npu ranks take device <local rank>; om ranks open npu:<local rank> via ais_bench
    without torch_npu, so the launcher starts them as cpu ranks."""
    from i3d.distributed import DistContext
    from i3d.distributed.devices import group_device, rank_device

    assert group_device("torch", None) == "cpu" and group_device("torch", "cuda:0") == "cuda"
    assert group_device("npu", "npu:0") == "npu" and group_device("om", "npu:0") == "cpu"
    rank3 = DistContext(rank=3, world_size=8, local_rank=3)
    assert rank_device("om", "npu:0", rank3) == "npu:3"
    cuda3 = DistContext(rank=3, world_size=8, local_rank=3, device=torch.device("cuda", 3))
    assert rank_device("torch", "cuda", cuda3) == "cuda:3"
    assert rank_device("torch", "cpu", rank3) == "cpu"
    with pytest.raises(ValueError, match="one process per cpu, cuda or npu device"):
        group_device("torch", "mps")


def _ranks_of(launcher: int) -> list[int]:
    """The spawned rank processes of a launcher (not its resource tracker)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    ranks = []
    for pid in map(int, children):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                ranks.append(pid)
        except OSError:
            pass
    return ranks


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_kill_9_of_one_rank_stops_the_job_and_a_rerun_completes_it(setup, tmp_path):
    """The job exits non-zero within a bound, keeps what was done and says so; the rerun
    (which skips the kept videos, see test_distributed_inference) writes every row."""
    import signal
    import subprocess
    import sys
    import time

    videos = tmp_path / "many"
    videos.mkdir()
    for i in range(12):
        write_video(videos / f"m{i:02d}.mp4", 24, width=48, height=32)
    out = tmp_path / "scores.csv"
    items = Path(f"{out}.parts") / "items"
    args = [sys.executable, "-m", "i3d", "predict", str(videos), "--weights",
            str(setup["weights"]), "--csv", str(out), "--world-size", "2"]  # fmt: skip
    job = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (items.is_dir() and any(items.iterdir())):  # the first video is done
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()
        time.sleep(0.02)
    os.kill(_ranks_of(job.pid)[0], signal.SIGKILL)
    killed = time.monotonic()
    _, err = job.communicate(timeout=60)
    assert job.returncode == 1 and time.monotonic() - killed < 30
    assert "SIGKILL" in err and "kept in" in err, err
    finished = len(list(items.iterdir()))
    assert 1 <= finished < 12 and not out.exists()
    rerun = _run(args[3:])  # the same command, in this process: no second interpreter start
    assert rerun.exit_code == 0, rerun.output
    rows = out.read_text().splitlines()[1:]
    assert sorted({row.split(",")[0] for row in rows}) == sorted(str(p) for p in videos.iterdir())
    assert not items.parent.exists()  # merged, then removed
