"""Training recipes: every knob of a run in one frozen, JSON-serialisable config.

Defaults reproduce mmaction2's I3D Kinetics-400 recipe (``i3d_imagenet-pretrained-r50_8xb8-
32x2x1-100e_kinetics400-rgb``): SGD(momentum 0.9, wd 1e-4), lr 0.01 per 64 clips, x0.1 at
epochs 40 and 80 of 100, grad-norm clip 40, dropout 0.5, 32x2x1 clips, short side 256,
MultiScaleCrop(scales 1, 0.8) to 224, flip 0.5; validation: one clip, centre 224.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import attrs

from i3d.models.config import ConfigError
from i3d.weights.preprocessing import DEEPMIND_K400, MMACTION_K400, Preprocessing


def _floats(value: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in value)


def _ints(value: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


def _overrides(value: Any) -> tuple[tuple[str, Any], ...]:
    items = value.items() if isinstance(value, dict) else value
    return tuple((str(k), _freeze(v)) for k, v in items)


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


@attrs.frozen
class TrainConfig:
    """One training run: data, model, optimisation, schedule, devices and bookkeeping."""

    # data
    train_list: str | None = None
    val_list: str | None = None
    data_root: str = ""
    labels: str | None = None
    normalisation: Literal["mmaction", "deepmind"] = "mmaction"
    clip_len: int = 32
    frame_interval: int = 2
    resize_short: int = 256
    input_size: int = 224
    crop_scales: tuple[float, ...] = attrs.field(default=(1.0, 0.8), converter=_floats)
    flip_ratio: float = 0.5
    workers: int = 2
    # model
    preset: str = "i3d_r50"
    init: str | None = None
    model_overrides: tuple[tuple[str, Any], ...] = attrs.field(default=(), converter=_overrides)
    dropout: float = 0.5
    freeze_stages: int = -1
    sync_bn: bool = False
    # optimisation
    epochs: int = 100
    batch_size: int = 8
    lr: float = 0.01
    base_batch_size: int = 64
    scale_lr: bool = True
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: Literal["step", "cosine"] = "step"
    milestones: tuple[int, ...] = attrs.field(default=(40, 80), converter=_ints)
    gamma: float = 0.1
    eta_min: float = 0.0
    warmup_epochs: float = 0.0
    warmup_ratio: float = 0.1
    grad_clip: float | None = 40.0
    amp: bool = False
    amp_dtype: Literal["auto", "fp16", "bf16"] = "auto"
    #: weights and clips in channels-last (NDHWC) memory: bf16 convolutions and pooling
    #: take their fast kernels (an Inception step on an AMX CPU: 1.9x)
    channels_last: bool = False
    # devices and bookkeeping
    backend: Literal["cpu", "cuda", "npu"] = "cpu"
    world_size: int = 1
    seed: int = 0
    deterministic: bool = False
    work_dir: str = "work_dirs/i3d_train"
    val_every: int = 5
    save_every: int = 5
    save_every_steps: int = 0
    keep_checkpoints: int = 3
    log_every: int = 20
    resume: str | None = None
    timeout_s: float = 600.0

    def __attrs_post_init__(self) -> None:
        positive = ("epochs", "batch_size", "clip_len", "frame_interval", "resize_short")
        for name in (*positive, "input_size", "world_size", "val_every", "save_every"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.schedule not in ("step", "cosine"):
            raise ConfigError(f"schedule must be 'step' or 'cosine', got {self.schedule!r}")
        if self.backend not in ("cpu", "cuda", "npu"):
            raise ConfigError(f"backend must be cpu, cuda or npu, got {self.backend!r}")
        if self.normalisation not in ("mmaction", "deepmind"):
            raise ConfigError(
                f"normalisation must be 'mmaction' or 'deepmind', got {self.normalisation!r}"
            )
        if self.amp_dtype not in ("auto", "fp16", "bf16"):
            raise ConfigError(f"amp dtype must be auto, fp16 or bf16, got {self.amp_dtype!r}")
        if self.sync_bn and self.backend == "cpu":
            raise ConfigError(
                "sync-bn needs cuda or npu devices (SyncBatchNorm has no cpu kernels); "
                "drop --sync-bn on cpu"
            )
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError("grad-clip must be positive (omit it to disable clipping)")
        if self.workers < 0 or self.save_every_steps < 0 or self.warmup_epochs < 0:
            raise ConfigError("workers, save-every-steps and warmup-epochs must not be negative")
        if not 0.0 <= self.flip_ratio <= 1.0:
            raise ConfigError(f"flip ratio must be in [0, 1], got {self.flip_ratio}")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def effective_lr(self) -> float:
        """mmaction ``auto_scale_lr``: lr × global batch / base batch, unless scaling is off."""
        return self.lr * self.global_batch / self.base_batch_size if self.scale_lr else self.lr

    def preprocessing(self, base: Preprocessing | None = None) -> Preprocessing:
        """Input protocol of this run (normalisation from ``base`` when fine-tuning)."""
        if base is None:
            base = MMACTION_K400 if self.normalisation == "mmaction" else DEEPMIND_K400
        return attrs.evolve(
            base,
            clip_len=self.clip_len,
            frame_interval=self.frame_interval,
            num_clips=1,
            num_crops=1,
            sampling="uniform",
            resize_short=self.resize_short,
            crop_size=self.input_size,
            input_size=self.input_size,
        )

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        data = json.loads(text)
        unknown = set(data) - {f.name for f in attrs.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown training config keys {sorted(unknown)}")
        return cls(**data)


RECIPES: dict[str, TrainConfig] = {
    "mmaction_i3d_r50": TrainConfig(),
    # Carreira & Zisserman 2017: SGD momentum 0.9, lr 0.1 dropped x10 on plateaus (here at
    # fixed epochs), 64-frame clips at 25 fps, short side 256, random 224 crop, flip, [-1, 1].
    "deepmind_inception": TrainConfig(
        preset="inception_i3d_rgb",
        normalisation="deepmind",
        clip_len=64,
        frame_interval=1,
        crop_scales=(1.0,),
        lr=0.1,
        grad_clip=None,
        epochs=40,
        milestones=(20, 32),
    ),
}


def get_recipe(name: str, **overrides: Any) -> TrainConfig:
    """A named recipe with fields replaced by ``overrides`` (``None`` values are ignored)."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    fields = {f.name for f in attrs.fields(TrainConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ConfigError(f"unknown training options {sorted(unknown)}")
    return attrs.evolve(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})
