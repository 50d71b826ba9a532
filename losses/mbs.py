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
* Each loss that reads the old model's softmax or the current model's
  log-softmax has a ``*_from_probs`` form taking them precomputed (from
  :func:`old_probabilities` / :func:`log_probabilities`), so a training step
  computes each once and shares it between pseudo-labelling, cross-entropy and
  output distillation; the logits form is a thin wrapper with the same values.

Shape letters: B batch, C classes of the current model, C_old classes seen
before the current step (background 0 included), H, W label / logit
resolution, h, w feature resolution, D feature channels.
"""

from contextlib import nullcontext
from typing import ContextManager

import torch
import torch.nn.functional as F

from utils.ignore import IGNORE_INDEX

__all__ = [
    "old_probabilities",
    "log_probabilities",
    "pseudo_labels",
    "pseudo_labels_from_probs",
    "selective_pseudo_labels",
    "selective_pseudo_labels_from_probs",
    "afd_weight_map",
    "adaptive_feature_distillation",
    "feature_distillation",
    "label_guided_distillation",
    "label_guided_distillation_from_probs",
    "knowledge_distillation",
    "knowledge_distillation_from_probs",
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


def _check_old_fits_new(old: torch.Tensor, new: torch.Tensor, what: str) -> None:
    """Old-model maps (B,C_old,H,W) must match the current ones (B,C,H,W) with C_old <= C."""
    if old.dim() != 4 or new.dim() != 4 or old.shape[0] != new.shape[0] or old.shape[2:] != new.shape[2:] \
            or old.shape[1] > new.shape[1]:
        raise ValueError(f"{what}: old logits {tuple(old.shape)} do not fit new logits {tuple(new.shape)}")


def old_probabilities(old_logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the channels of the old model's logits: float32, detached (no graph).

    Args:
        old_logits: (B,C_old,H,W) logits of the frozen old model.

    Returns:
        (B,C_old,H,W) float32, the ``old_probs`` argument of the ``*_from_probs`` functions.
    """
    with torch.no_grad(), _fp32_region(old_logits):
        return torch.softmax(old_logits.detach().float(), dim=1)


def log_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the channels of the current model's logits, float32, in the graph.

    ``F.nll_loss`` of it equals ``F.cross_entropy`` of the logits (that is how
    PyTorch computes the latter), so one log-softmax serves cross-entropy and
    label-guided distillation.

    Args:
        logits: (B,C,H,W) logits of the model being trained.

    Returns:
        (B,C,H,W) float32.
    """
    with _fp32_region(logits):
        return torch.log_softmax(logits.float(), dim=1)


def pseudo_labels_from_probs(labels: torch.Tensor, old_probs: torch.Tensor, threshold: float = 0.7) -> torch.Tensor:
    """:func:`pseudo_labels` given the old model's probabilities (B,C_old,H,W)."""
    _check_spatial(labels, old_probs, "pseudo_labels")
    with torch.no_grad():
        max_prob, old_class = old_probs.detach().float().max(dim=1)  # (B,H,W) each
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
    return pseudo_labels_from_probs(labels, old_probabilities(old_logits), threshold)


def selective_pseudo_labels_from_probs(labels: torch.Tensor, old_probs: torch.Tensor, threshold: float = 0.7,
                                       ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """:func:`selective_pseudo_labels` given the old model's probabilities (B,C_old,H,W)."""
    _check_spatial(labels, old_probs, "selective_pseudo_labels")
    with torch.no_grad():
        old_probs = old_probs.detach().float()
        out = pseudo_labels_from_probs(labels, old_probs, threshold)
        # Sum the object probabilities explicitly rather than 1 - p[0], to
        # follow Eq. 2 literally (and avoid rounding in 1 - p).
        is_object = old_probs[:, 1:].sum(dim=1) > old_probs[:, 0]
        uncertain_object = (out == 0) & is_object
        return torch.where(uncertain_object, torch.full_like(out, ignore_index), out)


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
    return selective_pseudo_labels_from_probs(labels, old_probabilities(old_logits), threshold, ignore_index)


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
    background_prob = old_probabilities(old_logits)[:, 0]
    with torch.no_grad():
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


class _GuidedTargetSum(torch.autograd.Function):
    """``sum(q * log_probs)`` over all B*C*H*W entries, for the LGKD target ``q``, never materialising ``q``.

    Forward: ``sum_{c < C_old} p_old[c] log_probs[c]`` plus, at each guided pixel, the moved background mass
    times ``log_probs[k] - log_probs[0]`` (``log_probs[k]`` gathered). Backward: the gradient is ``q`` itself,
    written into one buffer. Why by hand: autograd of the same forward allocates and zero-fills a full-size
    (B,C,H,W) buffer for each of the slice, the channel-0 select and the gather, which on CPU costs more than
    the log-softmax.
    """

    @staticmethod
    def forward(ctx, log_probs, old_probs, moved_mass, guided_class):
        """log_probs (B,C,H,W); old_probs (B,C_old,H,W); moved_mass (B,H,W): p_old[0] at guided pixels, 0
        elsewhere; guided_class (B,1,H,W) long: the new class k at guided pixels, 0 elsewhere."""
        ctx.save_for_backward(old_probs, moved_mass, guided_class)
        ctx.num_classes = log_probs.shape[1]
        old_channel_sum = (old_probs * log_probs[:, :old_probs.shape[1]]).sum()
        # Exactly 0 at non-guided pixels (channel 0 minus itself, times 0).
        shift = log_probs.gather(1, guided_class).squeeze(1) - log_probs[:, 0]
        return old_channel_sum + (moved_mass * shift).sum()

    @staticmethod
    def backward(ctx, grad_output):
        old_probs, moved_mass, guided_class = ctx.saved_tensors
        batch, num_old, height, width = old_probs.shape
        grad = old_probs.new_empty(batch, ctx.num_classes, height, width)
        grad[:, :num_old].copy_(old_probs).mul_(grad_output)  # in place: no temporary of that size
        grad[:, num_old:].zero_()
        moved = (moved_mass * grad_output).unsqueeze(1)
        grad[:, :1].sub_(moved)                  # q[0] = 0 at guided pixels (p_old[0] - p_old[0])
        grad.scatter_add_(1, guided_class, moved)  # q[k] = p_old[0] there; adds 0 to channel 0 elsewhere
        return grad, None, None, None


def label_guided_distillation_from_probs(new_log_probs: torch.Tensor, old_probs: torch.Tensor, labels: torch.Tensor,
                                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """:func:`label_guided_distillation` given ``log_softmax(new)`` (B,C,H,W) and ``softmax(old)`` (B,C_old,H,W).

    The target ``q`` is never built (no one-hot, no padded target, no
    channels-last copy): ``sum_c q[c] log p_new[c]`` is the old-channel sum
    ``sum_{c < C_old} p_old[c] log p_new[c]`` plus, at a guided pixel with new
    class k, ``p_old[0] (log p_new[k] - log p_new[0])``. Same values and
    gradients as building ``q``.
    """
    _check_spatial(labels, new_log_probs, "label_guided_distillation")
    _check_old_fits_new(old_probs, new_log_probs, "label_guided_distillation")
    num_classes, num_old = new_log_probs.shape[1], old_probs.shape[1]
    with _fp32_region(new_log_probs):
        old_probs = old_probs.detach().float()
        is_new = (labels >= num_old) & (labels < num_classes) & (labels != ignore_index)  # (B,H,W)
        moved_mass = torch.where(is_new, old_probs[:, 0], 0.0)
        guided_class = torch.where(is_new, labels, 0).unsqueeze(1)
        total = _GuidedTargetSum.apply(new_log_probs.float(), old_probs, moved_mass, guided_class)
        return -total / new_log_probs.numel()


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
    return label_guided_distillation_from_probs(log_probabilities(new_logits), old_probabilities(old_logits),
                                                labels, ignore_index)


def knowledge_distillation_from_probs(new_logits: torch.Tensor, old_probs: torch.Tensor) -> torch.Tensor:
    """:func:`knowledge_distillation` given ``softmax(old)`` (B,C_old,H,W).

    It takes the new logits, not the shared ``log_softmax(new)``: KD normalises
    over the old channels only, so it needs its own log-softmax over those.
    """
    _check_old_fits_new(old_probs, new_logits, "knowledge_distillation")
    num_old = old_probs.shape[1]
    with _fp32_region(new_logits):
        log_probs = torch.log_softmax(new_logits[:, :num_old].float(), dim=1)
        # sum / numel rather than mean(): the same value, but mean's backward materialises a full-size
        # gradient of the product, sum's is a broadcast view.
        return -(old_probs.detach().float() * log_probs).sum() / log_probs.numel()


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
    return knowledge_distillation_from_probs(new_logits, old_probabilities(old_logits))


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
