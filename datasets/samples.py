"""How one sample (image + label) is read: the training loader (:mod:`datasets.incremental`) and the data
preflight (:mod:`datasets.class_lists`) both call :func:`read_sample`, so a file the preflight passes is a file
training can read.

The image goes through torchvision's decoder, which knows a file by its content (JPEG, PNG, WebP, GIF), not by
its name: a BMP named ``.jpg`` does not decode, though Pillow would open it. It must give 8 bits per channel
(a 16-bit PNG decodes to uint16, which the uint8 pipeline cannot take). The label goes through Pillow, which
gives a palette PNG's indices at every bit depth (torchvision's decode_png misreads palettes of fewer than
8 bits); it must be a PNG of one channel of class indices (mode L or P) of its image's size.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

# What a decoder raises on a file it cannot read (torchvision: RuntimeError; Pillow: OSError, SyntaxError, ...)
_UNREADABLE = (OSError, SyntaxError, ValueError, RuntimeError, Image.DecompressionBombError)
_CPP_LOCATION = re.compile(r"^\w+, \S+\.cpp:\d+, ")  # torchvision's "decode_jpeg, /x/decode_jpeg.cpp:171, "


class BadSample(Exception):
    """Why one sample cannot be used: "<path>: <problem>" (the preflight collects them instead of stopping)."""


def _reason(err: Exception) -> str:
    return _CPP_LOCATION.sub("", " ".join(str(err).split()))


def _unreadable(path: Path, what: str, err: Exception) -> BadSample:
    if not path.is_file():  # looked at only on failure: the loader does not pay a stat per sample
        return BadSample(f"{path}: {what} file is missing")
    return BadSample(f"{path}: {what} does not decode ({_reason(err)})")


def read_image(path: Path) -> torch.Tensor:
    """The image as a (3, H, W) uint8 tensor (RGB, laid out channels-last as decoded), or :class:`BadSample`."""
    # torchvision (and torch with it) is imported here, not with the module: the class-list tools
    # (python -m datasets.splits) import this module and never decode an image.
    import torch
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        # torchvision's decoder (libjpeg-turbo like Pillow's: the same pixels, a quarter faster) returns
        # (3, H, W) laid out channels-last, the layout its uint8 bilinear resize is fastest on. (0.29
        # deprecates it in favour of TorchCodec; requirements.txt pins torchvision 0.29.1.)
        image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
    except _UNREADABLE as err:
        raise _unreadable(path, "image", err) from None
    if image.dtype != torch.uint8:
        bits = image.element_size() * 8
        raise BadSample(f"{path}: image has {bits} bits per channel ({str(image.dtype).removeprefix('torch.')}), "
                        "expected 8")
    return image


def read_label(path: Path) -> np.ndarray:
    """The label as an (H, W) array of class indices, or :class:`BadSample`."""
    try:
        with Image.open(path) as label:
            if label.format != "PNG":
                raise BadSample(f"{path}: label is not a PNG (it is {label.format or 'of unknown format'})")
            if label.mode not in ("L", "P"):
                raise BadSample(f"{path}: label has mode {label.mode} ({len(label.getbands())} channels), "
                                "expected one channel of class indices (mode L or P)")
            return np.array(label)
    except _UNREADABLE as err:
        raise _unreadable(path, "label", err) from None


def read_sample(image_path: Path, label_path: Path) -> tuple[torch.Tensor, np.ndarray]:
    """One sample as training reads it: ``(image (3, H, W) uint8 tensor, label (H, W) array)``, or
    :class:`BadSample` saying which file is wrong and how."""
    image = read_image(image_path)
    label = read_label(label_path)
    height, width = image.shape[1:]
    if label.shape != (height, width):
        raise BadSample(f"{label_path}: label is {label.shape[1]}x{label.shape[0]}, its image "
                        f"{image_path.name} is {width}x{height}")
    return image, label
