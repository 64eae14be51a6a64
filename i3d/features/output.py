"""A folder of snippet features: ``<video id>.npy`` per video, timestamps and a manifest.

    DIR/<id>.npy          float32 (snippets, C), or (crops, snippets, C); other axis
                          orders by :data:`LAYOUTS` (MS-TCN's (C, snippets), RTFM's
                          (snippets, crops, C))
    DIR/<id>.times.csv    per snippet: timeline frames, seconds, decoded frames read
    DIR/manifest.jsonl    one JSON record per video: how its features were made, the
                          file's SHA-256 and size, frame count, rates, ``warnings`` where
                          the video had some (a truncated file); or why it failed

A record's ``settings`` (protocol, weights hash, decoder) decide whether a rerun may reuse
the file; its ``versions`` only document. Files are written atomically; one run at a time
writes a folder (a lock file), and the manifest is rewritten (atomically) at the end of a
run, so features are only reused when the manifest vouches for their exact bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from einops import rearrange

from i3d.features.extract import VideoSnippets
from i3d.utils.files import OutputError, atomic_path, ensure_dir, exclusive_lock, sha256_file
from i3d.utils.untrusted import load_json

MANIFEST = "manifest.jsonl"
LAYOUTS: dict[str, str] = {"tc": "k t c", "ct": "k c t", "tkc": "t k c"}
"""How a video's array is stored, from the (crops, snippets, C) computed: ``tc`` (snippets,
C), ``ct`` (C, snippets; MS-TCN), crops kept as the first axis (10-crop features), or ``tkc``
(snippets, crops, C; RTFM's and MGFN's 10-crop files, always with the crop axis)."""


def stored_layout(features: np.ndarray, layout: str) -> np.ndarray:
    """``features`` (snippets, C) or (crops, snippets, C) in ``layout`` (see :data:`LAYOUTS`)."""
    crops = features.ndim == 3
    out = rearrange(features if crops else features[None], f"k t c -> {LAYOUTS[layout]}")
    return np.ascontiguousarray(out if crops or layout == "tkc" else out[0])
PARTS = ".i3d-parts"
LOCK = ".i3d-lock"
TIMES_HEADER = "snippet,start_frame,end_frame,start_s,end_s,first_read,end_read"


def video_id(path: Path) -> str:
    """The name a video's features get: its file stem (a frame folder's name)."""
    return path.name if path.is_dir() else path.stem


def check_ids(paths: Sequence[Path]) -> None:
    """Refuse inputs whose features would share a file name."""
    seen: dict[str, Path] = {}
    for path in paths:
        other = seen.setdefault(video_id(path), path)
        if other != path:
            raise OutputError(
                f"{other} and {path} would both write {video_id(path)}.npy (features are named "
                "by the video's file name); rename one, or extract them into separate folders"
            )


class SnippetFolder:
    """The output folder of snippet features (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.is_file():
            raise OutputError(f"{self.path} is a file; snippet features go to a folder (-o DIR)")
        if self.path.is_dir():
            names = {n for n in os.listdir(self.path) if n not in (LOCK, PARTS)}
            if "index.json" in names:
                raise OutputError(
                    f"{self.path} holds pooled features (index.json), not snippet features; "
                    "choose another -o"
                )
            ours = MANIFEST in names or (self.path / PARTS).is_dir()
            if names and not ours:
                raise OutputError(
                    f"{self.path} is a non-empty folder without {MANIFEST}, not an i3d snippet "
                    "features folder; choose another -o (or an empty folder)"
                )
        self.parts = self.path / PARTS

    # -- the manifest ---------------------------------------------------------------------
    def records(self) -> dict[str, dict[str, Any]]:
        """The manifest's records by video path, in file order."""
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            return {}
        records: dict[str, dict[str, Any]] = {}
        try:
            lines = manifest.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise OutputError(f"cannot read {manifest}: {exc}") from exc
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = load_json(line, f"{manifest}:{number}")
                records[str(record["path"])] = record
            except (ValueError, KeyError, TypeError):
                raise OutputError(
                    f"{manifest}:{number} is not a feature record; delete the folder to start "
                    "over, or write to another -o"
                ) from None
        return records

    def write_manifest(self, records: Sequence[dict[str, Any]]) -> None:
        ensure_dir(self.path)
        with atomic_path(self.path / MANIFEST) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, sort_keys=True) + "\n")

    def reusable(self, record: dict[str, Any] | None, settings: dict[str, Any]) -> bool:
        """Whether a record was made with ``settings`` and its file is there, of its size."""
        if record is None or "error" in record or record.get("settings") != settings:
            return False
        file = self.path / str(record.get("file", ""))
        try:
            return file.is_file() and file.stat().st_size == record.get("bytes")
        except OSError:
            return False

    def verified(self, record: dict[str, Any] | None, settings: dict[str, Any]) -> bool:
        """:meth:`reusable`, and the file's bytes hash to the recorded SHA-256."""
        if not self.reusable(record, settings):
            return False
        assert record is not None
        return sha256_file(self.path / record["file"]) == record.get("sha256")

    # -- one video's files ------------------------------------------------------------------
    def write_video(
        self, result: VideoSnippets, settings: dict[str, Any], versions: dict, layout: str = "tc"
    ) -> dict:
        """Write one video's features (in ``layout``, see :data:`LAYOUTS`) and timestamps
        atomically; return its record."""
        assert result.features is not None and result.times is not None
        assert result.timeline is not None
        name = video_id(result.path)
        npy = self.path / f"{name}.npy"
        features = stored_layout(result.features, layout)
        with atomic_path(npy) as tmp, open(tmp, "wb") as fh:
            np.save(fh, features, allow_pickle=False)
        with atomic_path(self.path / f"{name}.times.csv") as tmp:
            tmp.write_text(_times_csv(result.times), encoding="utf-8")
        timeline = result.timeline
        warnings = {"warnings": list(timeline.warnings)} if timeline.warnings else {}
        return {
            "video": name,
            "path": str(result.path),
            "file": npy.name,
            "times": f"{name}.times.csv",
            "shape": list(features.shape),
            "dtype": "float32",
            "bytes": npy.stat().st_size,
            "sha256": sha256_file(npy),
            "frames": timeline.frames,
            "source_fps": timeline.source_fps,
            "fps": timeline.fps,
            "timeline_frames": timeline.ticks,
            "snippets": int(result.times.shape[0]),
            "settings": settings,
            "versions": versions,
            **warnings,
        }

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold the folder's lock for one run; a second run at once is refused."""
        ensure_dir(self.path)
        return exclusive_lock(self.path / LOCK, str(self.path))


def _times_csv(times: np.ndarray) -> str:
    """The timestamps table as CSV (frames as integers, seconds to the microsecond)."""
    lines = [TIMES_HEADER]
    for i, (start, end, start_s, end_s, first, stop) in enumerate(times.tolist()):
        secs = "" if np.isnan(start_s) else f"{start_s:.6f},{end_s:.6f}"
        secs = secs or ","
        lines.append(f"{i},{int(start)},{int(end)},{secs},{int(first)},{int(stop)}")
    return "\n".join(lines) + "\n"
