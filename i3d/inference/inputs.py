"""What a command line names: video files, frame folders, globs, and the default weights."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from i3d.data.decode import IMAGE_SUFFIXES, VIDEO_SUFFIXES, VideoDecodeError
from i3d.weights.format import WeightsError

DEFAULT_MODEL = "i3d_inception_k400_rgb"

#: progress within one video: called with (views done, views in the video), first with 0
ViewProgress = Callable[[int, int], None]

#: errors that fail one video without stopping a run over many
VIDEO_ERRORS: tuple[type[BaseException], ...] = (VideoDecodeError, OSError, ValueError)


class InputError(ValueError):
    """A command-line input (file, directory, glob) names no video."""


def default_weights() -> Path:
    """The pulled Kinetics-400 model, or an error asking for ``--weights``."""
    try:
        from i3d.weights.hub import resolve
    except ImportError:
        raise WeightsError("no default weights in this install; pass --weights PATH") from None
    try:
        return Path(resolve(DEFAULT_MODEL))
    except WeightsError as exc:
        raise WeightsError(f"{exc}; or pass --weights PATH") from None


def expand_inputs(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Videos from files, directories and glob patterns.

    A directory gives its video files and its folders of extracted frames, recursively and
    sorted (entries starting with "." are skipped); a folder of frames (images, no videos,
    no sub-folders) is one video. A glob's matches are expanded the same way; its other
    files (a text file, single frames) are skipped, and a glob with nothing usable is an
    error.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            videos = _folder_videos(path)
            if not videos:
                raise InputError(
                    f"directory {path} holds no videos ({', '.join(VIDEO_SUFFIXES)}) and no "
                    "folders of extracted frames"
                )
            found += videos
        elif path.exists():
            found.append(path)
        elif glob.has_magic(str(item)):
            found += _glob_videos(str(item))
        else:
            raise InputError(f"input {path} does not exist")
    return found


def _folder_videos(folder: Path) -> list[Path]:
    """Video files and frame folders under ``folder``, sorted; ``[folder]`` if it is one."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files = [f for f in files if not f.startswith(".")]
        here = Path(root)
        videos = [here / f for f in files if Path(f).suffix.lower() in VIDEO_SUFFIXES]
        if not videos and not dirs and any(Path(f).suffix.lower() in IMAGE_SUFFIXES for f in files):
            found.append(here)  # a folder of extracted frames is one video
        found += videos
    return sorted(found)


def _glob_videos(pattern: str) -> list[Path]:
    """Videos among a glob's matches (video files; folders expanded as by ``_folder_videos``)."""
    matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
    if not matches:
        raise InputError(f"pattern {pattern!r} matches no files")
    found: list[Path] = []
    for match in matches:
        if match.is_dir():
            found += _folder_videos(match)
        elif match.suffix.lower() in VIDEO_SUFFIXES:
            found.append(match)
    found = list(dict.fromkeys(found))  # "**" matches a folder and what is inside it
    if not found:
        raise InputError(
            f"pattern {pattern!r} matches {len(matches)} entries but no videos "
            f"({', '.join(VIDEO_SUFFIXES)}) or folders of extracted frames; to read one folder "
            "of frames, pass the folder itself"
        )
    return found


def check_path_list(paths: Sequence[str | os.PathLike[str]]) -> None:
    """Refuse one path given where a list of paths is expected (a str would be split in chars)."""
    if isinstance(paths, str | bytes | os.PathLike):
        raise InputError(
            f"expected a list of video paths, got the single path {paths!r}; pass [path]"
        )
