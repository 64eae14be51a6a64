"""Published snippet-feature protocols by name (``i3d features --preset NAME``).

Each preset is the extraction that made a feature set a well-known codebase reads, with its
source; the README lists the facts and what could not be pinned down. Presets whose
features concatenate an optical-flow stream run a Flow-stream I3D on TV-L1 flow too (given
its weights), or give their RGB stream alone (the first half of the concatenation) when
asked for it explicitly.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from i3d.features.protocol import SnippetProtocol


class PresetError(ValueError):
    """An unknown preset, or one that needs a stream i3d cannot compute yet."""


@attrs.frozen
class SnippetPreset:
    """A named protocol, the weights it runs (hub name) and where its definition comes from."""

    name: str
    protocol: SnippetProtocol
    model: str
    streams: tuple[str, ...]
    """The streams the published features hold, in their concatenation order."""
    source: str
    published_weights: str
    """The weights the published features were made with (for comparable numbers)."""
    layout: str = "tc"
    """The axis order the codebase reads (:data:`~i3d.features.output.LAYOUTS`)."""


_INCEPTION_RGB = dict(  # the shared [-1, 1] Inception head of these extractors
    value_range=(-1.0, 1.0), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), endpoint="Mixed_5c",
    pool="i3d", crop_size=224,
)  # fmt: skip
_FIXED_340 = dict(frame_size=(340, 256), resampler="cv2-bilinear")

PRESETS: dict[str, SnippetPreset] = {
    p.name: p
    for p in (
        SnippetPreset(
            "actionformer-thumos14",
            SnippetProtocol(16, 4, tail="drop", **_FIXED_340, **_INCEPTION_RGB),
            "i3d_inception_k400_rgb",
            ("rgb", "flow"),
            "ActionFormer configs/thumos_i3d.yaml (feat_stride 4, num_frames 16, input_dim "
            "2048, fps per video); features by Finspire13/pytorch-i3d-feature-extraction "
            "(frames 340x256, 16-frame chunks, centre crop 224, [-1, 1], Mixed_5c + "
            "AvgPool3d(2,7,7)), RGB then flow",
            "DeepMind rgb_imagenet / flow_imagenet (pytorch-i3d .pt)",
        ),
        SnippetPreset(
            "actionformer-anet",
            SnippetProtocol(16, 16, fps=25.0, tail="drop", **_FIXED_340, **_INCEPTION_RGB),
            "i3d_inception_k400_rgb",
            ("rgb", "flow"),
            "ActionFormer configs/anet_i3d.yaml and README (I3D, 16 frames at 25 fps, stride "
            "16, input_dim 2048); extraction as actionformer-thumos14",
            "DeepMind rgb_imagenet / flow_imagenet (pytorch-i3d .pt)",
        ),
        SnippetPreset(
            "rtfm",
            SnippetProtocol(
                16,
                16,
                tail="loop",
                crops=10,
                crop_order="torchvision",
                crop_size=224,
                resize_short=256,
                size_rule="floor",
                resampler="pil-bilinear",
                value_range=(0.0, 255.0),
                mean=(114.75,) * 3,
                std=(57.375,) * 3,
                endpoint="layer4",
                pool="mean",
            ),
            "i3d_r50_k400_rgb",
            ("rgb",),
            "RTFM README (ResNet-50 I3D of Tushar-N/pytorch-resnet3d, 10 crops) and the "
            "author's recipe in RTFM issue #21: non-overlapping 16-frame windows, short side "
            "256, torchvision TenCrop 224, (x - 114.75) / 57.375 on [0, 255], LoopPad; "
            "layer4 global average, 2048-d per crop",
            "video-nonlocal-net i3d_baseline_32x2_IN_pretrain_400k (Tushar-N i3d_r50_kinetics)",
            layout="tkc",  # dataset.py: features.transpose(1, 0, 2) of (T, 10, 2048) files
        ),
        SnippetPreset(
            "ms-tcn",
            SnippetProtocol(
                21,
                1,
                anchor="center",
                tail="repeat",
                resize_short=256,
                size_rule="round",
                resampler="cv2-bilinear",
                flow_resolution="source",
                **_INCEPTION_RGB,
            ),
            "i3d_inception_k400_rgb",
            ("rgb", "flow"),
            "MS-TCN issues #3, #19, #34 (21-frame window centred on each frame, stride 1, "
            "one 2048-d feature per frame); extractor ahsaniqbal/Kinetics-FeatureExtractor "
            "(LazyLoader.cpp, Utils.cpp, extractor_lazy.py): short side 256, centre 224, "
            "[-1, 1], Mixed_5c + AvgPool3d(2,7,7) + time mean, first/last frame repeated at "
            "the ends (so zero flow there), RGB then TV-L1 flow of the decoded frames, the "
            "field resized to the frames' size unscaled, clipped to +-20 and divided by 20",
            "DeepMind rgb_imagenet / flow_imagenet (TF kinetics-i3d)",
            layout="ct",  # batch_gen.py reads (2048, T): features[:, ::sample_rate]
        ),
        SnippetPreset(
            "video-features",
            SnippetProtocol(
                64,
                64,
                tail="drop",
                lookahead=1,
                resize_short=256,
                size_rule="floor",
                resampler="pil-bilinear",
                batchnorm_eps=1e-5,
                **_INCEPTION_RGB,
            ),
            "i3d_inception_k400_rgb",
            ("rgb", "flow"),
            "v-iashin/video_features configs/i3d.yml and models/i3d/extract_i3d.py: stacks of "
            "64 (+1 frame for the flow pair), step 64, native fps, short side 256 (PIL "
            "bilinear), centre 224, [-1, 1], Mixed_5c + AvgPool3d(2,7,7) + time mean; rgb and "
            "flow (RAFT) saved separately; models/i3d/i3d_src/i3d_net.py builds BatchNorm3d "
            "with PyTorch's default eps 1e-5",
            "hassony2/kinetics_i3d_pytorch rgb_imagenet (DeepMind's ImageNet-inflated I3D)",
        ),
    )
}


def get_preset(name: str) -> SnippetPreset:
    """The preset called ``name``, or an error listing them."""
    try:
        return PRESETS[name]
    except KeyError:
        raise PresetError(
            f"unknown feature preset {name!r}; choose one of {', '.join(PRESETS)}"
        ) from None


STREAM_CHOICES = {"rgb": ("rgb",), "flow": ("flow",), "both": ("rgb", "flow")}


def choose_streams(
    preset: SnippetPreset | None, stream: str | None, flow_weights: bool
) -> tuple[str, ...]:
    """The streams to compute: ``stream`` (rgb, flow or both), or by default the preset's
    (RGB alone without a preset); the flow stream needs Flow-stream weights."""
    if stream is not None and stream not in STREAM_CHOICES:
        raise PresetError(f"--stream takes rgb, flow or both, not {stream!r}")
    have = preset.streams if preset is not None else ("rgb", "flow")
    if stream is None:
        wanted = preset.streams if preset is not None else ("rgb", "flow")[: 1 + flow_weights]
    else:
        wanted = STREAM_CHOICES[stream]
    if set(wanted) - set(have):
        assert preset is not None
        raise PresetError(f"preset {preset.name} has the {' + '.join(have)} stream only")
    if "flow" in wanted and not flow_weights:
        name = f"preset {preset.name}'s features are" if preset else "the flow stream is"
        raise PresetError(
            f"{name} {' + '.join(wanted)}: the optical-flow stream needs a Flow-stream I3D "
            "(--flow-weights W, e.g. DeepMind's flow_imagenet converted with i3d "
            "convert-weights); or pass --stream rgb for the RGB stream alone (the first "
            "half of two-stream features)"
        )
    return wanted


def preset_weights(preset: SnippetPreset) -> Path:
    """The pulled weights a preset runs (``i3d weights pull <model>`` first)."""
    from i3d.weights.hub import resolve

    return Path(resolve(preset.model))
