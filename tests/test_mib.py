"""Tests of losses/mib.py: MiB's unbiased cross-entropy and unbiased knowledge distillation.

Expected numbers are worked out by hand from shared/docs/BASELINES_SPEC.md
section 1 ("spec 1.1"). Logits are built as ``log(p)`` from explicit
probabilities ``p`` (summing to 1), so ``softmax(log p) == p`` and every
expected value is a formula in those probabilities.

The last part compares with the official computation on random inputs. The
``official_*`` functions restate the spec's description in MiB's own order of
operations (a zero-filled output map and ``nll_loss``; ``index_select`` and a
per-pixel mean); they are written from the spec, not copied from MiB.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from losses import mib
from losses.mbs import log_probabilities, old_probabilities
from tests.helpers import random_step_inputs


def logits_from_probs(*pixel_probs):
    """(1, C, 1, N) logits whose softmax at pixel n is pixel_probs[n]."""
    probs = torch.tensor(pixel_probs, dtype=torch.float32)  # (N, C)
    return probs.log().t().reshape(1, probs.shape[1], 1, probs.shape[0]).contiguous()


def row(*values):
    """(1, 1, N) long label map."""
    return torch.tensor(values, dtype=torch.long).reshape(1, 1, -1)


# ------------------------------------------------ UNCE by hand
# C_old = 2 (background 0, old class 1), C_new = 1 (class 2); softmax (0.1, 0.3, 0.6) at the pixel.
UNCE_PROBS = (0.1, 0.3, 0.6)
UNCE_BY_HAND = {
    0: -math.log(0.1 + 0.3),    # background: scored against "background or any old class"
    1: -math.log(0.1 + 0.3),    # old class 1 is folded into background (plain CE would give -log 0.3)
    2: -math.log(0.6),          # new class: ordinary CE over all three classes
    255: 0.0,                   # ignored
}


@pytest.mark.parametrize("label", sorted(UNCE_BY_HAND))
def test_unce_one_pixel_by_hand(label):
    loss = mib.unbiased_cross_entropy(logits_from_probs(UNCE_PROBS), row(label), num_old=2, reduction="none")
    assert loss.dtype == torch.float32 and loss.shape == (1, 1, 1)
    assert loss.item() == pytest.approx(UNCE_BY_HAND[label], rel=1e-6, abs=1e-7)
    if label != 255:
        mean = mib.unbiased_cross_entropy(logits_from_probs(UNCE_PROBS), row(label), num_old=2)
        assert mean.dim() == 0 and mean.item() == pytest.approx(UNCE_BY_HAND[label], rel=1e-6)


def test_unce_none_is_zero_at_ignored_and_mean_averages_labelled_pixels():
    labels = row(0, 1, 2, 255)
    logits = logits_from_probs(*[UNCE_PROBS] * 4)
    per_pixel = mib.unbiased_cross_entropy(logits, labels, num_old=2, reduction="none")
    expected = [UNCE_BY_HAND[0], UNCE_BY_HAND[1], UNCE_BY_HAND[2], 0.0]
    assert per_pixel.flatten().tolist() == pytest.approx(expected, rel=1e-6)
    assert per_pixel[0, 0, 3].item() == 0.0
    labelled_mean = sum(expected) / 3  # three labelled pixels; the ignored one is not counted
    assert mib.unbiased_cross_entropy(logits, labels, num_old=2).item() == pytest.approx(labelled_mean, rel=1e-6)
    # MiB's trainer takes .mean() of the "none" map: the same sum over all four pixels (spec 1.1).
    assert per_pixel.mean().item() == pytest.approx(sum(expected) / 4, rel=1e-6)
    assert mib.unbiased_cross_entropy(logits, labels, num_old=2, reduction="sum").item() == \
        pytest.approx(sum(expected), rel=1e-6)


def test_unce_equals_plain_cross_entropy_when_only_background_is_old():
    # Spec 1.1: with C_old = 1 UNCE is CE.
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 5)
    labels = torch.randint(0, 4, (2, 3, 5))
    labels[0, 0] = 255
    torch.testing.assert_close(mib.unbiased_cross_entropy(logits, labels, num_old=1),
                               F.cross_entropy(logits, labels, ignore_index=255))


def test_unce_refuses_bad_arguments():
    logits, labels = logits_from_probs(UNCE_PROBS), row(0)
    with pytest.raises(ValueError, match="num_old"):
        mib.unbiased_cross_entropy(logits, labels, num_old=0)
    with pytest.raises(ValueError, match="reduction"):
        mib.unbiased_cross_entropy(logits, labels, num_old=2, reduction="batchmean")
    with pytest.raises(ValueError, match="unbiased_cross_entropy"):
        mib.unbiased_cross_entropy(logits, row(0, 0), num_old=2)


# ------------------------------------------------ UNKD by hand
def test_unkd_by_hand_divides_by_old_channels():
    # C_old = 2, C = 3 (class 2 new). Two pixels; the loss takes no labels, so every pixel counts
    # (in a step, the second one could be labelled 255: it would still count, spec 1.2).
    old = logits_from_probs((0.7, 0.3), (0.2, 0.8))
    new = logits_from_probs((0.1, 0.3, 0.6), (0.5, 0.25, 0.25))
    loss = mib.unbiased_knowledge_distillation(new, old)
    # Background takes the new class: log(p_0 + p_2); the old class 1 reads its own log-probability.
    pixel0 = 0.7 * math.log(0.1 + 0.6) + 0.3 * math.log(0.3)
    pixel1 = 0.2 * math.log(0.5 + 0.25) + 0.8 * math.log(0.25)
    num_old, pixels = 2, 2
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(-(pixel0 + pixel1) / num_old / pixels, rel=1e-6)


def test_unkd_alpha_sharpens_the_old_probabilities_by_hand():
    old = logits_from_probs((0.64, 0.36))
    new = logits_from_probs((0.1, 0.3, 0.6))
    # softmax(0.5 * log q) = sqrt(q) / sum sqrt(q) = (0.8, 0.6) / 1.4
    q0, q1 = 0.8 / 1.4, 0.6 / 1.4
    expected = -(q0 * math.log(0.7) + q1 * math.log(0.3)) / 2
    assert mib.unbiased_knowledge_distillation(new, old, alpha=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_unkd_refuses_a_step_without_new_classes():
    # Spec 1.2 trap: MiB's slice [:, 1:-C_new] is empty for C_new = 0, so its loss is wrong there.
    with pytest.raises(ValueError, match="new class"):
        mib.unbiased_knowledge_distillation(torch.randn(1, 3, 2, 2), torch.randn(1, 3, 2, 2))


def test_unkd_gradient_reaches_only_the_new_logits():
    old = torch.randn(2, 3, 4, 4, requires_grad=True)
    new = torch.randn(2, 5, 4, 4, requires_grad=True)
    mib.unbiased_knowledge_distillation(new, old).backward()
    assert old.grad is None
    assert new.grad is not None and new.grad.abs().sum() > 0


# ------------------------------------------------ shared forms
def assert_relatively_close(actual, expected, rtol=1e-5):
    """Within ``rtol`` of each entry or of the largest entry: where a gradient entry is a difference of two
    nearly equal softmax terms (an old channel at a folded pixel: p_c - p_c / P_old), any two float32
    computations differ by rounding that is relative to those terms, not to their difference."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def value_and_scaled_grad(loss_fn, new, *args):
    """The loss and its gradient w.r.t. the new logits times their element count (so entries are O(1))."""
    new.grad = None
    loss = loss_fn(new, *args)
    loss.backward()
    return loss.detach(), new.grad * new.numel()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_unce_from_log_probs_equals_logits_form(reduction):
    new, _, labels = random_step_inputs(2, 5, 3, 6, 7, seed=1)

    def shared(logits, labels):
        return mib.unbiased_cross_entropy_from_log_probs(log_probabilities(logits), labels, 3,
                                                         reduction=reduction).sum()

    def direct(logits, labels):
        return mib.unbiased_cross_entropy(logits, labels, 3, reduction=reduction).sum()

    value, grad = value_and_scaled_grad(shared, new, labels)
    expected_value, expected_grad = value_and_scaled_grad(direct, new, labels)
    assert torch.equal(value, expected_value)
    assert torch.equal(grad, expected_grad)


def test_unkd_from_probs_equals_logits_form():
    new, old, _ = random_step_inputs(2, 5, 3, 6, 7, seed=2)
    shared = lambda logits, old: mib.unbiased_knowledge_distillation_from_probs(  # noqa: E731
        log_probabilities(logits), old_probabilities(old))
    value, grad = value_and_scaled_grad(shared, new, old)
    expected_value, expected_grad = value_and_scaled_grad(mib.unbiased_knowledge_distillation, new, old)
    assert torch.equal(value, expected_value)
    assert torch.equal(grad, expected_grad)


def test_bf16_autocast_on_cpu_equals_float32():
    new, old, labels = random_step_inputs(2, 5, 3, 6, 7, seed=3)
    new, old = new.detach().bfloat16(), old.bfloat16()

    def compute(new, old):
        return torch.stack([
            mib.unbiased_cross_entropy(new, labels, 3),
            mib.unbiased_cross_entropy(new, labels, 3, reduction="none").mean(),
            mib.unbiased_knowledge_distillation(new, old),
            mib.unbiased_knowledge_distillation(new, old, alpha=0.5),
        ])

    reference = compute(new.float(), old.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = compute(new, old)
    assert got.dtype == torch.float32
    assert torch.equal(got, reference)


def test_labels_are_untouched():
    new, old, labels = random_step_inputs(2, 5, 3, 6, 7, seed=4)
    original = labels.clone()
    mib.unbiased_cross_entropy(new, labels, 3)
    mib.unbiased_cross_entropy(new, labels, 3, reduction="none")
    mib.unbiased_cross_entropy_from_log_probs(log_probabilities(new), labels, 3)
    assert torch.equal(labels, original)
    assert ((original >= 1) & (original < 3)).any()  # there were old-class labels to fold


# ------------------------------------------------ the official computation
def official_unbiased_cross_entropy(logits, labels, num_old, reduction):
    """Spec 1.1 in MiB's order: a zero-filled (B,C,H,W) output map, labels folded on a copy, nll_loss."""
    denominator = torch.logsumexp(logits, dim=1)
    outputs = torch.zeros_like(logits)
    outputs[:, 0] = torch.logsumexp(logits[:, :num_old], dim=1) - denominator
    outputs[:, num_old:] = logits[:, num_old:] - denominator.unsqueeze(1)
    folded = labels.clone()
    folded[labels < num_old] = 0
    return F.nll_loss(outputs, folded, ignore_index=255, reduction=reduction)


def official_unbiased_knowledge_distillation(new_logits, old_logits, alpha):
    """Spec 1.2 in MiB's order: index_select of background and new channels, per-pixel sum / C_old, mean."""
    num_old, num_classes = old_logits.shape[1], new_logits.shape[1]
    num_new = num_classes - num_old
    targets = torch.softmax(old_logits * alpha, dim=1)
    background_and_new = torch.tensor([0, *range(num_old, num_classes)])
    denominator = torch.logsumexp(new_logits, dim=1)
    old_outputs = new_logits[:, 1:-num_new] - denominator.unsqueeze(1)
    background_output = torch.logsumexp(new_logits.index_select(1, background_and_new), dim=1) - denominator
    per_pixel = (targets[:, 0] * background_output + (targets[:, 1:] * old_outputs).sum(dim=1)) / num_old
    return -per_pixel.mean()


# (C_old, C) of the settings spec 3 lists.
CLASS_COUNTS = [pytest.param(20, 21, id="voc19-1"), pytest.param(16, 17, id="voc15-1-step1"),
                pytest.param(20, 21, id="voc15-1-step5"), pytest.param(16, 21, id="voc15-5"),
                pytest.param(11, 12, id="voc10-1-step1"), pytest.param(101, 151, id="ade100-50")]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("num_old,num_classes", CLASS_COUNTS)
def test_unce_matches_the_official_computation(num_old, num_classes, reduction):
    new, _, labels = random_step_inputs(2, num_classes, num_old, 9, 11, seed=num_old + num_classes)

    def ours(logits, labels):
        return mib.unbiased_cross_entropy(logits, labels, num_old, reduction=reduction).mean()

    def official(logits, labels):
        return official_unbiased_cross_entropy(logits, labels, num_old, reduction).mean()

    value, grad = value_and_scaled_grad(ours, new, labels)
    expected_value, expected_grad = value_and_scaled_grad(official, new, labels)
    torch.testing.assert_close(value, expected_value, rtol=1e-5, atol=0)
    assert_relatively_close(grad, expected_grad)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("num_old,num_classes", CLASS_COUNTS)
def test_unkd_matches_the_official_computation(num_old, num_classes, alpha):
    new, old, _ = random_step_inputs(2, num_classes, num_old, 9, 11, seed=num_old * num_classes)
    ours = lambda logits, old: mib.unbiased_knowledge_distillation(logits, old, alpha)  # noqa: E731
    official = lambda logits, old: official_unbiased_knowledge_distillation(logits, old, alpha)  # noqa: E731
    value, grad = value_and_scaled_grad(ours, new, old)
    expected_value, expected_grad = value_and_scaled_grad(official, new, old)
    torch.testing.assert_close(value, expected_value, rtol=1e-5, atol=0)
    assert_relatively_close(grad, expected_grad)
