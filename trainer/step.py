"""One step of a task while it trains, as one object.

A :class:`StepRun` holds what changes while a step trains: the model, the frozen
old model, the method, the optimiser and its schedule, the gradient scaler and
where training stands (:class:`TrainState`). ``state_dict()`` is the in-step
checkpoint and ``load_state_dict()`` continues from it. :class:`StepPlan` says
how long the step trains.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import ContextManager, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from models.base import IncrementalSegmenter
from utils.checkpoint import CheckpointError
from utils.distributed import DistContext

from .loaders import iterations_per_epoch
from .methods import IncrementalMethod


@dataclass
class TrainState:
    """Where training of a step stands; saved in the in-step checkpoint."""

    epoch: int = 0              # current epoch
    batch_in_epoch: int = 0     # batches of the current epoch already done
    iteration: int = 0          # optimiser steps done in this step
    best_score: Optional[float] = None
    best_epoch: Optional[int] = None
    history: list = field(default_factory=list)  # validation results during the step

    def advance(self, iterations_per_epoch: int) -> bool:
        """Count one optimiser step; True when it completed an epoch."""
        self.iteration += 1
        self.batch_in_epoch += 1
        if self.batch_in_epoch < iterations_per_epoch:
            return False
        self.epoch += 1
        self.batch_in_epoch = 0
        return True


@dataclass(frozen=True)
class StepPlan:
    """How long a step trains, and at which learning rate."""

    epochs: int
    iterations_per_epoch: int
    total_iterations: int   # epochs x iterations_per_epoch, or less with train.max_iters_per_step
    lr: float


def plan_step(train_cfg, step: int, num_images: int) -> StepPlan:
    """Step 0 uses ``epochs`` and ``lr``, later steps ``epochs_incremental`` and ``lr_incremental``."""
    incremental = step > 0
    epochs = train_cfg.epochs
    if incremental and train_cfg.epochs_incremental is not None:
        epochs = train_cfg.epochs_incremental
    per_epoch = iterations_per_epoch(num_images, train_cfg.batch_size)
    total = epochs * per_epoch
    if train_cfg.max_iters_per_step is not None:
        total = min(total, train_cfg.max_iters_per_step)
    return StepPlan(epochs, per_epoch, total, train_cfg.lr_incremental if incremental else train_cfg.lr)


def build_optimizer(model: IncrementalSegmenter, plan: StepPlan, train_cfg):
    """SGD over the backbone and head groups (head lr x ``head_lr_multiplier``), poly or constant schedule."""
    groups = model.parameter_groups()
    optimizer = torch.optim.SGD(
        [{"params": groups["backbone"], "lr": plan.lr},
         {"params": groups["head"], "lr": plan.lr * train_cfg.head_lr_multiplier}],
        lr=plan.lr, momentum=train_cfg.momentum, nesterov=train_cfg.nesterov, weight_decay=train_cfg.weight_decay)
    if train_cfg.lr_schedule == "poly":
        def factor(iteration: int) -> float:
            return max(0.0, 1.0 - iteration / plan.total_iterations) ** train_cfg.poly_power
    else:
        def factor(iteration: int) -> float:
            return 1.0
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_context(device: torch.device, amp: str) -> ContextManager:
    """Mixed precision on CUDA only; CPU runs stay in float32. Reusable: enter it once per iteration."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def for_processes(model: nn.Module, ctx: DistContext) -> nn.Module:
    """The module the training loop calls: the model itself, or DDP around it (with synchronised batch
    norm on GPUs) when several processes train."""
    if not ctx.distributed:
        return model
    if ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


class StepRun:
    """Everything that trains during one step; ``state_dict()`` is the in-step checkpoint."""

    def __init__(self, step: int, model: IncrementalSegmenter, old_model: Optional[IncrementalSegmenter],
                 method: IncrementalMethod, plan: StepPlan, train_cfg, ctx: DistContext):
        self.step, self.method, self.plan, self.ctx = step, method, plan, ctx
        if old_model is not None:
            old_model.eval().requires_grad_(False).to(ctx.device)
        self.old_model = old_model
        self.model = model.to(ctx.device)
        self.optimizer, self.scheduler = build_optimizer(self.model, plan, train_cfg)
        self.autocast = autocast_context(ctx.device, train_cfg.amp)
        # fp16 needs loss scaling; a disabled scaler passes every call straight through
        self.scaler = torch.amp.GradScaler(ctx.device.type,
                                           enabled=ctx.device.type == "cuda" and train_cfg.amp == "fp16")
        self.train_model = for_processes(self.model, ctx)
        self.state = TrainState()

    @property
    def finished(self) -> bool:
        return self.state.iteration >= self.plan.total_iterations

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "train_state": dataclasses.asdict(self.state)}

    def load_state_dict(self, saved: dict, source: str = "the in-step checkpoint") -> None:
        missing = [key for key in ("model", "optimizer", "scheduler", "scaler", "train_state") if key not in saved]
        if missing:
            raise CheckpointError(f"{source} lacks {', '.join(missing)} (written by another version?): delete it "
                                  "to restart the step from its beginning")
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if saved["scaler"]:  # empty when it was saved by a disabled scaler (CPU, bf16)
            self.scaler.load_state_dict(saved["scaler"])
        self.state = TrainState(**saved["train_state"])
