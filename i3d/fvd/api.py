"""``i3d.fvd(real, fake)``: FVD of two video sets under a named protocol, with its record.

Each set is uint8 videos (N, T, H, W, 3) as an array or tensor (or a list of (T, H, W, 3)
clips), a path (a .npy / .npz array, a folder of videos or frame folders), or statistics
saved by :func:`save_stats` (``i3d fvd-stats``). The record names the protocol, the weights'
SHA-256, the clip length, the seed and the library versions, so a number can be redone.
"""

from __future__ import annotations

import json
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from i3d.fvd.extract import Detector, ExtractSpec, accumulate, iter_activations, sharded_activations
from i3d.fvd.frechet import frechet_distance
from i3d.fvd.inputs import FVDInputError, VideoSet, open_videos
from i3d.fvd.protocols import Protocol, Role, get_protocol
from i3d.fvd.stats import ActivationStats
from i3d.utils.untrusted import load_json

STATS_KEY = "i3d.fvd"
STATS_FORMAT = 1
STATS_SUFFIX = ".safetensors"


class FVDWarning(UserWarning):
    """The FVD is computable but not reliable (e.g. fewer videos than dimensions)."""


class StatsMismatchError(ValueError):
    """Statistics made with another protocol or other weights than the ones in use."""


@attrs.frozen
class SetSummary:
    """What one video set contributed: videos used, frames read, videos discarded."""

    videos: int
    frames: int
    discarded: int
    source: str

    def record(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class FVDStats:
    """One set's float64 activation statistics and how they were made (protocol, weights)."""

    stats: ActivationStats = attrs.field(eq=False, repr=False)
    protocol: Protocol
    weights_sha256: str
    weights_name: str
    seed: int
    role: Role
    summary: SetSummary

    def record(self) -> dict[str, Any]:
        """The provenance that travels with the statistics (JSON)."""
        return {
            "format": STATS_FORMAT,
            "protocol": self.protocol.record(),
            "weights": {"file": self.weights_name, "sha256": self.weights_sha256},
            "seed": self.seed,
            "role": self.role,
            **self.summary.record(),
            "dim": self.stats.dim,
            "versions": library_versions(),
        }


@attrs.frozen
class FVDResult:
    """The FVD, what each set contributed, and the JSON record that says how it was made."""

    fvd: float
    real: SetSummary
    fake: SetSummary
    record: dict[str, Any] = attrs.field(eq=False, repr=False)

    def __float__(self) -> float:
        return self.fvd


def library_versions() -> dict[str, str]:
    """Versions that can change the number: i3d, torch, numpy, Python."""
    import torch

    from i3d import __version__

    return {
        "i3d": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _resolve_weights(weights: str | os.PathLike[str] | None) -> Path:
    if weights is not None:
        return Path(weights)
    from i3d.inference.inputs import default_weights

    return default_weights()


def _frames_used(videos: VideoSet, protocol: Protocol, index: int) -> int:
    return protocol.frames if protocol.frames is not None else videos.num_frames(index)


def compute_stats(
    videos: Any,
    *,
    role: Role = "real",
    protocol: str | Protocol = "tf",
    frames: int | None = None,
    weights: str | os.PathLike[str] | None = None,
    seed: int = 0,
    device: str | None = None,
    batch_size: int = 1,
    world_size: int = 1,
    detector: Detector | None = None,
) -> FVDStats:
    """Float64 statistics of one set's FVD activations (what ``i3d fvd-stats`` saves).

    ``world_size`` > 1 spreads the videos over that many spawned processes; the statistics
    are accumulated in input order, so they equal one process's at equal thread counts.
    """
    if isinstance(videos, FVDStats) or _is_stats_path(videos):
        raise FVDInputError("compute_stats takes videos; this input is already statistics")
    proto = get_protocol(protocol, frames)
    video_set = open_videos(videos)
    path = detector.weights if detector is not None else _resolve_weights(weights)
    from i3d.utils.files import sha256_file

    digest = sha256_file(path)
    if world_size > 1:
        spec = ExtractSpec(str(path), proto, role, seed, batch_size, device)
        results = sharded_activations(video_set, spec, world_size)
        if results is None:
            raise RuntimeError("sharded FVD statistics reach rank 0 only")
    else:
        detector = detector or Detector(path, device, batch_size, proto.batchnorm_eps)
        results = iter_activations(video_set, range(len(video_set)), proto, role, seed, detector)
    acc = accumulate(results, lambda i: _frames_used(video_set, proto, i))
    if acc.stats is None:
        raise FVDInputError(
            f"{video_set.description}: all {acc.discarded} videos are shorter than protocol "
            f"{proto.name}'s {proto.frames}-frame clips, so none is left"
        )
    summary = SetSummary(acc.videos, acc.frames, acc.discarded, video_set.description)
    return FVDStats(acc.stats, proto, digest, path.name, seed, role, summary)


def check_compatible(stats: FVDStats, protocol: Protocol, weights_sha256: str | None) -> None:
    """Refuse statistics made with another protocol (clip length included) or other weights."""
    if stats.protocol != protocol:
        theirs, ours = stats.protocol.record(), protocol.record()
        differ = ", ".join(
            f"{k} {theirs[k]!r} vs {ours[k]!r}" for k in ours if theirs[k] != ours[k]
        )
        raise StatsMismatchError(
            f"{stats.summary.source} was made with protocol {stats.protocol.name}, not "
            f"{protocol.name} as asked ({differ}); FVDs of different protocols do not compare"
        )
    if weights_sha256 is not None and stats.weights_sha256 != weights_sha256:
        raise StatsMismatchError(
            f"{stats.summary.source} was made with weights {stats.weights_name} (SHA-256 "
            f"{stats.weights_sha256[:12]}…), not the ones in use ({weights_sha256[:12]}…)"
        )


def _roles_matter(protocol: Protocol) -> bool:
    return protocol.real_start != protocol.fake_start or protocol.short_real != "error"


def fvd_from_stats(real: FVDStats, fake: FVDStats) -> FVDResult:
    """FVD of two sets' statistics (same protocol and weights), with its record."""
    check_compatible(fake, real.protocol, real.weights_sha256)
    proto = real.protocol
    for stats, role in ((real, "real"), (fake, "fake")):
        if stats.role != role and _roles_matter(proto):
            raise StatsMismatchError(
                f"{stats.summary.source} holds {stats.role} statistics; protocol {proto.name} "
                f"samples {role} videos differently, so it cannot be the {role} set"
            )
    if real.stats.dim != fake.stats.dim:
        raise StatsMismatchError(f"{real.stats.dim}-d and {fake.stats.dim}-d statistics")
    dim = real.stats.dim
    if min(real.stats.count, fake.stats.count) <= dim:
        warnings.warn(
            f"FVD from {real.stats.count} real and {fake.stats.count} fake videos of "
            f"{dim}-d activations: with {dim} or fewer videos a covariance is singular, so the "
            "value mostly reflects the sample size; compare only FVDs of equal set sizes",
            FVDWarning,
            stacklevel=2,
        )
    ddof = proto.covariance_ddof
    value = frechet_distance(
        real.stats.mean,
        real.stats.covariance(ddof),
        fake.stats.mean,
        fake.stats.covariance(ddof),
        proto.root_floor,
    )
    record = {
        "fvd": value,
        "protocol": proto.record(),
        "weights": {"file": real.weights_name, "sha256": real.weights_sha256},
        "frames_per_clip": proto.frames if proto.frames is not None else "whole video",
        "seed": {"real": real.seed, "fake": fake.seed},
        "real": real.summary.record(),
        "fake": fake.summary.record(),
        "activation_dim": dim,
        "versions": library_versions(),
    }
    return FVDResult(value, real.summary, fake.summary, record)


def _is_stats_path(source: Any) -> bool:
    return isinstance(source, str | os.PathLike) and str(source).endswith(STATS_SUFFIX)


def fvd(
    real: Any,
    fake: Any,
    *,
    protocol: str | Protocol = "tf",
    frames: int | None = None,
    weights: str | os.PathLike[str] | None = None,
    seed: int = 0,
    device: str | None = None,
    batch_size: int = 1,
    world_size: int = 1,
) -> FVDResult:
    """Fréchet Video Distance between ``real`` and ``fake`` under ``protocol``.

    Each side is uint8 videos (N, T, H, W, 3) (array, tensor, list of clips), a path to a
    .npy/.npz array or a folder of videos / frame folders, or statistics (an
    :class:`FVDStats` or a ``.safetensors`` saved by :func:`save_stats`). ``frames``
    replaces the protocol's clip length; ``seed`` fixes clip sampling where the protocol
    samples (stylegan-v's real clips). Default weights: the pulled i3d_inception_k400_rgb.
    """
    proto = get_protocol(protocol, frames)
    # check every input (array shapes, file headers) before loading the detector
    given = [
        load_stats(s) if _is_stats_path(s) else s if isinstance(s, FVDStats) else open_videos(s)
        for s in (real, fake)
    ]
    need_model = any(isinstance(s, VideoSet) for s in given)
    detector = None
    digest: str | None = None
    if need_model or weights is not None:
        from i3d.utils.files import sha256_file

        path = _resolve_weights(weights)
        digest = sha256_file(path)
        for source in given:
            if isinstance(source, FVDStats):
                check_compatible(source, proto, digest)
        if need_model and world_size == 1:
            detector = Detector(path, device, batch_size, proto.batchnorm_eps)
    done: list[FVDStats] = []
    for source, role in zip(given, ("real", "fake"), strict=True):
        if isinstance(source, FVDStats):
            check_compatible(source, proto, digest)
            done.append(source)
        else:
            done.append(
                compute_stats(
                    source, role=role, protocol=proto, weights=weights, seed=seed,
                    device=device, batch_size=batch_size, world_size=world_size,
                    detector=detector,
                )
            )  # fmt: skip
    return fvd_from_stats(done[0], done[1])


def save_stats(path: str | os.PathLike[str], stats: FVDStats) -> Path:
    """Write statistics and their record to a ``.safetensors`` file, atomically."""
    from safetensors.numpy import save_file

    from i3d.utils.files import atomic_path

    path = Path(path)
    tensors = {"mean": stats.stats.mean, "m2": stats.stats.m2}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={STATS_KEY: json.dumps(stats.record())})
    return path


def load_stats(path: str | os.PathLike[str]) -> FVDStats:
    """Statistics saved by :func:`save_stats`; shapes, dtypes and the record are checked
    from the header before any tensor is read."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    bad = f"{path} is not an FVD statistics file"
    try:
        with safe_open(str(path), framework="numpy") as fh:
            meta = fh.metadata() or {}
            if STATS_KEY not in meta:
                raise FVDInputError(f"{bad} (no {STATS_KEY} record; make one with i3d fvd-stats)")
            record = load_json(meta[STATS_KEY], STATS_KEY)
            dim = int(record["dim"])
            want = {"mean": (dim,), "m2": (dim, dim)}
            if set(fh.keys()) != set(want):
                raise FVDInputError(f"{bad} (tensors {sorted(fh.keys())}, expected mean and m2)")
            for name, shape in want.items():
                piece = fh.get_slice(name)
                if piece.get_dtype() != "F64" or tuple(piece.get_shape()) != shape:
                    raise FVDInputError(
                        f"{bad} ({name} is {piece.get_dtype()} {piece.get_shape()}, expected "
                        f"F64 {list(shape)})"
                    )
            mean, m2 = fh.get_tensor("mean"), fh.get_tensor("m2")
        if record.get("format") != STATS_FORMAT:
            raise FVDInputError(f"{bad} (format {record.get('format')!r}, expected {STATS_FORMAT})")
        protocol = Protocol(**record["protocol"])
        summary = SetSummary(
            int(record["videos"]), int(record["frames"]), int(record["discarded"]), str(path)
        )
        stats = ActivationStats.from_parts(summary.videos, mean, m2)
        weights = record["weights"]
        role = record["role"]
        if role not in ("real", "fake"):
            raise ValueError(f"role {role!r}")
        return FVDStats(
            stats, protocol, str(weights["sha256"]), str(weights["file"]), int(record["seed"]),
            role, summary,
        )  # fmt: skip
    except (SafetensorError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise FVDInputError(f"{bad} ({exc})") from None
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, FVDInputError):
            raise
        raise FVDInputError(f"{bad} (damaged record: {type(exc).__name__}: {exc})") from None
