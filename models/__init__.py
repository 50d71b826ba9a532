"""Segmenters with per-step classifiers: DeepLab-V3 (ResNet) and Segmenter (ViT)."""
from __future__ import annotations

from .base import IncrementalSegmenter, SegmentationOutput


def build_model(cfg, classes_per_step: list[int], image_size: int = 512) -> IncrementalSegmenter:
    """Build the architecture named by ``cfg`` (a ``utils.config.ModelConfig``)."""
    if cfg.architecture == "deeplabv3":
        from .deeplab import DeepLabV3
        return DeepLabV3(classes_per_step, cfg.backbone, cfg.pretrained, cfg.output_stride, cfg.head_channels)
    if cfg.architecture == "segmenter":
        from .segmenter import Segmenter
        return Segmenter(classes_per_step, backbone=cfg.backbone, pretrained=cfg.pretrained, image_size=image_size,
                         decoder_layers=cfg.decoder_layers, decoder_heads=cfg.decoder_heads,
                         decoder_dim=cfg.decoder_dim, encoder_dropout=cfg.encoder_dropout,
                         encoder_drop_path_rate=cfg.encoder_drop_path_rate, decoder_dropout=cfg.decoder_dropout,
                         decoder_drop_path_rate=cfg.decoder_drop_path_rate, layer_norm_eps=cfg.layer_norm_eps,
                         pos_embed_interpolation=cfg.pos_embed_interpolation,
                         backbone_overrides=cfg.backbone_overrides)
    raise ValueError(f"unknown model.architecture {cfg.architecture!r}; known: deeplabv3, segmenter")


__all__ = ["IncrementalSegmenter", "SegmentationOutput", "build_model"]
