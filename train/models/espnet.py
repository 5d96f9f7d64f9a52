"""ESPNet student (Mehta et al. 2018), the full network with its decoder (p=2, q=3), ~0.19 M
params for 3 classes. The efficient spatial pyramid (ESP) module: a 1x1 (or stride-2 3x3)
reduction, five parallel dilated 3x3 convs (d = 1, 2, 4, 8, 16) whose outputs are summed
hierarchically before concatenation, so gridding artefacts cancel. With fewer than 5 classes the
decoder's ESP merge block (which needs >= 5 channels) is a 3x3 conv-BN-PReLU instead.

Distillation features: low = level-1 output concatenated with the input (stride 2),
high = level-3 output (stride 8, 256 ch)."""
from __future__ import annotations

import torch
from torch import nn

from .blocks import SegmentationNet
from .registry import register_model


class BR(nn.Sequential):
    def __init__(self, ch):
        super().__init__(nn.BatchNorm2d(ch, eps=1e-3), nn.PReLU(ch))


class CBR(nn.Sequential):
    def __init__(self, cin, cout, k, stride=1):
        super().__init__(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, bias=False), BR(cout))


class ESPModule(nn.Module):
    """ESP block; stride 2 makes it the down-sampler, `residual` adds the input (same size)."""

    def __init__(self, cin, cout, stride=1, residual=True):
        super().__init__()
        n = cout // 5
        n1 = cout - 4 * n
        k = 3 if stride == 2 else 1
        self.reduce = nn.Conv2d(cin, n, k, stride, (k - 1) // 2, bias=False)
        self.branches = nn.ModuleList(
            [nn.Conv2d(n, n1 if d == 1 else n, 3, 1, d, dilation=d, bias=False) for d in (1, 2, 4, 8, 16)])
        self.residual = residual and stride == 1 and cin == cout
        self.out = BR(cout)

    def forward(self, x):
        r = self.reduce(x)
        d1, *dilated = [b(r) for b in self.branches]
        sums, acc = [], None
        for d in dilated:  # hierarchical feature fusion
            acc = d if acc is None else acc + d
            sums.append(acc)
        y = torch.cat([d1, *sums], 1)
        return self.out(x + y if self.residual else y)


class InputProjection(nn.Module):
    """The input image average-pooled `times` times by 2 (ESPNet re-injects it at each level)."""

    def __init__(self, times):
        super().__init__()
        self.pools = nn.Sequential(*[nn.AvgPool2d(3, 2, 1) for _ in range(times)])

    def forward(self, x):
        return self.pools(x)


class ESPNet(SegmentationNet):
    def __init__(self, num_classes=3, in_channels=1, p=2, q=3):
        super().__init__()
        c0 = 16 + in_channels
        self.level1 = CBR(in_channels, 16, 3, 2)
        self.sample1, self.sample2 = InputProjection(1), InputProjection(2)
        self.b1 = BR(c0)
        self.level2_0 = ESPModule(c0, 64, stride=2)
        self.level2 = nn.Sequential(*[ESPModule(64, 64) for _ in range(p)])
        c1 = 128 + in_channels
        self.b2 = BR(c1)
        self.level3_0 = ESPModule(c1, 128, stride=2)
        self.level3 = nn.Sequential(*[ESPModule(128, 128) for _ in range(q)])
        self.b3 = BR(256)
        self.classifier3 = nn.Conv2d(256, num_classes, 1, bias=False)
        self.br3 = nn.BatchNorm2d(num_classes, eps=1e-3)
        self.up3 = nn.ConvTranspose2d(num_classes, num_classes, 2, 2, bias=False)
        self.classifier2 = nn.Conv2d(c1, num_classes, 1, bias=False)
        # an ESP module needs >= 5 output channels; with fewer classes a 3x3 CBR merges instead
        merge = (ESPModule(2 * num_classes, num_classes, residual=False) if num_classes >= 5
                 else CBR(2 * num_classes, num_classes, 3))
        self.combine = nn.Sequential(BR(2 * num_classes), merge)
        self.up2 = nn.Sequential(nn.ConvTranspose2d(num_classes, num_classes, 2, 2, bias=False), BR(num_classes))
        self.merge1 = CBR(c0 + num_classes, num_classes, 3)
        self.up1 = nn.ConvTranspose2d(num_classes, num_classes, 2, 2, bias=False)

    def forward_features(self, x):
        out0 = self.b1(torch.cat([self.level1(x), self.sample1(x)], 1))
        down1 = self.level2_0(out0)
        out1 = self.b2(torch.cat([self.level2(down1), down1, self.sample2(x)], 1))
        down2 = self.level3_0(out1)
        out2 = self.b3(torch.cat([down2, self.level3(down2)], 1))
        y3 = self.up3(self.br3(self.classifier3(out2)))
        y2 = self.up2(self.combine(torch.cat([self.classifier2(out1), y3], 1)))
        logits = self.up1(self.merge1(torch.cat([y2, out0], 1)))
        return logits, {"low": out0, "high": out2}


@register_model("espnet")
def espnet(num_classes=3, in_channels=1):
    """Student: ESPNet (p=2, q=3), ~0.19 M params."""
    return ESPNet(num_classes, in_channels)
