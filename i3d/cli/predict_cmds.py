"""``i3d predict`` and ``i3d evaluate``: thin typer layers over i3d.inference."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Column, Table

from i3d.cli.backend_cmds import parse_options
from i3d.cli.common import err_console, fail_on_errors
from i3d.cli.predict_csv import PredictionTable
from i3d.cli.video_common import (
    ERRORS,
    BackendOpt,
    BackendOptionOpt,
    BatchOpt,
    ClipLenOpt,
    ClipsOpt,
    CropsOpt,
    DeviceOpt,
    FlowDirOpt,
    FlowImplOpt,
    LogDirOpt,
    PrecisionOpt,
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
    print_failure,
    run_sharded_job,
    view_progress,
)
from i3d.data.datasets import Sample
from i3d.flow.recipe import check_flow
from i3d.inference.evaluation import (
    Scored,
    evaluate_samples,
    evaluation_samples,
    plot_confusion,
    read_predictions,
    summarize,
    write_per_class,
    write_predictions,
)
from i3d.inference.inputs import InputError, default_weights, expand_inputs
from i3d.inference.predictor import Prediction, Predictor
from i3d.inference.sharded import PredictSpec, sharded_scores
from i3d.utils.files import atomic_path, ensure_dir
from i3d.weights.format import read_info
from i3d.weights.labels import read_labels

console = Console(soft_wrap=True)  # log lines stay whole when redirected


def _echo_line(progress: Progress, line: str) -> None:
    """``line`` on stdout while ``progress`` draws on stderr. When both are one terminal, the
    progress prints it above its bar: written straight to stdout, it followed the bar's text
    on the bar's line. Otherwise (stdout redirected) stdout gets exactly the line."""
    live = progress.live.is_started and progress.console.is_terminal
    if live and _same_terminal(sys.stdout, progress.console.file):
        progress.console.print(line, markup=False, highlight=False, emoji=False)
    else:
        typer.echo(line)


def _same_terminal(*files: object) -> bool:
    """Whether open files are all one terminal device."""
    try:
        fds = [f.fileno() for f in files]  # type: ignore[attr-defined]
        ends = {(s.st_dev, s.st_ino) for s in map(os.fstat, fds)}
        return all(map(os.isatty, fds)) and len(ends) == 1
    except (AttributeError, OSError, ValueError):  # no file descriptor (a test's capture)
        return False


SAVE_SECONDS = 30.0  # least time between rewrites of a --csv file during a run (resume points)


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
    flow_impl: FlowImplOpt = "torch",
    flow_dir: FlowDirOpt = None,
    raft_weights: RaftWeightsOpt = None,
    world_size: WorldSizeOpt = 1,
    log_dir: LogDirOpt = None,
    precision: PrecisionOpt = "fp32",
    option: BackendOptionOpt = None,
) -> None:
    """Classify videos with the weights' own test protocol (views averaged as they say).

    Flow and two-stream weights read TV-L1 flow computed from the videos (DeepMind's
    recipe), or from --flow-dir; two-stream logits are summed before the softmax.
    """
    from i3d.backends import BackendError

    with fail_on_errors(*ERRORS, BackendError):
        if csv is not None and csv.is_dir():
            raise InputError(f"--csv {csv} is a folder; give a file path")
        if csv is not None and not (csv.parent if str(csv.parent) else Path(".")).is_dir():
            raise InputError(f"--csv {csv}: folder {csv.parent} does not exist; create it first")
        if resume and csv is None:
            raise InputError("--resume continues a --csv file; pass --csv OUT")
        check_log_dir(log_dir, world_size)
        paths = expand_inputs(inputs)
        spec = PredictSpec(
            str(weights or default_weights()), clips, crops, clip_len, batch_size, backend,
            device, workers, flow_impl, str(flow_dir) if flow_dir is not None else None,
            precision, tuple(parse_options(option).items()),
            raft_weights=str(raft_weights) if raft_weights is not None else None,
        )  # fmt: skip
        check_flow(spec.flow_config(spec.device))
        predictor = _launcher_predictor(spec, is_sharded(world_size))
        if predictor.num_classes is not None:
            top_k = min(top_k, predictor.num_classes)
        table = PredictionTable(top_k, all_scores, predictor.labels, predictor.num_classes)
        resuming = resume and csv is not None and csv.exists()
        if resuming:
            table.load(csv)
        done = table.done()
        todo = [p for p in paths if str(p) not in done]
        if len(todo) < len(paths):
            skipped = count_videos(len(paths) - len(todo))
            err_console.print(f"{skipped} already in {csv} (--resume), skipped", highlight=False)
        # saving before the end loses nothing when the file's old rows are kept or it is new
        early = csv if csv is not None and (resuming or not csv.exists()) else None
        order = [str(p) for p in paths]
        results: list[Prediction] = []
        try:
            with new_progress() as progress:
                task = None
                if is_sharded(world_size):
                    stream = _sharded_predictions(
                        todo, spec, predictor.labels, csv, world_size, progress, log_dir
                    )
                    if stream is None:  # a torchrun rank other than 0: rank 0 reports
                        return
                else:
                    task = progress.add_task("predicting", total=len(todo), visible=len(todo) > 1)
                    on_views = view_progress(progress, todo[0].name) if len(todo) == 1 else None
                    assert isinstance(predictor, Predictor)
                    stream = predictor.predict_many(todo, workers, on_views)
                saved = time.monotonic()
                for result in stream:
                    results.append(result)
                    table.add(result)
                    if as_json:
                        _echo_line(progress, json.dumps(result.to_json(top_k, all_scores)))
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
                f"interrupted: {count_videos(len(results))} saved in {early}; run the same command "
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
            print_failure(r.path, r.error)
        raise typer.Exit(1)


def _launcher_predictor(spec: PredictSpec, sharded: bool) -> Predictor | _ModelInfo:
    """The predictor, or for a sharded run of .safetensors weights just their labels (the
    ranks load the model; the launching process need not hold one too)."""
    if sharded and spec.weights.endswith(".safetensors"):
        info = read_info(Path(spec.weights))
        return _ModelInfo(info.labels, info.config.head.num_classes)
    return Predictor(
        spec.weights, spec.clips, spec.crops, spec.batch_size, spec.backend, spec.device,
        spec.clip_len, spec.backend_options(), flow=spec.flow_config(spec.device),
        flow_dir=spec.flow_dir,
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
    log_dir: Path | None,
) -> list[Prediction] | None:
    """Predictions of ``todo`` in order from N ranks (None on torchrun ranks other than 0).

    Per-video results wait in ``OUT.parts/`` beside the --csv file, so an interrupted run
    resumes; without --csv they go to a temporary folder, removed whatever happens.
    """
    if not todo:
        return []
    folder = parts_folder(output)
    try:
        on_progress = job_progress(progress, "predicting", len(todo))
        scores = run_sharded_job(
            sharded_scores, todo, spec, folder, world_size, on_progress, log_dir
        )
    finally:
        if output is None:
            shutil.rmtree(folder, ignore_errors=True)
    if scores is None:
        return None
    shutil.rmtree(folder, ignore_errors=True)  # merged: the outputs have it all now
    return [
        Prediction(path, o.value, labels, error=o.error, warnings=o.warnings)
        for path, o in zip(todo, scores, strict=True)
    ]


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
    flow_impl: FlowImplOpt = "torch",
    flow_dir: FlowDirOpt = None,
    raft_weights: RaftWeightsOpt = None,
    world_size: WorldSizeOpt = 1,
    log_dir: LogDirOpt = None,
    precision: PrecisionOpt = "fp32",
    option: BackendOptionOpt = None,
) -> None:
    """Top-1/top-5/mean-class accuracy (mmaction definitions), per-class CSV, confusion PNG."""
    from i3d.backends import BackendError

    with fail_on_errors(*ERRORS, BackendError):
        if output_dir.exists() and not output_dir.is_dir():
            raise InputError(f"--output-dir {output_dir} is a file; give a folder")
        check_log_dir(log_dir, world_size)
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
                device, workers, flow_impl, str(flow_dir) if flow_dir is not None else None,
                precision, tuple(parse_options(option).items()),
                raft_weights=str(raft_weights) if raft_weights is not None else None,
            )  # fmt: skip
            check_flow(spec.flow_config(spec.device))
            predictor = _launcher_predictor(spec, is_sharded(world_size))
            list_labels = read_labels(label_file) if label_file is not None else None
            samples = evaluation_samples(
                annotations,
                data_root,
                predictor.labels,
                predictor.num_classes,
                list_labels,
                default_model=weights is None,
            )[:limit]
            if is_sharded(world_size):
                outcome = _sharded_evaluation(samples, spec, output_dir, world_size, log_dir)
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
            print_failure(path, error)


def _sharded_evaluation(
    samples: list[Sample],
    spec: PredictSpec,
    output_dir: Path,
    world_size: int,
    log_dir: Path | None,
) -> tuple[list[Scored], list[tuple[str, str]]] | None:
    """Scored samples and the unreadable ones from N ranks (None on torchrun ranks but 0);
    per-video results wait in ``OUTPUT_DIR.parts/`` until merged, for a rerun to resume."""
    folder = parts_folder(output_dir)
    paths = [Path(s.path) for s in samples]
    with new_progress() as progress:
        on_progress = job_progress(progress, "evaluating", len(paths))
        scores = run_sharded_job(
            sharded_scores, paths, spec, folder, world_size, on_progress, log_dir
        )
    if scores is None:
        return None
    scored = [
        Scored(str(sample.path), sample.label, o.value, o.warnings)
        for sample, o in zip(samples, scores, strict=True)
        if o.ok
    ]
    skipped = [
        (str(sample.path), str(o.error))
        for sample, o in zip(samples, scores, strict=True)
        if not o.ok
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
    with new_progress() as progress:
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


def register(app: typer.Typer) -> None:
    app.command()(predict)
    app.command()(evaluate)
