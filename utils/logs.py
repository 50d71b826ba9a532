"""Run logging: a plain-text log, tensorboard scalars and images (rank 0 only)."""
from __future__ import annotations

import colorsys
import logging
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

LOGGER_NAME = "mbs"


def setup_logger(run_dir: Optional[Path], is_main: bool) -> logging.Logger:
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
    if is_main and run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(Path(run_dir) / "log.txt")
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def voc_palette(num_entries: int = 256) -> np.ndarray:
    """The standard PASCAL VOC colour map (bit-interleaved), (256, 3) uint8; 255 shows white."""
    palette = np.zeros((num_entries, 3), dtype=np.uint8)
    for index in range(num_entries):
        value, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[index] = (r, g, b)
    palette[255] = (255, 255, 255)
    return palette


def ade_palette(num_classes: int = 151) -> np.ndarray:
    """A fixed colour per ADE20K class, (256, 3) uint8: 0 ("other") black, 255 (ignore) white.

    Hues step by the golden ratio, so neighbouring class ids get distant colours, and saturation /
    brightness cycle over three levels so that hues close on the circle still differ.
    """
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(1, num_classes):
        hue = (index * 0.6180339887) % 1.0
        saturation = (0.95, 0.65, 0.8)[index % 3]
        value = (0.95, 0.75, 0.55)[(index // 3) % 3]
        palette[index] = np.round(np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255)
    palette[255] = (255, 255, 255)
    return palette


def dataset_palette(dataset: str) -> np.ndarray:
    """The colours of a dataset's class ids (not output channels): VOC's standard map, a fixed one for ADE20K."""
    return ade_palette() if dataset == "ade" else voc_palette()


_PALETTE = torch.from_numpy(voc_palette())


def colorize(labels: torch.Tensor, palette: Optional[np.ndarray] = None) -> torch.Tensor:
    """(H, W) integer labels -> (3, H, W) uint8 RGB in ``palette`` (default: VOC's)."""
    table = _PALETTE if palette is None else torch.from_numpy(np.asarray(palette, dtype=np.uint8))
    return table[labels.long().clamp(0, 255).cpu()].permute(2, 0, 1)


class TensorboardWriter:
    """Thin wrapper: a no-op on non-main ranks, so callers never branch on rank."""

    def __init__(self, log_dir: Optional[Path], enabled: bool):
        self.writer = None
        if enabled and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(log_dir))

    @property
    def enabled(self) -> bool:
        """False on non-main ranks and before the run folder is checked: callers can skip work it would drop."""
        return self.writer is not None

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(prefix + name, float(value), step)

    def segmentation_images(self, tag: str, image: torch.Tensor, label: torch.Tensor,
                            prediction: torch.Tensor, step: int, palette: Optional[np.ndarray] = None) -> None:
        """Input (3,H,W) in [0,1], label and prediction (H,W), side by side, in ``palette`` (default VOC's)."""
        if self.writer is None:
            return
        row = torch.cat([(image.cpu() * 255).to(torch.uint8), colorize(label, palette), colorize(prediction, palette)],
                        dim=2)
        self.writer.add_image(tag, row, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
