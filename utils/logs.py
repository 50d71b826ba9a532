"""Run logging: a plain-text log, tensorboard scalars and images (rank 0 only)."""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from utils.errors import UserError

LOGGER_NAME = "mbs"


class TensorboardWriteError(UserError):
    """The tensorboard event file could not be written (disk full, no permission, ...)."""


def setup_logger(log_file: Optional[Path], is_main: bool) -> logging.Logger:
    """The run's logger: progress to stdout, warnings and errors to stderr, everything to ``log_file`` on rank 0."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in logger.handlers:  # e.g. the log file of an earlier run in this process
        handler.close()
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    # Progress goes to stdout, warnings and errors to stderr (where a caller looks for them).
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(formatter)
    console.addFilter(lambda record: record.levelno < logging.WARNING)
    logger.addHandler(console)
    errors = logging.StreamHandler(sys.stderr)
    errors.setFormatter(formatter)
    errors.setLevel(logging.WARNING)
    logger.addHandler(errors)
    if is_main and log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def colorize(labels: torch.Tensor, palette: np.ndarray) -> torch.Tensor:
    """(H, W) integer labels -> (3, H, W) uint8 RGB in ``palette`` ((256, 3) uint8, from datasets.classes)."""
    table = torch.from_numpy(np.asarray(palette, dtype=np.uint8))
    return table[labels.long().clamp(0, 255).cpu()].permute(2, 0, 1)


def quiet_tensorboard_thread_write_errors() -> None:
    """Keep the OSError that kills tensorboard's background writer thread from printing a traceback: the
    thread keeps it, and the writer's next add, flush or close raises it in the main thread, where
    :class:`TensorboardWriter` reports it in one line. Every other thread error is printed as before."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard_write_errors", False):  # installed already
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        from_tensorboard = type(args.thread).__module__.startswith("tensorboard.")
        if from_tensorboard and args.exc_type is not None and issubclass(args.exc_type, OSError):
            return
        previous(args)

    hook.quiets_tensorboard_write_errors = True
    threading.excepthook = hook


class TensorboardWriter:
    """Thin wrapper: a no-op on non-main ranks, so callers never branch on rank. A failed write (a full disk)
    is a :class:`TensorboardWriteError` naming the folder, after which the writer is disabled."""

    def __init__(self, log_dir: Optional[Path], enabled: bool):
        self.writer = None
        self.log_dir = log_dir
        if enabled and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            quiet_tensorboard_thread_write_errors()
            with self.reporting_write_errors():
                self.writer = SummaryWriter(log_dir=str(log_dir))  # writes the event file's first record

    @contextlib.contextmanager
    def reporting_write_errors(self) -> Iterator[None]:
        """An OSError of the event file (raised here, or by the writer thread and raised again on the next
        call) becomes one line naming the folder; the writer is dropped, so that close() does not fail again."""
        try:
            yield
        except OSError as err:
            broken, self.writer = self.writer, None
            if broken is not None:
                with contextlib.suppress(Exception):  # its flush fails again; what it holds is released
                    broken.close()
            raise TensorboardWriteError(f"could not write the tensorboard events in {self.log_dir}: "
                                        f"{err.strerror or err}") from err

    @property
    def enabled(self) -> bool:
        """False on non-main ranks and before the run folder is checked: callers can skip work it would drop."""
        return self.writer is not None

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        with self.reporting_write_errors():
            for name, value in values.items():
                if value is not None:
                    self.writer.add_scalar(prefix + name, float(value), step)

    def segmentation_images(self, tag: str, image: torch.Tensor, label: torch.Tensor,
                            prediction: torch.Tensor, step: int, palette: np.ndarray) -> None:
        """Input (3,H,W) in [0,1], label and prediction (H,W), side by side, in ``palette``."""
        if self.writer is None:
            return
        row = torch.cat([(image.cpu() * 255).to(torch.uint8), colorize(label, palette), colorize(prediction, palette)],
                        dim=2)
        with self.reporting_write_errors():
            self.writer.add_image(tag, row, step)

    def close(self) -> None:
        if self.writer is not None:
            with self.reporting_write_errors():
                self.writer.flush()
                self.writer.close()
