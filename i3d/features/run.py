"""Snippet features of many videos into a folder, in one process or on N ranks, resumable.

One mechanism for every world size: :func:`~i3d.distributed.sharded.run_sharded` gives each
rank a share of the videos (balanced by frame count); the rank that computes a video writes
its ``.npy`` and timestamps (atomically, named by the video) and hands back the manifest
record, which ``run_sharded`` keeps in ``DIR/.i3d-parts`` until rank 0 writes the manifest.
A rerun reuses every video whose record matches the settings and whose file hashes to the
recorded SHA-256; an interrupted run's records are recovered from the parts folder first.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np

from i3d.distributed.shard import video_cost
from i3d.distributed.sharded import Failed, ResultFolder, run_sharded
from i3d.features.extract import SnippetExtractor, VideoSnippets, snippet_flow_folder
from i3d.features.frames import frame_transform
from i3d.features.output import LAYOUTS, SnippetFolder, check_ids, video_id
from i3d.features.protocol import SnippetProtocol
from i3d.flow.recipe import FlowConfig
from i3d.flow.store import FlowFolder
from i3d.utils.files import remove_stale_temporaries, sha256_file


@attrs.frozen
class SnippetJob:
    """What every rank needs to extract like the others (pickled to spawned ranks)."""

    weights: str
    protocol: SnippetProtocol
    output: str
    preset: str | None = None
    batch_size: int = 8
    backend: str = "torch"
    device: str | None = None
    workers: int | None = None
    decoder: str = "pyav"
    streams: tuple[str, ...] = ("rgb",)
    """``rgb``, ``flow``, or both (concatenated in this order, per snippet)."""
    flow_weights: str | None = None
    """A Flow-stream I3D (``flow`` in ``streams``)."""
    flow: FlowConfig = attrs.field(factory=FlowConfig)
    """How the flow stream's TV-L1 runs (its ``device`` follows the rank's)."""
    flow_dir: str | None = None
    """A flow folder (``i3d flow``) the flow stream reads, computing into it what it lacks."""
    layout: str = attrs.field(default="tc", validator=attrs.validators.in_(tuple(LAYOUTS)))
    """How each ``.npy`` holds a video's features (:data:`~i3d.features.output.LAYOUTS`):
    ``tc`` (snippets, C), ``ct`` (C, snippets; MS-TCN, ASFormer), ``tkc`` (snippets,
    crops, C; RTFM, MGFN)."""

    def __attrs_post_init__(self) -> None:
        if not self.streams or set(self.streams) - {"rgb", "flow"}:
            raise ValueError(f"streams must be rgb, flow or both, not {self.streams}")
        if "flow" in self.streams and self.flow_weights is None:
            raise ValueError("the flow stream needs Flow-stream weights (flow_weights)")
        if self.flow_dir is not None and "flow" not in self.streams:
            raise ValueError(
                "a flow folder serves the flow stream; ask for it (--stream flow or both, with "
                "flow weights) or drop --flow-dir"
            )


@attrs.frozen
class SnippetRun:
    """What a run did: records in input order (``error`` in failed ones), and how many of
    the videos were already there."""

    records: list[dict[str, Any]]
    reused: int

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "error" in r]


def settings_of(job: SnippetJob, extractors: Sequence[SnippetExtractor]) -> dict[str, Any]:
    """What decides a video's features, as recorded in (and compared against) the manifest:
    the protocol and the frame steps it resolved to, the streams and their weights (hashes),
    the flow recipe's settings, the flow folder read (its path and ``flow.json``: an 8-bit
    mmaction folder or float16 files give other features than computing flow), and the
    decoder."""
    first = extractors[0]
    settings: dict[str, Any] = {
        "protocol": first.protocol.to_dict(),
        "frames": first.transform.to_dict(),
        "preset": job.preset,
        "decoder": job.decoder,
    }
    if job.streams != ("rgb",):
        settings["streams"] = list(job.streams)
    if job.layout != "tc":  # recorded where it is not the default, as earlier runs lack it
        settings["layout"] = job.layout
    if "rgb" in job.streams:
        settings["weights"] = Path(job.weights).name
        settings["weights_sha256"] = sha256_file(job.weights)
    if job.flow_weights is not None and "flow" in job.streams:
        settings["flow_weights"] = Path(job.flow_weights).name
        settings["flow_weights_sha256"] = sha256_file(job.flow_weights)
        settings["flow"] = job.flow.recorded()
    store = extractors[-1].flow_store
    if store is not None:
        settings["flow_dir"] = store.recorded()
    return settings


def library_versions(decoder: str) -> dict[str, str]:
    """Versions of what computed the features (recorded; not compared on resume)."""
    import numpy
    import torch

    from i3d import __version__

    versions = {"i3d": __version__, "torch": torch.__version__, "numpy": numpy.__version__}
    if decoder == "pyav":
        import av

        versions["av"] = av.__version__
        versions["ffmpeg"] = ".".join(str(v) for v in av.library_versions.get("libavcodec", ()))
    return versions


def _processor(
    ctx: Any, job: SnippetJob, on_video: Callable[[], None] | None = None
) -> Callable[[Sequence[str]], Iterator[Any]]:
    """One rank: the model on its device; per video the reused or newly written record.
    ``on_video`` (one process only) hears of each video as it is done."""
    from i3d.distributed.devices import rank_device
    from i3d.features.pooled import feature_device
    from i3d.weights.two_stream import load_stream

    device = feature_device(job.backend, rank_device(job.backend, job.device, ctx))
    extractors = []
    if "rgb" in job.streams:
        model = load_stream(job.weights, "rgb", device)
        extractors.append(
            SnippetExtractor(model, job.protocol, job.batch_size, job.decoder, backend=job.backend)
        )
    if "flow" in job.streams:
        assert job.flow_weights is not None
        flow = attrs.evolve(job.flow, device=str(device)) if job.flow.on_device else job.flow
        model = load_stream(job.flow_weights, "flow", device)
        extractor = SnippetExtractor(
            model, job.protocol, job.batch_size, job.decoder, flow=flow, flow_dir=job.flow_dir,
            backend=job.backend,
        )  # fmt: skip
        extractors.append(extractor)
    folder = SnippetFolder(job.output)
    settings = settings_of(job, extractors)
    versions = library_versions(job.decoder)
    old = folder.records()

    def run(paths: Sequence[str]) -> Iterator[Any]:
        keep = {p for p in paths if folder.verified(old.get(p), settings)}
        todo = [Path(p) for p in paths if p not in keep]
        streams = [extractor.iter_videos(todo, job.workers) for extractor in extractors]
        for path in paths:
            if path in keep:
                yield {"record": old[path], "reused": True}
                if on_video is not None:
                    on_video()
                continue
            result = concatenate_streams([next(stream) for stream in streams])
            if result.ok:
                record = folder.write_video(result, settings, versions, job.layout)
                yield {"record": record, "reused": False}
            else:
                yield Failed(str(result.error))
            if on_video is not None:
                on_video()

    return run


def concatenate_streams(results: Sequence[VideoSnippets]) -> VideoSnippets:
    """One video's streams as one result: features concatenated per snippet (RGB first).

    The flow stream has one frame fewer (flow goes from each frame to the next), so where
    its count is one smaller the two-stream snippets are those the flow stream has, with
    its times."""
    failed = [r for r in results if not r.ok]
    if failed or len(results) == 1:
        return failed[0] if failed else results[0]
    count = min(r.features.shape[-2] for r in results)  # type: ignore[union-attr]
    features = np.concatenate([r.features[..., :count, :] for r in results], axis=-1)  # type: ignore[index]
    times = results[-1].times[:count]  # type: ignore[index]
    return VideoSnippets(results[0].path, features, times, results[0].timeline)


def _cost(reusable: frozenset[str], path: str) -> float:
    """A video's share of the work: its frames, or next to nothing when it is reused."""
    return 1.0 if path in reusable else float(video_cost(path))


def _fingerprint(job: SnippetJob) -> str:
    hashes = [sha256_file(job.weights) if "rgb" in job.streams else None]
    hashes.append(sha256_file(job.flow_weights) if job.flow_weights else None)
    settings = attrs.asdict(job, filter=lambda a, _: a.name != "workers")
    text = json.dumps([hashes, settings], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def claim_flow_dir(job: SnippetJob) -> FlowFolder:
    """The job's flow folder, claimed for its protocol and TV-L1 (see
    :func:`~i3d.features.extract.snippet_flow_folder`), or refused with what differs."""
    from i3d.weights.format import read_info

    assert job.flow_dir is not None and job.flow_weights is not None
    transform = frame_transform(job.protocol, read_info(job.flow_weights).preprocessing)
    return snippet_flow_folder(Path(job.flow_dir), job.protocol, transform, job.flow)


def _recover(folder: SnippetFolder) -> None:
    """Fold the records an interrupted run left in the parts folder into the manifest."""
    parts = ResultFolder(folder.parts)
    try:
        keys = json.loads((folder.parts / "manifest.json").read_text(encoding="utf-8"))["keys"]
    except (OSError, ValueError, KeyError, TypeError):
        shutil.rmtree(folder.parts, ignore_errors=True)
        return
    records = folder.records()
    for index in range(len(keys)):
        outcome = parts.outcome(index)
        if outcome is not None and outcome.ok and isinstance(outcome.value, dict):
            record = outcome.value.get("record")
            if isinstance(record, dict) and "path" in record:
                records[str(record["path"])] = record
    folder.write_manifest(list(records.values()))
    shutil.rmtree(folder.parts, ignore_errors=True)


def extract_snippets(
    paths: Sequence[Path],
    job: SnippetJob,
    world_size: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
    log_dir: str | os.PathLike[str] | None = None,
) -> SnippetRun | None:
    """Snippet features of ``paths`` into ``job.output`` on ``world_size`` ranks (or this
    torchrun job's); None on torchrun ranks other than 0 (rank 0 writes the manifest).
    ``log_dir`` gets a log per rank."""
    from i3d.distributed.devices import group_device
    from i3d.distributed.launch import env_launched

    check_ids(paths)
    folder = SnippetFolder(job.output)
    keys = [str(p) for p in paths]
    rank0 = not env_launched() or os.environ.get("RANK", "0") == "0"
    with folder.locked() if rank0 else contextlib.nullcontext():
        if rank0:
            remove_stale_temporaries(folder.path)  # left by a killed run's writers
            if folder.parts.is_dir():
                _recover(folder)
            if job.flow_dir is not None:  # other settings are refused before any rank starts
                claim_flow_dir(job)
        old = folder.records()
        processor = functools.partial(_processor, job=job)
        if on_progress is not None and world_size == 1 and not env_launched():
            done = [0]

            def on_video() -> None:  # in this process: no ranks to poll
                done[0] += 1
                on_progress(done[0], len(keys))

            processor = functools.partial(_processor, job=job, on_video=on_video)
        outcomes = run_sharded(
            keys,
            processor,
            folder.parts,
            costs=functools.partial(_cost, frozenset(k for k in keys if k in old)),
            fingerprint=_fingerprint(job),
            world_size=world_size,
            backend=group_device(job.backend, job.device),
            catch=(),
            on_progress=on_progress,
            log_dir=log_dir,
        )
        if outcomes is None:
            return None
        records, reused = [], 0
        for key, outcome in zip(keys, outcomes, strict=True):
            if outcome.ok:
                records.append(outcome.value["record"])
                reused += bool(outcome.value["reused"])
            else:
                records.append({"video": video_id(Path(key)), "path": key, "error": outcome.error})
        ours = set(keys)
        kept = [r for p, r in old.items() if p not in ours]
        folder.write_manifest(kept + records)
        shutil.rmtree(folder.parts, ignore_errors=True)
    return SnippetRun(records, reused)
