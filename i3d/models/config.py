"""Frozen attrs configs for the model families, and their JSON round trip.

A config fully determines an architecture: ``build_model(config)`` gives the same network
every time, and ``config_from_dict(config_to_dict(c)) == c`` so configs can travel inside
weight files.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

RESNET_STAGE_BLOCKS: dict[int, tuple[int, ...]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
NonLocalMode = Literal["dot_product", "embedded_gaussian", "gaussian"]
AverageClips = Literal["prob", "score"]


class ConfigError(ValueError):
    """A model config that cannot describe a valid network."""


def _int_tuple(value: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


def normalize_pattern(value: Any) -> tuple[int | tuple[int, ...], ...]:
    """Normalise an mmaction per-stage pattern: an int per stage or a tuple per block.

    A stage whose blocks all share one flag becomes that int, so equal architectures have
    equal configs and a uniform pattern fits any depth.
    """
    out: list[int | tuple[int, ...]] = []
    for stage in value:
        if isinstance(stage, (list, tuple)):
            flags = tuple(int(bool(int(b))) for b in stage)
            out.append(flags[0] if len(set(flags)) == 1 else flags)
        else:
            out.append(int(bool(int(stage))))
    return tuple(out)


@attrs.frozen
class HeadConfig:
    """mmaction2 ``I3DHead``: spatio-temporal average pool, dropout, linear classifier."""

    num_classes: int = attrs.field(default=400, converter=int)
    dropout: float = attrs.field(default=0.5, converter=float)
    init_std: float = attrs.field(default=0.01, converter=float)
    spatial_pool: bool = True
    average_clips: AverageClips = "prob"

    def __attrs_post_init__(self) -> None:
        if self.num_classes < 1:
            raise ConfigError(f"head.num_classes must be >= 1, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"head.dropout must be in [0, 1), got {self.dropout}")
        if self.average_clips not in ("prob", "score"):
            raise ConfigError(
                f"head.average_clips must be 'prob' or 'score', got {self.average_clips!r}"
            )


@attrs.frozen
class ResNet3dConfig:
    """mmaction2 ``ResNet3d`` backbone + ``I3DHead``, with the I3D-R50 K400 values as defaults.

    ``inflate`` and ``non_local`` hold, per stage, either one flag for every block or a tuple
    with one flag per block, exactly like mmaction's kwargs of the same names.
    """

    arch: Literal["resnet3d"] = "resnet3d"
    depth: int = 50
    base_channels: int = 64
    in_channels: int = 3
    num_stages: int = 4
    conv1_kernel: tuple[int, ...] = attrs.field(default=(5, 7, 7), converter=_int_tuple)
    conv1_stride_s: int = 2
    conv1_stride_t: int = 2
    pool1_stride_s: int = 2
    pool1_stride_t: int = 2
    with_pool1: bool = True
    with_pool2: bool = True
    style: Literal["pytorch", "caffe"] = "pytorch"
    spatial_strides: tuple[int, ...] = attrs.field(default=(1, 2, 2, 2), converter=_int_tuple)
    temporal_strides: tuple[int, ...] = attrs.field(default=(1, 1, 1, 1), converter=_int_tuple)
    dilations: tuple[int, ...] = attrs.field(default=(1, 1, 1, 1), converter=_int_tuple)
    inflate: tuple[int | tuple[int, ...], ...] = attrs.field(
        default=((1, 1, 1), (1, 0, 1, 0), (1, 0, 1, 0, 1, 0), (0, 1, 0)),
        converter=normalize_pattern,
    )
    inflate_style: Literal["3x1x1", "3x3x3"] = "3x1x1"
    non_local: tuple[int | tuple[int, ...], ...] = attrs.field(
        default=(0, 0, 0, 0), converter=normalize_pattern
    )
    non_local_mode: NonLocalMode = "embedded_gaussian"
    non_local_sub_sample: bool = True
    non_local_use_scale: bool = False
    frozen_stages: int = -1
    norm_eval: bool = False
    zero_init_residual: bool = False
    head: HeadConfig = attrs.field(factory=HeadConfig)

    def __attrs_post_init__(self) -> None:
        if self.depth not in RESNET_STAGE_BLOCKS:
            raise ConfigError(
                f"depth must be one of {sorted(RESNET_STAGE_BLOCKS)}, got {self.depth}"
            )
        if not 1 <= self.num_stages <= 4:
            raise ConfigError(f"num_stages must be 1..4, got {self.num_stages}")
        if self.base_channels < 1 or self.in_channels < 1:
            raise ConfigError("base_channels and in_channels must be positive")
        if len(self.conv1_kernel) != 3:
            raise ConfigError(
                f"conv1_kernel must have 3 entries (t, h, w), got {self.conv1_kernel}"
            )
        for name in ("spatial_strides", "temporal_strides", "dilations", "inflate", "non_local"):
            if len(getattr(self, name)) < self.num_stages:
                raise ConfigError(
                    f"{name} has {len(getattr(self, name))} entries, need one per stage "
                    f"({self.num_stages})"
                )
        for name in ("inflate", "non_local"):
            for i, (stage, blocks) in enumerate(
                zip(getattr(self, name), self.stage_blocks, strict=False)
            ):
                if isinstance(stage, tuple) and len(stage) != blocks:
                    raise ConfigError(
                        f"{name}[{i}] has {len(stage)} flags but stage {i + 1} of a depth-"
                        f"{self.depth} ResNet has {blocks} blocks"
                    )
        if self.inflate_style not in ("3x1x1", "3x3x3"):
            raise ConfigError(
                f"inflate_style must be '3x1x1' or '3x3x3', got {self.inflate_style!r}"
            )
        if self.non_local_mode not in ("dot_product", "embedded_gaussian", "gaussian"):
            raise ConfigError(
                "non_local_mode must be 'dot_product', 'embedded_gaussian' or 'gaussian', "
                f"got {self.non_local_mode!r}"
            )
        if self.style not in ("pytorch", "caffe"):
            raise ConfigError(f"style must be 'pytorch' or 'caffe', got {self.style!r}")
        if not -1 <= self.frozen_stages <= self.num_stages:
            raise ConfigError(
                f"frozen_stages must be -1..{self.num_stages}, got {self.frozen_stages}"
            )

    @property
    def block_type(self) -> Literal["basic", "bottleneck"]:
        return "basic" if self.depth < 50 else "bottleneck"

    @property
    def expansion(self) -> int:
        return 1 if self.depth < 50 else 4

    @property
    def stage_blocks(self) -> tuple[int, ...]:
        return RESNET_STAGE_BLOCKS[self.depth][: self.num_stages]

    @property
    def feature_channels(self) -> int:
        """Channels of the backbone output (the head's ``in_channels``)."""
        return self.base_channels * 2 ** (self.num_stages - 1) * self.expansion

    def block_flags(
        self, name: Literal["inflate", "non_local"], as_int: bool = False
    ) -> tuple[tuple[Any, ...], ...]:
        """Per-stage, per-block flags of ``inflate`` or ``non_local`` (ints broadcast)."""
        pattern = getattr(self, name)
        kind = int if as_int else bool
        out = []
        for stage, blocks in zip(pattern, self.stage_blocks, strict=False):
            flags = stage if isinstance(stage, tuple) else (stage,) * blocks
            out.append(tuple(kind(f) for f in flags))
        return tuple(out)


def _tuples_to_lists(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_tuples_to_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _tuples_to_lists(v) for k, v in value.items()}
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of a model config (tuples become lists)."""
    return _tuples_to_lists(attrs.asdict(config, recurse=True))


def _config_classes() -> dict[str, type]:
    from i3d.models.inception import InceptionI3dConfig, TwoStreamConfig

    return {
        "resnet3d": ResNet3dConfig,
        "inception_i3d": InceptionI3dConfig,
        "two_stream": TwoStreamConfig,
    }


def config_from_dict(data: dict[str, Any]) -> Any:
    """Rebuild a config from :func:`config_to_dict` output; unknown keys are an error."""
    if not isinstance(data, dict) or "arch" not in data:
        raise ConfigError("model config must be a JSON object with an 'arch' field")
    classes = _config_classes()
    cls = classes.get(data["arch"])
    if cls is None:
        raise ConfigError(f"unknown architecture {data['arch']!r}; known: {sorted(classes)}")
    return structure(cls, data)


def structure(cls: type, data: dict[str, Any]) -> Any:
    """Build attrs class ``cls`` from a plain dict, recursing into nested attrs fields."""
    fields = {f.name: f for f in attrs.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown config keys {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        default = fields[name].default
        nested = type(default.factory()) if isinstance(default, attrs.Factory) else None
        if nested is not None and attrs.has(nested) and isinstance(value, dict):
            value = structure(nested, value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{cls.__name__}: invalid config: {exc}") from exc
