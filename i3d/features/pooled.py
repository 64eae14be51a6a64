"""Pooled features of whole videos (``i3d features --endpoint``): one vector per video, or
every view's map, through the weights' own clip pipeline.

Flow-stream weights see TV-L1 flow views cut as the RGB views are (as ``i3d predict`` feeds
them: :class:`~i3d.flow.views.StreamPipeline`); two-stream weights give the RGB features
then the flow features of every view, concatenated. Videos stream through the model a piece
of clips at a time (all their crops), as :class:`~i3d.inference.Predictor` does for scores,
so a long video's views are never all in memory at once when features are pooled. The
model runs on torch, npu or OpenVINO (:func:`~i3d.features.maps.endpoint_maps`); the pooling
is torch's in every case.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch

from i3d.data.datasets import (
    auto_workers,
    finish_pieces,
    in_input_order,
    iter_pieces,
    note_warnings,
)
from i3d.data.pipeline import Pipeline, ViewPiece, join_pieces
from i3d.data.transfer import DeviceFeed
from i3d.features.maps import EndpointMaps, endpoint_maps
from i3d.flow.recipe import FlowConfig
from i3d.flow.views import StreamPiece, StreamPipeline, normalize_flow, open_flow_dir
from i3d.inference.inputs import VIDEO_ERRORS, ViewProgress, check_path_list
from i3d.inference.predictor import check_finite, model_streams
from i3d.weights.two_stream import stream_of

POOLS = ("mean", "none")


def feature_device(backend: str, device: str | None) -> torch.device:
    """Where ``i3d features`` puts the model: a torch (cpu/cuda/mps) or npu device, or the
    CPU for openvino (which converts it truncated at the endpoint).

    Features need the model's layers, so exported backends (onnx, om), which only give
    logits, are refused with what to use instead.
    """
    from i3d.backends import BackendError
    from i3d.backends.npu_backend import import_torch_npu, npu_placement, parse_npu_device
    from i3d.backends.torch_backend import resolve_device

    if backend == "torch":
        return resolve_device(device)
    if backend == "npu":
        import_torch_npu()
        return npu_placement(parse_npu_device(device))[0]
    if backend == "openvino":
        from i3d.backends.openvino_backend import import_openvino

        if (device or "cpu").strip().lower() != "cpu":
            raise BackendError(f"the openvino backend runs on cpu, not {device!r}")
        import_openvino()  # says how to install it
        return torch.device("cpu")
    raise BackendError(
        f"features need the model's intermediate layers, which the {backend!r} backend does not "
        "expose (exported models give logits only); use --backend torch (cpu, cuda), npu or "
        "openvino"
    )


def _check_pool(pool: str) -> None:
    if pool not in POOLS:
        raise ValueError(f"pool must be 'mean' or 'none', got {pool!r}")


class FeatureStreams:
    """What pooled features run: each stream's model and input normalisation, and where the
    pieces come from (the pipeline, or its :class:`~i3d.flow.views.StreamPipeline`).

    ``model`` is a loaded model (:func:`i3d.load_model`): RGB, Flow-stream (its views are
    TV-L1 flow by DeepMind's recipe, computed as ``flow`` says or read from the flow folder
    ``flow_dir``), or two-stream, whose features are the RGB ones then the flow ones,
    concatenated along channels (2048 for Inception's ``Mixed_5c``). ``backend`` (torch,
    npu, openvino) runs the stream models (:func:`~i3d.features.maps.endpoint_maps`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        pipeline: Pipeline,
        flow: FlowConfig | None = None,
        flow_dir: str | os.PathLike[str] | None = None,
        backend: str = "torch",
    ) -> None:
        info = model.weights_info
        self.names = model_streams(info)
        self.models = stream_models(model)
        self.backend = backend
        self._maps: dict[tuple[str, str, int], EndpointMaps] = {}
        self.pipeline = pipeline
        self.device = next(model.parameters()).device
        self.flow = flow if flow is not None else FlowConfig(device=str(self.device))
        self.source: Pipeline | StreamPipeline = pipeline
        if self.names != ("rgb",):
            store = None if flow_dir is None else open_flow_dir(pipeline, self.flow, flow_dir)
            self.source = StreamPipeline(pipeline, self.names, self.flow, store)
        elif flow_dir is not None:
            raise ValueError("these are RGB weights; a flow folder serves flow or two-stream ones")
        flow_prep = self.models.get("flow", model).weights_info.preprocessing
        self.normalize: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "rgb": pipeline.normalize,
            "flow": partial(normalize_flow, prep=flow_prep),
        }

    @property
    def flow_on_device(self) -> bool:
        """Whether the flow runs on an accelerator (decoding processes cannot share it)."""
        on_cpu = torch.device(self.flow.device).type == "cpu"
        return self.names != ("rgb",) and self.flow.on_device and not on_cpu

    def piece_maps(
        self,
        piece: ViewPiece | StreamPiece,
        endpoint: str,
        pool: str,
        batch_size: int,
        on_views: ViewProgress | None,
    ) -> torch.Tensor:
        """One piece's per-view features, the streams' concatenated along channels."""
        if isinstance(piece, ViewPiece):
            piece = StreamPiece(piece, None)
        parts = []
        for name, views in (("rgb", piece.rgb), ("flow", piece.flow)):
            if views is not None:
                progress = None if parts else on_views  # both streams: count views once
                maps, normalize = self.maps_of(name, endpoint, batch_size), self.normalize[name]
                parts.append(
                    _stream_maps(maps, normalize, views, pool, batch_size, progress, self.device)
                )
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def maps_of(self, name: str, endpoint: str, batch_size: int) -> EndpointMaps:
        """Stream ``name``'s model run to ``endpoint``, made on first use (OpenVINO converts
        it then, or reads it from its cache)."""
        key = (name, endpoint, batch_size)
        if key not in self._maps:
            self._maps[key] = endpoint_maps(self.models[name], endpoint, self.backend, batch_size)
        return self._maps[key]


def stream_models(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """A loaded model's stream models by name, RGB first: itself as ``rgb`` or ``flow``, or
    a two-stream model's two (:func:`~i3d.weights.two_stream.stream_of`)."""
    return {name: stream_of(model, name) for name in model_streams(model.weights_info)}


def endpoint_names(model: torch.nn.Module) -> tuple[str, ...]:
    """The endpoints a loaded model's features can be read at: those every stream has."""
    names = [m.endpoint_names for m in stream_models(model).values()]
    return tuple(n for n in names[0] if all(n in other for other in names[1:]))


def _stream_maps(
    model_maps: EndpointMaps,
    normalize: Callable[[torch.Tensor], torch.Tensor],
    piece: ViewPiece,
    pool: str,
    batch_size: int,
    on_views: ViewProgress | None,
    device: torch.device,
) -> torch.Tensor:
    """One stream's per-view features of a piece: (views, C) space-time means, or the maps.

    uint8 RGB views cross to the device (a quarter of float32's bytes) and are normalised
    there; flow views are [-1, 1] floats already."""
    done, total = piece.start * piece.crops, piece.num_views
    out = []
    with torch.no_grad():
        for chunk in piece.views.split(batch_size):
            if on_views is not None:
                on_views(done, total)
            maps = model_maps(normalize(chunk.to(device, non_blocking=True)))
            out.append(maps.flatten(2).mean(dim=2) if pool == "mean" and maps.ndim > 2 else maps)
            done += len(chunk)
    if on_views is not None and done == total:
        on_views(total, total)
    return torch.cat(out)


def _finish(per_view: torch.Tensor, pool: str) -> torch.Tensor:
    """A video's features from its per-view results (crop-major, as ``Pipeline.frames``),
    checked finite once per video (a check per batch would wait for the device each time)."""
    check_finite(per_view, "features")
    return per_view.mean(dim=0) if pool == "mean" else per_view


def _clips_per_piece(pipeline: Pipeline, batch_size: int) -> int:
    """The fewest clips whose views fill whole batches."""
    crops = pipeline.num_crops
    return math.lcm(batch_size, crops) // crops


def video_features(
    model: torch.nn.Module,
    pipeline: Pipeline,
    source: str | os.PathLike[str],
    endpoint: str,
    pool: str = "mean",
    batch_size: int = 1,
    on_views: ViewProgress | None = None,
    flow: FlowConfig | None = None,
    flow_dir: str | os.PathLike[str] | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """Endpoint features of one video: (C,) pooled over views and space-time, or the
    (V, C, t, h, w) maps of every view; ``on_views`` reports (views run, views in it).
    Flow and two-stream models read flow as :class:`FeatureStreams` says; ``backend``
    (torch, npu, openvino) runs the model."""
    _check_pool(pool)
    streams = FeatureStreams(model, pipeline, flow, flow_dir, backend)
    size = _clips_per_piece(pipeline, batch_size)
    parts = [
        streams.piece_maps(piece, endpoint, pool, batch_size, on_views)
        for piece in streams.source.pieces(source, clips_per_piece=size)
    ]
    return _finish(join_pieces(parts, pipeline.num_crops), pool)


def iter_features(
    model: torch.nn.Module,
    pipeline: Pipeline,
    paths: Sequence[str | os.PathLike[str]],
    endpoint: str,
    pool: str = "mean",
    batch_size: int = 1,
    workers: int | None = None,
    on_views: ViewProgress | None = None,
    flow: FlowConfig | None = None,
    flow_dir: str | os.PathLike[str] | None = None,
    on_warnings: Callable[[int, tuple[str, ...]], None] | None = None,
    backend: str = "torch",
) -> Iterator[torch.Tensor | str]:
    """Float32 CPU features (:func:`video_features`) of each video in order, or the error
    text of one that could not be read; ``workers`` processes decode ahead (None: auto).
    ``on_warnings`` hears (index in ``paths``, warnings) of a video read with warnings (a
    truncated file) before its features come. ``backend`` (torch, npu, openvino) runs the
    model."""
    check_path_list(paths)
    _check_pool(pool)
    streams = FeatureStreams(model, pipeline, flow, flow_dir, backend)
    workers = auto_workers(len(paths)) if workers is None else workers
    if streams.flow_on_device:
        workers = 0  # decoding processes cannot share the device flow runs on
    size = _clips_per_piece(pipeline, batch_size)
    feed = DeviceFeed(streams.device)
    pieces = iter_pieces(paths, streams.source, workers, VIDEO_ERRORS, size, feed.overlaps)
    pieces = note_warnings(pieces, on_warnings)

    def run(piece: ViewPiece | StreamPiece) -> torch.Tensor:
        maps = streams.piece_maps(piece, endpoint, pool, batch_size, on_views)
        return maps.to(dtype=torch.float32)  # left on the device: finish waits for it

    def finish(per_view: torch.Tensor) -> torch.Tensor:
        return _finish(per_view.to("cpu"), pool)

    yield from in_input_order(finish_pieces(feed.ahead(pieces), run, finish, VIDEO_ERRORS))
