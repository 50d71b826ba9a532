"""Label values: how a step rewrites a label map (the ignore label itself is ``utils.ignore.IGNORE_INDEX``).

Training labels at step t keep only the step's classes (mapped to their output
channel); every other class, old or future, becomes background (0); the labels
the reference selects its "best" weights on follow the same rule. Validation
labels keep every class seen so far and ignore the rest, and the labels a dataset
never scores (ADE20K's 0, "other"; see ``datasets.tasks.UNEVALUATED_LABELS``).
255 is ignore everywhere. Maps are rewritten with a 256-entry lookup table, so
shuffled class orders cost nothing.
"""
from __future__ import annotations

import numpy as np

from utils.ignore import IGNORE_INDEX

from .tasks import UNEVALUATED_LABELS, Task


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
