"""Errors of the training side. Each is a RegionKDError, so that a command prints its message and
exits 1, and also the builtin error it replaces, so that `except ValueError` keeps working."""
from __future__ import annotations

from regionkd.sdk.errors import RegionKDError


class ConfigError(RegionKDError, ValueError):
    """An option or argument with a value training cannot use: an unknown network, a fraction out
    of range, a phantom shape too small."""


class UnknownOptionError(ConfigError, TypeError):
    """A training option that does not exist (a TypeError, as for an unknown keyword argument)."""
