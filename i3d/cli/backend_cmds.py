"""``i3d backends``, ``i3d export``, ``i3d bench``: list, compile for and time backends."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TimeElapsedColumn
from rich.table import Table

from i3d.backends.base import BackendError
from i3d.backends.bench import DEFAULT_SIZE
from i3d.cli.common import err_console, fail_on_errors
from i3d.export import ExportError
from i3d.utils.files import refuse_overwriting
from i3d.weights.format import read_info

console = Console(soft_wrap=True)  # log lines stay whole when redirected


def parse_options(pairs: list[str] | None) -> dict[str, str]:
    """``["key=value", ...]`` → dict; values stay strings (backends parse their own)."""
    options: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BackendError(f"--option expects key=value, got {pair!r}")
        options[key.strip().replace("-", "_")] = value.strip()
    return options


def _source(weights: Path | None, preset: str | None, required: bool = False) -> Any:
    """The weight file, or a randomly initialised preset model (for export and timing only).

    With neither given, ``required`` makes it an error; otherwise i3d_r50 is used.
    """
    if weights is not None and preset is not None:
        raise BackendError("pass --weights or --preset, not both")
    if weights is not None:
        return weights
    if preset is None and required:
        raise BackendError(
            "nothing to export: pass --weights FILE.safetensors, or --preset NAME for a "
            "preset with random weights (see `i3d models`)"
        )
    from i3d.models import build_model, get_preset

    name = preset or "i3d_r50"
    err_console.print(
        f"note: preset {name} with random weights (fine for timing and export checks)"
    )
    return build_model(get_preset(name)).eval()


def backends() -> None:
    """List installed backends: availability, runtime version, and how to install missing ones."""
    from i3d.backends import get_backend, list_backends

    table = Table("backend", "available", "version", "details / install hint")
    with fail_on_errors(BackendError):
        for name in list_backends():
            try:
                info = get_backend(name).is_available()
            except BackendError as exc:
                table.add_row(name, "[red]broken[/red]", "-", escape(str(exc)))
                continue
            mark = "[green]yes[/green]" if info.ok else "[red]no[/red]"
            detail = info.reason if info.ok else f"{info.reason}; {info.install_hint}"
            table.add_row(name, mark, escape(info.version or "-"), escape(detail))
    console.print(table)


def export(
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .onnx or .om file.")],
    fmt: Annotated[str, typer.Option("--format", help="onnx or om.")] = "onnx",
    weights: Annotated[Path | None, typer.Option(help="Weights (.safetensors).")] = None,
    preset: Annotated[str | None, typer.Option(help="Preset with random weights.")] = None,
    clip_len: Annotated[
        int | None,
        typer.Option(min=1, help="Frames per clip T (default: the weights' clip length, else 32)."),
    ] = None,
    size: Annotated[
        int | None,
        typer.Option(
            min=1, help="Clip height and width (default: the weights' test crop, else 224)."
        ),
    ] = None,
    views: Annotated[
        int | None, typer.Option(help="Views per sample: input (B, V, C, T, H, W).")
    ] = None,
    batch: Annotated[str, typer.Option(help="Batch size N, or 'dynamic' (onnx only).")] = "1",
    opset: Annotated[
        int, typer.Option(help="ONNX opset: 17 or 18; --format om also takes 11 to 16.")
    ] = 18,
    simplify: Annotated[
        bool | None,
        typer.Option(
            "--simplify/--no-simplify",
            help="Run onnxsim on the graph (default: off for onnx; for om, on if installed).",
        ),
    ] = None,
    soc: Annotated[str, typer.Option(help="ATC --soc_version for --format om.")] = "Ascend310P3",
    precision: Annotated[
        str,
        typer.Option(help="--format om: fp32, fp16 (ATC's own default) or mixed."),
    ] = "fp16",
    precision_v2: Annotated[
        bool,
        typer.Option(
            "--precision-mode-v2",
            help="--format om: pass ATC --precision_mode_v2 (CANN 8) instead of --precision_mode.",
        ),
    ] = False,
) -> None:
    """Export to ONNX (checked against torch with onnxruntime) or to an Ascend OM via ATC."""
    from i3d.export import export_om, export_onnx

    with fail_on_errors(BackendError, ExportError):
        batch_value: int | str = batch if batch == "dynamic" else _positive_int(batch, "--batch")
        if fmt not in {"onnx", "om"}:
            raise ExportError(f"--format must be onnx or om, got {fmt!r}")
        if fmt == "onnx" and (precision != "fp16" or precision_v2):
            raise ExportError(
                "--precision and --precision-mode-v2 set ATC's precision, so they need "
                "--format om; an ONNX export is always fp32"
            )
        if weights is not None:
            refuse_overwriting(output, weights)
        source = _source(weights, preset, required=True)
        prep = read_info(weights).preprocessing if weights is not None else None
        if clip_len is None:
            clip_len = prep.clip_len if prep is not None and prep.clip_len else 32
        if size is None:
            size = prep.crop_size if prep is not None else DEFAULT_SIZE
        if fmt == "om" and batch_value == "dynamic":
            raise ExportError("OM models need a static batch; pass --batch N")
        # bound to the stderr of now: the exporter swaps sys.stderr for a buffer while it
        # traces, and a console that looks it up per write would stop drawing the spinner
        status = Console(file=sys.stderr, soft_wrap=True)
        live = status.is_interactive  # else (redirected, TERM=dumb) one plain line per step
        with Progress(
            SpinnerColumn(),
            "[progress.description]{task.description}",
            TimeElapsedColumn(),
            console=status,
            transient=True,
            disable=not live,  # a disabled one also skips the blank line it ends files with
        ) as bar:
            task = bar.add_task(f"exporting {output.name}", total=None)

            def stage(what: str) -> None:
                bar.update(task, description=escape(what))
                if not live:
                    status.print(what, highlight=False, markup=False)

            shared: dict[str, Any] = dict(
                clip_len=clip_len, size=size, views=views, opset=opset, simplify=simplify
            )
            if fmt == "onnx":
                shared["simplify"] = bool(simplify)
                result = export_onnx(source, output, batch=batch_value, stage=stage, **shared)
            else:
                om = export_om(
                    source,
                    output,
                    soc,
                    batch=int(batch_value),
                    stage=stage,
                    precision=precision,
                    precision_v2=precision_v2,
                    **shared,
                )
                result = om.onnx
    console.print(
        f"[green]wrote[/green] {result.path}  input {result.input_shape}, opset {result.opset}; "
        f"onnxruntime vs torch: max abs diff {result.max_abs_diff:.3g} "
        f"(relative {result.rel_diff:.3g})"
    )
    if prep is not None and prep.clip_len is None:  # the time axis is fixed, the video is not
        console.print(
            f"every-frame weights: `i3d predict` with this file takes clips of {clip_len} "
            f"frames, as --clip-len {clip_len} does (10 per video unless --clips N)"
        )
    if fmt == "om":
        why = "the om backend reads the .om's labels and preprocessing from it"
        if om.replaced_onnx:
            console.print(f"[yellow]overwrote[/yellow] the existing {result.path} ({why})")
        else:
            console.print(f"{result.path} stays beside the .om ({why})")
        if om.om_path is not None:
            console.print(
                f"[green]wrote[/green] {om.om_path}  (atc, soc {soc}, precision {om.precision})"
            )
        else:
            console.print("atc is not on PATH; convert on a machine with CANN by running:")
            print(om.command_line)


def _positive_int(text: str, flag: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ExportError(f"{flag} must be a positive integer or 'dynamic', got {text!r}")
    return int(text)


def bench(
    backend: Annotated[str, typer.Option(help="Backend name (see `i3d backends`).")] = "torch",
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda:N, npu:N (backend default).")
    ] = None,
    precision: Annotated[str, typer.Option(help="fp32, tf32 (cuda), bf16 or fp16.")] = "fp32",
    batch_size: Annotated[
        int | None,
        typer.Option(help="Samples per call (default: a compiled model's batch, else 1)."),
    ] = None,
    clip_len: Annotated[
        int | None,
        typer.Option(
            help="Frames per clip T (default: a compiled model's, else the weights' clip "
            "length, else 32)."
        ),
    ] = None,
    size: Annotated[
        int | None,
        typer.Option(
            help="Clip height and width (default: a compiled model's, else the weights' test "
            "crop, else 224)."
        ),
    ] = None,
    weights: Annotated[
        Path | None, typer.Option(help="Weights (.safetensors) or a compiled .onnx/.om file.")
    ] = None,
    preset: Annotated[str | None, typer.Option(help="Preset with random weights.")] = None,
    iters: Annotated[int, typer.Option(help="Timed calls.")] = 10,
    warmup: Annotated[int, typer.Option(help="Untimed calls first.")] = 2,
    option: Annotated[
        list[str] | None,
        typer.Option("--option", "-O", help="Backend option key=value (repeatable)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Time one backend: clips/s, latency p50/p90/p99 and peak memory on random clips.

    A compiled .onnx/.om file sets the clip shape (and views, batch) unless options say
    otherwise; an option its static input cannot take is an error. Project weights give
    their test protocol's clip length and crop size, as for ``i3d export``.
    """
    import torch

    from i3d.backends import load_runner, require_backend
    from i3d.backends.bench import bench_input_shape, benchmark, compiled_input_shape

    with fail_on_errors(BackendError, ExportError):
        options = parse_options(option)
        given = [v for v in (batch_size, clip_len, size) if v is not None]
        if min([*given, iters]) < 1 or warmup < 0:
            raise BackendError("--batch-size, --clip-len, --size, --iters must be positive")
        require_backend(backend)
        if weights is not None and weights.suffix == ".safetensors":
            prep = read_info(weights).preprocessing
            clip_len = clip_len or prep.clip_len
            size = size or prep.crop_size
        runner = load_runner(
            _source(weights, preset), backend, device, precision, batch_size or 1, **options
        )
        compiled = compiled_input_shape(runner)
        shape = bench_input_shape(compiled, batch_size, clip_len, size, str(weights))
        x = torch.randn(shape)
        result = benchmark(runner, x, iters=iters, warmup=warmup)
    if as_json:
        print(json.dumps({**result.to_dict(), "options": options}))
        return
    table = Table("metric", "value", title=f"i3d bench: {result.backend}")
    rows = {
        "device": result.device,
        "precision": result.precision,
        "input": "x".join(map(str, result.input_shape)),
        "options": ", ".join(f"{k}={v}" for k, v in options.items()) or "-",
        "clips/s": f"{result.clips_per_s:.2f}",
        "latency p50 / p90 / p99": f"{result.latency_ms_p50:.1f} / {result.latency_ms_p90:.1f} / "
        f"{result.latency_ms_p99:.1f} ms",
        "peak memory": f"{result.peak_memory_mb:.0f} MiB ({result.memory_kind})",
    }
    for key, value in rows.items():
        table.add_row(key, value)
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("backends")(backends)
    app.command("export")(export)
    app.command("bench")(bench)
