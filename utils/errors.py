"""The one base of every error that means "the input is wrong", not "the code is wrong".

``main.py`` reports a :class:`UserError` as one line naming the key, file or folder
at fault, and exits with code 2. Every other exception is a bug and keeps its
traceback. Each module raises its own subclass (``ConfigError``,
``DatasetLayoutError``, ``CheckpointError``, ...), so a caller can still tell them
apart.
"""
from __future__ import annotations


class UserError(Exception):
    """A config value, data file, run folder, checkpoint or weights file is not what the run needs."""


class RunInterrupted(Exception):
    """SIGTERM or SIGINT stopped the run after an iteration; its in-step checkpoint holds everything done."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
