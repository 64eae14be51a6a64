"""Small building blocks shared by the model families."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def kaiming_normal_fan_out(conv: nn.Module) -> None:
    """mmcv ``kaiming_init`` defaults: normal, fan_out, ReLU gain, zero bias."""
    if not conv.weight.is_meta:  # see init_normal
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if getattr(conv, "bias", None) is not None:
        nn.init.zeros_(conv.bias)


def init_normal(weight: torch.Tensor, std: float) -> None:
    """N(0, std²) init, skipped on the meta device: a meta tensor has no values, and its
    ``normal_`` imports torch._dynamo (~1.5 s in every process that checks a weights file's
    structure on meta)."""
    if not weight.is_meta:
        nn.init.normal_(weight, 0.0, std)


def set_batchnorm_eps(model: nn.Module, eps: float) -> None:
    """Give every BatchNorm layer of ``model`` the epsilon ``eps``, in place.

    For protocols defined by another port of a network: the same weights normalised with
    1e-5 (PyTorch's default, which several I3D ports keep) instead of DeepMind's 1e-3 move
    the logits by ~1e-3 relative.
    """
    if not eps > 0:
        raise ValueError(f"a BatchNorm epsilon must be > 0, got {eps}")
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eps = eps


def _triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (value, value, value)
    t, h, w = value
    return (int(t), int(h), int(w))


class ConvBN(nn.Module):
    """Conv3d → optional BatchNorm3d → optional ReLU, with children named ``conv`` and ``bn``.

    The naming matches mmcv's ``ConvModule`` so mmaction2 state-dict keys map one to one.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        *,
        norm: bool = True,
        act: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv3d(
            in_channels,
            out_channels,
            _triple(kernel_size),
            stride=_triple(stride),
            padding=_triple(padding),
            dilation=_triple(dilation),
            bias=bias,
        )
        self.bn = nn.BatchNorm3d(out_channels) if norm else None
        self.act = nn.ReLU(inplace=True) if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.act is not None:
            x = self.act(x)
        return x
