"""``i3d evaluate``'s side: annotation lists in the model's classes, metrics, prediction files."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import numpy as np

from i3d.data.datasets import (
    Sample,
    UnknownClassError,
    check_labels,
    load_annotations,
    match_classes,
)
from i3d.data.metrics import mean_class_accuracy, per_class_accuracy, top_k_accuracy
from i3d.inference.inputs import DEFAULT_MODEL, InputError
from i3d.inference.predictor import Predictor
from i3d.utils.files import atomic_path
from i3d.utils.untrusted import load_json


@attrs.frozen
class Scored:
    """One evaluated sample: its label and averaged scores (and what was wrong with a video
    that was still scored: a truncated file)."""

    path: str
    label: int
    scores: np.ndarray = attrs.field(eq=False, repr=False)
    warnings: tuple[str, ...] = ()


def evaluation_samples(
    list_path: str | os.PathLike[str],
    data_root: str | os.PathLike[str] | None,
    model_labels: Sequence[str] | None,
    num_classes: int | None,
    list_labels: Sequence[str] | None = None,
    default_model: bool = False,
) -> list[Sample]:
    """Samples of an annotation list, labelled in the model's class order.

    Class names (``list_labels``, class folders, a Kinetics CSV's names) are matched with the
    model's labels (spaces and underscores alike); a class the model lacks is refused. Bare
    integer labels are taken to be the model's classes, except for the default model
    (``default_model``: no weights were chosen), where nothing says they are: refused.
    """
    list_path = Path(list_path)
    named = list_labels is not None or list_path.is_dir() or list_path.suffix.lower() == ".csv"
    model = f"the default model {DEFAULT_MODEL}" if default_model else "the model"
    fix = "pass --weights W for the model trained on the list's classes"
    if default_model and not named:
        raise InputError(
            f"{list_path} has integer labels only, so nothing says they are classes of "
            f"{model}: {fix}, or --labels FILE naming its classes (one per line, in label "
            "order) to have them matched with the model's"
        )
    names = list_labels if list_labels is not None else model_labels
    try:
        samples = load_annotations(list_path, data_root, labels=names)
    except UnknownClassError as exc:
        if list_labels is not None:
            raise  # the --labels file lacks a class of the list
        count = f", {len(names)} classes" if names is not None else ""
        raise InputError(f"{exc} (the label list of {model}{count}); {fix}") from None
    if list_labels is not None:
        unnamed = [s for s in samples if s.label >= len(list_labels)]
        if unnamed:
            raise InputError(
                f"{unnamed[0].source}: label {unnamed[0].label} has no name; the --labels file "
                f"names only {len(list_labels)} (labels 0 to {len(list_labels) - 1})"
            )
        if model_labels is not None:
            samples = _to_model_classes(samples, list_labels, model_labels, model, fix)
    if num_classes is not None:
        check_labels(samples, num_classes)
    return samples


def _to_model_classes(
    samples: Sequence[Sample],
    list_labels: Sequence[str],
    model_labels: Sequence[str],
    model: str,
    fix: str,
) -> list[Sample]:
    """Samples relabelled from the list's class names to the model's indices."""
    used = sorted({s.label for s in samples})
    indices = match_classes([list_labels[i] for i in used], model_labels)
    found = dict(zip(used, indices, strict=True))
    missing = [list_labels[i] for i, index in found.items() if index is None]
    if missing:
        raise InputError(
            f"classes of the list that {model} ({len(model_labels)} classes) does not have: "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; {fix}"
        )
    return [attrs.evolve(s, label=found[s.label]) for s in samples]


def evaluate_samples(
    samples: Sequence[Sample], predictor: Predictor, workers: int | None = None
) -> Iterator[Scored | tuple[Sample, str]]:
    """Score samples in order; unreadable ones are yielded as (sample, error)."""
    results = predictor.predict_many([s.path for s in samples], workers)
    for sample, result in zip(samples, results, strict=True):
        if result.scores is None:
            yield sample, result.error or "failed"
        else:
            yield Scored(str(sample.path), sample.label, result.scores, result.warnings)


def summarize(scored: Sequence[Scored]) -> dict[str, float]:
    """top-1, top-5 and mean-class accuracy (mmaction definitions) of scored samples."""
    scores = np.stack([s.scores for s in scored])
    labels = np.array([s.label for s in scored])
    top1, top5 = top_k_accuracy(scores, labels, (1, 5))
    return {"top1": top1, "top5": top5, "mean_class": mean_class_accuracy(scores, labels)}


def write_predictions(path: str | os.PathLike[str], scored: Sequence[Scored]) -> None:
    """JSON lines ``{"path", "label", "scores"}`` (and ``warnings`` where a video had some),
    re-scorable with :func:`read_predictions`."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for s in scored:
            record = {"path": s.path, "label": s.label, "scores": s.scores.tolist()}
            if s.warnings:
                record["warnings"] = list(s.warnings)
            fh.write(json.dumps(record) + "\n")


def read_predictions(path: str | os.PathLike[str]) -> list[Scored]:
    """Scored samples from a predictions file written by :func:`write_predictions`."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read predictions file {path}: {exc}") from exc
    scored = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = load_json(line, f"{path}:{number}")
            scored.append(
                Scored(
                    str(record["path"]),
                    int(record["label"]),
                    np.asarray(record["scores"], dtype=np.float32),
                    tuple(str(w) for w in record.get("warnings", ())),
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise InputError(f"{path}:{number}: not a prediction record") from None
    if not scored:
        raise InputError(f"predictions file {path} is empty")
    if len({s.scores.shape for s in scored}) != 1:
        raise InputError(f"{path}: records have different numbers of classes")
    return scored


def write_per_class(
    path: str | os.PathLike[str], scored: Sequence[Scored], labels: Sequence[str] | None
) -> None:
    """CSV ``index,label,samples,accuracy`` (accuracy empty for classes without samples)."""
    scores = np.stack([s.scores for s in scored])
    truth = np.array([s.label for s in scored])
    accuracy = per_class_accuracy(scores, truth)
    counts = np.bincount(truth, minlength=scores.shape[1])
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write("index,label,samples,accuracy\n")
        for i, acc in enumerate(accuracy):
            name = labels[i] if labels is not None else str(i)
            value = "" if np.isnan(acc) else f"{acc:.6f}"
            fh.write(f'{i},"{name}",{counts[i]},{value}\n')


def plot_confusion(
    path: str | os.PathLike[str], scored: Sequence[Scored], labels: Sequence[str] | None
) -> None:
    """Row-normalised confusion matrix as a PNG (matplotlib, imported only here)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("the confusion plot needs matplotlib: pip install 'i3d[plot]'") from exc
    from i3d.data.metrics import confusion_matrix

    scores = np.stack([s.scores for s in scored])
    truth = np.array([s.label for s in scored])
    matrix = confusion_matrix(scores.argmax(axis=1), truth, scores.shape[1]).astype(float)
    matrix /= np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    n = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(min(4 + n * 0.25, 40), min(4 + n * 0.25, 40)))
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if labels is not None and n <= 60:
        ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(n), labels, fontsize=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
