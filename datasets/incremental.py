"""The dataset of one step of a class-incremental task.

Given a task and a step, a training set holds the images selected by
:mod:`datasets.splits` with labels rewritten for the step: the step's classes
become their output channel, every other class (old or future) becomes
background (0), 255 stays ignore. A validation set holds every validation
image with labels of the classes seen so far mapped to their channel and all
other classes ignored (ADE's label 0, "other", is ignored at test time too).
Labels are remapped with a 256-entry lookup table, so shuffled class orders
cost nothing.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .class_lists import ClassLists, derive_class_lists, read_class_lists
from .layout import SplitFiles, split_files
from .splits import step_image_ids
from .tasks import NUM_CLASSES, Task

IGNORE_INDEX = 255


def label_lookup(task: Task, step: int, split: str) -> np.ndarray:
    """256-entry table mapping dataset label values to the labels the model sees at ``step``."""
    task.check_step(step)
    channel_of = {c: k for k, c in enumerate(task.order)}
    if split == "train":
        table = np.zeros(256, dtype=np.uint8)              # old and future classes -> background
        for c in task.steps[step]:
            table[c] = channel_of[c]
    elif split == "val":
        table = np.full(256, IGNORE_INDEX, dtype=np.uint8)  # classes not yet learned -> ignore
        for s in task.steps[: step + 1]:
            for c in s:
                table[c] = channel_of[c]
        if task.dataset == "ade":
            table[0] = IGNORE_INDEX  # ADE's "other" is not evaluated
    else:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    table[IGNORE_INDEX] = IGNORE_INDEX
    return table


class IncrementalSegmentation(Dataset):
    """Images and step-remapped labels; returns ``(image (3,H,W) float, label (H,W) long)``."""

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
            with Image.open(self.images[i]) as img:
                image = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
            with Image.open(self.labels[i]) as lbl:
                label = np.array(lbl)
        except (OSError, RuntimeError) as err:
            raise RuntimeError(f"could not read sample {self.ids[i]!r} "
                               f"({self.images[i]} / {self.labels[i]}): {err}") from err
        if label.ndim != 2 or label.shape != tuple(image.shape[1:]):
            raise RuntimeError(f"label {self.labels[i]} has shape {label.shape}, "
                               f"expected a single channel of size {tuple(image.shape[1:])}")
        mask = torch.from_numpy(self.lookup[label])
        return tv_tensors.Image(image), tv_tensors.Mask(mask)

    def __getitem__(self, i: int):
        image, mask = self.load(i)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask.long() if isinstance(mask, torch.Tensor) else mask


def _cache_file(files: SplitFiles, split: str, cache_dir: Optional[str]) -> Path:
    """Cache next to the data, or in ``cache_dir``/the user cache when the data is read-only."""
    name = f"{split}_cls.txt"
    if cache_dir:
        return Path(cache_dir) / name
    preferred = files.base / "class_lists"
    try:
        preferred.mkdir(exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred / name
    except OSError:
        pass
    key = hashlib.sha1(str(files.base.resolve()).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "mbs_ciss" / key / name


def load_class_lists(dataset: str, root: str, split: str, class_lists_file: Optional[str] = None,
                     cache_dir: Optional[str] = None, progress: bool = True) -> tuple[SplitFiles, ClassLists]:
    files = split_files(dataset, root, split)
    if class_lists_file:
        lists = read_class_lists(class_lists_file)
        missing = [i for i in files.ids if i not in lists]
        if missing:
            raise ValueError(f"class list file {class_lists_file} has no entry for {len(missing)} "
                             f"{split} images, e.g. {missing[0]!r}")
        return files, lists
    return files, derive_class_lists(files, NUM_CLASSES[dataset], _cache_file(files, split, cache_dir), progress)


def training_class_lists(dataset: str, root: str) -> ClassLists:
    return load_class_lists(dataset, root, "train")[1]


def train_dataset(task: Task, step: int, root: str, disjoint: bool, transform: Callable,
                  class_lists_file: Optional[str] = None, cache_dir: Optional[str] = None,
                  progress: bool = True) -> IncrementalSegmentation:
    files, lists = load_class_lists(task.dataset, root, "train", class_lists_file, cache_dir, progress)
    ids = step_image_ids(lists, task, step, disjoint, ids=files.ids)
    if not ids:
        raise ValueError(f"step {step} of task {task.name} selects no training image from {files.base}")
    return IncrementalSegmentation(files, ids, label_lookup(task, step, "train"), transform)


def val_dataset(task: Task, step: int, root: str, transform: Callable, only_classes: Optional[list[int]] = None,
                cache_dir: Optional[str] = None, progress: bool = True) -> IncrementalSegmentation:
    """The whole validation set, or (``only_classes``: dataset class ids) the images containing one of them."""
    files = split_files(task.dataset, root, "val")
    ids = list(files.ids)
    if only_classes:
        _, lists = load_class_lists(task.dataset, root, "val", None, cache_dir, progress)
        wanted = frozenset(only_classes)
        ids = [i for i in ids if lists[i] & wanted]
    return IncrementalSegmentation(files, ids, label_lookup(task, step, "val"), transform)
