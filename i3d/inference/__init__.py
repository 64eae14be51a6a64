"""Whole-video inference: ``i3d predict``, ``i3d evaluate`` and the inputs they take.

:mod:`~i3d.inference.inputs` turns files, folders and globs into videos;
:mod:`~i3d.inference.predictor` runs them through the weights' test protocol
(:class:`Predictor`, :func:`predict_videos`); :mod:`~i3d.inference.evaluation` scores
annotation lists; :mod:`~i3d.inference.sharded` runs either on N ranks through
torch.distributed (imported on its own: it needs the feature extractors too).
"""

from i3d.inference.evaluation import (
    Scored,
    evaluate_samples,
    evaluation_samples,
    read_predictions,
    summarize,
    write_predictions,
)
from i3d.inference.inputs import DEFAULT_MODEL, InputError, default_weights, expand_inputs
from i3d.inference.predictor import NonFiniteOutputError, Prediction, Predictor, predict_videos

__all__ = [
    "DEFAULT_MODEL",
    "InputError",
    "NonFiniteOutputError",
    "Prediction",
    "Predictor",
    "Scored",
    "default_weights",
    "evaluate_samples",
    "evaluation_samples",
    "expand_inputs",
    "predict_videos",
    "read_predictions",
    "summarize",
    "write_predictions",
]
