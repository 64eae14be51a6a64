"""Named model presets: the six mmaction2 Kinetics-400 I3D configs (and more from other modules)."""

from __future__ import annotations

from typing import Any

import attrs

from i3d.models.config import ResNet3dConfig

_NL_PATTERN = ((0, 0, 0), (0, 1, 0, 1), (0, 1, 0, 1, 0, 1), (0, 0, 0))

_RESNET_PRESETS: dict[str, ResNet3dConfig] = {
    "i3d_r50": ResNet3dConfig(),
    "i3d_r50_dense": ResNet3dConfig(),
    "i3d_r50_heavy": ResNet3dConfig(inflate=(1, 1, 1, 1), conv1_stride_t=1, pool1_stride_t=1),
    "i3d_r50_nl_dot_product": ResNet3dConfig(non_local=_NL_PATTERN, non_local_mode="dot_product"),
    "i3d_r50_nl_embedded_gaussian": ResNet3dConfig(
        non_local=_NL_PATTERN, non_local_mode="embedded_gaussian"
    ),
    "i3d_r50_nl_gaussian": ResNet3dConfig(non_local=_NL_PATTERN, non_local_mode="gaussian"),
}

PRESET_DESCRIPTIONS: dict[str, str] = {
    "i3d_r50": "mmaction2 I3D ResNet-50, 32x2x1, Kinetics-400",
    "i3d_r50_dense": "same network as i3d_r50 (dense sampling is a data-pipeline setting)",
    "i3d_r50_heavy": "every block inflated, no temporal stride in the stem",
    "i3d_r50_nl_dot_product": "I3D-R50 with 5 non-local blocks, dot-product",
    "i3d_r50_nl_embedded_gaussian": "I3D-R50 with 5 non-local blocks, embedded Gaussian",
    "i3d_r50_nl_gaussian": "I3D-R50 with 5 non-local blocks, Gaussian",
    "inception_i3d_rgb": "DeepMind Inception-v1 I3D, RGB stream, Kinetics-400",
    "inception_i3d_flow": "DeepMind Inception-v1 I3D, optical-flow stream (x, y), Kinetics-400",
    "inception_i3d_two_stream": "DeepMind Inception-v1 I3D, RGB + flow with summed logits",
}


def _all_presets() -> dict[str, Any]:
    from i3d.models.inception import InceptionI3dConfig, TwoStreamConfig

    presets: dict[str, Any] = dict(_RESNET_PRESETS)
    presets["inception_i3d_rgb"] = InceptionI3dConfig(in_channels=3)
    presets["inception_i3d_flow"] = InceptionI3dConfig(in_channels=2)
    presets["inception_i3d_two_stream"] = TwoStreamConfig()
    return presets


def preset_names() -> list[str]:
    """Names accepted by :func:`get_preset`."""
    return list(_all_presets())


def get_preset(name: str, **overrides: Any) -> Any:
    """Config of a named preset, with top-level fields replaced by ``overrides``.

    ``num_classes`` / ``dropout`` are forwarded to the head for convenience. A ``depth``
    override keeps one flag per stage of the preset's per-block ``inflate`` / ``non_local``
    patterns (a stage with any inflated block is inflated throughout), since per-block flags
    of one depth do not fit another; give the patterns explicitly to choose otherwise.
    """
    presets = _all_presets()
    if name not in presets:
        raise KeyError(f"unknown preset {name!r}; choose one of: {', '.join(presets)}")
    config = presets[name]
    if "depth" in overrides and overrides["depth"] != getattr(config, "depth", None):
        for field in ("inflate", "non_local"):
            if hasattr(config, field):
                per_stage = tuple(int(any(s)) for s in config.block_flags(field))
                overrides.setdefault(field, per_stage)
    head_keys = {k: overrides.pop(k) for k in ("num_classes", "dropout") if k in overrides}
    if head_keys:
        streams = [f.name for f in attrs.fields(type(config)) if f.name in ("rgb", "flow")]
        for stream in streams:  # two-stream: both streams share the class list
            sub = getattr(config, stream)
            overrides[stream] = attrs.evolve(sub, head=attrs.evolve(sub.head, **head_keys))
        if not streams:
            overrides["head"] = attrs.evolve(config.head, **head_keys)
    return attrs.evolve(config, **overrides) if overrides else config
