"""Joint image/label transform presets (torchvision ``transforms.v2`` with ``tv_tensors``).

Training (spec section 4): short side resized to ``base_size * s`` with
``s ~ U(scale_range)``, random ``crop_size`` crop, horizontal flip. Evaluation:
short side to ``base_size`` and a centre crop (the reference), or the full image.

Samples stay uint8 on the host (a uint8 image is a quarter of the bytes of a float
one to collate, pin and copy); :func:`normalize_on_device` turns a batch into the
model's float input after it has been moved to the device.

Images are resized bilinearly (half-pixel centres) and masks nearest-exact, so a label
pixel takes the source label under its centre, the very point the image pixel is
sampled around (torch's plain ``nearest``, v2's default for masks, takes the pixel
under its top-left corner: up to one source pixel off the image).

A scaled image smaller than the crop is padded in one of two ways (``crop_padding``):
``ignore`` pads only what the crop needs, image 0 and label 255 (MiB, PLOP);
``reference`` pads like the MBS reference, every side by ``(1 + crop - side) // 2``
(for the width first, then for the height of the widened image), image 0 and label
0, so the padding is learnt as background.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from .labels import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_PADDINGS = ("ignore", "reference")


class ResizeAligned(v2.Resize):
    """``v2.Resize`` (bilinear images) with masks nearest-exact, aligned to the image, not v2's ``nearest``."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return F.resize(inpt, self.size, interpolation=InterpolationMode.NEAREST_EXACT)
        return super().transform(inpt, params)


def reference_padding(height: int, width: int, crop_size: int) -> int:
    """What the MBS reference pads on *every* side of a ``height x width`` image before a
    ``crop_size`` crop: ``(1 + crop - width) // 2`` when the width is short, then
    ``(1 + crop - height') // 2`` when the height ``height'`` of the widened image is short."""
    pad = (1 + crop_size - width) // 2 if width < crop_size else 0
    taller = height + 2 * pad
    return pad + ((1 + crop_size - taller) // 2 if taller < crop_size else 0)


def short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """(height, width) with the short side resized to ``short`` (torchvision's rule: the long side truncated)."""
    if width <= height:
        return int(short * height / width), short
    return short, int(short * width / height)


@functools.lru_cache(maxsize=1024)
def _nearest_exact_source(source_size: int, target_size: int) -> np.ndarray:
    """Read off torchvision's own nearest-exact resize of the indices ``0 .. source_size - 1`` (cached:
    the same sizes come back again and again)."""
    indices = torch.arange(source_size, dtype=torch.float32).view(1, source_size, 1)
    resized = F.resize(indices, [target_size, 1], interpolation=InterpolationMode.NEAREST_EXACT)
    source = resized[0, :, 0].to(torch.int64).numpy()
    source.flags.writeable = False
    return source


def crop_of_resized_mask(mask: np.ndarray, size: list[int], top: int, left: int, crop_size: int,
                         fill: int) -> np.ndarray:
    """The ``crop_size`` crop at ``(top, left)`` of ``mask`` resized nearest-exact to ``size``, ``fill`` where
    it lies outside: only the crop is computed, gathered from the source, bit for bit what
    ``F.resize(mask, size, interpolation=NEAREST_EXACT)`` then a padded crop give. (numpy: torch's uint8
    gather along the last dimension is ten times slower.)"""
    (r0, r1), (c0, c1) = [(max(0, -start), min(crop_size, extent - start))
                          for start, extent in ((top, size[0]), (left, size[1]))]
    crop_shape = mask.shape[:-2] + (crop_size, crop_size)
    if r0 >= r1 or c0 >= c1:
        return np.full(crop_shape, fill, dtype=mask.dtype)
    rows = _nearest_exact_source(mask.shape[-2], size[0])[top + r0:top + r1]
    columns = _nearest_exact_source(mask.shape[-1], size[1])[left + c0:left + c1]
    # columns first: the rows are then whole-row copies and the result is C-ordered (rows first gives
    # a column-major array, whose copy to C order costs twice the gather)
    inside = mask[..., columns][..., rows, :]
    if inside.shape == crop_shape:
        return inside
    crop = np.full(crop_shape, fill, dtype=mask.dtype)
    crop[..., r0:r1, c0:c1] = inside
    return crop


class RandomScaleCrop(v2.Transform):
    """A random short-side resize to ``[min_size, max_size)`` followed by a random ``crop_size`` crop of
    the image padded as ``padding`` says (module docstring); the same draws and the same output as
    ``v2.RandomResize`` (masks nearest-exact), padding and ``v2.RandomCrop`` one after the other.

    Only the crop of the mask is computed, gathered from the source mask (a nearest-exact resize
    of a whole mask scaled 2x costs more than decoding its JPEG); the image is resized whole
    (torchvision's uint8 bilinear kernel) and cropped, its padding 0.
    """

    def __init__(self, min_size: int, max_size: int, crop_size: int, padding: str = "ignore",
                 antialias: bool = True):
        super().__init__()
        if padding not in CROP_PADDINGS:
            raise ValueError(f"unknown crop padding {padding!r}; use one of {', '.join(CROP_PADDINGS)}")
        self.min_size, self.max_size, self.crop_size = min_size, max_size, crop_size
        self.padding, self.antialias = padding, antialias
        self.mask_fill = IGNORE_INDEX if padding == "ignore" else 0

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        size = short_side_size(height, width, int(torch.randint(self.min_size, self.max_size, ())))
        if self.padding == "ignore":  # v2.RandomCrop(pad_if_needed=True): the shortfall on both sides
            pads = [max(self.crop_size - side, 0) for side in size]
        else:
            pads = [reference_padding(*size, self.crop_size)] * 2
        # v2.RandomCrop's draws: the top offset, then the left one, each only if there is a choice
        offsets = [int(torch.randint(0, side + 2 * pad - self.crop_size + 1, ())) - pad
                   if side + 2 * pad > self.crop_size else -pad for side, pad in zip(size, pads)]
        return dict(size=list(size), top=offsets[0], left=offsets[1])

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        top, left, size, side = params["top"], params["left"], params["size"], self.crop_size
        if isinstance(inpt, tv_tensors.Mask):
            crop = crop_of_resized_mask(inpt.as_subclass(torch.Tensor).numpy(), size, top, left, side, self.mask_fill)
            return tv_tensors.wrap(torch.from_numpy(crop), like=inpt)
        resized = self._call_kernel(F.resize, inpt, size, interpolation=InterpolationMode.BILINEAR,
                                    antialias=self.antialias)
        # out of bounds, F.crop pads with 0: the image padding of both modes
        return self._call_kernel(F.crop, resized, top=top, left=left, height=side, width=side)


def train_transforms(base_size: int, crop_size: int, scale_range: tuple[float, float],
                     padding: str = "ignore") -> v2.Compose:
    """uint8 image and mask in, uint8 ``crop_size`` crops out."""
    low, high = scale_range
    return v2.Compose([
        # the short side is drawn uniformly from [min_size, max_size)
        RandomScaleCrop(max(1, round(base_size * low)), round(base_size * high) + 1, crop_size, padding),
        v2.RandomHorizontalFlip(),
    ])


def eval_transforms(mode: str, base_size: int, crop_size: int) -> v2.Transform:
    """uint8 in, uint8 out."""
    if mode == "center_crop":
        return v2.Compose([ResizeAligned(base_size), v2.CenterCrop(crop_size)])
    if mode == "full":
        return v2.Identity()
    raise ValueError(f"unknown evaluation mode {mode!r}; use center_crop or full")


def eval_transforms_for(data_cfg) -> v2.Transform:
    """The evaluation transforms of a run (``data_cfg``: the config's ``data`` section); the test, the
    validation during a step and the qualitative figure all read the validation images through these."""
    return eval_transforms(data_cfg.eval_mode, data_cfg.base_size, data_cfg.crop_size)


@functools.lru_cache(maxsize=None)
def normalisation_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as (1, 3, 1, 1) float32 tensors on ``device``, built once per device. torchvision's
    ``normalize`` builds them from the Python tuples at every call: on CUDA two blocking host-to-device copies
    per batch, each a host-device synchronisation."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return mean.to(device), std.to(device)


def normalize_on_device(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 images -> float32 ImageNet-normalised model input, on their device; bit for bit what
    torchvision's ``to_dtype(scale=True)`` then ``normalize`` give, without copying anything from the host."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    mean, std = normalisation_constants(images.device)
    # in place on the new float tensor: on CPU a second image-sized allocation cost more than the arithmetic
    return F.to_dtype(images, torch.float32, scale=True).sub_(mean).div_(std)


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) normalised images -> [0, 1] for display."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)
