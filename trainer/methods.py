"""Incremental-learning methods: what a step's loss is made of.

A method is a small object the trainer calls once per batch. It receives the
batch, the current model's output and (from step 1 on) the frozen old model's
output, and returns its loss terms by name, already weighted; the trainer sums
them and logs each one.

One class (:class:`IncrementalMethod`) serves every method. Its switches pick,
for each family of components, a variant or nothing; the presets
(``method.name``, the table lives in :mod:`utils.presets`) set them, and a
switch set in the config overrides its preset:

==================  ==========================================  =========================  ===  ====  ==  ===  ====
switch              on                                          off                        mbs  base  ft  mib  plop
==================  ==========================================  =========================  ===  ====  ==  ===  ====
weight_transfer     (a) new vectors = background's              random init                on   on    -   on   on
balanced_init       (a) ... and biases lowered by log(C_new+1)  a plain copy               -    -     -   on   on
unbiased_ce         CE: old classes folded into background      plain cross-entropy        -    -     -   on   -
ce_all_pixels       CE: sum / all B*H*W pixels, every step      mean over labelled pixels  -    -     -   on   on
pseudo_labels       (b) pseudo-label old pixels at all          none                       on   on    -   -    on
selective_pl        (b) object identifier -> ignore             plain (confidence tau)     on   -     -   -    -
entropy_pl          (b) PLOP's per-class entropy thresholds     plain (confidence tau)     -    -     -   -    on
adaptive_ce_factor  (b) CE x the image's confident old share    none                       -    -     -   -    on
feature_distill     (c) distil features at all                  none                       on   on    -   -    on
afd                 (c) background-weighted feature MSE         unweighted feature MSE     on   -     -   -    -
pod                 (c) Local POD: stages, features, logits     unweighted feature MSE     -    -     -   -    on
output_distill      (d) distil outputs at all                   none                       on   on    -   on   -
lgkd                (d) label-guided distillation               plain KD, old channels     on   -     -   -    -
unkd                (d) MiB's unbiased KD                       plain KD, old channels     -    -     -   on   -
ortho               (e) orthogonal objective                    none                       on   -     -   -    -
==================  ==========================================  =========================  ===  ====  ==  ===  ====

(base = baseline, the reference's non-MBS variant; ft = finetune, cross-entropy alone.) Two variants of one
family cannot both be on (selective_pl / entropy_pl, afd / pod, lgkd / unkd), balanced_init needs
weight_transfer and adaptive_ce_factor entropy_pl: the config refuses such a combination when it is loaded.

Weights resolved from the preset and ``data.dataset`` when left at null: ``output_distill_weight`` (lambda)
25 VOC / 50 ADE for mbs and baseline, 10 for mib (MiB's code has no other value); ``pod_factor`` 0.01 VOC /
0.001 ADE and ``pod_logits_factor`` 0.0005 / 0.00001 (PLOP's). ``feature_distill_weight`` multiplies L_pod.

PLOP's thresholds: before the first iteration of a step >= 1, the trainer runs the frozen old model once over
the step's epoch-0 batches (``needs_step_statistics``, ``step_statistics_batch``, ``finish_step_statistics``);
the thresholds are the method's state (``state_dict``), saved in the in-step checkpoint, so a resumed step
never repeats the pass. Its histogram is summed over processes (PLOP's code keeps one per process).

MiB's and PLOP's step 0 is cross-entropy averaged over all pixels (``ce_all_pixels``), MBS's over the labelled
ones: the two families train different steps 0. On the Segmenter, the class-embedding MSE belongs to the MBS
reference's feature distillation (afd or the plain MSE), not to POD.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import losses
from models.base import IncrementalSegmenter, SegmentationOutput
from utils.ignore import IGNORE_INDEX
from utils.presets import method_contradiction, resolve_method

ENTROPY_BINS = 100  # PLOP's histogram bins (pseudo_nb_bins unset, spec 2 "Other defaults")


@dataclass(frozen=True)
class MethodSwitches:
    """The resolved components of a method (every switch a bool, every weight a number)."""

    name: str
    weight_transfer: bool
    pseudo_labels: bool
    selective_pl: bool
    feature_distill: bool
    afd: bool
    output_distill: bool
    lgkd: bool
    ortho: bool
    balanced_init: bool
    unbiased_ce: bool
    ce_all_pixels: bool
    entropy_pl: bool
    adaptive_ce_factor: bool
    pod: bool
    unkd: bool
    pseudo_threshold: float
    output_distill_weight: float
    feature_distill_weight: float
    ortho_weight: float
    class_embedding_distill_weight: float
    pod_factor: float
    pod_logits_factor: float
    entropy_threshold: float

    @property
    def uses_old_model(self) -> bool:
        return self.pseudo_labels or self.feature_distill or self.output_distill

    def describe(self) -> str:
        on = [f.name for f in fields(self) if isinstance(getattr(self, f.name), bool) and getattr(self, f.name)]
        return f"{self.name} ({', '.join(on) or 'cross-entropy only'})"


def resolve_switches(method_cfg, dataset: str) -> MethodSwitches:
    """Fill the switches and weights left at null from the preset of ``method_cfg.name`` on ``dataset``
    (``data.dataset``; custom tasks on the synthetic data are ``voc``)."""
    contradiction = method_contradiction(method_cfg)
    if contradiction:  # a loaded config was refused already; this guards configs built in code
        raise ValueError(contradiction)
    return MethodSwitches(
        name=method_cfg.name, **resolve_method(method_cfg, dataset),
        pseudo_threshold=method_cfg.pseudo_threshold,
        feature_distill_weight=method_cfg.feature_distill_weight,
        ortho_weight=method_cfg.ortho_weight,
        class_embedding_distill_weight=method_cfg.class_embedding_distill_weight,
        entropy_threshold=method_cfg.entropy_threshold,
    )


def resize_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) labels -> (B, h, w) by nearest neighbour (no new label values appear)."""
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


class IncrementalMethod:
    """Cross-entropy plus, from step 1 on, the switched-on terms; PLOP's thresholds are its only state."""

    def __init__(self, switches: MethodSwitches, num_old: int, num_classes: int):
        self.switches = switches
        self.num_old = num_old          # channels learned before this step (0 at step 0)
        self.num_classes = num_classes  # channels after this step
        self.thresholds: Optional[torch.Tensor] = None   # PLOP's per-class entropy thresholds (C,), this step's
        self._histogram: Optional[torch.Tensor] = None   # their histogram while the pass runs

    @property
    def incremental(self) -> bool:
        return self.num_old > 0

    @property
    def needs_old_model(self) -> bool:
        return self.incremental and self.switches.uses_old_model

    @property
    def needs_stages(self) -> bool:
        """Whether both models' forwards must return their stage maps (PLOP's POD distils them)."""
        return self.needs_old_model and self.switches.feature_distill and self.switches.pod

    @property
    def needs_step_statistics(self) -> bool:
        """Whether the step needs PLOP's thresholds: one pass of the old model before training (steps >= 1)."""
        return self.needs_old_model and self.switches.pseudo_labels and self.switches.entropy_pl

    @property
    def has_step_statistics(self) -> bool:
        return self.thresholds is not None

    def prepare_model(self, model: IncrementalSegmenter) -> None:
        """Called once when a step starts, after the old weights are loaded."""
        if self.incremental and self.switches.weight_transfer:
            model.transfer_background_to_new_classes(balanced=self.switches.balanced_init)

    # ------------------------------------------------------------ PLOP's per-step pass
    def step_statistics_batch(self, labels: torch.Tensor, old_output: SegmentationOutput) -> None:
        """Add one batch (the step's labels, the old model's output) to the entropy histogram, on the device."""
        histogram = losses.entropy_histogram(losses.old_probabilities(old_output.logits), labels, self.num_classes,
                                             ENTROPY_BINS)
        self._histogram = histogram if self._histogram is None else self._histogram + histogram

    def finish_step_statistics(self, sum_over_processes: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the histogram over processes (every process then holds the same thresholds) and walk it."""
        if self._histogram is None:
            raise RuntimeError("finish_step_statistics: the pass saw no batch")
        histogram = sum_over_processes(self._histogram)
        self.thresholds = losses.thresholds_from_histogram(histogram, self.switches.entropy_threshold)
        self._histogram = None

    def state_dict(self) -> dict:
        """What the in-step checkpoint keeps of the method (plain tensors: checkpoints load with
        weights_only=True)."""
        return {} if self.thresholds is None else {"thresholds": self.thresholds.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        thresholds = state.get("thresholds")
        if thresholds is not None and (not isinstance(thresholds, torch.Tensor)
                                       or tuple(thresholds.shape) != (self.num_classes,)):
            shape = tuple(thresholds.shape) if isinstance(thresholds, torch.Tensor) else type(thresholds).__name__
            raise ValueError(f"its method state holds thresholds of shape {shape}, this step has "
                             f"{self.num_classes} classes")
        self.thresholds = thresholds

    # ------------------------------------------------------------ losses
    def training_targets(self, labels: torch.Tensor, old_probs: Optional[torch.Tensor]
                         ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The cross-entropy targets: ``labels``, pseudo-labelled from ``old_probs`` (softmax of the old
        model's logits at label resolution, None without an old model) when the method says so; and PLOP's
        per-image CE factor (B, 1, 1) with ``adaptive_ce_factor``, else None."""
        switches = self.switches
        if old_probs is None or not switches.pseudo_labels:
            return labels, None
        if switches.entropy_pl:
            if self.thresholds is None:  # the trainer runs the pass before the first iteration: a bug
                raise RuntimeError("PLOP's thresholds were never computed: run the step's statistics pass "
                                   "(trainer.engine.collect_step_statistics) before training")
            targets, factor = losses.entropy_pseudo_labels_from_probs(
                labels, old_probs, self.thresholds, self.num_old, IGNORE_INDEX, num_classes=self.num_classes)
            return targets, factor if switches.adaptive_ce_factor else None
        if switches.selective_pl:
            return losses.selective_pseudo_labels_from_probs(labels, old_probs, switches.pseudo_threshold,
                                                             IGNORE_INDEX), None
        return losses.pseudo_labels_from_probs(labels, old_probs, switches.pseudo_threshold), None

    def cross_entropy(self, log_probs: torch.Tensor, targets: torch.Tensor,
                      factor: Optional[torch.Tensor]) -> torch.Tensor:
        """The ``ce`` term from the batch's shared log-softmax of the new logits."""
        switches = self.switches
        unbiased = switches.unbiased_ce and self.incremental  # spec 1.1: plain CE while there is no old class
        if not (unbiased or switches.ce_all_pixels or factor is not None):
            # MBS: nll_loss of the log-softmax is exactly F.cross_entropy, mean over the labelled pixels
            return F.nll_loss(log_probs, targets, ignore_index=IGNORE_INDEX)
        if unbiased:
            pixel_losses = losses.unbiased_cross_entropy_from_log_probs(log_probs, targets, self.num_old,
                                                                         IGNORE_INDEX, reduction="none")
        else:
            pixel_losses = F.nll_loss(log_probs, targets, ignore_index=IGNORE_INDEX, reduction="none")
        if factor is not None:
            pixel_losses = pixel_losses * factor  # spec 2.5: the whole CE map of each image, new classes too
        if switches.ce_all_pixels:
            # spec 0: MiB's and PLOP's .mean() of the (B,H,W) map, ignored pixels counted as 0
            return pixel_losses.sum() / pixel_losses.numel()
        return pixel_losses.sum() / (targets != IGNORE_INDEX).sum()

    def losses(self, labels: torch.Tensor, new: SegmentationOutput, old: Optional[SegmentationOutput],
               model: IncrementalSegmenter) -> dict[str, torch.Tensor]:
        """Weighted loss terms for one batch.

        labels: (B, H, W) the step's labels (old/future classes already 0).
        new, old: outputs of the current and the frozen old model (old is None at step 0
        or when the method needs no old model); with POD both carry their ``stages``.
        """
        switches = self.switches
        # One softmax of the old logits (pseudo-labels, output distillation) and one log-softmax of the new
        # logits (cross-entropy, label-guided and unbiased distillation) per batch.
        reads_old_probs = old is not None and (switches.pseudo_labels or switches.output_distill)
        old_probs = losses.old_probabilities(old.logits) if reads_old_probs else None
        log_probs = losses.log_probabilities(new.logits)
        targets, ce_factor = self.training_targets(labels, old_probs)
        terms = {"ce": self.cross_entropy(log_probs, targets, ce_factor)}
        if not self.incremental:
            return terms
        if old is not None and switches.feature_distill:
            if switches.pod:
                feature_term = self.pod(new, old)
            elif switches.afd:
                low_labels = resize_labels(targets, tuple(new.features.shape[-2:]))
                weight = losses.afd_weight_map(old.logits_lowres, low_labels, self.num_old, IGNORE_INDEX)
                feature_term = losses.adaptive_feature_distillation(new.features, old.features, weight)
            else:
                feature_term = losses.feature_distillation(new.features, old.features)
            terms["feature_distill"] = switches.feature_distill_weight * feature_term
            if not switches.pod and new.class_embeddings is not None and old.class_embeddings is not None:
                # Transformer: the reference also keeps the old class tokens' decoder outputs in place.
                terms["class_embedding_distill"] = switches.class_embedding_distill_weight * F.mse_loss(
                    new.class_embeddings[:, : self.num_old].float(), old.class_embeddings.float().detach())
        if old is not None and switches.output_distill:
            if switches.lgkd:
                output_term = losses.label_guided_distillation_from_probs(log_probs, old_probs, labels, IGNORE_INDEX)
            elif switches.unkd:
                output_term = losses.unbiased_knowledge_distillation_from_probs(log_probs, old_probs)
            else:
                output_term = losses.knowledge_distillation_from_probs(new.logits, old_probs)
            terms["output_distill"] = switches.output_distill_weight * output_term
        if switches.ortho:
            new_share = (self.num_classes - self.num_old) / self.num_classes
            terms["ortho"] = switches.ortho_weight * new_share * losses.orthogonal_loss(model.class_vectors(),
                                                                                        self.num_old)
        return terms

    def pod(self, new: SegmentationOutput, old: SegmentationOutput) -> torch.Tensor:
        """PLOP's Local POD over ``stages + [features, logits_lowres]`` (spec 2.1; ``features``, the classifier
        input after the head's activation, stands for PLOP's ``pre_logits``)."""
        if new.stages is None or old.stages is None:
            raise RuntimeError("POD needs the stage maps of both models: forward(images, stages=True) "
                               "(trainer.engine.train_iteration passes method.needs_stages)")
        switches = self.switches
        return losses.local_pod([*new.stages, new.features, new.logits_lowres],
                                [*old.stages, old.features, old.logits_lowres],
                                factor=switches.pod_factor, last_factor=switches.pod_logits_factor,
                                num_old=self.num_old, num_classes=self.num_classes,
                                num_new=self.num_classes - self.num_old)


def build_method(method_cfg, dataset: str, num_old: int, num_classes: int) -> IncrementalMethod:
    return IncrementalMethod(resolve_switches(method_cfg, dataset), num_old, num_classes)
