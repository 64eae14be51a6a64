"""FVD activations: each video's protocol clip through the I3D detector, on one process or N.

:func:`iter_activations` yields, per video in order, its detector output (float32 (D,)) or a
:class:`Discarded` marker (a real video the protocol drops). :func:`accumulate` folds them into
float64 statistics one video at a time in input order, so the statistics do not depend on
how many ranks made the activations (:func:`sharded_activations`, which runs
:func:`~i3d.distributed.sharded.run_sharded` and hands rank 0 the per-video results back in
input order).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from i3d.backends.float32 import float32_mode
from i3d.fvd.inputs import VideoSet
from i3d.fvd.protocols import Protocol, Role
from i3d.fvd.resize import RESIZES
from i3d.fvd.stats import ActivationStats


class DetectorError(ValueError):
    """The weights cannot serve as an FVD detector (not an RGB video classifier)."""


@attrs.frozen
class Discarded:
    """A real video the protocol leaves out (shorter than its clip), with its length."""

    num_frames: int


class Detector:
    """The I3D classifier whose time-averaged logits are the FVD activations.

    ``batchnorm_eps`` replaces every BatchNorm's epsilon (a protocol's
    :attr:`~i3d.fvd.protocols.Protocol.batchnorm_eps`); None keeps the weights' own.
    """

    def __init__(
        self,
        weights: str | os.PathLike[str],
        device: str | None = None,
        batch_size: int = 1,
        batchnorm_eps: float | None = None,
    ) -> None:
        from i3d.weights.format import load_model

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.weights = Path(weights)
        self.model = load_model(self.weights, device or "cpu")
        if getattr(self.model, "in_channels", None) != 3:
            raise DetectorError(
                f"{self.weights} is not an RGB video classifier (FVD needs RGB Inception I3D "
                "logits; a flow or two-stream model cannot read frames)"
            )
        if batchnorm_eps is not None:
            from i3d.models.layers import set_batchnorm_eps

            set_batchnorm_eps(self.model, batchnorm_eps)
        self.batchnorm_eps = batchnorm_eps
        self.device = next(self.model.parameters()).device
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, clips: torch.Tensor) -> np.ndarray:
        """Logits (B, D) float32 of clips (B, 3, T, S, S) in [-1, 1]."""
        with float32_mode(self.device):  # IEEE float32: no TF32 / HF32 / bf16 matmuls
            logits = self.model(clips.to(self.device))
        return logits.float().cpu().numpy()


def iter_activations(
    videos: VideoSet,
    indices: Iterable[int],
    protocol: Protocol,
    role: Role,
    seed: int,
    detector: Detector,
) -> Iterator[np.ndarray | Discarded]:
    """Per video of ``indices``, in order: its activation (D,) or :class:`Discarded`.

    Up to ``detector.batch_size`` consecutive clips of one shape share a forward pass.
    Raises :class:`~i3d.fvd.protocols.ClipError` for a video the protocol cannot take.
    """
    if detector.batchnorm_eps != protocol.batchnorm_eps:
        raise ValueError(
            f"protocol {protocol.name} runs the detector with BatchNorm eps "
            f"{protocol.batchnorm_eps or 'of the weights'}, this detector with "
            f"{detector.batchnorm_eps or 'that of the weights'}: build it with "
            f"Detector(..., batchnorm_eps={protocol.batchnorm_eps!r})"
        )
    resize = RESIZES[protocol.resize]
    pending: list[np.ndarray | Discarded | torch.Tensor] = []

    def flush() -> Iterator[np.ndarray | Discarded]:
        clips = [p for p in pending if isinstance(p, torch.Tensor)]
        outputs = iter(detector(torch.stack(clips))) if clips else iter(())
        for item in pending:
            yield next(outputs).copy() if isinstance(item, torch.Tensor) else item
        pending.clear()

    for index in indices:
        count = videos.num_frames(index)
        clip_at = protocol.clip_indices(count, role, seed, index, videos.name(index))
        if clip_at is None:
            pending.append(Discarded(count))
            continue
        clip = resize(torch.from_numpy(videos.frames(index, clip_at)), protocol.size)
        first = next((p for p in pending if isinstance(p, torch.Tensor)), None)
        if first is not None and first.shape != clip.shape:
            yield from flush()
        pending.append(clip)
        if sum(isinstance(p, torch.Tensor) for p in pending) >= detector.batch_size:
            yield from flush()
    yield from flush()


@attrs.define
class Accumulated:
    """Float64 statistics of one video set and what went in (videos, frames, discarded)."""

    stats: ActivationStats | None = None
    videos: int = 0
    frames: int = 0
    discarded: int = 0


def accumulate(
    results: Iterable[np.ndarray | Discarded], frames_of: Callable[[int], int]
) -> Accumulated:
    """Fold per-video results (in input order) into float64 statistics, one at a time."""
    out = Accumulated()
    for position, result in enumerate(results):
        if isinstance(result, Discarded):
            out.discarded += 1
            continue
        vector = np.asarray(result)
        if out.stats is None:
            out.stats = ActivationStats(vector.size)
        out.stats.add(vector.reshape(1, -1))
        out.videos += 1
        out.frames += frames_of(position)
    return out


@attrs.frozen
class ExtractSpec:
    """What every rank needs to compute one set's activations (pickled to spawned ranks)."""

    weights: str
    protocol: Protocol
    role: Role
    seed: int
    batch_size: int = 1
    device: str | None = None


def _rank_processor(ctx: Any, spec: ExtractSpec, videos: VideoSet) -> Callable[..., Any]:
    """One rank's extractor: the detector on the rank's device, activations per video."""
    device = spec.device if ctx.device.type == "cpu" else str(ctx.device)
    detector = Detector(spec.weights, device, spec.batch_size, spec.protocol.batchnorm_eps)

    def run(indices: Sequence[int]) -> Iterator[Any]:
        for result in iter_activations(
            videos, indices, spec.protocol, spec.role, spec.seed, detector
        ):
            yield {"discarded": result.num_frames} if isinstance(result, Discarded) else result

    return run


def sharded_activations(
    videos: VideoSet, spec: ExtractSpec, world_size: int
) -> list[np.ndarray | Discarded] | None:
    """Every video's result in input order, computed on ``world_size`` spawned ranks (or this
    torchrun job's); None on torchrun ranks other than 0. The first failure is raised."""
    from i3d.distributed.devices import group_device
    from i3d.distributed.sharded import run_sharded
    from i3d.utils.files import sha256_file

    settings = json.dumps(
        [sha256_file(spec.weights), attrs.asdict(spec, recurse=True)], sort_keys=True, default=str
    )
    fingerprint = hashlib.sha256(settings.encode()).hexdigest()
    # one folder every rank of a job finds (torchrun ranks start apart), named by what decides
    # the activations: an interrupted run's finished videos are reused by the rerun
    keys = [f"{videos.description}#{i}" for i in range(len(videos))]
    named = hashlib.sha256(json.dumps([fingerprint, keys]).encode()).hexdigest()[:24]
    folder = Path(tempfile.gettempdir()) / f"i3d-fvd-parts-{named}"
    outcomes = run_sharded(
        list(range(len(videos))),
        functools.partial(_rank_processor, spec=spec, videos=videos),
        folder,
        keys=keys,
        fingerprint=fingerprint,
        world_size=world_size,
        backend=group_device("torch", spec.device),
    )
    if outcomes is None:  # a torchrun rank other than 0: rank 0 still reads the folder
        return None
    shutil.rmtree(folder, ignore_errors=True)
    results: list[np.ndarray | Discarded] = []
    for outcome in outcomes:
        if not outcome.ok:
            raise ExtractError(f"{videos.name(outcome.index)}: {outcome.error}")
        value = outcome.value
        results.append(Discarded(int(value["discarded"])) if isinstance(value, dict) else value)
    return results


class ExtractError(ValueError):
    """A video failed on one of the ranks (its reason is in the message)."""
