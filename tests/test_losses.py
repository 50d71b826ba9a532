"""Tests of losses/mbs.py against small examples worked out by hand.

Old-model logits are built as ``log(p)`` from explicit probabilities ``p``
(which sum to 1), so ``softmax(log p) == p`` and every expected value below
can be written in terms of those probabilities.
"""

import math

import pytest
import torch

from losses import mbs as L
from losses import mib, plop
from tests.helpers import random_step_inputs


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


# ------------------------------------------------ the gather form against the previous one-hot form
# The oracle is the one-hot implementation this project used before (kept in the benchmark script).
from benchmarks.losses import previous_knowledge_distillation, previous_label_guided_distillation  # noqa: E402

# (B, C, C_old, H, W): odd sizes (so means are not divisions by powers of two), C_old = C included.
SHAPES = [(2, 5, 3, 7, 9), (1, 3, 2, 4, 5), (3, 21, 16, 5, 11), (2, 4, 4, 3, 3)]


def value_and_scaled_grad(loss_fn, new, *args):
    """The loss and its gradient w.r.t. the new logits times their element count (so entries are O(1))."""
    new.grad = None
    loss = loss_fn(new, *args)
    loss.backward()
    return loss.detach(), new.grad * new.numel()


@pytest.mark.parametrize("shape", SHAPES)
def test_lgkd_equals_previous_one_hot_form(shape):
    new, old, labels = random_step_inputs(*shape, seed=sum(shape))
    labels[-1, -1, -1] = shape[1]  # neither a current class nor ignore: no guidance
    value, grad = value_and_scaled_grad(L.label_guided_distillation, new, old, labels)
    expected_value, expected_grad = value_and_scaled_grad(previous_label_guided_distillation, new, old, labels)
    torch.testing.assert_close(value, expected_value, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_knowledge_distillation_equals_previous_form(shape):
    new, old, labels = random_step_inputs(*shape, seed=sum(shape) + 1)
    value, grad = value_and_scaled_grad(L.knowledge_distillation, new, old)
    expected_value, expected_grad = value_and_scaled_grad(previous_knowledge_distillation, new, old)
    torch.testing.assert_close(value, expected_value, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_lgkd_from_probs_takes_shared_log_softmax_and_softmax():
    new, old, labels = random_step_inputs(2, 5, 3, 6, 7, seed=4)
    shared = L.label_guided_distillation_from_probs(L.log_probabilities(new), L.old_probabilities(old), labels)
    assert torch.equal(shared, L.label_guided_distillation(new, old, labels))
    shared_kd = L.knowledge_distillation_from_probs(new, L.old_probabilities(old))
    assert torch.equal(shared_kd, L.knowledge_distillation(new, old))


def test_lgkd_from_probs_argument_checks():
    new, old, labels = random_step_inputs(2, 5, 3, 6, 7, seed=5)
    with pytest.raises(ValueError, match="label_guided_distillation"):
        L.label_guided_distillation_from_probs(L.log_probabilities(new)[:, :2], L.old_probabilities(old), labels)
    with pytest.raises(ValueError, match="label_guided_distillation"):
        L.label_guided_distillation_from_probs(L.log_probabilities(new), L.old_probabilities(old), labels[:, 1:])
    with pytest.raises(ValueError, match="knowledge_distillation"):
        L.knowledge_distillation_from_probs(new[:1], L.old_probabilities(old))


# ------------------------------------------------ IncrementalMethod.losses shares softmax / log-softmax
class _ClassVectors:
    """The one model method IncrementalMethod.losses calls (for the orthogonal term)."""

    def __init__(self, vectors):
        self.vectors = vectors

    def class_vectors(self):
        return self.vectors


@pytest.mark.parametrize("preset", ["mbs", "baseline", "finetune", "mib", "plop"])
def test_method_losses_equal_the_loss_functions_on_logits(preset):
    from models.base import SegmentationOutput
    from trainer.methods import build_method, resize_labels
    from utils.config import MethodConfig

    num_old, num_classes, threshold = 3, 5, 0.6
    torch.manual_seed(6)
    new_logits, old_logits, labels = random_step_inputs(2, num_classes, num_old, 12, 10, seed=6)
    labels = torch.where((labels >= 1) & (labels < num_old), 0, labels)  # step labels: old classes are 0
    # low-resolution maps of 4 x 4 and two stage maps: POD's regions need a width of at least 4
    new = SegmentationOutput(new_logits, torch.randn(2, num_classes, 4, 4), torch.randn(2, 8, 4, 4),
                             torch.randn(2, num_classes, 8), stages=[torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)])
    old = SegmentationOutput(old_logits, torch.randn(2, num_old, 4, 4), torch.randn(2, 8, 4, 4),
                             torch.randn(2, num_old, 8), stages=[torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)])
    model = _ClassVectors(torch.randn(num_classes, 8))
    method = build_method(MethodConfig(name=preset, pseudo_threshold=threshold), "voc", num_old, num_classes)
    # PLOP's thresholds (the trainer's pass sets them): between the entropies of these pixels, so some old pixels
    # are pseudo-labelled and some ignored; +inf for class 1 accepts all of its pixels
    thresholds = torch.tensor([0.12, float("inf"), 0.1, 0.001, 0.001])
    if method.needs_step_statistics:
        method.thresholds = thresholds
    terms = method.losses(labels, new, old if method.needs_old_model else None, model)

    switches = method.switches
    targets = labels
    expected = {}
    if preset in ("mbs", "baseline"):
        pseudo = L.selective_pseudo_labels if switches.selective_pl else L.pseudo_labels
        targets = pseudo(labels, old_logits, threshold)
        assert not torch.equal(targets, labels)  # the old model's probabilities are used
        if switches.afd:
            weight = L.afd_weight_map(old.logits_lowres, resize_labels(targets, (4, 4)), num_old)
            expected["feature_distill"] = switches.feature_distill_weight * L.adaptive_feature_distillation(
                new.features, old.features, weight)
        else:
            expected["feature_distill"] = switches.feature_distill_weight * L.feature_distillation(
                new.features, old.features)
        expected["class_embedding_distill"] = switches.class_embedding_distill_weight * torch.nn.functional.mse_loss(
            new.class_embeddings[:, :num_old], old.class_embeddings)
        output = (L.label_guided_distillation(new_logits, old_logits, labels) if switches.lgkd
                  else L.knowledge_distillation(new_logits, old_logits))
        expected["output_distill"] = switches.output_distill_weight * output
    if switches.ortho:
        expected["ortho"] = switches.ortho_weight * (2 / 5) * L.orthogonal_loss(model.vectors, num_old)
    expected["ce"] = torch.nn.functional.cross_entropy(new_logits, targets, ignore_index=255)
    if preset == "mib":
        # spec 1.5: UNCE averaged over all B*H*W pixels (the trainer's .mean()) + lambda (10 on VOC) * UNKD
        expected["ce"] = mib.unbiased_cross_entropy(new_logits, labels, num_old, reduction="none").mean()
        expected["output_distill"] = 10.0 * mib.unbiased_knowledge_distillation(new_logits, old_logits)
    if preset == "plop":
        # spec 2.6: CE on the entropy pseudo-labels, each image's map x its factor, .mean() over all pixels; POD
        targets, factor = plop.entropy_pseudo_labels(labels, old_logits, thresholds, num_old, num_classes=num_classes)
        ignored_old = (targets == 255) & (labels < num_old)
        assert ignored_old.any() and ((targets != labels) & ~ignored_old).any() and (factor < 1).all()
        ce_map = torch.nn.functional.cross_entropy(new_logits, targets, ignore_index=255, reduction="none")
        expected["ce"] = (factor * ce_map).mean()
        expected["feature_distill"] = 1.0 * plop.local_pod(
            [*new.stages, new.features, new.logits_lowres], [*old.stages, old.features, old.logits_lowres],
            factor=0.01, last_factor=0.0005, num_old=num_old, num_classes=num_classes, num_new=2)

    assert set(terms) == set(expected)
    for name in expected:
        if preset in ("mib", "plop"):  # the all-pixel mean is sum / numel, .mean() sums in another order
            torch.testing.assert_close(terms[name], expected[name], rtol=1e-6, atol=0, msg=name)
        else:
            assert torch.equal(terms[name], expected[name]), name
    # Same gradient w.r.t. the new logits (the shared log-softmax only changes the order of additions).
    _, grad = value_and_scaled_grad(lambda logits: sum(terms.values()), new_logits)
    _, expected_grad = value_and_scaled_grad(lambda logits: sum(expected.values()), new_logits)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset,all_pixels", [("mbs", False), ("finetune", False), ("mib", True), ("plop", True)])
def test_step_zero_is_cross_entropy_alone_with_the_family_reduction(preset, all_pixels):
    """Spec section 0: MiB's and PLOP's step 0 is plain CE (not UNCE) averaged over all B*H*W pixels; MBS's over
    the labelled ones."""
    from models.base import SegmentationOutput
    from trainer.methods import build_method
    from utils.config import MethodConfig

    logits, _, labels = random_step_inputs(2, 4, 1, 6, 5, seed=8)
    assert (labels == 255).any()
    method = build_method(MethodConfig(name=preset), "voc", 0, 4)
    output = SegmentationOutput(logits, torch.randn(2, 4, 2, 2), torch.randn(2, 8, 2, 2))
    terms = method.losses(labels, output, None, _ClassVectors(torch.randn(4, 8)))
    ce_map = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    expected = ce_map.mean() if all_pixels else ce_map.sum() / (labels != 255).sum()
    assert set(terms) == {"ce"}
    torch.testing.assert_close(terms["ce"], expected, rtol=1e-6, atol=0)
    assert not torch.allclose(ce_map.mean(), ce_map.sum() / (labels != 255).sum())  # the two reductions differ


def test_plop_losses_without_thresholds_are_a_bug():
    from models.base import SegmentationOutput
    from trainer.methods import build_method
    from utils.config import MethodConfig

    new_logits, old_logits, labels = random_step_inputs(2, 5, 3, 8, 8, seed=9)
    method = build_method(MethodConfig(name="plop"), "voc", 3, 5)
    assert method.needs_step_statistics and not method.has_step_statistics
    output = SegmentationOutput(new_logits, torch.randn(2, 5, 4, 4), torch.randn(2, 8, 4, 4))
    old = SegmentationOutput(old_logits, torch.randn(2, 3, 4, 4), torch.randn(2, 8, 4, 4))
    with pytest.raises(RuntimeError, match="PLOP's thresholds were never computed"):
        method.losses(labels, output, old, _ClassVectors(torch.randn(5, 8)))
