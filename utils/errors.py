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


def one_line(err: UserError) -> str:
    """The message of ``err`` as one line. A DataLoader worker's error reaches the main process as
    ``type(err)(text)``, the text being "Caught X in DataLoader worker process N.\nOriginal Traceback ...
    \nmodule.X: <message>": only the original message is kept."""
    message = str(err)
    if message.startswith("Caught ") and "\nOriginal Traceback" in message:
        last = message.rstrip().splitlines()[-1]
        message = last.split(": ", 1)[1] if ": " in last else last
    return message


class RunInterrupted(Exception):
    """SIGTERM or SIGINT stopped the run after an iteration; its in-step checkpoint holds everything done."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
