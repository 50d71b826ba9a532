"""One training epoch and one evaluation pass, as plain functions."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from tqdm import tqdm

from datasets.transforms import denormalize
from utils.distributed import DistContext
from utils.logs import TensorboardWriter
from utils.metrics import ConfusionMatrix

from .methods import DistillationMethod


def autocast(ctx: DistContext, amp: str):
    """Mixed precision on CUDA only; CPU runs stay in float32."""
    if ctx.device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


@dataclass
class TrainState:
    """Where training of a step stands; saved in the in-step checkpoint."""

    epoch: int = 0              # current epoch
    batch_in_epoch: int = 0     # batches of the current epoch already done
    iteration: int = 0          # optimiser steps done in this step
    best_score: Optional[float] = None
    best_epoch: Optional[int] = None
    history: list = field(default_factory=list)  # validation results during the step


def train_one_epoch(model: nn.Module, old_model: Optional[nn.Module], method: DistillationMethod,
                    loader, optimizer, scheduler, scaler, ctx: DistContext, amp: str, state: TrainState,
                    max_iterations: int, writer: TensorboardWriter, tag: str, log_interval: int,
                    image_log_interval: int, on_iteration: Callable[[TrainState], None]) -> None:
    """Train until the loader is exhausted or ``state.iteration`` reaches ``max_iterations``."""
    model.train()
    raw_model = model.module if hasattr(model, "module") else model
    bar = tqdm(loader, total=len(loader), disable=not ctx.is_main, leave=False, dynamic_ncols=True,
               desc=f"{tag} epoch {state.epoch + 1}")
    for images, labels in bar:
        if state.iteration >= max_iterations:
            break
        images = images.to(ctx.device, non_blocking=True)
        labels = labels.to(ctx.device, non_blocking=True)
        with autocast(ctx, amp):
            output = model(images)
            old_output = None
            if old_model is not None:
                with torch.no_grad():
                    old_output = old_model(images)
            terms = method.losses(labels, output, old_output, raw_model)
            loss = sum(terms.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{tag}: loss is {loss.item()} at iteration {state.iteration} "
                                     f"(terms: { {k: float(v) for k, v in terms.items()} })")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        state.iteration += 1
        state.batch_in_epoch += 1
        if ctx.is_main:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
            if state.iteration % log_interval == 0 or state.iteration == 1:
                values = {f"loss/{k}": v.item() for k, v in terms.items()}
                values["loss/total"] = loss.item()
                values["lr"] = optimizer.param_groups[0]["lr"]
                writer.scalars(values, state.iteration, prefix=f"{tag}/")
            log_images = (state.batch_in_epoch == 1) if image_log_interval <= 0 else (
                state.iteration % image_log_interval == 0)
            if log_images:
                writer.segmentation_images(f"{tag}/train/input_label_prediction", denormalize(images[:1])[0],
                                           labels[0], output.logits[0].argmax(0), state.iteration)
        on_iteration(state)
    bar.close()


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, ctx: DistContext, amp: str,
             progress_desc: str = "eval") -> ConfusionMatrix:
    """Confusion matrix over the loader's samples, summed over all processes."""
    model.eval()
    matrix = ConfusionMatrix(num_classes, device=ctx.device)
    for images, labels in tqdm(loader, disable=not ctx.is_main, leave=False, desc=progress_desc, dynamic_ncols=True):
        images = images.to(ctx.device, non_blocking=True)
        labels = labels.to(ctx.device, non_blocking=True)
        with autocast(ctx, amp):
            logits = model(images).logits
        matrix.update(logits.argmax(1), labels)
    matrix.reduce_from_all_processes()
    return matrix
