"""Tushar-N/pytorch-resnet3d I3D ResNet-50 state dicts (and the Caffe2 pickle they were made
from) → the project's weight format.

pytorch-resnet3d's ``I3Res50`` is a PyTorch port of Facebook's video-nonlocal-net
``i3d_baseline_32x2_IN_pretrain_400k`` (its ``pretrained/i3d_r50_kinetics.pth``), the network
behind the RTFM / UCF-Crime features. It is mmaction's ResNet3d I3D-R50 except for the stem's
max pool, kernel (2, 3, 3) without padding (mmaction: (1, 3, 3), padding (0, 1, 1)), which
:class:`~i3d.models.config.ResNet3dConfig` expresses as ``pool1_kernel_t=2,
pool1_padding=(0, 0, 0)``. Keys are torchvision's (``conv1.weight``, ``bn1.*``,
``layer{i}.{j}.conv{k}`` / ``bn{k}``, ``downsample.0`` / ``.1``, ``fc``) with 5-D convs; they
are renamed to the project's (mmcv ``ConvModule``) names one to one.

``i3d_r50_kinetics.pth`` itself is pytorch-resnet3d's ``utils/convert_weights.py`` run on
video-nonlocal-net's Caffe2 ``i3d_baseline_32x2_IN_pretrain_400k.pkl`` (``{"blobs": {name:
array}}``, published at dl.fbaipublicfiles.com/video-nonlocal/): :func:`caffe2_to_tushar`
renames the blobs as that script does, so the ``.pkl`` converts to the same weights.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from i3d.models import build_model
from i3d.models.config import ConfigError, HeadConfig, ResNet3dConfig
from i3d.utils.files import sha256_file
from i3d.weights.format import Provenance, WeightsError, WeightsInfo, save_weights
from i3d.weights.labels import default_labels
from i3d.weights.preprocessing import Preprocessing
from i3d.weights.safe_pickle import load_checkpoint, load_plain_pickle

SOURCE_FORMAT = "pytorch-resnet3d-state-dict"
CAFFE2_FORMAT = "video-nonlocal-caffe2-pkl"

NOTES = (
    "Tushar-N/pytorch-resnet3d I3Res50 (port of video-nonlocal-net "
    "i3d_baseline_32x2_IN_pretrain_400k): stem pool (2, 3, 3), no padding"
)

TUSHAR_K400 = Preprocessing(
    mean=(114.75, 114.75, 114.75),
    std=(57.375, 57.375, 57.375),
    value_range=(0.0, 255.0),
    clip_len=32,
    frame_interval=2,
    num_clips=10,
    num_crops=3,
    sampling="uniform",
    resize_short=256,
    crop_size=256,
    input_size=224,
)
"""video-nonlocal-net's I3D baseline protocol: 32×2 clips, 10 clips × 3 crops of 256 after
short side 256, ``(x − 114.75) / 57.375`` on [0, 255] (RTFM's normalisation too)."""

_CAFFE2_STEM = {
    "conv1_w": "conv1.weight",
    "res_conv1_bn_s": "bn1.weight",
    "res_conv1_bn_b": "bn1.bias",
    "res_conv1_bn_rm": "bn1.running_mean",
    "res_conv1_bn_riv": "bn1.running_var",
    "pred_w": "fc.weight",
    "pred_b": "fc.bias",
}
_CAFFE2_BN = {"s": "weight", "b": "bias", "rm": "running_mean", "riv": "running_var"}
_CAFFE2_BLOCK = re.compile(r"^res(\d+)_(\d+)_branch(1|2[abc])_(w|bn_s|bn_b|bn_rm|bn_riv)$")
_WRAPPERS = ("state_dict", "model", "net", "module")
_BLOCK = re.compile(r"^(layer\d+\.\d+\.)(conv[123]|bn[123]|downsample\.[01])\.(.+)$")
_STEM = {"conv1": "backbone.conv1.conv", "bn1": "backbone.conv1.bn", "fc": "cls_head.fc_cls"}


def tushar_config(
    base_channels: int = 64, in_channels: int = 3, num_classes: int = 400
) -> ResNet3dConfig:
    """``I3Res50``'s architecture (width, input channels and classes as given).

    Stem conv (5, 7, 7) stride 2, max pool (2, 3, 3) stride 2 without padding, pool2 after
    layer1, mmaction's I3D-R50 inflation pattern (3×1×1 on the first conv of the inflated
    blocks), spatial stride on the 3×3 convs, dropout 0.5 before ``fc``.
    """
    try:
        return ResNet3dConfig(
            depth=50,
            base_channels=base_channels,
            in_channels=in_channels,
            conv1_kernel=(5, 7, 7),
            conv1_stride_t=2,
            conv1_stride_s=2,
            pool1_stride_t=2,
            pool1_stride_s=2,
            pool1_kernel_t=2,
            pool1_padding=(0, 0, 0),
            inflate=((1, 1, 1), (1, 0, 1, 0), (1, 0, 1, 0, 1, 0), (0, 1, 0)),
            inflate_style="3x1x1",
            head=HeadConfig(num_classes=num_classes, dropout=0.5),
        )
    except ConfigError as exc:
        raise WeightsError(f"the checkpoint describes an invalid network: {exc}") from exc


def to_project_key(key: str) -> str | None:
    """The project key of a pytorch-resnet3d key, or None when it is not one of its names."""
    head, _, leaf = key.partition(".")
    if head in _STEM and leaf:
        return f"{_STEM[head]}.{leaf}"
    m = _BLOCK.match(key)
    if m is None:
        return None
    block, module, leaf = m.groups()
    if module.startswith("conv"):
        module = f"{module}.conv"
    elif module.startswith("bn"):
        module = f"conv{module[2]}.bn"
    else:
        module = "downsample." + ("conv" if module.endswith("0") else "bn")
    return f"backbone.{block}{module}.{leaf}"


def to_source_key(key: str) -> str:
    """Inverse of :func:`to_project_key` (for messages in the checkpoint's own names)."""
    for source, project in _STEM.items():
        if key.startswith(project + "."):
            return source + key[len(project) :]
    rest = key.removeprefix("backbone.")
    rest = re.sub(r"\.downsample\.conv\.", ".downsample.0.", rest)
    rest = re.sub(r"\.downsample\.bn\.", ".downsample.1.", rest)
    rest = re.sub(r"\.conv([123])\.conv\.", r".conv\1.", rest)
    return re.sub(r"\.conv([123])\.bn\.", r".bn\1.", rest)


def extract_state_dict(checkpoint: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a bare state dict or a ``{'state_dict'|'model'|'net': ...}`` wrapper,
    ``module.`` prefixes (DataParallel dumps) stripped."""
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(f"{source}: expected a state dict, got {type(checkpoint).__name__}")
    for key in _WRAPPERS:
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    out: dict[str, torch.Tensor] = {}
    for key, value in checkpoint.items():
        if isinstance(value, torch.Tensor) or type(value).__name__ == "ndarray":
            out[str(key).removeprefix("module.")] = torch.as_tensor(value)
    if "conv1.weight" not in out:
        raise WeightsError(
            f"{source} has no 'conv1.weight': not a pytorch-resnet3d I3Res50 state dict "
            f"(first keys: {', '.join(list(out)[:5]) or 'none'})"
        )
    return out


def _shape_of(state_dict: Mapping[str, torch.Tensor], key: str, ndim: int) -> tuple[int, ...]:
    value = state_dict.get(key)
    if value is None or value.ndim != ndim:
        got = "missing" if value is None else f"shape {tuple(value.shape)}"
        raise WeightsError(
            f"not a pytorch-resnet3d I3Res50 state dict: {key} must be {ndim}-D, got {got}"
        )
    return tuple(value.shape)


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> ResNet3dConfig:
    """``I3Res50``'s config at the checkpoint's width, input channels and class count."""
    width, in_channels = _shape_of(state_dict, "conv1.weight", 5)[:2]
    num_classes = _shape_of(state_dict, "fc.weight", 2)[0]
    return tushar_config(width, in_channels, num_classes)


def to_project_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: ResNet3dConfig, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename a pytorch-resnet3d state dict into ``config``'s model keys (floats as float32).

    Missing, unexpected and mis-shaped tensors are all reported at once, in the checkpoint's
    own key names; a missing ``num_batches_tracked`` (older PyTorch) is filled with 0.
    """
    with torch.device("meta"):  # the model's keys and shapes, no memory or init cost
        expected = build_model(config).state_dict()
    renamed: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in state_dict.items():
        target = to_project_key(key)
        if target is None or target not in expected:
            unexpected.append(key)
        else:
            renamed[target] = value
    missing, shapes = [], []
    for key, ref in expected.items():
        if key not in renamed:
            if key.endswith(".num_batches_tracked"):
                renamed[key] = torch.tensor(0, dtype=torch.long)
            else:
                missing.append(to_source_key(key))
        elif tuple(renamed[key].shape) != tuple(ref.shape):
            shapes.append(
                f"{to_source_key(key)}: file {tuple(renamed[key].shape)} vs I3Res50 "
                f"{tuple(ref.shape)}"
            )
    problems = []
    for what, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", shapes),
    ):
        if items:
            shown = ", ".join(items[:8]) + (
                f", ... (+{len(items) - 8} more)" if len(items) > 8 else ""
            )
            problems.append(f"{what} ({len(items)}): {shown}")
    if problems:
        raise WeightsError(
            f"{source} does not fit pytorch-resnet3d's I3Res50 (ResNet-50, width "
            f"{config.base_channels}, {config.head.num_classes} classes): " + "; ".join(problems)
        )
    return {
        k: v.to(torch.float32) if v.is_floating_point() else v.to(expected[k].dtype)
        for k, v in renamed.items()
    }


def _caffe2_key(name: str) -> str | None:
    """I3Res50's key of a video-nonlocal-net ResNet blob (``res{L}_{B}_branch...``), or None."""
    if name in _CAFFE2_STEM:
        return _CAFFE2_STEM[name]
    match = _CAFFE2_BLOCK.match(name)
    if match is None:
        return None
    stage, block, branch, tail = match.groups()
    if branch == "1":
        module = "downsample.0" if tail == "w" else "downsample.1"
    else:
        index = "abc".index(branch[1]) + 1
        module = f"conv{index}" if tail == "w" else f"bn{index}"
    suffix = "weight" if tail == "w" else _CAFFE2_BN[tail.removeprefix("bn_")]
    return f"layer{int(stage) - 1}.{block}.{module}.{suffix}"


def caffe2_to_tushar(content: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """video-nonlocal-net's Caffe2 blobs → I3Res50's state dict, named as pytorch-resnet3d's
    ``convert_weights.py`` names them (``res{L}_{B}_branch2{a,b,c}`` → ``layer{L-1}.{B}.conv
    {1,2,3}`` / ``bn``, ``branch1`` → ``downsample.0`` / ``.1``, ``res_conv1_bn``, ``pred`` →
    ``fc``; ``_riv`` is the running variance). Solver state (``*_momentum``) and other blobs
    are left out, as there; a tensor missing after that is reported by the conversion."""
    blobs = content.get("blobs") if isinstance(content, Mapping) else None
    if not isinstance(blobs, Mapping):
        raise WeightsError(
            f"{source}: expected video-nonlocal-net's Caffe2 pickle, a dict with 'blobs'"
        )
    non_local = sorted(str(k) for k in blobs if str(k).startswith("nonlocal_"))
    if non_local:
        raise WeightsError(
            f"{source} holds non-local blocks ({len(non_local)} blobs, e.g. {non_local[0]}); "
            "only the I3D baseline (i3d_baseline_*.pkl, pytorch-resnet3d's I3Res50) converts"
        )
    state_dict = {}
    for name, value in blobs.items():
        key = None if str(name).endswith("_momentum") else _caffe2_key(str(name))
        if key is None:
            continue
        if not isinstance(value, np.ndarray) or not value.dtype.kind == "f":
            raise WeightsError(f"{source}: blob {name} is not a float array")
        state_dict[key] = torch.from_numpy(np.ascontiguousarray(value))
    return state_dict


def convert_video_nonlocal(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    labels: tuple[str, ...] | None = None,
    preset: str | None = None,
) -> Path:
    """video-nonlocal-net's ``i3d_baseline_32x2_IN_pretrain_400k.pkl`` (Caffe2, read with the
    restricted unpickler) → the weights pytorch-resnet3d converts it to, as ``.safetensors``."""
    blobs = caffe2_to_tushar(load_plain_pickle(src), str(src))
    return convert_pytorch_resnet3d(
        src, dst, labels, preset, checkpoint=blobs, source_format=CAFFE2_FORMAT
    )


def convert_pytorch_resnet3d(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    labels: tuple[str, ...] | None = None,
    preset: str | None = None,
    checkpoint: Any = None,
    source_format: str = SOURCE_FORMAT,
) -> Path:
    """Tushar-N/pytorch-resnet3d ``i3d_r50_kinetics.pth`` (or any ``I3Res50`` state dict) →
    project ``.safetensors`` at ``dst``; nothing is written on error.

    The checkpoint is read with the restricted unpickler (``checkpoint``: ``src``'s content
    when the caller has already loaded it so). Labels default to the bundled
    Kinetics list for 400/600 classes; the preprocessing is :data:`TUSHAR_K400`.
    """
    if preset is not None:
        raise WeightsError(
            "pytorch-resnet3d checkpoints have one architecture (I3Res50); leave out --preset"
        )
    src = Path(src)
    if checkpoint is None:
        checkpoint = load_checkpoint(src)
    state_dict = extract_state_dict(checkpoint, str(src))
    config = infer_config(state_dict)
    tensors = to_project_state_dict(state_dict, config, str(src))
    info = WeightsInfo(
        config=config,
        labels=labels if labels is not None else default_labels(config.head.num_classes),
        preprocessing=TUSHAR_K400,
        provenance=Provenance(
            source_name=src.name,
            source_sha256=sha256_file(src),
            source_format=source_format,
            notes=NOTES,
        ),
    )
    return save_weights(dst, tensors, info)


def stem_is_3d(checkpoint: Any) -> bool:
    """Whether a torchvision-layout checkpoint's ``conv1.weight`` is 5-D (pytorch-resnet3d)
    rather than 4-D (a 2D ResNet); wrappers and ``module.``-style prefixes are looked through."""
    if not isinstance(checkpoint, Mapping):
        return False
    for key in _WRAPPERS:
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    for key, value in checkpoint.items():
        name = str(key)
        if (name == "conv1.weight" or name.endswith(".conv1.weight")) and "layer" not in name:
            return getattr(value, "ndim", None) == 5
    return False
