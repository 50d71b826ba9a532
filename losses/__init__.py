"""Loss terms of MBS and its baseline (see losses/mbs.py)."""

from .mbs import (adaptive_feature_distillation, afd_weight_map, feature_distillation, knowledge_distillation,
                  label_guided_distillation, orthogonal_loss, pseudo_labels, selective_pseudo_labels)

__all__ = [
    "pseudo_labels",
    "selective_pseudo_labels",
    "afd_weight_map",
    "adaptive_feature_distillation",
    "feature_distillation",
    "label_guided_distillation",
    "knowledge_distillation",
    "orthogonal_loss",
]
