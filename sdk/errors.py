"""Errors the runtime raises. Every one names the input and the problem; CLIs print the
message and exit non-zero."""
from __future__ import annotations

import importlib
from types import ModuleType


class RegionKDError(Exception):
    """Base class of every error regionkd raises on purpose."""


class InputError(RegionKDError):
    """A CT volume (or other user input) that cannot be segmented as given."""


class BundleError(RegionKDError):
    """A model bundle that is missing, incomplete, corrupt or inconsistent."""


class BackendError(RegionKDError):
    """An inference backend that cannot run here (unknown name, missing engine, wrong GPU)."""


class OutputError(RegionKDError, OSError):
    """A result (mask, preview, bundle, report) that cannot be written; the message names the file.
    Also an OSError, so code that handles write failures as OSError keeps working."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "cannot write output"


class MissingDependencyError(RegionKDError, ImportError):
    """An optional dependency is not installed; the message says what to install."""


def require(module: str, extra: str | None = None, purpose: str = "") -> ModuleType:
    """Import an optional heavy dependency lazily, failing with a message that says what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = f"pip install 'regionkd[{extra}]'" if extra else f"pip install {module.split('.')[0]}"
        what = f" (needed for {purpose})" if purpose else ""
        raise MissingDependencyError(f"Python module '{module}' is not installed{what}: {hint}") from exc


class PacsError(RegionKDError):
    """A PACS (DICOMweb) that cannot be reached, refuses a request, or answers with something
    unusable (a partial series, a series that is not CT); the message names the PACS and the request."""
