"""Step 0 trained once per protocol family.

Steps 0 of VOC 15-1 and 15-5 are the same training (same classes, images, setting and recipe), as are
those of ADE 100-50, 100-10 and 100-5. Step 0 is cross-entropy alone for every method, but not the same
cross-entropy for all: mbs, baseline and finetune average it over the labelled pixels, mib and plop over
all pixels (``method.ce_all_pixels``, BASELINES_SPEC section 0). So the methods of one task share two
steps 0, one per family. Every finished step 0 carries its *recipe* — everything that defines its
training and its test — and a hash of it; ``train.step0_checkpoint`` reuses a finished step 0 whose
recipe is identical: a path to its ``step0.pt``, or ``auto`` to look in the sibling run folders of
``output_dir``. Which config keys belong to the recipe is declared in their fields (``STEP0`` in
:mod:`utils.config`); the recipe holds the resolved ``ce_all_pixels`` only when it is on, so every
step0.pt written before the switch existed keeps its recipe and stays reusable by the MBS family.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional

from datasets.class_lists import load_class_lists
from datasets.tasks import Task
from utils import checkpoint as ckpt
from utils.checkpoint import CheckpointError
from utils.config import STEP0_KEYS, Config
from utils.run_folder import RunFolder

from .methods import resolve_switches


class Step0ReuseError(CheckpointError):
    """The step-0 checkpoint named in train.step0_checkpoint was trained with another recipe."""


def step0_recipe(cfg: Config, task: Task) -> dict:
    """Everything that defines step 0 of this run, as plain values."""
    recipe = {section: {key: getattr(getattr(cfg, section), key) for key in keys}
              for section, keys in STEP0_KEYS.items()}
    recipe["data"]["step0_classes"] = list(task.steps[0])  # in order: channel k is class steps[0][k]
    recipe["data"]["synthetic"] = (dataclasses.asdict(cfg.data.synthetic) if cfg.data.synthetic.enabled
                                   else None)
    recipe["data"]["training_data"] = training_data_identity(cfg)
    recipe["model"] = dataclasses.asdict(cfg.model)
    recipe["seed"] = cfg.seed
    if resolve_switches(cfg.method, cfg.data.dataset).ce_all_pixels:  # MiB's / PLOP's all-pixel mean
        recipe["method"] = {"ce_all_pixels": True}
    return recipe


def training_data_identity(cfg: Config) -> str:
    """What step 0 was trained on, cheap and stable: a hash of the training split's image ids and each image's
    class list (the ones this run uses: derived from the labels and cached, or data.class_lists). Data moved to
    another folder keeps it; another dataset, another split list or other labels change it."""
    data = cfg.data
    files, lists = load_class_lists(data.dataset, data.root, "train", data.class_lists, data.cache_dir,
                                    progress=False, skip_bad_files=data.skip_bad_files)
    listed = [[image_id, sorted(lists.get(image_id, ()))] for image_id in sorted(files.ids)]
    return hashlib.sha256(json.dumps(listed).encode()).hexdigest()


def recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def recipe_differences(mine: dict, theirs: dict, prefix: str = "") -> list[str]:
    """``key: ours vs theirs`` for every differing leaf of two recipes."""
    differences = []
    for key in sorted(set(mine) | set(theirs)):
        a, b = mine.get(key), theirs.get(key)
        # a section only one recipe has (``method``) is compared key by key too, so each key is named
        one_sided = (isinstance(a, dict) and key not in theirs) or (isinstance(b, dict) and key not in mine)
        if (isinstance(a, dict) and isinstance(b, dict)) or one_sided:
            differences += recipe_differences(a or {}, b or {}, f"{prefix}{key}.")
        elif a != b:
            differences.append(f"{prefix}{key}: {a!r} here vs {b!r} there")
    return differences


def _saved_recipe(path: Path) -> Optional[dict]:
    """The recipe stored in a finished step-0 checkpoint (None for one written before recipes existed).
    Memory-mapped: the weights are not read."""
    return ckpt.load(path, mmap=True).get("step0_recipe")


def find_reusable_step0(cfg: Config, task: Task, folder: RunFolder) -> Optional[Path]:
    """The finished step 0 this run may reuse, or None (then it trains its own).

    A path in ``train.step0_checkpoint`` must hold the same recipe, else the run is refused with the keys
    that differ; ``auto`` takes the first sibling run folder's step 0 with the same recipe, if any.
    """
    setting = cfg.train.step0_checkpoint
    if setting is None:
        return None
    mine = step0_recipe(cfg, task)
    if setting != "auto":
        path = Path(setting)
        if not path.is_file():
            raise Step0ReuseError(f"train.step0_checkpoint: {setting!r} does not exist")
        theirs = _saved_recipe(path)
        if theirs is None:
            raise Step0ReuseError(f"train.step0_checkpoint: {setting!r} holds no step-0 recipe (not a finished "
                                  "step 0 of this project)")
        if theirs != mine:
            raise Step0ReuseError(f"train.step0_checkpoint: {setting!r} was trained with another step-0 recipe: "
                                  + "; ".join(recipe_differences(mine, theirs)))
        return path
    for candidate in folder.sibling_step0_checkpoints():
        if _saved_recipe(candidate) == mine:
            return candidate
    return None


def reuse_record(trained: dict, source: Path) -> dict:
    """What a reused step 0 keeps of the metrics of the run that trained it (``trained``): its checkpoint
    label, iterations and validation history, and where it came from. A reuse of a reuse names the run that
    trained step 0."""
    if "reused_from" in trained:
        origin, label = trained["reused_from"], trained["checkpoint"]
    else:
        origin, label = str(source), f"{trained['checkpoint']}, reused from {source}"
    return {"checkpoint": label, "reused_from": origin, "iterations": trained["iterations"],
            "validation_history": trained["validation_history"]}
