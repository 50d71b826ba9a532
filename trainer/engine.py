"""Training iterations and one evaluation pass, as plain functions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from datasets.transforms import denormalize, normalize_on_device
from models.base import SegmentationOutput
from utils.distributed import DistContext
from utils.logs import TensorboardWriter
from utils.metrics import ConfusionMatrix

from .step import StepRun, autocast_context, effective_precision, memory_format_for


@dataclass
class StepLogger:
    """Tensorboard logging of a training step: scalars every ``log_interval`` iterations, an
    input / label / prediction triplet every ``image_log_interval`` iterations (0: once per epoch)."""

    writer: TensorboardWriter
    tag: str                 # "step{t}", the prefix of every tag
    log_interval: int
    image_log_interval: int
    palette: np.ndarray      # the dataset's colours (datasets.classes)

    def due(self, iteration: int) -> bool:
        return iteration % self.log_interval == 0 or iteration == 1

    def iteration(self, run: StepRun, loss: torch.Tensor, terms: dict[str, torch.Tensor], images: torch.Tensor,
                  labels: torch.Tensor, output: SegmentationOutput, first_of_epoch: bool) -> None:
        iteration = run.state.iteration
        if self.due(iteration):
            values = {f"loss/{name}": value.item() for name, value in terms.items()}
            values["loss/total"] = loss.item()
            values["lr"] = run.optimizer.param_groups[0]["lr"]
            self.writer.scalars(values, iteration, prefix=f"{self.tag}/")
        log_images = first_of_epoch if self.image_log_interval <= 0 else iteration % self.image_log_interval == 0
        if log_images:
            self.writer.segmentation_images(f"{self.tag}/train/input_label_prediction", denormalize(images[:1])[0],
                                            labels[0], output.logits[0].argmax(0), iteration, self.palette)


def device_batch(images: torch.Tensor, labels: torch.Tensor, device: torch.device,
                 memory_format: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch (uint8 images and labels) as the model and the losses take it: normalised float images in
    the model's memory format and int64 labels, on ``device``."""
    images = normalize_on_device(images.to(device, non_blocking=True)).contiguous(memory_format=memory_format)
    return images, labels.to(device, non_blocking=True).long()


def train_iteration(run: StepRun, images: torch.Tensor, labels: torch.Tensor
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], SegmentationOutput]:
    """One optimiser step on one batch: forward (and the old model's), the method's loss terms, backward."""
    stages = run.method.needs_stages  # PLOP's POD distils both models' stage maps
    with run.autocast:
        output = run.train_model(images, stages=stages)
        old_output = None
        if run.old_model is not None:
            with torch.no_grad():
                old_output = run.old_forward(images, stages=stages)
        terms = run.method.losses(labels, output, old_output, run.model)
        loss = sum(terms.values())
    run.watch_loss(loss)  # checked at logging and checkpoint points: no host sync per iteration
    run.optimizer_step(loss)
    return loss, terms, output


def train(run: StepRun, batches, logger: StepLogger, after_iteration: Callable[[StepRun, bool], None]) -> None:
    """Train on every batch of ``batches`` (the rest of the step); after each iteration call
    ``after_iteration(run, completed_an_epoch)``."""
    ctx = run.ctx
    run.train_model.train()
    bar = tqdm(batches, total=len(batches), disable=not ctx.is_main, leave=False, dynamic_ncols=True,
               desc=f"{logger.tag} epoch {run.state.epoch + 1}")
    for images, labels in bar:
        images, labels = device_batch(images, labels, ctx.device, run.memory_format)
        loss, terms, output = train_iteration(run, images, labels)
        first_of_epoch = run.state.batch_in_epoch == 0
        completed_epoch = run.state.advance(run.plan.iterations_per_epoch)
        if logger.due(run.state.iteration):
            run.check_losses()
            if ctx.is_main:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{run.optimizer.param_groups[0]['lr']:.2e}")
        if ctx.is_main:
            logger.iteration(run, loss, terms, images, labels, output, first_of_epoch)
            if completed_epoch:
                bar.set_description(f"{logger.tag} epoch {run.state.epoch + 1}")
        after_iteration(run, completed_epoch)
    bar.close()


@torch.no_grad()
def collect_step_statistics(run: StepRun, batches) -> None:
    """The method's per-step pass (PLOP's thresholds): the frozen old model, in eval mode, under the training
    autocast, over ``batches`` (this process's share of epoch 0's batches); each batch goes to
    ``run.method.step_statistics_batch``. It draws from no global random generator (no dropout in eval mode,
    the loader has its own generators), so the training that follows draws what it would have drawn without
    it. The caller finishes the statistics (``run.method.finish_step_statistics``)."""
    ctx = run.ctx
    for images, labels in tqdm(batches, total=len(batches), disable=not ctx.is_main, leave=False,
                               dynamic_ncols=True, desc=f"step{run.step} old-model pass"):
        images, labels = device_batch(images, labels, ctx.device, run.memory_format)
        with run.autocast:  # the training's call (stages included): a compiled old model reuses its graph
            old_output = run.old_forward(images, stages=run.method.needs_stages)
        run.method.step_statistics_batch(labels, old_output)


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, ctx: DistContext, amp: str,
             progress_desc: str = "eval", fixed_size: bool = True) -> ConfusionMatrix:
    """Confusion matrix over the loader's samples, summed over all processes. ``fixed_size``: every batch
    has the same shape (cuDNN may tune its convolutions once; full-image evaluation must not)."""
    model.eval()
    matrix = ConfusionMatrix(num_classes, device=ctx.device)
    autocast = autocast_context(ctx.device, effective_precision(ctx.device, amp))
    memory_format = memory_format_for(model, ctx.device)
    tuned = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = tuned and fixed_size
    try:
        for images, labels in tqdm(loader, disable=not ctx.is_main, leave=False, desc=progress_desc,
                                   dynamic_ncols=True):
            images, labels = device_batch(images, labels, ctx.device, memory_format)
            with autocast:
                logits = model(images).logits
            matrix.update(logits.argmax(1), labels)
    finally:
        torch.backends.cudnn.benchmark = tuned
    matrix.reduce_from_all_processes()
    return matrix


@torch.no_grad()
def predict(model: nn.Module, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """Output-channel predictions (H, W) of ``images`` (uint8 (3, H, W), as the datasets give them); images of
    one size share a batch."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    predictions: list[Optional[torch.Tensor]] = [None] * len(images)
    by_size: dict[tuple, list[int]] = {}
    for index, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(index)
    for indices in by_size.values():
        batch = normalize_on_device(torch.stack([images[i] for i in indices]).to(device))
        for i, prediction in zip(indices, model(batch).logits.argmax(1).cpu()):
            predictions[i] = prediction
    model.train(was_training)
    return predictions
