"""``i3d predict``, ``i3d evaluate`` and ``i3d features``: thin typer layers over i3d.predict."""

from __future__ import annotations

import json
import time
from enum import Enum
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column, Table

from i3d.cli.common import err_console, fail_on_errors
from i3d.cli.predict_csv import PredictionTable
from i3d.data.datasets import AnnotationError, Sample, auto_workers, iter_views
from i3d.data.decode import VideoDecodeError
from i3d.data.pipeline import build_pipeline
from i3d.feature_files import FeatureSetting, open_feature_store
from i3d.predict import (
    VIDEO_ERRORS,
    InputError,
    Prediction,
    Predictor,
    Scored,
    ViewProgress,
    check_video_model,
    default_weights,
    evaluate_samples,
    evaluation_samples,
    expand_inputs,
    feature_device,
    plot_confusion,
    read_predictions,
    summarize,
    video_features,
    write_per_class,
    write_predictions,
)
from i3d.utils.files import atomic_path, ensure_dir, refuse_overwriting, sha256_file
from i3d.weights.format import load_model, read_info
from i3d.weights.labels import read_labels

console = Console(soft_wrap=True)  # log lines stay whole when redirected
ERRORS = (InputError, AnnotationError, VideoDecodeError, ImportError, ValueError)
SAVE_EVERY = 20  # videos between rewrites of a .safetensors feature file (resume points)
SAVE_SECONDS = 30.0  # least time between rewrites of a --csv file during a run (resume points)


class Pool(str, Enum):
    mean = "mean"
    none = "none"


WeightsOpt = Annotated[
    Path | None,
    typer.Option(help="Project .safetensors weights (default: the pulled i3d_inception_k400_rgb)."),
]
ClipsOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Temporal clips per video (default: the weights'). Every-frame weights (DeepMind's) "
        "read the whole video as at most N windows of up to 250 frames (default 10), or, with "
        "--clip-len, as N clips (default 10).",
    ),
]
ClipLenOpt = Annotated[
    int | None,
    typer.Option(
        "--clip-len",
        min=1,
        help="Frames per clip T (default: the weights'). Every-frame weights then take N "
        "(--clips, default 10) clips of T consecutive frames instead of windows.",
    ),
]
CropsOpt = Annotated[
    int | None,
    typer.Option(
        help="Spatial crops per clip: 1, 3 or 10 (default: the weights'). 3 crops span the "
        "short side: weights that crop less than it (DeepMind's 224 of 256) get the short "
        "side resized to the crop size."
    ),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Clips per forward pass.")]
BackendOpt = Annotated[str, typer.Option(help="Execution backend (see `i3d backends`).")]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        min=0, help="Processes decoding ahead of the model (default: 0 for one video, else auto)."
    ),
]
DeviceOpt = Annotated[
    str | None, typer.Option(help="Device, e.g. cpu, cuda:0, npu:0 (default: the backend's).")
]


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )


def predict(
    inputs: Annotated[
        list[str],
        typer.Argument(help="Video files, directories, globs, or folders of extracted frames."),
    ],
    weights: WeightsOpt = None,
    clips: ClipsOpt = None,
    clip_len: ClipLenOpt = None,
    crops: CropsOpt = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Classes shown per video.")] = 5,
    batch_size: BatchOpt = 1,
    backend: BackendOpt = "torch",
    device: DeviceOpt = None,
    workers: WorkersOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per video.")] = False,
    csv: Annotated[
        Path | None, typer.Option(help="Also write the top-k rows of each video as CSV.")
    ] = None,
    all_scores: Annotated[
        bool,
        typer.Option(
            "--all-scores",
            help='Every class score: a "scores" list in each JSON object; as CSV, one row per '
            "video with a column per class (named by label) instead of top-k rows.",
        ),
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the --csv file: skip the videos it has scores of (failed ones are "
            "retried) and keep its rows.",
        ),
    ] = False,
) -> None:
    """Classify videos with the weights' own test protocol (views averaged as they say)."""
    from i3d.backends import BackendError

    with fail_on_errors(*ERRORS, BackendError):
        if csv is not None and csv.is_dir():
            raise InputError(f"--csv {csv} is a folder; give a file path")
        if csv is not None and not (csv.parent if str(csv.parent) else Path(".")).is_dir():
            raise InputError(f"--csv {csv}: folder {csv.parent} does not exist; create it first")
        if resume and csv is None:
            raise InputError("--resume continues a --csv file; pass --csv OUT")
        paths = expand_inputs(inputs)
        predictor = Predictor(weights, clips, crops, batch_size, backend, device, clip_len)
        if predictor.num_classes is not None:
            top_k = min(top_k, predictor.num_classes)
        table = PredictionTable(top_k, all_scores, predictor.labels, predictor.num_classes)
        resuming = resume and csv is not None and csv.exists()
        if resuming:
            table.load(csv)
        done = table.done()
        todo = [p for p in paths if str(p) not in done]
        if len(todo) < len(paths):
            skipped = _videos(len(paths) - len(todo))
            err_console.print(f"{skipped} already in {csv} (--resume), skipped", highlight=False)
        # saving before the end loses nothing when the file's old rows are kept or it is new
        early = csv if csv is not None and (resuming or not csv.exists()) else None
        order = [str(p) for p in paths]
        results: list[Prediction] = []
        try:
            with _progress() as progress:
                task = progress.add_task("predicting", total=len(todo), visible=len(todo) > 1)
                on_views = _view_progress(progress, todo[0].name) if len(todo) == 1 else None
                saved = time.monotonic()
                for result in predictor.predict_many(todo, workers, on_views):
                    results.append(result)
                    table.add(result)
                    if as_json:
                        typer.echo(json.dumps(result.to_json(top_k, all_scores)))
                    progress.advance(task)
                    if early is not None and time.monotonic() - saved > SAVE_SECONDS:
                        table.save(early, order)
                        saved = time.monotonic()
        except KeyboardInterrupt:
            if early is None or not results:
                raise
            table.save(early, order)
            err_console.print(
                f"interrupted: {_videos(len(results))} saved in {early}; run the same command "
                "with --resume to do the rest"
            )
            raise typer.Exit(130) from None
        except BaseException:
            if early is not None and results:
                table.save(early, order)  # what is done, with the earlier file's rows
            raise
        if not as_json and results:
            _print_table(results, top_k)
        if csv is not None:
            table.save(csv, order)
    failed = [r for r in results if r.error is not None]
    if failed:
        err_console.print(f"[red]{len(failed)} of {len(results)} inputs failed:[/red]")
        for r in failed:
            _print_failure(r.path, r.error)
        raise typer.Exit(1)


def _view_progress(progress: Progress, name: str) -> ViewProgress:
    """A bar of one video's views, saying "decoding" until its first views run."""
    task = progress.add_task(f"{name}: decoding", total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total, description=f"{name}: views")

    return update


def _videos(count: int) -> str:
    """``1 video`` / ``3 videos``."""
    return f"{count} video{'' if count == 1 else 's'}"


def _print_failure(path: Path | str, error: str | None) -> None:
    """One indented line per failed input; the path is not repeated when the error names it."""
    line = error if error and str(path) in error else f"{path}: {error}"
    err_console.print(f"  {escape(line)}", highlight=False, soft_wrap=True)


def _print_table(results: list, top_k: int) -> None:
    table = Table(Column("video", overflow="fold"), *[f"#{i + 1}" for i in range(top_k)])
    for r in results:
        cells = [f"{name} ({score:.3f})" for _, name, score in r.top(top_k)]
        table.add_row(str(r.path), *(cells or ["[red]failed[/red]"] + [""] * (top_k - 1)))
    console.print(table)


def evaluate(
    annotations: Annotated[
        Path | None,
        typer.Argument(help="Annotation list (mmaction txt, Kinetics CSV or class folders)."),
    ] = None,
    weights: WeightsOpt = None,
    data_root: Annotated[
        Path | None, typer.Option(help="Directory the list's paths are in.")
    ] = None,
    label_file: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            help="Class names of the list's labels, one per line in label order; matched by "
            "name with the model's classes.",
        ),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N samples.")] = None,
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Where reports are written.")
    ] = Path("evaluation"),
    from_predictions: Annotated[
        Path | None, typer.Option(help="Re-score a predictions.jsonl instead of running.")
    ] = None,
    clips: ClipsOpt = None,
    clip_len: ClipLenOpt = None,
    crops: CropsOpt = None,
    batch_size: BatchOpt = 1,
    backend: BackendOpt = "torch",
    device: DeviceOpt = None,
    workers: WorkersOpt = None,
) -> None:
    """Top-1/top-5/mean-class accuracy (mmaction definitions), per-class CSV, confusion PNG."""
    from i3d.backends import BackendError

    with fail_on_errors(*ERRORS, BackendError):
        if output_dir.exists() and not output_dir.is_dir():
            raise InputError(f"--output-dir {output_dir} is a file; give a folder")
        if from_predictions is not None:
            if annotations is not None or data_root is not None or label_file is not None:
                raise InputError(
                    "--from-predictions re-scores the labels stored in that file; drop the "
                    "annotation list / --data-root / --labels, or run without --from-predictions"
                )
            scored = read_predictions(from_predictions)[:limit]
            labels = read_info(weights).labels if weights is not None else None
            skipped: list[tuple[str, str]] = []
        else:
            if annotations is None:
                raise InputError("give an annotation list, or --from-predictions FILE")
            predictor = Predictor(weights, clips, crops, batch_size, backend, device, clip_len)
            list_labels = read_labels(label_file) if label_file is not None else None
            samples = evaluation_samples(
                annotations,
                data_root,
                predictor.labels,
                predictor.num_classes,
                list_labels,
                default_model=weights is None,
            )[:limit]
            scored, skipped = _run_evaluation(predictor, samples, workers)
            labels = predictor.labels
            if not scored:
                first, error = skipped[0]  # annotation lists are never empty
                detail = error if first in error else f"{first}: {error}"
                raise InputError(
                    f"none of the {len(skipped)} samples could be read; first: {detail}"
                )
        ensure_dir(output_dir)  # only now: a refused or failed run leaves no folder
        if from_predictions is None:
            write_predictions(output_dir / "predictions.jsonl", scored)
        metrics = summarize(scored)
        write_per_class(output_dir / "per_class.csv", scored, labels)
        plot_confusion(output_dir / "confusion.png", scored, labels)
        report = {**metrics, "samples": len(scored), "skipped": len(skipped)}
        with atomic_path(output_dir / "metrics.json") as tmp:
            tmp.write_text(json.dumps(report, indent=2) + "\n")
    table = Table("metric", "value")
    for key in ("top1", "top5", "mean_class"):
        table.add_row(key, f"{metrics[key]:.4f}")
    table.add_row("samples", str(len(scored)))
    console.print(table)
    console.print(f"reports in {output_dir}/", highlight=False)
    if skipped:
        err_console.print(f"[yellow]{len(skipped)} samples skipped (unreadable):[/yellow]")
        for path, error in skipped[:20]:
            _print_failure(path, error)


def _run_evaluation(
    predictor: Predictor, samples: list[Sample], workers: int | None
) -> tuple[list[Scored], list[tuple[str, str]]]:
    """Scored samples and (path, error) of the unreadable ones, with a running top-1."""
    scored: list[Scored] = []
    skipped: list[tuple[str, str]] = []
    hits = 0
    with _progress() as progress:
        task = progress.add_task("evaluating", total=len(samples))
        for item in evaluate_samples(samples, predictor, workers):
            if isinstance(item, Scored):
                scored.append(item)
                hits += int(np.argmax(item.scores) == item.label)
            else:
                skipped.append((str(item[0].path), item[1]))
            running = f"top-1 {hits / len(scored):.3f}" if scored else "top-1 -"
            progress.update(task, advance=1, description=f"evaluating ({running})")
    return scored, skipped


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
) -> None:
    """Features of an endpoint per video (resumable: videos already written are skipped)."""
    from i3d.backends import BackendError

    with fail_on_errors(*ERRORS, BackendError):
        paths = expand_inputs(inputs)
        where = feature_device(backend, device)
        path = weights if weights is not None else default_weights()
        refuse_overwriting(output, path)
        check_video_model(path, read_info(path))
        model = load_model(path, where)
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
        with _progress() as progress:
            task = progress.add_task("features", total=len(todo), visible=len(todo) > 1)
            on_views = _view_progress(progress, todo[0].name) if len(todo) == 1 else None
            count = auto_workers(len(todo)) if workers is None else workers
            views_of = iter_views(todo, pipeline, count, VIDEO_ERRORS)
            for i, (path, views) in enumerate(zip(todo, views_of, strict=True), 1):
                try:
                    if isinstance(views, str):  # decoding failed; this is its message
                        failed.append((path, views))
                    else:
                        feats = video_features(
                            model, pipeline, views, endpoint, pool.value, batch_size, on_views
                        )
                        store.add(path, feats.to(device="cpu", dtype=torch.float32))
                except VIDEO_ERRORS as exc:
                    failed.append((path, str(exc)))
                if i % SAVE_EVERY == 0:
                    store.save()
                progress.advance(task)
        store.save()
    console.print(
        f"{_videos(len(todo) - len(failed))} written to {output} "
        f"({len(paths) - len(todo)} already there)",
        highlight=False,
    )
    if failed:
        err_console.print(f"[red]{_videos(len(failed))} failed:[/red]")
        for path, error in failed:
            _print_failure(path, error)
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(predict)
    app.command()(evaluate)
    app.command()(features)
