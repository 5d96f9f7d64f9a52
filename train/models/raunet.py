"""RAUNet teacher (Ni et al. 2019, the teacher of Qin et al. 2021): a ResNet-34 encoder,
LinkNet-style decoders, and augmented attention modules (AAM) that fuse each decoder output with
the encoder feature of the same stride. Written here: no torchvision, no pretrained download.

Distillation features: low = stem output (stride 2, 64 ch), high = encoder stage 2 (stride 8,
128 ch)."""
from __future__ import annotations

import torch
from torch import nn

from .blocks import ConvBNAct, LinkNetDecoder, LinkNetHead, ResNetEncoder, SegmentationNet
from .registry import register_model


class AugmentedAttention(nn.Module):
    """AAM: global context of the high-level (decoder) and low-level (encoder) features gives a
    softmax channel attention vector that weights the projected low-level feature, which is then
    added to the high-level one."""

    def __init__(self, channels):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.high_ctx = ConvBNAct(channels, channels, 1)
        self.low_ctx = ConvBNAct(channels, channels, 1)
        self.attn = nn.Conv2d(channels, channels, 1)
        self.low_proj = ConvBNAct(channels, channels, 1, act=None)

    def forward(self, high, low):
        ctx = self.high_ctx(self.pool(high)) + self.low_ctx(self.pool(low))
        weights = torch.softmax(self.attn(ctx), dim=1)
        return high + self.low_proj(low) * weights


class RAUNet(SegmentationNet):
    def __init__(self, num_classes=3, in_channels=1, layers=(3, 4, 6, 3)):
        super().__init__()
        self.encoder = ResNetEncoder(layers, in_channels)
        w = self.encoder.widths  # 64, 128, 256, 512
        self.dec4 = LinkNetDecoder(w[3], w[2])
        self.dec3 = LinkNetDecoder(w[2], w[1])
        self.dec2 = LinkNetDecoder(w[1], w[0])
        self.dec1 = LinkNetDecoder(w[0], w[0])
        self.fuse3 = AugmentedAttention(w[2])
        self.fuse2 = AugmentedAttention(w[1])
        self.fuse1 = AugmentedAttention(w[0])
        self.head = LinkNetHead(w[0], num_classes)

    def forward_features(self, x):
        s2, (e1, e2, e3, e4) = self.encoder(x)
        d4 = self.fuse3(self.dec4(e4), e3)
        d3 = self.fuse2(self.dec3(d4), e2)
        d2 = self.fuse1(self.dec2(d3), e1)
        d1 = self.dec1(d2)
        return self.head(d1), {"low": s2, "high": e2}


@register_model("raunet")
def raunet(num_classes=3, in_channels=1):
    """Teacher: RAUNet with a ResNet-34 encoder (~22 M params)."""
    return RAUNet(num_classes, in_channels)
