"""Frozen attrs configs for the model families, and their JSON round trip.

A config fully determines an architecture: ``build_model(config)`` gives the same network
every time, and ``config_from_dict(config_to_dict(c)) == c`` so configs can travel inside
weight files.
"""

from __future__ import annotations

import functools
import json
import numbers
import typing
from collections.abc import Callable, Sequence
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
Pattern = tuple[int | tuple[int, ...], ...]
"""Per-stage flags: one 0/1 flag for every block of a stage, or a tuple with one per block."""


class ConfigError(ValueError):
    """A model config that cannot describe a valid network."""


def _show(value: Any) -> str:
    """``"abc" (str)``: a value and its type for one-line error messages."""
    text = json.dumps(value) if isinstance(value, str) else repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    kind = type(value)
    name = kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"
    return f"{text} ({name})"


def _is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes, bytearray))


def _as_int(value: Any, where: str) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    raise ConfigError(f"{where} must be an int, got {_show(value)}")


def _as_float(value: Any, where: str) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise ConfigError(f"{where} must be a number, got {_show(value)}")


def _as_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{where} must be true or false, got {_show(value)}")


def _one_of(options: tuple[Any, ...], value: Any, where: str) -> Any:
    if any(type(value) is type(o) and value == o for o in options):
        return value
    listed = ", ".join(json.dumps(o) if isinstance(o, str) else repr(o) for o in options)
    raise ConfigError(f"{where} must be one of {listed}, got {_show(value)}")


def _instance_of(cls: type, value: Any, where: str) -> Any:
    if isinstance(value, cls):
        return value
    raise ConfigError(f"{where} must be an instance of {cls.__name__}, got {_show(value)}")


def _int_tuple(value: Any, where: str) -> tuple[int, ...]:
    if not _is_sequence(value):
        raise ConfigError(f"{where} must be a list of ints, got {_show(value)}")
    return tuple(_as_int(v, f"{where}[{i}]") for i, v in enumerate(value))


def _flag(value: Any, where: str) -> int:
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return int(value)
    raise ConfigError(f"{where} must be a 0/1 flag, got {_show(value)}")


def normalize_pattern(value: Any, where: str = "pattern") -> Pattern:
    """Normalise an mmaction per-stage pattern: an int per stage or a tuple per block.

    A stage whose blocks all share one flag becomes that int, so equal architectures have
    equal configs and a uniform pattern fits any depth. Anything but 0/1 flags is a
    :class:`ConfigError` naming ``where``.
    """
    if not _is_sequence(value):
        raise ConfigError(
            f"{where} must be a list with one entry per stage (a 0/1 flag, or a list of "
            f"per-block 0/1 flags), got {_show(value)}"
        )
    out: list[int | tuple[int, ...]] = []
    for i, stage in enumerate(value):
        if _is_sequence(stage):
            flags = tuple(_flag(b, f"{where}[{i}][{j}]") for j, b in enumerate(stage))
            out.append(flags[0] if len(set(flags)) == 1 else flags)
        elif isinstance(stage, numbers.Integral) and stage in (0, 1):
            out.append(int(stage))
        else:
            raise ConfigError(
                f"{where}[{i}] must be a 0/1 flag or a list of per-block 0/1 flags, "
                f"got {_show(stage)}"
            )
    return tuple(out)


_Check = Callable[[Any, str], Any]


def _check_for(hint: Any) -> _Check:
    """The strict check (and normalisation) of values annotated ``hint``."""
    if hint is bool:
        return _as_bool
    if hint is int:
        return _as_int
    if hint is float:
        return _as_float
    if typing.get_origin(hint) is Literal:
        return functools.partial(_one_of, typing.get_args(hint))
    if isinstance(hint, type) and attrs.has(hint):
        return functools.partial(_instance_of, hint)
    if hint == tuple[int, ...]:
        return _int_tuple
    if hint == Pattern:
        return normalize_pattern
    raise TypeError(f"no config value check for the annotation {hint!r}")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotation of every field of attrs class ``cls`` (read once per class)."""
    return typing.get_type_hints(cls)


@functools.cache
def _field_checks(cls: type) -> dict[str, _Check]:
    """Per field of attrs class ``cls``, the check of its annotated type."""
    return {name: _check_for(hint) for name, hint in field_types(cls).items()}


def check_field_value(cls: type, name: str, value: Any) -> Any:
    """``value`` as field ``name`` of config class ``cls`` stores it; ConfigError if mistyped.

    ints must be ints (numpy integers too, never bools), floats ints or floats, bools bools,
    ``Literal`` fields one of their values, nested configs instances of their class, tuples
    sequences of ints and patterns sequences of 0/1 flags.
    """
    return _field_checks(cls)[name](value, f"{cls.__name__}.{name}")


def check_fields(config: Any) -> None:
    """Raise ConfigError unless every field of a config holds its annotated type.

    Called first in ``__attrs_post_init__``; numpy numbers (and ints in float fields) are
    stored as Python numbers so configs compare, hash and serialise alike.
    """
    cls = type(config)
    for field in attrs.fields(cls):
        if field.converter is None:  # converted fields were checked by their converter
            value = check_field_value(cls, field.name, getattr(config, field.name))
            object.__setattr__(config, field.name, value)


def _convert_field(value: Any, config: Any, field: attrs.Attribute) -> Any:
    return check_field_value(type(config), field.name, value)


_STRICT = attrs.Converter(_convert_field, takes_self=True, takes_field=True)
"""attrs converter of tuple fields: the field's strict check, with errors naming the field."""


@attrs.frozen
class HeadConfig:
    """mmaction2 ``I3DHead``: spatio-temporal average pool, dropout, linear classifier."""

    num_classes: int = 400
    dropout: float = 0.5
    init_std: float = 0.01
    spatial_pool: bool = True
    average_clips: AverageClips = "prob"

    def __attrs_post_init__(self) -> None:
        check_fields(self)
        if self.num_classes < 1:
            raise ConfigError(f"head.num_classes must be >= 1, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"head.dropout must be in [0, 1), got {self.dropout}")


@attrs.frozen
class ResNet3dConfig:
    """mmaction2 ``ResNet3d`` backbone + ``I3DHead``, with the I3D-R50 K400 values as defaults.

    ``inflate`` and ``non_local`` hold, per stage, either one flag for every block or a tuple
    with one flag per block, exactly like mmaction's kwargs of the same names.

    The stem's max pool is ``(pool1_kernel_t, 3, 3)`` with stride ``(pool1_stride_t,
    pool1_stride_s, pool1_stride_s)`` and padding ``pool1_padding`` (t, h, w); the defaults,
    kernel (1, 3, 3) and padding (0, 1, 1), are mmaction's. Tushar-N/pytorch-resnet3d (Facebook's
    video-nonlocal-net) pools (2, 3, 3) with no padding: ``pool1_kernel_t=2,
    pool1_padding=(0, 0, 0)``. The pool has no parameters, so state dicts are the same.
    """

    arch: Literal["resnet3d"] = "resnet3d"
    depth: int = 50
    base_channels: int = 64
    in_channels: int = 3
    num_stages: int = 4
    conv1_kernel: tuple[int, ...] = attrs.field(default=(5, 7, 7), converter=_STRICT)
    conv1_stride_s: int = 2
    conv1_stride_t: int = 2
    pool1_stride_s: int = 2
    pool1_stride_t: int = 2
    pool1_kernel_t: int = 1
    pool1_padding: tuple[int, ...] = attrs.field(default=(0, 1, 1), converter=_STRICT)
    with_pool1: bool = True
    with_pool2: bool = True
    style: Literal["pytorch", "caffe"] = "pytorch"
    spatial_strides: tuple[int, ...] = attrs.field(default=(1, 2, 2, 2), converter=_STRICT)
    temporal_strides: tuple[int, ...] = attrs.field(default=(1, 1, 1, 1), converter=_STRICT)
    dilations: tuple[int, ...] = attrs.field(default=(1, 1, 1, 1), converter=_STRICT)
    inflate: Pattern = attrs.field(
        default=((1, 1, 1), (1, 0, 1, 0), (1, 0, 1, 0, 1, 0), (0, 1, 0)),
        converter=_STRICT,
    )
    inflate_style: Literal["3x1x1", "3x3x3"] = "3x1x1"
    non_local: Pattern = attrs.field(default=(0, 0, 0, 0), converter=_STRICT)
    non_local_mode: NonLocalMode = "embedded_gaussian"
    non_local_sub_sample: bool = True
    non_local_use_scale: bool = False
    frozen_stages: int = -1
    norm_eval: bool = False
    zero_init_residual: bool = False
    head: HeadConfig = attrs.field(factory=HeadConfig)

    def __attrs_post_init__(self) -> None:
        check_fields(self)
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
        self._check_pool1()
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
        if not -1 <= self.frozen_stages <= self.num_stages:
            raise ConfigError(
                f"frozen_stages must be -1..{self.num_stages}, got {self.frozen_stages}"
            )

    def _check_pool1(self) -> None:
        """The stem pool's kernel and padding: positive kernel, padding at most half of it."""
        for name in ("pool1_stride_t", "pool1_stride_s", "pool1_kernel_t"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if len(self.pool1_padding) != 3:
            raise ConfigError(
                f"pool1_padding must have 3 entries (t, h, w), got {list(self.pool1_padding)}"
            )
        kernel = (self.pool1_kernel_t, 3, 3)
        for axis, pad, size in zip("thw", self.pool1_padding, kernel, strict=True):
            if not 0 <= pad <= size // 2:
                raise ConfigError(
                    f"pool1_padding {list(self.pool1_padding)}: the {axis} padding must be "
                    f"0..{size // 2} (at most half the pool kernel, {size}), got {pad}"
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
