"""The mmaction2 ResNet3d I3D family in plain PyTorch (same modules, keys and numbers)."""

from __future__ import annotations

import torch
from torch import nn

from i3d.models.config import HeadConfig, ResNet3dConfig
from i3d.models.layers import ConvBN, init_normal, kaiming_normal_fan_out
from i3d.models.nonlocal_block import NonLocal3d
from i3d.models.recognizer import Recognizer


class BasicBlock3d(nn.Module):
    """Two 3×3 convs (3×3×3 when inflated, 1×3×3 otherwise), for depth 18/34."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        spatial_stride: int,
        temporal_stride: int,
        dilation: int,
        downsample: nn.Module | None,
        inflate: bool,
        non_local: nn.Module | None,
        **_: object,
    ) -> None:
        super().__init__()
        k1, p1 = (
            ((3, 3, 3), (1, dilation, dilation))
            if inflate
            else ((1, 3, 3), (0, dilation, dilation))
        )
        k2, p2 = ((3, 3, 3), (1, 1, 1)) if inflate else ((1, 3, 3), (0, 1, 1))
        stride = (temporal_stride, spatial_stride, spatial_stride)
        self.conv1 = ConvBN(inplanes, planes, k1, stride, p1, (1, dilation, dilation))
        self.conv2 = ConvBN(planes, planes, k2, 1, p2, act=False)
        self.downsample = downsample
        self.relu = nn.ReLU(inplace=True)
        self.non_local_block = non_local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.conv2(self.conv1(x)) + identity)
        return out if self.non_local_block is None else self.non_local_block(out)

    def last_bn(self) -> nn.BatchNorm3d:
        return self.conv2.bn


class Bottleneck3d(nn.Module):
    """1×1 → 3×3 → 1×1 bottleneck; inflation puts the temporal kernel on conv1 or conv2."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        spatial_stride: int,
        temporal_stride: int,
        dilation: int,
        downsample: nn.Module | None,
        inflate: bool,
        non_local: nn.Module | None,
        style: str = "pytorch",
        inflate_style: str = "3x1x1",
    ) -> None:
        super().__init__()
        if style == "pytorch":
            s1, s2, t1, t2 = 1, spatial_stride, 1, temporal_stride
        else:
            s1, s2, t1, t2 = spatial_stride, 1, temporal_stride, 1
        if inflate and inflate_style == "3x1x1":
            k1, p1, k2, p2 = (3, 1, 1), (1, 0, 0), (1, 3, 3), (0, dilation, dilation)
        elif inflate:
            k1, p1, k2, p2 = (1, 1, 1), (0, 0, 0), (3, 3, 3), (1, dilation, dilation)
        else:
            k1, p1, k2, p2 = (1, 1, 1), (0, 0, 0), (1, 3, 3), (0, dilation, dilation)
        self.conv1 = ConvBN(inplanes, planes, k1, (t1, s1, s1), p1)
        self.conv2 = ConvBN(planes, planes, k2, (t2, s2, s2), p2, (1, dilation, dilation))
        self.conv3 = ConvBN(planes, planes * self.expansion, 1, act=False)
        self.downsample = downsample
        self.relu = nn.ReLU(inplace=True)
        self.non_local_block = non_local

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.conv3(self.conv2(self.conv1(x))) + identity)
        return out if self.non_local_block is None else self.non_local_block(out)

    def last_bn(self) -> nn.BatchNorm3d:
        return self.conv3.bn


class ResNet3d(nn.Module):
    """Backbone: stem (conv1, pool1), stages layer1..layerN, pool2 after layer1."""

    def __init__(self, config: ResNet3dConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        block = BasicBlock3d if c.block_type == "basic" else Bottleneck3d
        self.conv1 = ConvBN(
            c.in_channels,
            c.base_channels,
            c.conv1_kernel,
            stride=(c.conv1_stride_t, c.conv1_stride_s, c.conv1_stride_s),
            padding=tuple((k - 1) // 2 for k in c.conv1_kernel),
        )
        self.maxpool = nn.MaxPool3d(
            kernel_size=(c.pool1_kernel_t, 3, 3),
            stride=(c.pool1_stride_t, c.pool1_stride_s, c.pool1_stride_s),
            padding=c.pool1_padding,
        )
        self.pool2 = nn.MaxPool3d(kernel_size=(2, 1, 1), stride=(2, 1, 1))
        inflate, non_local = c.block_flags("inflate"), c.block_flags("non_local")
        inplanes = c.base_channels
        self.layer_names: list[str] = []
        for i, blocks in enumerate(c.stage_blocks):
            planes = c.base_channels * 2**i
            s, t, d = c.spatial_strides[i], c.temporal_strides[i], c.dilations[i]
            layers = []
            for b in range(blocks):
                downsample = None
                if b == 0 and (s != 1 or t != 1 or inplanes != planes * block.expansion):
                    downsample = ConvBN(inplanes, planes * block.expansion, 1, (t, s, s), act=False)
                nl = (
                    NonLocal3d(
                        planes * block.expansion,
                        mode=c.non_local_mode,
                        sub_sample=c.non_local_sub_sample,
                        use_scale=c.non_local_use_scale,
                    )
                    if non_local[i][b]
                    else None
                )
                layers.append(
                    block(
                        inplanes,
                        planes,
                        spatial_stride=s if b == 0 else 1,
                        temporal_stride=t if b == 0 else 1,
                        dilation=d,
                        downsample=downsample,
                        inflate=inflate[i][b],
                        non_local=nl,
                        style=c.style,
                        inflate_style=c.inflate_style,
                    )
                )
                inplanes = planes * block.expansion
            name = f"layer{i + 1}"
            self.add_module(name, nn.Sequential(*layers))
            self.layer_names.append(name)

    def reset_parameters(self) -> None:
        """mmaction's from-scratch init: kaiming convs, BN weight 1 / bias 0.

        Non-local blocks then get mmcv's own init (g/θ/φ N(0, 0.01), output BN zeroed, so each
        block starts as the identity); ``zero_init_residual`` zeroes each block's last BN.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                kaiming_normal_fan_out(m)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, NonLocal3d):
                m.reset_parameters()
            if self.config.zero_init_residual and isinstance(m, (BasicBlock3d, Bottleneck3d)):
                nn.init.zeros_(m.last_bn().weight)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.maxpool(x) if self.config.with_pool1 else x

    def stages(self):
        """(name, module, apply_pool2_after) for each stage, in order."""
        for i, name in enumerate(self.layer_names):
            yield name, getattr(self, name), i == 0 and self.config.with_pool2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for _, layer, pool2 in self.stages():
            x = layer(x)
            if pool2:
                x = self.pool2(x)
        return x

    def frozen_modules(self) -> list[nn.Module]:
        """Stem and the first ``frozen_stages`` stages, kept in eval mode without gradients."""
        if self.config.frozen_stages < 0:
            return []
        return [self.conv1] + [
            getattr(self, n) for n in self.layer_names[: self.config.frozen_stages]
        ]


class I3DHead(nn.Module):
    """Average pool over (T, H, W), dropout, linear classifier (``fc_cls``)."""

    def __init__(self, in_channels: int, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        self.avg_pool = nn.AdaptiveAvgPool3d(1) if config.spatial_pool else None
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.fc_cls = nn.Linear(in_channels, config.num_classes)

    def reset_parameters(self) -> None:
        init_normal(self.fc_cls.weight, self.config.init_std)
        nn.init.zeros_(self.fc_cls.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.avg_pool is not None:
            x = self.avg_pool(x)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.fc_cls(x.flatten(1))


class ResNet3dI3D(Recognizer):
    """ResNet3d backbone + I3D head: mmaction2's ``Recognizer3D`` for the I3D configs.

    ``features(x)`` returns the backbone map (N, C, T', H', W'); ``endpoints`` exposes
    ``stem``, ``layer1``..``layer4`` (``layer1`` after pool2, as the next stage sees it).
    """

    classifier_prefix = "cls_head.fc_cls."

    def __init__(self, config: ResNet3dConfig) -> None:
        super().__init__()
        self.config = config
        self.in_channels = config.in_channels
        self.backbone = ResNet3d(config)
        self.cls_head = I3DHead(config.feature_channels, config.head)
        self.endpoint_names = ("stem", *self.backbone.layer_names, "logits")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise for training from scratch exactly as mmaction does."""
        self.backbone.reset_parameters()
        self.cls_head.reset_parameters()

    def train(self, mode: bool = True) -> ResNet3dI3D:
        super().train(mode)
        for module in self.backbone.frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)
        if mode and self.config.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone feature map (N, C, T', H', W') before the head, for (N, C, T, H, W) input."""
        self.check_input(x)
        return self.backbone(x)

    def forward_clips(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls_head(self.backbone(x))

    def _endpoints(self, x: torch.Tensor, names: set[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        x = self.backbone.stem(x)
        if "stem" in names:
            out["stem"] = x
        for name, layer, pool2 in self.backbone.stages():
            if len(out) == len(names):
                return out
            x = layer(x)
            if pool2:
                x = self.backbone.pool2(x)
            if name in names:
                out[name] = x
        if "logits" in names:
            out["logits"] = self.cls_head(x)
        return out
