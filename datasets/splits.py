"""Which training images each step of a task sees (spec section 1).

- overlapped: an image is used at step t if it contains a class of N(t),
  the step's new classes (background excluded);
- disjoint: additionally every class in the image lies in S(t), the classes
  of steps 0..t (background and 255 are always allowed).

Command line (prints one JSON object)::

    python -m datasets.splits --dataset voc --task 15-1 [--disjoint] \
        --class-lists ../shared/data/voc/train_cls.txt
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Iterable

from utils.errors import UserError

from .class_lists import ClassLists, load_class_lists, read_class_lists
from .tasks import NUM_CLASSES, Task, get_task, known_tasks


def step_image_ids(class_lists: ClassLists, task: Task, step: int, disjoint: bool,
                   ids: Iterable[str] | None = None) -> list[str]:
    """Ids (in the order of ``ids``, default the class lists' order) used for training at ``step``."""
    task.check_step(step)
    new = frozenset(task.steps[step]) - {0}
    seen = frozenset(c for s in task.steps[: step + 1] for c in s)
    selected = []
    for image_id in (ids if ids is not None else class_lists):
        classes = class_lists[image_id]
        if classes & new and (not disjoint or classes <= seen):
            selected.append(image_id)
    return selected


def selection_image_ids(class_lists: ClassLists, task: Task, step: int, ids: Iterable[str]) -> list[str]:
    """Validation ids the reference selects its "best" weights on at ``step``: the images showing at least
    one class of the step (background aside), at step 0 too."""
    task.check_step(step)
    wanted = frozenset(task.steps[step]) - {0}
    return [image_id for image_id in ids if class_lists[image_id] & wanted]


def split_summary(class_lists: ClassLists, task: Task, disjoint: bool) -> dict:
    return {
        "dataset": task.dataset,
        "task": task.name,
        "setting": "disjoint" if disjoint else "overlapped",
        "steps": [list(s) for s in task.steps],
        "train_images": [len(step_image_ids(class_lists, task, t, disjoint)) for t in range(task.num_steps)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=["voc", "ade"], required=True)
    parser.add_argument("--task", help="task name, e.g. 15-1 (see --list)")
    parser.add_argument("--disjoint", action="store_true", help="disjoint setting (default: overlapped)")
    parser.add_argument("--class-lists", help="a train_cls.txt-style file (image_id c1 c2 ..., 0-based foreground)")
    parser.add_argument("--root", help="data root: derive the class lists from its training labels instead")
    parser.add_argument("--list", action="store_true", help="print the known task names and exit")
    args = parser.parse_args(argv)
    if args.list:
        print(json.dumps(known_tasks(args.dataset)))
        return 0
    if not args.task:
        parser.error("--task is required")
    try:
        task = get_task(args.dataset, args.task)
        if args.class_lists:
            lists = read_class_lists(args.class_lists, NUM_CLASSES[args.dataset])
        elif args.root:
            lists = load_class_lists(args.dataset, args.root, "train")[1]
        else:
            parser.error("give --class-lists FILE or --root DIR")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(split_summary(lists, task, args.disjoint)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
