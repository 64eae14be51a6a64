"""Natural-looking check input for verifying converted models against torch.

``torch.randn`` clips are white noise: trained (or mmaction-style) residual and non-local
blocks amplify it until the logits are inf/NaN, so an exact conversion could not be checked.
These clips are frames of the bundled sample video, normalised as the weights expect.
"""

from __future__ import annotations

import functools
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F

from i3d.backends.base import normalise_uint8, preprocessing_of
from i3d.weights.preprocessing import Preprocessing

SAMPLE = "v_CricketShot_g04_c01_rgb.gif"
MAX_FRAMES = 32  # decoded once per process; longer clips play them forwards and back


@functools.lru_cache(maxsize=1)
def sample_frames() -> torch.Tensor:
    """The first :data:`MAX_FRAMES` RGB frames of the bundled clip as uint8 (T, 3, H, W)."""
    from PIL import Image, ImageSequence

    with resources.files("i3d.assets").joinpath(SAMPLE).open("rb") as handle:
        frames = []
        for frame in ImageSequence.Iterator(Image.open(handle)):
            frames.append(np.asarray(frame.convert("RGB")))
            if len(frames) == MAX_FRAMES:
                break
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def natural_clips(
    shape: tuple[int, ...], preprocessing: Preprocessing | None = None
) -> torch.Tensor:
    """Float32 clips of ``shape`` ((N, C, T, H, W) or (N, V, C, T, H, W)) from the sample video.

    Each clip starts at another frame (every other one mirrored), is resized to H×W, takes
    its C channels from R, G, B in turn, and is normalised with ``preprocessing`` (mmaction's
    ImageNet mean/std when absent or made for another channel count).
    """
    *lead, channels, clip_len, height, width = shape
    frames = sample_frames()
    count = frames.shape[0]
    bounce = list(range(count)) + list(range(count - 2, 0, -1))  # forwards, then back
    clips = []
    for index in range(int(np.prod(lead))):
        start = (5 * index) % len(bounce)
        order = [bounce[(start + t) % len(bounce)] for t in range(clip_len)]
        clip = frames[order].float()
        if index % 2:
            clip = clip.flip(-1)
        clip = F.interpolate(clip, size=(height, width), mode="bilinear", align_corners=False)
        clip = clip[:, [c % 3 for c in range(channels)]]
        clips.append(clip.round().clamp(0, 255).to(torch.uint8).permute(1, 0, 2, 3))
    x = torch.stack(clips).reshape(*lead, channels, clip_len, height, width)
    if preprocessing is None or len(preprocessing.mean) != channels:
        default = Preprocessing()
        preprocessing = Preprocessing(
            mean=[default.mean[c % 3] for c in range(channels)],
            std=[default.std[c % 3] for c in range(channels)],
        )
    return normalise_uint8(x, preprocessing)


def natural_clips_for(model: torch.nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """:func:`natural_clips` normalised with ``model``'s own preprocessing, if it has any."""
    return natural_clips(shape, preprocessing_of(model))
