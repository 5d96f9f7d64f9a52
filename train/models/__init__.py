"""Segmentation networks by name. Every network maps N x in_channels x H x W (H, W divisible by
32) to N x C x H x W raw logits; `forward_features(x)` also returns
{"low": stride-2 features, "high": stride-8 features} for distillation."""
from .registry import create_model, list_models, register_model
from . import enet, espnet, mobilenetv2, raunet, resnet18, tinynet, unet  # noqa: F401  (registers them)

__all__ = ["create_model", "list_models", "register_model"]
