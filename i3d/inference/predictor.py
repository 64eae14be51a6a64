"""Python API behind ``i3d predict`` and the scores of ``i3d evaluate``.

Videos go through the weights' own test pipeline (:func:`i3d.data.pipeline.build_pipeline`),
views are run in chunks of ``batch_size`` clips on a backend runner, and per-view logits are
averaged as the weights say (mmaction ``average_clips``: ``prob`` = softmax, then mean).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from i3d.data.datasets import (
    auto_workers,
    finish_pieces,
    in_input_order,
    iter_pieces,
    note_warnings,
)
from i3d.data.pipeline import Pipeline, ViewPiece, build_pipeline, join_pieces
from i3d.data.transfer import DeviceFeed
from i3d.flow.recipe import FlowConfig
from i3d.flow.views import StreamPiece, StreamPipeline, normalize_flow, open_flow_dir
from i3d.inference.inputs import (
    VIDEO_ERRORS,
    InputError,
    ViewProgress,
    check_path_list,
    default_weights,
)
from i3d.models.recognizer import average_views
from i3d.weights.format import WeightsInfo, load_model, read_info


class NonFiniteOutputError(ValueError):
    """The model gave NaN or inf for a video (bad weights or preprocessing metadata)."""


def check_finite(values: torch.Tensor, what: str) -> None:
    """Refuse NaN or inf model outputs: they would pass as a confident answer (NaN sorts
    first) instead of showing that the weights or their preprocessing are broken."""
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise NonFiniteOutputError(
            f"the model's {what} hold {bad} NaN/inf values of {values.numel()}; the weights or "
            "their preprocessing (mean, std, value range: `i3d inspect W`) are broken"
        )


def load_classifier(
    weights: Path | torch.nn.Module,
    backend: str,
    device: str | None,
    batch_size: int,
    **options: Any,
) -> Any:
    """A runner whose ``predict`` maps float clips (N, V, C, T, H, W) to logits (N, V, K).

    ``options`` go to the backend (see ``i3d backends``); the torch backend on the CPU runs
    channels-last unless told ``channels_last=False`` (oneDNN's 3D convolutions are ~2x
    faster so and the first one needs less memory; logits agree to ~1e-6 relative).
    """
    from i3d.backends import load_runner

    if backend == "torch" and _on_cpu(device):
        options.setdefault("channels_last", True)
    return load_runner(weights, backend=backend, device=device, batch_size=batch_size, **options)


def _on_cpu(device: str | None) -> bool:
    """Whether a torch device name is the CPU (None: the torch backend's default, CPU)."""
    return device is None or device.split(":")[0].strip().lower() == "cpu"


@attrs.frozen(repr=False)
class Prediction:
    """Averaged class scores of one video (``error`` set instead when it could not be read);
    ``warnings``: what is wrong with a video that was still scored (a truncated file)."""

    path: Path
    scores: np.ndarray | None = attrs.field(eq=False, repr=False)
    labels: tuple[str, ...] | None = attrs.field(default=None, repr=False)
    error: str | None = None
    warnings: tuple[str, ...] = ()

    def top(self, k: int = 5) -> list[tuple[int, str, float]]:
        """The ``k`` best classes as (index, name, score), best first."""
        if self.scores is None:
            return []
        order = np.argsort(-self.scores, kind="stable")[:k]
        return [(int(i), self.label_name(int(i)), float(self.scores[i])) for i in order]

    def __repr__(self) -> str:
        if self.error is not None:
            return f"Prediction(path={str(self.path)!r}, error={self.error!r})"
        top = ", ".join(f"{name!r}: {score:.4f}" for _, name, score in self.top(3))
        return f"Prediction(path={str(self.path)!r}, top={{{top}}})"

    def label_name(self, index: int) -> str:
        return self.labels[index] if self.labels is not None else str(index)

    def to_json(self, k: int = 5, all_scores: bool = False) -> dict[str, Any]:
        """One JSON-able record: path, top-k classes (and every class score), or the error;
        ``warnings`` only where there are some."""
        if self.error is not None:
            return {"path": str(self.path), "error": self.error}
        record: dict[str, Any] = {
            "path": str(self.path),
            "top": [{"index": i, "label": name, "score": s} for i, name, s in self.top(k)],
        }
        if all_scores and self.scores is not None:
            record["scores"] = self.scores.tolist()  # in class-index order
        if self.warnings:
            record["warnings"] = list(self.warnings)
        return record


def model_streams(info: WeightsInfo) -> tuple[str, ...]:
    """The streams a weight file's model reads: ("rgb",), ("flow",) or ("rgb", "flow")."""
    if getattr(info.config, "arch", None) == "two_stream":
        return ("rgb", "flow")
    return (info.preprocessing.modality,)


def check_video_model(path: Path, info: WeightsInfo) -> None:
    """Videos give RGB frames only: refuse flow and two-stream weights with what to do."""
    if getattr(info.config, "arch", None) == "two_stream":
        raise InputError(
            f"{path} is a two-stream (RGB + optical flow) model; videos give RGB frames only. "
            "Predict with the RGB stream's weights, or compute flow yourself and call "
            "model(rgb, flow) from Python"
        )
    if info.preprocessing.modality != "rgb":
        raise InputError(
            f"{path} is an optical-flow model; it takes (x, y) flow fields, not video frames. "
            "Compute flow (e.g. TV-L1) yourself and call the model from Python"
        )


def fit_exported_clip_len(path: Path, runner: Any, overrides: dict[str, Any]) -> None:
    """Make the pipeline's clips as long as an exported model's static time axis requires.

    Without ``clip_len`` in ``overrides`` it is set to the file's T, so every-frame weights
    (DeepMind's) exported with a fixed T predict any video length as ``--clip-len T`` does;
    a different clip length asked for is refused before any video is read.
    """
    shape = getattr(runner, "input_shape", None)  # onnx / om runners of a compiled file
    frames = shape[-3] if shape is not None else None
    if not isinstance(frames, int):
        return
    wanted = overrides.setdefault("clip_len", frames)
    if wanted != frames:
        raise InputError(
            f"{path} was exported for clips of {frames} frames, not {wanted}; drop --clip-len "
            f"(or pass --clip-len {frames}), or re-export with `i3d export --clip-len {wanted}`"
        )


class Predictor:
    """Loads weights once; ``scores(path)`` runs one video through pipeline + model.

    Videos stream through the model :attr:`clips_per_piece` clips at a time (all their
    crops), so memory does not grow with a video's length or number of clips.
    ``backend_options`` go to the backend's runner (torch on the CPU: channels-last unless
    ``{"channels_last": False}``).

    Flow (``inception_i3d_flow``) and two-stream weights read optical flow computed from the
    video by DeepMind's recipe (``flow``: which TV-L1, where; default torch on ``device``),
    or read from and kept in the flow folder ``flow_dir``; two-stream logits are the sum of
    the streams' per view, then averaged as the weights say (DeepMind: softmax of the sum).
    """

    def __init__(
        self,
        weights: str | os.PathLike[str] | None = None,
        clips: int | None = None,
        crops: int | None = None,
        batch_size: int = 1,
        backend: str = "torch",
        device: str | None = None,
        clip_len: int | None = None,
        backend_options: dict[str, Any] | None = None,
        flow: FlowConfig | None = None,
        flow_dir: str | os.PathLike[str] | None = None,
        **pipeline_overrides: Any,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.weights = Path(weights) if weights is not None else default_weights()
        overrides = dict(pipeline_overrides)
        if clips is not None:
            overrides["num_clips"] = clips
        if crops is not None:
            overrides["num_crops"] = crops
        if clip_len is not None:
            overrides["clip_len"] = clip_len
        options = backend_options or {}
        self.streams: tuple[str, ...] = ("rgb",)
        self.flow_runner: Any = None
        if self.weights.suffix == ".safetensors":
            info = read_info(self.weights)
            prep, self.labels = info.preprocessing, info.labels
            self.num_classes: int | None = info.config.head.num_classes
            self.streams = model_streams(info)
            if self.streams == ("rgb",):
                self.runner = load_classifier(self.weights, backend, device, batch_size, **options)
            else:
                self.runner, self.flow_runner = self._stream_runners(
                    backend, device, batch_size, options
                )
        else:  # an exported .onnx / .om: the runner reads what export recorded
            self.runner = load_classifier(
                self.weights, backend, device, batch_size, **(backend_options or {})
            )
            prep = getattr(self.runner, "preprocessing", None)
            self.labels = getattr(self.runner, "labels", None)
            self.num_classes = len(self.labels) if self.labels is not None else None
            if prep is None:
                raise InputError(
                    f"{self.weights} records no preprocessing (test protocol); use the "
                    ".safetensors weights, or a model written by `i3d export` (for .om, keep "
                    "the .onnx export wrote beside it)"
                )
            fit_exported_clip_len(self.weights, self.runner, overrides)
        self.pipeline: Pipeline = build_pipeline(prep, "test", **overrides)
        self.feed = _feed_for(self.runner if self.runner is not None else self.flow_runner)
        self.average = prep.average_clips
        self.batch_size = batch_size
        self.flow = flow if flow is not None else FlowConfig(device=device or "cpu")
        self.views: StreamPipeline | None = None
        if self.streams != ("rgb",):
            store = None
            if flow_dir is not None:
                store = open_flow_dir(self.pipeline, self.flow, flow_dir)
            self.views = StreamPipeline(self.pipeline, self.streams, self.flow, store)
        elif flow_dir is not None:
            raise InputError(
                f"{self.weights} is an RGB model; a flow folder serves flow or two-stream weights"
            )

    def _stream_runners(
        self, backend: str, device: str | None, batch_size: int, options: dict[str, Any]
    ) -> tuple[Any, Any]:
        """(RGB runner or None, flow runner) of flow or two-stream weights (torch only)."""
        if backend != "torch":
            raise InputError(
                f"{self.weights} reads optical flow, which runs on the torch backend; drop "
                f"--backend {backend}, or export and run one stream's weights"
            )
        model = load_model(self.weights)
        if self.streams == ("flow",):
            return None, load_classifier(model, backend, device, batch_size, **options)
        rgb = load_classifier(model.rgb, backend, device, batch_size, **options)
        return rgb, load_classifier(model.flow, backend, device, batch_size, **options)

    @property
    def clips_per_piece(self) -> int:
        """Clips decoded and run at a time: the fewest whose views fill whole batches."""
        crops = self.pipeline.num_crops
        return math.lcm(self.batch_size, crops) // crops

    def scores(self, path: str | os.PathLike[str]) -> np.ndarray:
        """Averaged class scores (K,) of one video, streamed a piece at a time."""
        source = self.pipeline if self.views is None else self.views
        pieces: Iterator[Any] = source.pieces(path, clips_per_piece=self.clips_per_piece)
        if self.feed is not None:
            pieces = self.feed.ahead(pieces)
        logits = [self._piece_logits(piece) for piece in pieces]
        return self._average(join_pieces(logits, self.pipeline.num_crops))

    def scores_of_views(
        self, views: torch.Tensor, on_views: ViewProgress | None = None
    ) -> np.ndarray:
        """Averaged class scores (K,) of one video's uint8 views (V, C, T, H, W)."""
        piece = ViewPiece(views, 0, len(views), len(views), 1)
        return self._average(self._logits(self.runner, self.pipeline.normalize, piece, on_views))

    def _piece_logits(
        self, piece: ViewPiece | StreamPiece, on_views: ViewProgress | None = None
    ) -> torch.Tensor:
        """Logits (views, K) of one piece; ``on_views`` sees the whole video's progress.

        A two-stream piece's logits are the RGB and flow logits summed view by view.
        """
        if isinstance(piece, ViewPiece):
            piece = StreamPiece(piece, None)
        logits = None
        if piece.rgb is not None:
            logits = self._logits(self.runner, self.pipeline.normalize, piece.rgb, on_views)
        if piece.flow is not None:
            progress = on_views if piece.rgb is None else None  # both streams: count views once
            flow = self._logits(self.flow_runner, self._flow_input, piece.flow, progress)
            logits = flow if logits is None else logits + flow
        assert logits is not None
        return logits

    def _flow_input(self, views: torch.Tensor) -> torch.Tensor:
        """[-1, 1] flow views normalised as a flow file says (DeepMind's: mean 0, std 1)."""
        if self.streams != ("flow",):
            return views  # two-stream files take DeepMind's flow as is (checked when built)
        return normalize_flow(views, self.pipeline.preprocessing)

    def _logits(
        self,
        runner: Any,
        normalize: Callable[[torch.Tensor], torch.Tensor],
        piece: ViewPiece,
        on_views: ViewProgress | None,
    ) -> torch.Tensor:
        """Logits (V, K) of a piece's views, ``batch_size`` at a time, progress reported as
        views done of the video's.

        A torch (or npu) runner takes the uint8 views on its device, normalises them there
        and leaves the logits there without waiting; the other runtimes take host floats,
        normalised here.
        """
        done, total = piece.start * piece.crops, piece.num_views
        logits = []
        on_device = getattr(runner, "logits_on_device", None)
        for chunk in piece.views.split(self.batch_size):
            if on_views is not None:
                on_views(done, total)
            if on_device is not None:
                logits.append(on_device(chunk, normalize))
            else:
                logits.append(runner.predict(normalize(chunk)[None])[0])
            done += len(chunk)
        if on_views is not None and done == total:
            on_views(total, total)
        return torch.cat(logits)

    def _average(self, logits: torch.Tensor) -> np.ndarray:
        """Scores (K,) of a video from its views' logits (V, K), as the weights average."""
        logits = logits.to("cpu")  # waits for a device's queued work on this video
        check_finite(logits, "class scores")
        return average_views(logits[None], self.average)[0].numpy()

    def predict(self, path: str | os.PathLike[str]) -> Prediction:
        """Prediction for one video; a decode failure is recorded, not raised."""
        return next(self.predict_many([path], workers=0))

    def predict_many(
        self,
        paths: Sequence[str | os.PathLike[str]],
        workers: int | None = None,
        on_views: ViewProgress | None = None,
    ) -> Iterator[Prediction]:
        """Predictions in order, videos decoded by ``workers`` processes ahead (None: auto).

        ``on_views`` reports progress within each video (views run so far, views in it).
        """
        noted: dict[int, tuple[str, ...]] = {}
        scores_of = self.iter_scores(paths, workers, on_views, noted.__setitem__)
        for index, (path, scores) in enumerate(zip(paths, scores_of, strict=True)):
            warnings = noted.pop(index, ())
            if isinstance(scores, str):
                yield Prediction(Path(path), None, self.labels, error=scores)
            else:
                yield Prediction(Path(path), scores, self.labels, warnings=warnings)

    def iter_scores(
        self,
        paths: Sequence[str | os.PathLike[str]],
        workers: int | None = None,
        on_views: ViewProgress | None = None,
        on_warnings: Callable[[int, tuple[str, ...]], None] | None = None,
    ) -> Iterator[np.ndarray | str]:
        """Scores of each video in order, or the error text of one that failed.

        Videos stream through the model a piece (:attr:`clips_per_piece` clips) at a time,
        decoded by ``workers`` processes ahead, so memory does not grow with their length.
        ``on_warnings`` hears (index in ``paths``, warnings) of a video read with warnings
        (a truncated file) before its scores come.
        """
        check_path_list(paths)
        workers = auto_workers(len(paths)) if workers is None else workers
        source: Any = self.pipeline
        if self.views is not None:
            source = self.views
            if not _on_cpu(self.flow.device) and self.flow.on_device:
                workers = 0  # decoding processes cannot share the device flow runs on
        pin = self.feed is not None and self.feed.overlaps
        pieces = iter_pieces(paths, source, workers, VIDEO_ERRORS, self.clips_per_piece, pin)
        pieces = note_warnings(pieces, on_warnings)
        if self.feed is not None:
            pieces = self.feed.ahead(pieces)
        run = functools.partial(self._piece_logits, on_views=on_views)
        yield from in_input_order(finish_pieces(pieces, run, self._average, VIDEO_ERRORS))


def _feed_for(runner: Any) -> DeviceFeed | None:
    """The transfer of uint8 pieces to a torch runner's device; None for the runtimes that
    take host floats (onnx, openvino, om)."""
    device = getattr(runner, "torch_device", None)
    return DeviceFeed(device) if isinstance(device, torch.device) else None


def predict_videos(
    paths: Sequence[str | os.PathLike[str]],
    weights: str | os.PathLike[str] | None = None,
    clips: int | None = None,
    crops: int | None = None,
    batch_size: int = 1,
    backend: str = "torch",
    device: str | None = None,
    on_result: Callable[[Prediction], None] | None = None,
    workers: int | None = None,
    clip_len: int | None = None,
    **pipeline_overrides: Any,
) -> list[Prediction]:
    """Predictions for videos (in order); failed videos carry ``error`` instead of scores.

    ``workers`` decoding processes run ahead of the model (None: 0 for one video, else auto).
    ``clips``, ``crops`` and ``clip_len`` override the weights' test protocol as
    :func:`~i3d.data.pipeline.build_pipeline` describes.
    """
    check_path_list(paths)
    predictor = Predictor(
        weights, clips, crops, batch_size, backend, device, clip_len, **pipeline_overrides
    )
    results = []
    for result in predictor.predict_many(paths, workers):
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results
