"""``i3d train`` and ``i3d make-toy-dataset``."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Annotated, Any

import attrs
import typer
from rich.console import Console

from i3d.cli.common import err_console, fail_on_errors
from i3d.models.config import ConfigError, check_field_value, field_types

console = Console(soft_wrap=True)  # log lines stay whole when redirected

#: model config fields with their own ``i3d train`` option
_OPTION_OF = {"depth": "--depth", "base_channels": "--base-channels"}
#: model config fields ``i3d train`` sets itself, with the option that controls them
_SET_BY_TRAIN = {"frozen_stages": "--freeze-stages"}


def _parse_set(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` model overrides; VALUE is JSON (``inflate=[0,0,0,0]``) or a plain string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _merge_options(sets: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """``--set`` overrides plus dedicated options (None: not given); a key set both ways
    to different values is an error."""
    merged = dict(sets)
    for key, value in options.items():
        if value is None:
            continue
        if key in sets and sets[key] != value:
            raise ConfigError(
                f"--set {key}={json.dumps(sets[key])} conflicts with {_OPTION_OF[key]} {value}; "
                f"give {key} once"
            )
        merged[key] = value
    return merged


def _check_model_overrides(overrides: dict[str, Any], config_cls: type) -> None:
    """Reject ``--set`` keys that ``config_cls`` lacks and values of the wrong type, by name.

    Types are checked by the config class itself (what building the model would say), with
    the ``--set KEY=VALUE`` that gave the value in front.
    """
    types = field_types(config_cls)
    for key, value in overrides.items():
        if key in _SET_BY_TRAIN:
            raise ConfigError(f"--set {key}: use {_SET_BY_TRAIN[key]} instead")
        if key not in types:
            raise ConfigError(
                f"--set {key}: {config_cls.__name__} has no field {key!r}; its fields are "
                f"{', '.join(types)}"
            )
        if attrs.has(types[key]):
            raise ConfigError(f"--set {key}: {key} is a nested {types[key].__name__}, not a value")
        try:
            check_field_value(config_cls, key, value)
        except ConfigError as exc:
            raise ConfigError(f"--set {key}={json.dumps(value)}: {exc}") from None


def train_command(
    train_list: Annotated[Path, typer.Option(help="Training list (mmaction 'path label').")],
    val_list: Annotated[Path | None, typer.Option(help="Validation list.")] = None,
    data_root: Annotated[
        Path | None, typer.Option(help="Folder the list paths are relative to.")
    ] = None,
    labels: Annotated[Path | None, typer.Option(help="Class names, one per line.")] = None,
    recipe: Annotated[
        str, typer.Option(help="Base recipe: mmaction_i3d_r50 | deepmind_inception.")
    ] = "mmaction_i3d_r50",
    preset: Annotated[str | None, typer.Option(help="Model preset (see `i3d models`).")] = None,
    init: Annotated[
        Path | None,
        typer.Option(help="Start from these .safetensors weights (new class count: fresh head)."),
    ] = None,
    depth: Annotated[int | None, typer.Option(help="ResNet depth override (18/34/50/...).")] = None,
    base_channels: Annotated[int | None, typer.Option(help="Stem width override.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Model config override KEY=JSON (repeatable).")
    ] = None,
    clip_len: Annotated[int | None, typer.Option(help="Frames per clip.")] = None,
    frame_interval: Annotated[int | None, typer.Option(help="Frame stride inside a clip.")] = None,
    size: Annotated[
        int | None,
        typer.Option(help="Input crop size (short side: size × 8/7 unless --short-side)."),
    ] = None,
    short_side: Annotated[
        int | None, typer.Option(help="Resize the short side to this before cropping.")
    ] = None,
    flip_ratio: Annotated[float | None, typer.Option(help="Horizontal flip probability.")] = None,
    backend: Annotated[str, typer.Option(help="cpu | cuda | npu.")] = "cpu",
    world_size: Annotated[
        int, typer.Option(help="Local worker processes (ignored under torchrun).")
    ] = 1,
    epochs: Annotated[int | None, typer.Option(help="Epochs to train.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Clips per device per step.")] = None,
    lr: Annotated[
        float | None, typer.Option(help="Learning rate for 64 clips (scaled by global batch).")
    ] = None,
    no_scale_lr: Annotated[bool, typer.Option("--no-scale-lr", help="Use --lr as is.")] = False,
    schedule: Annotated[str | None, typer.Option(help="step | cosine.")] = None,
    milestones: Annotated[str | None, typer.Option(help="Step epochs, e.g. 40,80.")] = None,
    warmup_epochs: Annotated[
        float | None, typer.Option(help="Linear warm-up length in epochs.")
    ] = None,
    amp: Annotated[
        bool,
        typer.Option("--amp", help="Mixed precision (autocast; see --amp-dtype)."),
    ] = False,
    amp_dtype: Annotated[
        str,
        typer.Option(help="auto (fp16 + loss scaling on cuda/npu, bf16 on cpu) | fp16 | bf16."),
    ] = "auto",
    channels_last: Annotated[
        bool,
        typer.Option(
            "--channels-last",
            help="Channels-last (NDHWC) weights and clips: faster with --amp (bf16 on CPU).",
        ),
    ] = False,
    grad_clip: Annotated[float | None, typer.Option(help="Max grad norm (0 disables).")] = None,
    work_dir: Annotated[
        Path, typer.Option(help="Checkpoints, metrics, curves and exported weights.")
    ] = Path("work_dirs/i3d_train"),
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    deterministic: Annotated[
        bool, typer.Option("--deterministic", help="Deterministic algorithms only.")
    ] = False,
    val_every: Annotated[int | None, typer.Option(help="Validate every N epochs.")] = None,
    save_every: Annotated[int | None, typer.Option(help="Checkpoint every N epochs.")] = None,
    save_every_steps: Annotated[
        int, typer.Option(help="Also checkpoint every N steps (0: off).")
    ] = 0,
    log_every: Annotated[int | None, typer.Option(help="Metrics line every N steps.")] = None,
    resume: Annotated[
        str | None,
        typer.Option(help="'auto' (newest checkpoint in --work-dir) or a checkpoint path."),
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Data-loading processes per device.")] = None,
    sync_bn: Annotated[
        bool, typer.Option("--sync-bn", help="SyncBatchNorm across devices.")
    ] = False,
    freeze_stages: Annotated[
        int, typer.Option(help="Freeze the stem and the first N stages.")
    ] = -1,
    timeout: Annotated[
        float, typer.Option(help="Seconds before a stuck collective aborts the job.")
    ] = 600.0,
) -> None:
    """Train an I3D model (one process per device through torch.distributed)."""
    from i3d.data.datasets import AnnotationError
    from i3d.distributed import DistributedError
    from i3d.models import get_preset
    from i3d.train import TrainingError, TrainingInterrupted, get_recipe, train

    with fail_on_errors(TrainingError, DistributedError, AnnotationError, ValueError):
        sets = _parse_set(set_ or [])
        if init is None:  # an --init file fixes the architecture; the run rejects overrides
            preset_config = get_preset(preset or get_recipe(recipe).preset)
            _check_model_overrides(sets, type(preset_config))
        model = _merge_options(sets, {"depth": depth, "base_channels": base_channels})
        resize = short_side or (round(size * 8 / 7 / 2) * 2 if size else None)
        config = get_recipe(
            recipe,
            train_list=str(train_list),
            val_list=str(val_list) if val_list else None,
            data_root=str(data_root) if data_root else None,
            labels=str(labels) if labels else None,
            preset=preset,
            init=str(init) if init else None,
            model_overrides=model or None,
            clip_len=clip_len,
            frame_interval=frame_interval,
            input_size=size,
            resize_short=resize,
            flip_ratio=flip_ratio,
            backend=backend,
            world_size=world_size,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            scale_lr=False if no_scale_lr else None,
            schedule=schedule,
            milestones=[int(m) for m in milestones.split(",")] if milestones else None,
            warmup_epochs=warmup_epochs,
            amp=amp or None,
            amp_dtype=amp_dtype,
            channels_last=channels_last or None,
            work_dir=str(work_dir),
            seed=seed,
            deterministic=deterministic or None,
            val_every=val_every,
            save_every=save_every,
            save_every_steps=save_every_steps,
            log_every=log_every,
            resume=resume,
            workers=workers,
            sync_bn=sync_bn or None,
            freeze_stages=freeze_stages,
            timeout_s=timeout,
        )
        if grad_clip is not None:
            config = attrs.evolve(config, grad_clip=grad_clip or None)
        try:
            summary = train(config)
        except TrainingInterrupted as exc:
            if os.environ.get("RANK", "0") == "0":  # under torchrun, every rank stops alike
                err_console.print(f"[yellow]{exc}[/yellow]", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
    if summary["rank"] != 0:
        return
    best = summary["best_top1"]
    best_text = f"best val top-1 {best:.2%}, " if best is not None else ""
    console.print(
        f"[green]done[/green]: {summary['steps']} steps, {best_text}"
        f"weights {summary['last_weights']}"
    )


def make_toy_dataset_command(
    out: Annotated[
        Path,
        typer.Argument(help="Output folder: new, empty, or an earlier toy dataset to replace."),
    ],
    classes: Annotated[int, typer.Option(help="Number of classes (2..6).")] = 4,
    videos_per_class: Annotated[int, typer.Option(help="Training videos per class.")] = 40,
    val_per_class: Annotated[int, typer.Option(help="Validation videos per class.")] = 10,
    frames: Annotated[int, typer.Option(help="Frames per video.")] = 16,
    size: Annotated[int, typer.Option(help="Frame width and height (even).")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a toy motion dataset (videos + mmaction lists) that one frame cannot solve.

    An earlier toy dataset in OUT is replaced: old videos the new lists do not name are deleted.

    A non-empty OUT holding anything else is refused and left untouched.
    """
    from i3d.data.toy import ToySpec, make_toy_dataset

    with fail_on_errors(ValueError, OSError):
        spec = ToySpec(classes, videos_per_class, val_per_class, frames, size, seed=seed)
        paths = make_toy_dataset(out, spec)
    total = classes * (videos_per_class + val_per_class)
    console.print(f"[green]wrote[/green] {total} videos to {out}")
    console.print(
        "train a small model on it (the README's 600-video run takes about 80 s on 2 CPU cores):"
    )
    command = toy_train_command(paths, out, frames, size, classes * videos_per_class)
    console.print(command, soft_wrap=True, highlight=False)


def toy_train_command(
    paths: dict[str, Path], out: Path, frames: int, size: int, train_videos: int
) -> str:
    """The README's small toy run (ResNet3d-18 at width 8, whole clips, 7/8 crops, 12 epochs)
    for a toy dataset just written, ready to paste."""
    q = shlex.quote
    crop = max(8, size * 7 // 8)
    return (
        f"i3d train --train-list {q(str(paths['train']))} --val-list {q(str(paths['val']))} "
        f"--data-root {q(str(out))} --labels {q(str(paths['labels']))} --depth 18 "
        f"--base-channels 8 --clip-len {frames} --frame-interval 1 --size {crop} --epochs 12 "
        f"--batch-size {min(8, train_videos)} --lr 0.05 --no-scale-lr --schedule cosine "
        "--warmup-epochs 1 "
        f"--workers 2 --val-every 2 --work-dir {q(str(Path('work_dirs') / out.name))}"
    )


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("make-toy-dataset")(make_toy_dataset_command)
