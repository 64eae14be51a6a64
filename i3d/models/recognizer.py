"""What every i3d classifier shares: view handling, score averaging, endpoint extraction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from einops import rearrange
from torch import nn


class InputShapeError(ValueError):
    """The tensor handed to a model does not have a shape the model accepts."""


def average_views(logits: torch.Tensor, mode: str = "prob") -> torch.Tensor:
    """Average per-view logits (N, V, K) into one score per sample (N, K).

    ``prob`` is mmaction's ``average_clips='prob'`` (softmax per view, then the mean of the
    probabilities); ``score`` is the mean of the raw logits.
    """
    if logits.ndim != 3:
        raise InputShapeError(
            f"expected per-view logits (N, V, K), got shape {tuple(logits.shape)}"
        )
    if mode == "prob":
        return logits.softmax(dim=-1).mean(dim=1)
    if mode == "score":
        return logits.mean(dim=1)
    raise ValueError(f"average mode must be 'prob' or 'score', got {mode!r}")


class Recognizer(nn.Module):
    """Base class: subclasses implement ``forward_clips`` on (N, C, T, H, W).

    ``model(x)``: x (N, C, T, H, W) → logits (N, K); x (N, V, C, T, H, W) → per-view logits
    (N, V, K). ``model.predict(x)`` averages views with the config's ``average_clips`` rule.
    """

    config: Any
    in_channels: int
    endpoint_names: tuple[str, ...] = ()
    classifier_prefix: str = ""
    """State-dict prefix of the final class layer (replaced when fine-tuning to new classes)."""

    def classifier_keys(self) -> tuple[str, ...]:
        """State-dict keys of the final class layer, whose shape follows the class count."""
        return tuple(k for k in self.state_dict() if k.startswith(self.classifier_prefix))

    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise InputShapeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim not in (5, 6):
            raise InputShapeError(
                "expected input of shape (N, C, T, H, W) or (N, V, C, T, H, W), "
                f"got {x.ndim} dims {tuple(x.shape)}"
            )
        channels = x.shape[-4]
        if channels != self.in_channels:
            raise InputShapeError(
                f"expected {self.in_channels} channels at dim {x.ndim - 4} (C of NCTHW), got "
                f"{channels} in shape {tuple(x.shape)}; frames must be NCTHW, not NTHWC"
            )
        if not x.is_floating_point():
            raise InputShapeError(
                f"expected a floating-point tensor, got {x.dtype}; normalise uint8 frames first"
            )

    def forward_clips(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        if x.ndim == 6:
            views = x.shape[1]
            logits = self.forward_clips(rearrange(x, "n v c t h w -> (n v) c t h w"))
            return rearrange(logits, "(n v) k -> n v k", v=views)
        return self.forward_clips(x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, average: str | None = None) -> torch.Tensor:
        """Class scores (N, K): per-view logits averaged by ``average`` (default: the config's).

        A 5-D input counts as one view per sample, so ``prob`` mode returns probabilities.
        """
        logits = self(x)
        if logits.ndim == 2:
            logits = logits[:, None]
        return average_views(logits, average or self.config.head.average_clips)

    def endpoints(self, x: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Intermediate feature maps by name (see ``endpoint_names``), stopping at the last one."""
        unknown = [n for n in names if n not in self.endpoint_names]
        if unknown:
            raise KeyError(f"unknown endpoints {unknown}; available: {list(self.endpoint_names)}")
        self.check_input(x)
        if x.ndim == 6:
            raise InputShapeError("endpoints() takes (N, C, T, H, W); fold views into N first")
        return self._endpoints(x, set(names))

    def _endpoints(self, x: torch.Tensor, names: set[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError
