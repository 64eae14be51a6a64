"""``i3d features``: endpoint features per video, one process or N ranks, resumable."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import attrs
import torch
import typer
from rich.console import Console

from i3d.cli.common import err_console, fail_on_errors
from i3d.cli.video_common import (
    ERRORS,
    ClipLenOpt,
    DeviceOpt,
    FlowDirOpt,
    FlowImplOpt,
    LogDirOpt,
    RaftWeightsOpt,
    WeightsOpt,
    WorkersOpt,
    WorldSizeOpt,
    check_log_dir,
    count_videos,
    is_sharded,
    job_progress,
    new_progress,
    parts_folder,
    report_written,
    run_sharded_job,
    view_progress,
)
from i3d.data.pipeline import build_pipeline
from i3d.features.output import LAYOUTS
from i3d.features.pooled import endpoint_names, feature_device, iter_features
from i3d.features.protocol import ANCHORS, TAILS
from i3d.features.store import FeatureSetting, open_feature_store
from i3d.flow.recipe import FlowConfig, check_flow
from i3d.flow.views import open_flow_dir
from i3d.inference.inputs import InputError, default_weights, expand_inputs
from i3d.inference.predictor import check_video_model, model_streams
from i3d.inference.sharded import FeatureSpec, sharded_features
from i3d.utils.files import (
    OutputError,
    ensure_dir,
    exclusive_lock,
    refuse_overwriting,
    sha256_file,
)
from i3d.weights.format import load_model, read_info

console = Console(soft_wrap=True)  # log lines stay whole when redirected
SAVE_EVERY = 20  # videos between rewrites of a .safetensors feature file (resume points)


class Pool(str, Enum):
    mean = "mean"
    none = "none"


def _choices(name: str, values: Any) -> type[Enum]:
    """A typer choice type of ``values``, the API's own tuple (one list of the words)."""
    return Enum(name, {value: value for value in values}, type=str)


TailOpt = _choices("TailOpt", TAILS)
AnchorOpt = _choices("AnchorOpt", ANCHORS)
LayoutOpt = _choices("LayoutOpt", LAYOUTS)


CROP_NAMES = {"center": 1, "1": 1, "3": 3, "10": 10}


def parse_crops(value: str | None) -> int | None:
    """``--crops center|1|3|10`` as a crop count."""
    if value is None:
        return None
    try:
        return CROP_NAMES[value.strip().lower()]
    except KeyError:
        raise InputError(f"--crops takes center (or 1), 3 or 10, not {value!r}") from None


def features(
    inputs: Annotated[
        list[str],
        typer.Argument(help="Video files, directories, globs, or folders of extracted frames."),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="A .safetensors file, or a directory of .npy (snippets: a folder).",
        ),
    ],
    endpoint: Annotated[
        str | None,
        typer.Option(
            help="Layer to read, e.g. layer4 or Mixed_5c (default: the last before the classifier)."
        ),
    ] = None,
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
        str | None,
        typer.Option(
            help="Crops per clip or snippet: center (1), 3 or 10 (default: one centre crop); 3 as "
            "for predict. Snippets keep crops as the first axis: (crops, snippets, C)."
        ),
    ] = None,
    window: Annotated[
        int | None,
        typer.Option(min=1, help="Snippet mode: frames per snippet W (one array per video)."),
    ] = None,
    stride: Annotated[
        int | None, typer.Option(min=1, help="Snippet mode: frames between snippets (default W).")
    ] = None,
    fps: Annotated[
        float | None,
        typer.Option(help="Snippet mode: resample the timeline to F fps first (default: native)."),
    ] = None,
    tail: Annotated[
        TailOpt | None,
        typer.Option(help="Snippet mode: windows past the end: drop (default), pad, repeat, loop."),
    ] = None,
    anchor: Annotated[
        AnchorOpt | None,
        typer.Option(help="Snippet mode: windows start at, or are centred on, every S-th frame."),
    ] = None,
    layout: Annotated[
        LayoutOpt | None,
        typer.Option(
            help="Snippet mode: each .npy as tc (snippets, C: ActionFormer, TriDet), ct (C, "
            "snippets: MS-TCN, ASFormer), crops first if kept; or tkc (snippets, crops, C: "
            "RTFM, MGFN). Default: the preset's, else tc."
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Snippet mode: a published protocol: actionformer-thumos14, actionformer-anet, "
            "rtfm, ms-tcn, video-features (options given as well override it)."
        ),
    ] = None,
    stream: Annotated[
        str | None,
        typer.Option(
            help="Snippet mode: rgb, flow or both (concatenated, RGB first). Default: the "
            "preset's streams, else rgb (both with --flow-weights)."
        ),
    ] = None,
    flow_weights: Annotated[
        Path | None,
        typer.Option(
            help="Snippet mode: a Flow-stream I3D for the optical-flow stream (default: "
            "--weights when that is a two-stream file)."
        ),
    ] = None,
    flow_impl: FlowImplOpt = "torch",
    flow_dir: FlowDirOpt = None,
    raft_weights: RaftWeightsOpt = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size", min=1, help="Clips per forward pass (default 1; snippets: 8)."
        ),
    ] = None,
    backend: Annotated[
        str, typer.Option(help="torch (cpu, cuda, mps), npu, or openvino (cpu, fp32).")
    ] = "torch",
    device: DeviceOpt = None,
    workers: WorkersOpt = None,
    world_size: WorldSizeOpt = 1,
    log_dir: LogDirOpt = None,
) -> None:
    """Features of an endpoint per video, or per snippet over whole videos (resumable)."""
    from i3d.backends import BackendError

    snippet_options = (window, stride, fps, tail, anchor, layout, preset, stream, flow_weights)
    if any(v is not None for v in snippet_options):
        if pool is not Pool.mean or clips is not None or clip_len is not None:
            with fail_on_errors(InputError):
                raise InputError(
                    "--pool, --clips and --clip-len are for pooled features; snippet mode "
                    "(--window / --preset) gives one vector per snippet"
                )
        snippet_features(
            inputs, output, endpoint, weights, crops, window, stride, fps, tail, anchor,
            layout, preset, stream, flow_weights, flow_impl, flow_dir, raft_weights,
            batch_size or 8, backend, device, workers, world_size, log_dir,
        )  # fmt: skip
        return
    batch_size = batch_size or 1
    with fail_on_errors(*ERRORS, BackendError, OutputError), contextlib.ExitStack() as stack:
        crop_count = parse_crops(crops)
        if endpoint is None:
            raise InputError("pooled features need --endpoint NAME (e.g. Mixed_5c or layer4)")
        check_log_dir(log_dir, world_size)
        paths = expand_inputs(inputs)
        sharded = is_sharded(world_size)
        where = feature_device(backend, device)  # checked here, used here only in one process
        path = weights if weights is not None else default_weights()
        refuse_overwriting(output, path)
        streams = model_streams(read_info(path))
        if streams == ("rgb",) and flow_dir is not None:
            raise InputError(
                f"{path} is an RGB model; --flow-dir serves flow or two-stream weights"
            )
        model = load_model(path, "cpu" if sharded else where)  # ranks load their own
        names = endpoint_names(model)
        if endpoint not in names:
            raise InputError(f"unknown endpoint {endpoint!r}; available: {names}")
        prep = model.weights_info.preprocessing
        overrides = {k: v for k, v in (("num_clips", clips), ("num_crops", crop_count)) if v}
        mode = "test" if overrides else "val"
        if clip_len is not None:
            overrides["clip_len"] = clip_len
        pipeline = build_pipeline(prep, mode, **overrides)
        views = f"{mode} {pipeline.clips_per_crop}x{pipeline.num_crops}"
        if clip_len is not None:  # recorded so a resume cannot mix clip lengths
            views += f" clip_len {clip_len}"
        spec = FeatureSpec(
            str(path), endpoint, pool.value, mode, tuple(sorted(overrides.items())),
            batch_size, backend, device, workers, flow_impl,
            str(flow_dir) if flow_dir is not None else None,
            str(raft_weights) if raft_weights is not None else None,
        )  # fmt: skip
        flow = spec.flow_config(str(where))
        flow_setting = ""
        if streams != ("rgb",):  # the flow folder is claimed before any rank starts
            check_flow(flow)
            folder = open_flow_dir(pipeline, flow, flow_dir) if flow_dir is not None else None
            recorded = {**flow.recorded(), "folder": folder.recorded() if folder else None}
            flow_setting = json.dumps(recorded, sort_keys=True)
        setting = FeatureSetting(endpoint, pool.value, sha256_file(path), views, flow_setting)
        if os.environ.get("RANK", "0") == "0":  # one writer: this run, or a job's rank 0
            stack.enter_context(exclusive_lock(_lock_beside(output), str(output)))
        store = open_feature_store(output, setting)
        todo = [p for p in paths if not store.has(p)]
        failed: list[tuple[Path, str]] = []
        if sharded:
            if not _sharded_features(todo, spec, output, world_size, log_dir, store, failed):
                return  # a torchrun rank other than 0: rank 0 writes the file
        else:
            _local_features(todo, model, pipeline, endpoint, pool.value, batch_size, workers,
                            flow, flow_dir, store, failed, backend)  # fmt: skip
        store.save()
    report_written(len(todo) - len(failed), len(paths) - len(todo), output, failed)


def _lock_beside(output: Path) -> Path:
    """The lock file of a pooled features output: hidden, beside it (not inside a folder)."""
    parent = output.parent if str(output.parent) else Path(".")
    ensure_dir(parent)
    return parent / f".{output.name}.i3d-lock"


def _local_features(
    todo: list[Path],
    model: Any,
    pipeline: Any,
    endpoint: str,
    pool: str,
    batch_size: int,
    workers: int | None,
    flow: FlowConfig,
    flow_dir: Path | None,
    store: Any,
    failed: list[tuple[Path, str]],
    backend: str,
) -> None:
    """Features of ``todo`` in this process into ``store`` (saved every SAVE_EVERY videos),
    the model run by ``backend``."""
    with new_progress() as progress:
        task = progress.add_task("features", total=len(todo), visible=len(todo) > 1)
        on_views = view_progress(progress, todo[0].name) if len(todo) == 1 else None
        noted: dict[int, tuple[str, ...]] = {}
        results = iter_features(
            model, pipeline, todo, endpoint, pool, batch_size, workers, on_views, flow, flow_dir,
            noted.__setitem__, backend=backend,
        )  # fmt: skip
        for i, (path, feats) in enumerate(zip(todo, results, strict=True), 1):
            if isinstance(feats, str):
                failed.append((path, feats))
            else:
                store.add(path, feats, noted.pop(i - 1, ()))
            if i % SAVE_EVERY == 0:
                store.save()
            progress.advance(task)


def _sharded_features(
    todo: list[Path],
    spec: FeatureSpec,
    output: Path,
    world_size: int,
    log_dir: Path | None,
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
        results = run_sharded_job(
            sharded_features, todo, spec, folder, world_size, on_progress, log_dir
        )
    if results is None:
        return False
    for path, outcome in zip(todo, results, strict=True):
        if outcome.ok:
            store.add(path, torch.from_numpy(outcome.value), outcome.warnings)
        else:
            failed.append((path, str(outcome.error)))
    store.save()
    shutil.rmtree(folder, ignore_errors=True)
    return True


def check_flow_model(path: Path, info: Any) -> None:
    """The flow stream's weights must be a Flow-stream (2-channel) I3D or a two-stream file."""
    if info.preprocessing.modality != "flow" and info.config.arch != "two_stream":
        raise InputError(
            f"--flow-weights {path} is an RGB model; give a Flow-stream I3D (e.g. DeepMind's "
            "flow_imagenet converted with i3d convert-weights)"
        )


def snippet_features(
    inputs: list[str],
    output: Path,
    endpoint: str | None,
    weights: Path | None,
    crops: str | None,
    window: int | None,
    stride: int | None,
    fps: float | None,
    tail: TailOpt | None,
    anchor: AnchorOpt | None,
    layout: LayoutOpt | None,
    preset: str | None,
    stream: str | None,
    flow_weights: Path | None,
    flow_impl: str,
    flow_dir: Path | None,
    raft_weights: Path | None,
    batch_size: int,
    backend: str,
    device: str | None,
    workers: int | None,
    world_size: int,
    log_dir: Path | None,
) -> None:
    """``i3d features --window/--preset``: one (snippets, C) array per video in a folder."""
    from i3d.backends import BackendError
    from i3d.features import SnippetJob, SnippetProtocol, extract_snippets, get_preset
    from i3d.features.presets import PresetError, choose_streams, preset_weights
    from i3d.weights.two_stream import is_two_stream

    with fail_on_errors(*ERRORS, BackendError, PresetError, OutputError):
        crop_count = parse_crops(crops)
        check_log_dir(log_dir, world_size)
        chosen = {
            "window": window, "stride": stride, "fps": fps, "crops": crop_count,
            "endpoint": endpoint, "tail": tail.value if tail else None,
            "anchor": anchor.value if anchor else None,
        }  # fmt: skip
        given = {k: v for k, v in chosen.items() if v is not None}
        named = get_preset(preset) if preset is not None else None
        if weights is not None and flow_weights is None and is_two_stream(weights):
            flow_weights = weights  # a two-stream file serves both streams
        streams = choose_streams(named, stream, flow_weights is not None)
        if flow_dir is not None and "flow" not in streams:
            raise InputError(
                "--flow-dir serves the optical-flow stream; add --stream flow or both (with "
                "--flow-weights or two-stream --weights), or drop --flow-dir"
            )
        if named is not None:
            if "window" in given and "stride" not in given:
                given["stride"] = given["window"]
            protocol = attrs.evolve(named.protocol, **given)
        else:
            if window is None:
                raise InputError("snippet features need --window W (or --preset NAME)")
            given.setdefault("stride", window)
            protocol = SnippetProtocol(**given)
        if "rgb" in streams:
            if weights is not None:  # the default is looked up only when it is used
                path = weights
            else:
                path = preset_weights(named) if named is not None else default_weights()
        else:  # the flow stream alone: no RGB model is read
            assert flow_weights is not None
            path = flow_weights
        paths = expand_inputs(inputs)
        for model_file in {path, flow_weights} - {None}:
            refuse_overwriting(output, model_file)
        if "rgb" in streams and not is_two_stream(path):
            check_video_model(path, read_info(path))
        if flow_weights is not None and "flow" in streams:
            check_flow_model(flow_weights, read_info(flow_weights))
        feature_device(backend, device)  # refuse exported backends before any rank starts
        flow = FlowConfig(impl=flow_impl, raft_weights=raft_weights)
        if "flow" in streams:
            check_flow(flow)
        job = SnippetJob(
            str(path), protocol, str(output), preset, batch_size, backend, device, workers,
            streams=streams, flow_weights=str(flow_weights) if flow_weights else None,
            flow=flow, flow_dir=str(flow_dir) if flow_dir else None,
            layout=layout.value if layout else named.layout if named else "tc",
        )  # fmt: skip
        with new_progress() as progress:
            on_progress = job_progress(progress, "snippets", len(paths))
            try:
                run = extract_snippets(paths, job, world_size, on_progress, log_dir)
            except KeyboardInterrupt:
                err_console.print(
                    f"interrupted; the finished videos are kept in {output}: run the same "
                    "command again to do the rest"
                )
                raise typer.Exit(130) from None
    if run is None:
        return  # a torchrun rank other than 0: rank 0 writes the manifest
    failed = [(r["path"], r["error"]) for r in run.failed]
    empty = [r["video"] for r in run.records if r.get("snippets") == 0]
    if empty:
        err_console.print(
            f"{count_videos(len(empty))} shorter than one window gave no snippets "
            f"({', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}); --tail pad, repeat or "
            "loop gives them one",
            highlight=False,
        )
    report_written(len(run.records) - len(failed) - run.reused, run.reused, output, failed)


def register(app: typer.Typer) -> None:
    app.command()(features)
