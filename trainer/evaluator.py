"""Evaluation around a step: validation during it (a score to pick the step's weights by) and the test after it
(the spec's numbers). Neither writes a file: keeping the best weights is the trainer's business.

A finished step is scored again (``--eval-only``) with the config and task it was trained with, read from its
checkpoint (:class:`StepCheckpoint`): only where the data is and how the run executes come from the command
line, so another class order or crop size on the command line cannot score it as something it is not.
"""
from __future__ import annotations

import numpy as np
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from datasets.classes import class_names, dataset_palette
from datasets.incremental import selection_dataset, val_dataset
from datasets.qualitative import chosen_samples, class_ids
from datasets.tasks import Task, get_task
from datasets.transforms import eval_transforms_for
from datasets.preflight import ensure_synthetic_data
from models import build_model
from utils import checkpoint as ckpt
from utils.config import HARMLESS_KEYS, Config, ConfigError, config_from_dict, config_value
from utils.distributed import DistContext, run_on_main
from utils.logs import TensorboardWriter, get_logger
from utils.metrics import ConfusionMatrix, class_iou, summarize
from utils.run_folder import RunFolder, config_differences

from .engine import evaluate, predict
from .loaders import eval_loader
from .step import StepRun


def step_classes_score(matrix: ConfusionMatrix, channels: list[int]) -> float:
    """The reference's selection score: the mean IoU of ``channels`` (a class neither present nor predicted
    counts 0, as in its metric)."""
    ious = class_iou(matrix.matrix)
    return float(np.mean([ious[k] or 0.0 for k in channels]))


class StepEvaluator:
    """The selection loader and the test loader of a task's steps, and what is done with their results."""

    def __init__(self, cfg: Config, task: Task, ctx: DistContext, writer: TensorboardWriter):
        self.cfg, self.task, self.ctx, self.writer = cfg, task, ctx, writer
        self.names = class_names(task, cfg.data.root, cfg.data.synthetic.enabled)
        self.log = get_logger()
        self._selection: tuple[int, object] | None = None  # (step, loader): built once per step, iterated often

    def loader(self, make_dataset, step: int, reused: bool = False):
        data = self.cfg.data
        dataset = make_dataset(self.task, step, data.root, eval_transforms_for(data), cache_dir=data.cache_dir,
                               progress=self.ctx.is_main, skip_bad_files=data.skip_bad_files)
        batch = 1 if data.eval_mode == "full" else self.cfg.train.val_batch_size
        return eval_loader(dataset, batch, self.ctx, data.num_workers, data.prefetch_factor, reused)

    def selection_loader(self, step: int):
        """Validation during a step, as the reference selects its "best" weights: the val images showing a
        class of the step, every other class labelled background (datasets.incremental.selection_dataset)."""
        if self._selection is None or self._selection[0] != step:
            self._selection = (step, self.loader(selection_dataset, step, reused=True))
        return self._selection[1]

    def confusion(self, model: nn.Module, loader, step: int, what: str) -> ConfusionMatrix:
        return evaluate(model, loader, self.task.num_channels(step), self.ctx, self.cfg.train.amp,
                        f"step{step} {what}", fixed_size=self.cfg.data.eval_mode != "full")

    def validate(self, run: StepRun) -> float:
        """Score the weights as the reference does (its labels, the mean IoU of the step's channels); log it."""
        step, iteration = run.step, run.state.iteration
        matrix = self.confusion(run.model, self.selection_loader(step), step, "val")
        score = step_classes_score(matrix, self.task.channels_of_step(step))
        self.writer.scalars({"val/miou_step_classes": score}, iteration, prefix=f"step{step}/")
        self.log.info("step %d iteration %d: val mIoU of the step's classes %.4f", step, iteration, score)
        run.train_model.train()
        return score

    def summary(self, matrix: ConfusionMatrix, step: int) -> dict:
        evaluated = self.task.evaluated_channels(step)
        first_new = self.task.num_channels(0)
        summary = summarize(matrix.matrix, [k for k in evaluated if k < first_new],
                            [k for k in evaluated if k >= first_new], self.names[: self.task.num_channels(step)])
        summary["step"] = step
        summary["step_classes"] = [self.names[k] for k in self.task.channels_of_step(step)]
        return summary

    def test(self, model: nn.Module, step: int) -> dict:
        """The spec's evaluation at step t: the whole validation set, classes seen so far; logged, with
        tensorboard scalars and the qualitative images."""
        summary = self.summary(self.confusion(model, self.loader(val_dataset, step), step, "test"), step)
        fmt = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
        self.log.info("step %d test: mIoU old %s | new %s | all %s (old without background %s)", step,
                      fmt(summary["miou_old"]), fmt(summary["miou_new"]), fmt(summary["miou_all"]),
                      fmt(summary["miou_old_no_bg"]))
        self.writer.scalars({k: summary[k] for k in ("miou_old", "miou_new", "miou_all", "miou_old_no_bg")},
                            step, prefix="test/")
        if self.cfg.train.qualitative_images > 0:
            log_qualitative_to_tensorboard(self.writer, model, self.cfg, self.task, step,
                                           self.cfg.train.qualitative_images)
        return summary


def log_qualitative_to_tensorboard(writer: TensorboardWriter, model: nn.Module, cfg: Config, task: Task, step: int,
                                   num_images: int) -> None:
    """After step ``step``'s test: the figure's images, their ground truth (every class of the task) and
    ``model``'s prediction, one tensorboard image per validation image (tag ``qualitative/<id>``, global step =
    the task step, so the slider walks through the steps). Does nothing where the writer is disabled (other
    ranks, --eval-only); draws no random number, so an exact resume stays exact."""
    if not writer.enabled:
        return
    dataset, indices = chosen_samples(cfg, task, num_images)
    samples = [dataset[i] for i in indices]
    predictions = predict(model, [image for image, _ in samples])
    palette = dataset_palette(task.dataset)
    for index, (image, label), prediction in zip(indices, samples, predictions):
        writer.segmentation_images(f"qualitative/{dataset.ids[index]}", image.float() / 255,
                                   class_ids(label, task), class_ids(prediction, task), step, palette)


@dataclass
class StepCheckpoint:
    """A finished step's checkpoint: its weights and the config and task it was trained with."""

    step: int
    path: Path
    cfg: Config
    task: Task
    weights: dict

    @classmethod
    def read(cls, step: int, path: Path, data_root: Optional[str] = None,
             execution: Optional[Config] = None) -> "StepCheckpoint":
        """``execution``: take the keys that do not change results (where the data is, device, workers, batch
        sizes for evaluation, ...) from this config instead; ``data_root`` overrides data.root."""
        saved = ckpt.load(path, "cpu")
        missing = [key for key in ("model", "config", "task") if key not in saved]
        if missing:
            raise ckpt.CheckpointError(f"checkpoint {str(path)!r} lacks {', '.join(missing)}: not a finished step "
                                       "of this project")
        try:
            cfg = config_from_dict(saved["config"])
        except ConfigError as err:
            raise ckpt.CheckpointError(f"checkpoint {str(path)!r} records a config this version cannot read: "
                                       f"{err}") from None
        if execution is not None:
            for key in HARMLESS_KEYS:
                set_config_value(cfg, key, config_value(execution, key))
        cfg.model.pretrained = "none"  # every weight comes from the checkpoint: never fetch pretrained ones
        if data_root is not None:
            cfg.data.root = data_root
        task = Task(cfg.data.dataset, cfg.data.task, tuple(tuple(s) for s in saved["task"]))
        return cls(step, path, cfg, task, saved["model"])

    def model(self, device: torch.device) -> nn.Module:
        model = build_model(self.cfg.model, self.task.classes_per_step[: self.step + 1], self.cfg.data.crop_size)
        ckpt.load_model_weights(model, self.weights, str(self.path))
        return model.to(device)


def set_config_value(cfg: Config, key: str, value) -> None:
    section, _, name = key.rpartition(".")
    setattr(config_value(cfg, section) if section else cfg, name, value)


def evaluate_finished_step(cfg: Config, ctx: DistContext, step: Optional[int] = None) -> dict:
    """--eval-only: test the finished checkpoint of ``step`` (default: the task's last step) with the config and
    task it was trained with; the command line's experiment keys that differ are named in a warning."""
    task = get_task(cfg.data.dataset, cfg.data.task, cfg.data.custom_steps)
    step = (task.num_steps - 1 if cfg.end_step is None else cfg.end_step) if step is None else step
    if not 0 <= step < task.num_steps:
        raise ConfigError(f"--step {step} is outside task {task.name} (steps 0..{task.num_steps - 1})")
    folder = RunFolder(cfg.run_dir)
    path = folder.finished_checkpoint(step)
    if not path.is_file():
        raise ckpt.CheckpointError(f"step {step} has no finished checkpoint: {path} does not exist "
                                   f"(is {folder.path} the run folder, and has it finished step {step}?)")
    finished = StepCheckpoint.read(step, path, execution=cfg)
    differences = config_differences(finished.cfg, cfg)
    ignored = {key: values for key, values in differences.items() if key not in HARMLESS_KEYS
               and key != "model.pretrained"}
    if ignored:
        get_logger().warning("--eval-only scores step %d with the config it was trained with (%s); the command line "
                             "differs in: %s", step, path,
                             "; ".join(f"{key}: {now!r} (command line) vs {saved!r} (trained)"
                                       for key, (saved, now) in ignored.items()))
    run_on_main(ctx, lambda: ensure_synthetic_data(finished.cfg.data))
    evaluator = StepEvaluator(finished.cfg, finished.task, ctx, TensorboardWriter(None, False))
    return evaluator.test(finished.model(ctx.device), step)
