"""``i3d convert-weights``, ``i3d inspect``, ``i3d models``.

Converters are looked up in :data:`i3d.weights.convert.CONVERTERS`; add formats there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from i3d.cli.common import fail_on_errors
from i3d.models import build_model, get_preset, preset_names
from i3d.models.config import config_to_dict
from i3d.models.presets import PRESET_DESCRIPTIONS
from i3d.weights.format import parameter_count, read_info
from i3d.weights.labels import read_labels
from i3d.weights.stats import count_flops, count_parameters

console = Console(soft_wrap=True)  # log lines stay whole when redirected


def convert_weights(
    src: Annotated[Path, typer.Argument(help="Checkpoint to convert (.pth/.pt/.ckpt).")],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Output file (default: SRC.safetensors).")
    ] = None,
    source_format: Annotated[
        str, typer.Option("--from", help="Source format (auto-detected by default).")
    ] = "auto",
    preset: Annotated[
        str | None, typer.Option(help="Force a model preset instead of inferring the architecture.")
    ] = None,
    labels: Annotated[
        Path | None, typer.Option(help="Class names, one per line, in model order.")
    ] = None,
) -> None:
    """Convert a checkpoint (mmaction2, DeepMind, pytorch-i3d, pytorch-resnet3d, 2D ResNet)
    to .safetensors."""
    from i3d.weights.convert import convert

    dst = output or src.with_suffix(".safetensors")
    with fail_on_errors():
        label_list = read_labels(labels) if labels is not None else None
        result = convert(src, dst, source_format=source_format, preset=preset, labels=label_list)
        path, report = result if isinstance(result, tuple) else (result, None)
        info = read_info(path)
    console.print(f"[green]wrote[/green] {path}  ({_describe(info.config)})")
    if report is not None:
        console.print(str(report))


def _describe(config: Any) -> str:
    model = build_model(config)
    return (
        f"{config.arch}, {count_parameters(model):,} parameters, {config.head.num_classes} classes"
    )


def inspect(
    path: Annotated[Path, typer.Argument(help="A project .safetensors weight file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show a weight file's config, parameter count, labels, preprocessing and provenance."""
    import attrs

    with fail_on_errors():
        info = read_info(path)
        params = parameter_count(info.config)  # meta device: a hostile config allocates nothing
    data = {
        "path": str(path),
        "config": config_to_dict(info.config),
        "parameters": params,
        "num_classes": info.config.head.num_classes,
        "labels": list(info.labels) if info.labels is not None else None,
        "preprocessing": info.preprocessing.to_dict(),
        "provenance": attrs.asdict(info.provenance),
    }
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table(title=str(path), show_header=False)
    table.add_row("architecture", info.config.arch)
    table.add_row("parameters", f"{params:,}")
    table.add_row("classes", str(info.config.head.num_classes))
    if info.labels:
        shown = ", ".join(info.labels[:5]) + (", ..." if len(info.labels) > 5 else "")
        table.add_row("labels", shown)
    else:
        table.add_row("labels", "(none)")
    table.add_row("config", json.dumps(data["config"]))
    table.add_row("preprocessing", json.dumps(data["preprocessing"]))
    table.add_row("provenance", json.dumps(data["provenance"]))
    console.print(table)


def models(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    flops: Annotated[
        bool,
        typer.Option(
            help="Count GFLOPs at the default input (a multiply-add counts 2); --no-flops is "
            "faster."
        ),
    ] = True,
) -> None:
    """List the named model presets with parameter counts and GFLOPs at their default input.

    GFLOPs count a multiply-add as 2 FLOPs (torch's FlopCounterMode), so they are twice the
    "GMACs" some papers report.
    """
    rows = []
    for name in preset_names():
        config = get_preset(name)
        model = build_model(config)
        shapes = default_input_shapes(config)
        rows.append(
            {
                "name": name,
                "architecture": config.arch,
                "parameters": count_parameters(model),
                "input": [list(shape) for shape in shapes],
                "gflops": round(count_flops(model, shapes) / 1e9, 1) if flops else None,
                "description": PRESET_DESCRIPTIONS.get(name, ""),
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="model presets")
    gflops = "GFLOPs (multiply-add = 2)"
    for column in ("name", "parameters", gflops, "input (N,C,T,H,W)", "description"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["name"],
            f"{row['parameters'] / 1e6:.2f} M",
            "-" if row["gflops"] is None else f"{row['gflops']:.1f}",
            " + ".join("x".join(str(s) for s in shape) for shape in row["input"]),
            row["description"],
        )
    console.print(table)


def default_input_shapes(config: Any) -> list[tuple[int, ...]]:
    """The single-clip input(s) a preset is normally run on (N=1): 32×224² or 64×224²."""
    if config.arch == "resnet3d":
        return [(1, config.in_channels, 32, 224, 224)]
    if config.arch == "two_stream":
        return [(1, s.in_channels, 64, 224, 224) for s in (config.rgb, config.flow)]
    return [(1, config.in_channels, 64, 224, 224)]


def register(app: typer.Typer) -> None:
    app.command("convert-weights")(convert_weights)
    app.command("inspect")(inspect)
    app.command("models")(models)
