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

from datasets.tasks import Task
from models import build_model
from models.base import IncrementalSegmenter
from utils.checkpoint import CheckpointError, load_model_weights
from utils.distributed import DistContext, all_gather_object, random_state, set_random_state
from utils.errors import UserError
from utils.logs import get_logger

from .loaders import iterations_per_epoch
from .methods import IncrementalMethod


class LossNotFiniteError(UserError, FloatingPointError):
    """Training diverged (a recipe the data cannot take, e.g. a learning rate too high): the weights since the
    last check are not saved."""


@dataclass
class TrainState:
    """Where training of a step stands; saved in the in-step checkpoint."""

    epoch: int = 0              # current epoch
    batch_in_epoch: int = 0     # batches of the current epoch already done
    iteration: int = 0          # optimiser steps done in this step
    best_score: Optional[float] = None
    best_iteration: Optional[int] = None
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


def step_models(model_cfg, task: Task, step: int, method: IncrementalMethod, image_size: int,
                previous: Optional[dict] = None, source: str = "the previous step"
                ) -> tuple[IncrementalSegmenter, Optional[IncrementalSegmenter]]:
    """The model that trains at ``step`` and the frozen old model (None at step 0, or when the method needs
    none). From step 1 on, both start from ``previous`` (step - 1's weights; None keeps the old model's random
    initialisation, e.g. for benchmarks) and the method prepares the new one (background transfer)."""
    if step == 0:
        return build_model(model_cfg, task.classes_per_step[:1], image_size), None
    old_model = build_model(model_cfg, task.classes_per_step[:step], image_size)
    if previous is not None:
        load_model_weights(old_model, previous, source)
    model = build_model(model_cfg, task.classes_per_step[: step + 1], image_size)
    new_keys = tuple(sorted(set(model.state_dict()) - set(old_model.state_dict())))
    load_model_weights(model, old_model.state_dict(), source, allowed_missing_prefixes=new_keys)
    method.prepare_model(model)
    return model, old_model if method.needs_old_model else None


def reference_validation_interval(total_iterations: int) -> int:
    """The MBS reference validates whenever a step's iteration count is a multiple of this (about ten
    candidates for its "best" weights per step; none when a step has fewer than 100 iterations)."""
    return max(100, total_iterations // 10)


def validation_due(validation: str, val_interval: int, state: TrainState, plan: StepPlan,
                   completed_epoch: bool) -> bool:
    """Whether to validate after the iteration that brought training to ``state``. ``epochs``: every
    ``val_interval`` epochs and at the end of the step; ``reference``: whenever the iteration count is a
    multiple of the reference's interval; ``none``: never."""
    if validation == "reference":
        return state.iteration % reference_validation_interval(plan.total_iterations) == 0
    if validation == "epochs":
        return (completed_epoch and state.epoch % val_interval == 0) or state.iteration >= plan.total_iterations
    return False


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


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(device: torch.device, amp: str) -> ContextManager:
    """Mixed precision on CUDA only; CPU runs stay in float32. Reusable: enter it once per iteration."""
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=AMP_DTYPES[amp])


def memory_format_for(model: IncrementalSegmenter, device: torch.device) -> torch.memory_format:
    return torch.channels_last if device.type == "cuda" and model.prefers_channels_last else torch.contiguous_format


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
        self.memory_format = memory_format_for(model, ctx.device)
        mixed_precision = ctx.device.type == "cuda" and train_cfg.amp != "none"
        if old_model is not None:
            # frozen: no optimiser keeps fp32 master weights, so it can live in the training dtype
            old_model.eval().requires_grad_(False).to(ctx.device, memory_format=self.memory_format)
            if mixed_precision:
                old_model.to(AMP_DTYPES[train_cfg.amp])
        self.old_model = old_model
        self.model = model.to(ctx.device, memory_format=self.memory_format)
        self.optimizer, self.scheduler = build_optimizer(self.model, plan, train_cfg)
        self.autocast = autocast_context(ctx.device, train_cfg.amp)
        # fp16 needs loss scaling; a disabled scaler passes every call straight through
        self.scaler = torch.amp.GradScaler(ctx.device.type,
                                           enabled=ctx.device.type == "cuda" and train_cfg.amp == "fp16")
        self.train_model = for_processes(self.model, ctx)
        self.old_forward = self.old_model
        if train_cfg.compile:
            self.train_model = torch.compile(self.train_model)
            if self.old_model is not None:
                self.old_forward = torch.compile(self.old_model)
        if ctx.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # the training crop has one size: tune convolutions once
        self.state = TrainState()
        # non-finite losses seen since the last check, counted on the device (reading it is a host sync)
        self.nonfinite_losses = torch.zeros((), dtype=torch.int64, device=ctx.device)
        self.checked_iteration = 0

    @property
    def finished(self) -> bool:
        return self.state.iteration >= self.plan.total_iterations

    def watch_loss(self, loss: torch.Tensor) -> None:
        """Count a non-finite loss without waiting for the device; :meth:`check_losses` reads the count."""
        self.nonfinite_losses += (~torch.isfinite(loss.detach())).to(torch.int64)

    def check_losses(self) -> None:
        """Act on the non-finite losses since the last check (a host sync: called at logging and checkpoint
        points). With fp16 loss scaling they are overflow steps the scaler skipped; without, they are fatal."""
        count = int(self.nonfinite_losses.item())
        first, last = self.checked_iteration + 1, self.state.iteration
        self.nonfinite_losses.zero_()
        self.checked_iteration = last
        if count and not self.scaler.is_enabled():
            raise LossNotFiniteError(f"step {self.step}: the loss was not finite in {count} of the iterations "
                                     f"{first}..{last} (lower the learning rate, or check the data)")
        if count:
            get_logger().warning("step %d: the gradient scaler skipped %d of the iterations %d..%d (fp16 "
                                 "overflow)", self.step, count, first, last)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "train_state": dataclasses.asdict(self.state), "method": self.method.state_dict()}

    def in_step_checkpoint(self) -> dict:
        """:meth:`state_dict` plus every rank's generator state (dropout draws), so a resumed step continues
        bit for bit. A collective: every rank calls it."""
        return {**self.state_dict(), "random_states": all_gather_object(random_state(self.ctx.device))}

    def resume(self, saved: dict, source: str) -> None:
        """Continue from an in-step checkpoint (:meth:`in_step_checkpoint`)."""
        self.load_state_dict(saved, source)
        random_states = saved.get("random_states") or []
        if len(random_states) == self.ctx.world_size:
            set_random_state(random_states[self.ctx.rank], self.ctx.device)
        else:
            get_logger().warning("%s holds the random state of %d processes, this run has %d: the rest of the "
                                 "step draws other dropout masks than an uninterrupted run would", source,
                                 len(random_states), self.ctx.world_size)

    def load_state_dict(self, saved: dict, source: str = "the in-step checkpoint") -> None:
        # "method" (PLOP's thresholds) only where the method has state: older MBS checkpoints lack it
        required = ("model", "optimizer", "scheduler", "scaler", "train_state") + (
            ("method",) if self.method.needs_step_statistics else ())
        missing = [key for key in required if key not in saved]
        if missing:
            raise CheckpointError(f"{source} lacks {', '.join(missing)} (written by another version?): delete it "
                                  "to restart the step from its beginning")
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if saved["scaler"]:  # empty when it was saved by a disabled scaler (CPU, bf16)
            self.scaler.load_state_dict(saved["scaler"])
        self.state = TrainState(**saved["train_state"])
        try:
            self.method.load_state_dict(saved.get("method", {}))
        except ValueError as err:
            raise CheckpointError(f"{source}: {err} (written by another run?): delete it to restart the step "
                                  "from its beginning") from None
