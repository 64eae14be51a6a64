"""Non-local block (Wang et al. 2018) with mmcv ``NonLocal3d`` semantics and key names."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from i3d.models.layers import ConvBN, init_normal, kaiming_normal_fan_out


class NonLocal3d(nn.Module):
    """x + BN(conv_out(f(theta(x), phi(x)) · g(x))), mmcv's layout (``g.0.conv``, ``phi.0.conv``).

    ``mode`` picks f: ``dot_product`` (θφ / number of φ positions), ``embedded_gaussian``
    (softmax(θφ), optionally / sqrt(C/2)) or ``gaussian`` (softmax(xᵀ·pool(x)), no θ/φ convs).
    ``sub_sample`` max-pools g and φ spatially by 2.
    """

    def __init__(
        self,
        in_channels: int,
        mode: str = "embedded_gaussian",
        sub_sample: bool = True,
        use_scale: bool = False,
        reduction: int = 2,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.inter_channels = max(in_channels // reduction, 1)
        self.mode = mode
        self.use_scale = use_scale
        inter = self.inter_channels

        def pooled(module: nn.Module) -> nn.Module:
            return (
                nn.Sequential(module, nn.MaxPool3d(kernel_size=(1, 2, 2))) if sub_sample else module
            )

        # registration order g, conv_out, theta, phi = mmcv's state-dict order
        self.g = pooled(ConvBN(in_channels, inter, 1, norm=False, bias=True, act=False))
        self.conv_out = ConvBN(inter, in_channels, 1, norm=True, act=False)
        self.theta: nn.Module | None = None
        self.phi: nn.Module | None = None
        if mode != "gaussian":
            self.theta = ConvBN(in_channels, inter, 1, norm=False, bias=True, act=False)
            self.phi = pooled(ConvBN(in_channels, inter, 1, norm=False, bias=True, act=False))
        elif sub_sample:
            self.phi = nn.MaxPool3d(kernel_size=(1, 2, 2))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.01) -> None:
        """mmcv init: g/θ/φ ~ N(0, std) with zero bias, conv_out kaiming, output BN zeroed."""
        for module in (self.g, self.theta, self.phi):
            if module is None:
                continue
            for conv in module.modules():
                if isinstance(conv, nn.Conv3d):
                    init_normal(conv.weight, std)
                    if conv.bias is not None:
                        nn.init.zeros_(conv.bias)
        kaiming_normal_fan_out(self.conv_out.conv)
        nn.init.zeros_(self.conv_out.bn.weight)
        nn.init.zeros_(self.conv_out.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g_x = rearrange(self.g(x), "n c t h w -> n (t h w) c")
        if self.theta is None:
            theta_x = rearrange(x, "n c t h w -> n (t h w) c")
            phi_x = rearrange(
                self.phi(x) if self.phi is not None else x, "n c t h w -> n c (t h w)"
            )
        else:
            theta_x = rearrange(self.theta(x), "n c t h w -> n (t h w) c")
            phi_x = rearrange(self.phi(x), "n c t h w -> n c (t h w)")
        pairwise = torch.matmul(theta_x, phi_x)
        if self.mode == "dot_product":
            pairwise = pairwise / pairwise.shape[-1]
        else:
            if self.mode == "embedded_gaussian" and self.use_scale:
                pairwise = pairwise / theta_x.shape[-1] ** 0.5
            pairwise = pairwise.softmax(dim=-1)
        y = torch.matmul(pairwise, g_x)
        t, h, w = x.shape[2:]
        y = rearrange(y, "n (t h w) c -> n c t h w", t=t, h=h, w=w)
        return x + self.conv_out(y)
