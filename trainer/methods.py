"""Incremental-learning methods: what a step's loss is made of.

A method is a small object the trainer calls once per batch. It receives the
batch, the current model's output and (from step 1 on) the frozen old model's
output, and returns its loss terms by name, already weighted; the trainer sums
them and logs each one.

One class (:class:`IncrementalMethod`) serves every method: its switches pick,
for each MBS component, the MBS version, the reference baseline's counterpart,
or nothing (``finetune`` is cross-entropy alone):

=================  ===========================  ==============================
component          on (MBS)                     off (baseline)
=================  ===========================  ==============================
weight_transfer    new vectors = background's   random init
selective_pl       object identifier -> ignore  plain pseudo-labels (step 1 of b)
afd                background-weighted MSE      unweighted feature MSE
lgkd               label-guided distillation    plain KD over the old channels
ortho              orthogonal objective         none
=================  ===========================  ==============================

``pseudo_labels``, ``feature_distill`` and ``output_distill`` switch a whole
family off (e.g. no feature distillation at all).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F

import losses
from utils.ignore import IGNORE_INDEX
from models.base import IncrementalSegmenter, SegmentationOutput

PRESETS = {
    "mbs": dict(weight_transfer=True, pseudo_labels=True, selective_pl=True, feature_distill=True, afd=True,
                output_distill=True, lgkd=True, ortho=True),
    "baseline": dict(weight_transfer=True, pseudo_labels=True, selective_pl=False, feature_distill=True, afd=False,
                     output_distill=True, lgkd=False, ortho=False),
    "finetune": dict(weight_transfer=False, pseudo_labels=False, selective_pl=False, feature_distill=False,
                     afd=False, output_distill=False, lgkd=False, ortho=False),
}


@dataclass(frozen=True)
class MethodSwitches:
    """The resolved components of a method (every switch a bool)."""

    name: str
    weight_transfer: bool
    pseudo_labels: bool
    selective_pl: bool
    feature_distill: bool
    afd: bool
    output_distill: bool
    lgkd: bool
    ortho: bool
    pseudo_threshold: float
    output_distill_weight: float
    feature_distill_weight: float
    ortho_weight: float
    class_embedding_distill_weight: float

    @property
    def uses_old_model(self) -> bool:
        return self.pseudo_labels or self.feature_distill or self.output_distill

    def describe(self) -> str:
        on = [f.name for f in fields(self) if isinstance(getattr(self, f.name), bool) and getattr(self, f.name)]
        return f"{self.name} ({', '.join(on) or 'cross-entropy only'})"


def resolve_switches(method_cfg) -> MethodSwitches:
    """Fill the switches left at null from the preset of ``method_cfg.name``."""
    preset = PRESETS[method_cfg.name]
    values = {key: (preset[key] if getattr(method_cfg, key) is None else bool(getattr(method_cfg, key)))
              for key in preset}
    return MethodSwitches(
        name=method_cfg.name, **values,
        pseudo_threshold=method_cfg.pseudo_threshold,
        output_distill_weight=method_cfg.output_distill_weight,
        feature_distill_weight=method_cfg.feature_distill_weight,
        ortho_weight=method_cfg.ortho_weight,
        class_embedding_distill_weight=method_cfg.class_embedding_distill_weight,
    )


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) labels -> (B, h, w) by nearest neighbour (no new label values appear)."""
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


class IncrementalMethod:
    """Cross-entropy plus, from step 1 on, the switched-on MBS/baseline terms."""

    def __init__(self, switches: MethodSwitches, num_old: int, num_classes: int):
        self.switches = switches
        self.num_old = num_old          # channels learned before this step (0 at step 0)
        self.num_classes = num_classes  # channels after this step

    @property
    def incremental(self) -> bool:
        return self.num_old > 0

    @property
    def needs_old_model(self) -> bool:
        return self.incremental and self.switches.uses_old_model

    def prepare_model(self, model: IncrementalSegmenter) -> None:
        """Called once when a step starts, after the old weights are loaded."""
        if self.incremental and self.switches.weight_transfer:
            model.transfer_background_to_new_classes()

    def training_labels(self, labels: torch.Tensor, old_probs: Optional[torch.Tensor]) -> torch.Tensor:
        """The cross-entropy targets: ``labels``, pseudo-labelled from ``old_probs`` (softmax of the old
        model's logits at label resolution, None without an old model) when the method says so."""
        switches = self.switches
        if old_probs is None or not switches.pseudo_labels:
            return labels
        if switches.selective_pl:
            return losses.selective_pseudo_labels_from_probs(labels, old_probs, switches.pseudo_threshold,
                                                             IGNORE_INDEX)
        return losses.pseudo_labels_from_probs(labels, old_probs, switches.pseudo_threshold)

    def losses(self, labels: torch.Tensor, new: SegmentationOutput, old: Optional[SegmentationOutput],
               model: IncrementalSegmenter) -> dict[str, torch.Tensor]:
        """Weighted loss terms for one batch.

        labels: (B, H, W) the step's labels (old/future classes already 0).
        new, old: outputs of the current and the frozen old model (old is None at step 0
        or when the method needs no old model).
        """
        switches = self.switches
        # One softmax of the old logits (pseudo-labels, output distillation) and one log-softmax of the new
        # logits (cross-entropy, label-guided distillation) per batch; nll_loss of the log-softmax is exactly
        # F.cross_entropy of the logits.
        reads_old_probs = old is not None and (switches.pseudo_labels or switches.output_distill)
        old_probs = losses.old_probabilities(old.logits) if reads_old_probs else None
        log_probs = losses.log_probabilities(new.logits)
        targets = self.training_labels(labels, old_probs)
        terms = {"ce": F.nll_loss(log_probs, targets, ignore_index=IGNORE_INDEX)}
        if not self.incremental:
            return terms
        if old is not None and switches.feature_distill:
            if switches.afd:
                low_labels = resize_labels(targets, tuple(new.features.shape[-2:]))
                weight = losses.afd_weight_map(old.logits_lowres, low_labels, self.num_old, IGNORE_INDEX)
                feature_term = losses.adaptive_feature_distillation(new.features, old.features, weight)
            else:
                feature_term = losses.feature_distillation(new.features, old.features)
            terms["feature_distill"] = switches.feature_distill_weight * feature_term
            if new.class_embeddings is not None and old.class_embeddings is not None:
                # Transformer: the reference also keeps the old class tokens' decoder outputs in place.
                terms["class_embedding_distill"] = switches.class_embedding_distill_weight * F.mse_loss(
                    new.class_embeddings[:, : self.num_old].float(), old.class_embeddings.float().detach())
        if old is not None and switches.output_distill:
            if switches.lgkd:
                output_term = losses.label_guided_distillation_from_probs(log_probs, old_probs, labels, IGNORE_INDEX)
            else:
                output_term = losses.knowledge_distillation_from_probs(new.logits, old_probs)
            terms["output_distill"] = switches.output_distill_weight * output_term
        if switches.ortho:
            new_share = (self.num_classes - self.num_old) / self.num_classes
            terms["ortho"] = switches.ortho_weight * new_share * losses.orthogonal_loss(model.class_vectors(),
                                                                                        self.num_old)
        return terms


def build_method(method_cfg, num_old: int, num_classes: int) -> IncrementalMethod:
    return IncrementalMethod(resolve_switches(method_cfg), num_old, num_classes)
