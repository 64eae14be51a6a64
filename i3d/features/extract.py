"""Snippet features of whole videos: :class:`SnippetExtractor` and :func:`iter_snippets`.

Each snippet (see :mod:`i3d.features.protocol`) runs through the model to ``endpoint`` (on
torch, npu or OpenVINO: :func:`~i3d.features.maps.endpoint_maps`), whose map is averaged
over time and space in torch: one vector per snippet and crop. Videos are
decoded by DataLoader workers ahead of the model, a batch of snippets at a time.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from i3d.backends.base import BackendError
from i3d.data.datasets import auto_workers, in_input_order, worker_loader
from i3d.data.decode import open_video
from i3d.data.transfer import pins_memory
from i3d.features.frames import FrameTransform, frame_transform
from i3d.features.maps import endpoint_maps
from i3d.features.protocol import SnippetProtocol
from i3d.features.snippets import (
    SnippetBatch,
    Timeline,
    snippet_batches,
    snippet_starts,
    snippet_times,
    video_timeline,
)
from i3d.flow.recipe import FlowConfig
from i3d.flow.store import FlowFolder, FlowSettings, layout_of
from i3d.inference.predictor import check_finite
from i3d.models import InputShapeError
from i3d.models.layers import set_batchnorm_eps


@attrs.frozen(eq=False)
class VideoSnippets:
    """One video's snippet features, or the reason it could not be read.

    ``features`` is float32 (snippets, C), or (crops, snippets, C) for 3 or 10 crops;
    ``times`` is :func:`~i3d.features.snippets.snippet_times` (one row per snippet).
    """

    path: Path
    features: np.ndarray | None = attrs.field(repr=lambda f: "None" if f is None else str(f.shape))
    times: np.ndarray | None = attrs.field(default=None, repr=False)
    timeline: Timeline | None = attrs.field(default=None, repr=False)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def default_endpoint(model: torch.nn.Module) -> str:
    """The model's last feature map before its classifier (Mixed_5c, layer4)."""
    names = [n for n in model.endpoint_names if n.lower() != "logits"]
    return names[-1]


def pool_map(maps: torch.Tensor, pool: str) -> torch.Tensor:
    """(N, C, t, h, w) endpoint maps → (N, C) vectors: the mean over time and space, or
    ``i3d``: AvgPool3d (2, 7, 7) with stride 1 (pytorch-i3d's and kinetics-i3d's feature head;
    the spatial kernel capped at the map's size), then the mean of the pooled positions."""
    if pool == "mean":
        return maps.flatten(2).mean(dim=2)
    if maps.shape[2] < 2:
        raise ValueError(
            f"the i3d feature pool averages pairs of time steps, but the endpoint map has "
            f"{maps.shape[2]}; use longer windows"
        )
    kernel = (2, min(7, maps.shape[3]), min(7, maps.shape[4]))
    return torch.nn.functional.avg_pool3d(maps, kernel, stride=1).flatten(2).mean(dim=2)


def snippet_flow_folder(
    path: Path, protocol: SnippetProtocol, transform: FrameTransform, flow: FlowConfig
) -> FlowFolder:
    """The flow folder at ``path`` claimed for snippets of ``protocol``: its fps, its short
    side (OpenCV bilinear, mmcv rounding: what ``i3d flow --size`` resizes with), full frames,
    ``flow``'s TV-L1 or RAFT; fields it lacks are written lossless (float32)."""
    if protocol.flow_resolution != "resized":
        raise ValueError(
            "flow folders hold flow of resized frames; this protocol computes flow on the "
            "decoded frames (flow_resolution 'source'): run without a flow folder"
        )
    if (
        transform.frame_size is not None
        or transform.size_rule != "round"
        or (transform.resampler != "cv2-bilinear")
    ):
        raise ValueError(
            "flow folders hold flow of frames whose short side was resized with OpenCV "
            f"bilinear (i3d flow --size S); this protocol resizes to {transform.frame_size or ''}"
            f"{'' if transform.frame_size else transform.resize_short} with {transform.resampler}"
            f" ({transform.size_rule} rule): run without a flow folder"
        )
    settings = FlowSettings(
        format=layout_of(path), fps=protocol.fps, size=transform.resize_short, crop=None,
        **flow.recorded(),
    )  # fmt: skip
    folder = FlowFolder(path, settings, dtype="float32")
    folder.claim()
    return folder


class _SnippetsOf(IterableDataset):
    """(video index, Timeline | SnippetBatch | error text) of each video, in order.

    A video gives its timeline, then its batches (the last with ``last`` set), or an error
    text after whatever it gave. Worker w of n streams videos w, w + n, ...
    """

    def __init__(
        self,
        sources: Sequence[Path],
        protocol: SnippetProtocol,
        transform: FrameTransform,
        batch_size: int,
        decoder: str,
        errors: tuple[type[BaseException], ...],
        flow: FlowConfig | None = None,
        flow_store: FlowFolder | None = None,
    ) -> None:
        self.sources, self.protocol, self.transform = list(sources), protocol, transform
        self.batch_size, self.decoder, self.errors = batch_size, decoder, errors
        self.flow, self.flow_store = flow, flow_store

    def __iter__(self) -> Iterator[tuple[int, Timeline | SnippetBatch | str]]:
        info = get_worker_info()
        first, step = (0, 1) if info is None else (info.id, info.num_workers)
        for index in range(first, len(self.sources), step):
            try:
                with open_video(self.sources[index], backend=self.decoder) as reader:
                    timeline = video_timeline(reader, self.protocol.fps)
                    yield index, timeline
                    batches = snippet_batches(
                        reader,
                        timeline,
                        self.protocol,
                        self.transform,
                        self.batch_size,
                        self.flow,
                        self.flow_store,
                    )
                    for batch in batches:
                        yield index, batch
            except self.errors as exc:
                yield index, str(exc) or type(exc).__name__


class SnippetExtractor:
    """A loaded model and a snippet protocol; ``iter_videos`` gives each video's features.

    ``model`` is a loaded :class:`~i3d.models.recognizer.Recognizer` (``i3d.load_model``)
    on the device to run on (a protocol's ``batchnorm_eps`` is set on a copy of it);
    ``batch_size`` snippets (all their crops) run per forward pass.
    With ``flow``, the model is a Flow-stream I3D and each snippet is W flow fields
    (:func:`~i3d.features.snippets.snippet_batches`), read from the flow folder ``flow_dir``
    (``i3d flow`` output with this protocol's fps and short side) and computed into it for
    the videos it lacks. ``backend`` (torch, npu, openvino) runs the model
    (:func:`~i3d.features.maps.endpoint_maps`; openvino converts it on the first snippet).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        protocol: SnippetProtocol,
        batch_size: int = 8,
        decoder: str = "pyav",
        flow: FlowConfig | None = None,
        flow_dir: str | os.PathLike[str] | None = None,
        backend: str = "torch",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        if protocol.batchnorm_eps is not None:  # a copy: the caller's model keeps its own
            model = copy.deepcopy(model)
            set_batchnorm_eps(model, protocol.batchnorm_eps)
        self.model = model.eval()
        endpoint = protocol.endpoint or default_endpoint(model)
        if endpoint not in model.endpoint_names:
            raise ValueError(
                f"unknown endpoint {endpoint!r}; available: {', '.join(model.endpoint_names)}"
            )
        self.protocol = attrs.evolve(protocol, endpoint=endpoint)
        self.maps = endpoint_maps(model, endpoint, backend, batch_size * protocol.crops)
        self.transform = frame_transform(self.protocol, model.weights_info.preprocessing)
        self.batch_size, self.decoder, self.flow = batch_size, decoder, flow
        modality = model.weights_info.preprocessing.modality
        if (flow is not None) != (modality == "flow"):
            raise ValueError(
                f"these weights are a {modality} model; "
                + ("the flow stream needs Flow-stream weights" if flow else "pass flow= for them")
            )
        self.flow_store = None
        if flow_dir is not None:
            assert flow is not None
            self.flow_store = snippet_flow_folder(
                Path(flow_dir), self.protocol, self.transform, flow
            )
        self.dim = self._probe()

    def iter_videos(
        self,
        paths: Sequence[str | os.PathLike[str]],
        workers: int | None = None,
        errors: tuple[type[BaseException], ...] = (OSError, ValueError),
    ) -> Iterator[VideoSnippets]:
        """Features of each video in input order (a failed one carries ``error``);
        ``workers`` processes decode ahead (None: automatic, none for one video)."""
        paths = [Path(p) for p in paths]
        workers = auto_workers(len(paths)) if workers is None else workers
        dataset = _SnippetsOf(
            paths, self.protocol, self.transform, self.batch_size, self.decoder, errors, self.flow,
            self.flow_store,
        )  # fmt: skip
        if workers == 0:
            stream: Any = iter(dataset)
        else:
            stream = worker_loader(
                dataset,
                min(workers, len(paths)),
                batch_size=None,
                prefetch_factor=2,
                pin_memory=pins_memory(next(self.model.parameters()).device),
            )
        yield from in_input_order(self._finish(paths, stream, errors))

    def video(self, path: str | os.PathLike[str]) -> VideoSnippets:
        """Features of one video, decoded in this process."""
        return next(self.iter_videos([path], workers=0))

    def _finish(
        self,
        paths: list[Path],
        stream: Iterator[tuple[int, Timeline | SnippetBatch | str]],
        errors: tuple[type[BaseException], ...],
    ) -> Iterator[tuple[int, VideoSnippets]]:
        """(index, result) as each video's last batch has run."""
        timelines: dict[int, Timeline] = {}
        parts: dict[int, list[torch.Tensor]] = {}
        failed: set[int] = set()
        for index, item in stream:
            if index in failed:
                continue
            if isinstance(item, str):
                timelines.pop(index, None)
                parts.pop(index, None)
                yield index, VideoSnippets(paths[index], None, error=item)
                continue
            if isinstance(item, Timeline):
                timelines[index], parts[index] = item, []
                if snippet_starts(item, self.protocol, self.flow is not None).size > 0:
                    continue
            else:
                try:
                    parts[index].append(self._run(item))
                except errors as exc:
                    failed.add(index)
                    timelines.pop(index, None)
                    parts.pop(index, None)
                    yield index, VideoSnippets(paths[index], None, error=str(exc))
                    continue
                if not item.last:
                    continue
            timeline = timelines.pop(index)
            yield index, self._result(paths[index], timeline, parts.pop(index))

    def _run(self, batch: SnippetBatch) -> torch.Tensor:
        """(count, crops, C) float32 CPU features of one batch of snippets.

        uint8 views cross to the model's device as uint8 (pinned by the loader for cuda and
        npu) and are normalised there; flow fields are model input already ([-1, 1]).
        """
        param = next(self.model.parameters())
        views = batch.views.to(param.device, non_blocking=True)
        x = self.transform.normalize(views) if views.dtype == torch.uint8 else views.float()
        if batch.pad is not None:  # frames past the video: zero model input
            rows = x.view(batch.count, -1, *x.shape[1:])
            pad = batch.pad.to(param.device)
            rows.masked_fill_(pad[:, None, None, :, None, None], 0.0)
        pooled = pool_map(self.maps(x), self.protocol.pool)
        check_finite(pooled, "features")
        return pooled.to("cpu", torch.float32).view(batch.count, self.protocol.crops, -1)

    def _probe(self) -> int:
        """Channels of the endpoint's features, from one snippet of zeros; a window the model
        cannot take (too few frames or pixels) is refused here, before any video is read."""
        size = self.transform.crop_size
        channels, dtype = (2, torch.float32) if self.flow is not None else (3, torch.uint8)
        shape = (self.protocol.crops, channels, self.protocol.window, size, size)
        views = torch.zeros(shape, dtype=dtype)
        try:
            return int(self._run(SnippetBatch(views, None, 0, 1, 1)).shape[-1])
        except BackendError:  # OpenVINO could not convert or run it: its own message
            raise
        except (RuntimeError, InputShapeError) as exc:
            raise ValueError(
                f"snippets of {self.protocol.window} frames at {size}x{size} are too small for "
                f"this model ({str(exc).splitlines()[0]}); use a longer --window or larger crops"
            ) from None

    def _result(self, path: Path, timeline: Timeline, parts: list[torch.Tensor]) -> VideoSnippets:
        crops = self.protocol.crops
        if parts:
            feats = torch.cat(parts).numpy()  # (snippets, crops, C)
        else:
            feats = np.zeros((0, crops, self.dim), dtype=np.float32)
        feats = feats[:, 0] if crops == 1 else feats.transpose(1, 0, 2)
        times = snippet_times(timeline, self.protocol, flow=self.flow is not None)
        return VideoSnippets(path, np.ascontiguousarray(feats), times, timeline)


def iter_snippets(
    paths: Sequence[str | os.PathLike[str]],
    protocol: SnippetProtocol | str,
    weights: str | os.PathLike[str] | None = None,
    device: str | None = None,
    batch_size: int = 8,
    workers: int | None = None,
    stream: str | None = None,
    flow_weights: str | os.PathLike[str] | None = None,
    flow: FlowConfig | None = None,
    flow_dir: str | os.PathLike[str] | None = None,
    backend: str = "torch",
) -> Iterator[VideoSnippets]:
    """Snippet features of each video in order, for code that consumes them directly.

    ``protocol`` is a :class:`SnippetProtocol` or a preset name (``i3d features --preset``);
    ``weights`` default to the preset's model (or the pulled default model). ``stream``
    (rgb, flow, both; default as ``i3d features``) with ``flow_weights`` (a Flow-stream
    I3D) adds the optical-flow stream, concatenated after RGB; a two-stream ``weights``
    file serves both streams (it is the ``flow_weights`` unless they are given). The flow
    stream reads its fields from the flow folder ``flow_dir`` when given (computing there
    those it lacks). ``backend`` (torch, npu, openvino) runs the models.
    """
    from i3d.features.presets import choose_streams, get_preset, preset_weights
    from i3d.features.run import concatenate_streams
    from i3d.inference.inputs import check_path_list, default_weights
    from i3d.inference.predictor import check_video_model
    from i3d.weights.two_stream import is_two_stream, load_stream

    check_path_list(paths)
    if weights is not None and flow_weights is None and is_two_stream(weights):
        flow_weights = weights
    preset = get_preset(protocol) if isinstance(protocol, str) else None
    if preset is not None:
        protocol = preset.protocol
    assert isinstance(protocol, SnippetProtocol)
    streams = choose_streams(preset, stream, flow_weights is not None)
    extractors = []
    if "rgb" in streams:
        if weights is not None:  # the default is looked up only when it is used
            path = Path(weights)
        else:
            path = preset_weights(preset) if preset is not None else default_weights()
        model = load_stream(path, "rgb", device or "cpu")
        check_video_model(path, model.weights_info)
        extractors.append(SnippetExtractor(model, protocol, batch_size, backend=backend))
    if "flow" in streams:
        assert flow_weights is not None
        config = flow or FlowConfig(device=device or "cpu")
        model = load_stream(flow_weights, "flow", device or "cpu")
        extractors.append(
            SnippetExtractor(
                model, protocol, batch_size, flow=config, flow_dir=flow_dir, backend=backend
            )
        )
    results = [extractor.iter_videos(paths, workers) for extractor in extractors]
    for parts in zip(*results, strict=True):
        yield concatenate_streams(list(parts))
