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
import warnings
from dataclasses import dataclass, field
from typing import ContextManager, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from datasets.tasks import Task
from models import build_model
from models.base import IncrementalSegmenter
from models.deeplab import DeepLabV3
from utils.checkpoint import CheckpointError, load_model_weights
from utils.config import ConfigError
from utils.distributed import (DistContext, all_gather_object, all_reduce_max, describe_device, random_state,
                               set_random_state)
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
    iteration: int = 0          # optimiser steps done in this step (skipped ones included)
    skipped_steps: int = 0      # iterations whose update the fp16 gradient scaler skipped (overflowing gradients)
    nonfinite_losses: int = 0   # iterations with a non-finite loss (only fp16 runs go on after one)
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


def fused_sgd(device: torch.device, loss_scaling: bool) -> bool:
    """Whether SGD runs as one fused kernel: on CUDA without loss scaling (one kernel instead of the foreach
    launches). Not with fp16 loss scaling: when the scaler skips the very first step (an overflow, common at the
    start of fp16 training), PyTorch's fused SGD keeps the uninitialised momentum buffers it allocated and the
    next step applies garbage (shown on the CPU in tests/test_gpu_paths.py); the foreach SGD is skipped whole, at
    the price of one host read of the scaler's overflow flag per iteration. CPU runs keep the foreach SGD."""
    return device.type == "cuda" and not loss_scaling


def build_optimizer(model: IncrementalSegmenter, plan: StepPlan, train_cfg, fused: bool = False):
    """SGD over the backbone and head groups (head lr x ``head_lr_multiplier``), poly or constant schedule;
    ``fused``: see :func:`fused_sgd`."""
    groups = model.parameter_groups()
    optimizer = torch.optim.SGD(
        [{"params": groups["backbone"], "lr": plan.lr},
         {"params": groups["head"], "lr": plan.lr * train_cfg.head_lr_multiplier}],
        lr=plan.lr, momentum=train_cfg.momentum, nesterov=train_cfg.nesterov, weight_decay=train_cfg.weight_decay,
        **({"fused": True} if fused else {}))
    if train_cfg.lr_schedule == "poly":
        def factor(iteration: int) -> float:
            return max(0.0, 1.0 - iteration / plan.total_iterations) ** train_cfg.poly_power
    else:
        def factor(iteration: int) -> float:
            return 1.0
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Compute capability from which GPUs have bf16 tensor cores (Ampere); below it torch emulates bf16 autocast.
BF16_MIN_CAPABILITY = (8, 0)
# fp16: a run stops when this many iterations in a row had a non-finite loss (loss scaling skips each of them,
# so the weights no longer move) or when the loss scale falls below MIN_LOSS_SCALE (it halves at every skip).
NONFINITE_STREAK_LIMIT = 10
MIN_LOSS_SCALE = 1.0
# Architectures with batch norm (the ones synchronised batch norm applies to).
BATCH_NORM_ARCHITECTURES = frozenset({"deeplabv3"})
# torch's warning when a scheduler steps after an optimiser step the gradient scaler skipped (see advance_schedule)
SCHEDULER_ORDER_WARNING = r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"


def effective_precision(device: torch.device, amp: str) -> str:
    """What autocast runs for ``train.amp``: fp32 on the CPU and with ``none``; on CUDA bf16 or fp16, except that
    bf16 on a GPU below compute capability 8.0 (T4, RTX 20xx: emulated, no bf16 tensor cores) runs as fp16 with
    loss scaling (see :func:`precision_fallback`)."""
    if device.type != "cuda" or amp == "none":
        return "fp32"
    if amp == "bf16" and tuple(torch.cuda.get_device_capability(device)) < BF16_MIN_CAPABILITY:
        return "fp16"
    return amp


def precision_fallback(device: torch.device, amp: str) -> Optional[str]:
    """The warning to log when ``train.amp`` cannot run as asked on ``device``, else None."""
    precision = effective_precision(device, amp)
    if amp != "bf16" or precision != "fp16":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return (f"train.amp=bf16: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no bf16 "
            f"tensor cores (they start at {BF16_MIN_CAPABILITY[0]}.{BF16_MIN_CAPABILITY[1]}): running fp16 autocast "
            "with loss scaling instead")


def autocast_context(device: torch.device, precision: str) -> ContextManager:
    """Autocast in ``precision`` (:func:`effective_precision`; fp32: none). Reusable: enter it once per iteration."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[precision])


def memory_format_for(model: IncrementalSegmenter, device: torch.device) -> torch.memory_format:
    return torch.channels_last if device.type == "cuda" and model.prefers_channels_last else torch.contiguous_format


def place_model(model: IncrementalSegmenter, device: torch.device, memory_format: torch.memory_format) -> None:
    """Move ``model`` to ``device`` in ``memory_format``. Under channels_last the gradient of each 1x1 classifier
    weight is laid out like the weight: MBS's orthogonal loss reads those weights through ``class_vectors()`` (a
    flatten), whose backward gives contiguous strides, and DDP warns at every step when a gradient's strides differ
    from its parameter's (the two layouts hold the same memory order for a 1x1 kernel: the copy is tiny)."""
    model.to(device, memory_format=memory_format)
    if memory_format == torch.channels_last:
        for classifier in getattr(model, "classifiers", ()):
            if classifier.weight.requires_grad:
                keep_gradient_layout(classifier.weight)


def keep_gradient_layout(parameter: nn.Parameter) -> None:
    """Give ``parameter`` gradients with its own strides (a hook on the summed gradient, before accumulation)."""
    size, stride = parameter.size(), parameter.stride()  # by value: the hook holds no reference to the parameter

    def laid_out_like_the_parameter(grad: torch.Tensor) -> torch.Tensor:
        if grad.stride() == stride:
            return grad
        return torch.empty_strided(size, stride, dtype=grad.dtype, device=grad.device).copy_(grad)

    parameter.register_hook(laid_out_like_the_parameter)


def old_model_dtype(old_model: IncrementalSegmenter, precision: str) -> torch.dtype:
    """The dtype of the frozen old model's weights. DeepLab's live in the autocast dtype (its convolutions run in
    it anyway; half the memory); the Segmenter's stay fp32, as the authors run it: in half precision its residual
    stream and LayerNorms would run in bf16/fp16 and move its pseudo-labels and distillation targets."""
    if precision != "fp32" and isinstance(old_model, DeepLabV3):
        return AMP_DTYPES[precision]
    return torch.float32


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())


def synchronised_batch_norm(train_cfg, batch_norm: bool, ctx: DistContext) -> bool:
    """Whether batch norm is synchronised across processes: ``train.sync_bn`` (null: on) when several CUDA
    processes train a model with batch norm (``batch_norm``). It costs a host sync and collectives per batch-norm
    layer and forward pass (~111 for R101); off, each GPU normalises over its own images."""
    if not batch_norm or not ctx.distributed:
        return False
    if ctx.device.type != "cuda":
        if train_cfg.sync_bn:
            raise ConfigError("train.sync_bn=true: synchronised batch norm runs on CUDA only, and this run's "
                              "processes use the CPU; leave train.sync_bn at null or set it to false")
        return False
    return train_cfg.sync_bn is not False


def runtime_record(train_cfg, architecture: str, ctx: DistContext) -> dict:
    """What runs: the device and versions (``utils.distributed.describe_device``), the precision autocast uses,
    the processes and their backend, synchronised batch norm, compilation. results.json keeps it as
    ``meta.runtime``."""
    precision = effective_precision(ctx.device, train_cfg.amp)
    return {**describe_device(ctx.device), "amp": train_cfg.amp, "precision": precision,
            "loss_scaling": precision == "fp16", "world_size": ctx.world_size,
            "sync_bn": synchronised_batch_norm(train_cfg, architecture in BATCH_NORM_ARCHITECTURES, ctx),
            "compile": bool(train_cfg.compile)}


def describe_runtime(record: dict) -> str:
    """One line of :func:`runtime_record` for the log."""
    if record.get("capability"):
        device = (f"{record['device']} ({record['device_name']}, compute capability {record['capability']}, "
                  f"{record['memory_gib']} GiB)")
    else:
        device = record["device"]
    precision = record["precision"] + (" with loss scaling" if record.get("loss_scaling") else "")
    if record["precision"] != "fp32" and record.get("amp") != record["precision"]:
        precision += f" (train.amp={record['amp']})"
    processes = f"{record['world_size']} process{'es' if record['world_size'] > 1 else ''}"
    if record.get("backend"):
        processes += f" ({record['backend']})"
    return (f"runtime: {device}; torch {record['torch']}, CUDA {record['cuda']}, cuDNN {record['cudnn']}; precision "
            f"{precision}; {processes}; synchronised batch norm {'on' if record['sync_bn'] else 'off'}; compile "
            f"{'on' if record['compile'] else 'off'}")


def for_processes(model: nn.Module, ctx: DistContext, sync_bn: bool = False) -> nn.Module:
    """The module the training loop calls: the model itself, or DDP around it when several processes train
    (``sync_bn``: batch norm converted to SyncBatchNorm first)."""
    if not ctx.distributed:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Buffers are broadcast from rank 0 at every forward only where they could differ: SyncBatchNorm keeps its
    # running statistics equal on every rank, so then no broadcast; gradients are views into DDP's buckets
    # (no copy of every gradient per iteration).
    return DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                   broadcast_buffers=not sync_bn, gradient_as_bucket_view=True)


def step_invariant_trunk(model: IncrementalSegmenter) -> list[nn.Module]:
    """The parts of ``model`` with the same code and shapes at every step (most of the compute): DeepLab's
    backbone and ASPP, the Segmenter's encoder blocks. The classifiers that grow every step are not in it."""
    if isinstance(model, DeepLabV3):
        return [model.backbone, model.aspp]
    from models.segmenter import Segmenter  # timm, imported only for a Segmenter
    if isinstance(model, Segmenter):
        return [model.encoder.blocks]
    return []


def compile_trunk(model: IncrementalSegmenter) -> None:
    """``torch.compile`` the forward of each part of :func:`step_invariant_trunk`, in place: the state dict keeps
    its keys, and the model (and old model) of every later step reuses the compiled code (dynamo caches it per
    code object; a whole model, whose classifier list grows every step, hit dynamo's recompile limit by step 4)."""
    for part in step_invariant_trunk(model):
        part.forward = torch.compile(part.forward)


class StepRun:
    """Everything that trains during one step; ``state_dict()`` is the in-step checkpoint."""

    def __init__(self, step: int, model: IncrementalSegmenter, old_model: Optional[IncrementalSegmenter],
                 method: IncrementalMethod, plan: StepPlan, train_cfg, ctx: DistContext,
                 precision: Optional[str] = None):
        """``precision``: what autocast runs (default :func:`effective_precision` of the device and
        ``train.amp``); tests pass bf16 or fp16 to run the mixed-precision branches on the CPU."""
        self.step, self.method, self.plan, self.ctx = step, method, plan, ctx
        self.precision = effective_precision(ctx.device, train_cfg.amp) if precision is None else precision
        self.memory_format = memory_format_for(model, ctx.device)
        if old_model is not None:
            # frozen: no optimiser keeps fp32 master weights, so it may live in the training dtype
            old_model.eval().requires_grad_(False)
            place_model(old_model, ctx.device, self.memory_format)
            old_model.to(old_model_dtype(old_model, self.precision))
        self.old_model = old_model
        place_model(model, ctx.device, self.memory_format)
        self.model = model
        loss_scaling = self.precision == "fp16"  # bf16 has fp32's range: no scaling
        self.optimizer, self.scheduler = build_optimizer(self.model, plan, train_cfg,
                                                         fused=fused_sgd(ctx.device, loss_scaling))
        self.autocast = autocast_context(ctx.device, self.precision)
        # a disabled scaler passes every call straight through
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=loss_scaling)
        self.sync_bn = synchronised_batch_norm(train_cfg, has_batch_norm(model), ctx)
        self.train_model = for_processes(self.model, ctx, self.sync_bn)
        self.old_forward = self.old_model
        if train_cfg.compile:
            compile_trunk(self.model)
            if self.old_model is not None:
                compile_trunk(self.old_model)
        if ctx.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # the training crop has one size: tune convolutions once
        self.state = TrainState()
        # Counted on the device since the last check (reading them is a host sync; check_losses does it):
        # non-finite losses, the longest run of them in a row, and the steps the gradient scaler skipped.
        device = ctx.device
        self.nonfinite_losses = torch.zeros((), dtype=torch.int64, device=device)
        self.nonfinite_streak = torch.zeros((), dtype=torch.int64, device=device)  # carries over checks
        self.longest_nonfinite_streak = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        self.checked_iteration = 0

    @property
    def finished(self) -> bool:
        return self.state.iteration >= self.plan.total_iterations

    def watch_loss(self, loss: torch.Tensor) -> None:
        """Count a non-finite loss without waiting for the device; :meth:`check_losses` reads the count."""
        nonfinite = (~torch.isfinite(loss.detach())).to(torch.int64)
        self.nonfinite_losses += nonfinite
        self.nonfinite_streak.add_(1).mul_(nonfinite)
        torch.maximum(self.longest_nonfinite_streak, self.nonfinite_streak, out=self.longest_nonfinite_streak)

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """Backward, the optimiser step through the gradient scaler, the schedule. A step the scaler skips is
        counted on the device: the scale drops exactly when the scaler found an overflow."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():
            scale = self.scaler._scale.clone()  # the scale tensor itself: get_scale() would read it to the host
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.skipped_steps += (self.scaler._scale < scale).to(torch.int64)
        else:
            self.optimizer.step()
        self.advance_schedule()

    def advance_schedule(self) -> None:
        """The schedule counts iterations, updates the scaler skipped included. When the scaler skips the very
        first step, torch warns that the scheduler stepped before the optimiser; that is the intent here, so
        that one warning is silenced (only with loss scaling)."""
        if not self.scaler.is_enabled():
            self.scheduler.step()
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", SCHEDULER_ORDER_WARNING, UserWarning)
            self.scheduler.step()

    def check_losses(self) -> None:
        """Act on the non-finite losses and skipped steps since the last check (one host sync: called at logging
        and checkpoint points). Without loss scaling a non-finite loss is fatal. With fp16 loss scaling skipped
        steps and non-finite losses are logged, and the run stops when the loss was not finite in
        NONFINITE_STREAK_LIMIT iterations in a row or the loss scale fell below MIN_LOSS_SCALE."""
        counters = torch.stack([self.nonfinite_losses, self.longest_nonfinite_streak, self.skipped_steps])
        # every rank decides alike (a rank that stopped alone would leave the others waiting in a collective)
        nonfinite, longest_streak, skipped = all_reduce_max(counters).tolist()
        first, last = self.checked_iteration + 1, self.state.iteration
        for counter in (self.nonfinite_losses, self.longest_nonfinite_streak, self.skipped_steps):
            counter.zero_()
        self.checked_iteration = last
        self.state.nonfinite_losses += nonfinite
        self.state.skipped_steps += skipped
        advice = "lower the learning rate, or check the data"
        if not self.scaler.is_enabled():
            if nonfinite:
                raise LossNotFiniteError(f"step {self.step}: the loss was not finite in {nonfinite} of the iterations "
                                         f"{first}..{last} ({advice})")
            return
        scale = self.scaler.get_scale()
        if longest_streak >= NONFINITE_STREAK_LIMIT:
            raise LossNotFiniteError(f"step {self.step}: the loss was not finite in {longest_streak} iterations in a "
                                     f"row (up to iteration {last}); fp16 loss scaling skips such steps, so the "
                                     f"weights no longer move ({advice}, or train in bf16 where the GPU has it)")
        if scale < MIN_LOSS_SCALE:
            raise LossNotFiniteError(f"step {self.step}: the fp16 loss scale fell to {scale:g} by iteration {last}: "
                                     f"the gradients overflow at every iteration ({advice}, or train in bf16 where "
                                     "the GPU has it)")
        log = get_logger()
        if not self.ctx.is_main:
            return
        if skipped:
            log.warning("step %d: the fp16 gradient scaler skipped %d of the iterations %d..%d (gradients "
                        "overflowed; the loss scale is now %g)", self.step, skipped, first, last, scale)
        if nonfinite:
            log.warning("step %d: the loss was not finite in %d of the iterations %d..%d", self.step, nonfinite,
                        first, last)

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
