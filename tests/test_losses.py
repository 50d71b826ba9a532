"""Tests of losses/mbs.py against small examples worked out by hand.

Old-model logits are built as ``log(p)`` from explicit probabilities ``p``
(which sum to 1), so ``softmax(log p) == p`` and every expected value below
can be written in terms of those probabilities.
"""

import math

import pytest
import torch

from losses import mbs as L


def logits_from_probs(*pixel_probs):
    """(1, C, 1, N) logits whose softmax at pixel n is pixel_probs[n]."""
    probs = torch.tensor(pixel_probs, dtype=torch.float32)  # (N, C)
    return probs.log().t().reshape(1, probs.shape[1], 1, probs.shape[0])


def row(*values):
    """(1, 1, N) long label map."""
    return torch.tensor(values, dtype=torch.long).reshape(1, 1, -1)


# Six pixels, C_old = 3 (background, classes 1 and 2); new class 3 at this step.
PL_PROBS = [
    (0.1, 0.8, 0.1),    # 0: confident class 1 (0.8 >= 0.7)          -> 1
    (0.2, 0.6, 0.2),    # 1: object but below tau; O: 0.8 > 0.2      -> 0 plain / 255 selective
    (0.6, 0.3, 0.1),    # 2: background wins; O: 0.4 > 0.6 false     -> 0
    (0.45, 0.3, 0.25),  # 3: argmax is background but O: 0.55 > 0.45 -> 0 plain / 255 selective
    (0.1, 0.8, 0.1),    # 4: label already 255                       -> 255
    (0.1, 0.1, 0.8),    # 5: new-class label 3                       -> 3
]
PL_LABELS = (0, 0, 0, 0, 255, 3)


def test_pseudo_labels_plain():
    out = L.pseudo_labels(row(*PL_LABELS), logits_from_probs(*PL_PROBS), threshold=0.7)
    assert out.dtype == torch.long
    assert out.tolist() == [[[1, 0, 0, 0, 255, 3]]]


def test_selective_pseudo_labels():
    out = L.selective_pseudo_labels(row(*PL_LABELS), logits_from_probs(*PL_PROBS), threshold=0.7)
    assert out.dtype == torch.long
    assert out.shape == (1, 1, 6)
    assert out.tolist() == [[[1, 255, 0, 255, 255, 3]]]


def test_selective_pseudo_labels_threshold_and_custom_ignore():
    # With tau = 0.5 pixel 1 (p=0.6 for class 1) is pseudo-labelled instead of ignored.
    out = L.selective_pseudo_labels(row(*PL_LABELS), logits_from_probs(*PL_PROBS), threshold=0.5,
                                    ignore_index=99)
    assert out.tolist() == [[[1, 1, 0, 99, 255, 3]]]


def test_afd_weight_map_cases():
    probs = [(0.3, 0.6, 0.1), (0.1, 0.8, 0.1), (0.2, 0.2, 0.6), (0.5, 0.4, 0.1), (0.9, 0.05, 0.05),
             (0.75, 0.2, 0.05)]
    labels = row(0, 1, 2, 3, 255, 0)  # num_old = 3, so 3 is a new class
    weight = L.afd_weight_map(logits_from_probs(*probs), labels, num_old=3)
    assert weight.dtype == torch.float32 and weight.shape == (1, 1, 6)
    expected = torch.tensor([[[0.3, 1.0, 1.0, 0.0, 0.0, 0.75]]])
    torch.testing.assert_close(weight, expected)


def test_afd_normalised_by_count_times_channels():
    # D = 2, three pixels; new features vs zero old features.
    feat_new = torch.tensor([[[[1.0, 2.0, 3.0]], [[0.0, 1.0, -1.0]]]], requires_grad=True)  # (1,2,1,3)
    feat_old = torch.zeros(1, 2, 1, 3, requires_grad=True)
    weight = torch.tensor([[[0.5, 0.0, 1.0]]])
    loss = L.adaptive_feature_distillation(feat_new, feat_old, weight)
    # sum w*d^2 = 0.5*(1 + 0) + 0*(4 + 1) + 1*(9 + 1) = 10.5; count(w>0) = 2, D = 2.
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(10.5 / 4)
    loss.backward()
    # d/dFn = 2 w (Fn - Fo) / (count * D)
    expected_grad = torch.tensor([[[[0.25, 0.0, 1.5]], [[0.0, 0.0, -0.5]]]])
    torch.testing.assert_close(feat_new.grad, expected_grad)
    assert feat_old.grad is None  # old features are a detached target


def test_afd_zero_weights_gives_exact_zero_not_nan():
    feat_new = torch.randn(2, 4, 3, 3, requires_grad=True)
    feat_old = torch.randn(2, 4, 3, 3)
    loss = L.adaptive_feature_distillation(feat_new, feat_old, torch.zeros(2, 3, 3))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    assert loss.requires_grad
    loss.backward()
    assert torch.equal(feat_new.grad, torch.zeros_like(feat_new))


def test_feature_distillation_plain_mse():
    feat_new = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])
    feat_old = torch.tensor([[[[0.0, 0.0]], [[1.0, 0.0]]]])
    # (1 + 4 + 4 + 0) / 4
    assert L.feature_distillation(feat_new, feat_old).item() == pytest.approx(9 / 4)


def test_lgkd_hand_computed_new_class_pixel():
    # C_old = 2, C = 3 (class 2 is new). Pixel 0 is labelled with the new class 2,
    # pixel 1 is background, pixel 2 is ignore.
    old = logits_from_probs((0.7, 0.3), (0.6, 0.4), (0.5, 0.5))
    new = logits_from_probs((0.2, 0.3, 0.5), (0.5, 0.25, 0.25), (0.1, 0.1, 0.8))
    labels = row(2, 0, 255)
    loss = L.label_guided_distillation(new, old, labels)
    # pixel 0: q = (0, 0.3, 0.7): background mass moved to class 2.
    term0 = 0.3 * math.log(0.3) + 0.7 * math.log(0.5)
    # pixel 1: q = (0.6, 0.4, 0).
    term1 = 0.6 * math.log(0.5) + 0.4 * math.log(0.25)
    # pixel 2 (ignore): kept, plain target q = (0.5, 0.5, 0).
    term2 = 0.5 * math.log(0.1) + 0.5 * math.log(0.1)
    expected = -(term0 + term1 + term2) / 3 / 3  # mean over 3 channels, then 3 pixels
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_lgkd_without_new_class_pixels_is_old_prob_cross_entropy():
    torch.manual_seed(0)
    num_old, num_classes = 3, 5
    old = torch.randn(2, num_old, 4, 4)
    new = torch.randn(2, num_classes, 4, 4)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[0, 0, :2] = 255
    loss = L.label_guided_distillation(new, old, labels)
    # Cross-entropy with the old probabilities over the old channels, then
    # divided by C because the channel mean runs over all current channels.
    per_pixel = -(old.softmax(1) * new.log_softmax(1)[:, :num_old]).sum(1)
    torch.testing.assert_close(loss, per_pixel.mean() / num_classes)


def test_lgkd_gradient_only_to_new_logits():
    old = torch.randn(1, 2, 2, 2, requires_grad=True)
    new = torch.randn(1, 3, 2, 2, requires_grad=True)
    L.label_guided_distillation(new, old, torch.tensor([[[2, 0], [255, 2]]])).backward()
    assert old.grad is None
    assert new.grad is not None and new.grad.abs().sum() > 0


def test_knowledge_distillation_hand_computed():
    old = logits_from_probs((0.7, 0.3), (0.2, 0.8))
    # Channels 0-1 of the new logits normalise (over those two) to (0.4, 0.6) and
    # (0.5, 0.5); channel 2 is a new class and must not matter.
    new = torch.cat([logits_from_probs((0.4, 0.6), (0.5, 0.5)), torch.full((1, 1, 1, 2), 5.0)], dim=1)
    loss = L.knowledge_distillation(new, old)
    term0 = 0.7 * math.log(0.4) + 0.3 * math.log(0.6)
    term1 = 0.2 * math.log(0.5) + 0.8 * math.log(0.5)
    assert loss.item() == pytest.approx(-(term0 + term1) / 2 / 2, rel=1e-5)


def test_orthogonal_right_after_weight_transfer():
    # bg, two old classes, one new class copied from bg: only new-vs-bg is non-orthogonal.
    vectors = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [2.0, 0.0, 0.0]])
    loss = L.orthogonal_loss(vectors, num_old=3)
    # pairs (3,0)=1, (3,1)=0, (3,2)=0
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(1 / 3)


def test_orthogonal_two_new_classes_abs_and_new_pairs():
    s = 1 / math.sqrt(2)
    vectors = torch.tensor([
        [1.0, 0.0, 0.0],    # 0 background
        [0.0, 1.0, 0.0],    # 1 old
        [1.0, 0.0, 0.0],    # 2 new, copy of background
        [0.0, -1.0, 1.0],   # 3 new, cos with class 1 is -1/sqrt(2)
    ])
    loss = L.orthogonal_loss(vectors, num_old=2)
    # i=2: j=0 -> 1, j=1 -> 0, j=3 -> 0; i=3: j=0 -> 0, j=1 -> |-s| = s, j=2 -> 0
    assert loss.item() == pytest.approx((1 + s) / 6)


def test_orthogonal_gradient_reaches_only_new_rows():
    torch.manual_seed(1)
    vectors = torch.randn(6, 8, requires_grad=True)
    L.orthogonal_loss(vectors, num_old=4).backward()
    assert torch.equal(vectors.grad[:4], torch.zeros(4, 8))
    assert (vectors.grad[4:].abs().sum(dim=1) > 0).all()


def test_orthogonal_batched_is_mean_over_batch():
    first = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [2.0, 0.0, 0.0]])  # 1/3
    second = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0]])  # s*2/3
    batched = torch.stack([first, second])
    loss = L.orthogonal_loss(batched, num_old=3)
    s = 1 / math.sqrt(2)
    expected = (1 / 3 + (0 + s + s) / 3) / 2
    assert loss.item() == pytest.approx(expected)
    torch.testing.assert_close(loss, (L.orthogonal_loss(first, 3) + L.orthogonal_loss(second, 3)) / 2)


def test_orthogonal_no_new_class_is_zero():
    vectors = torch.randn(3, 4, requires_grad=True)
    loss = L.orthogonal_loss(vectors, num_old=3)
    assert loss.item() == 0.0 and loss.requires_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_autocast_matches_fp32(dtype):
    torch.manual_seed(2)
    num_old, num_classes = 3, 5
    old = (torch.randn(2, num_old, 6, 6) * 3).to(dtype)
    new = (torch.randn(2, num_classes, 6, 6) * 3).to(dtype)
    labels = torch.randint(0, num_classes, (2, 6, 6))
    labels[:, 0] = 255
    feat_new, feat_old = torch.randn(2, 4, 6, 6).to(dtype), torch.randn(2, 4, 6, 6).to(dtype)
    vectors = torch.randn(2, num_classes, 16).to(dtype)

    def compute(old, new, feat_new, feat_old, vectors):
        selective = L.selective_pseudo_labels(torch.zeros_like(labels), old)
        weight = L.afd_weight_map(old, selective, num_old)
        return selective, weight, torch.stack([
            L.adaptive_feature_distillation(feat_new, feat_old, weight),
            L.feature_distillation(feat_new, feat_old),
            L.label_guided_distillation(new, old, labels),
            L.knowledge_distillation(new, old),
            L.orthogonal_loss(vectors, num_old),
        ])

    # Reference: the same (half-precision-rounded) values in float32, no autocast.
    ref_labels, ref_weight, ref = compute(old.float(), new.float(), feat_new.float(), feat_old.float(),
                                          vectors.float())
    with torch.autocast("cpu", dtype=dtype):
        got_labels, got_weight, got = compute(old, new, feat_new, feat_old, vectors)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert got_weight.dtype == torch.float32
    assert torch.equal(got_labels, ref_labels)
    torch.testing.assert_close(got_weight, ref_weight)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_label_inputs_not_modified_in_place():
    torch.manual_seed(3)
    old = torch.randn(2, 3, 5, 5) * 4
    new = torch.randn(2, 4, 5, 5)
    labels = torch.randint(0, 4, (2, 5, 5))
    labels[0, 0] = 255
    original = labels.clone()
    plain = L.pseudo_labels(labels, old)
    selective = L.selective_pseudo_labels(labels, old)
    L.afd_weight_map(old, selective, num_old=3)
    L.label_guided_distillation(new, old, labels)
    assert torch.equal(labels, original)
    assert plain.data_ptr() != labels.data_ptr() and selective.data_ptr() != labels.data_ptr()
    # the selective labels only differ from plain ones by extra ignore pixels
    changed = selective != plain
    assert (selective[changed] == 255).all() and (plain[changed] == 0).all()
