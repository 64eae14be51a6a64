"""``i3d features``: endpoint features per video, one process or N ranks, resumable."""

from __future__ import annotations

import shutil
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console

from i3d.cli.common import err_console, fail_on_errors
from i3d.cli.video_common import (
    ERRORS,
    BatchOpt,
    ClipLenOpt,
    DeviceOpt,
    WeightsOpt,
    WorkersOpt,
    WorldSizeOpt,
    count_videos,
    is_sharded,
    job_progress,
    new_progress,
    parts_folder,
    print_failure,
    run_sharded_job,
    view_progress,
)
from i3d.data.pipeline import build_pipeline
from i3d.feature_files import FeatureSetting, open_feature_store
from i3d.predict import (
    InputError,
    check_video_model,
    default_weights,
    expand_inputs,
    feature_device,
    iter_features,
)
from i3d.sharded_inference import FeatureSpec, sharded_features
from i3d.utils.files import refuse_overwriting, sha256_file
from i3d.weights.format import load_model, read_info

console = Console(soft_wrap=True)  # log lines stay whole when redirected
SAVE_EVERY = 20  # videos between rewrites of a .safetensors feature file (resume points)


class Pool(str, Enum):
    mean = "mean"
    none = "none"


def features(
    inputs: Annotated[
        list[str],
        typer.Argument(help="Video files, directories, globs, or folders of extracted frames."),
    ],
    endpoint: Annotated[str, typer.Option(help="Layer to read, e.g. layer4 or Mixed_5c.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="A .safetensors file, or a directory of .npy.")
    ],
    pool: Annotated[Pool, typer.Option(help="mean: one vector per video; none: full maps.")] = (
        Pool.mean
    ),
    weights: WeightsOpt = None,
    clips: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Clips per video, with the weights' test crops (default: one centre clip; "
            "every-frame weights: the whole video in at most N windows, default 10).",
        ),
    ] = None,
    clip_len: ClipLenOpt = None,
    crops: Annotated[
        int | None,
        typer.Option(
            help="Crops per clip, 1, 3 or 10 (default: one centre crop); 3 as for predict."
        ),
    ] = None,
    batch_size: BatchOpt = 1,
    backend: Annotated[str, typer.Option(help="torch (cpu, cuda, mps) or npu.")] = "torch",
    device: DeviceOpt = None,
    workers: WorkersOpt = None,
    world_size: WorldSizeOpt = 1,
) -> None:
    """Features of an endpoint per video (resumable: videos already written are skipped)."""
    from i3d.backends import BackendError

    with fail_on_errors(*ERRORS, BackendError):
        paths = expand_inputs(inputs)
        sharded = is_sharded(world_size)
        where = feature_device(backend, device)  # checked here, used here only in one process
        path = weights if weights is not None else default_weights()
        refuse_overwriting(output, path)
        check_video_model(path, read_info(path))
        model = load_model(path, "cpu" if sharded else where)  # ranks load their own
        if endpoint not in model.endpoint_names:
            raise InputError(f"unknown endpoint {endpoint!r}; available: {model.endpoint_names}")
        prep = model.weights_info.preprocessing
        overrides = {k: v for k, v in (("num_clips", clips), ("num_crops", crops)) if v}
        mode = "test" if overrides else "val"
        if clip_len is not None:
            overrides["clip_len"] = clip_len
        pipeline = build_pipeline(prep, mode, **overrides)
        views = f"{mode} {pipeline.clips_per_crop}x{pipeline.num_crops}"
        if clip_len is not None:  # recorded so a resume cannot mix clip lengths
            views += f" clip_len {clip_len}"
        setting = FeatureSetting(endpoint, pool.value, sha256_file(path), views)
        store = open_feature_store(output, setting)
        todo = [p for p in paths if not store.has(p)]
        failed: list[tuple[Path, str]] = []
        if sharded:
            spec = FeatureSpec(
                str(path), endpoint, pool.value, mode, tuple(sorted(overrides.items())),
                batch_size, backend, device, workers,
            )  # fmt: skip
            if not _sharded_features(todo, spec, output, world_size, store, failed):
                return  # a torchrun rank other than 0: rank 0 writes the file
        else:
            _local_features(todo, model, pipeline, endpoint, pool.value, batch_size, workers,
                            store, failed)  # fmt: skip
        store.save()
    console.print(
        f"{count_videos(len(todo) - len(failed))} written to {output} "
        f"({len(paths) - len(todo)} already there)",
        highlight=False,
    )
    if failed:
        err_console.print(f"[red]{count_videos(len(failed))} failed:[/red]")
        for path, error in failed:
            print_failure(path, error)
        raise typer.Exit(1)


def _local_features(
    todo: list[Path],
    model: Any,
    pipeline: Any,
    endpoint: str,
    pool: str,
    batch_size: int,
    workers: int | None,
    store: Any,
    failed: list[tuple[Path, str]],
) -> None:
    """Features of ``todo`` in this process into ``store`` (saved every SAVE_EVERY videos)."""
    with new_progress() as progress:
        task = progress.add_task("features", total=len(todo), visible=len(todo) > 1)
        on_views = view_progress(progress, todo[0].name) if len(todo) == 1 else None
        results = iter_features(
            model, pipeline, todo, endpoint, pool, batch_size, workers, on_views
        )
        for i, (path, feats) in enumerate(zip(todo, results, strict=True), 1):
            if isinstance(feats, str):
                failed.append((path, feats))
            else:
                store.add(path, feats)
            if i % SAVE_EVERY == 0:
                store.save()
            progress.advance(task)


def _sharded_features(
    todo: list[Path],
    spec: FeatureSpec,
    output: Path,
    world_size: int,
    store: Any,
    failed: list[tuple[Path, str]],
) -> bool:
    """Features of ``todo`` from N ranks into ``store``; False on torchrun ranks but 0.

    Per-video results wait in ``OUT.parts/`` until they are in the store, for a rerun.
    """
    if not todo:
        return True
    folder = parts_folder(output)
    with new_progress() as progress:
        on_progress = job_progress(progress, "features", len(todo))
        results = run_sharded_job(sharded_features, todo, spec, folder, world_size, on_progress)
    if results is None:
        return False
    for path, feats in zip(todo, results, strict=True):
        if isinstance(feats, str):
            failed.append((path, feats))
        else:
            store.add(path, torch.from_numpy(feats))
    store.save()
    shutil.rmtree(folder, ignore_errors=True)
    return True


def register(app: typer.Typer) -> None:
    app.command()(features)
