"""Will a training batch fit the GPU? An estimate of the peak memory per GPU from the fake-tensor measurements of
``benchmarks/memory.py`` (``benchmarks/RESULTS.md``, "Peak GPU memory"), so that a batch too large for the card is
refused in one line at the start instead of an out-of-memory error in the middle of a step.

The peak of live tensors of an incremental step (old model included) grows linearly with the images per GPU:
``fixed + per_image x images x (crop / 512)^2``. The table holds both parts for the published recipes' models
(DeepLab-V3 ResNet-101 at output stride 16, Segmenter ViT-B/16) per dataset (its number of classes) and precision
(bf16 and fp16 take the same memory). Other models are not estimated. CUDA's own memory (context, cuDNN workspaces, DDP
buckets, fragmentation) comes on top: ``CUDA_OVERHEAD_GIB`` is a lower bound of it.
"""
from __future__ import annotations

from typing import Optional

from utils.config import Config, ConfigError

REFERENCE_CROP = 512
# (architecture, backbone family, dataset, "half" | "fp32") -> (fixed GiB, GiB per image at 512 px), fitted by
# benchmarks/memory.py from two batch sizes of VOC 15-1 / ADE 100-50 step 1 (fake tensors, CPU autocast).
PEAK_MEMORY_GIB: dict[tuple[str, str, str, str], tuple[float, float]] = {
    ("deeplabv3", "resnet101", "voc", "half"): (0.783, 0.4328),
    ("deeplabv3", "resnet101", "voc", "fp32"): (0.772, 0.7892),
    ("deeplabv3", "resnet101", "ade", "half"): (0.655, 1.0689),
    ("deeplabv3", "resnet101", "ade", "fp32"): (0.658, 1.5322),
    ("segmenter", "vit_base_patch16", "voc", "half"): (1.714, 0.4778),
    ("segmenter", "vit_base_patch16", "voc", "fp32"): (1.526, 0.7762),
    ("segmenter", "vit_base_patch16", "ade", "half"): (1.333, 1.2390),
    ("segmenter", "vit_base_patch16", "ade", "fp32"): (1.145, 1.5440),
}
# What CUDA itself takes besides the tensors, at least (context ~0.5 GiB, cuDNN/cuBLAS workspaces, allocator slack).
CUDA_OVERHEAD_GIB = 1.5


def memory_key(architecture: str, backbone: str, dataset: str, precision: str) -> tuple[str, str, str, str]:
    """The table key of a model, dataset and precision (bf16 or fp16: "half"; fp32)."""
    family = "vit_base_patch16" if backbone.startswith("vit_base_patch16") else backbone
    return architecture, family, dataset, "fp32" if precision == "fp32" else "half"


def estimated_peak_gib(cfg: Config, images_per_gpu: int, precision: str) -> Optional[float]:
    """The estimated peak of live tensors per GPU (GiB) of the run's incremental steps, or None for a model the
    table does not cover (other backbones, DeepLab at output stride 8, backbone overrides)."""
    model = cfg.model
    if model.backbone_overrides or (model.architecture == "deeplabv3" and model.output_stride != 16):
        return None
    entry = PEAK_MEMORY_GIB.get(memory_key(model.architecture, model.backbone, cfg.data.dataset, precision))
    if entry is None:
        return None
    fixed, per_image = entry
    return fixed + per_image * images_per_gpu * (cfg.data.crop_size / REFERENCE_CROP) ** 2


def check_batch_fits(cfg: Config, images_per_gpu: int, precision: str, device_name: str, total_gib: float) -> None:
    """Refuse (ConfigError) a per-GPU batch whose estimated peak plus CUDA's overhead exceeds the card's memory."""
    peak = estimated_peak_gib(cfg, images_per_gpu, precision)
    if peak is None or peak + CUDA_OVERHEAD_GIB <= total_gib:
        return
    fixed, per_image = PEAK_MEMORY_GIB[memory_key(cfg.model.architecture, cfg.model.backbone, cfg.data.dataset,
                                                  precision)]
    room = int((total_gib - CUDA_OVERHEAD_GIB - fixed) / (per_image * (cfg.data.crop_size / REFERENCE_CROP) ** 2))
    raise ConfigError(
        f"train.batch_size={cfg.train.batch_size} puts {images_per_gpu} images on each GPU, and {device_name} has "
        f"{total_gib:.1f} GiB: a {cfg.model.architecture} {cfg.model.backbone} step of {cfg.data.dataset} at "
        f"{cfg.data.crop_size} px in {precision} needs about {peak:.1f} GiB of tensors plus at least "
        f"{CUDA_OVERHEAD_GIB} GiB for CUDA (estimate: benchmarks/RESULTS.md); about {max(room, 0)} images fit per "
        "GPU: train on more GPUs (the batch is split over them) or on GPUs with more memory")
