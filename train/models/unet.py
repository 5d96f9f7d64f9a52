"""U-Net (Ronneberger et al. 2015) with batch norm and bilinear upsampling: an optional second
teacher (base width 32, ~7.8 M params; `unet-small`: base width 16, ~2 M, for CPU demos).

Distillation features: low = encoder level 2 (stride 2, 64 ch), high = encoder level 4
(stride 8, 256 ch)."""
from __future__ import annotations

import torch
from torch import nn

from .blocks import ConvBNAct, SegmentationNet, upsample_to
from .registry import register_model


def _double(cin, cout):
    return nn.Sequential(ConvBNAct(cin, cout), ConvBNAct(cout, cout))


class UNet(SegmentationNet):
    def __init__(self, num_classes=3, in_channels=1, base=32):
        super().__init__()
        w = [base * 2 ** i for i in range(5)]
        self.enc = nn.ModuleList([_double(in_channels, w[0])] + [_double(w[i], w[i + 1]) for i in range(4)])
        self.pool = nn.MaxPool2d(2)
        self.dec = nn.ModuleList([_double(w[i + 1] + w[i], w[i]) for i in range(4)])
        self.classifier = nn.Conv2d(w[0], num_classes, 1)

    def forward_features(self, x):
        skips, y = [], x
        for i, enc in enumerate(self.enc):
            y = enc(y if i == 0 else self.pool(y))
            skips.append(y)
        for i in reversed(range(4)):
            y = self.dec[i](torch.cat([upsample_to(y, skips[i]), skips[i]], 1))
        return self.classifier(y), {"low": skips[1], "high": skips[3]}


@register_model("unet")
def unet(num_classes=3, in_channels=1):
    """Optional second teacher: U-Net, base width 32."""
    return UNet(num_classes, in_channels)


@register_model("unet-small")
def unet_small(num_classes=3, in_channels=1):
    """A teacher for CPU demos: U-Net, base width 16 (~2 M params, a quarter of unet's FLOPs)."""
    return UNet(num_classes, in_channels, base=16)
