"""2D ImageNet ResNet → I3D ResNet3d initialisation by inflation (mmaction2 ``inflate_weights``).

Each 3D conv gets its 2D kernel repeated over the temporal kernel and divided by the temporal
size, so a clip of identical frames produces the 2D network's activations on every frame
(away from the clip ends, where temporal zero padding differs). BatchNorm parameters and
running statistics are copied; the 2D classifier is dropped; non-local blocks and the head
keep their training init. Depth and width come from the 2D weights, the inflation and
non-local pattern from a preset, so narrow or deeper ResNets inflate as well.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import torch
from einops import repeat
from torch import nn

from i3d.models import build_model, get_preset
from i3d.models.config import RESNET_STAGE_BLOCKS, ResNet3dConfig
from i3d.models.layers import ConvBN
from i3d.utils.files import sha256_file
from i3d.weights.format import Provenance, WeightsError, WeightsInfo, save_weights
from i3d.weights.preprocessing import MMACTION_K400

InflateMode = Literal["average", "center"]
SOURCE_FORMAT = "torchvision-2d"

#: wrapper prefixes stripped from 2D keys (DataParallel, Lightning/timm wrappers, mmpretrain)
_PREFIXES = ("module.", "model.", "backbone.", "encoder.")
_BACKBONE_KEY = re.compile(r"^(conv1|bn1|layer\d+)\.")
_BLOCK_KEY = re.compile(r"^layer(\d+)\.(\d+)\.")


def inflate_conv2d(weight: torch.Tensor, time: int, mode: InflateMode = "average") -> torch.Tensor:
    """(O, I, H, W) 2D kernel → (O, I, time, H, W) 3D kernel whose sum over time is the 2D one.

    ``average`` repeats the kernel over time and divides by ``time`` (I3D / mmaction2);
    ``center`` puts the kernel in the middle slice and zeros elsewhere.
    """
    if weight.ndim != 4:
        raise WeightsError(
            f"expected a 4-D conv2d weight (O, I, H, W), got shape {tuple(weight.shape)}"
        )
    if time < 1:
        raise ValueError(f"temporal kernel size must be >= 1, got {time}")
    if mode == "average":
        return repeat(weight, "o i h w -> o i t h w", t=time) / time
    if mode == "center":
        out = weight.new_zeros((*weight.shape[:2], time, *weight.shape[2:]))
        out[:, :, time // 2] = weight
        return out
    raise ValueError(f"inflation mode must be 'average' or 'center', got {mode!r}")


@attrs.frozen
class InflationReport:
    """What inflation did: the 3D keys it wrote, the 3D keys left at init, unused 2D keys."""

    config: ResNet3dConfig
    inflated: tuple[str, ...]
    not_inflated: tuple[str, ...]
    unused_2d: tuple[str, ...]

    def __str__(self) -> str:
        c = self.config
        lines = [
            f"inflated a 2D ResNet-{c.depth} (width {c.base_channels}): "
            f"{len(self.inflated)} tensors inflated/copied, {len(self.not_inflated)} kept at "
            f"their training init, {len(self.unused_2d)} 2D tensors unused",
        ]
        if self.not_inflated:
            lines.append("not inflated (training init):")
            lines.extend(f"  {key}" for key in self.not_inflated)
        if self.unused_2d:
            lines.append("unused 2D tensors: " + ", ".join(self.unused_2d))
        return "\n".join(lines)


def load_state_dict_2d(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a 2D checkpoint (.pth/.pt via the restricted unpickler, or .safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise WeightsError(f"{path} is not a readable .safetensors file: {exc}") from exc
    from i3d.weights.safe_pickle import load_checkpoint

    return _unwrap(load_checkpoint(path), str(path))


def _unwrap(checkpoint: Any, source: str) -> dict[str, torch.Tensor]:
    """The tensor dict of a bare state dict or a ``{'state_dict'|'model': ...}`` wrapper."""
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(f"{source}: expected a state dict, got {type(checkpoint).__name__}")
    for key in ("state_dict", "model"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    return {k: torch.as_tensor(v) for k, v in checkpoint.items() if _is_array(v)}


def _is_array(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or type(value).__name__ == "ndarray"


def normalize_state_dict_2d(
    state_dict: Mapping[str, Any], source: str = "2D checkpoint"
) -> dict[str, torch.Tensor]:
    """Unwrap and strip wrapper prefixes (``module.``, ``model.``...) down to ``conv1.weight``."""
    sd = _unwrap(state_dict, source)
    while "conv1.weight" not in sd:
        prefix = next((p for p in _PREFIXES if f"{p}conv1.weight" in sd), None)
        if prefix is None:
            raise WeightsError(
                f"{source} has no 'conv1.weight': not a torchvision/timm-layout 2D ResNet "
                f"(first keys: {', '.join(list(sd)[:5]) or 'none'})"
            )
        sd = {k.removeprefix(prefix): v for k, v in sd.items()}
    return sd


def infer_resnet2d(state_dict: Mapping[str, torch.Tensor]) -> tuple[int, int, int]:
    """(depth, width, in_channels) of a torchvision-layout 2D ResNet state dict."""
    conv1 = state_dict["conv1.weight"]
    if conv1.ndim != 4:
        raise WeightsError(
            f"conv1.weight must be a 4-D 2D conv weight, got shape {tuple(conv1.shape)}"
        )
    blocks: dict[int, set[int]] = {}
    for key in state_dict:
        if m := _BLOCK_KEY.match(key):
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    if sorted(blocks) != [1, 2, 3, 4]:
        raise WeightsError(
            f"expected stages layer1..layer4 in the 2D ResNet, found {sorted(blocks)}"
        )
    for stage, ids in blocks.items():
        if ids != set(range(len(ids))):
            raise WeightsError(f"layer{stage} has non-consecutive block indices {sorted(ids)}")
    counts = tuple(len(blocks[s]) for s in (1, 2, 3, 4))
    bottleneck = "layer1.0.conv3.weight" in state_dict
    for depth, stage_blocks in RESNET_STAGE_BLOCKS.items():
        if stage_blocks == counts and (depth >= 50) == bottleneck:
            return depth, int(conv1.shape[0]), int(conv1.shape[1])
    kind = "Bottleneck" if bottleneck else "BasicBlock"
    known = ", ".join(f"{d}: {b}" for d, b in RESNET_STAGE_BLOCKS.items())
    raise WeightsError(
        f"a {kind} ResNet with {counts} blocks per stage has no known depth ({known})"
    )


def _cycle(flags: tuple[int, ...], blocks: int) -> tuple[int, ...]:
    """A per-block pattern repeated cyclically to ``blocks`` blocks (I3D alternates 1, 0, ...)."""
    return tuple(flags[b % len(flags)] for b in range(blocks))


def inflated_config(
    preset: str | ResNet3dConfig,
    depth: int,
    width: int,
    in_channels: int,
    num_classes: int | None = None,
) -> ResNet3dConfig:
    """The preset with the 2D net's depth and width; its per-block patterns cycled to the depth."""
    base = get_preset(preset) if isinstance(preset, str) else preset
    if not isinstance(base, ResNet3dConfig):
        raise WeightsError(f"2D ResNets inflate into ResNet3d presets only, not {base.arch!r}")
    if base.num_stages != 4:
        raise WeightsError(f"inflation needs a 4-stage preset, this one has {base.num_stages}")
    stage_blocks = RESNET_STAGE_BLOCKS[depth]
    patterns = {
        name: tuple(
            _cycle(f, n)
            for f, n in zip(base.block_flags(name, as_int=True), stage_blocks, strict=True)
        )
        for name in ("inflate", "non_local")
    }
    head = base.head if num_classes is None else attrs.evolve(base.head, num_classes=num_classes)
    return attrs.evolve(
        base, depth=depth, base_channels=width, in_channels=in_channels, head=head, **patterns
    )


def _conv_pairs(backbone: nn.Module) -> list[tuple[str, str, str]]:
    """(3D ConvBN, 2D conv, 2D BN) names of each backbone ConvBN outside the non-local blocks."""
    pairs = []
    for name, module in backbone.named_modules():
        if not isinstance(module, ConvBN) or ".non_local_block." in f".{name}.":
            continue
        parent, _, leaf = name.rpartition(".")
        if leaf == "downsample":
            pairs.append((name, f"{name}.0", f"{name}.1"))
        else:
            bn = leaf.replace("conv", "bn")
            pairs.append((name, name, f"{parent}.{bn}" if parent else bn))
    return pairs


def inflate_resnet2d(
    state_dict_2d: Mapping[str, Any],
    preset_or_config: str | ResNet3dConfig = "i3d_r50",
    num_classes: int | None = None,
    mode: InflateMode = "average",
    source: str = "2D checkpoint",
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, torch.Tensor], InflationReport]:
    """Inflate a torchvision/timm-layout 2D ResNet state dict into a ResNet3dI3D state dict.

    The result has every model key: inflated convs, copied BNs, and the model's own training
    init (``build_model``) for non-local blocks and the head, as listed in the report.
    Floating tensors come out in ``dtype`` (float64 makes the inflated sums exact for checks).
    """
    sd2 = normalize_state_dict_2d(state_dict_2d, source)
    depth, width, in_channels = infer_resnet2d(sd2)
    config = inflated_config(preset_or_config, depth, width, in_channels, num_classes)
    model = build_model(config)
    out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    written: set[str] = set()
    used: set[str] = set()
    missing: list[str] = []
    mismatched: list[str] = []

    def take(key2: str, key3: str, conv: bool) -> None:
        if key2 not in sd2:
            if not key2.endswith("num_batches_tracked"):
                missing.append(key2)
            return
        used.add(key2)
        value, target = sd2[key2], out[key3]
        expected = (*target.shape[:2], *target.shape[3:]) if conv else tuple(target.shape)
        if tuple(value.shape) != tuple(expected):
            mismatched.append(f"{key2} {tuple(value.shape)} -> {key3} needs {tuple(expected)}")
            return
        if conv:
            value = inflate_conv2d(value.to(dtype), target.shape[2], mode)
        out[key3] = value.to(target.dtype).clone()
        written.add(key3)

    for name3, conv2, bn2 in _conv_pairs(model.backbone):
        prefix = f"backbone.{name3}"
        take(f"{conv2}.weight", f"{prefix}.conv.weight", conv=True)
        for buf in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            take(f"{bn2}.{buf}", f"{prefix}.bn.{buf}", conv=False)
    stray = sorted(k for k in sd2 if k not in used and _BACKBONE_KEY.match(k))
    problems = []
    if missing:
        problems.append(f"missing 2D tensors ({len(missing)}): {', '.join(missing[:8])}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched[:8])}")
    if stray:
        problems.append(
            f"backbone tensors with no place in a plain ResNet ({len(stray)}): "
            f"{', '.join(stray[:8])} (SE, ResNet-D or deep-stem variants are not supported)"
        )
    if problems:
        raise WeightsError(
            f"{source} does not fit a ResNet-{depth} of width {width}: " + "; ".join(problems)
        )
    report = InflationReport(
        config=config,
        inflated=tuple(k for k in out if k in written),
        not_inflated=tuple(k for k in out if k not in written),
        unused_2d=tuple(k for k in sd2 if k not in used),
    )
    return out, report


def convert_torchvision_2d(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    preset: str = "i3d_r50",
    num_classes: int | None = None,
    labels: tuple[str, ...] | None = None,
    checkpoint: Any = None,
) -> tuple[Path, InflationReport]:
    """Inflate a 2D ResNet checkpoint file into a project ``.safetensors`` I3D init at ``dst``
    (``checkpoint``: ``src``'s content when the caller already loaded it with the restricted
    unpickler).

    The classifier is untrained, so the file carries class names only when ``labels`` are given
    (their count sets ``num_classes`` unless that is given too, and then they must agree).
    """
    src = Path(src)
    if labels is not None and num_classes is None:
        num_classes = len(labels)
    state_dict_2d = load_state_dict_2d(src) if checkpoint is None else _unwrap(checkpoint, str(src))
    state_dict, report = inflate_resnet2d(state_dict_2d, preset, num_classes, source=str(src))
    config = report.config
    head_keys = [k for k in report.not_inflated if k.startswith("cls_head.")]
    info = WeightsInfo(
        config=config,
        labels=labels,
        preprocessing=MMACTION_K400,
        provenance=Provenance(
            source_name=src.name,
            source_sha256=sha256_file(src),
            source_format=SOURCE_FORMAT,
            notes=(
                f"2D ResNet-{config.depth} inflated into preset {preset!r}; "
                f"{len(report.not_inflated) - len(head_keys)} backbone and {len(head_keys)} head "
                "tensors are at their training init (untrained classifier)"
            ),
        ),
    )
    return save_weights(dst, state_dict, info), report
