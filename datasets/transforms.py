"""Joint image/label transform presets (torchvision ``transforms.v2`` with ``tv_tensors``).

Training (spec section 4): short side resized to ``base_size * s`` with
``s ~ U(scale_range)``, random ``crop_size`` crop (image padded with 0, label
with 255), horizontal flip, ImageNet normalisation. Evaluation: short side to
``base_size`` and a centre crop (the reference), or the full image.
"""
from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from .labels import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_model_input() -> list:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]


def train_transforms(base_size: int, crop_size: int, scale_range: tuple[float, float]) -> v2.Compose:
    low, high = scale_range
    return v2.Compose([
        # RandomResize draws the short side uniformly from [min_size, max_size).
        v2.RandomResize(max(1, round(base_size * low)), round(base_size * high) + 1),
        v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
        v2.RandomHorizontalFlip(),
        *_to_model_input(),
    ])


def eval_transforms(mode: str, base_size: int, crop_size: int) -> v2.Compose:
    if mode == "center_crop":
        return v2.Compose([v2.Resize(base_size), v2.CenterCrop(crop_size), *_to_model_input()])
    if mode == "full":
        return v2.Compose(_to_model_input())
    raise ValueError(f"unknown evaluation mode {mode!r}; use center_crop or full")


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised images -> [0, 1] for display."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)
