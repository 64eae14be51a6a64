"""``i3d predict``, ``evaluate`` and ``features`` on N ranks (spawned, or a torchrun job).

Each rank rebuilds the same :class:`~i3d.inference.Predictor` (or feature model) on its own
device and runs its share of the videos (:func:`i3d.distributed.sharded.run_sharded`,
balanced by frame count); every video's scores or features land in a file of their own as
soon as they exist, so an interrupted job resumes where it stopped, and rank 0 gets them
back in input order, exactly what one process computes with the same thread count.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from i3d.distributed.devices import group_device, rank_device
from i3d.distributed.shard import video_cost
from i3d.distributed.sharded import Failed, Noted, Outcome, run_sharded
from i3d.features.pooled import feature_device, iter_features
from i3d.flow.recipe import FlowConfig
from i3d.inference.predictor import Predictor
from i3d.utils.files import sha256_file


@attrs.frozen
class PredictSpec:
    """What every rank needs to rebuild the predictor (pickled to spawned ranks)."""

    weights: str
    clips: int | None = None
    crops: int | None = None
    clip_len: int | None = None
    batch_size: int = 1
    backend: str = "torch"
    device: str | None = None
    workers: int | None = None
    flow_impl: str = "torch"
    flow_dir: str | None = None
    precision: str = "fp32"
    options: tuple[tuple[str, str], ...] = ()  # backend options (``-O key=value``)
    raft_weights: str | None = None

    def backend_options(self) -> dict[str, Any]:
        """What the backend's runner is given: the ``-O`` options and the precision."""
        return {**dict(self.options), "precision": self.precision}

    def flow_config(self, device: str | None) -> FlowConfig:
        """The flow the flow stream runs (on ``device``), for flow and two-stream weights."""
        return flow_config(self.flow_impl, device, self.raft_weights)


def flow_config(impl: str, device: str | None, raft_weights: str | None = None) -> FlowConfig:
    """The flow a job's flow stream runs: ``impl`` (torch TV-L1 or RAFT from ``raft_weights``
    on ``device``, or the opencv TV-L1)."""
    return FlowConfig(impl=impl, device=device or "cpu", raft_weights=raft_weights)


@attrs.frozen
class FeatureSpec:
    """What every rank needs to extract features like ``i3d features`` does."""

    weights: str
    endpoint: str
    pool: str
    mode: str
    overrides: tuple[tuple[str, Any], ...]
    batch_size: int = 1
    backend: str = "torch"
    device: str | None = None
    workers: int | None = None
    flow_impl: str = "torch"
    flow_dir: str | None = None
    raft_weights: str | None = None

    def flow_config(self, device: str | None) -> FlowConfig:
        """The flow the flow stream runs (on ``device``), for flow and two-stream weights."""
        return flow_config(self.flow_impl, device, self.raft_weights)


def _score_processor(ctx: Any, spec: PredictSpec) -> Callable[[Sequence[Path]], Iterator[Any]]:
    """One rank's scorer: the Predictor on its device, scores (K,) or the video's error."""
    device = rank_device(spec.backend, spec.device, ctx)
    predictor = Predictor(
        spec.weights, spec.clips, spec.crops, spec.batch_size, spec.backend, device,
        spec.clip_len, spec.backend_options(), flow=spec.flow_config(device),
        flow_dir=spec.flow_dir,
    )  # fmt: skip

    def run(paths: Sequence[Path]) -> Iterator[Any]:
        noted: dict[int, tuple[str, ...]] = {}
        scores_of = predictor.iter_scores(list(paths), spec.workers, None, noted.__setitem__)
        for index, scores in enumerate(scores_of):
            yield _result(scores, noted.pop(index, ()))

    return run


def _result(value: Any, warnings: tuple[str, ...]) -> Any:
    """What a rank records for one video: its error, or its result with any warnings."""
    if isinstance(value, str):
        return Failed(value)
    return Noted(value, warnings) if warnings else value


def _feature_processor(ctx: Any, spec: FeatureSpec) -> Callable[[Sequence[Path]], Iterator[Any]]:
    """One rank's feature extractor: the model on its device, float32 features per video."""
    from i3d.data.pipeline import build_pipeline
    from i3d.weights.format import load_model

    where = feature_device(spec.backend, rank_device(spec.backend, spec.device, ctx))
    model = load_model(spec.weights, where)
    pipeline = build_pipeline(model.weights_info.preprocessing, spec.mode, **dict(spec.overrides))
    flow = spec.flow_config(str(where))

    def run(paths: Sequence[Path]) -> Iterator[Any]:
        noted: dict[int, tuple[str, ...]] = {}
        for index, feats in enumerate(iter_features(
            model, pipeline, list(paths), spec.endpoint, spec.pool, spec.batch_size, spec.workers,
            flow=flow, flow_dir=spec.flow_dir, on_warnings=noted.__setitem__,
            backend=spec.backend,
        )):  # fmt: skip
            yield _result(feats if isinstance(feats, str) else feats.numpy(), noted.pop(index, ()))

    return run


def _fingerprint(weights: str, spec: Any) -> str:
    """What decides the results: the weights' bytes and every setting of the spec (RAFT
    weights by their bytes too; a spec without them hashes as before they existed)."""
    settings = {k: v for k, v in attrs.asdict(spec).items() if k not in ("workers", "weights")}
    raft = settings.pop("raft_weights")
    if raft is not None:
        settings["raft_sha256"] = sha256_file(raft)
    text = json.dumps([sha256_file(weights), settings], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _run(
    paths: Sequence[Path],
    factory: Callable[..., Any],
    spec: Any,
    folder: str | os.PathLike[str],
    world_size: int,
    on_progress: Callable[[int, int], None] | None,
    log_dir: str | os.PathLike[str] | None,
) -> list[Outcome] | None:
    outcomes = run_sharded(
        [str(p) for p in paths],
        functools.partial(factory, spec=spec),
        folder,
        costs=video_cost,
        fingerprint=_fingerprint(spec.weights, spec),
        world_size=world_size,
        backend=group_device(spec.backend, spec.device),
        on_progress=on_progress,
        log_dir=log_dir,
    )
    return outcomes  # None on a torchrun rank other than 0


def sharded_scores(
    paths: Sequence[Path],
    spec: PredictSpec,
    folder: str | os.PathLike[str],
    world_size: int,
    on_progress: Callable[[int, int], None] | None = None,
    log_dir: str | os.PathLike[str] | None = None,
) -> list[Outcome] | None:
    """Each video's outcome in order, computed on ``world_size`` spawned ranks or the ranks
    of this torchrun job (None on ranks other than 0): its averaged class scores (K,) as
    ``value`` with the ``warnings`` of its reading, or its ``error`` text. ``folder`` keeps
    each video's result: a rerun computes only what is missing; ``log_dir`` gets a log per
    rank."""
    return _run(paths, _score_processor, spec, folder, world_size, on_progress, log_dir)


def sharded_features(
    paths: Sequence[Path],
    spec: FeatureSpec,
    folder: str | os.PathLike[str],
    world_size: int,
    on_progress: Callable[[int, int], None] | None = None,
    log_dir: str | os.PathLike[str] | None = None,
) -> list[Outcome] | None:
    """Each video's outcome in order, its features (float32) as ``value``; as
    :func:`sharded_scores`."""
    return _run(paths, _feature_processor, spec, folder, world_size, on_progress, log_dir)
