"""The class-incremental step loop.

For every step of the task: build the model for the classes seen so far, load
the previous step's weights (and keep a frozen copy as the old model), let the
method prepare it (background transfer), train, pick the weights to keep
(``last`` or ``best``), test on the whole validation set, and write the step's
checkpoint and the results files. A finished step's checkpoint is never
overwritten; ``resume`` skips finished steps and continues an interrupted one
from its in-step checkpoint.
"""
from __future__ import annotations

import copy
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from datasets.incremental import load_class_lists, train_dataset, val_dataset
from datasets.tasks import Task, get_task
from datasets.transforms import eval_transforms, train_transforms
from models import build_model
from utils import checkpoint as ckpt
from utils.config import Config, ConfigError, config_to_dict, save_config
from utils.distributed import (DistContext, all_gather_object, barrier, random_state, run_on_main,
                               set_random_state)
from utils.files import TEMPORARY_PATTERN
from utils.logs import TensorboardWriter, get_logger
from utils.metrics import summarize
from utils.report import format_step_table, write_results

from .engine import TrainState, evaluate, train_one_epoch
from .loaders import eval_loader, iterations_per_epoch, train_loader
from .methods import build_method, resolve_switches

VOC_CLASS_NAMES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                   "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
                   "train", "tvmonitor"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def class_names(cfg: Config, task: Task) -> list[str]:
    """Name of every output channel, in the task's class order."""
    if cfg.data.synthetic.enabled:
        from datasets.synthetic import CLASS_NAMES
        names = list(CLASS_NAMES)
    elif cfg.data.dataset == "voc":
        names = VOC_CLASS_NAMES
    else:
        names = ["other"] + [f"ade_{k}" for k in range(1, 151)]
        info = Path(cfg.data.root) / "ADEChallengeData2016" / "objectInfo150.txt"
        if info.is_file():  # "Idx Ratio Train Val Name" with names like "wall" or "building;edifice"
            for line in info.read_text().splitlines()[1:]:
                parts = line.split("\t")
                if len(parts) >= 5 and parts[0].strip().isdigit():
                    names[int(parts[0])] = parts[4].split(";")[0].strip()
    # Results are keyed by class name: a name that repeats (ADE's short names could) gets its class id.
    repeated = {n for n in names if names.count(n) > 1}
    names = [f"{n}_{k}" if n in repeated else n for k, n in enumerate(names)]
    return [names[c] for c in task.order]


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
        if cfg.train.checkpoint_policy == "best" and cfg.train.val_interval <= 0:
            raise ConfigError("train.checkpoint_policy=best needs train.val_interval > 0 (it selects on validation)")
        if cfg.train.batch_size % ctx.world_size:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is the total batch over all processes and "
                              f"must be divisible by their number ({ctx.world_size})")
        self.names = class_names(cfg, self.task)
        # A no-op until run() has checked the run folder: a refused run or --eval-only writes no event file.
        self.writer = TensorboardWriter(None, False)

    # ---------------------------------------------------------------- set-up
    def prepare_run_dir(self) -> None:
        """Refuse to overwrite finished work unless resuming; save the resolved config.

        Done by rank 0; a refusal is raised on every rank (so they all stop at the same place).
        """
        run_on_main(self.ctx, self._prepare_run_dir)

    def _prepare_run_dir(self) -> None:
        done = sorted(self.run_dir.glob("checkpoints/step*.pt"))
        if done and not self.resume:
            raise FileExistsError(f"run folder {self.run_dir} already holds checkpoints ({done[0].name}, ...): "
                                  "pass --resume to continue it, or choose another name/output_dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # Temporary files of an atomic write cut short (the process was killed while saving).
        checkpoints = self.run_dir / "checkpoints"
        for stale in [*self.run_dir.glob(TEMPORARY_PATTERN), *checkpoints.glob(TEMPORARY_PATTERN)]:
            self.log.info("removing %s (left by an interrupted write)", stale)
            stale.unlink()
        saved = self.run_dir / "config.yaml"
        if saved.exists() and self.resume:
            import yaml
            before = yaml.safe_load(saved.read_text())
            if before != config_to_dict(self.cfg):
                self.log.warning("the config differs from the one saved in %s; the saved one is kept as "
                                 "config.previous.yaml", saved)
                saved.rename(self.run_dir / "config.previous.yaml")
        save_config(self.cfg, saved)

    def prepare_data(self) -> None:
        """Generate the synthetic data and derive the class lists on rank 0 first, so ranks never race;
        a data error found there is raised on every rank."""
        run_on_main(self.ctx, self._prepare_data)

    def _prepare_data(self) -> None:
        data = self.cfg.data
        self.ensure_synthetic_data()
        load_class_lists(data.dataset, data.root, "train", data.class_lists, data.cache_dir)
        if self.cfg.train.val_interval > 0:  # selection_loader reads the val lists on every rank
            load_class_lists(data.dataset, data.root, "val", None, data.cache_dir)

    # ----------------------------------------------------------------- steps
    def run(self) -> list[dict]:
        self.prepare_run_dir()
        self.prepare_data()
        self.writer = TensorboardWriter(self.run_dir / "tensorboard", self.ctx.is_main)
        try:
            self.log.info("task %s:%s (%s), %d steps, method %s, checkpoint policy %s, eval %s",
                          self.cfg.data.dataset, self.task.name, self.cfg.data.setting, self.task.num_steps,
                          self.switches.describe(), self.cfg.train.checkpoint_policy, self.cfg.data.eval_mode)
            results = self.previous_results()
            for step in range(self.cfg.start_step, self.end_step + 1):
                metrics = self.run_step(step)
                results = [r for r in results if r["step"] != step] + [metrics]
                results.sort(key=lambda r: r["step"])
                if self.ctx.is_main:
                    write_results(self.run_dir, results, self.meta())
            if self.ctx.is_main:
                self.log.info("results (%s):\n%s", self.run_dir / "results.md", format_step_table(results))
        finally:  # flush what was logged, also when a step fails
            self.writer.close()
        return results

    def meta(self) -> dict:
        c = self.cfg
        return {"name": c.name, "dataset": "synthetic (VOC layout)" if c.data.synthetic.enabled else c.data.dataset,
                "task": self.task.name, "setting": c.data.setting, "method": self.switches.describe(),
                "architecture": f"{c.model.architecture} {c.model.backbone}", "checkpoint_policy":
                c.train.checkpoint_policy, "eval_mode": c.data.eval_mode, "crop_size": c.data.crop_size,
                "processes": self.ctx.world_size}

    def previous_results(self) -> list[dict]:
        """Metrics of steps finished before start_step (from their checkpoints), so results.json stays whole."""
        results = []
        for step in range(0, self.cfg.start_step):
            path = ckpt.step_checkpoint(self.run_dir, step)
            if path.exists():
                results.append(ckpt.load(path)["metrics"])
        return results

    def model_for_step(self, step: int) -> nn.Module:
        return build_model(self.cfg.model, self.task.classes_per_step[: step + 1], self.cfg.data.crop_size)

    def load_previous(self, step: int) -> tuple[nn.Module, nn.Module]:
        """The step's model initialised from step-1's checkpoint, and the frozen old model."""
        previous = ckpt.step_checkpoint(self.run_dir, step - 1)
        if not previous.exists():
            raise FileNotFoundError(f"step {step} starts from the checkpoint of step {step - 1}, but "
                                    f"{previous} does not exist: run step {step - 1} first (start_step)")
        state = ckpt.load(previous)["model"]
        old_model = self.model_for_step(step - 1)
        ckpt.load_model_weights(old_model, state, str(previous))
        model = self.model_for_step(step)
        new_keys = tuple(sorted(set(model.state_dict()) - set(old_model.state_dict())))
        ckpt.load_model_weights(model, state, str(previous), allowed_missing_prefixes=new_keys)
        return model, old_model

    def optimizer_for(self, model: nn.Module, step: int, total_iterations: int):
        t = self.cfg.train
        lr = t.lr if step == 0 else t.lr_incremental
        groups = model.parameter_groups()
        optimizer = torch.optim.SGD(
            [{"params": groups["backbone"], "lr": lr}, {"params": groups["head"], "lr": lr * t.head_lr_multiplier}],
            lr=lr, momentum=t.momentum, nesterov=t.nesterov, weight_decay=t.weight_decay)
        if t.lr_schedule == "poly":
            def factor(i: int) -> float:
                return max(0.0, 1.0 - i / total_iterations) ** t.poly_power
        else:
            def factor(i: int) -> float:
                return 1.0
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return optimizer, scheduler

    def run_step(self, step: int) -> dict:
        final_path = ckpt.step_checkpoint(self.run_dir, step)
        partial = ckpt.partial_checkpoint(self.run_dir, step)
        if final_path.exists():
            self.log.info("step %d is finished (%s): not retraining it", step, final_path)
            if self.ctx.is_main:
                # Left when a run was killed between writing the step's checkpoint and removing these.
                for leftover in (partial, ckpt.best_checkpoint(self.run_dir, step)):
                    if leftover.exists():
                        self.log.info("removing %s (the step is finished)", leftover)
                        ckpt.remove_if_exists(leftover)
            return ckpt.load(final_path)["metrics"]
        cfg, ctx, t = self.cfg, self.ctx, self.cfg.train
        tag = f"step{step}"
        seed_everything(cfg.seed * 1000 + step * 10 + ctx.rank)
        num_old = sum(self.task.classes_per_step[:step])
        method = build_method(cfg.method, num_old, sum(self.task.classes_per_step[: step + 1]))

        if step == 0:
            model, old_model = self.model_for_step(0), None
        else:
            model, old_model = self.load_previous(step)
            method.prepare_model(model)
            if not method.needs_old_model:
                old_model = None
        if old_model is not None:
            old_model.eval().requires_grad_(False).to(ctx.device)
        model.to(ctx.device)

        train_set = train_dataset(self.task, step, cfg.data.root, cfg.data.setting == "disjoint",
                                  train_transforms(cfg.data.base_size, cfg.data.crop_size, cfg.data.scale_range),
                                  cfg.data.class_lists, cfg.data.cache_dir, progress=ctx.is_main)
        epochs = t.epochs if step == 0 or t.epochs_incremental is None else t.epochs_incremental
        per_epoch = iterations_per_epoch(len(train_set), t.batch_size)
        total = epochs * per_epoch if t.max_iters_per_step is None else min(epochs * per_epoch, t.max_iters_per_step)
        optimizer, scheduler = self.optimizer_for(model, step, total)
        scaler = torch.amp.GradScaler("cuda") if ctx.device.type == "cuda" and t.amp == "fp16" else None

        state = TrainState()
        if partial.exists() and self.resume:
            saved = ckpt.load(partial, ctx.device)
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            if scaler is not None and saved.get("scaler"):
                scaler.load_state_dict(saved["scaler"])
            state = TrainState(**saved["state"])
            random_states = saved.get("random_states") or []
            if len(random_states) == ctx.world_size:
                set_random_state(random_states[ctx.rank], ctx.device)
            else:
                self.log.warning("%s holds the random state of %d processes, this run has %d: the rest of the "
                                 "step draws other dropout masks than an uninterrupted run would", partial,
                                 len(random_states), ctx.world_size)
            self.log.info("step %d: resuming from %s (epoch %d, iteration %d)", step, partial,
                          state.epoch + 1, state.iteration)

        train_model: nn.Module = model
        if ctx.distributed:
            if ctx.device.type == "cuda":
                train_model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            train_model = DistributedDataParallel(train_model, device_ids=device_ids)
        self.log.info("step %d: %d classes (%d new), %d training images, %d epochs x %d iterations (%d total), "
                      "batch %d (%d per process x %d processes)", step, method.num_classes,
                      method.num_classes - num_old, len(train_set), epochs, per_epoch, total, t.batch_size,
                      t.batch_size // ctx.world_size, ctx.world_size)

        def save_partial(current: TrainState) -> None:
            # every rank's generator state (dropout draws), so a resumed step continues bit for bit
            random_states = all_gather_object(random_state(ctx.device))
            if ctx.is_main:
                ckpt.save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                  "scheduler": scheduler.state_dict(),
                                  "scaler": scaler.state_dict() if scaler is not None else None,
                                  "state": vars(copy.deepcopy(current)), "random_states": random_states}, partial)

        def on_iteration(current: TrainState) -> None:
            if t.checkpoint_interval > 0 and current.iteration % t.checkpoint_interval == 0:
                save_partial(current)

        started = time.time()
        selection = self.selection_loader(step) if t.val_interval > 0 else None
        while state.epoch < epochs and state.iteration < total:
            loader = train_loader(train_set, t.batch_size, ctx, cfg.seed * 1000 + step, state.epoch,
                                  cfg.data.num_workers, skip_batches=state.batch_in_epoch)
            train_one_epoch(train_model, old_model, method, loader, optimizer, scheduler, scaler, ctx, t.amp,
                            state, total, self.writer, tag, t.log_interval, t.image_log_interval, on_iteration)
            finished_epoch = state.batch_in_epoch >= per_epoch
            if finished_epoch:
                state.epoch += 1
                state.batch_in_epoch = 0
            if selection is not None and (state.epoch % t.val_interval == 0 or state.iteration >= total):
                self.validate_during_step(model, selection, step, state)
            save_partial(state)
        self.log.info("step %d: trained %d iterations in %.1f s", step, state.iteration, time.time() - started)

        kept = "last"
        if t.checkpoint_policy == "best" and state.best_epoch is not None:
            best = ckpt.load(ckpt.best_checkpoint(self.run_dir, step), ctx.device)
            model.load_state_dict(best["model"])
            kept = f"best (epoch {state.best_epoch}, new-class mIoU {state.best_score:.4f} on val)"
        metrics = self.test(model, step)
        metrics.update({"checkpoint": kept, "iterations": state.iteration, "validation_history": state.history})
        if ctx.is_main:
            ckpt.save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "scaler": scaler.state_dict() if scaler is not None else None,
                              "config": config_to_dict(cfg), "metrics": metrics, "step": step,
                              "task": [list(s) for s in self.task.steps]}, final_path)
            ckpt.remove_if_exists(partial)
            ckpt.remove_if_exists(ckpt.best_checkpoint(self.run_dir, step))
        barrier()
        return metrics

    # ------------------------------------------------------------ evaluation
    def test_loader(self, step: int, only_classes: Optional[list[int]] = None):
        data = self.cfg.data
        dataset = val_dataset(self.task, step, data.root, eval_transforms(data.eval_mode, data.base_size,
                                                                          data.crop_size),
                              only_classes=only_classes, cache_dir=data.cache_dir, progress=self.ctx.is_main)
        batch = 1 if data.eval_mode == "full" else self.cfg.train.val_batch_size
        return eval_loader(dataset, batch, self.ctx, data.num_workers)

    def selection_loader(self, step: int):
        """Validation during a step: for step >= 1 the val images containing the step's new classes
        (what the reference selects its 'best' checkpoint on), for step 0 the whole val set."""
        new = [c for c in self.task.steps[step] if c != 0] if step > 0 else None
        return self.test_loader(step, only_classes=new)

    def summarize(self, matrix, step: int) -> dict:
        seen = self.task.channels_seen(step)
        old = self.task.channels_of_step(0)
        new = [k for k in seen if k not in old]
        summary = summarize(matrix.matrix[: len(seen), : len(seen)], old, new, self.names[: len(seen)],
                            ignore_background=self.cfg.data.dataset == "ade")
        summary["step"] = step
        summary["step_classes"] = [self.names[k] for k in self.task.channels_of_step(step)]
        return summary

    def validate_during_step(self, model: nn.Module, loader, step: int, state: TrainState) -> None:
        matrix = evaluate(model, loader, sum(self.task.classes_per_step[: step + 1]), self.ctx, self.cfg.train.amp,
                          f"step{step} val")
        summary = self.summarize(matrix, step)
        step_channels = self.task.channels_of_step(step)
        ious = [summary["iou"][self.names[k]] for k in step_channels if self.names[k] != "other"]
        ious = [v for v in ious if v is not None]
        score = float(np.mean(ious)) if ious else 0.0
        self.writer.scalars({"val/miou_step_classes": score, "val/miou_all": summary["miou_all"],
                             "val/miou_old": summary["miou_old"], "val/miou_new": summary["miou_new"]},
                            state.iteration, prefix=f"step{step}/")
        state.history.append({"epoch": state.epoch, "iteration": state.iteration, "miou_step_classes": score})
        self.log.info("step %d epoch %d: val mIoU of the step's classes %.4f", step, state.epoch, score)
        if self.cfg.train.checkpoint_policy == "best" and (state.best_score is None or score > state.best_score):
            state.best_score, state.best_epoch = score, state.epoch
            if self.ctx.is_main:
                ckpt.save_atomic({"model": model.state_dict(), "epoch": state.epoch, "score": score},
                                 ckpt.best_checkpoint(self.run_dir, step))
        barrier()
        model.train()

    def test(self, model: nn.Module, step: int) -> dict:
        """The spec's evaluation at step t: the whole validation set, classes seen so far."""
        matrix = evaluate(model, self.test_loader(step), sum(self.task.classes_per_step[: step + 1]), self.ctx,
                          self.cfg.train.amp, f"step{step} test")
        summary = self.summarize(matrix, step)
        fmt = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
        self.log.info("step %d test: mIoU old %s | new %s | all %s (old without background %s)", step,
                      fmt(summary["miou_old"]), fmt(summary["miou_new"]), fmt(summary["miou_all"]),
                      fmt(summary["miou_old_no_bg"]))
        self.writer.scalars({k: summary[k] for k in ("miou_old", "miou_new", "miou_all", "miou_old_no_bg")},
                            step, prefix="test/")
        return summary

    def evaluate_checkpoint(self, step: int) -> dict:
        """--eval-only: test the finished checkpoint of ``step``."""
        if not 0 <= step < self.task.num_steps:
            raise ConfigError(f"--step {step} is outside task {self.task.name} (steps 0..{self.task.num_steps - 1})")
        path = ckpt.step_checkpoint(self.run_dir, step)
        if not path.is_file():
            raise FileNotFoundError(f"step {step} has no finished checkpoint: {path} does not exist "
                                    f"(is {self.run_dir} the run folder, and has it finished step {step}?)")
        saved = ckpt.load(path, "cpu")
        model = self.model_for_step(step)
        ckpt.load_model_weights(model, saved["model"], str(path))
        model.to(self.ctx.device)
        run_on_main(self.ctx, self.ensure_synthetic_data)
        return self.test(model, step)

    def ensure_synthetic_data(self) -> None:
        """Generate the built-in synthetic dataset at data.root if the config asks for it and it is absent."""
        if self.cfg.data.synthetic.enabled:
            from datasets.synthetic import ensure_synthetic
            s = self.cfg.data.synthetic
            ensure_synthetic(self.cfg.data.root, num_train=s.num_train, num_val=s.num_val,
                             image_size=s.image_size, seed=s.seed)
