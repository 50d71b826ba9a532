"""DeepLab-V3 with one 1x1 classifier per step (spec section 3).

ResNet trunk at output stride 16 (or 8), torchvision's ASPP (rates 6/12/18 at
OS 16, doubled at OS 8, with image pooling), a 3x3 conv to ``head_channels``,
then per-step 1x1 classifiers whose outputs are concatenated. The classifier
input (the 3x3 conv output) is the feature map AFD distils; the classifier
rows are the class vectors the orthogonal objective acts on.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from .backbones import ResNetBackbone
from .base import IncrementalSegmenter, SegmentationOutput


class DeepLabV3(IncrementalSegmenter):
    prefers_channels_last = True

    def __init__(self, classes_per_step: list[int], backbone: str = "resnet101", pretrained: str = "imagenet",
                 output_stride: int = 16, head_channels: int = 256):
        super().__init__(classes_per_step)
        self.backbone = ResNetBackbone(backbone, pretrained, output_stride)
        rates = [6, 12, 18] if output_stride == 16 else [12, 24, 36]
        self.aspp = ASPP(self.backbone.out_channels, rates, head_channels)
        self.head = nn.Sequential(
            nn.Conv2d(head_channels, head_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(head_channels),
            nn.ReLU(inplace=True),
        )
        self.classifiers = nn.ModuleList(nn.Conv2d(head_channels, n, 1) for n in self.classes_per_step)

    def forward(self, images: torch.Tensor, stages: bool = False) -> SegmentationOutput:
        """images (B, 3, H, W) -> logits (B, C, H, W), logits_lowres and features at the output stride.
        ``stages=True`` adds the 4 ResNet stages' pre-activation maps (ResNetBackbone.forward_with_stages;
        PLOP's ``attentions``, BASELINES_SPEC 2.1); every other output is bit-identical either way."""
        if stages:
            trunk, stage_maps = self.backbone.forward_with_stages(images)
        else:
            trunk, stage_maps = self.backbone(images), None
        features = self.head(self.aspp(trunk))
        logits_lowres = torch.cat([classifier(features) for classifier in self.classifiers], dim=1)
        logits = F.interpolate(logits_lowres, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return SegmentationOutput(logits=logits, logits_lowres=logits_lowres, features=features, stages=stage_maps)

    def class_vectors(self) -> torch.Tensor:
        """(C, D): the rows of the concatenated 1x1 classifier weights."""
        return torch.cat([classifier.weight.flatten(1) for classifier in self.classifiers], dim=0)

    @torch.no_grad()
    def transfer_background_to_new_classes(self, balanced: bool = False) -> None:
        """Spec 2(a): every class of the last step starts as a copy of background's weight and bias.

        ``balanced=True`` is MiB's "init_balanced" (BASELINES_SPEC 1.4): with ``s = log(C_new + 1)``, the
        new rows take background's weight and the bias ``b_0 - s``, and background's own bias becomes
        ``b_0 - s`` too (its weight and the other old rows are unchanged). At every pixel the C_new + 1 equal
        terms ``exp(w_0 . f + b_0 - s)`` then sum to the old ``exp(w_0 . f + b_0)``, so right after the transfer
        every old non-background class keeps the old model's probability and background plus the new classes
        share the old background probability."""
        if len(self.classifiers) < 2:
            raise RuntimeError("background transfer needs a model with at least one incremental step")
        background, new = self.classifiers[0], self.classifiers[-1]
        new.weight.copy_(background.weight[:1].expand_as(new.weight))
        if not balanced:
            new.bias.copy_(background.bias[:1].expand_as(new.bias))
            return
        shift = math.log(new.out_channels + 1)
        new.bias.copy_((background.bias[:1] - shift).expand_as(new.bias))
        background.bias[:1] -= shift

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "backbone": list(self.backbone.parameters()),
            "head": [*self.aspp.parameters(), *self.head.parameters(), *self.classifiers.parameters()],
        }
