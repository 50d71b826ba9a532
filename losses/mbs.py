"""Loss terms of MBS (Park et al., ECCV 2024) and of its non-MBS baseline.

Every function here is a pure tensor function, independent of any model.
Docstrings name the method's components by letter, as the README's "Methods and
ablations" table does: (a) background weight transfer, (b) selective
pseudo-labelling, (c) adaptive feature distillation, (d) label-guided output
distillation, (e) the orthogonal objective; "Eq. n" is the paper's equation.

Conventions shared by all functions:

* The old model is frozen: its logits / features are treated as constants
  (detached inside each function), so no gradient ever reaches them.
* Softmax, log-softmax, products and reductions are computed in float32 with
  autocast disabled, so results are the same under float16/bfloat16 autocast
  (CPU autocast would otherwise run ``matmul`` in bfloat16). Scalar losses are
  returned as float32 tensors.
* Label maps are never modified in place.

Shape letters: B batch, C classes of the current model, C_old classes seen
before the current step (background 0 included), H, W label / logit
resolution, h, w feature resolution, D feature channels.
"""

from contextlib import nullcontext
from typing import ContextManager

import torch
import torch.nn.functional as F

from datasets.labels import IGNORE_INDEX

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


def _fp32_region(tensor: torch.Tensor) -> ContextManager:
    """A context that disables autocast for the device of ``tensor``.

    Why: inside autocast, ops such as ``matmul`` are silently run in half
    precision even on float32 inputs; the losses must be computed in float32.
    """
    device_type = tensor.device.type
    is_available = getattr(torch.amp, "is_autocast_available", None)
    if is_available is not None and not is_available(device_type):
        return nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def _check_spatial(labels: torch.Tensor, maps: torch.Tensor, what: str) -> None:
    if labels.dim() != 3 or maps.dim() != 4 or labels.shape[0] != maps.shape[0] \
            or labels.shape[1:] != maps.shape[2:]:
        raise ValueError(f"{what}: labels {tuple(labels.shape)} (B,H,W) do not match "
                         f"{tuple(maps.shape)} (B,C,H,W)")


def _pseudo_labels_from_probs(labels: torch.Tensor, old_probs: torch.Tensor,
                              threshold: float) -> torch.Tensor:
    """Step 1 of component (b) given the old model's probabilities (B,C_old,H,W)."""
    max_prob, old_class = old_probs.max(dim=1)  # (B,H,W) each
    confident_object = (labels == 0) & (old_class != 0) & (max_prob >= threshold)
    return torch.where(confident_object, old_class.to(labels.dtype), labels)


def pseudo_labels(labels: torch.Tensor, old_logits: torch.Tensor, threshold: float = 0.7) -> torch.Tensor:
    """Plain pseudo-labelling (component (b) step 1 only): the baseline's labels.

    Args:
        labels: (B,H,W) long, the step's labels (old and future classes
            already rewritten to 0, 255 = ignore).
        old_logits: (B,C_old,H,W) logits of the old model at label resolution.
        threshold: tau; a background pixel takes the old model's class when
            that class is not background and its probability is >= tau.

    Returns:
        (B,H,W) long, a new tensor (``labels`` is left untouched).
    """
    _check_spatial(labels, old_logits, "pseudo_labels")
    with torch.no_grad(), _fp32_region(old_logits):
        old_probs = torch.softmax(old_logits.detach().float(), dim=1)
        return _pseudo_labels_from_probs(labels, old_probs, threshold)


def selective_pseudo_labels(labels: torch.Tensor, old_logits: torch.Tensor, threshold: float = 0.7,
                            ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Selective pseudo-labelling of MBS (component (b), Eq. 1-3).

    1. Pseudo-label as in :func:`pseudo_labels` (same rule, shared code).
    2. Object identifier ``O = sum_{c>=1} p_old[c] > p_old[0]``.
    3. Where the label is still 0 and ``O`` holds, the pixel becomes
       ``ignore_index``: the old model thinks "some object" but is not sure
       which, so neither background nor a class is a safe target.

    Args:
        labels: (B,H,W) long, the step's labels (old/future classes already 0).
        old_logits: (B,C_old,H,W) old-model logits at label resolution.
        threshold: tau for step 1.
        ignore_index: value given to uncertain object pixels.

    Returns:
        (B,H,W) long, a new tensor (``labels`` is left untouched). Existing
        ignore pixels and new-class pixels are never changed.
    """
    _check_spatial(labels, old_logits, "selective_pseudo_labels")
    with torch.no_grad(), _fp32_region(old_logits):
        old_probs = torch.softmax(old_logits.detach().float(), dim=1)
        out = _pseudo_labels_from_probs(labels, old_probs, threshold)
        # Sum the object probabilities explicitly rather than 1 - p[0], to
        # follow Eq. 2 literally (and avoid rounding in 1 - p).
        is_object = old_probs[:, 1:].sum(dim=1) > old_probs[:, 0]
        uncertain_object = (out == 0) & is_object
        return torch.where(uncertain_object, torch.full_like(out, ignore_index), out)


def afd_weight_map(old_logits: torch.Tensor, labels: torch.Tensor, num_old: int,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-pixel weight of adaptive feature distillation (component (c)).

    Args:
        old_logits: (B,C_old,h,w) old-model logits at feature resolution.
        labels: (B,h,w) long, selective pseudo-labels resized to feature
            resolution by nearest neighbour.
        num_old: C_old, number of classes seen before this step (with 0).
        ignore_index: label value that gets weight 0.

    Returns:
        (B,h,w) float32, no grad:
        ``softmax(old_logits)[:, 0]`` where label == 0 (a background pixel is
        only as reliable for distillation as the old model is sure it is
        background), 1 where 1 <= label < num_old (old class), 0 where the label
        is a new class (>= num_old) or ``ignore_index``.
    """
    _check_spatial(labels, old_logits, "afd_weight_map")
    with torch.no_grad(), _fp32_region(old_logits):
        background_prob = torch.softmax(old_logits.detach().float(), dim=1)[:, 0]
        is_old_class = (labels >= 1) & (labels < num_old) & (labels != ignore_index)
        weight = torch.where(is_old_class, torch.ones_like(background_prob),
                             torch.zeros_like(background_prob))
        return torch.where(labels == 0, background_prob, weight)


def adaptive_feature_distillation(feat_new: torch.Tensor, feat_old: torch.Tensor,
                                  weight: torch.Tensor) -> torch.Tensor:
    """Weighted feature MSE of MBS (component (c), Eq. 5).

    ``sum(w * (F_new - F_old)^2) / (count(w > 0) * D)``.

    Args:
        feat_new: (B,D,h,w) features of the model being trained.
        feat_old: (B,D,h,w) features of the old model (target, detached).
        weight: (B,h,w) from :func:`afd_weight_map` (treated as a constant).

    Returns:
        float32 scalar. When no weight is positive the result is exactly 0
        (not NaN) and still attached to ``feat_new``'s graph, so a backward
        pass just yields zero gradients.
    """
    if feat_new.shape != feat_old.shape or weight.shape != (feat_new.shape[0], *feat_new.shape[2:]):
        raise ValueError(f"adaptive_feature_distillation: features {tuple(feat_new.shape)} / "
                         f"{tuple(feat_old.shape)} and weight {tuple(weight.shape)} do not match")
    with _fp32_region(feat_new):
        weight = weight.detach().float()
        squared = (feat_new.float() - feat_old.detach().float()).pow(2)
        weighted_sum = (squared * weight.unsqueeze(1)).sum()
        # clamp: with no positive weight the numerator is 0, so 0 / 1 = 0.
        count = (weight > 0).sum().clamp(min=1).to(torch.float32)
        return weighted_sum / (count * feat_new.shape[1])


def feature_distillation(feat_new: torch.Tensor, feat_old: torch.Tensor) -> torch.Tensor:
    """Baseline feature distillation: plain MSE, mean over all B*D*h*w elements.

    Args:
        feat_new: (B,D,h,w) features of the model being trained.
        feat_old: (B,D,h,w) old-model features (target, detached).

    Returns:
        float32 scalar.
    """
    if feat_new.shape != feat_old.shape:
        raise ValueError(f"feature_distillation: shapes {tuple(feat_new.shape)} and "
                         f"{tuple(feat_old.shape)} differ")
    with _fp32_region(feat_new):
        return F.mse_loss(feat_new.float(), feat_old.detach().float())


def label_guided_distillation(new_logits: torch.Tensor, old_logits: torch.Tensor, labels: torch.Tensor,
                              ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Label-guided output distillation of MBS (component (d), Eq. 7).

    Target ``q`` over all C current channels:
    ``q[c] = softmax(old)[c]`` for c < C_old and 0 for the new channels; at a
    pixel whose ORIGINAL label is a new class k (C_old <= k < C) the old
    model's background mass is moved to k: ``q[k] = softmax(old)[0]``,
    ``q[0] = 0`` (the old model calls that pixel background only because it
    never saw class k).

    Loss: ``-mean_pixels(mean_channels(q * log_softmax(new)))``, i.e. the mean
    over all B*C*H*W entries (the channel mean runs over all C channels, as in
    the reference).

    Ignore pixels (label == ``ignore_index``), like any label that is not a
    new class, are KEPT in the mean with the plain old-probability target (no
    label guidance), following the reference implementation.

    Args:
        new_logits: (B,C,H,W) logits of the model being trained.
        old_logits: (B,C_old,H,W) old-model logits (detached), C_old <= C.
        labels: (B,H,W) long, the original step labels (not pseudo-labels).
        ignore_index: the ignore label value.

    Returns:
        float32 scalar.
    """
    _check_spatial(labels, new_logits, "label_guided_distillation")
    num_classes, num_old = new_logits.shape[1], old_logits.shape[1]
    if old_logits.shape[0] != new_logits.shape[0] or old_logits.shape[2:] != new_logits.shape[2:] \
            or num_old > num_classes:
        raise ValueError(f"label_guided_distillation: old logits {tuple(old_logits.shape)} do not fit "
                         f"new logits {tuple(new_logits.shape)}")
    with _fp32_region(new_logits):
        old_probs = torch.softmax(old_logits.detach().float(), dim=1)
        log_probs = torch.log_softmax(new_logits.float(), dim=1)

        is_new = (labels >= num_old) & (labels < num_classes) & (labels != ignore_index)  # (B,H,W)
        # One-hot of the new class at guided pixels, all zeros elsewhere
        # (non-guided pixels are mapped to channel 0 and then masked out).
        guided_class = torch.where(is_new, labels, torch.zeros_like(labels))
        new_one_hot = F.one_hot(guided_class, num_classes).permute(0, 3, 1, 2).float()
        new_one_hot = new_one_hot * is_new.unsqueeze(1)

        background = old_probs[:, :1]  # (B,1,H,W)
        target = F.pad(old_probs, (0, 0, 0, 0, 0, num_classes - num_old))  # zeros for new channels
        target = target + new_one_hot * background  # q[k] = p_old[0] at guided pixels
        keep_background = (~is_new).unsqueeze(1).float()
        target = torch.cat([target[:, :1] * keep_background, target[:, 1:]], dim=1)  # q[0] = 0 there
        return -(target * log_probs).mean()


def knowledge_distillation(new_logits: torch.Tensor, old_logits: torch.Tensor) -> torch.Tensor:
    """Baseline output distillation: plain KD over the old channels.

    ``-mean_pixels(mean_{c < C_old}(softmax(old)[c] * log_softmax(new[:, :C_old])[c]))``:
    the new logits are restricted to the first C_old channels and
    log-softmax-normalised over those C_old channels only (no MiB-style
    folding of the new channels into background); the target is the old
    model's softmax. Equals the mean over all B*C_old*H*W entries.

    Args:
        new_logits: (B,C,H,W) logits of the model being trained, C >= C_old.
        old_logits: (B,C_old,H,W) old-model logits (detached).

    Returns:
        float32 scalar.
    """
    num_old = old_logits.shape[1]
    if old_logits.shape[0] != new_logits.shape[0] or old_logits.shape[2:] != new_logits.shape[2:] \
            or num_old > new_logits.shape[1]:
        raise ValueError(f"knowledge_distillation: old logits {tuple(old_logits.shape)} do not fit "
                         f"new logits {tuple(new_logits.shape)}")
    with _fp32_region(new_logits):
        old_probs = torch.softmax(old_logits.detach().float(), dim=1)
        log_probs = torch.log_softmax(new_logits[:, :num_old].float(), dim=1)
        return -(old_probs * log_probs).mean()


def orthogonal_loss(class_vectors: torch.Tensor, num_old: int) -> torch.Tensor:
    """Orthogonal objective of MBS (component (e)), unweighted.

    Rows are L2-normalised; for every new class i (row >= num_old) and every
    other class j != i the term is ``|cos(e_i, stopgrad(e_j))|``; the loss is
    the mean over those C_new * (C - 1) pairs. The stop-gradient sits on e_j
    only, so gradient flows through the new rows e_i and never into old rows.
    The caller multiplies by ``|C_new| / |C|``.

    Right after background weight transfer (new vector == background vector)
    the new-vs-background term is exactly 1.

    Args:
        class_vectors: (C,D) or (B,C,D) class vectors (classifier rows or
            class embeddings); rows >= num_old are the new classes.
        num_old: C_old, number of old classes (with background).

    Returns:
        float32 scalar (for (B,C,D): also averaged over the batch). Zero,
        still graph-connected, when there is no new class.
    """
    if class_vectors.dim() not in (2, 3):
        raise ValueError(f"orthogonal_loss: expected (C,D) or (B,C,D), got {tuple(class_vectors.shape)}")
    num_classes = class_vectors.shape[-2]
    num_new = num_classes - num_old
    with _fp32_region(class_vectors):
        unit = F.normalize(class_vectors.float(), dim=-1)
        if num_new <= 0:
            return unit.sum() * 0.0
        # (..., C_new, C): cosine of each new row with every (detached) row.
        cosine = unit[..., num_old:, :] @ unit.detach().transpose(-1, -2)
        # Exclude each new class's pairing with itself (row r <-> column num_old + r).
        rows = torch.arange(num_new, device=unit.device).unsqueeze(1)
        cols = torch.arange(num_classes, device=unit.device).unsqueeze(0)
        not_self = (cols != rows + num_old).float()  # (C_new, C)
        per_set = (cosine.abs() * not_self).sum(dim=(-2, -1)) / (num_new * max(num_classes - 1, 1))
        return per_set.mean()
