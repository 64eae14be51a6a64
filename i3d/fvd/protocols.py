"""The named FVD protocols, each as its source code defines it, and their clip selection.

A :class:`Protocol` says how a video becomes the detector's input (which frames, which
resize and value scaling), the detector's BatchNorm epsilon where the source's model differs
from DeepMind's, and how the Fréchet distance is formed (covariance ``ddof``, which
eigenvalues its matrix square root leaves un-rooted); the README's
FVD section gives each field's source. The detector output is the same for all: the
Kinetics-400 logits of Inception-v1 I3D averaged over time (TF-Hub's
``RGB/inception_i3d/Mean``).
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
import numpy as np

from i3d.fvd.frechet import TFGAN_ROOT_FLOOR
from i3d.fvd.resize import RESIZES

HEAD_MIN_FRAMES = 9
"""Inception I3D's head needs 9 frames (its (2, 7, 7) pool after the /8 temporal stride)."""

MAX_WHOLE_CLIP = 1024
"""Longest video a protocol without a clip length reads whole; longer ones need ``frames``."""

Role = Literal["real", "fake"]


class ClipError(ValueError):
    """A video is too short (or too long) for the protocol's clips."""


def _check_resize(_instance: Any, _attribute: Any, value: str) -> None:
    if value not in RESIZES:
        raise ValueError(f"unknown resize {value!r}; one of {', '.join(RESIZES)}")


@attrs.frozen
class Protocol:
    """How FVD is computed: clips, resize, covariance estimate; recorded with every result.

    ``frames`` None takes each video whole (the clips as given); otherwise clips of
    ``frames`` consecutive frames start at frame 0 (``"first"``) or at a seeded uniform
    offset (``"random"``), chosen per role. ``short_real`` says what a real video shorter
    than the clip does: fail (``"error"``) or drop out of the set (``"discard"``).
    ``batchnorm_eps`` None runs the detector as the weights define it (DeepMind's Sonnet
    BatchNorm, eps 1e-3); a number replaces every BatchNorm's epsilon, for protocols whose
    source runs another port of the network (VideoGPT's ``pytorch_i3d.py`` builds 1e-5).
    ``root_floor`` 0 takes every square root in the distance exactly (as ``scipy.linalg.sqrtm``
    does); TF-GAN's 1e-10 leaves smaller singular values un-rooted
    (:func:`~i3d.fvd.frechet.trace_sqrt_product`).
    """

    name: str
    resize: str = attrs.field(validator=_check_resize)
    size: int = 224
    frames: int | None = None
    real_start: Literal["first", "random"] = "first"
    fake_start: Literal["first", "random"] = "first"
    short_real: Literal["error", "discard"] = "error"
    min_frames: int = HEAD_MIN_FRAMES
    covariance_ddof: int = 1
    batchnorm_eps: float | None = None
    root_floor: float = 0.0
    source: str = ""

    def __attrs_post_init__(self) -> None:
        floor = max(self.min_frames, HEAD_MIN_FRAMES)
        if self.frames is not None and self.frames < floor:
            raise ClipError(
                f"protocol {self.name} takes clips of at least {floor} frames (Inception I3D "
                f"needs {HEAD_MIN_FRAMES}), not {self.frames}"
            )

    def with_frames(self, frames: int | None) -> Protocol:
        """This protocol with another clip length (None keeps the protocol's own)."""
        return self if frames is None else attrs.evolve(self, frames=frames)

    def record(self) -> dict[str, Any]:
        """Every field, as JSON, for the result record and the statistics file."""
        return attrs.asdict(self)

    def clip_indices(
        self, num_frames: int, role: Role, seed: int, index: int, name: str = "video"
    ) -> np.ndarray | None:
        """Frame indices of video ``index``'s clip, or None when the protocol drops it."""
        floor = max(self.min_frames, HEAD_MIN_FRAMES)
        if self.frames is None:
            if num_frames < floor:
                raise ClipError(
                    f"{name} has {num_frames} frames; protocol {self.name} reads videos whole "
                    f"and needs at least {floor} (Inception I3D's head needs {HEAD_MIN_FRAMES})"
                )
            if num_frames > MAX_WHOLE_CLIP:
                raise ClipError(
                    f"{name} has {num_frames} frames; protocol {self.name} reads videos whole, "
                    f"which is bounded at {MAX_WHOLE_CLIP}: give a clip length (frames=N, "
                    "--frames N)"
                )
            return np.arange(num_frames)
        if num_frames < self.frames:
            if role == "real" and self.short_real == "discard":
                return None
            raise ClipError(
                f"{name} has {num_frames} frames; protocol {self.name} takes {self.frames}-frame "
                f"clips (no padding is defined by its source)"
            )
        start_rule = self.real_start if role == "real" else self.fake_start
        start = 0
        if start_rule == "random":
            rng = np.random.default_rng([seed, index])
            start = int(rng.integers(0, num_frames - self.frames + 1))
        return np.arange(start, start + self.frames)


PROTOCOLS: dict[str, Protocol] = {
    "tf": Protocol(
        name="tf",
        resize="tf1_bilinear",
        covariance_ddof=1,
        root_floor=TFGAN_ROOT_FLOOR,
        source="github.com/google-research/google-research frechet_video_distance/"
        "frechet_video_distance.py + tensorflow_gan classifier_metrics.py "
        "(frechet_classifier_distance_from_activations, _symmetric_matrix_square_root eps)",
    ),
    "stylegan-v": Protocol(
        name="stylegan-v",
        resize="stylegan_v_detector",
        frames=16,
        real_start="random",
        fake_start="first",
        short_real="discard",
        covariance_ddof=0,
        source="github.com/universome/stylegan-v src/metrics/frechet_video_distance.py, "
        "metric_utils.py, training/dataset.py",
    ),
    "cd-fvd": Protocol(
        name="cd-fvd",
        resize="torch_bilinear",
        covariance_ddof=0,
        batchnorm_eps=1e-5,
        source="github.com/songweige/content-debiased-fvd cdfvd/fvd.py, "
        "third_party/i3d/utils.py, third_party/i3d/pytorch_i3d.py (BatchNorm3d eps=1e-5), "
        "utils/metric_utils.py (arrays: cdfvd.compute_fvd)",
    ),
    "common-metrics": Protocol(
        name="common-metrics",
        resize="short_side_center_crop",
        min_frames=10,
        covariance_ddof=1,
        source="github.com/JunyaoHu/common_metrics_on_video_quality fvd/styleganv/fvd.py, "
        "calculate_fvd.py (method='styleganv', only_final)",
    ),
    "common-metrics-videogpt": Protocol(
        name="common-metrics-videogpt",
        resize="short_side_center_crop",
        min_frames=10,
        covariance_ddof=1,
        batchnorm_eps=1e-5,
        root_floor=TFGAN_ROOT_FLOOR,
        source="github.com/JunyaoHu/common_metrics_on_video_quality fvd/videogpt/fvd.py "
        "(preprocess_single, cov, trace_sqrt_product with TF-GAN's eps 1e-10), "
        "fvd/videogpt/pytorch_i3d.py (BatchNorm3d eps=1e-5), calculate_fvd.py "
        "(method='videogpt', only_final)",
    ),
}


def get_protocol(protocol: str | Protocol, frames: int | None = None) -> Protocol:
    """A named protocol (or the one given), with ``frames`` replacing its clip length."""
    if isinstance(protocol, Protocol):
        return protocol.with_frames(frames)
    try:
        return PROTOCOLS[protocol].with_frames(frames)
    except KeyError:
        raise ValueError(
            f"unknown FVD protocol {protocol!r}; one of {', '.join(PROTOCOLS)}"
        ) from None
