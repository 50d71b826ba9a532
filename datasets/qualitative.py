"""Which validation images a qualitative figure shows, and their labels as dataset class ids.

The images are chosen deterministically from the validation class lists (greedily, to show classes of as
many steps as possible, so old and new classes both appear). The same images go to tensorboard after every
step's test (``trainer.evaluator``) and into the end-of-run figure (``analysis.figures``); colours come
from :mod:`datasets.classes`, by class id, so a class keeps its colour in every step and run.
"""
from __future__ import annotations

import torch

from utils.config import Config
from utils.ignore import IGNORE_INDEX

from .class_lists import ClassLists, load_class_lists
from .incremental import IncrementalSegmentation, val_dataset
from .tasks import UNEVALUATED_LABELS, Task
from .transforms import eval_transforms_for


def choose_images(task: Task, lists: ClassLists, ids: list[str], num_images: int) -> list[str]:
    """``num_images`` validation ids, chosen greedily and deterministically: each pick shows classes of the
    most steps not shown yet, then the most classes not shown yet; ties go to the earlier id in ``ids``.
    So the first picks show old (step 0) and new classes together where the data allows."""
    step_of = {c: t for t, step in enumerate(task.steps) for c in step
               if c != 0 and c not in UNEVALUATED_LABELS[task.dataset]}
    shown = {i: frozenset(c for c in lists.get(i, ()) if c in step_of) for i in ids}
    candidates = [i for i in ids if shown[i]]
    chosen: list[str] = []
    steps_seen: set[int] = set()
    classes_seen: set[int] = set()
    position = {i: n for n, i in enumerate(ids)}
    for _ in range(min(num_images, len(candidates))):
        best = max((i for i in candidates if i not in chosen),
                   key=lambda i: (len({step_of[c] for c in shown[i]} - steps_seen), len(shown[i] - classes_seen),
                                  -position[i]))
        chosen.append(best)
        steps_seen |= {step_of[c] for c in shown[best]}
        classes_seen |= shown[best]
    return chosen


def figure_dataset(cfg: Config, task: Task) -> IncrementalSegmentation:
    """The validation set with the run's evaluation transforms and the labels of every class of the task
    (the last step's label table), so the ground truth shows the classes later steps learn too."""
    data = cfg.data
    return val_dataset(task, task.num_steps - 1, data.root, eval_transforms_for(data), cache_dir=data.cache_dir,
                       progress=False, skip_bad_files=data.skip_bad_files)


def chosen_samples(cfg: Config, task: Task, num_images: int) -> tuple[IncrementalSegmentation, list[int]]:
    dataset = figure_dataset(cfg, task)
    _, lists = load_class_lists(task.dataset, cfg.data.root, "val", None, cfg.data.cache_dir, progress=False,
                                skip_bad_files=cfg.data.skip_bad_files)
    ids = choose_images(task, lists, dataset.ids, num_images)
    return dataset, [dataset.ids.index(i) for i in ids]


def class_ids(labels: torch.Tensor, task: Task) -> torch.Tensor:
    """Output channels -> dataset class ids (the palette's index); 255 stays 255."""
    table = torch.full((256,), IGNORE_INDEX, dtype=torch.long)
    table[: len(task.order)] = torch.tensor(task.order)
    return table[labels.long().clamp(0, 255)]
