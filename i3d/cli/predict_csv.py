"""The table ``i3d predict --csv`` writes, and reading one back to resume a run."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import attrs

from i3d.inference.inputs import InputError
from i3d.inference.predictor import Prediction
from i3d.utils.files import atomic_path

TOP_K_HEADER = ("path", "rank", "index", "label", "score", "error", "warnings")


def score_columns(labels: Sequence[str] | None, num_classes: int) -> tuple[str, ...]:
    """One column name per class: its label, or its index where labels are missing or clash."""
    names = tuple(labels) if labels is not None else ()
    clash = len(set(names)) != len(names) or {"path", "error", "warnings"} & set(names)
    if len(names) != num_classes or clash:
        return tuple(str(i) for i in range(num_classes))
    return names


@attrs.define
class PredictionTable:
    """CSV rows by video: ``top_k`` rows each, or (``all_scores``) one row of every class score.

    ``warnings`` holds what was wrong with a video that was still scored (a truncated file;
    several joined by " | "). Rows of videos read from an earlier file stay unless a new
    result replaces them; a file written before that column gets it, empty.
    """

    top_k: int
    all_scores: bool
    labels: Sequence[str] | None
    num_classes: int | None
    rows: dict[str, list[list[str]]] = attrs.field(factory=dict)

    def header(self) -> list[str]:
        """The column names, for the class count known so far."""
        if not self.all_scores:
            return list(TOP_K_HEADER)
        return ["path", "error", "warnings", *score_columns(self.labels, self.num_classes or 0)]

    @property
    def error_column(self) -> int:
        """Where a row's error text is (empty for a video with scores)."""
        return 1 if self.all_scores else TOP_K_HEADER.index("error")

    def add(self, result: Prediction) -> None:
        """Rows of one result, replacing any earlier rows of the same video."""
        path = str(result.path)
        warnings = " | ".join(result.warnings)
        if result.scores is None:
            row = [path] + [""] * self.error_column  # save() pads the class columns
            row[self.error_column] = result.error or "failed"
            self.rows[path] = [row]
        elif self.all_scores:
            self.num_classes = self.num_classes or len(result.scores)
            self.rows[path] = [[path, "", warnings, *(f"{s:.7g}" for s in result.scores)]]
        else:
            top = result.top(self.top_k)
            self.rows[path] = [
                [path, str(rank), str(i), name, f"{score:.6f}", "", warnings]
                for rank, (i, name, score) in enumerate(top, 1)
            ]

    def done(self) -> set[str]:
        """Videos that have scores (failed ones are not done)."""
        return {path for path, rows in self.rows.items() if not rows[0][self.error_column]}

    def load(self, path: Path) -> None:
        """Rows of an earlier ``--csv`` file; a file written with other options is refused."""
        try:
            with path.open(newline="", encoding="utf-8") as fh:
                table = list(csv.reader(fh))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise InputError(f"--resume: cannot read {path}: {exc}") from None
        if not table:
            return
        header, body = table[0], table[1:]
        if "warnings" not in header and "error" in header:  # written before the column
            at = header.index("error") + 1
            header = _with_column(header, at, "warnings")
            body = [_with_column(row, at) for row in body]
        if self.all_scores and self.num_classes is None and header[:2] == ["path", "error"]:
            self.num_classes = len(header) - 3  # a model without labels: trust the file's count
        if header != self.header():
            kind = "every class score (--all-scores)" if self.all_scores else "top-k rows"
            raise InputError(
                f"--resume: {path} does not have the columns of this run's {kind} for this "
                "model's classes; resume with the options and --weights that wrote it, or "
                "choose another --csv"
            )
        for number, row in enumerate(body, 2):
            if len(row) != len(header) or not self._consistent(row):
                raise InputError(
                    f"--resume: {path}:{number} is not a row i3d predict wrote with these "
                    "options and --weights; resume with those, or choose another --csv"
                )
            self.rows.setdefault(row[0], []).append(row)
        if not self.all_scores:
            done = self.done()
            for video, rows in self.rows.items():
                if video in done and self.num_classes and len(rows) != self.top_k:
                    raise InputError(
                        f"--resume: {path} holds {len(rows)} classes of {video}, not --top-k "
                        f"{self.top_k}; resume with --top-k {len(rows)}, or choose another --csv"
                    )

    def _consistent(self, row: list[str]) -> bool:
        """A top-k row's class index and label agree with this model's labels."""
        if self.all_scores or row[self.error_column]:
            return True
        if not row[2].isdigit():
            return False
        index = int(row[2])
        name = self.labels[index] if self.labels is not None and index < len(self.labels) else None
        return row[3] == (name if self.labels is not None else str(index))

    def save(self, path: Path, order: Sequence[str]) -> None:
        """Write atomically: videos in ``order`` first, then the earlier file's other videos."""
        first = dict.fromkeys(p for p in order if p in self.rows)
        rest = [p for p in self.rows if p not in first]
        header = self.header()
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            for video in (*first, *rest):
                writer.writerows(row + [""] * (len(header) - len(row)) for row in self.rows[video])


def _with_column(row: list[str], at: int, value: str = "") -> list[str]:
    """``row`` with ``value`` inserted at ``at`` (the warnings column of an older file)."""
    return [*row[:at], value, *row[at:]]
