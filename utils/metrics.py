"""Segmentation metrics: a streaming confusion matrix and the CISS summaries (spec section 1).

The matrix lives on the evaluation device and is summed over processes with one
``all_reduce`` at the end, so distributed evaluation counts every pixel once.

IoU of class c = TP / (TP + FP + FN). A class that was evaluated and got IoU 0
counts as 0 in every mean (the reference's overall "Mean IoU" silently drops
zero-IoU classes; we do not). A class with an empty denominator (no ground
truth pixel and never predicted) has no IoU: it is reported as ``None`` and left
out of the means, because nothing was measured for it.

For comparison with published tables only, ``summarize`` also computes the
reference's overall number (``miou_all_reference``, see its docstring). It is an
extra column, never the headline.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist


class ConfusionMatrix:
    """``matrix[t, p]`` counts pixels of true class t predicted as p, for t, p < num_classes.

    Ground-truth values >= num_classes (255 = ignore, classes not yet learned are
    already mapped to 255 by the validation label table) are not counted.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        """prediction, target: integer tensors of the same shape (e.g. (B, H, W))."""
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
        n = self.num_classes
        target = target.reshape(-1).to(self.matrix.device, torch.int64)
        prediction = prediction.reshape(-1).to(self.matrix.device, torch.int64)
        valid = (target >= 0) & (target < n)
        # One count over the cells t * n + p (no loop over classes). Uncounted pixels go to one extra cell instead
        # of being selected out: a boolean-mask selection, and bincount (which reads its input's min and max to
        # size its output), make the host wait for the device on CUDA; a fixed-size index_add_ does not.
        cells = torch.where(valid, target * n + prediction, n * n)
        counts = torch.zeros(n * n + 1, dtype=torch.int64, device=cells.device)
        counts.index_add_(0, cells, torch.ones((), dtype=torch.int64, device=cells.device).expand(cells.numel()))
        self.matrix += counts[: n * n].view(n, n)

    def reduce_from_all_processes(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix)


def class_iou(matrix: torch.Tensor) -> list[Optional[float]]:
    """IoU per class of a (C, C) confusion matrix; None where TP + FP + FN = 0."""
    matrix = matrix.double().cpu()
    tp = matrix.diag()
    denominator = matrix.sum(0) + matrix.sum(1) - tp
    return [None if d == 0 else float(t / d) for t, d in zip(tp.tolist(), denominator.tolist())]


def mean_iou(ious: Sequence[Optional[float]], channels: Sequence[int]) -> Optional[float]:
    """Mean of the IoUs of ``channels`` that have one (zeros included); None if none has."""
    values = [ious[c] for c in channels if ious[c] is not None]
    return sum(values) / len(values) if values else None


def reference_mean_iou(ious: Sequence[Optional[float]], channels: Sequence[int]) -> Optional[float]:
    """The MBS reference's overall "Mean IoU": the mean over ``channels`` whose IoU is defined and non-zero.

    The reference computes IoU = TP / (TP + FP + FN + 1e-6) for every channel and averages the
    non-zero ones, so a class with IoU 0 and a class without any pixel or prediction (0 / 1e-6 = 0
    there, None here) are both dropped. Its 1e-6 changes an IoU by less than 1e-6 / (TP + FP + FN),
    far below the two decimals reported, so it is not reproduced. None if no channel is left.
    """
    values = [ious[c] for c in channels if ious[c]]  # drops None and 0.0
    return sum(values) / len(values) if values else None


def summarize(matrix: torch.Tensor, old: Sequence[int], new: Sequence[int], names: Sequence[str]) -> dict:
    """The numbers reported after a step.

    matrix: (C, C) confusion matrix over the C channels seen so far.
    old: the evaluated channels of step 0 (VOC's background 0 included, ADE's 0 not:
    ``Task.evaluated_channels``); new: the evaluated channels of steps 1..t.
    names: a unique name per channel.

    Returns a dict with ``iou`` (name -> IoU or None, for the old and new channels),
    ``miou_old`` (step-0 classes; VOC with background, "0-15"), ``miou_new``,
    ``miou_all``, ``miou_old_no_bg`` (the reference's split: old without background),
    ``miou_all_reference`` and ``pixel_accuracy``.

    ``miou_all_reference`` is the overall number of the published MBS tables (the authors'
    evaluation code; see :func:`reference_mean_iou`): the mean IoU over the evaluated channels
    (old and new; VOC's background included) whose IoU is non-zero; a zero or undefined IoU is
    left out instead of counting as 0. The reference averages over every channel of its matrix,
    ADE20K's channel 0 too, but that channel has no ground-truth pixel (label 0 is ignored), so its
    IoU is 0 or undefined and is dropped there as well: leaving it out of ``old`` changes nothing.
    The reference's old / new (``1..first-1`` and the rest) are ``miou_old_no_bg`` and ``miou_new``,
    except that the reference counts an undefined IoU (a class absent from the validation set and
    never predicted) as 0 where these leave it out; every class of VOC's validation set is present
    in it, so there the two agree.
    """
    if matrix.shape[0] != len(names) or len(set(names)) != len(names):
        raise ValueError(f"need one unique name per channel: {matrix.shape[0]} channels, names {list(names)}")
    ious = class_iou(matrix)
    evaluated = [*old, *new]
    total = matrix.sum().item()
    return {
        "iou": {names[channel]: ious[channel] for channel in evaluated},
        "miou_old": mean_iou(ious, old),
        "miou_new": mean_iou(ious, new),
        "miou_all": mean_iou(ious, evaluated),
        "miou_old_no_bg": mean_iou(ious, [c for c in old if c != 0]),
        "miou_all_reference": reference_mean_iou(ious, evaluated),
        "pixel_accuracy": matrix.diag().sum().item() / total if total else None,
    }
