"""Per-snippet features over whole videos, for localisation, anomaly detection and
segmentation: protocols (window, stride, fps, tail, crops), named published presets,
streaming extraction, and a resumable, sharded output folder."""

from i3d.features.extract import SnippetExtractor, VideoSnippets, iter_snippets
from i3d.features.presets import PRESETS, SnippetPreset, get_preset
from i3d.features.protocol import SnippetProtocol
from i3d.features.run import SnippetJob, SnippetRun, extract_snippets

__all__ = [
    "PRESETS",
    "SnippetExtractor",
    "SnippetJob",
    "SnippetPreset",
    "SnippetProtocol",
    "SnippetRun",
    "VideoSnippets",
    "extract_snippets",
    "get_preset",
    "iter_snippets",
]
