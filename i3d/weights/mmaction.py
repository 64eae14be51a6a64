"""mmaction2 (0.x and 1.x) I3D checkpoints → the project's weight format.

The architecture is read from the checkpoint itself: depth and width from the key set and
conv shapes, inflation from temporal kernel sizes, non-local positions from their keys, the
non-local mode from the saved config text or file name, classes from the classifier.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import attrs
import torch

from i3d.models.config import RESNET_STAGE_BLOCKS, ConfigError, ResNet3dConfig, normalize_pattern
from i3d.models.presets import _RESNET_PRESETS, get_preset
from i3d.utils.files import sha256_file
from i3d.weights.format import (
    Provenance,
    WeightsError,
    WeightsInfo,
    check_state_dict,
    save_weights,
)
from i3d.weights.labels import default_labels
from i3d.weights.preprocessing import MMACTION_K400, Preprocessing
from i3d.weights.safe_pickle import load_checkpoint

_BLOCK_KEY = re.compile(r"^backbone\.layer(\d+)\.(\d+)\.")
# backbone kwargs that weights cannot reveal but a saved mmaction config text can
_CFG_INTS = ("conv1_stride_t", "pool1_stride_t", "conv1_stride_s", "pool1_stride_s")


def extract_state_dict(checkpoint: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model tensors of an mmaction checkpoint: ``state_dict`` entry or a bare dict.

    ``module.`` prefixes (DDP dumps) are stripped; ``meta``, ``optimizer``, ``message_hub``
    and other top-level entries are ignored.
    """
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"{source}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    sd = checkpoint
    for key in ("state_dict", "model", "module"):
        if isinstance(checkpoint.get(key), dict):
            sd = checkpoint[key]
            break
    tensors = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = str(key).removeprefix("module.")
        tensors[key] = value
    if not any(k.startswith(("backbone.", "cls_head.")) for k in tensors):
        raise WeightsError(
            f"{source} holds no mmaction model weights (no 'backbone.*' or 'cls_head.*' keys); "
            "is it an mmaction2 recognizer checkpoint?"
        )
    return {k: v for k, v in tensors.items() if not k.startswith("data_preprocessor.")}


def config_text(checkpoint: Any) -> str:
    """The mmaction config text saved in ``meta`` (1.x: ``cfg``, 0.x: ``config``), or ''."""
    meta = checkpoint.get("meta") if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict):
        return ""
    for key in ("cfg", "config"):
        if isinstance(meta.get(key), str):
            return meta[key]
    return ""


def _mode_hint(text: str, name: str) -> str | None:
    match = re.search(r"mode\s*=\s*['\"](dot_product|embedded_gaussian|gaussian)['\"]", text)
    if match:
        return match.group(1)
    flat = name.lower().replace("-", "_")
    for mode in ("embedded_gaussian", "dot_product", "gaussian"):
        if mode in flat:
            return mode
    return None


def infer_config(
    state_dict: dict[str, torch.Tensor], cfg_text: str = "", source_name: str = ""
) -> ResNet3dConfig:
    """Rebuild a ``ResNet3dConfig`` from the keys and shapes of an mmaction state dict."""
    stem = state_dict.get("backbone.conv1.conv.weight")
    fc = state_dict.get("cls_head.fc_cls.weight")
    if stem is None or stem.ndim != 5:
        raise WeightsError(
            "not an mmaction ResNet3d checkpoint: no 5-D 'backbone.conv1.conv.weight'"
        )
    if fc is None or fc.ndim != 2:
        raise WeightsError("not an I3D recognizer checkpoint: no 2-D 'cls_head.fc_cls.weight'")
    blocks: dict[int, set[int]] = {}
    for key in state_dict:
        if m := _BLOCK_KEY.match(key):
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks or sorted(blocks) != list(range(1, len(blocks) + 1)):
        raise WeightsError(f"checkpoint stages {sorted(blocks)} are not layer1..layerN")
    counts = tuple(len(blocks[s]) for s in sorted(blocks))
    bottleneck = "backbone.layer1.0.conv3.conv.weight" in state_dict
    depth = next(
        (
            d
            for d, full in RESNET_STAGE_BLOCKS.items()
            if (d >= 50) == bottleneck and full[: len(counts)] == counts
        ),
        None,
    )
    if depth is None:
        raise WeightsError(
            f"block counts {counts} ({'bottleneck' if bottleneck else 'basic'} blocks) match no "
            "ResNet depth (18/34/50/101/152)"
        )
    inflate, non_local, styles, modes = [], [], set(), set()
    for s in sorted(blocks):
        stage_inflate, stage_nl = [], []
        for b in range(counts[s - 1]):
            prefix = f"backbone.layer{s}.{b}."
            k1 = _temporal_kernel(state_dict, prefix + "conv1.conv.weight")
            k2 = _temporal_kernel(state_dict, prefix + "conv2.conv.weight")
            if bottleneck and k2 == 3:
                styles.add("3x3x3")
            elif bottleneck and k1 == 3:
                styles.add("3x1x1")
            stage_inflate.append(int(k1 == 3 or k2 == 3))
            has_nl = any(k.startswith(prefix + "non_local_block.") for k in state_dict)
            stage_nl.append(int(has_nl))
            if has_nl:
                modes.add(
                    "embedded"
                    if prefix + "non_local_block.theta.conv.weight" in state_dict
                    else "gaussian"
                )
        inflate.append(tuple(stage_inflate))
        non_local.append(tuple(stage_nl))
    if len(styles) > 1:
        raise WeightsError("checkpoint mixes '3x1x1' and '3x3x3' inflated blocks")
    mode = "embedded_gaussian"
    if "gaussian" in modes and "embedded" in modes:
        raise WeightsError("checkpoint mixes non-local blocks with and without theta/phi convs")
    if "gaussian" in modes:
        mode = "gaussian"
    elif modes:
        hint = _mode_hint(cfg_text, source_name)
        if hint not in ("dot_product", "embedded_gaussian"):
            raise WeightsError(
                "the non-local blocks have theta/phi convs, which fits both 'dot_product' and "
                "'embedded_gaussian', and neither the saved config nor the file name says which; "
                "pass --preset i3d_r50_nl_dot_product or --preset i3d_r50_nl_embedded_gaussian"
            )
        mode = hint
    sub_sample = any(".non_local_block.g.0." in k for k in state_dict) or not modes
    structural = dict(
        depth=depth,
        num_stages=len(counts),
        inflate=normalize_pattern(inflate),
        inflate_style=styles.pop() if styles else "3x1x1",
        non_local=normalize_pattern(non_local),
        non_local_mode=mode,
    )
    base = _matching_preset(structural) or ResNet3dConfig()
    overrides: dict[str, Any] = {}
    for name in _CFG_INTS:
        if m := re.search(rf"\b{name}\s*=\s*(\d+)", cfg_text):
            overrides[name] = int(m.group(1))
    try:
        return attrs.evolve(
            base,
            **structural,
            **overrides,
            base_channels=int(stem.shape[0]),
            in_channels=int(stem.shape[1]),
            conv1_kernel=tuple(int(k) for k in stem.shape[2:]),
            spatial_strides=base.spatial_strides,
            non_local_sub_sample=sub_sample,
            head=attrs.evolve(base.head, num_classes=int(fc.shape[0])),
        )
    except ConfigError as exc:
        raise WeightsError(f"checkpoint describes an invalid network: {exc}") from exc


def _temporal_kernel(state_dict: dict[str, torch.Tensor], key: str) -> int:
    """Temporal kernel size of the 5-D conv weight ``key``; absent or malformed is an error."""
    weight = state_dict.get(key)
    if weight is None or weight.ndim != 5:
        raise WeightsError(f"incomplete mmaction ResNet3d checkpoint: no 5-D {key!r}")
    return int(weight.shape[2])


def _matching_preset(structural: dict[str, Any]) -> ResNet3dConfig | None:
    """A named preset with this structure; it supplies what weights cannot show (strides)."""
    for config in _RESNET_PRESETS.values():
        if config.num_stages == structural["num_stages"] and all(
            getattr(config, k) == v for k, v in structural.items()
        ):
            return config
    return None


def config_for_preset(preset: str, state_dict: dict[str, torch.Tensor]) -> ResNet3dConfig:
    """A preset sized to the checkpoint (width, input channels, classes); structure must agree."""
    config = get_preset(preset)
    if not isinstance(config, ResNet3dConfig):
        raise WeightsError(
            f"preset {preset!r} is not a ResNet3d I3D; mmaction checkpoints need one"
        )
    stem = state_dict.get("backbone.conv1.conv.weight")
    fc = state_dict.get("cls_head.fc_cls.weight")
    if stem is None or fc is None or stem.ndim != 5 or fc.ndim != 2:
        raise WeightsError(
            "not an mmaction I3D checkpoint: no backbone.conv1 / cls_head.fc_cls weights"
        )
    config = attrs.evolve(
        config,
        base_channels=int(stem.shape[0]),
        in_channels=int(stem.shape[1]),
        head=attrs.evolve(config.head, num_classes=int(fc.shape[0])),
    )
    try:
        check_state_dict(config, state_dict)
    except WeightsError as exc:
        raise WeightsError(f"checkpoint does not match preset {preset!r}: {exc}") from None
    return config


def convert_mmaction(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    preset: str | None = None,
    labels: tuple[str, ...] | None = None,
    preprocessing: Preprocessing | None = None,
) -> Path:
    """Convert an mmaction2 I3D checkpoint to a project ``.safetensors`` file at ``dst``."""
    src = Path(src)
    checkpoint = load_checkpoint(src)
    state_dict = extract_state_dict(checkpoint, str(src))
    if preset is not None:
        config = config_for_preset(preset, state_dict)
    else:
        config = infer_config(state_dict, config_text(checkpoint), src.name)
        check_state_dict(config, state_dict)
    state_dict = {
        k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state_dict.items()
    }
    if labels is None:
        labels = default_labels(config.head.num_classes)
    if preprocessing is None:
        preprocessing = MMACTION_K400
        if "dense" in src.name.lower() or (preset or "").endswith("dense"):
            preprocessing = attrs.evolve(preprocessing, sampling="dense")
    info = WeightsInfo(
        config=config,
        labels=labels,
        preprocessing=preprocessing,
        provenance=Provenance(
            source_name=src.name, source_sha256=sha256_file(src), source_format="mmaction2"
        ),
    )
    return save_weights(dst, state_dict, info)
