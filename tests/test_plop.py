"""Tests of losses/plop.py: Local POD, PLOP's entropy, thresholds and pseudo-labels.

Expected numbers are worked out by hand from shared/docs/BASELINES_SPEC.md
section 2 ("spec 2.2"). Logits are built as ``log(p)`` from explicit
probabilities, so ``softmax(log p) == p``.

The last part compares with the official computation on random inputs. The
``official_*`` functions restate the spec's description in PLOP's own order of
operations (a zero-filled map for the extra channels, concatenated embeddings,
``index_put_`` into the histogram, the walk as a Python loop over 0-dim
tensors); they are written from the spec, not copied from PLOP.
"""

import math

import pytest
import torch

from losses import plop
from losses.mbs import old_probabilities


def logits_from_probs(*pixel_probs):
    """(1, C, 1, N) logits whose softmax at pixel n is pixel_probs[n]."""
    probs = torch.tensor(pixel_probs, dtype=torch.float32)  # (N, C)
    return probs.log().t().reshape(1, probs.shape[1], 1, probs.shape[0]).contiguous()


def single_channel(rows):
    """(1, 1, H, W) map from a list of rows."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


# ------------------------------------------------ Local POD by hand
# 4x4 map, x = 2 at (0,0) and 1 at (3,1); squared: 4 and 1. Against zeros, scales (1, 2):
#   scale 1 (k = 4): row means (1, 0, 0, 0.25), column means (1, 0.25, 0, 0)
#   scale 2 (k = 2): region (0,0): row means (2, 0), column means (2, 0);
#                    region (1,0) (rows 2-3, columns 0-1): row means (0, 0.5), column means (0, 0.5); others 0
#   squared norm: 1 + 1/16 + 1 + 1/16 + 4 + 4 + 1/4 + 1/4 = 10.625
POD_MAP = [[2, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]]
POD_DISTANCE = math.sqrt(10.625)


def test_local_pod_by_hand_on_a_4x4_map():
    new = single_channel(POD_MAP).requires_grad_()
    loss = plop.local_pod([new], [torch.zeros(1, 1, 4, 4)], scales=(1, 2))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(POD_DISTANCE, rel=1e-6)
    loss.backward()
    assert new.grad.abs().sum() > 0


def test_local_pod_squares_the_maps():
    # The maps are squared before pooling, so x and -x are the same map. (Unsquared, the map above would
    # give sqrt(3.125), not sqrt(10.625).)
    new = single_channel(POD_MAP)
    assert plop.local_pod([new], [-new], scales=(1, 2)).item() == 0.0


def test_local_pod_averages_the_image_distances_over_the_batch():
    new = torch.cat([single_channel(POD_MAP), torch.zeros(1, 1, 4, 4)])
    loss = plop.local_pod([new], [torch.zeros(2, 1, 4, 4)], scales=(1, 2))
    assert loss.item() == pytest.approx(POD_DISTANCE / 2, rel=1e-6)


def test_local_pod_slices_both_axes_with_the_widths_k():
    # 6x4 (H x W): k = 4 // s for the rows too, so rows 4 and 5 are never read (spec 2.2 trap).
    top = [[2, 0, 0, 0]] + [[0] * 4] * 5
    bottom = [[0] * 4] * 4 + [[3, 1, 0, 2], [1, 1, 1, 1]]
    zeros = torch.zeros(1, 1, 6, 4)
    # The top-left value gives what it gives on a 4x4 map: 4 at (0,0) squared, 1 + 1 + 4 + 4.
    assert plop.local_pod([single_channel(top)], [zeros], scales=(1, 2)).item() == pytest.approx(math.sqrt(10))
    assert plop.local_pod([single_channel(bottom)], [zeros], scales=(1, 2)).item() == 0.0


def test_local_pod_sums_the_new_channels_into_background_before_squaring():
    # Last map: old logits have C_old = 2 channels, new ones C = 3. 1x1 maps, scale 1: each channel gives its
    # value twice (row mean and column mean). New (1, 2, 3) -> (1 + 3, 2) -> squared (16, 4).
    new = torch.tensor([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1)
    loss = plop.local_pod([new], [torch.zeros(1, 2, 1, 1)], scales=(1,), num_old=2)
    assert loss.item() == pytest.approx(math.sqrt(2 * (16 ** 2 + 4 ** 2)))
    # Against old logits (2, 2): squared (4, 4); differences (12, 0).
    loss = plop.local_pod([new], [torch.full((1, 2, 1, 1), 2.0)], scales=(1,), num_old=2)
    assert loss.item() == pytest.approx(math.sqrt(2 * 12 ** 2))


def test_local_pod_zero_factor_skips_a_map_but_counts_it():
    feature_new = single_channel(POD_MAP) * 100  # would dominate if it were not skipped
    logits_new = torch.tensor([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1).expand(1, 3, 4, 4)
    # Constant logits over 4x4, scales (1, 2): each channel's squared value (16, 4) in 4 + 4 row and column
    # means at scale 1 and 4 regions x (2 + 2) at scale 2, 24 entries.
    logits_distance = math.sqrt(24 * (16 ** 2 + 4 ** 2))
    loss = plop.local_pod([feature_new, logits_new], [torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 4)],
                          scales=(1, 2), factor=0.0, last_factor=1.0, num_old=2)
    assert loss.item() == pytest.approx(logits_distance / 2, rel=1e-6)  # divided by L = 2, not 1
    everything_skipped = plop.local_pod([feature_new], [torch.zeros(1, 1, 4, 4)], scales=(1, 2), factor=0.0)
    assert everything_skipped.item() == 0.0 and everything_skipped.dtype == torch.float32


def test_local_pod_factors_and_schedule():
    feature_new = single_channel(POD_MAP)
    logits_new = torch.tensor([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1).expand(1, 3, 4, 4)
    logits_distance = math.sqrt(24 * (16 ** 2 + 4 ** 2))  # as above
    new, old = [feature_new, logits_new], [torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 4)]
    # PLOP VOC's factors; C = 3 classes of which C_new = 1 new: every layer times sqrt(3 / 1).
    loss = plop.local_pod(new, old, scales=(1, 2), factor=0.01, last_factor=0.0005, num_old=2, num_classes=3,
                          num_new=1)
    expected = (0.01 * POD_DISTANCE + 0.0005 * logits_distance) * math.sqrt(3) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Without the class counts there is no schedule; without last_factor the last map takes factor.
    no_schedule = plop.local_pod(new, old, scales=(1, 2), factor=0.01, num_old=2)
    assert no_schedule.item() == pytest.approx(0.01 * (POD_DISTANCE + logits_distance) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="num_classes and num_new"):
        plop.local_pod(new, old, scales=(1, 2), num_old=2, num_classes=3)


def test_local_pod_of_equal_maps_is_zero_with_zero_gradients():
    torch.manual_seed(0)
    old = torch.randn(2, 3, 8, 8)
    new = old.clone().requires_grad_()
    loss = plop.local_pod([new], [old])
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(new.grad, torch.zeros_like(new))  # the norm's gradient at 0 is 0, not NaN


def test_local_pod_gradient_reaches_only_the_new_maps():
    old = torch.randn(2, 3, 8, 8, requires_grad=True)
    new = torch.randn(2, 3, 8, 8, requires_grad=True)
    plop.local_pod([new], [old]).backward()
    assert old.grad is None and new.grad.abs().sum() > 0


def test_local_pod_refuses_maps_it_cannot_pair():
    with pytest.raises(ValueError, match="last map"):  # extra channels on a map that is not the last
        plop.local_pod([torch.randn(1, 3, 4, 4), torch.randn(1, 2, 4, 4)],
                       [torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)], num_old=2)
    with pytest.raises(ValueError, match="num_old"):  # extra channels without C_old
        plop.local_pod([torch.randn(1, 3, 4, 4)], [torch.randn(1, 2, 4, 4)])
    with pytest.raises(ValueError, match="empty region"):  # H < W: PLOP's regions would be empty (NaN)
        plop.local_pod([torch.randn(1, 2, 4, 12)], [torch.randn(1, 2, 4, 12)])
    with pytest.raises(ValueError, match="same number"):
        plop.local_pod([torch.randn(1, 2, 4, 4)], [])


# ------------------------------------------------ PLOP's entropy by hand
# C_old = 3, C = 5, p = (0.5, 0.25, 0.25): sum -p log p = 1.5 log 2. PLOP's value (spec 2.3) is that sum
# / (C_old * log C_old * log C) = 0.19601..., bin 19. The paper's H / log C would be 0.646 (bin 64),
# H / log C_old 0.946 (bin 94).
HAND_ENTROPY = 1.5 * math.log(2) / (3 * math.log(3) * math.log(5))


def test_plop_entropy_by_hand_in_the_histogram():
    probs = old_probabilities(logits_from_probs((0.5, 0.25, 0.25)))
    hist = plop.entropy_histogram(probs, torch.zeros(1, 1, 1, dtype=torch.long), num_classes=5)
    assert hist.dtype == torch.int64 and hist.shape == (5, 100)
    assert int(HAND_ENTROPY * 100) == 19
    assert hist[0, 19].item() == 1 and hist.sum().item() == 1


def test_plop_entropy_by_hand_against_a_threshold():
    logits = logits_from_probs((0.5, 0.25, 0.25))
    labels = torch.zeros(1, 1, 1, dtype=torch.long)
    above = torch.tensor([HAND_ENTROPY * (1 + 1e-5), 1.0, 1.0])
    below = torch.tensor([HAND_ENTROPY * (1 - 1e-5), 1.0, 1.0])
    assert plop.entropy_pseudo_labels(labels, logits, above, 3, num_classes=5)[0].item() == 0
    assert plop.entropy_pseudo_labels(labels, logits, below, 3, num_classes=5)[0].item() == 255


# ------------------------------------------------ the threshold walk by hand
def histogram(*rows):
    """(len(rows), 100) int64 from {bin: count} dicts."""
    hist = torch.zeros(len(rows), 100, dtype=torch.long)
    for index, counts in enumerate(rows):
        for bin_index, count in counts.items():
            hist[index, bin_index] = count
    return hist


# Each row: its counts, and by hand the walk's result before the floor (spec 2.4 item 3). The walk stops at
# the first k with running <= half <= running + hist[bin_k], else adds k (the position) to running.
WALK_ROWS = [
    # half 5000 <= 0 + 6000 at k = 0: 0 + (5000 / 6000) / 100.
    ({0: 6000, 1: 3000, 2: 1000}, 0.01 * 5000 / 6000),
    # half 5: k = 0, 1 (running 0), 2 (running 1) fail; k = 3, running 0 + 1 + 2 = 3: 3 <= 5 <= 13.
    # 0.03 + (5 - 3) / 10 / 100 = 0.032, where adding the counts (a true median) would give 0.035.
    ({3: 10}, 0.032),
    # k = 29 reads bin 28 (int(0.29 * 100) = 28). half 410: k = 28 fails (378 <= 410 <= 388 is false),
    # k = 29: running 406 <= 410 <= 406 + 10. 0.29 + 4 / 10 / 100.
    ({28: 10, 99: 810}, 0.294),
    # half 5000: no early bin holds it; the walk runs off the end with running = 0 + 1 + ... + 99 = 4950
    # over an empty last bin: (5000 - 4950) / 0 = +inf.
    ({0: 4000, 1: 3500, 2: 2500}, math.inf),
    # half 4950 = running at the end: 0 / 0 = NaN.
    ({0: 4000, 1: 3500, 2: 2400}, math.nan),
    # half 2 < running at the end: (2 - 4950) / 0 = -inf, so the floor.
    ({5: 4}, -math.inf),
    # never predicted: 0, so the floor.
    ({}, 0.0),
]


@pytest.mark.parametrize("floor", [0.001, 0.3])
def test_threshold_walk_by_hand(floor):
    hist = histogram(*(counts for counts, _ in WALK_ROWS))
    thresholds = plop.thresholds_from_histogram(hist, threshold=floor)
    assert thresholds.dtype == torch.float32 and thresholds.shape == (len(WALK_ROWS),)
    for (counts, walked), got in zip(WALK_ROWS, thresholds.tolist()):
        if math.isnan(walked):
            assert math.isnan(got), counts
        else:
            expected = max(walked, floor)  # Python's max, as in PLOP: the floor only raises
            assert got == pytest.approx(expected, rel=1e-6), counts


def test_thresholds_from_histogram_keeps_the_device_and_refuses_floats():
    assert plop.thresholds_from_histogram(torch.zeros(2, 100, dtype=torch.long)).tolist() == \
        pytest.approx([0.001, 0.001])
    with pytest.raises(ValueError, match="integer"):
        plop.thresholds_from_histogram(torch.zeros(2, 100))


# ------------------------------------------------ pseudo-labels by hand
ONE_HOT_0 = (1.0, 0.0, 0.0)  # entropy exactly 0 (0 * log(0 + 1e-8) = 0, log(1 + 1e-8) = 0 in float32)
ONE_HOT_1 = (0.0, 1.0, 0.0)
MOSTLY_2 = (0.1, 0.1, 0.8)   # entropy (0.2 log 10 + 0.8 log 1.25) / (3 log 3 log 5) = 0.1205: bin 12
SPLIT_1 = (0.2, 0.5, 0.3)
PSEUDO_PROBS = [ONE_HOT_0, MOSTLY_2, MOSTLY_2, ONE_HOT_1, MOSTLY_2, ONE_HOT_0, SPLIT_1]
PSEUDO_LABELS = [[0, 0, 1, 0, 3, 255, 2],      # image 0: C_old = 3, C = 5 (classes 3 and 4 new)
                 [3, 4, 255, 3, 4, 255, 3]]    # image 1: no label < C_old at all
# Thresholds per old class: background and class 2 accept every entropy here; class 1's 0 accepts none,
# not even an entropy of exactly 0 (the comparison is strict).
PSEUDO_THRESHOLDS = torch.tensor([1.0, 0.0, 1.0])


def pseudo_inputs():
    probs = torch.tensor(PSEUDO_PROBS)
    # -200 for a zero probability: exp(-200) underflows to 0 in float32, so softmax gives exactly 0 and 1.
    logits = torch.where(probs > 0, probs.log(), -200.0).t().reshape(1, 3, 1, len(PSEUDO_PROBS))
    logits = logits.expand(2, -1, -1, -1).contiguous()
    labels = torch.tensor(PSEUDO_LABELS).reshape(2, 1, len(PSEUDO_PROBS))
    return logits, labels


def test_entropy_pseudo_labels_by_hand():
    logits, labels = pseudo_inputs()
    assert torch.equal(old_probabilities(logits)[0, :, 0, 0], torch.tensor(ONE_HOT_0))
    original = labels.clone()
    pseudo, factor = plop.entropy_pseudo_labels(labels, logits, PSEUDO_THRESHOLDS, 3, num_classes=5)
    assert pseudo.dtype == torch.long and pseudo.shape == labels.shape
    assert pseudo[0, 0].tolist() == [
        0,    # background, certain background: stays 0
        2,    # background, class 2 below its threshold: pseudo-labelled
        2,    # an old-class label (1 < C_old) is pseudo-labelled too: labels < C_old, not == 0
        255,  # entropy 0 is not < class 1's threshold 0: strict, so uncertain -> ignored
        3,    # new class: unchanged
        255,  # ignored: unchanged
        255,  # old class 2 labelled, argmax 1 rejected: ignored
    ]
    assert pseudo[1].equal(labels[1])  # no old pixel: nothing changes
    assert torch.equal(labels, original) and pseudo.data_ptr() != labels.data_ptr()
    # Factor: image 0 has 5 pixels < C_old, 3 of them accepted; image 1 has none: 0 / (0 + 1e-6) = 0, not NaN.
    assert factor.dtype == torch.float32 and factor.shape == (2, 1, 1)
    assert factor[0].item() == pytest.approx(3 / 5, rel=1e-6)
    assert factor[1].item() == 0.0


def test_entropy_pseudo_labels_nan_threshold_accepts_nothing():
    logits, labels = pseudo_inputs()
    pseudo, factor = plop.entropy_pseudo_labels(labels, logits, torch.tensor([math.nan, 1.0, math.nan]), 3,
                                                num_classes=5)
    assert pseudo[0, 0].tolist() == [255, 255, 255, 1, 3, 255, 1]
    assert factor[0].item() == pytest.approx(2 / 5, rel=1e-6)


def test_entropy_pseudo_labels_from_probs_equals_logits_form():
    logits, labels = pseudo_inputs()
    thresholds = torch.tensor([0.05, 0.2, 0.13])
    pseudo, factor = plop.entropy_pseudo_labels(labels, logits, thresholds, 3, num_classes=5)
    shared_pseudo, shared_factor = plop.entropy_pseudo_labels_from_probs(labels, old_probabilities(logits),
                                                                         thresholds, 3, num_classes=5)
    assert torch.equal(pseudo, shared_pseudo) and torch.equal(factor, shared_factor)
    (logits, labels), = random_threshold_batches(num_old=3, num_classes=5, count=1, size=16, seed=1)
    pseudo, factor = plop.entropy_pseudo_labels(labels, logits, thresholds, 3, num_classes=5)
    shared_pseudo, shared_factor = plop.entropy_pseudo_labels_from_probs(labels, old_probabilities(logits),
                                                                         thresholds, 3, num_classes=5)
    assert torch.equal(pseudo, shared_pseudo) and torch.equal(factor, shared_factor)
    with pytest.raises(ValueError, match="thresholds"):
        plop.entropy_pseudo_labels(labels, logits, thresholds[:2], 3, num_classes=5)
    with pytest.raises(ValueError, match="num_old"):
        plop.entropy_pseudo_labels(labels, logits, thresholds, 2, num_classes=5)


def test_entropy_histogram_counts_only_label_zero():
    logits, labels = pseudo_inputs()
    hist = plop.entropy_histogram(old_probabilities(logits), labels, num_classes=5)
    mostly_2_bin = int(100 * (0.2 * math.log(10) + 0.8 * math.log(1.25)) / (3 * math.log(3) * math.log(5)))
    assert mostly_2_bin == 12
    expected = torch.zeros(5, 100, dtype=torch.long)
    expected[0, 0] = 1              # pixel 0: certain background
    expected[2, mostly_2_bin] = 1   # pixel 1; pixel 2 (label 1) is not counted, though it is pseudo-labelled
    expected[1, 0] = 1              # pixel 3: certain class 1
    assert torch.equal(hist, expected)


def test_median_entropy_thresholds_is_the_summed_histogram_walked():
    batches = random_threshold_batches(num_old=2, num_classes=3, count=6, size=64, seed=0)
    thresholds = plop.median_entropy_thresholds(batches, num_classes=3, threshold=0.001)
    summed = sum(plop.entropy_histogram(old_probabilities(logits), labels, 3) for logits, labels in batches)
    torch.testing.assert_close(thresholds, plop.thresholds_from_histogram(summed, 0.001), rtol=0, atol=0,
                               equal_nan=True)
    assert thresholds.shape == (3,) and thresholds.dtype == torch.float32
    assert torch.isinf(thresholds[:2]).all()  # about 14,700 pixels per class: half > 4950, off the end
    assert plop.median_entropy_thresholds([], num_classes=3).tolist() == pytest.approx([0.001] * 3)


def test_bf16_autocast_on_cpu_equals_float32():
    generator = torch.Generator().manual_seed(5)
    new = [torch.randn(2, 4, 8, 8, generator=generator).bfloat16(), torch.randn(2, 5, 8, 8, generator=generator)
           .bfloat16()]
    old = [torch.randn(2, 4, 8, 8, generator=generator).bfloat16(), torch.randn(2, 3, 8, 8, generator=generator)
           .bfloat16()]
    labels = torch.randint(0, 5, (2, 8, 8), generator=generator)
    thresholds = torch.tensor([0.05, 0.02, 0.1])

    def compute(new, old):
        pod = plop.local_pod(new, old, factor=0.01, last_factor=0.0005, num_old=3, num_classes=5, num_new=2)
        pseudo, factor = plop.entropy_pseudo_labels(labels, old[1], thresholds, 3, num_classes=5)
        hist = plop.entropy_histogram(old_probabilities(old[1]), labels, 5)
        return pod, pseudo, factor, hist

    reference = compute([x.float() for x in new], [x.float() for x in old])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = compute(new, old)
    assert got[0].dtype == torch.float32
    for value, expected in zip(got, reference):
        assert torch.equal(value, expected)


# ------------------------------------------------ the official computation
def official_local_embedding(x, scales):
    """Spec 2.2 step 3, one concatenated embedding."""
    batch, width = x.shape[0], x.shape[-1]
    pieces = []
    for scale in scales:
        k = width // scale
        for i in range(scale):
            for j in range(scale):
                region = x[..., i * k:(i + 1) * k, j * k:(j + 1) * k]
                pieces.append(region.mean(dim=3).view(batch, -1))
                pieces.append(region.mean(dim=2).view(batch, -1))
    return torch.cat(pieces, dim=1)


def official_local_pod(old_maps, new_maps, scales, factor, last_factor, num_old, num_classes, num_new):
    """Spec 2.2 in PLOP's order: (old, new) pairs; the extra channels summed into a zero-filled copy; squared;
    embedded; the norm of each image's difference; the batch mean; skipped when the factor is <= 0; the schedule;
    divided by the number of maps."""
    loss = torch.tensor(0.0)
    for index, (a, b) in enumerate(zip(old_maps, new_maps)):
        layer_factor = factor
        if index == len(old_maps) - 1 and last_factor is not None:
            layer_factor = last_factor
        if a.shape[1] != b.shape[1]:
            summed = torch.zeros_like(a)
            summed[:, 0] = b[:, 0] + b[:, num_old:].sum(dim=1)
            summed[:, 1:] = b[:, 1:num_old]
            b = summed
        a, b = torch.pow(a, 2), torch.pow(b, 2)
        a, b = official_local_embedding(a, scales), official_local_embedding(b, scales)
        layer_loss = torch.mean(torch.linalg.vector_norm(a - b, dim=-1))
        if layer_factor <= 0:
            continue
        layer_loss = layer_factor * layer_loss
        if num_classes is not None:
            layer_loss = layer_loss * math.sqrt(num_classes / num_new)
        loss += layer_loss
    return loss / len(old_maps)


def official_entropy(probs):
    """Spec 2.3: the channel mean of p log(p + 1e-8), over log(K + 1e-8)."""
    scale = 1 / math.log(probs.shape[1] + 1e-8)
    return -scale * torch.mean(probs * torch.log(probs + 1e-8), dim=1)


def official_histogram(batches, num_classes, nb_bins=100):
    """Spec 2.4 items 1-2."""
    max_value = torch.log(torch.tensor(num_classes).float())
    hist = torch.zeros(num_classes, nb_bins).long()
    for old_logits, labels in batches:
        counted = labels == 0
        probs = torch.softmax(old_logits, dim=1)
        _, old_class = probs.max(dim=1)
        values = official_entropy(probs)[counted].view(-1) / max_value
        rows = old_class[counted].view(-1)
        columns = torch.clamp((values * nb_bins).long(), max=nb_bins - 1)
        hist.index_put_((rows, columns), torch.ones_like(rows), accumulate=True)
    return hist


def official_walk(hist, floor):
    """Spec 2.4 items 3-4, as written: a Python loop over 0-dim tensors and Python floats."""
    num_classes, nb_bins = hist.shape
    thresholds = torch.zeros(num_classes, dtype=torch.float32)
    for c in range(num_classes):
        total = hist[c].sum()
        if total <= 0.:
            continue
        half = total / 2
        running = 0.
        for step in range(nb_bins):
            lower_border = step / nb_bins
            bin_index = int(lower_border * nb_bins)
            if half >= running and half <= (running + hist[c, bin_index]):
                break
            running += lower_border * nb_bins
        thresholds[c] = lower_border + ((half - running) / hist[c, bin_index].sum()) * (1 / nb_bins)
    for c in range(num_classes):
        thresholds[c] = max(thresholds[c], floor)
    return thresholds


def official_pseudo_labels(labels, old_logits, thresholds, num_old, num_classes):
    """Spec 2.5: the labels changed in place on a copy; the factor."""
    labels = labels.clone()
    is_old = labels < num_old
    probs = torch.softmax(old_logits, dim=1)
    _, old_class = probs.max(dim=1)
    max_entropy = torch.log(torch.tensor(num_classes).float())
    confident = (official_entropy(probs) / max_entropy) < thresholds[old_class]
    labels[~confident & is_old] = 255
    labels[confident & is_old] = old_class[confident & is_old]
    factor = (confident & is_old).float().sum(dim=(1, 2)) / (is_old.float().sum(dim=(1, 2)) + 1e-6)
    return labels, factor[:, None, None]


def assert_relatively_close(actual, expected, rtol=1e-5):
    """Within ``rtol`` of each entry or of the largest entry (rounding is relative to the terms summed)."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


POD_CASES = [
    # (height, width, scales, factor, last_factor, (C_old, C) or None for same-channel logits, schedule)
    pytest.param(16, 16, (1, 2, 4), 0.01, 0.0005, (16, 17), True, id="square-voc15-1"),
    pytest.param(10, 10, (1, 2, 4), 0.001, 0.00001, (101, 151), True, id="10x10-ade100-50"),
    pytest.param(9, 9, (1, 2, 4), 0.01, 0.0005, (16, 21), True, id="9x9-voc15-5"),
    pytest.param(12, 8, (1, 2, 4), 0.01, 0.0005, (20, 21), True, id="12x8-voc19-1"),
    pytest.param(12, 8, (1, 2), 0.0, 0.0005, (16, 17), True, id="12x8-zero-feature-factor-scales-1-2"),
    pytest.param(9, 9, (1, 2), 1.0, None, None, False, id="9x9-plain"),
]


@pytest.mark.parametrize("height,width,scales,factor,last_factor,classes,schedule", POD_CASES)
def test_local_pod_matches_the_official_computation(height, width, scales, factor, last_factor, classes,
                                                    schedule):
    generator = torch.Generator().manual_seed(height * width)
    num_old, num_classes = classes if classes else (5, 5)
    num_new = num_classes - num_old if schedule else None
    shapes = [(2, 8, height, width), (2, 6, height, width), (2, 4, height, width)]
    old = [torch.randn(*shape, generator=generator) for shape in shapes]
    old.append(3 * torch.randn(2, num_old, height, width, generator=generator))
    new = [(x + torch.randn(x.shape, generator=generator)).requires_grad_() for x in old[:-1]]
    new.append((3 * torch.randn(2, num_classes, height, width, generator=generator)).requires_grad_())
    counts = dict(num_old=num_old, num_classes=num_classes if schedule else None, num_new=num_new)

    value = plop.local_pod(new, old, scales, factor=factor, last_factor=last_factor, **counts)
    grads = torch.autograd.grad(value, new, allow_unused=True)
    expected = official_local_pod(old, new, scales, factor, last_factor, **counts)
    expected_grads = torch.autograd.grad(expected, new, allow_unused=True)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0)
    for grad, expected_grad in zip(grads, expected_grads):
        if expected_grad is None:  # a skipped map
            assert grad is None or not grad.any()
        else:
            assert_relatively_close(grad, expected_grad)


def random_threshold_batches(num_old, num_classes, count, size, seed, scale=3.0):
    """Old logits and step labels (old classes already 0, some new classes and 255)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        logits = scale * torch.randn(2, num_old, size, size, generator=generator)
        values = torch.tensor([0, 0, 0, *range(num_old, num_classes), 255])
        labels = values[torch.randint(0, len(values), (2, size, size), generator=generator)]
        batches.append((logits, labels))
    return batches


THRESHOLD_CASES = [
    # (C_old, C, batches, size): small steps give finite thresholds and floors; (2, 3) on many pixels runs
    # off the end of the walk (+inf).
    pytest.param(16, 17, 3, 32, id="voc15-1-step1"),
    pytest.param(20, 21, 3, 32, id="voc15-1-step5"),
    pytest.param(16, 21, 3, 32, id="voc15-5"),
    pytest.param(11, 12, 3, 32, id="voc10-1-step1"),
    pytest.param(101, 151, 2, 32, id="ade100-50"),
    pytest.param(2, 3, 6, 64, id="off-the-end"),
]


@pytest.mark.parametrize("floor", [0.001, 0.3])
@pytest.mark.parametrize("num_old,num_classes,count,size", THRESHOLD_CASES)
def test_thresholds_and_pseudo_labels_match_the_official_computation(num_old, num_classes, count, size, floor):
    batches = random_threshold_batches(num_old, num_classes, count, size, seed=num_old + num_classes)
    hist = official_histogram(batches, num_classes)
    expected = official_walk(hist, floor)
    thresholds = plop.median_entropy_thresholds(batches, num_classes, threshold=floor)
    assert torch.equal(torch.isnan(thresholds), torch.isnan(expected))
    assert torch.equal(torch.isinf(thresholds), torch.isinf(expected))
    torch.testing.assert_close(thresholds, expected, rtol=0, atol=0, equal_nan=True)

    # Pseudo-labels exactly, from these thresholds, from arbitrary ones, and from thresholds set to the official
    # entropy of one pixel per class and to the next float32 above it: with the strict <, that pixel is
    # rejected, then accepted, so a one-bit difference in the entropy would change its label.
    generator = torch.Generator().manual_seed(num_classes)
    arbitrary = torch.rand(num_old, generator=generator) * 0.05
    probs = torch.softmax(batches[0][0], dim=1)
    official_values = official_entropy(probs) / torch.log(torch.tensor(num_classes).float())
    old_class = probs.argmax(dim=1)
    ties = torch.full((num_old,), 0.5)
    for c in old_class.unique():
        ties[c] = official_values[old_class == c][0]
    just_above = torch.nextafter(ties, torch.tensor(math.inf))
    for class_thresholds in (thresholds, arbitrary, ties, just_above):
        for old_logits, labels in batches[:2]:
            labels = labels.clone()
            labels[0, :2] = torch.randint(1, num_old, (2, size), generator=generator) if num_old > 1 else 0
            pseudo, factor = plop.entropy_pseudo_labels(labels, old_logits, class_thresholds, num_old,
                                                        num_classes=num_classes)
            expected_pseudo, expected_factor = official_pseudo_labels(labels, old_logits, class_thresholds,
                                                                      num_old, num_classes)
            assert torch.equal(pseudo, expected_pseudo)
            assert torch.equal(factor, expected_factor)


def test_walk_matches_the_official_computation_on_hand_histograms():
    hist = histogram(*(counts for counts, _ in WALK_ROWS))
    for floor in (0.001, 0.3):
        torch.testing.assert_close(plop.thresholds_from_histogram(hist, floor), official_walk(hist, floor),
                                   rtol=0, atol=0, equal_nan=True)
    # Large counts (float32 rounds them) and every bin filled: the same bits.
    generator = torch.Generator().manual_seed(7)
    big = torch.randint(0, 2 ** 26, (20, 100), generator=generator) * (torch.rand(20, 100, generator=generator) < 0.1)
    big[:5, 99] = 0
    torch.testing.assert_close(plop.thresholds_from_histogram(big), official_walk(big, 0.001), rtol=0, atol=0,
                               equal_nan=True)
