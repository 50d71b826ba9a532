"""The class-incremental step loop.

For every step of the task: skip it if it is finished, build the step (the model
for the classes seen so far, initialised from the previous step, with the frozen
old model and the method's preparation), train, choose the weights to keep
(``last`` or ``best``), test on the whole validation set, and save the step's
checkpoint and the results files. ``resume`` continues an interrupted step from
its in-step checkpoint; a finished step's checkpoint is never overwritten.
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from datasets.class_lists import load_class_lists
from datasets.incremental import IncrementalSegmentation, selection_dataset, train_dataset, val_dataset
from datasets.classes import class_names, dataset_palette
from datasets.preflight import preflight
from datasets.tasks import get_task
from datasets.transforms import eval_transforms_for, train_transforms
from models import build_model
from models.base import IncrementalSegmenter
from utils import checkpoint as ckpt
from utils.config import Config, ConfigError, batch_per_process, config_to_dict
from utils.distributed import (DistContext, StopRequest, all_gather_object, barrier, random_state, run_on_main,
                               set_random_state)
from utils.errors import RunInterrupted
from utils.logs import TensorboardWriter, get_logger
from utils.metrics import ConfusionMatrix, class_iou, summarize
from utils.results import format_step_table
from utils.run_folder import prepare_run_folder, write_results

from .engine import StepLogger, evaluate, train
from .evaluator import log_qualitative_to_tensorboard
from .loaders import eval_loader, train_loader
from .methods import IncrementalMethod, build_method, resolve_switches
from .step import StepRun, plan_step, step_models, validation_due
from .step0_reuse import find_reusable_step0, recipe_hash, step0_recipe


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_classes_score(matrix: ConfusionMatrix, channels: list[int]) -> float:
    """The reference's selection score: the mean IoU of ``channels`` (a class neither present nor predicted
    counts 0, as in its metric)."""
    ious = class_iou(matrix.matrix)
    return float(np.mean([ious[k] or 0.0 for k in channels]))


class IncrementalTrainer:
    def __init__(self, cfg: Config, ctx: DistContext, resume: bool = False):
        self.cfg, self.ctx, self.resume = cfg, ctx, resume
        self.log = get_logger()
        self.task = get_task(cfg.data.dataset, cfg.data.task, cfg.data.custom_steps)
        self.switches = resolve_switches(cfg.method)
        self.run_dir = cfg.run_dir
        self.end_step = self.task.num_steps - 1 if cfg.end_step is None else cfg.end_step
        if not 0 <= cfg.start_step <= self.end_step < self.task.num_steps:
            raise ConfigError(f"steps {cfg.start_step}..{self.end_step} are outside task {self.task.name} "
                              f"(steps 0..{self.task.num_steps - 1})")
        per_process = batch_per_process(cfg.train.batch_size, ctx.world_size)  # the same refusal on every rank
        synchronised_norm = ctx.distributed and ctx.device.type == "cuda"  # SyncBatchNorm (trainer/step.py)
        if per_process == 1 and cfg.model.architecture == "deeplabv3" and not synchronised_norm:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} leaves one image per process: the batch norm "
                              "of DeepLab-V3's image-pooling branch needs at least two (or several GPUs, whose "
                              "batch norm is synchronised)")
        self.names = class_names(self.task, cfg.data.root, cfg.data.synthetic.enabled)
        # A no-op until run() has checked the run folder: a refused run or --eval-only writes no event file.
        self.writer = TensorboardWriter(None, False)
        self.stop = StopRequest()  # SIGTERM / SIGINT: finish the iteration, save, stop (see run())
        self.skipped_bad_files: dict[str, int] = {}  # per split, set by the data preflight (rank 0)

    # ---------------------------------------------------------------- set-up
    def prepare_data(self) -> None:
        """Generate the synthetic data and derive the class lists on rank 0 first, so ranks never race;
        a data error found there is raised on every rank."""
        run_on_main(self.ctx, self._prepare_data)

    def _prepare_data(self) -> None:
        data = self.cfg.data
        self.ensure_synthetic_data()
        # every train and val sample checked before step 0 trains (the test reads the whole val split)
        self.skipped_bad_files = preflight(data.dataset, data.root, data.cache_dir, data.skip_bad_files,
                                           self.run_dir, self.log)
        if data.class_lists:  # it must cover the training split
            load_class_lists(data.dataset, data.root, "train", data.class_lists, data.cache_dir,
                             skip_bad_files=data.skip_bad_files)

    def ensure_synthetic_data(self) -> None:
        """Generate the built-in synthetic dataset at data.root if the config asks for it and it is absent."""
        synthetic = self.cfg.data.synthetic
        if synthetic.enabled:
            from datasets.synthetic import ensure_synthetic
            ensure_synthetic(self.cfg.data.root, num_train=synthetic.num_train, num_val=synthetic.num_val,
                             image_size=synthetic.image_size, seed=synthetic.seed)

    # ----------------------------------------------------------------- steps
    def run(self) -> list[dict]:
        run_on_main(self.ctx, lambda: prepare_run_folder(self.run_dir, self.cfg, self.resume, self.log))
        self.prepare_data()
        self.writer = TensorboardWriter(self.run_dir / "tensorboard", self.ctx.is_main)
        try:
            self.log.info("task %s:%s (%s), %d steps, method %s, checkpoint policy %s, eval %s",
                          self.cfg.data.dataset, self.task.name, self.cfg.data.setting, self.task.num_steps,
                          self.switches.describe(), self.cfg.train.checkpoint_policy, self.cfg.data.eval_mode)
            results = self.previous_results()
            with self.stop:
                for step in range(self.cfg.start_step, self.end_step + 1):
                    metrics = self.run_step(step)
                    results = sorted([r for r in results if r["step"] != step] + [metrics], key=lambda r: r["step"])
                    if self.ctx.is_main:
                        write_results(self.run_dir, results, self.meta())
                    if step < self.end_step and self.stop.agreed():
                        raise RunInterrupted(f"{self.stop.name} received: stopped after finishing step {step} "
                                             f"({ckpt.step_checkpoint(self.run_dir, step)})", self.stop.signum)
            if self.ctx.is_main:
                self.log.info("results (%s):\n%s", self.run_dir / "results.md", format_step_table(results))
        finally:  # flush what was logged, also when a step fails
            self.writer.close()
        return results

    def run_step(self, step: int) -> dict:
        """Skip a finished step -> build the step -> train -> choose the weights -> test -> save."""
        if ckpt.step_checkpoint(self.run_dir, step).exists():
            return self.finished_step_metrics(step)
        if step == 0:
            source = find_reusable_step0(self.cfg, self.task, self.run_dir)
            if source is not None:
                return self.reuse_step0(source)
        run, train_set = self.build_step(step)
        self.train_step(run, train_set)
        kept = self.choose_weights(run)
        metrics = self.test(run.model, step)
        metrics.update({"checkpoint": kept, "iterations": run.state.iteration,
                        "validation_history": run.state.history})
        self.save_finished_step(step, run.model.state_dict(), metrics)
        return metrics

    def reuse_step0(self, source: Path) -> dict:
        """Step 0 from another run with the same step-0 recipe: its weights, tested here."""
        self.log.info("step 0: reusing %s (same dataset, step-0 classes, setting, model, step-0 recipe and seed)",
                      source)
        saved = ckpt.load(source)
        model = self.model_for_step(0)
        ckpt.load_model_weights(model, saved["model"], str(source))
        metrics = self.test(model.to(self.ctx.device), 0)
        trained = saved["metrics"]
        if "reused_from" in trained:  # a reuse of a reuse names the run that trained step 0
            origin, label = trained["reused_from"], trained["checkpoint"]
        else:
            origin = str(source)
            label = f"{trained['checkpoint']}, reused from {origin}"
        metrics.update({"checkpoint": label, "reused_from": origin,
                        "iterations": trained["iterations"], "validation_history": trained["validation_history"]})
        self.save_finished_step(0, saved["model"], metrics)
        return metrics

    def finished_step_metrics(self, step: int) -> dict:
        final = ckpt.step_checkpoint(self.run_dir, step)
        self.log.info("step %d is finished (%s): not retraining it", step, final)
        if self.ctx.is_main:
            # Left when a run was killed between writing the step's checkpoint and removing these.
            for leftover in (ckpt.partial_checkpoint(self.run_dir, step), ckpt.best_checkpoint(self.run_dir, step)):
                if leftover.exists():
                    self.log.info("removing %s (the step is finished)", leftover)
                    ckpt.remove_if_exists(leftover)
        return ckpt.load(final)["metrics"]

    def build_step(self, step: int) -> tuple[StepRun, IncrementalSegmentation]:
        cfg = self.cfg
        seed_everything(cfg.seed * 1000 + step * 10 + self.ctx.rank)
        method = build_method(cfg.method, self.task.num_old_channels(step), self.task.num_channels(step))
        model, old_model = self.models_for_step(step, method)
        train_set = train_dataset(self.task, step, cfg.data.root, cfg.data.setting == "disjoint",
                                  train_transforms(cfg.data.base_size, cfg.data.crop_size, cfg.data.scale_range,
                                                   cfg.data.crop_padding),
                                  cfg.data.class_lists, cfg.data.cache_dir, progress=self.ctx.is_main,
                                  skip_bad_files=cfg.data.skip_bad_files)
        run = StepRun(step, model, old_model, method, plan_step(cfg.train, step, len(train_set)), cfg.train,
                      self.ctx)
        self.resume_in_step(run)
        return run, train_set

    def model_for_step(self, step: int) -> IncrementalSegmenter:
        return build_model(self.cfg.model, self.task.classes_per_step[: step + 1], self.cfg.data.crop_size)

    def models_for_step(self, step: int, method: IncrementalMethod
                        ) -> tuple[IncrementalSegmenter, Optional[IncrementalSegmenter]]:
        """The model to train and the frozen old model, from the previous step's checkpoint."""
        previous, source = None, ""
        if step > 0:
            path = ckpt.step_checkpoint(self.run_dir, step - 1)
            if not path.exists():
                raise ckpt.CheckpointError(f"step {step} starts from the checkpoint of step {step - 1}, but {path} "
                                           f"does not exist: run step {step - 1} first (start_step)")
            previous, source = ckpt.load(path)["model"], str(path)
        return step_models(self.cfg.model, self.task, step, method, self.cfg.data.crop_size, previous, source)

    def resume_in_step(self, run: StepRun) -> None:
        """Continue ``run`` from its in-step checkpoint, when resuming and there is one."""
        path = ckpt.partial_checkpoint(self.run_dir, run.step)
        if not (self.resume and path.exists()):
            return
        saved = ckpt.load(path, self.ctx.device)
        run.load_state_dict(saved, str(path))
        random_states = saved.get("random_states") or []
        if len(random_states) == self.ctx.world_size:
            set_random_state(random_states[self.ctx.rank], self.ctx.device)
        else:
            self.log.warning("%s holds the random state of %d processes, this run has %d: the rest of the step "
                             "draws other dropout masks than an uninterrupted run would", path, len(random_states),
                             self.ctx.world_size)
        self.log.info("step %d: resuming from %s (epoch %d, iteration %d)", run.step, path, run.state.epoch + 1,
                      run.state.iteration)

    def train_step(self, run: StepRun, train_set: IncrementalSegmentation) -> None:
        cfg, plan, train_cfg = self.cfg, run.plan, self.cfg.train
        batch = train_cfg.batch_size
        self.log.info("step %d: %d classes (%d new), %d training images, %d epochs x %d iterations (%d total), "
                      "batch %d (%d per process x %d processes)", run.step, run.method.num_classes,
                      run.method.num_classes - run.method.num_old, len(train_set), plan.epochs,
                      plan.iterations_per_epoch, plan.total_iterations, batch, batch // self.ctx.world_size,
                      self.ctx.world_size)
        selection = self.selection_loader(run.step) if train_cfg.validation != "none" else None

        def after_iteration(run: StepRun, completed_epoch: bool) -> None:
            validated = validation_due(train_cfg.validation, train_cfg.val_interval, run.state, run.plan,
                                       completed_epoch)
            if validated:
                self.validate_during_step(run, selection)
            stopping = self.stop.agreed()
            if stopping or validated or completed_epoch or run.finished or (
                    train_cfg.checkpoint_interval > 0 and run.state.iteration % train_cfg.checkpoint_interval == 0):
                self.save_in_step(run)
            if stopping:
                raise RunInterrupted(f"{self.stop.name} received: stopped after iteration {run.state.iteration} of "
                                     f"step {run.step}, saved in {ckpt.partial_checkpoint(self.run_dir, run.step)}",
                                     self.stop.signum)

        started = time.time()
        batches = train_loader(train_set, batch, self.ctx, cfg.seed * 1000 + run.step, plan.iterations_per_epoch,
                               plan.total_iterations, cfg.data.num_workers, start_iteration=run.state.iteration,
                               prefetch_factor=cfg.data.prefetch_factor)
        logger = StepLogger(self.writer, f"step{run.step}", train_cfg.log_interval, train_cfg.image_log_interval,
                            dataset_palette(cfg.data.dataset))
        train(run, batches, logger, after_iteration)
        self.log.info("step %d: trained %d iterations in %.1f s", run.step, run.state.iteration,
                      time.time() - started)

    def save_in_step(self, run: StepRun) -> None:
        run.check_losses()  # never write weights a non-finite loss has spoilt
        # every rank's generator state (dropout draws), so a resumed step continues bit for bit
        random_states = all_gather_object(random_state(self.ctx.device))
        if self.ctx.is_main:
            ckpt.save_atomic({**run.state_dict(), "random_states": random_states},
                             ckpt.partial_checkpoint(self.run_dir, run.step))

    def choose_weights(self, run: StepRun) -> str:
        """Load the weights the checkpoint policy keeps into ``run.model``; describe them."""
        state = run.state
        if self.cfg.train.checkpoint_policy == "best" and state.best_iteration is not None:
            best = ckpt.load(ckpt.best_checkpoint(self.run_dir, run.step), self.ctx.device)
            run.model.load_state_dict(best["model"])
            return (f"best (iteration {state.best_iteration}, mIoU of the step's classes {state.best_score:.4f} "
                    "on val)")
        if self.cfg.train.checkpoint_policy == "best":  # e.g. a step shorter than the reference's cadence
            return "last (the step was never validated)"
        return "last"

    def save_finished_step(self, step: int, weights: dict, metrics: dict) -> None:
        """The step's checkpoint (weights, metrics and the config and task that made them; step 0 also its
        recipe, so that another run may reuse it), then the in-step files are removed: from here on the step
        is finished."""
        if self.ctx.is_main:
            saved = {"model": weights, "metrics": metrics, "step": step, "config": config_to_dict(self.cfg),
                     "task": [list(s) for s in self.task.steps]}
            if step == 0:
                recipe = step0_recipe(self.cfg, self.task)
                saved.update(step0_recipe=recipe, step0_recipe_hash=recipe_hash(recipe))
            ckpt.save_atomic(saved, ckpt.step_checkpoint(self.run_dir, step))
            ckpt.remove_if_exists(ckpt.partial_checkpoint(self.run_dir, step))
            ckpt.remove_if_exists(ckpt.best_checkpoint(self.run_dir, step))
        barrier()

    def meta(self) -> dict:
        cfg = self.cfg
        return {"name": cfg.name,
                "dataset": "synthetic (VOC layout)" if cfg.data.synthetic.enabled else cfg.data.dataset,
                "task": self.task.name, "setting": cfg.data.setting, "method": self.switches.describe(),
                "architecture": f"{cfg.model.architecture} {cfg.model.backbone}",
                "checkpoint_policy": cfg.train.checkpoint_policy, "eval_mode": cfg.data.eval_mode,
                "base_size": cfg.data.base_size, "crop_size": cfg.data.crop_size,
                "steps": [list(s) for s in self.task.steps], "processes": self.ctx.world_size,
                "skipped_bad_files": self.skipped_bad_files}

    def previous_results(self) -> list[dict]:
        """Metrics of steps finished before start_step (from their checkpoints), so results.json stays whole."""
        results = []
        for step in range(0, self.cfg.start_step):
            path = ckpt.step_checkpoint(self.run_dir, step)
            if path.exists():
                results.append(ckpt.load(path)["metrics"])
        return results

    # ------------------------------------------------------------ evaluation
    def test_loader(self, step: int):
        """The test after a step: the whole validation set, classes seen so far."""
        return self.eval_loader(val_dataset, step)

    def selection_loader(self, step: int):
        """Validation during a step, as the reference selects its "best" weights: the val images showing a
        class of the step, every other class labelled background (datasets.incremental.selection_dataset)."""
        return self.eval_loader(selection_dataset, step, reused=True)

    def eval_loader(self, make_dataset, step: int, reused: bool = False):
        data = self.cfg.data
        dataset = make_dataset(self.task, step, data.root, eval_transforms_for(data), cache_dir=data.cache_dir,
                               progress=self.ctx.is_main, skip_bad_files=data.skip_bad_files)
        batch = 1 if data.eval_mode == "full" else self.cfg.train.val_batch_size
        return eval_loader(dataset, batch, self.ctx, data.num_workers, data.prefetch_factor, reused)

    def step_summary(self, matrix: ConfusionMatrix, step: int) -> dict:
        evaluated = self.task.evaluated_channels(step)
        first_new = self.task.num_channels(0)
        summary = summarize(matrix.matrix, [k for k in evaluated if k < first_new],
                            [k for k in evaluated if k >= first_new], self.names[: self.task.num_channels(step)])
        summary["step"] = step
        summary["step_classes"] = [self.names[k] for k in self.task.channels_of_step(step)]
        return summary

    def validate_during_step(self, run: StepRun, loader) -> None:
        """Score the weights as the reference does (its labels, the mean IoU of the step's channels) and keep
        them as the step's best when they beat the best so far."""
        step, state = run.step, run.state
        matrix = evaluate(run.model, loader, self.task.num_channels(step), self.ctx, self.cfg.train.amp,
                          f"step{step} val", fixed_size=self.cfg.data.eval_mode != "full")
        score = step_classes_score(matrix, self.task.channels_of_step(step))
        self.writer.scalars({"val/miou_step_classes": score}, state.iteration, prefix=f"step{step}/")
        state.history.append({"epoch": state.epoch, "iteration": state.iteration, "miou_step_classes": score})
        self.log.info("step %d iteration %d: val mIoU of the step's classes %.4f", step, state.iteration, score)
        if self.cfg.train.checkpoint_policy == "best" and (state.best_score is None or score > state.best_score):
            state.best_score, state.best_iteration = score, state.iteration
            if self.ctx.is_main:
                ckpt.save_atomic({"model": run.model.state_dict(), "iteration": state.iteration, "score": score},
                                 ckpt.best_checkpoint(self.run_dir, step))
        barrier()
        run.train_model.train()

    def test(self, model: nn.Module, step: int) -> dict:
        """The spec's evaluation at step t: the whole validation set, classes seen so far."""
        matrix = evaluate(model, self.test_loader(step), self.task.num_channels(step), self.ctx,
                          self.cfg.train.amp, f"step{step} test", fixed_size=self.cfg.data.eval_mode != "full")
        summary = self.step_summary(matrix, step)
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

    def evaluate_checkpoint(self, step: int) -> dict:
        """--eval-only: test the finished checkpoint of ``step``."""
        if not 0 <= step < self.task.num_steps:
            raise ConfigError(f"--step {step} is outside task {self.task.name} (steps 0..{self.task.num_steps - 1})")
        path = ckpt.step_checkpoint(self.run_dir, step)
        if not path.is_file():
            raise ckpt.CheckpointError(f"step {step} has no finished checkpoint: {path} does not exist "
                                       f"(is {self.run_dir} the run folder, and has it finished step {step}?)")
        saved = ckpt.load(path, "cpu")
        model = self.model_for_step(step)
        ckpt.load_model_weights(model, saved["model"], str(path))
        model.to(self.ctx.device)
        run_on_main(self.ctx, self.ensure_synthetic_data)
        return self.test(model, step)
