"""Where ``i3d features`` writes: one ``.safetensors`` or a folder of ``.npy``, resumable.

A store records how its features were made (endpoint, pooling, weights, views); reopening it
with other settings is refused instead of mixing features, and a file that is not a features
file (model weights, say) is never overwritten. ``warnings`` (video → lines) records what was
wrong with videos whose features were still made (a truncated file), only where there are
some.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import attrs
import numpy as np
import torch

from i3d.utils.files import OutputError, atomic_path, ensure_dir, remove_stale_temporaries
from i3d.utils.untrusted import load_json


@attrs.frozen
class FeatureSetting:
    """How features were made: stored with them and checked when a run resumes."""

    endpoint: str
    pool: str
    weights: str
    """SHA-256 of the weights file."""
    views: str
    """The view protocol, e.g. ``val 1x1`` or ``test 10x3`` (clips × crops)."""
    flow: str = ""
    """Flow and two-stream weights: JSON of the TV-L1 (implementation, parameters, bound)
    and the flow folder read, if any (its path and ``flow.json``); empty for RGB weights."""

    def as_dict(self) -> dict[str, str]:
        """The settings to store (RGB weights' without the empty ``flow``, as before it)."""
        return {k: v for k, v in attrs.asdict(self).items() if k != "flow" or v}

    def check(self, path: Path, stored: dict[str, str]) -> None:
        """Raise :class:`OutputError` if ``stored`` settings differ from these (a file
        without ``flow`` holds features of RGB weights)."""
        ours = attrs.asdict(self)
        if stored and "flow" not in stored:
            stored = {**stored, "flow": ""}
        diff = [
            f"{k} {stored[k]!r} (now {ours[k]!r})"
            for k in SETTING_KEYS
            if stored.get(k, ours[k]) != ours[k]
        ]
        if diff:
            raise OutputError(
                f"{path} holds features made with other settings: {', '.join(diff)}; "
                "write to another -o, or delete it to start over"
            )


#: the settings a features file records
SETTING_KEYS = tuple(field.name for field in attrs.fields(FeatureSetting))


#: the one metadata key of a features .safetensors: JSON of the settings and the video list.
#: One key, because safetensors writes its metadata map in a random order per process, and
#: a rerun (or a sharded run) must give the same bytes.
FEATURES_KEY = "i3d.features"


def _stored_metadata(meta: dict[str, str]) -> dict[str, object] | None:
    """Settings and ``videos`` of a features file's metadata (the one-key form, or the
    per-key ``i3d.<name>`` form of earlier versions), or None if it is not a features file."""
    if FEATURES_KEY in meta:
        data = load_json(meta[FEATURES_KEY], FEATURES_KEY)
        return data if isinstance(data, dict) and "videos" in data else None
    if "i3d.videos" not in meta or "i3d.endpoint" not in meta:
        return None
    data: dict[str, object] = {k: meta[f"i3d.{k}"] for k in SETTING_KEYS if f"i3d.{k}" in meta}
    data["videos"] = load_json(meta["i3d.videos"], "i3d.videos")
    return data


def _warnings_of(stored: dict[str, object]) -> dict[str, list[str]]:
    """The ``warnings`` a store's metadata or index records (none in older files)."""
    found = stored.get("warnings")
    if not isinstance(found, dict):
        return {}
    return {str(k): [str(w) for w in v] for k, v in found.items() if isinstance(v, list)}


class SafetensorsFeatures:
    """One .safetensors: tensor ``"<i>"`` for video i of the metadata's ``videos`` list."""

    def __init__(self, path: Path, setting: FeatureSetting) -> None:
        from safetensors import SafetensorError, safe_open

        self.path, self.setting = path, setting
        remove_stale_temporaries(path.parent if str(path.parent) else Path("."), path.name)
        self.tensors: dict[str, torch.Tensor] = {}
        self.videos: list[str] = []
        self.warnings: dict[str, list[str]] = {}
        if path.exists():
            try:
                with safe_open(str(path), framework="pt") as fh:
                    stored = _stored_metadata(fh.metadata() or {})
                    if stored is None:
                        raise OutputError(
                            f"{path} exists and is not an i3d features file; refusing to "
                            "overwrite it (choose another -o)"
                        )
                    setting.check(path, {k: str(v) for k, v in stored.items() if k in SETTING_KEYS})
                    self.videos = [str(v) for v in stored["videos"]]
                    self.warnings = _warnings_of(stored)
                    self.tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
            except OutputError:
                raise
            except (SafetensorError, OSError, ValueError) as exc:
                raise OutputError(
                    f"{path} exists and is not a readable features file ({exc}); refusing to "
                    "overwrite it (choose another -o)"
                ) from exc
        self.done = set(self.videos)

    def has(self, video: Path) -> bool:
        return str(video) in self.done

    def add(self, video: Path, features: torch.Tensor, warnings: Sequence[str] = ()) -> None:
        self.tensors[str(len(self.videos))] = features.contiguous()
        self.videos.append(str(video))
        self.done.add(str(video))
        if warnings:
            self.warnings[str(video)] = list(warnings)

    def save(self) -> None:
        from safetensors.torch import save_file

        data = {**self.setting.as_dict(), "videos": self.videos}
        if self.warnings:
            data["warnings"] = self.warnings
        meta = {FEATURES_KEY: json.dumps(data, sort_keys=True)}
        with atomic_path(self.path) as tmp:
            save_file(self.tensors, str(tmp), metadata=meta)


class NpyFeatures:
    """A folder of ``<stem>-<hash>.npy`` files plus ``index.json`` (settings, file → video)."""

    def __init__(self, path: Path, setting: FeatureSetting) -> None:
        self.path, self.setting = path, setting
        index = path / "index.json"
        if path.is_dir() and not index.is_file() and any(path.iterdir()):
            raise OutputError(
                f"{path} is a non-empty folder without index.json, not an i3d features folder; "
                "choose another -o"
            )
        ensure_dir(path)
        try:
            stored = load_json(index.read_text(), str(index)) if index.is_file() else {}
        except (OSError, ValueError) as exc:
            raise OutputError(f"{index} is not a readable features index ({exc})") from exc
        setting.check(path, {k: v for k, v in stored.items() if k in SETTING_KEYS})
        self.index: dict[str, str] = stored.get("files", {})
        self.warnings = _warnings_of(stored)
        remove_stale_temporaries(path)
        if not index.is_file():  # the folder is ours from the start: a killed run resumes
            self.save()

    @staticmethod
    def name(video: Path) -> str:
        digest = hashlib.sha1(str(video.resolve()).encode()).hexdigest()[:8]
        return f"{video.stem}-{digest}.npy"

    def has(self, video: Path) -> bool:
        """Whether the video's file is there: written (atomically) under this folder's
        settings, also by a run killed before it updated the index, which this one does."""
        name = self.name(video)
        if not (self.path / name).is_file():
            return False
        self.index.setdefault(name, str(video))
        return True

    def add(self, video: Path, features: torch.Tensor, warnings: Sequence[str] = ()) -> None:
        name = self.name(video)
        with atomic_path(self.path / name) as tmp, open(tmp, "wb") as fh:
            np.save(fh, features.numpy())
        self.index[name] = str(video)
        if warnings:
            self.warnings[str(video)] = list(warnings)

    def save(self) -> None:
        data: dict[str, object] = {**self.setting.as_dict(), "files": self.index}
        if self.warnings:
            data["warnings"] = self.warnings
        with atomic_path(self.path / "index.json") as tmp:
            tmp.write_text(json.dumps(data, indent=1) + "\n")


def open_feature_store(
    path: str | os.PathLike[str], setting: FeatureSetting
) -> SafetensorsFeatures | NpyFeatures:
    """The store at ``path`` (``.safetensors`` → one file, else a folder of ``.npy``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return SafetensorsFeatures(path, setting)
    if path.is_file():
        raise OutputError(f"{path} is a file; give a .safetensors path or a folder for .npy")
    return NpyFeatures(path, setting)
