"""A small learnable video task that no single frame can solve, written as real video files.

Each video shows one shape over a noisy static background; the class is *how it changes in
time*: moving up or down, growing or shrinking, brightening or darkening. Every frame of a
video of one class could equally come from its partner class (start positions, sizes and
brightness are drawn so the per-frame statistics of the two are identical), so a per-frame
(2D) model stays at chance while a model that sees time (I3D) can learn it. All classes are
unchanged by a horizontal flip, so the standard train augmentation keeps every label valid.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import attrs
import av
import numpy as np

from i3d.utils.files import OutputError, atomic_path, ensure_dir

#: files a toy dataset holds besides ``videos/``
LIST_FILES = ("train.txt", "val.txt", "labels.txt")
#: a file an interrupted atomic write left behind
_TEMP_FILE = re.compile(r"\..+\.tmp")
_TOY_VIDEO = re.compile(r"c\d+_\d{4}\.mp4")

TOY_CLASSES: tuple[str, ...] = (
    "moving up",
    "moving down",
    "growing",
    "shrinking",
    "brightening",
    "darkening",
)


@attrs.frozen
class ToySpec:
    """Size of a generated toy dataset."""

    classes: int = 4
    videos_per_class: int = 40
    val_per_class: int = 10
    frames: int = 16
    size: int = 64
    fps: int = 25
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        if not 2 <= self.classes <= len(TOY_CLASSES):
            raise ValueError(f"--classes must be 2..{len(TOY_CLASSES)}, got {self.classes}")
        if self.videos_per_class < 1 or self.val_per_class < 1:
            raise ValueError("--videos-per-class and --val-per-class must be at least 1")
        if self.frames < 4:
            raise ValueError(f"--frames must be at least 4, got {self.frames}")
        if self.size < 32 or self.size % 2:
            raise ValueError(f"--size must be an even number >= 32, got {self.size}")


def render_video(label: int, spec: ToySpec, rng: np.random.Generator) -> np.ndarray:
    """Frames (T, H, W, 3) uint8 of one video of class ``label``."""
    t_count, size = spec.frames, spec.size
    background = rng.integers(0, 256, size=(size // 4, size // 4, 3), dtype=np.uint8)
    background = np.kron(background, np.ones((4, 4, 1), dtype=np.uint8)).astype(np.float32) * 0.6
    colour = rng.uniform(150, 255, size=3).astype(np.float32)
    square = bool(rng.integers(0, 2))
    progress = np.linspace(0.0, 1.0, t_count, dtype=np.float32)
    reverse = label % 2 == 1  # the odd class of each pair is the even one played backwards
    if reverse:
        progress = progress[::-1]
    kind = label // 2
    radius = np.full(t_count, size * rng.uniform(0.1, 0.16), dtype=np.float32)
    gain = np.ones(t_count, dtype=np.float32)
    cx = np.full(t_count, rng.uniform(0.3, 0.7) * size, dtype=np.float32)
    cy = np.full(t_count, 0.0, dtype=np.float32)
    if kind == 0:  # vertical motion over a random span that lies inside the frame
        span = rng.uniform(0.3, 0.45) * size
        top = rng.uniform(radius[0] + 1, size - radius[0] - 1 - span)
        cy = top + span * (1.0 - progress)
    else:
        cy[:] = rng.uniform(0.3, 0.7) * size
    if kind == 1:
        radius = size * (0.06 + 0.16 * progress)
    if kind == 2:
        gain = 0.25 + 0.75 * progress
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    frames = np.empty((t_count, size, size, 3), dtype=np.uint8)
    for t in range(t_count):
        dy, dx = yy - cy[t], xx - cx[t]
        if square:
            mask = (np.abs(dy) <= radius[t]) & (np.abs(dx) <= radius[t])
        else:
            mask = dy * dy + dx * dx <= radius[t] ** 2
        frame = background + rng.normal(0.0, 12.0, size=background.shape).astype(np.float32)
        frame[mask] = colour * gain[t]
        frames[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames


def write_video(path: str | os.PathLike[str], frames: np.ndarray, fps: int = 25) -> None:
    """Encode RGB frames (T, H, W, 3) uint8 as an MPEG-4 Part 2 .mp4 file, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def make_toy_dataset(out: str | os.PathLike[str], spec: ToySpec) -> dict[str, Path]:
    """Write videos/, train.txt, val.txt (mmaction ``path label`` lists) and labels.txt.

    ``out`` must be new, empty or an earlier toy dataset; an earlier one is replaced: its
    lists go first (so an interrupted rewrite is not mistaken for a complete set), then every
    old video the new lists do not name is removed. Any other content is refused untouched.
    """
    out = Path(out)
    _check_replaceable(out)
    videos = ensure_dir(out / "videos")
    for name in LIST_FILES:
        (out / name).unlink(missing_ok=True)
    for leftover in out.glob(".*.tmp"):
        leftover.unlink()
    lists: dict[str, list[str]] = {"train": [], "val": []}
    for label in range(spec.classes):
        for index in range(spec.videos_per_class + spec.val_per_class):
            split = "train" if index < spec.videos_per_class else "val"
            rng = np.random.default_rng([spec.seed, label, index])
            name = f"videos/c{label}_{index:04d}.mp4"
            write_video(out / name, render_video(label, spec, rng), spec.fps)
            lists[split].append(f"{name} {label}")
    named = {line.split()[0] for lines in lists.values() for line in lines}
    for stale in videos.iterdir():
        if f"videos/{stale.name}" not in named:
            stale.unlink()
    order = np.random.default_rng([spec.seed, 1 << 20]).permutation(len(lists["train"]))
    lists["train"] = [lists["train"][i] for i in order]
    paths = {"labels": out / "labels.txt"}
    for split, lines in lists.items():
        paths[split] = out / f"{split}.txt"
        _write_text(paths[split], "\n".join(lines) + "\n")
    _write_text(paths["labels"], "\n".join(TOY_CLASSES[: spec.classes]) + "\n")
    return paths


def _check_replaceable(out: Path) -> None:
    """Raise :class:`OutputError` unless ``out`` is absent, empty or only toy-dataset files."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is a file; give a folder path for the toy dataset")
    if not out.is_dir():
        return
    foreign = [
        p
        for p in out.iterdir()
        if not (p.name == "videos" and p.is_dir())
        and not (p.is_file() and (p.name in LIST_FILES or _TEMP_FILE.fullmatch(p.name)))
    ]
    if (out / "videos").is_dir():
        foreign += [
            p
            for p in (out / "videos").iterdir()
            if not (p.is_file() and (_TOY_VIDEO.fullmatch(p.name) or _TEMP_FILE.fullmatch(p.name)))
        ]
    labels = out / "labels.txt"
    if labels.is_file():
        names = tuple(labels.read_text(encoding="utf-8", errors="replace").splitlines())
        if names != TOY_CLASSES[: len(names)]:
            foreign.append(labels)
    if foreign:
        shown = ", ".join(str(p.relative_to(out)) for p in foreign[:3])
        raise OutputError(
            f"{out} is not empty and is not a toy dataset (it holds {shown}); "
            "choose a new or empty folder"
        )


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
