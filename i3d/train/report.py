"""What a run leaves behind for people: JSON-lines metrics, a training-curve PNG, TensorBoard."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from i3d.utils.files import atomic_path, no_room_as_output_error


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line with ``kind`` (train|val), epoch, step, values.

    The history is also kept in memory for the curve plot; a disabled log (ranks > 0) writes
    nothing.
    """

    def __init__(self, path: str | os.PathLike[str], enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.tensorboard: Any = None
        self.records: list[dict[str, Any]] = []

    def truncate(self, step: int) -> None:
        """Keep only records up to ``step`` (a resumed run rewrites what followed)."""
        if not self.enabled:
            return
        if self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            self.records = [r for r in map(_parse, lines) if r is not None and r["step"] <= step]
        else:
            self.records = []
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records), encoding="utf-8")

    def write(self, kind: str, epoch: int, step: int, **values: float) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "epoch": epoch + 1, "step": step, **values}
        self.records.append(record)
        size = self.path.stat().st_size if self.path.is_file() else 0
        try:
            with (
                no_room_as_output_error(self.path, probe=self.path),
                self.path.open("a", encoding="utf-8") as fh,
            ):
                fh.write(json.dumps(record) + "\n")
        except BaseException:
            with contextlib.suppress(OSError):  # no half line (nor the probe) stays behind
                os.truncate(self.path, size)
            raise
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(f"{kind}/{name}", value, step)

    def last(self, kind: str) -> dict[str, Any] | None:
        return next((r for r in reversed(self.records) if r["kind"] == kind), None)

    def series(self, kind: str, key: str) -> tuple[list[int], list[float]]:
        rows = [r for r in self.records if r["kind"] == kind and key in r]
        return [r["step"] for r in rows], [r[key] for r in rows]


def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None  # a line cut by a kill
    return record if isinstance(record, dict) and "step" in record else None


def plot_curves(log: MetricsLog, path: str | os.PathLike[str]) -> Path | None:
    """Loss, learning rate and val top-1/top-5 against the step, as a PNG (needs matplotlib)."""
    if not log.enabled or not log.records:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps, loss = log.series("train", "loss")
    axes[0].plot(steps, loss, label="train")
    axes[0].plot(*log.series("val", "loss"), "o-", label="val")
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    axes[1].plot(*log.series("train", "lr"))
    axes[1].set(title="learning rate", xlabel="step", yscale="log")
    axes[2].plot(*log.series("val", "top1"), "o-", label="top-1")
    axes[2].plot(*log.series("val", "top5"), "s--", label="top-5")
    axes[2].set(title="val accuracy", xlabel="step", ylim=(0, 1))
    axes[2].legend()
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return path
