"""What each dataset calls its classes and how it colours them: one home for names and colours.

Names are per output channel, in the task's class order (results are keyed by them); colours are per
dataset class id (not per channel), so a class keeps its colour in every step and run. Drawing code
takes a palette from here as input.
"""
from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np

from utils.files import read_text

from .layout import DatasetLayoutError, ade_base
from .synthetic import CLASS_NAMES as SYNTHETIC_CLASS_NAMES
from .tasks import NUM_CLASSES, Task

VOC_CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                   "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
                   "train", "tvmonitor")


def _ade_names(root: str | Path) -> list[str]:
    """ADE20K's short class names from ``objectInfo150.txt`` ("Idx Ratio Train Val Name", names like
    "building;edifice"); generic names when the file is absent."""
    names = ["other"] + [f"ade_{k}" for k in range(1, NUM_CLASSES["ade"])]
    try:
        info = ade_base(root) / "objectInfo150.txt"
    except DatasetLayoutError:  # no data yet (e.g. --eval-only elsewhere): the generic names
        return names
    if info.is_file():
        for line in read_text(info, "ADE20K class names file", DatasetLayoutError).splitlines()[1:]:
            parts = line.split("\t")
            if len(parts) >= 5 and parts[0].strip().isdigit():
                names[int(parts[0])] = parts[4].split(";")[0].strip()
    return names


def class_names(task: Task, root: str | Path, synthetic: bool = False) -> list[str]:
    """A unique name for every output channel, in the task's class order."""
    if synthetic:
        names = list(SYNTHETIC_CLASS_NAMES)
    elif task.dataset == "voc":
        names = list(VOC_CLASS_NAMES)
    else:
        names = _ade_names(root)
    # Results are keyed by class name: a name that repeats (ADE's short names could) gets its class id.
    repeated = {n for n in names if names.count(n) > 1}
    names = [f"{n}_{k}" if n in repeated else n for k, n in enumerate(names)]
    return [names[c] for c in task.order]


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


def ade_palette(num_classes: int = NUM_CLASSES["ade"]) -> np.ndarray:
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


PALETTES = {"voc": voc_palette, "ade": ade_palette}


def dataset_palette(dataset: str) -> np.ndarray:
    """The colours of a dataset's class ids (not output channels): VOC's standard map, a fixed one for ADE20K."""
    return PALETTES[dataset]()
