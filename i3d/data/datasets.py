"""Datasets: annotation lists (mmaction, Kinetics CSV, folder-per-class) and a torch Dataset.

A missing or corrupt video never stops a long run: :class:`VideoDataset` logs it, counts it
(across DataLoader workers) and returns ``None``, which :func:`skip_collate` drops.
"""

from __future__ import annotations

import csv
import gc
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate, get_worker_info

from i3d.data.decode import VIDEO_SUFFIXES, VideoDecodeError, open_frames_dir, open_video
from i3d.data.handoff import WorkerLoader
from i3d.data.pipeline import Pipeline, ViewPiece, join_pieces
from i3d.data.rng import sample_rng

log = logging.getLogger(__name__)

Kind = Literal["auto", "videos", "rawframes", "kinetics_csv", "folders"]
KINDS = ("auto", "videos", "rawframes", "kinetics_csv", "folders")


class AnnotationError(ValueError):
    """An annotation list is unreadable or holds a malformed line."""


class UnknownClassError(AnnotationError):
    """A dataset names a class that is not in the label list it is read with."""


@attrs.frozen
class Sample:
    """One annotated video: file (or frame directory) and its class index."""

    path: Path
    label: int
    total_frames: int | None = None
    """Frame count given by a rawframes list (None: read from the video)."""
    source: str = ""
    """Where the sample was declared (``list.txt:12``), for error messages."""


def load_annotations(
    list_path: str | os.PathLike[str],
    data_root: str | os.PathLike[str] | None = None,
    kind: Kind = "auto",
    labels: Sequence[str] | None = None,
) -> list[Sample]:
    """Samples of an annotation list, paths resolved against ``data_root``.

    ``kind``: ``videos`` (``path label``), ``rawframes`` (``dir total_frames label``),
    ``kinetics_csv`` (``label,youtube_id,time_start,time_end,split``; names through
    ``labels``, default the Kinetics-400 list; rows without a label, as in the official test
    split, are refused), ``folders`` (``list_path`` is a directory of one sub-directory per
    class; classes are ``labels`` or the sorted folder names). Class folders match label
    names with spaces and underscores treated alike.
    ``auto`` picks by a directory / ``.csv`` suffix / the number of fields per line.
    """
    list_path = Path(list_path)
    root = Path(data_root) if data_root is not None else None
    if kind not in KINDS:
        raise AnnotationError(f"unknown annotation kind {kind!r}; choose one of {KINDS}")
    if kind == "folders" or (kind == "auto" and list_path.is_dir()):
        return folder_samples(list_path, labels)
    if not list_path.is_file():
        raise AnnotationError(f"annotation list {list_path} does not exist")
    if kind == "kinetics_csv" or (kind == "auto" and list_path.suffix.lower() == ".csv"):
        return _kinetics_csv(list_path, root, labels)
    lines = _read_lines(list_path)
    if kind == "auto":
        first = lines[0][1].split()
        kind = "rawframes" if len(first) >= 3 and first[-2].isdigit() else "videos"
    return [_list_line(list_path, number, text, root, kind) for number, text in lines]


def _read_lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a BOM is not part of the first path
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"cannot read annotation list {path}: {exc}") from exc
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise AnnotationError(f"annotation list {path} is empty")
    return lines


def _resolve(root: Path | None, name: str) -> Path:
    return root / name if root is not None else Path(name)


def _list_line(list_path: Path, number: int, text: str, root: Path | None, kind: str) -> Sample:
    where = f"{list_path}:{number}"
    fields = text.rsplit(maxsplit=2 if kind == "rawframes" else 1)
    expected = "dir total_frames label" if kind == "rawframes" else "path label"
    try:
        if len(fields) != (3 if kind == "rawframes" else 2):
            raise ValueError
        label = int(fields[-1])
        total = int(fields[1]) if kind == "rawframes" else None
    except ValueError:
        raise AnnotationError(
            f"{where}: expected '{expected}' (space-separated, integer label), got {text!r}"
        ) from None
    if label < 0 or (total is not None and total < 1):
        raise AnnotationError(f"{where}: labels must be >= 0 and frame counts >= 1, got {text!r}")
    return Sample(_resolve(root, fields[0]), label, total, where)


def _class_key(name: str) -> str:
    """Folder/label name with underscores read as spaces (Kinetics folders use either)."""
    return name.replace("_", " ")


def _class_index(labels: Sequence[str]) -> dict[str, int]:
    """Class name → index, each also under its :func:`_class_key` (read by :func:`_find_class`).

    An exact name wins over a respelled one, so ``a_b`` and ``a b`` may both be classes.
    """
    index = {name: i for i, name in enumerate(labels)}
    for i, name in enumerate(labels):
        index.setdefault(_class_key(name), i)
    return index


def _find_class(index: dict[str, int], name: str) -> int | None:
    """Index of class ``name``: exact, else with spaces and underscores treated alike."""
    found = index.get(name)
    return found if found is not None else index.get(_class_key(name))


def _kinetics_csv(path: Path, root: Path | None, labels: Sequence[str] | None) -> list[Sample]:
    if labels is None:
        from i3d.weights.labels import kinetics_labels

        labels = kinetics_labels(400)
    index = _class_index(labels)
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise AnnotationError(f"cannot read Kinetics CSV {path}: {exc}") from exc
    samples = []
    unlabelled = []
    for number, row in enumerate(rows, 2):
        where = f"{path}:{number}"
        try:
            start, end = int(row["time_start"]), int(row["time_end"])
            name = f"{row['youtube_id']}_{start:06d}_{end:06d}.mp4"
        except (KeyError, TypeError, ValueError):
            raise AnnotationError(
                f"{where}: expected columns label,youtube_id,time_start,time_end,split with "
                f"integer times, got {row}"
            ) from None
        label_name = (row.get("label") or "").strip()
        if not label_name:
            unlabelled.append(where)
            continue
        label = _find_class(index, label_name)
        if label is None:
            raise UnknownClassError(
                f"{where}: unknown class {label_name!r} (not in the label list)"
            )
        samples.append(
            Sample(_kinetics_file(root, name, label_name, labels[label]), label, None, where)
        )
    if unlabelled:
        raise AnnotationError(
            f"{path}: {len(unlabelled)} rows have no label (a test split?), first: "
            f"{unlabelled[0]}; training and evaluation need labelled rows"
        )
    if not samples:
        raise AnnotationError(f"Kinetics CSV {path} holds no rows")
    return samples


def _kinetics_file(root: Path | None, name: str, label_name: str, label: str) -> Path:
    """``root/<name>``, else ``root/<class folder>/<name>`` (spaces or underscores) if present."""
    flat = _resolve(root, name)
    if root is None or flat.exists():
        return flat
    for folder in dict.fromkeys((label_name, label, _class_key(label), label.replace(" ", "_"))):
        nested = root / folder / name
        if nested.exists():
            return nested
    return flat


def match_classes(names: Sequence[str], labels: Sequence[str]) -> list[int | None]:
    """Index in ``labels`` of each name (spaces and underscores alike), None where absent."""
    index = _class_index(labels)
    return [_find_class(index, name) for name in names]


def dataset_class_names(list_path: str | os.PathLike[str]) -> tuple[str, ...] | None:
    """Class names a dataset implies without a label file (None for mmaction lists).

    Sorted class folders for a folder-per-class tree, the Kinetics-400 list for a Kinetics CSV.
    """
    path = Path(list_path)
    if path.is_dir():
        return tuple(sorted(p.name for p in path.iterdir() if p.is_dir()))
    if path.suffix.lower() == ".csv":
        from i3d.weights.labels import kinetics_labels

        return kinetics_labels(400)
    return None


def folder_samples(
    root: str | os.PathLike[str], labels: Sequence[str] | None = None
) -> list[Sample]:
    """Videos in ``root/<class name>/``; class index from ``labels`` or sorted folder names.

    Folder names match ``labels`` with spaces and underscores treated alike.
    """
    root = Path(root)
    if not root.is_dir():
        raise AnnotationError(f"dataset folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    index = _class_index(labels if labels is not None else classes)
    found = {cls: _find_class(index, cls) for cls in classes}
    unknown = [cls for cls, label in found.items() if label is None]
    if unknown:
        raise UnknownClassError(f"{root}: class folders not in the label list: {unknown[:5]}")
    samples = [
        Sample(file, found[cls], None, str(file))
        for cls in classes
        for file in sorted((root / cls).iterdir())
        if file.suffix.lower() in VIDEO_SUFFIXES
    ]
    if not samples:
        raise AnnotationError(f"{root}: no videos ({', '.join(VIDEO_SUFFIXES)}) in class folders")
    return samples


def check_labels(samples: Sequence[Sample], num_classes: int) -> None:
    """Raise :class:`AnnotationError` if any label is outside ``0..num_classes-1``."""
    bad = [s for s in samples if s.label >= num_classes]
    if bad:
        raise AnnotationError(
            f"{len(bad)} labels out of range for a {num_classes}-class model, first: "
            f"{bad[0].source} (label {bad[0].label})"
        )


class VideoDataset(Dataset):
    """Samples through a pipeline: ``dataset[i]`` → ((V, C, T, H, W) float32, label) or None.

    Randomness of sample ``i`` comes from ``sample_rng(seed, epoch, i)`` only, so any sample
    can be reproduced in any worker. The key is an index (epoch from :meth:`set_epoch`) or an
    ``(epoch, index)`` pair, which reaches persistent DataLoader workers where ``set_epoch``
    on the main process's copy cannot. Unreadable samples are logged, counted in
    ``num_skipped`` (shared with DataLoader workers) and returned as None.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        pipeline: Pipeline,
        seed: int = 0,
        frames_template: str = "img_{:05d}.jpg",
        frames_start_index: int = 1,
    ) -> None:
        self.samples = list(samples)
        self.pipeline = pipeline
        self.seed = seed
        self.epoch = 0
        self.frames_template = frames_template
        self.frames_start_index = frames_start_index
        self._skipped = multiprocessing.get_context().Value("q", 0)

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws ``__getitem__`` uses."""
        self.epoch = epoch

    @property
    def num_skipped(self) -> int:
        """Samples that could not be read so far (all workers)."""
        return int(self._skipped.value)

    def load(self, index: int, epoch: int | None = None) -> tuple[torch.Tensor, int]:
        """Sample ``index`` of ``epoch`` (default: the set one) through the pipeline.

        Raises on unreadable input.
        """
        sample = self.samples[index]
        rng = sample_rng(self.seed, self.epoch if epoch is None else epoch, index)
        if sample.path.is_dir():
            reader = open_frames_dir(
                sample.path, self.frames_template, self.frames_start_index, sample.total_frames
            )
        else:
            reader = open_video(sample.path, backend=self.pipeline.decoder)
        with reader:
            return self.pipeline(reader, rng), sample.label

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int] | None:
        epoch, index = key if isinstance(key, tuple) else (None, key)
        try:
            return self.load(index, epoch)
        except (VideoDecodeError, OSError, ValueError) as exc:
            with self._skipped.get_lock():
                self._skipped.value += 1
            log.warning("skipping %s: %s", self.samples[index].source or index, exc)
            return None


def skip_collate(batch: list[Any]) -> Any:
    """DataLoader collate that drops skipped (None) samples; None if the whole batch failed."""
    kept = [item for item in batch if item is not None]
    return default_collate(kept) if kept else None


def worker_loader(dataset: Dataset[Any], workers: int, **options: Any) -> DataLoader[Any]:
    """A DataLoader whose ``workers`` forked processes decode ahead, each set up by
    :func:`worker_init`.

    The parent's garbage is collected first, and each worker freezes what it inherits: a
    worker that collected the parent's garbage would run destructors whose thread pools
    exist only in the parent (an OpenVINO compiled model's hung a worker for good). Workers
    put their items in shared memory before queueing them (:mod:`i3d.data.handoff`), so a
    full ``/dev/shm`` or a small ``ulimit -f`` ends the iteration with a
    :class:`~i3d.data.handoff.SharedMemoryError` instead of a hang.
    """
    gc.collect()
    return WorkerLoader(dataset, num_workers=workers, worker_init_fn=worker_init, **options)


def worker_init(_worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: one torch and decoder thread per worker (workers already
    parallelise; OpenCV's thread count is left alone, as setting it in a forked child hangs).

    Ctrl-C (sent to the whole process group) is left to the main process, which stops at a
    safe point and shuts its workers down. SIGTERM still ends a worker at once (it is how
    the loader and the interpreter's exit stop workers), but with exit status 0: a worker
    killed by a signal makes torch raise in the main process wherever it happens to be,
    while a scheduler's SIGTERM to the whole group must reach the main process's handler,
    which stops at a step boundary and saves.
    """
    gc.freeze()  # what the parent left is never collected here (see worker_loader)
    torch.set_num_threads(1)  # the decoders follow it (decode.decoder_threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_quietly)
    _die_with_parent()


def _die_with_parent() -> None:
    """End this worker as soon as the process that started it is gone (checked every
    second by a daemon thread). torch's own check only leaves the worker loop, and a worker
    whose reader died (a killed rank) then blocks for good at interpreter exit, flushing
    to that reader, and holds the job's output pipes open."""
    # the parent as recorded when it started this worker: a worker whose parent died while
    # it was still starting up (getppid() is already the reaper) must leave too
    started_by = multiprocessing.parent_process()
    parent = started_by.pid if started_by is not None and started_by.pid else os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="i3d-parent-watch", daemon=True).start()


def _exit_quietly(_signum: int, _frame: Any) -> None:
    """A loader worker's SIGTERM handler: leave now, as a clean exit."""
    os._exit(0)


class _ViewsOf(Dataset):
    """Test-time uint8 views of each source, or the error text when it cannot be read."""

    def __init__(
        self,
        sources: Sequence[str | os.PathLike[str]],
        pipeline: Pipeline,
        errors: tuple[type[BaseException], ...],
    ) -> None:
        self.sources, self.pipeline, self.errors = list(sources), pipeline, errors

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> torch.Tensor | str:
        try:
            return self.pipeline.frames(self.sources[index])
        except self.errors as exc:
            return str(exc) or type(exc).__name__


def auto_workers(count: int) -> int:
    """Decoding processes for ``count`` videos: none for one, else half the cores (max 4)."""
    return 0 if count <= 1 else min(4, max(1, (os.cpu_count() or 1) // 2))


def iter_views(
    sources: Sequence[str | os.PathLike[str]],
    pipeline: Pipeline,
    workers: int = 0,
    errors: tuple[type[BaseException], ...] = (VideoDecodeError, OSError, ValueError),
) -> Iterator[torch.Tensor | str]:
    """uint8 views (V, C, T, H, W) of each source in order; a failed source yields its error.

    With ``workers`` > 0, DataLoader processes decode the next videos while the caller runs
    the model on the current one (at most ``workers`` videos ahead, to bound memory).
    """
    dataset = _ViewsOf(sources, pipeline, errors)
    if workers == 0:
        yield from (dataset[i] for i in range(len(dataset)))
        return
    yield from worker_loader(dataset, workers, batch_size=None, prefetch_factor=1)


class _PiecesOf(IterableDataset):
    """(source index, view piece) of each source's pieces; a failed source ends with its error.

    In DataLoader workers, worker w streams sources w, w + workers, ...
    """

    def __init__(
        self,
        sources: Sequence[str | os.PathLike[str]],
        pipeline: Pipeline,
        errors: tuple[type[BaseException], ...],
        clips_per_piece: int | None,
    ) -> None:
        self.sources, self.pipeline, self.errors = list(sources), pipeline, errors
        self.clips_per_piece = clips_per_piece

    def __iter__(self) -> Iterator[tuple[int, ViewPiece | str]]:
        info = get_worker_info()
        first, step = (0, 1) if info is None else (info.id, info.num_workers)
        for index in range(first, len(self.sources), step):
            try:
                for piece in self.pipeline.pieces(
                    self.sources[index], clips_per_piece=self.clips_per_piece
                ):
                    yield index, piece
            except self.errors as exc:
                yield index, str(exc) or type(exc).__name__


def iter_pieces(
    sources: Sequence[str | os.PathLike[str]],
    pipeline: Pipeline,
    workers: int = 0,
    errors: tuple[type[BaseException], ...] = (VideoDecodeError, OSError, ValueError),
    clips_per_piece: int | None = 1,
    pin_memory: bool = False,
) -> Iterator[tuple[int, ViewPiece | str]]:
    """(source index, :class:`ViewPiece`) as each is decoded; a failed source yields its error.

    Streams what :func:`iter_views` gives whole: each source's pieces come in order, the last
    with ``piece.last`` set, or (when it cannot be read) an error text after any pieces
    already given, so a caller that runs and drops each piece holds about one piece per
    worker however long a video is. With ``workers`` > 0, worker w decodes sources w,
    w + workers, ... and their pieces arrive interleaved (round-robin over the workers), each
    worker at most one piece ahead. Pieces travel from the workers as uint8 (a quarter of
    float32's bytes); ``pin_memory`` (for a cuda or npu model) has the loader's pin thread
    put them in page-locked memory, so their copy to the device can run asynchronously.
    """
    dataset = _PiecesOf(sources, pipeline, errors, clips_per_piece)
    if workers == 0:
        yield from dataset
        return
    yield from worker_loader(
        dataset,
        min(workers, max(1, len(dataset.sources))),
        batch_size=None,
        prefetch_factor=1,
        pin_memory=pin_memory,
    )


_Result = TypeVar("_Result")


def in_input_order(results: Iterable[tuple[int, _Result]]) -> Iterator[_Result]:
    """Values that arrive as (input index, value) in any order (decoding workers interleave
    videos), yielded in index order 0, 1, 2, ... as soon as each is next."""
    finished: dict[int, _Result] = {}
    given = 0
    for index, value in results:
        finished[index] = value
        while given in finished:
            yield finished.pop(given)
            given += 1


def note_warnings(
    pieces: Iterable[tuple[int, ViewPiece | str]],
    on_warnings: Callable[[int, tuple[str, ...]], None] | None,
) -> Iterator[tuple[int, ViewPiece | str]]:
    """``pieces`` passed on as they come, telling ``on_warnings`` (source index, warnings)
    once for each source whose pieces carry warnings (a truncated video), before any result
    of that source can be finished: they travel from the loader workers on the pieces."""
    told: set[int] = set()
    for index, piece in pieces:
        if on_warnings is not None and not isinstance(piece, str) and index not in told:
            if piece.warnings:
                on_warnings(index, piece.warnings)
            told.add(index)
        yield index, piece


def finish_pieces(
    pieces: Iterable[tuple[int, ViewPiece | str]],
    run: Callable[[ViewPiece], torch.Tensor],
    finish: Callable[[torch.Tensor], _Result],
    errors: tuple[type[BaseException], ...],
) -> Iterator[tuple[int, _Result | str]]:
    """(source index, result or error text) as each source's last piece has run.

    ``run`` maps a piece to its per-view outputs; at a source's last piece they are joined in
    view order (:func:`~i3d.data.pipeline.join_pieces`) and given to ``finish``. A source
    that could not be read, or whose piece raised one of ``errors``, yields its error once.
    A source is finished only after the next piece has been run: a ``run`` that queues work
    on a device without waiting for it keeps the device busy with that piece while
    ``finish`` waits for the finished source's outputs.
    """
    outputs: dict[int, list[torch.Tensor]] = {}
    failed: set[int] = set()
    held: tuple[int, list[torch.Tensor], int] | None = None  # run, not yet finished

    def settle(index: int, parts: list[torch.Tensor], crops: int) -> tuple[int, _Result | str]:
        try:
            return index, finish(join_pieces(parts, crops))
        except errors as exc:
            return index, str(exc)

    for index, piece in pieces:
        if index in failed:
            continue
        if isinstance(piece, str):  # it could not be read (after any pieces it gave)
            outputs.pop(index, None)
            yield index, piece
            continue
        try:
            outputs.setdefault(index, []).append(run(piece))
        except errors as exc:
            outputs.pop(index, None)
            failed.add(index)
            yield index, str(exc)
            continue
        except BaseException:  # Ctrl-C in the next piece: the finished source still counts
            if held is not None:
                yield settle(*held)
            raise
        if held is not None:
            yield settle(*held)
            held = None
        if piece.last:
            held = (index, outputs.pop(index), piece.crops)
    if held is not None:
        yield settle(*held)
