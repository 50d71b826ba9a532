"""Loss terms of MiB (Cermelli et al., CVPR 2020), as its official code computes them.

The semantics are those of ``shared/docs/BASELINES_SPEC.md`` (beside the
checkout) section 1, read from MiB's code at ``1c58983``; "spec 1.1" below
points there. The conventions are those of
:mod:`losses.mbs`: pure tensor functions, float32 with autocast off, old-model
inputs detached, label maps never modified in place, float32 scalars.

Each term has a form taking the batch's shared ``log_softmax(new)`` (and
``softmax(old)``), so a training step computes them once (see
:func:`losses.mbs.log_probabilities` / :func:`losses.mbs.old_probabilities`);
the logits form is a thin wrapper over it, with the same values and gradients.

Shape letters: B batch, C classes of the current model, C_old classes seen
before the current step (background 0 included), C_new = C - C_old, H, W.
"""

import torch

from utils.ignore import IGNORE_INDEX

from .mbs import _check_old_fits_new, _check_spatial, _fp32_region, log_probabilities, old_probabilities

__all__ = [
    "unbiased_cross_entropy",
    "unbiased_cross_entropy_from_log_probs",
    "unbiased_knowledge_distillation",
    "unbiased_knowledge_distillation_from_probs",
]

_REDUCTIONS = ("mean", "sum", "none")


def unbiased_cross_entropy_from_log_probs(log_probs: torch.Tensor, labels: torch.Tensor, num_old: int,
                                          ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> torch.Tensor:
    """:func:`unbiased_cross_entropy` given ``log_softmax(new)`` (B,C,H,W).

    The folded background log-probability is ``logsumexp(log_probs[:, :C_old])``
    (the same as ``logsumexp(z[:, :C_old]) - logsumexp(z)``); a new class reads
    its own channel. Only the value each pixel's label picks is computed, so
    no (B,C,H,W) output map is built.
    """
    _check_spatial(labels, log_probs, "unbiased_cross_entropy")
    num_classes = log_probs.shape[1]
    if not 1 <= num_old <= num_classes:
        raise ValueError(f"unbiased_cross_entropy: num_old={num_old} must be in [1, {num_classes}] "
                         "(MiB uses it only when old classes exist, spec 1.1)")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"unbiased_cross_entropy: reduction={reduction!r} is not one of {_REDUCTIONS}")
    with _fp32_region(log_probs):
        log_probs = log_probs.float()
        # Spec 1.1: every label < C_old becomes background, on a copy (labels stay untouched).
        folded = torch.where(labels < num_old, torch.zeros_like(labels), labels)
        ignored = folded == ignore_index
        background = torch.logsumexp(log_probs[:, :num_old], dim=1)  # (B,H,W)
        # A new class c >= C_old reads its own channel (ordinary CE over all C classes, spec 1.1).
        gather_index = torch.where(ignored, torch.zeros_like(folded), folded).unsqueeze(1)
        own_channel = log_probs.gather(1, gather_index).squeeze(1)
        picked = torch.where(folded == 0, background, own_channel)
        loss_map = torch.where(ignored, torch.zeros_like(picked), -picked)  # nll_loss: 0 at ignored pixels
        if reduction == "none":
            return loss_map
        if reduction == "sum":
            return loss_map.sum()
        # nll_loss's "mean": over the labelled pixels (NaN when there is none, as there).
        return loss_map.sum() / (~ignored).sum().to(torch.float32)


def unbiased_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, num_old: int,
                           ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> torch.Tensor:
    """MiB's unbiased cross-entropy, UNCE (spec 1.1, ``M:utils/loss.py:89-109``).

    At each pixel, with ``den = logsumexp_c z_c`` over all C channels, a label
    ``< C_old`` (background or any old class) is scored against
    ``logsumexp_{c < C_old} z_c - den``: the old classes are folded into
    background. A new-class label c is scored against ``z_c - den``, ordinary
    cross-entropy whose denominator still holds the old classes.

    Args:
        logits: (B,C,H,W) full-resolution logits of the model being trained.
        labels: (B,H,W) long; labels < C_old count as background; left untouched.
        num_old: C_old, classes seen before this step, background included (>= 1).
        ignore_index: the label that adds nothing.
        reduction: ``"mean"`` over the labelled pixels (the class's default);
            ``"none"`` gives the (B,H,W) map with 0 at ignored pixels, whose
            ``.mean()`` over all B*H*W pixels is what MiB's and PLOP's trainers
            use (spec section 0 and 1.1, the reduction trap); ``"sum"``.

    Returns:
        float32 scalar, or (B,H,W) float32 for ``"none"``.
    """
    return unbiased_cross_entropy_from_log_probs(log_probabilities(logits), labels, num_old, ignore_index, reduction)


def unbiased_knowledge_distillation_from_probs(new_log_probs: torch.Tensor, old_probs: torch.Tensor) -> torch.Tensor:
    """:func:`unbiased_knowledge_distillation` with ``alpha = 1``, given ``log_softmax(new)`` (B,C,H,W) and
    ``softmax(old)`` (B,C_old,H,W).

    Background's log-probability is ``logsumexp`` of ``new_log_probs`` over
    channel 0 and the new channels ``C_old..C-1``.
    """
    _check_old_fits_new(old_probs, new_log_probs, "unbiased_knowledge_distillation")
    num_classes, num_old = new_log_probs.shape[1], old_probs.shape[1]
    if num_classes <= num_old:
        # Spec 1.2 trap: MiB's slice z[:, 1:-C_new] is empty for C_new = 0 and its loss is then wrong.
        raise ValueError(f"unbiased_knowledge_distillation: needs at least one new class "
                         f"(C={num_classes}, C_old={num_old})")
    with _fp32_region(new_log_probs):
        log_probs = new_log_probs.float()
        old_probs = old_probs.detach().float()
        # Spec 1.2: the new classes are folded into the current background.
        background = torch.logsumexp(torch.cat([log_probs[:, :1], log_probs[:, num_old:]], dim=1), dim=1)
        total = (old_probs[:, 0] * background).sum() + (old_probs[:, 1:] * log_probs[:, 1:num_old]).sum()
        pixels = background.numel()
        # Spec 1.2 trap: divided by C_old (the old channels), not by C; then the mean over all B*H*W pixels,
        # label 255 included (the loss takes no labels).
        return -total / (num_old * pixels)


def unbiased_knowledge_distillation(new_logits: torch.Tensor, old_logits: torch.Tensor,
                                    alpha: float = 1.0) -> torch.Tensor:
    """MiB's unbiased knowledge distillation, UNKD (spec 1.2, ``M:utils/loss.py:139-172``).

    With ``q = softmax(alpha * z_old)`` over the C_old old channels and
    ``o = log_softmax(z)`` over all C current channels, per pixel
    ``l = -(1/C_old) * [q_0 * logsumexp(o_0, o_{C_old..C-1}) + sum_{c=1}^{C_old-1} q_c o_c]``,
    averaged over all B*H*W pixels.

    Args:
        new_logits: (B,C,H,W) full-resolution logits of the model being trained, C > C_old.
        old_logits: (B,C_old,H,W) logits of the frozen old model (detached).
        alpha: the old logits' temperature factor (MiB's ``--alpha``, 1 by default and in MiB's runs).

    Returns:
        float32 scalar.
    """
    if alpha == 1.0:
        old_probs = old_probabilities(old_logits)
    else:
        with torch.no_grad(), _fp32_region(old_logits):
            old_probs = torch.softmax(old_logits.detach().float() * alpha, dim=1)
    return unbiased_knowledge_distillation_from_probs(log_probabilities(new_logits), old_probs)

