"""The interface every segmenter of this project implements.

A class-incremental segmenter owns one classifier block per step. Step 0's
block includes background (channel 0); later blocks add the step's new
classes. The logits of all blocks are concatenated, so output channel k is the
k-th class of the task's class order.

What the trainer and the methods rely on:
- ``forward(images, stages=False)`` returns a :class:`SegmentationOutput`;
  ``stages=True`` also fills its ``stages`` list (PLOP's POD distils it) and
  changes nothing else.
- ``class_vectors()`` returns the stacked class vectors (C, D) the orthogonal
  objective acts on.
- ``transfer_background_to_new_classes(balanced=False)`` initialises the last
  step's class vectors as copies of the background's (MBS, spec section 2a);
  ``balanced=True`` is MiB's "init_balanced" (BASELINES_SPEC 1.4).
- ``parameter_groups()`` splits parameters into backbone and head, so the
  optimiser can give them different learning rates if a config asks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass
class SegmentationOutput:
    """What a forward pass returns.

    logits:          (B, C, H, W) class scores upsampled to the input size.
    logits_lowres:   (B, C, h, w) the same scores at feature resolution.
    features:        (B, D, h, w) the features the classifier reads (AFD acts on these).
    class_embeddings: (B, C, D) decoder outputs of the class tokens (Transformer only;
                      None for DeepLab). The spec's extra MSE term acts on the old rows.
    stages:          intermediate backbone maps, only when ``forward(..., stages=True)``
                     (None otherwise), shallow to deep. DeepLab: the 4 ResNet stages'
                     pre-activation residual sums (B, D_k, h_k, w_k); Segmenter: patch-token
                     maps (B, E, h, w) of up to 4 encoder blocks, before the final norm.
                     See each model's ``forward``.
    """

    logits: torch.Tensor
    logits_lowres: torch.Tensor
    features: torch.Tensor
    class_embeddings: Optional[torch.Tensor] = None
    stages: Optional[list] = None


class IncrementalSegmenter(nn.Module):
    """Base class: keeps the per-step class counts; subclasses build the network."""

    # Convolutional networks run faster on GPUs with NHWC tensors (torch.channels_last).
    prefers_channels_last = False

    def __init__(self, classes_per_step: list[int]):
        super().__init__()
        if not classes_per_step or any(int(n) < 1 for n in classes_per_step):
            raise ValueError(f"classes_per_step must be positive counts, got {classes_per_step}")
        self.classes_per_step = [int(n) for n in classes_per_step]

    @property
    def num_classes(self) -> int:
        return sum(self.classes_per_step)

    def forward(self, images: torch.Tensor, stages: bool = False) -> SegmentationOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def class_vectors(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def transfer_background_to_new_classes(self, balanced: bool = False) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:  # pragma: no cover - abstract
        raise NotImplementedError
