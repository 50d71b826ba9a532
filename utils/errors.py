"""The one base of every error that means "the input is wrong", not "the code is wrong".

``main.py`` reports a :class:`UserError` as one line naming the key, file or folder
at fault, and exits with code 2. Every other exception is a bug and keeps its
traceback. Each module raises its own subclass (``ConfigError``,
``DatasetLayoutError``, ``CheckpointError``, ...), so a caller can still tell them
apart.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


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


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # a scheduler's pre-emption, Ctrl-C


class StopSignal(BaseException):
    """SIGTERM or SIGINT outside the step loop, where there is nothing to save first: the run stops where it is.
    A BaseException (like KeyboardInterrupt), so no ``except Exception`` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stop_signal(signum, frame) -> None:
    raise StopSignal(signum)


@contextlib.contextmanager
def stop_signals_raising() -> Iterator[None]:
    """Inside, SIGTERM and SIGINT raise :class:`StopSignal` (main.py turns it into one line); the step loop's
    ``utils.distributed.StopRequest`` takes them over while it runs. The previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():  # Python handles signals there only
        yield
        return
    previous = {sig: signal.signal(sig, _raise_stop_signal) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def ignore_stop_signals() -> None:
    """While a run that was asked to stop tears down: another stop signal must not cut the clean-up short (the
    handlers of :func:`stop_signals_raising` come back when it exits)."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
