"""ResNet-18 student: the ResNet-18 encoder with LinkNet decoders and additive skips (LinkNet,
Chaurasia & Culurciello 2017), as used for the ResNet-18 row of Qin et al.

Distillation features: low = stem output (stride 2, 64 ch), high = encoder stage 2 (stride 8, 128 ch)."""
from __future__ import annotations

from .blocks import LinkNetDecoder, LinkNetHead, ResNetEncoder, SegmentationNet
from .registry import register_model


class ResNet18LinkNet(SegmentationNet):
    def __init__(self, num_classes=3, in_channels=1):
        super().__init__()
        self.encoder = ResNetEncoder((2, 2, 2, 2), in_channels)
        w = self.encoder.widths
        self.dec4 = LinkNetDecoder(w[3], w[2])
        self.dec3 = LinkNetDecoder(w[2], w[1])
        self.dec2 = LinkNetDecoder(w[1], w[0])
        self.dec1 = LinkNetDecoder(w[0], w[0])
        self.head = LinkNetHead(w[0], num_classes)

    def forward_features(self, x):
        s2, (e1, e2, e3, e4) = self.encoder(x)
        d = self.dec4(e4) + e3
        d = self.dec3(d) + e2
        d = self.dec2(d) + e1
        return self.head(self.dec1(d)), {"low": s2, "high": e2}


@register_model("resnet18")
def resnet18(num_classes=3, in_channels=1):
    """Student: ResNet-18 LinkNet (~11.5 M params)."""
    return ResNet18LinkNet(num_classes, in_channels)
