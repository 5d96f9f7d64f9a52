"""Showing the training library's log messages (logger `regionkd.train`) while a command runs:
plain lines on stderr, written through the command's progress bar once it has one, so that a
terminal bar is redrawn below them. Only the `regionkd.train` logger is touched, never the root."""
from __future__ import annotations

import contextlib
import logging

from regionkd.sdk.console import echo


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.bar = None

    def emit(self, record: logging.LogRecord) -> None:
        echo(self.format(record), bar=self.bar, err=True)


@contextlib.contextmanager
def show_messages(quiet: bool = False):
    """INFO messages and up (warnings only when `quiet`) while the block runs; yields the handler,
    whose `bar` a command sets to its progress bar."""
    logger = logging.getLogger("regionkd.train")
    handler, level = _Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
