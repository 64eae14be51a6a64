"""Class-name lists: the bundled Kinetics label maps and user label files."""

from __future__ import annotations

import os
import re
from functools import cache
from importlib import resources
from pathlib import Path

from i3d.weights.format import WeightsError


@cache
def kinetics_labels(num_classes: int) -> tuple[str, ...]:
    """Kinetics-400/600 class names in model order (mmaction2 and DeepMind share the order)."""
    if num_classes not in (400, 600):
        raise WeightsError(f"no bundled Kinetics label list with {num_classes} classes (400, 600)")
    text = resources.files("i3d.assets").joinpath(f"kinetics{num_classes}_labels.txt").read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def read_labels(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """One class name per line (blank lines ignored); the order is the model's class order.

    Lines may also be ``index name`` / ``index,name`` (mmaction's label maps) when every line
    starts with its 0-based index in order; otherwise lines are kept whole ("3 idiots").
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM is not part of the first name
    except (OSError, UnicodeDecodeError) as exc:
        raise WeightsError(f"cannot read label file {path}: {exc}") from exc
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not labels:
        raise WeightsError(f"label file {path} holds no class names")
    numbered = [re.fullmatch(r"(\d+)[ ,\t]\s*(.+)", line) for line in labels]
    if all(m is not None and int(m.group(1)) == i for i, m in enumerate(numbered)):
        return tuple(m.group(2).strip() for m in numbered if m is not None)
    return labels


def default_labels(num_classes: int) -> tuple[str, ...] | None:
    """The bundled Kinetics list when the class count matches one, else None."""
    return kinetics_labels(num_classes) if num_classes in (400, 600) else None
