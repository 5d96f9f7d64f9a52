"""ENet student (Paszke et al. 2016), ~0.35 M params, the paper's main student.

Export change: the original decoder un-pools with MaxUnpool using the indices of the encoder's
MaxPool. TensorRT's ONNX parser supports neither MaxUnpool nor MaxPool's indices output, so here
the downsampling bottleneck's main branch is a plain MaxPool (no indices) zero-padded in
channels, and the upsampling bottleneck's main branch is a 1x1 conv followed by a bilinear x2
upsampling (ONNX Resize) instead of MaxUnpool. Everything else follows the paper.

Distillation features: low = initial block (stride 2, 16 ch), high = end of stage 3 (stride 8, 128 ch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import SegmentationNet
from .registry import register_model


def _cbp(cin, cout, k, stride=1, pad=0, dilation=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.PReLU(cout))


class InitialBlock(nn.Module):
    """3x3 stride-2 conv concatenated with a max-pooled copy of the input."""

    def __init__(self, cin, cout=16):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout - cin, 3, 2, 1, bias=False)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.PReLU(cout)

    def forward(self, x):
        return self.act(self.bn(torch.cat([self.conv(x), self.pool(x)], 1)))


class Bottleneck(nn.Module):
    """Regular / dilated / asymmetric bottleneck with a residual connection."""

    def __init__(self, ch, dilation=1, asymmetric=False, dropout=0.1):
        super().__init__()
        mid = ch // 4
        if asymmetric:
            middle = nn.Sequential(_cbp(mid, mid, (5, 1), pad=(2, 0)), _cbp(mid, mid, (1, 5), pad=(0, 2)))
        else:
            middle = _cbp(mid, mid, 3, pad=dilation, dilation=dilation)
        self.ext = nn.Sequential(_cbp(ch, mid, 1), middle, _cbp(mid, ch, 1), nn.Dropout2d(dropout))
        self.act = nn.PReLU(ch)

    def forward(self, x):
        return self.act(x + self.ext(x))


class DownBottleneck(nn.Module):
    """Stride-2 bottleneck; main branch: MaxPool without indices, zero-padded to cout channels."""

    def __init__(self, cin, cout, dropout=0.1):
        super().__init__()
        mid = cin // 4
        self.pool = nn.MaxPool2d(2, 2)
        self.ext = nn.Sequential(_cbp(cin, mid, 2, stride=2), _cbp(mid, mid, 3, pad=1), _cbp(mid, cout, 1),
                                 nn.Dropout2d(dropout))
        self.extra = cout - cin
        self.act = nn.PReLU(cout)

    def forward(self, x):
        main = F.pad(self.pool(x), (0, 0, 0, 0, 0, self.extra))
        return self.act(main + self.ext(x))


class UpBottleneck(nn.Module):
    """x2 bottleneck; main branch: 1x1 conv + bilinear upsampling (replaces MaxUnpool)."""

    def __init__(self, cin, cout, dropout=0.1):
        super().__init__()
        mid = cin // 4
        self.main = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.ext = nn.Sequential(
            _cbp(cin, mid, 1),
            nn.ConvTranspose2d(mid, mid, 2, 2, bias=False), nn.BatchNorm2d(mid), nn.PReLU(mid),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.Dropout2d(dropout))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        main = F.interpolate(self.main(x), scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.act(main + self.ext(x))


def _stage_body(ch=128):
    return [Bottleneck(ch), Bottleneck(ch, dilation=2), Bottleneck(ch, asymmetric=True), Bottleneck(ch, dilation=4),
            Bottleneck(ch), Bottleneck(ch, dilation=8), Bottleneck(ch, asymmetric=True), Bottleneck(ch, dilation=16)]


class ENet(SegmentationNet):
    def __init__(self, num_classes=3, in_channels=1):
        super().__init__()
        self.initial = InitialBlock(in_channels, 16)
        self.stage1 = nn.Sequential(DownBottleneck(16, 64, 0.01), *[Bottleneck(64, dropout=0.01) for _ in range(4)])
        self.stage2 = nn.Sequential(DownBottleneck(64, 128), *_stage_body())
        self.stage3 = nn.Sequential(*_stage_body())
        self.stage4 = nn.Sequential(UpBottleneck(128, 64), Bottleneck(64), Bottleneck(64))
        self.stage5 = nn.Sequential(UpBottleneck(64, 16), Bottleneck(16))
        self.classifier = nn.ConvTranspose2d(16, num_classes, 3, 2, 1, output_padding=1)

    def forward_features(self, x):
        low = self.initial(x)
        high = self.stage3(self.stage2(self.stage1(low)))
        y = self.stage5(self.stage4(high))
        return self.classifier(y), {"low": low, "high": high}


@register_model("enet")
def enet(num_classes=3, in_channels=1):
    """Student: ENet (~0.35 M params) with exportable upsampling instead of MaxUnpool."""
    return ENet(num_classes, in_channels)
