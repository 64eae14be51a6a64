"""Which frames make a clip: mmaction2's ``SampleFrames`` and ``DenseSampleFrames``.

Test-mode indices equal mmaction2 1.x exactly (including numpy's round-half-to-even of clip
offsets and ``start_index`` added after wrapping). Train mode draws from the
``numpy.random.Generator`` handed in, so the same distribution but not mmaction's legacy
global-RNG stream.
"""

from __future__ import annotations

from typing import Literal

import attrs
import numpy as np


def _positive(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


@attrs.frozen
class SampleFrames:
    """``num_clips`` clips of ``clip_len`` frames taken every ``frame_interval`` frames.

    Calling it with the video's frame count returns the 1-D int32 frame indices, view-major
    (clip 0's ``clip_len`` indices, then clip 1's, ...), plus ``start_index``.
    """

    clip_len: int = attrs.field(validator=_positive)
    frame_interval: int = attrs.field(default=1, validator=_positive)
    num_clips: int = attrs.field(default=1, validator=_positive)
    test_mode: bool = False
    out_of_bound_opt: Literal["loop", "repeat_last"] = attrs.field(
        default="loop", validator=attrs.validators.in_(("loop", "repeat_last"))
    )
    keep_tail_frames: bool = False
    twice_sample: bool = False
    start_index: int = 0

    @property
    def num_views(self) -> int:
        """Clips per call (twice_sample doubles them in test mode)."""
        return self.num_clips * (2 if self.twice_sample and self.test_mode else 1)

    def __call__(self, total_frames: int, rng: np.random.Generator | None = None) -> np.ndarray:
        if total_frames < 1:
            raise ValueError(f"cannot sample frames from a video with {total_frames} frames")
        if not self.test_mode and rng is None:
            raise ValueError("train-mode sampling needs a numpy Generator (see i3d.data.rng)")
        offsets = self._offsets(total_frames, rng)
        return self._finish(offsets, total_frames)

    def _offsets(self, total: int, rng: np.random.Generator | None) -> np.ndarray:
        if self.test_mode:
            return self._test_offsets(total, (self.clip_len - 1) * self.frame_interval + 1)
        assert rng is not None
        return self._train_offsets(total, self.clip_len * self.frame_interval, rng)

    def _train_offsets(self, total: int, ori_len: int, rng: np.random.Generator) -> np.ndarray:
        n = self.num_clips
        if self.keep_tail_frames:
            avg = (total - ori_len + 1) / float(n)
            if total > ori_len - 1:
                return (np.arange(n) * avg + rng.uniform(0, avg, n)).astype(np.int32)
            return np.zeros(n, dtype=np.int32)
        avg = (total - ori_len + 1) // n
        if avg > 0:
            return np.arange(n) * avg + rng.integers(avg, size=n)
        if total > max(n, ori_len):
            return np.sort(rng.integers(total - ori_len + 1, size=n))
        if avg == 0:
            return np.around(np.arange(n) * ((total - ori_len + 1.0) / n))
        return np.zeros(n, dtype=np.int32)

    def _test_offsets(self, total: int, ori_len: int) -> np.ndarray:
        n = self.num_clips
        if self.clip_len == 1:  # 2-D sampling: segment centres, kept as floats until the cast
            avg = total / float(n)
            base = np.arange(n) * avg
            offsets = base + avg / 2.0
            return np.concatenate([offsets, base]) if self.twice_sample else offsets
        max_offset = max(total - ori_len, 0)
        views = n * 2 if self.twice_sample else n
        if views > 1:
            if n == 1:
                raise ValueError("twice_sample needs num_clips > 1 (mmaction divides by 0)")
            return np.round(np.arange(views) * (max_offset / float(n - 1)))
        return np.array([max_offset // 2])

    def _finish(self, offsets: np.ndarray, total: int) -> np.ndarray:
        inds = offsets[:, None] + np.arange(self.clip_len)[None, :] * self.frame_interval
        if self.out_of_bound_opt == "loop":
            inds = np.mod(inds, total)
        else:
            safe = inds < total
            last = np.max(safe * inds, axis=1, keepdims=True)
            inds = np.where(safe, inds, last)
        return (inds.reshape(-1) + self.start_index).astype(np.int32)


@attrs.frozen
class DenseSampleFrames(SampleFrames):
    """Clips spread densely inside a ``sample_range`` window (mmaction ``DenseSampleFrames``).

    Test mode evaluates ``num_sample_positions`` window starts, each giving ``num_clips`` clips.
    """

    sample_range: int = attrs.field(default=64, validator=_positive)
    num_sample_positions: int = attrs.field(default=10, validator=_positive)

    @property
    def num_views(self) -> int:
        return self.num_clips * (self.num_sample_positions if self.test_mode else 1)

    def _offsets(self, total: int, rng: np.random.Generator | None) -> np.ndarray:
        positions = max(1, 1 + total - self.sample_range)
        base = np.arange(self.num_clips) * (self.sample_range // self.num_clips)
        if self.test_mode:
            starts = np.linspace(0, positions - 1, num=self.num_sample_positions, dtype=int)
            return np.concatenate([(base + s) % total for s in starts])
        assert rng is not None
        start = 0 if positions == 1 else int(rng.integers(0, positions - 1))
        return (base + start) % total


@attrs.frozen
class FrameWindows:
    """Every frame of a video as at most ``max_windows`` equal windows of at most ``window_len``.

    For protocols that feed the whole video as one clip (DeepMind's): a video of up to
    ``window_len`` frames is one clip of all its frames; a longer one of T frames gives
    n = min(ceil(T / window_len), max_windows) windows of L = ceil(T / n) frames (of
    ``window_len`` when T > n × window_len), spread evenly from the first frame to the last,
    so no call reads more than ``max_windows × window_len`` frames.
    """

    window_len: int = attrs.field(default=250, validator=_positive)
    max_windows: int = attrs.field(default=10, validator=_positive)

    def plan(self, total_frames: int) -> tuple[int, np.ndarray]:
        """(window length L, first frame of each window) for a video of ``total_frames``."""
        if total_frames < 1:
            raise ValueError(f"cannot sample frames from a video with {total_frames} frames")
        count = min(-(-total_frames // self.window_len), self.max_windows)
        length = min(-(-total_frames // count), self.window_len)
        if count == 1:  # the whole video, or (max_windows=1) its centre window
            return length, np.array([(total_frames - length) // 2], dtype=np.int64)
        return length, np.arange(count, dtype=np.int64) * (total_frames - length) // (count - 1)

    def __call__(self, total_frames: int) -> np.ndarray:
        """(windows, L) int64 frame indices, window-major."""
        length, starts = self.plan(total_frames)
        return starts[:, None] + np.arange(length, dtype=np.int64)[None, :]


def resampled_timeline(
    total: int, source_fps: float | None, target_fps: float | None
) -> np.ndarray:
    """Source frame shown at each tick of a ``target_fps`` clock over ``total`` frames.

    Tick i shows the last frame that started at or before i / target_fps (frame
    floor(i × source / target)), for int(total × target / source) ticks (at least one): a
    faster target repeats frames, a slower one skips them. Without both rates, or when they
    agree to 1e-3, every frame once.
    """
    if target_fps is None or source_fps is None or abs(target_fps - source_fps) < 1e-3:
        return np.arange(total, dtype=np.int64)
    count = max(1, int(total * target_fps / source_fps))
    ticks = np.floor(np.arange(count) * (source_fps / target_fps))
    return np.minimum(ticks, total - 1).astype(np.int64)
