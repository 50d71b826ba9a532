"""The class-incremental step loop.

For every step of the task: skip it if it is finished, build the step (the model
for the classes seen so far, initialised from the previous step, with the frozen
old model and the method's preparation), train, choose the weights to keep
(``last`` or ``best``), test on the whole validation set, and save the step's
checkpoint and the results files. ``resume`` continues an interrupted step from
its in-step checkpoint; a finished step's checkpoint is never overwritten. A
method with a per-step pass (PLOP's thresholds) runs it before the step's first
iteration, unless the resumed step holds its result, and saves it in an in-step
checkpoint at once. Validation and the test are
:class:`trainer.evaluator.StepEvaluator`'s; every path in the run folder is
:class:`utils.run_folder.RunFolder`'s.
"""
from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from datasets.classes import dataset_palette
from datasets.incremental import IncrementalSegmentation, train_dataset
from datasets.preflight import prepare_run_data
from datasets.tasks import get_task
from datasets.transforms import train_transforms
from models import build_model
from models.base import IncrementalSegmenter
from utils import checkpoint as ckpt
from utils.config import Config, ConfigError, batch_per_process, config_to_dict
from utils.distributed import DistContext, StopRequest, barrier, run_on_main, sum_over_processes
from utils.errors import RunInterrupted
from utils.logs import TensorboardWriter, get_logger
from utils.results import format_step_table
from utils.run_folder import RunFolder

from .engine import StepLogger, collect_step_statistics, train
from .evaluator import StepEvaluator
from .loaders import train_loader
from .methods import IncrementalMethod, build_method, resolve_switches
from .step import (BATCH_NORM_ARCHITECTURES, StepRun, describe_runtime, plan_step, precision_fallback, runtime_record,
                   step_models, synchronised_batch_norm, validation_due)
from .step0_reuse import find_reusable_step0, recipe_hash, reuse_record, step0_recipe


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_batch_for_batch_norm(cfg: Config, ctx: DistContext) -> None:
    """DeepLab's image-pooling batch norm needs two images per process unless several GPUs synchronise it."""
    per_process = batch_per_process(cfg.train.batch_size, ctx.world_size)  # the same refusal on every rank
    synchronised_norm = synchronised_batch_norm(cfg.train, cfg.model.architecture in BATCH_NORM_ARCHITECTURES, ctx)
    if per_process == 1 and cfg.model.architecture == "deeplabv3" and not synchronised_norm:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} leaves one image per process: the batch norm "
                          "of DeepLab-V3's image-pooling branch needs at least two (or several GPUs, whose "
                          "batch norm is synchronised)")


def describe_thresholds(method: IncrementalMethod) -> str:
    """How PLOP's thresholds of the old classes (those an old argmax can pick) fall: at +inf (every
    pseudo-label of the class accepted), at the floor, NaN (none accepted), in between; then the values."""
    thresholds, num_old, floor = method.thresholds, method.num_old, method.switches.entropy_threshold
    values = thresholds[:num_old].detach().cpu().double()
    infinite = int(torch.isinf(values).sum())
    undefined = int(torch.isnan(values).sum())
    at_floor = int((values == torch.tensor(floor, dtype=torch.float32).double()).sum())
    between = num_old - infinite - undefined - at_floor
    listed = ", ".join(f"{value:.6g}" for value in values.tolist())
    return (f"of the {num_old} old classes, {infinite} at +inf, {at_floor} at the floor {floor:g}, {undefined} NaN, "
            f"{between} in between [{listed}]")


def step_batches(train_set: IncrementalSegmentation, cfg: Config, ctx: DistContext, run: StepRun,
                 total_iterations: int, start_iteration: int):
    """This process's batches of the step's iterations ``start_iteration .. total_iterations - 1``, drawn from
    the step's seed: the per-step pass and the first training epoch see the same images and augmentations."""
    return train_loader(train_set, cfg.train.batch_size, ctx, cfg.seed * 1000 + run.step,
                        run.plan.iterations_per_epoch, total_iterations, cfg.data.num_workers,
                        start_iteration=start_iteration, prefetch_factor=cfg.data.prefetch_factor)


def describe_step(run: StepRun, num_images: int, batch_size: int, world_size: int) -> str:
    plan, method = run.plan, run.method
    return (f"step {run.step}: {method.num_classes} classes ({method.num_classes - method.num_old} new), "
            f"{num_images} training images, {plan.epochs} epochs x {plan.iterations_per_epoch} iterations "
            f"({plan.total_iterations} total), batch {batch_size} ({batch_size // world_size} per process x "
            f"{world_size} processes)")


def last_step(cfg: Config, task) -> int:
    """The last step this run trains (``end_step``, or the task's last), checked against the task."""
    end_step = task.num_steps - 1 if cfg.end_step is None else cfg.end_step
    if not 0 <= cfg.start_step <= end_step < task.num_steps:
        raise ConfigError(f"steps {cfg.start_step}..{end_step} are outside task {task.name} "
                          f"(steps 0..{task.num_steps - 1})")
    return end_step


def describe_protocol(cfg: Config, task) -> str:
    return (f"task {cfg.data.dataset}:{task.name} ({cfg.data.setting}), {task.num_steps} steps, method "
            f"{resolve_switches(cfg.method, cfg.data.dataset).describe()}, checkpoint policy "
            f"{cfg.train.checkpoint_policy}, eval {cfg.data.eval_mode}")


def run_meta(cfg: Config, task, ctx: DistContext, skipped_bad_files: dict, runtime: dict) -> dict:
    """What produced a run's numbers (``results.json``'s ``meta``): the protocol, the processes, the runtime."""
    return {"name": cfg.name,
            "dataset": "synthetic (VOC layout)" if cfg.data.synthetic.enabled else cfg.data.dataset,
            "task": task.name, "setting": cfg.data.setting,
            "method": resolve_switches(cfg.method, cfg.data.dataset).describe(),
            "architecture": f"{cfg.model.architecture} {cfg.model.backbone}",
            "checkpoint_policy": cfg.train.checkpoint_policy, "eval_mode": cfg.data.eval_mode,
            "base_size": cfg.data.base_size, "crop_size": cfg.data.crop_size,
            "steps": [list(s) for s in task.steps], "processes": ctx.world_size,
            "threads": torch.get_num_threads(),  # CPU results depend on it (the order of float sums)
            "skipped_bad_files": skipped_bad_files, "runtime": runtime}


class IncrementalTrainer:
    def __init__(self, cfg: Config, ctx: DistContext, resume: bool = False):
        self.cfg, self.ctx, self.resume = cfg, ctx, resume
        self.log = get_logger()
        self.task = get_task(cfg.data.dataset, cfg.data.task, cfg.data.custom_steps)
        self.folder = RunFolder(cfg.run_dir)
        self.end_step = last_step(cfg, self.task)
        check_batch_for_batch_norm(cfg, ctx)
        self.runtime = runtime_record(cfg.train, cfg.model.architecture, ctx)  # what runs: logged, in results.json
        # A no-op until run() has checked the run folder: a refused run or --eval-only writes no event file.
        self.writer = TensorboardWriter(None, False)
        self.evaluator = StepEvaluator(cfg, self.task, ctx, self.writer)
        self.stop = StopRequest()  # SIGTERM / SIGINT: finish the iteration, save, stop (see run())
        self.skipped_bad_files: dict[str, int] = {}  # per split, set by the data preflight (rank 0)

    # ----------------------------------------------------------------- steps
    def run(self) -> list[dict]:
        # Rank 0 holds the run folder until the run ends (success, error, stop signal; the OS releases it if the
        # process dies): a second run started into the same folder stops here, before it touches anything.
        with contextlib.ExitStack() as held:
            run_on_main(self.ctx, lambda: held.enter_context(self.folder.lock(self.log)))
            return self.run_holding_the_folder()

    def run_holding_the_folder(self) -> list[dict]:
        run_on_main(self.ctx, lambda: self.folder.prepare(self.cfg, [list(s) for s in self.task.steps], self.resume,
                                                             self.log))
        # rank 0 writes the checkpoints and every rank reads them: refuse ranks that do not share the folder
        self.folder.check_shared_by_ranks(self.ctx.rank, self.ctx.world_size)
        # on rank 0 first, so ranks never race; a data error found there is raised on every rank
        self.skipped_bad_files = run_on_main(
            self.ctx, lambda: prepare_run_data(self.cfg.data, self.folder.bad_files_list, self.log)) or {}
        self.writer = self.evaluator.writer = TensorboardWriter(self.folder.tensorboard_dir, self.ctx.is_main)
        try:
            self.log.info("%s", describe_runtime(self.runtime))
            fallback = precision_fallback(self.ctx.device, self.cfg.train.amp)
            if fallback and self.ctx.is_main:
                self.log.warning("%s", fallback)
            self.log.info("%s", describe_protocol(self.cfg, self.task))
            results = self.folder.finished_metrics(range(self.cfg.start_step))  # results.json stays whole
            with self.stop:
                for step in range(self.cfg.start_step, self.end_step + 1):
                    metrics = self.run_step(step)
                    results = sorted([r for r in results if r["step"] != step] + [metrics], key=lambda r: r["step"])
                    if self.ctx.is_main:
                        self.folder.write_results(results, self.meta())
                    if step < self.end_step and self.stop.agreed():
                        raise RunInterrupted(f"{self.stop.name} received: stopped after finishing step {step} "
                                             f"({self.folder.finished_checkpoint(step)})", self.stop.signum)
            if self.ctx.is_main:
                self.log.info("results (%s):\n%s", self.folder.results_md, format_step_table(results))
        finally:  # flush what was logged, also when a step fails
            self.writer.close()
        return results

    def run_step(self, step: int) -> dict:
        """Skip a finished step -> build the step -> train -> choose the weights -> test -> save."""
        if self.folder.is_finished(step):
            return self.finished_step_metrics(step)
        if step == 0:
            source = find_reusable_step0(self.cfg, self.task, self.folder)
            if source is not None:
                return self.reuse_step0(source)
        run, train_set = self.build_step(step)
        self.train_step(run, train_set)
        kept = self.choose_weights(run)
        metrics = self.evaluator.test(run.model, step)
        metrics.update({"checkpoint": kept, "iterations": run.state.iteration,
                        "skipped_steps": run.state.skipped_steps, "nonfinite_losses": run.state.nonfinite_losses,
                        "validation_history": run.state.history})
        self.save_finished_step(step, run.model.state_dict(), metrics)
        return metrics

    def reuse_step0(self, source: Path) -> dict:
        """Step 0 from another run with the same step-0 recipe: its weights, tested here."""
        self.log.info("step 0: reusing %s (same training data, step-0 classes, setting, model, step-0 recipe and seed)",
                      source)
        saved = ckpt.load(source)
        model = self.model_for_step(0)
        ckpt.load_model_weights(model, saved["model"], str(source))
        metrics = self.evaluator.test(model.to(self.ctx.device), 0)
        metrics.update(reuse_record(saved["metrics"], source))
        self.save_finished_step(0, saved["model"], metrics)
        return metrics

    def finished_step_metrics(self, step: int) -> dict:
        self.log.info("step %d is finished (%s): not retraining it", step, self.folder.finished_checkpoint(step))
        if self.ctx.is_main:
            for leftover in self.folder.remove_in_step_files(step):
                self.log.info("removed %s (the step is finished)", leftover)
        return self.folder.load_finished(step)["metrics"]

    def build_step(self, step: int) -> tuple[StepRun, IncrementalSegmentation]:
        """The step's models, method, data and optimiser; continued from its in-step checkpoint when resuming."""
        cfg = self.cfg
        seed_everything(cfg.seed * 1000 + step * 10 + self.ctx.rank)
        method = build_method(cfg.method, cfg.data.dataset, self.task.num_old_channels(step),
                              self.task.num_channels(step))
        model, old_model = self.models_for_step(step, method)
        train_set = train_dataset(self.task, step, cfg.data.root, cfg.data.setting == "disjoint",
                                  train_transforms(cfg.data.base_size, cfg.data.crop_size, cfg.data.scale_range,
                                                   cfg.data.crop_padding),
                                  cfg.data.class_lists, cfg.data.cache_dir, progress=self.ctx.is_main,
                                  skip_bad_files=cfg.data.skip_bad_files)
        run = StepRun(step, model, old_model, method, plan_step(cfg.train, step, len(train_set)), cfg.train,
                      self.ctx)
        partial = self.folder.partial_checkpoint(step)
        if self.resume and partial.exists():
            run.resume(ckpt.load(partial, self.ctx.device), str(partial))
            self.log.info("step %d: resuming from %s (epoch %d, iteration %d)", step, partial, run.state.epoch + 1,
                          run.state.iteration)
        return run, train_set

    def model_for_step(self, step: int) -> IncrementalSegmenter:
        return build_model(self.cfg.model, self.task.classes_per_step[: step + 1], self.cfg.data.crop_size)

    def models_for_step(self, step: int, method: IncrementalMethod
                        ) -> tuple[IncrementalSegmenter, Optional[IncrementalSegmenter]]:
        """The model to train and the frozen old model, from the previous step's checkpoint."""
        previous, source = None, ""
        if step > 0:
            path = self.folder.finished_checkpoint(step - 1)
            if not path.exists():
                raise ckpt.CheckpointError(f"step {step} starts from the checkpoint of step {step - 1}, but {path} "
                                           f"does not exist: run step {step - 1} first (start_step)")
            previous, source = ckpt.load(path)["model"], str(path)
        return step_models(self.cfg.model, self.task, step, method, self.cfg.data.crop_size, previous, source)

    def train_step(self, run: StepRun, train_set: IncrementalSegmentation) -> None:
        cfg, train_cfg = self.cfg, self.cfg.train
        self.log.info("%s", describe_step(run, len(train_set), train_cfg.batch_size, self.ctx.world_size))
        if run.method.needs_step_statistics and not run.method.has_step_statistics:
            self.step_statistics(run, train_set)  # once per step: a resumed step holds them already
        elif run.method.needs_step_statistics:
            self.log.info("step %d: PLOP's entropy thresholds restored from the in-step checkpoint", run.step)
        if train_cfg.validation != "none":
            self.evaluator.selection_loader(run.step)  # its workers start before training's, as they always did
        started = time.time()
        batches = step_batches(train_set, cfg, self.ctx, run, run.plan.total_iterations, run.state.iteration)
        logger = StepLogger(self.writer, f"step{run.step}", train_cfg.log_interval, train_cfg.image_log_interval,
                            dataset_palette(cfg.data.dataset))
        train(run, batches, logger, self.after_iteration)
        self.log.info("step %d: trained %d iterations in %.1f s", run.step, run.state.iteration,
                      time.time() - started)

    def step_statistics(self, run: StepRun, train_set: IncrementalSegmentation) -> None:
        """PLOP's pass (spec 2.4): the frozen old model over epoch 0's batches (the images, augmentations and
        order of the first training epoch), the histogram summed over processes, the thresholds saved in an
        in-step checkpoint at once (a resumed step never repeats the pass) and logged."""
        cfg, plan = self.cfg, run.plan
        started = time.time()
        batches = step_batches(train_set, cfg, self.ctx, run, plan.iterations_per_epoch, start_iteration=0)
        collect_step_statistics(run, batches)
        run.method.finish_step_statistics(sum_over_processes)
        self.save_in_step(run)
        self.log.info("step %d: PLOP's entropy thresholds from one pass of the old model over %d batches of %d "
                      "images (%.1f s): %s", run.step, plan.iterations_per_epoch, cfg.train.batch_size,
                      time.time() - started, describe_thresholds(run.method))
        if self.stop.agreed():  # a stop signal during the pass: what it computed is saved
            raise RunInterrupted(f"{self.stop.name} received: stopped after the old-model pass of step {run.step}, "
                                 f"saved in {self.folder.partial_checkpoint(run.step)}", self.stop.signum)

    def after_iteration(self, run: StepRun, completed_epoch: bool) -> None:
        """Validate when due (keeping the best weights), save the in-step checkpoint when due, stop on a signal."""
        train_cfg = self.cfg.train
        validated = validation_due(train_cfg.validation, train_cfg.val_interval, run.state, run.plan,
                                   completed_epoch)
        if validated:
            self.keep_if_best(run, self.evaluator.validate(run))
        stopping = self.stop.agreed()
        if stopping or validated or completed_epoch or run.finished or (
                train_cfg.checkpoint_interval > 0 and run.state.iteration % train_cfg.checkpoint_interval == 0):
            self.save_in_step(run)
        if stopping:
            raise RunInterrupted(f"{self.stop.name} received: stopped after iteration {run.state.iteration} of "
                                 f"step {run.step}, saved in {self.folder.partial_checkpoint(run.step)}",
                                 self.stop.signum)

    def keep_if_best(self, run: StepRun, score: float) -> None:
        """Record a validation; with checkpoint_policy=best, keep the weights that beat the best so far."""
        state = run.state
        state.history.append({"epoch": state.epoch, "iteration": state.iteration, "miou_step_classes": score})
        if self.cfg.train.checkpoint_policy == "best" and (state.best_score is None or score > state.best_score):
            state.best_score, state.best_iteration = score, state.iteration
            if self.ctx.is_main:
                ckpt.save_atomic({"model": run.model.state_dict(), "iteration": state.iteration, "score": score},
                                 self.folder.best_checkpoint(run.step))
        barrier()

    def save_in_step(self, run: StepRun) -> None:
        run.check_losses()  # never write weights a non-finite loss has spoilt
        state = run.in_step_checkpoint()
        if self.ctx.is_main:
            ckpt.save_atomic(state, self.folder.partial_checkpoint(run.step))

    def choose_weights(self, run: StepRun) -> str:
        """Load the weights the checkpoint policy keeps into ``run.model``; describe them."""
        state = run.state
        if self.cfg.train.checkpoint_policy == "best" and state.best_iteration is not None:
            best = ckpt.load(self.folder.best_checkpoint(run.step), self.ctx.device)
            run.model.load_state_dict(best["model"])
            return (f"best (iteration {state.best_iteration}, mIoU of the step's classes {state.best_score:.4f} "
                    "on val)")
        if self.cfg.train.checkpoint_policy == "best":  # e.g. a step shorter than the reference's cadence
            return "last (the step was never validated)"
        return "last"

    def save_finished_step(self, step: int, weights: dict, metrics: dict) -> None:
        """The step's checkpoint: weights, metrics and the config and task that made them; step 0 also its
        recipe, so that another run may reuse it."""
        if self.ctx.is_main:
            saved = {"model": weights, "metrics": metrics, "step": step, "config": config_to_dict(self.cfg),
                     "task": [list(s) for s in self.task.steps]}
            if step == 0:
                recipe = step0_recipe(self.cfg, self.task)
                saved.update(step0_recipe=recipe, step0_recipe_hash=recipe_hash(recipe))
            self.folder.save_finished_step(step, saved)
        barrier()

    def meta(self) -> dict:
        return run_meta(self.cfg, self.task, self.ctx, self.skipped_bad_files, self.runtime)
