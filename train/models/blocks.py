"""Building blocks shared by several networks: conv-BN-act, ResNet basic blocks and encoders,
LinkNet decoder blocks. Everything here exports to ONNX ops TensorRT's parser supports."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) + BatchNorm + activation; padding keeps the size at stride 1."""

    def __init__(self, cin, cout, k=3, stride=1, dilation=1, groups=1, act: type[nn.Module] | None = nn.ReLU):
        pad = dilation * (k - 1) // 2
        layers = [nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, groups=groups, bias=False),
                  nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act(inplace=True) if act in (nn.ReLU, nn.ReLU6) else act())
        super().__init__(*layers)


def upsample_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Bilinear resize of x to ref's spatial size (ONNX Resize, linear, half_pixel)."""
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs + identity or 1x1 projection shortcut)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = ConvBNAct(cin, cout, 3, stride)
        self.conv2 = ConvBNAct(cout, cout, 3, 1, act=None)
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout
                         else ConvBNAct(cin, cout, 1, stride, act=None))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """ResNet-18/34 encoder written out (no torchvision, no download). Returns the stem output
    (stride 2, 64 ch) and the four stages (strides 4, 8, 16, 32; 64/128/256/512 ch)."""

    def __init__(self, layers=(3, 4, 6, 3), in_channels=1):
        super().__init__()
        self.stem = ConvBNAct(in_channels, 64, 7, 2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        widths = (64, 128, 256, 512)
        stages, cin = [], 64
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = [BasicBlock(cin, w, 1 if i == 0 else 2)] + [BasicBlock(w, w) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.widths = widths

    def forward(self, x):
        s2 = self.stem(x)
        feats, y = [], self.pool(s2)
        for stage in self.stages:
            y = stage(y)
            feats.append(y)
        return s2, feats


class LinkNetDecoder(nn.Module):
    """LinkNet decoder block: 1x1 reduce to cin/4, 3x3 transposed conv x2 up, 1x1 expand to cout."""

    def __init__(self, cin, cout):
        super().__init__()
        mid = cin // 4
        self.reduce = ConvBNAct(cin, mid, 1)
        self.up = nn.Sequential(nn.ConvTranspose2d(mid, mid, 3, 2, 1, output_padding=1, bias=False),
                                nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.expand = ConvBNAct(mid, cout, 1)

    def forward(self, x):
        return self.expand(self.up(self.reduce(x)))


class LinkNetHead(nn.Module):
    """LinkNet's final classifier: transposed conv x2 (stride 2 -> 1), 3x3 conv, 1x1 to classes."""

    def __init__(self, cin, num_classes, mid=32):
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose2d(cin, mid, 3, 2, 1, output_padding=1, bias=False),
                                nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.conv = ConvBNAct(mid, mid, 3)
        self.classifier = nn.Conv2d(mid, num_classes, 1)

    def forward(self, x):
        return self.classifier(self.conv(self.up(x)))


class SegmentationNet(nn.Module):
    """Base class: subclasses implement forward_features; forward returns only the logits."""

    def forward(self, x):
        return self.forward_features(x)[0]

    def forward_features(self, x):  # pragma: no cover - abstract
        raise NotImplementedError
