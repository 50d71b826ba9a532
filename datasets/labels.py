"""Label values: the ignore label, how a step rewrites a label map, and the name of every class.

Training labels at step t keep only the step's classes (mapped to their output
channel); every other class, old or future, becomes background (0); the labels
the reference selects its "best" weights on follow the same rule. Validation
labels keep every class seen so far and ignore the rest, and the labels a dataset
never scores (ADE20K's 0, "other"; see ``datasets.tasks.UNEVALUATED_LABELS``).
255 is ignore everywhere. Maps are rewritten with a 256-entry lookup table, so
shuffled class orders cost nothing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .layout import DatasetLayoutError, ade_base
from .tasks import NUM_CLASSES, UNEVALUATED_LABELS, Task

IGNORE_INDEX = 255  # the label value no loss and no metric counts

VOC_CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                   "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
                   "train", "tvmonitor")


def label_lookup(task: Task, step: int, split: str) -> np.ndarray:
    """256-entry table mapping dataset label values to the labels of ``split`` at ``step``: ``train``
    (and ``selection``, the reference's validation for "best": the same rule), or ``val`` (the test)."""
    task.check_step(step)
    channel_of = {c: k for k, c in enumerate(task.order)}
    if split in ("train", "selection"):
        table = np.zeros(256, dtype=np.uint8)              # old and future classes -> background
        for c in task.steps[step]:
            table[c] = channel_of[c]
    elif split == "val":
        table = np.full(256, IGNORE_INDEX, dtype=np.uint8)  # classes not yet learned -> ignore
        for c in task.order[: task.num_channels(step)]:
            table[c] = channel_of[c]
        for c in UNEVALUATED_LABELS[task.dataset]:
            table[c] = IGNORE_INDEX
    else:
        raise ValueError(f"split must be 'train', 'selection' or 'val', got {split!r}")
    table[IGNORE_INDEX] = IGNORE_INDEX
    return table


def _ade_names(root: str | Path) -> list[str]:
    """ADE20K's short class names from ``objectInfo150.txt`` ("Idx Ratio Train Val Name", names like
    "building;edifice"); generic names when the file is absent."""
    names = ["other"] + [f"ade_{k}" for k in range(1, NUM_CLASSES["ade"])]
    try:
        info = ade_base(root) / "objectInfo150.txt"
    except DatasetLayoutError:  # no data yet (e.g. --eval-only elsewhere): the generic names
        return names
    if info.is_file():
        for line in info.read_text().splitlines()[1:]:
            parts = line.split("\t")
            if len(parts) >= 5 and parts[0].strip().isdigit():
                names[int(parts[0])] = parts[4].split(";")[0].strip()
    return names


def class_names(task: Task, root: str | Path, synthetic: bool = False) -> list[str]:
    """A unique name for every output channel, in the task's class order."""
    if synthetic:
        from .synthetic import CLASS_NAMES
        names = list(CLASS_NAMES)
    elif task.dataset == "voc":
        names = list(VOC_CLASS_NAMES)
    else:
        names = _ade_names(root)
    # Results are keyed by class name: a name that repeats (ADE's short names could) gets its class id.
    repeated = {n for n in names if names.count(n) > 1}
    names = [f"{n}_{k}" if n in repeated else n for k, n in enumerate(names)]
    return [names[c] for c in task.order]
