"""TinyNet: a ~30 k-param student for tests and quick sweeps (depthwise-separable encoder to
stride 16, additive skips back to stride 2, bilinear x2 to the input size). Not from the paper.

Distillation features: low = stem (stride 2, 16 ch), high = stride-8 stage (48 ch)."""
from __future__ import annotations

from torch import nn

from .blocks import ConvBNAct, SegmentationNet, upsample_to
from .registry import register_model


def _sep(cin, cout, stride=1, dilation=1):
    """Depthwise 3x3 + pointwise 1x1."""
    return nn.Sequential(ConvBNAct(cin, cin, 3, stride, dilation, groups=cin), ConvBNAct(cin, cout, 1))


class TinyNet(SegmentationNet):
    def __init__(self, num_classes=3, in_channels=1):
        super().__init__()
        self.stem = ConvBNAct(in_channels, 16, 3, 2)
        self.s4 = nn.Sequential(_sep(16, 32, 2), _sep(32, 32))
        self.s8 = nn.Sequential(_sep(32, 48, 2), _sep(48, 48))
        self.s16 = nn.Sequential(_sep(48, 64, 2), _sep(64, 64, dilation=2), _sep(64, 64, dilation=4))
        self.up8 = ConvBNAct(64, 48, 1)
        self.up4 = ConvBNAct(48, 32, 1)
        self.up2 = ConvBNAct(32, 16, 1)
        self.refine = _sep(16, 16)
        self.classifier = nn.Conv2d(16, num_classes, 1)

    def forward_features(self, x):
        s2 = self.stem(x)
        s4 = self.s4(s2)
        s8 = self.s8(s4)
        y = self.s16(s8)
        y = upsample_to(self.up8(y), s8) + s8
        y = upsample_to(self.up4(y), s4) + s4
        y = upsample_to(self.up2(y), s2) + s2
        logits = upsample_to(self.classifier(self.refine(y)), x)
        return logits, {"low": s2, "high": s8}


@register_model("tinynet")
def tinynet(num_classes=3, in_channels=1):
    """Test/sweep student: ~30 k params."""
    return TinyNet(num_classes, in_channels)
