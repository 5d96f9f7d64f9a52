"""One registry of networks created by name (timm style): each network file registers its
constructor with `@register_model("name")`; `create_model` builds it."""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..errors import ConfigError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator registering `fn(num_classes, in_channels) -> nn.Module` under `name`."""

    def deco(fn):
        if name in _MODELS:
            raise ConfigError(f"model {name!r} is registered twice")
        _MODELS[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, num_classes: int = 3, in_channels: int = 1) -> nn.Module:
    """Build a registered network. Unknown names raise ConfigError (a ValueError) listing the known ones."""
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    if num_classes < 2 or in_channels < 1:
        raise ConfigError(f"model {name!r}: num_classes must be >= 2 and in_channels >= 1 "
                         f"(got {num_classes}, {in_channels})")
    return _MODELS[name](num_classes=num_classes, in_channels=in_channels)
