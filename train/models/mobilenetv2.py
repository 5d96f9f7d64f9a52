"""MobileNetV2 students (Sandler et al. 2018).

- `mobilenetv2`: the standard MobileNetV2 encoder (width 1.0, output stride 32, without the
  final 1280-channel conv) with a light FPN-style decoder (64 channels, additive skips at
  strides 16, 8 and 4, one depthwise-separable conv) — genuinely light (~2 M params, a few
  GFLOPs per 384x384 slice).
- `mobilenetv2-s2`: the same with the decoder carried on to stride 2 (one more skip, from the
  stride-2 stage): a stride-4 map caps tumour Dice at about 0.77 on 20 mm lesions at 96x96.
- `mobilenetv2-os8`: the variant the authors used: stages after stride 8 dilated instead of
  strided (output stride 8), the 1280-channel conv kept, and a 3x3 conv head (160 ch) at stride 8; it
  costs about 19 GFLOPs per 384x384 slice, more than ResNet-18.

Distillation features: low = first inverted residual (stride 2, 16 ch), high = end of the
stride-8 stage (32 ch)."""
from __future__ import annotations

from torch import nn

from .blocks import ConvBNAct, SegmentationNet, upsample_to
from .registry import register_model

# (expansion t, channels c, repeats n, stride s) of the standard MobileNetV2
_CONFIG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand, dilation=1):
        super().__init__()
        mid = cin * expand
        layers = [] if expand == 1 else [ConvBNAct(cin, mid, 1, act=nn.ReLU6)]
        layers += [ConvBNAct(mid, mid, 3, stride, dilation, groups=mid, act=nn.ReLU6),
                   ConvBNAct(mid, cout, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2Encoder(nn.Module):
    """Returns the features at strides 2, 4, 8, 16, 32 (16, 24, 32, 96, 320 ch); with
    `output_stride=8` the last two are at stride 8 (dilated)."""

    def __init__(self, in_channels=1, output_stride=32):
        super().__init__()
        self.stem = ConvBNAct(in_channels, 32, 3, 2, act=nn.ReLU6)
        stages, cin, stride_now, dilation = [], 32, 2, 1
        for t, c, n, s in _CONFIG:
            blocks = []
            for i in range(n):
                stride = s if i == 0 else 1
                if stride == 2 and stride_now >= output_stride:
                    block_dilation, stride = dilation, 1
                    dilation *= 2
                else:
                    block_dilation = dilation
                    stride_now *= stride
                blocks.append(InvertedResidual(cin, c, stride, t, block_dilation))
                cin = c
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)

    def forward(self, x):
        y, outs = self.stem(x), []
        for stage in self.stages:
            y = stage(y)
            outs.append(y)
        # stage outputs: 16@2, 24@4, 32@8, 64@16, 96@16, 160@32, 320@32
        return outs[0], outs[1], outs[2], outs[4], outs[6]


class MobileNetV2Light(SegmentationNet):
    """`output_stride` 4 (the default) or 2: at 2 the decoder takes one more skip, from the
    stride-2 stage, so that its maps can follow a full-resolution teacher's on small lesions."""

    def __init__(self, num_classes=3, in_channels=1, width=64, output_stride=4):
        super().__init__()
        if output_stride not in (2, 4):
            raise ValueError(f"MobileNetV2Light: output_stride must be 2 or 4, got {output_stride}")
        self.encoder = MobileNetV2Encoder(in_channels)
        self.lat = nn.ModuleList([ConvBNAct(c, width, 1) for c in (24, 32, 96, 320)])
        self.lat2 = ConvBNAct(16, width, 1) if output_stride == 2 else None
        self.refine = nn.Sequential(ConvBNAct(width, width, 3, groups=width), ConvBNAct(width, width, 1))
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward_features(self, x):
        s2, s4, s8, s16, s32 = self.encoder(x)
        y = self.lat[3](s32)
        for lat, skip in ((self.lat[2], s16), (self.lat[1], s8), (self.lat[0], s4)):
            y = lat(skip) + upsample_to(y, skip)
        if self.lat2 is not None:
            y = self.lat2(s2) + upsample_to(y, s2)
        logits = upsample_to(self.classifier(self.refine(y)), x)
        return logits, {"low": s2, "high": s8}


class MobileNetV2OS8(SegmentationNet):
    def __init__(self, num_classes=3, in_channels=1, head=160):
        super().__init__()
        self.encoder = MobileNetV2Encoder(in_channels, output_stride=8)
        self.last = ConvBNAct(320, 1280, 1, act=nn.ReLU6)
        self.head = ConvBNAct(1280, head, 3)
        self.classifier = nn.Conv2d(head, num_classes, 1)

    def forward_features(self, x):
        s2, _, s8, _, out = self.encoder(x)
        logits = upsample_to(self.classifier(self.head(self.last(out))), x)
        return logits, {"low": s2, "high": s8}


@register_model("mobilenetv2")
def mobilenetv2(num_classes=3, in_channels=1):
    """Student: MobileNetV2 encoder + light FPN decoder (output stride 32)."""
    return MobileNetV2Light(num_classes, in_channels)


@register_model("mobilenetv2-s2")
def mobilenetv2_s2(num_classes=3, in_channels=1):
    """Student: MobileNetV2 with the light decoder carried on to stride 2 (one more skip)."""
    return MobileNetV2Light(num_classes, in_channels, output_stride=2)


@register_model("mobilenetv2-os8")
def mobilenetv2_os8(num_classes=3, in_channels=1):
    """Student: the authors' output-stride-8 MobileNetV2 (~19 GFLOPs per 384x384 slice)."""
    return MobileNetV2OS8(num_classes, in_channels)
