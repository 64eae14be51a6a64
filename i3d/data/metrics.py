"""Classification metrics with mmaction2's exact definitions (``top_k_accuracy``, mean-class)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if scores.ndim != 2 or labels.shape != (scores.shape[0],):
        raise ValueError(
            f"expected scores (N, K) and labels (N,), got {scores.shape} and {labels.shape}"
        )
    if scores.shape[0] == 0:
        raise ValueError("no samples to score")
    return scores, labels


def top_k_accuracy(
    scores: np.ndarray, labels: Sequence[int] | np.ndarray, topk: Sequence[int] = (1, 5)
) -> list[float]:
    """Fraction of samples whose label is among the k highest scores (numpy argsort order)."""
    scores, labels = _check(scores, labels)
    order = np.argsort(scores, axis=1)
    return [float((order[:, -k:] == labels[:, None]).any(axis=1).mean()) for k in topk]


def confusion_matrix(
    predictions: np.ndarray, labels: np.ndarray, num_classes: int | None = None
) -> np.ndarray:
    """Counts (num_classes, num_classes): rows are true labels, columns predictions."""
    n = int(num_classes or max(predictions.max(), labels.max()) + 1)
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def per_class_accuracy(scores: np.ndarray, labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """Recall of each class index (NaN for classes without samples)."""
    scores, labels = _check(scores, labels)
    matrix = confusion_matrix(scores.argmax(axis=1), labels, scores.shape[1])
    counts = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, np.diag(matrix) / counts, np.nan)


def mean_class_accuracy(scores: np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """mmaction's mean-class accuracy: mean recall over classes seen as label *or* prediction.

    A class that is predicted but never a label counts as 0 (mmaction's definition, kept so
    numbers are comparable); classes absent from both are ignored.
    """
    scores, labels = _check(scores, labels)
    predictions = scores.argmax(axis=1)
    matrix = confusion_matrix(predictions, labels, scores.shape[1])
    present = np.union1d(predictions, labels)
    counts = matrix.sum(axis=1)[present]
    hits = np.diag(matrix)[present]
    recall = np.divide(hits, counts, out=np.zeros(len(present)), where=counts > 0)
    return float(recall.mean())
