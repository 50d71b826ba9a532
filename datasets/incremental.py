"""The dataset of one step of a class-incremental task.

Given a task and a step, a training set holds the images selected by
:mod:`datasets.splits` with labels rewritten for the step, a validation set every
validation image (or those showing given classes) with labels of the classes seen
so far; the rewriting rules live in :mod:`datasets.labels`.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from utils.errors import UserError

from .class_lists import load_class_lists
from .labels import label_lookup
from .layout import SplitFiles
from .samples import BadSample, read_sample
from .splits import selection_image_ids, step_image_ids
from .tasks import Task


class DatasetError(UserError):
    """A sample cannot be read, or a step selects no image."""


class IncrementalSegmentation(Dataset):
    """Images and step-remapped labels; returns ``(image (3,H,W) uint8 contiguous, label (H,W) uint8)``
    (:func:`datasets.transforms.normalize_on_device` makes the model input of a batch)."""

    def __init__(self, files: SplitFiles, ids: list[str], lookup: np.ndarray,
                 transform: Optional[Callable] = None):
        index = {image_id: i for i, image_id in enumerate(files.ids)}
        self.ids = list(ids)
        self.images = [files.images[index[i]] for i in self.ids]
        self.labels = [files.labels[index[i]] for i in self.ids]
        self.lookup = lookup
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        try:
            # the reader the data preflight checked every sample with (datasets/samples.py)
            image, label = read_sample(self.images[i], self.labels[i])
        except BadSample as problem:  # a file that broke after the preflight
            raise DatasetError(f"could not read sample {self.ids[i]!r} ({self.images[i]} / {self.labels[i]}): "
                               f"{problem}") from None
        mask = torch.from_numpy(np.take(self.lookup, label))  # twice as fast as self.lookup[label]
        return tv_tensors.Image(image), tv_tensors.Mask(mask)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(i)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        # the image is laid out channels-last (as decoded); numpy copies it to planar twice as fast as torch
        planar = np.ascontiguousarray(image.as_subclass(torch.Tensor).numpy())
        return torch.from_numpy(planar), mask.as_subclass(torch.Tensor)


def train_dataset(task: Task, step: int, root: str, disjoint: bool, transform: Callable,
                  class_lists_file: Optional[str] = None, cache_dir: Optional[str] = None,
                  progress: bool = True, skip_bad_files: bool = False) -> IncrementalSegmentation:
    files, lists = load_class_lists(task.dataset, root, "train", class_lists_file, cache_dir, progress,
                                    skip_bad_files)
    ids = step_image_ids(lists, task, step, disjoint, ids=files.ids)
    if not ids:
        raise DatasetError(f"step {step} of task {task.name} selects no training image from {files.base}")
    return IncrementalSegmentation(files, ids, label_lookup(task, step, "train"), transform)


def val_dataset(task: Task, step: int, root: str, transform: Callable, cache_dir: Optional[str] = None,
                progress: bool = True, skip_bad_files: bool = False) -> IncrementalSegmentation:
    """The whole validation set (the test); bad samples are an error, or with ``skip_bad_files`` left out."""
    files, _ = load_class_lists(task.dataset, root, "val", None, cache_dir, progress, skip_bad_files)
    return IncrementalSegmentation(files, list(files.ids), label_lookup(task, step, "val"), transform)


def selection_dataset(task: Task, step: int, root: str, transform: Callable, cache_dir: Optional[str] = None,
                      progress: bool = True, skip_bad_files: bool = False) -> IncrementalSegmentation:
    """What the reference validates on to keep its "best" weights at ``step``: the val images showing a class
    of the step, labelled with the step's classes only (everything else background)."""
    files, lists = load_class_lists(task.dataset, root, "val", None, cache_dir, progress, skip_bad_files)
    ids = selection_image_ids(lists, task, step, files.ids)
    return IncrementalSegmentation(files, ids, label_lookup(task, step, "selection"), transform)
