"""Class-incremental tasks: which classes each step learns, and in which order.

A task is a list of steps; each step is a list of class ids in the dataset's own
indexing (VOC 0..20, ADE 0..150). Step 0 always contains background (0).
With the standard orders the class ids happen to be increasing, so output
channel k of the model is class k. For the shuffled VOC 15-1 orders
(``15-1_b`` ... ``15-1_w``) the concatenated step lists define the order, and
:func:`class_order` gives the remapping (channel k <- dataset class order[k]).
"""
from __future__ import annotations

from dataclasses import dataclass

from utils.config import DATASET_CLASSES, class_steps_problem
from utils.errors import UserError

NUM_CLASSES = DATASET_CLASSES  # the config checks data.custom_steps against the same table
# Dataset labels that are never scored: ADE20K's 0 ("other") is not a class (spec section 1).
UNEVALUATED_LABELS = {"voc": frozenset(), "ade": frozenset({0})}


def _blocks(first: int, block: int, total: int) -> list[list[int]]:
    """Steps {0..first}, then consecutive blocks of ``block`` classes up to ``total - 1``."""
    steps = [list(range(first + 1))]
    start = first + 1
    while start < total:
        steps.append(list(range(start, min(start + block, total))))
        start += block
    return steps


# The 22 published random orders of VOC 15-1 (PLOP, SSUL, DKD and the MBS
# reference all use the same lists): step 0's classes, then one class per step.
_VOC_15_1_SHUFFLED = {
    "b": ([0, 12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11], [17, 3, 6, 18, 10]),
    "c": ([0, 13, 19, 15, 17, 9, 8, 5, 20, 4, 3, 10, 11, 18, 16, 7], [12, 14, 6, 1, 2]),
    "d": ([0, 15, 3, 2, 12, 14, 18, 20, 16, 11, 1, 19, 8, 10, 7, 17], [6, 5, 13, 9, 4]),
    "e": ([0, 7, 5, 3, 9, 13, 12, 14, 19, 10, 2, 1, 4, 16, 8, 17], [15, 18, 6, 11, 20]),
    "f": ([0, 7, 13, 5, 11, 9, 2, 15, 12, 14, 3, 20, 1, 16, 4, 18], [8, 6, 10, 19, 17]),
    "g": ([0, 7, 5, 9, 1, 15, 18, 14, 3, 20, 10, 4, 19, 11, 17, 16], [12, 8, 6, 2, 13]),
    "h": ([0, 12, 9, 19, 6, 4, 10, 5, 18, 14, 15, 16, 3, 8, 7, 11], [13, 2, 20, 17, 1]),
    "i": ([0, 13, 10, 15, 8, 7, 19, 4, 3, 16, 12, 14, 11, 5, 20, 6], [2, 18, 9, 17, 1]),
    "j": ([0, 1, 14, 9, 5, 2, 15, 8, 20, 6, 16, 18, 7, 11, 10, 19], [3, 4, 17, 12, 13]),
    "k": ([0, 16, 13, 1, 11, 12, 18, 6, 14, 5, 3, 7, 9, 20, 19, 15], [4, 2, 10, 8, 17]),
    "l": ([0, 10, 7, 6, 19, 16, 8, 17, 1, 14, 4, 9, 3, 15, 11, 12], [2, 18, 20, 13, 5]),
    "m": ([0, 18, 4, 14, 17, 12, 10, 7, 3, 9, 1, 8, 15, 6, 13, 2], [5, 11, 20, 16, 19]),
    "n": ([0, 5, 4, 13, 18, 14, 10, 19, 15, 7, 9, 3, 2, 8, 16, 20], [1, 12, 11, 6, 17]),
    "o": ([0, 9, 12, 13, 18, 7, 1, 15, 17, 10, 8, 4, 5, 20, 16, 6], [14, 19, 11, 2, 3]),
    "p": ([0, 9, 12, 13, 18, 2, 11, 15, 17, 10, 8, 4, 5, 20, 16, 6], [14, 19, 1, 7, 3]),
    "q": ([0, 3, 14, 13, 18, 2, 11, 15, 17, 10, 8, 4, 5, 20, 16, 6], [12, 19, 1, 7, 9]),
    "r": ([0, 3, 14, 13, 1, 2, 11, 15, 17, 7, 8, 4, 5, 9, 16, 19], [12, 6, 18, 10, 20]),
    "s": ([0, 3, 14, 6, 1, 2, 11, 12, 17, 7, 20, 4, 5, 9, 16, 19], [15, 13, 18, 10, 8]),
    "t": ([0, 3, 15, 13, 1, 2, 11, 18, 17, 7, 20, 8, 5, 9, 16, 19], [14, 6, 12, 10, 4]),
    "u": ([0, 3, 15, 13, 14, 6, 11, 18, 17, 7, 20, 8, 4, 9, 16, 10], [1, 2, 12, 19, 5]),
    "v": ([0, 1, 2, 12, 14, 6, 19, 18, 17, 5, 20, 8, 4, 9, 16, 10], [3, 15, 13, 11, 7]),
    "w": ([0, 1, 2, 12, 14, 13, 19, 18, 7, 11, 20, 8, 4, 9, 16, 10], [3, 15, 6, 5, 17]),
}

TASKS: dict[str, dict[str, list[list[int]]]] = {
    "voc": {
        "offline": [list(range(21))],
        "19-1": _blocks(19, 1, 21),
        "15-5": _blocks(15, 5, 21),
        "15-1": _blocks(15, 1, 21),
        "10-1": _blocks(10, 1, 21),
        "5-3": _blocks(5, 3, 21),
        "2-2": _blocks(2, 2, 21),
        **{f"15-1_{key}": [first] + [[c] for c in rest] for key, (first, rest) in _VOC_15_1_SHUFFLED.items()},
    },
    "ade": {
        "offline": [list(range(151))],
        "100-50": _blocks(100, 50, 151),
        "100-10": _blocks(100, 10, 151),
        "100-5": _blocks(100, 5, 151),
        "50-50": _blocks(50, 50, 151),
    },
}


class TaskError(UserError, ValueError):
    """A task name, custom class order or step number that does not exist."""


class UnknownTaskError(TaskError):
    pass


@dataclass(frozen=True)
class Task:
    """A dataset's class-incremental task: the steps in dataset class ids."""

    dataset: str
    name: str
    steps: tuple[tuple[int, ...], ...]

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def order(self) -> list[int]:
        """Dataset class id of every output channel: channel k is class ``order[k]``."""
        return [c for step in self.steps for c in step]

    @property
    def classes_per_step(self) -> list[int]:
        """Output channels of each step (step 0 includes background)."""
        return [len(step) for step in self.steps]

    def num_channels(self, step: int) -> int:
        """Output channels of the model after ``step`` (steps 0..step, background included)."""
        return sum(self.classes_per_step[: step + 1])

    def num_old_channels(self, step: int) -> int:
        """Output channels learned before ``step`` (0 at step 0)."""
        return sum(self.classes_per_step[:step])

    def channels_of_step(self, step: int) -> list[int]:
        """Output channels (model indices, not dataset ids) that step ``step`` adds."""
        return list(range(self.num_old_channels(step), self.num_channels(step)))

    def channels_seen(self, step: int) -> list[int]:
        """Output channels learned in steps 0..step, background included."""
        return list(range(self.num_channels(step)))

    def evaluated_channels(self, step: int) -> list[int]:
        """The channels scored after ``step``: every channel seen so far but those of unevaluated labels."""
        skipped = UNEVALUATED_LABELS[self.dataset]
        return [k for k in self.channels_seen(step) if self.order[k] not in skipped]

    def check_step(self, step: int) -> None:
        if not 0 <= step < self.num_steps:
            raise TaskError(f"step {step} is out of range for task {self.dataset}:{self.name} "
                             f"({self.num_steps} steps, 0..{self.num_steps - 1})")


def known_tasks(dataset: str) -> list[str]:
    return sorted(TASKS.get(dataset, {}))


def get_task(dataset: str, name: str, custom_steps: list[list[int]] | None = None) -> Task:
    """Look up a task by dataset and name, or build one from explicit ``custom_steps``.

    Raises :class:`UnknownTaskError` listing the known names for an unknown task,
    and :class:`TaskError` for a custom order that is not a partition starting with 0.
    """
    if dataset not in TASKS:
        raise UnknownTaskError(f"unknown dataset {dataset!r}; known datasets: {', '.join(sorted(TASKS))}")
    if custom_steps is not None:
        problem = class_steps_problem(custom_steps, NUM_CLASSES[dataset])
        if problem:
            raise TaskError(f"custom task {name!r} ({dataset}): {problem}")
        return Task(dataset, name, tuple(tuple(int(c) for c in step) for step in custom_steps))
    if name not in TASKS[dataset]:
        raise UnknownTaskError(
            f"unknown task {name!r} for dataset {dataset!r}; known tasks: {', '.join(known_tasks(dataset))} "
            "(or give data.custom_steps)")
    return Task(dataset, name, tuple(tuple(s) for s in TASKS[dataset][name]))


# Verify the shuffled orders once at import: each must be a permutation of 0..20.
for _name, _steps in TASKS["voc"].items():
    assert sorted(c for s in _steps for c in s) == list(range(21)), _name
