"""``i3d predict``, ``i3d evaluate`` and ``i3d features``: thin typer layers over i3d.predict."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

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
from i3d.distributed import DistributedError
from i3d.distributed.sharded import ShardedRunError
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
from i3d.sharded_inference import FeatureSpec, PredictSpec, sharded_features, sharded_scores
from i3d.utils.files import atomic_path, ensure_dir, refuse_overwriting, sha256_file
from i3d.weights.format import load_model, read_info
from i3d.weights.labels import read_labels

console = Console(soft_wrap=True)  # log lines stay whole when redirected
ERRORS = (
    InputError,
    AnnotationError,
    VideoDecodeError,
    ImportError,
    ValueError,
    DistributedError,
    ShardedRunError,
)
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
WorldSizeOpt = Annotated[
    int,
    typer.Option(
        "--world-size",
        min=1,
        help="Processes, one per device (cpu, cuda:N, npu:N), each taking a share of the "
        "videos; under torchrun the job's ranks. Results are kept per video in OUT.parts/ "
        "so a rerun finishes only what is missing.",
    ),
]


def _sharded(world_size: int) -> bool:
    """Whether this run goes through torch.distributed ranks (--world-size N or torchrun)."""
    from i3d.distributed import env_launched

    return world_size > 1 or env_launched()


def _parts_folder(output: Path | None) -> Path:
    """Where a sharded run keeps its per-video results: ``OUT.parts`` beside the output, or
    a new temporary folder."""
    if output is not None:
        return output.with_name(output.name + ".parts")
    import tempfile

    return Path(tempfile.mkdtemp(prefix="i3d-parts-"))


def _sharded_progress(progress: Progress, what: str, total: int) -> Callable[[int, int], None]:
    """One bar for the whole job: videos finished on every rank."""
    task = progress.add_task(what, total=total)

    def update(done: int, count: int) -> None:
        progress.update(task, completed=done, total=count)

    return update


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
    world_size: WorldSizeOpt = 1,
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
        spec = PredictSpec(
            str(weights or default_weights()), clips, crops, clip_len, batch_size, backend,
            device, workers,
        )  # fmt: skip
        predictor = _launcher_predictor(spec, _sharded(world_size))
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
                task = None
                if _sharded(world_size):
                    stream = _sharded_predictions(
                        todo, spec, predictor.labels, csv, world_size, progress
                    )
                    if stream is None:  # a torchrun rank other than 0: rank 0 reports
                        return
                else:
                    task = progress.add_task("predicting", total=len(todo), visible=len(todo) > 1)
                    on_views = _view_progress(progress, todo[0].name) if len(todo) == 1 else None
                    assert isinstance(predictor, Predictor)
                    stream = predictor.predict_many(todo, workers, on_views)
                saved = time.monotonic()
                for result in stream:
                    results.append(result)
                    table.add(result)
                    if as_json:
                        typer.echo(json.dumps(result.to_json(top_k, all_scores)))
                    if task is not None:
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


def _launcher_predictor(spec: PredictSpec, sharded: bool) -> Predictor | _ModelInfo:
    """The predictor, or for a sharded run of .safetensors weights just their labels (the
    ranks load the model; the launching process need not hold one too)."""
    if sharded and spec.weights.endswith(".safetensors"):
        info = read_info(Path(spec.weights))
        check_video_model(Path(spec.weights), info)
        return _ModelInfo(info.labels, info.config.head.num_classes)
    return Predictor(
        spec.weights, spec.clips, spec.crops, spec.batch_size, spec.backend, spec.device,
        spec.clip_len,
    )  # fmt: skip


class _ModelInfo:
    """Labels and class count, as a Predictor has them."""

    def __init__(self, labels: tuple[str, ...] | None, num_classes: int) -> None:
        self.labels, self.num_classes = labels, num_classes


def _sharded_predictions(
    todo: list[Path],
    spec: PredictSpec,
    labels: tuple[str, ...] | None,
    output: Path | None,
    world_size: int,
    progress: Progress,
) -> list[Prediction] | None:
    """Predictions of ``todo`` in order from N ranks (None on torchrun ranks other than 0).

    Per-video results wait in ``OUT.parts/`` beside the --csv file, so an interrupted run
    resumes; without --csv they go to a temporary folder, removed whatever happens.
    """
    if not todo:
        return []
    folder = _parts_folder(output)
    try:
        on_progress = _sharded_progress(progress, "predicting", len(todo))
        scores = _run_sharded(sharded_scores, todo, spec, folder, world_size, on_progress)
    finally:
        if output is None:
            shutil.rmtree(folder, ignore_errors=True)
    if scores is None:
        return None
    shutil.rmtree(folder, ignore_errors=True)  # merged: the outputs have it all now
    return [
        Prediction(path, None, labels, error=s) if isinstance(s, str)
        else Prediction(path, s, labels)
        for path, s in zip(todo, scores, strict=True)
    ]  # fmt: skip


def _run_sharded(
    run: Callable[..., Any],
    todo: list[Path],
    spec: Any,
    folder: Path,
    world_size: int,
    on_progress: Callable[[int, int], None],
) -> Any:
    """``run`` (sharded_scores / sharded_features); an interrupted or failed job says that
    the videos it finished are kept, and how to do the rest."""
    from i3d.distributed.sharded import RunIncomplete

    kept = f"the finished ones are kept in {folder}/; run the same command again to do the rest"
    try:
        return run(todo, spec, folder, world_size, on_progress)
    except (RunIncomplete, KeyboardInterrupt) as exc:
        left = f"{len(exc.missing)} of {exc.total} videos" if isinstance(exc, RunIncomplete) else (
            "the rest"
        )
        err_console.print(f"interrupted: {left} not done; {kept}")
        raise typer.Exit(130) from None
    except DistributedError as exc:
        raise DistributedError(f"{exc}; {kept}") from None


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
    world_size: WorldSizeOpt = 1,
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
            spec = PredictSpec(
                str(weights or default_weights()), clips, crops, clip_len, batch_size, backend,
                device, workers,
            )  # fmt: skip
            predictor = _launcher_predictor(spec, _sharded(world_size))
            list_labels = read_labels(label_file) if label_file is not None else None
            samples = evaluation_samples(
                annotations,
                data_root,
                predictor.labels,
                predictor.num_classes,
                list_labels,
                default_model=weights is None,
            )[:limit]
            if _sharded(world_size):
                outcome = _sharded_evaluation(samples, spec, output_dir, world_size)
                if outcome is None:  # a torchrun rank other than 0: rank 0 reports
                    return
                scored, skipped = outcome
            else:
                assert isinstance(predictor, Predictor)
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


def _sharded_evaluation(
    samples: list[Sample], spec: PredictSpec, output_dir: Path, world_size: int
) -> tuple[list[Scored], list[tuple[str, str]]] | None:
    """Scored samples and the unreadable ones from N ranks (None on torchrun ranks but 0);
    per-video results wait in ``OUTPUT_DIR.parts/`` until merged, for a rerun to resume."""
    folder = _parts_folder(output_dir)
    paths = [Path(s.path) for s in samples]
    with _progress() as progress:
        on_progress = _sharded_progress(progress, "evaluating", len(paths))
        scores = _run_sharded(sharded_scores, paths, spec, folder, world_size, on_progress)
    if scores is None:
        return None
    scored = [
        Scored(str(sample.path), sample.label, s)
        for sample, s in zip(samples, scores, strict=True)
        if not isinstance(s, str)
    ]
    skipped = [
        (str(sample.path), s)
        for sample, s in zip(samples, scores, strict=True)
        if isinstance(s, str)
    ]
    shutil.rmtree(folder, ignore_errors=True)
    return scored, skipped


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
    world_size: WorldSizeOpt = 1,
) -> None:
    """Features of an endpoint per video (resumable: videos already written are skipped)."""
    from i3d.backends import BackendError

    with fail_on_errors(*ERRORS, BackendError):
        paths = expand_inputs(inputs)
        sharded = _sharded(world_size)
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
        f"{_videos(len(todo) - len(failed))} written to {output} "
        f"({len(paths) - len(todo)} already there)",
        highlight=False,
    )
    if failed:
        err_console.print(f"[red]{_videos(len(failed))} failed:[/red]")
        for path, error in failed:
            _print_failure(path, error)
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
                        model, pipeline, views, endpoint, pool, batch_size, on_views
                    )
                    store.add(path, feats.to(device="cpu", dtype=torch.float32))
            except VIDEO_ERRORS as exc:
                failed.append((path, str(exc)))
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
    folder = _parts_folder(output)
    with _progress() as progress:
        on_progress = _sharded_progress(progress, "features", len(todo))
        results = _run_sharded(sharded_features, todo, spec, folder, world_size, on_progress)
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
    app.command()(predict)
    app.command()(evaluate)
    app.command()(features)
