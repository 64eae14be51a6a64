"""``i3d predict``, ``i3d evaluate`` and ``i3d features``: thin typer layers over i3d.predict."""

from __future__ import annotations

import json
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
from i3d.data.datasets import (
    AnnotationError,
    auto_workers,
    check_labels,
    iter_views,
    load_annotations,
)
from i3d.data.decode import VideoDecodeError
from i3d.data.pipeline import build_pipeline
from i3d.feature_files import FeatureSetting, open_feature_store
from i3d.predict import (
    VIDEO_ERRORS,
    InputError,
    Predictor,
    Scored,
    check_video_model,
    default_weights,
    evaluate_samples,
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

console = Console(soft_wrap=True)  # log lines stay whole when redirected
ERRORS = (InputError, AnnotationError, VideoDecodeError, ImportError, ValueError)
SAVE_EVERY = 20  # videos between rewrites of a .safetensors feature file (resume points)


class Pool(str, Enum):
    mean = "mean"
    none = "none"


WeightsOpt = Annotated[
    Path | None,
    typer.Option(help="Project .safetensors weights (default: the pulled i3d_inception_k400_rgb)."),
]
ClipsOpt = Annotated[
    int | None, typer.Option(min=1, help="Temporal clips per video (default: the weights').")
]
CropsOpt = Annotated[
    int | None, typer.Option(help="Spatial crops per clip: 1, 3 or 10 (default: the weights').")
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
    crops: CropsOpt = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Classes shown per video.")] = 5,
    batch_size: BatchOpt = 1,
    backend: BackendOpt = "torch",
    device: DeviceOpt = None,
    workers: WorkersOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per video.")] = False,
    csv: Annotated[Path | None, typer.Option(help="Also write the top-k table as CSV.")] = None,
) -> None:
    """Classify videos with the weights' own test protocol (views averaged as they say)."""
    from i3d.backends import BackendError

    with fail_on_errors(*ERRORS, BackendError):
        if csv is not None and csv.is_dir():
            raise InputError(f"--csv {csv} is a folder; give a file path")
        if csv is not None and not (csv.parent if str(csv.parent) else Path(".")).is_dir():
            raise InputError(f"--csv {csv}: folder {csv.parent} does not exist; create it first")
        paths = expand_inputs(inputs)
        predictor = Predictor(weights, clips, crops, batch_size, backend, device)
        if predictor.num_classes is not None:
            top_k = min(top_k, predictor.num_classes)
        results = []
        with _progress() as progress:
            task = progress.add_task("predicting", total=len(paths), visible=len(paths) > 1)
            for result in predictor.predict_many(paths, workers):
                results.append(result)
                if as_json:
                    typer.echo(json.dumps(result.to_json(top_k)))
                progress.advance(task)
        if not as_json:
            _print_table(results, top_k)
        if csv is not None:
            _write_csv(csv, results, top_k)
    failed = [r for r in results if r.error is not None]
    if failed:
        err_console.print(f"[red]{len(failed)} of {len(results)} inputs failed:[/red]")
        for r in failed:
            _print_failure(r.path, r.error)
        raise typer.Exit(1)


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


def _write_csv(path: Path, results: list, top_k: int) -> None:
    import csv as csv_module

    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv_module.writer(fh)
        writer.writerow(["path", "rank", "index", "label", "score", "error"])
        for r in results:
            if r.error is not None:
                writer.writerow([str(r.path), "", "", "", "", r.error])
            for rank, (index, name, score) in enumerate(r.top(top_k), 1):
                writer.writerow([str(r.path), rank, index, name, f"{score:.6f}", ""])


def evaluate(
    annotations: Annotated[
        Path | None,
        typer.Argument(help="Annotation list (mmaction txt, Kinetics CSV or class folders)."),
    ] = None,
    weights: WeightsOpt = None,
    data_root: Annotated[
        Path | None, typer.Option(help="Directory the list's paths are in.")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N samples.")] = None,
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Where reports are written.")
    ] = Path("evaluation"),
    from_predictions: Annotated[
        Path | None, typer.Option(help="Re-score a predictions.jsonl instead of running.")
    ] = None,
    clips: ClipsOpt = None,
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
            if annotations is not None or data_root is not None:
                raise InputError(
                    "--from-predictions re-scores the labels stored in that file; drop the "
                    "annotation list / --data-root, or run without --from-predictions"
                )
            scored = read_predictions(from_predictions)[:limit]
            labels = read_info(weights).labels if weights is not None else None
            skipped: list[tuple[str, str]] = []
        else:
            if annotations is None:
                raise InputError("give an annotation list, or --from-predictions FILE")
            predictor = Predictor(weights, clips, crops, batch_size, backend, device)
            scored, skipped, labels = _run_evaluation(
                predictor, annotations, data_root, limit, workers
            )
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
    predictor: Predictor,
    annotations: Path,
    data_root: Path | None,
    limit: int | None,
    workers: int | None,
) -> tuple[list[Scored], list[tuple[str, str]], tuple[str, ...] | None]:
    labels = predictor.labels
    samples = load_annotations(annotations, data_root, labels=labels)[:limit]
    if predictor.num_classes is not None:
        check_labels(samples, predictor.num_classes)
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
    return scored, skipped, labels


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
            help="Clips per video, with the weights' test crops (default: one centre clip).",
        ),
    ] = None,
    crops: Annotated[
        int | None,
        typer.Option(help="Crops per clip, 1, 3 or 10 (default: one centre crop)."),
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
        pipeline = build_pipeline(prep, mode, **overrides)
        views = f"{mode} {pipeline.clips_per_crop}x{pipeline.num_crops}"
        setting = FeatureSetting(endpoint, pool.value, sha256_file(path), views)
        store = open_feature_store(output, setting)
        todo = [p for p in paths if not store.has(p)]
        failed: list[tuple[Path, str]] = []
        with _progress() as progress:
            task = progress.add_task("features", total=len(todo), visible=len(todo) > 1)
            count = auto_workers(len(todo)) if workers is None else workers
            views_of = iter_views(todo, pipeline, count, VIDEO_ERRORS)
            for i, (path, views) in enumerate(zip(todo, views_of, strict=True), 1):
                try:
                    if isinstance(views, str):  # decoding failed; this is its message
                        failed.append((path, views))
                    else:
                        feats = video_features(
                            model, pipeline, views, endpoint, pool.value, batch_size
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
