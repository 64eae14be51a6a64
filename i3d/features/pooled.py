"""Pooled features of whole videos (``i3d features --endpoint``): one vector per video, or
every view's map, through the weights' own clip pipeline.

Videos stream through the model a piece of clips at a time (all their crops), as
:class:`~i3d.inference.Predictor` does for scores, so a long video's views are never all in
memory at once when features are pooled.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence

import torch

from i3d.data.datasets import auto_workers, finish_pieces, in_input_order, iter_pieces
from i3d.data.pipeline import Pipeline, ViewPiece, join_pieces
from i3d.data.transfer import DeviceFeed
from i3d.inference.inputs import VIDEO_ERRORS, ViewProgress, check_path_list
from i3d.inference.predictor import check_finite

POOLS = ("mean", "none")


def feature_device(backend: str, device: str | None) -> torch.device:
    """Where ``i3d features`` runs the model: a torch (cpu/cuda/mps) or npu device.

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
    raise BackendError(
        f"features need the model's intermediate layers, which the {backend!r} backend does not "
        "expose (exported models give logits only); use --backend torch (cpu, cuda) or npu"
    )


def _check_pool(pool: str) -> None:
    if pool not in POOLS:
        raise ValueError(f"pool must be 'mean' or 'none', got {pool!r}")


def _piece_maps(
    model: torch.nn.Module,
    pipeline: Pipeline,
    piece: ViewPiece,
    endpoint: str,
    pool: str,
    batch_size: int,
    on_views: ViewProgress | None,
) -> torch.Tensor:
    """One piece's per-view features: (views, C) space-time means, or the maps themselves."""
    param = next(model.parameters())
    done, total = piece.start * piece.crops, piece.num_views
    out = []
    with torch.no_grad():
        for chunk in piece.views.split(batch_size):
            if on_views is not None:
                on_views(done, total)
            # uint8 crosses to the device (a quarter of float32's bytes), normalised there
            x = pipeline.normalize(chunk.to(param.device, non_blocking=True)).to(param.dtype)
            maps = model.endpoints(x, [endpoint])[endpoint]
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
) -> torch.Tensor:
    """Endpoint features of one video: (C,) pooled over views and space-time, or the
    (V, C, t, h, w) maps of every view; ``on_views`` reports (views run, views in it)."""
    _check_pool(pool)
    pieces = pipeline.pieces(source, clips_per_piece=_clips_per_piece(pipeline, batch_size))
    parts = [
        _piece_maps(model, pipeline, piece, endpoint, pool, batch_size, on_views)
        for piece in pieces
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
) -> Iterator[torch.Tensor | str]:
    """Float32 CPU features (:func:`video_features`) of each video in order, or the error
    text of one that could not be read; ``workers`` processes decode ahead (None: auto)."""
    check_path_list(paths)
    _check_pool(pool)
    workers = auto_workers(len(paths)) if workers is None else workers
    size = _clips_per_piece(pipeline, batch_size)
    feed = DeviceFeed(next(model.parameters()).device)
    pieces = feed.ahead(iter_pieces(paths, pipeline, workers, VIDEO_ERRORS, size, feed.overlaps))

    def run(piece: ViewPiece) -> torch.Tensor:
        maps = _piece_maps(model, pipeline, piece, endpoint, pool, batch_size, on_views)
        return maps.to(dtype=torch.float32)  # left on the device: finish waits for it

    def finish(per_view: torch.Tensor) -> torch.Tensor:
        return _finish(per_view.to("cpu"), pool)

    yield from in_input_order(finish_pieces(pieces, run, finish, VIDEO_ERRORS))
