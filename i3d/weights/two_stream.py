"""A two-stream (RGB + optical flow) weight file from an RGB and a Flow Inception I3D file.

DeepMind's kinetics-i3d evaluates the two streams as one model: the RGB and flow logits are
summed and the softmax taken of the sum (``evaluate_sample.py``). The combined file holds
both state dicts (``rgb.*``, ``flow.*``) under a :class:`~i3d.models.TwoStreamConfig`, the
RGB file's labels and test protocol, and both sources' hashes in its provenance.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import torch
from torch import nn

from i3d.models.inception import InceptionI3dConfig, TwoStreamConfig
from i3d.utils.files import refuse_overwriting, sha256_file
from i3d.weights.format import (
    Provenance,
    WeightsError,
    WeightsInfo,
    load_model,
    load_weights,
    read_info,
    save_weights,
)

FORMAT_TWO_STREAM = "i3d-two-stream"

_PROTOCOL_FIELDS = ("clip_len", "frame_interval", "resize_short", "crop_size", "input_size", "fps")
"""Fields the two streams must share: they read the same frames, resized and cropped alike."""


def _stream(path: Path, modality: str) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """Tensors and metadata of one stream's file, refused unless it is an Inception stream of
    ``modality``."""
    tensors, info = load_weights(path)
    if not isinstance(info.config, InceptionI3dConfig):
        raise WeightsError(
            f"{path} holds a {info.config.arch} model; a two-stream file is built from two "
            "Inception I3D streams (inception_i3d_rgb and inception_i3d_flow)"
        )
    if info.config.modality != modality or info.preprocessing.modality != modality:
        raise WeightsError(
            f"{path} is the {info.preprocessing.modality} stream, not the {modality} one; "
            "give the RGB file first, then the flow file"
        )
    return tensors, info


def combine_two_stream(
    rgb: str | os.PathLike[str], flow: str | os.PathLike[str], dst: str | os.PathLike[str]
) -> Path:
    """Write ``dst``: the RGB and Flow Inception I3D files as one two-stream weight file.

    The streams must share their classes (same labels) and their frame protocol (fps, clip
    length, resize and crop sizes); the flow file's inputs must be DeepMind's [-1, 1] flow
    (mean 0, std 1), which is how the combined model's flow stream is fed.
    """
    rgb, flow, dst = Path(rgb), Path(flow), Path(dst)
    refuse_overwriting(dst, rgb, flow)
    rgb_tensors, rgb_info = _stream(rgb, "rgb")
    flow_tensors, flow_info = _stream(flow, "flow")
    if rgb_info.config.head.num_classes != flow_info.config.head.num_classes:
        raise WeightsError(
            f"{rgb} has {rgb_info.config.head.num_classes} classes but {flow} has "
            f"{flow_info.config.head.num_classes}; both streams must be trained on one class list"
        )
    if None not in (rgb_info.labels, flow_info.labels) and rgb_info.labels != flow_info.labels:
        raise WeightsError(f"{rgb} and {flow} name their classes differently; they must match")
    pairs = [
        (name, getattr(rgb_info.preprocessing, name), getattr(flow_info.preprocessing, name))
        for name in _PROTOCOL_FIELDS
    ]
    differ = [f"{name} {a} vs {b}" for name, a, b in pairs if a != b]
    if differ:
        raise WeightsError(
            f"{rgb} and {flow} expect different frames ({'; '.join(differ)}); the streams must "
            "share one test protocol"
        )
    prep = flow_info.preprocessing
    if prep.value_range != (-1.0, 1.0) or set(prep.mean) != {0.0} or set(prep.std) != {1.0}:
        raise WeightsError(
            f"{flow} normalises flow as value range {prep.value_range}, mean {prep.mean}, std "
            f"{prep.std}; two-stream models take DeepMind's [-1, 1] flow (range (-1, 1), mean "
            "0, std 1)"
        )
    config = TwoStreamConfig(rgb=rgb_info.config, flow=flow_info.config)
    state = {f"rgb.{k}": v for k, v in rgb_tensors.items()}
    state.update({f"flow.{k}": v for k, v in flow_tensors.items()})
    provenance = Provenance(
        source_name=f"{rgb.name} + {flow.name}",
        source_sha256=f"{sha256_file(rgb)} + {sha256_file(flow)}",
        source_format=FORMAT_TWO_STREAM,
        notes=f"rgb: {rgb_info.provenance.source_name}; flow: {flow_info.provenance.source_name}",
    )
    info = WeightsInfo(
        config=config,
        labels=rgb_info.labels if rgb_info.labels is not None else flow_info.labels,
        preprocessing=rgb_info.preprocessing,
        provenance=provenance,
    )
    return save_weights(dst, state, info)


def is_two_stream(path: str | os.PathLike[str]) -> bool:
    """Whether a weight file holds a two-stream model."""
    return getattr(read_info(path).config, "arch", None) == "two_stream"


def load_stream(
    path: str | os.PathLike[str], stream: str, device: str | torch.device = "cpu"
) -> nn.Module:
    """The ``stream`` ("rgb" or "flow") model of a weight file (see :func:`stream_of`)."""
    return stream_of(load_model(path, device), stream)


def stream_of(model: nn.Module, stream: str) -> nn.Module:
    """The ``stream`` ("rgb" or "flow") model of a loaded model: a two-stream model's stream,
    with the weights info of that stream alone (the flow stream takes DeepMind's [-1, 1]
    flow: mean 0, std 1), or a one-stream model as it is."""
    info = model.weights_info
    if getattr(info.config, "arch", None) != "two_stream":
        return model
    if stream not in ("rgb", "flow"):
        raise ValueError(f"stream must be 'rgb' or 'flow', not {stream!r}")
    part = getattr(model, stream)
    prep = info.preprocessing
    if stream == "flow":
        prep = attrs.evolve(prep, mean=(0.0, 0.0), std=(1.0, 1.0), modality="flow")
    part.weights_info = attrs.evolve(info, config=getattr(info.config, stream), preprocessing=prep)
    return part
