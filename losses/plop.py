"""Loss terms of PLOP (Douillard et al., CVPR 2021), as its official code computes them.

The semantics are those of ``shared/docs/BASELINES_SPEC.md`` (beside the
checkout) section 2, read from PLOP's code at ``4b4a060``; "spec 2.2" below
points there. Several of PLOP's computations
differ from its paper (the triple entropy normalisation, the threshold walk
that is not a median, POD's width-based regions); they are reproduced on
purpose, because each one changes the numbers.

The conventions are those of :mod:`losses.mbs`: pure tensor functions, float32
with autocast off, old-model inputs detached, label maps never modified in
place, float32 results.

Shape letters: B batch, C classes of the current model, C_old classes seen
before the current step (background 0 included), C_new = C - C_old, H, W label
resolution, D_l channels of the l-th distilled map.
"""

import math
from typing import Iterable, Optional, Sequence, Tuple

import torch

from utils.ignore import IGNORE_INDEX

from .mbs import _check_spatial, _fp32_region, old_probabilities

__all__ = [
    "local_pod",
    "entropy_pseudo_labels",
    "entropy_pseudo_labels_from_probs",
    "entropy_histogram",
    "thresholds_from_histogram",
    "median_entropy_thresholds",
]


# ------------------------------------------------ Local POD
def _sum_extra_channels(new_map: torch.Tensor, num_old: int) -> torch.Tensor:
    """Spec 2.2 step 1 (``extra_channels="sum"``): the new classes' raw logits are added to channel 0."""
    background = new_map[:, :1] + new_map[:, num_old:].sum(dim=1, keepdim=True)
    return torch.cat([background, new_map[:, 1:num_old]], dim=1)


def _local_pod_embedding(squared: torch.Tensor, scales: Sequence[int]) -> torch.Tensor:
    """Spec 2.2 step 3: (B, D, h, w) -> (B, N), the concatenated row and column means of every region."""
    batch, width = squared.shape[0], squared.shape[-1]
    pieces = []
    for scale in scales:
        # Spec 2.2 trap: one k, from the WIDTH, slices both axes; the remainder rows / columns are dropped.
        k = width // scale
        for i in range(scale):
            for j in range(scale):
                region = squared[..., i * k:(i + 1) * k, j * k:(j + 1) * k]
                pieces.append(region.mean(dim=3).reshape(batch, -1))  # mean over width: one value per row
                pieces.append(region.mean(dim=2).reshape(batch, -1))  # mean over height: one value per column
    return torch.cat(pieces, dim=1)


def _check_pod_regions(shape: torch.Size, scales: Sequence[int], layer: int) -> None:
    """An empty region would make PLOP's mean NaN (and its finiteness assertion fail): refuse it up front."""
    height, width = shape[-2], shape[-1]
    for scale in scales:
        k = width // scale
        if k == 0 or height <= (scale - 1) * k:
            raise ValueError(f"local_pod: map {layer} of size {height}x{width} has an empty region at scale {scale} "
                             f"(PLOP slices both axes with k = width // scale = {k}; feed maps with H >= W)")


def local_pod(new_features: Sequence[torch.Tensor], old_features: Sequence[torch.Tensor],
              scales: Sequence[int] = (1, 2, 4), *, factor: float = 1.0, last_factor: Optional[float] = None,
              num_old: Optional[int] = None, num_classes: Optional[int] = None,
              num_new: Optional[int] = None) -> torch.Tensor:
    """PLOP's Local POD feature distillation (spec 2.1, 2.2; ``P:train.py:716-1014``).

    For each pair of maps ``(old_l, new_l)``, l = 0..L-1:

    1. last map only, when the new one has more channels: the new classes'
       raw logits are added to channel 0 (``extra_channels="sum"``);
    2. both maps are squared elementwise (after that sum);
    3. each is embedded: for each scale s, ``k = W // s`` (W the width)
       slices both axes into s x s regions, and every region contributes its
       mean over width (one value per row and channel) and its mean over
       height (one per column and channel); no normalisation;
    4. ``d_l`` = the L2 norm of the embedding difference of each image, averaged over the batch.

    ``L_pod = (1/L) * sum_l f_l * sqrt(C / C_new) * d_l``, where a layer with
    ``f_l <= 0`` adds nothing but still counts in L.

    Args:
        new_features: L maps (B,D_l,h_l,w_l) of the model being trained.
        old_features: the old model's L maps (detached), same shapes except the
            last one's channels: C_old there when the new one has C.
        scales: the pyramid's scales (PLOP's ``spp_scales``).
        factor: ``f_l`` of every map but the last (PLOP's ``pod_factor``).
        last_factor: ``f_{L-1}`` when given (PLOP's ``pod_options.switch.after.factor``); else ``factor``.
        num_old: C_old; needed when the last maps' channels differ.
        num_classes, num_new: C and C_new; when both are given, every layer is
            multiplied by ``sqrt(C / C_new)`` (PLOP's POD schedule). One
            without the other is refused.

    Returns:
        float32 scalar. When every factor is <= 0 it is an exact 0 without a graph.
    """
    new_features, old_features = list(new_features), list(old_features)
    if not new_features or len(new_features) != len(old_features):
        raise ValueError(f"local_pod: {len(new_features)} new maps and {len(old_features)} old maps "
                         "(need the same number, at least one)")
    if (num_classes is None) != (num_new is None):
        raise ValueError("local_pod: give num_classes and num_new together (the schedule sqrt(C / C_new)) or neither")
    num_layers = len(new_features)
    for layer, (new_map, old_map) in enumerate(zip(new_features, old_features)):
        if new_map.dim() != 4 or old_map.dim() != 4 or new_map.shape[0] != old_map.shape[0] \
                or new_map.shape[2:] != old_map.shape[2:]:
            raise ValueError(f"local_pod: map {layer}: new {tuple(new_map.shape)} and old {tuple(old_map.shape)} "
                             "are not (B,D,h,w) maps of one size")
        if new_map.shape[1] != old_map.shape[1]:
            is_last = layer == num_layers - 1
            if not is_last or new_map.shape[1] < old_map.shape[1] or num_old != old_map.shape[1]:
                raise ValueError(f"local_pod: map {layer}: new {new_map.shape[1]} vs old {old_map.shape[1]} channels; "
                                 "only the last map (the logits) may have more new channels, with num_old = the "
                                 "old channel count")
        _check_pod_regions(new_map.shape, scales, layer)
    schedule = math.sqrt(num_classes / num_new) if num_classes is not None else None

    with _fp32_region(new_features[0]):
        total = torch.zeros((), dtype=torch.float32, device=new_features[0].device)
        for layer, (new_map, old_map) in enumerate(zip(new_features, old_features)):
            is_last = layer == num_layers - 1
            layer_factor = last_factor if (is_last and last_factor is not None) else factor
            if layer_factor <= 0:
                continue  # spec 2.2 step 5: skipped, yet still counted in L below
            new_map, old_map = new_map.float(), old_map.detach().float()
            if new_map.shape[1] != old_map.shape[1]:
                new_map = _sum_extra_channels(new_map, num_old)
            # Spec 2.2 step 2 (prepro="pow"): squared after the channel sum.
            new_embedding = _local_pod_embedding(new_map.pow(2), scales)
            old_embedding = _local_pod_embedding(old_map.pow(2), scales)
            distance = torch.linalg.vector_norm(old_embedding - new_embedding, dim=-1).mean()
            layer_loss = layer_factor * distance
            if schedule is not None:
                layer_loss = layer_loss * schedule
            total = total + layer_loss
        # Spec 2.2 step 6 trap: divided by L, the number of maps, skipped ones included.
        return total / num_layers


# ------------------------------------------------ entropy
def _plop_entropy(probs: torch.Tensor, num_classes: int) -> torch.Tensor:
    """PLOP's normalised entropy (spec 2.3): (B,K,H,W) probabilities -> (B,H,W) float32.

    Trap: normalised three times, ``sum_c -p_c log(p_c + 1e-8) / (K * log K * log C)``:
    a MEAN over the K channels, divided by ``log(K + 1e-8)``, then by ``log C``
    (a float32 tensor). The operations follow PLOP's order, so the values are
    the same bits and the strict comparison with the thresholds agrees.
    """
    channel_count = probs.shape[1]
    scale = 1 / math.log(channel_count + 1e-8)
    entropy = -scale * torch.mean(probs * torch.log(probs + 1e-8), dim=1)
    max_entropy = torch.log(torch.tensor(num_classes, device=probs.device).float())
    return entropy / max_entropy


def entropy_pseudo_labels_from_probs(labels: torch.Tensor, old_probs: torch.Tensor, thresholds: torch.Tensor,
                                     num_old: int, ignore_index: int = IGNORE_INDEX, *,
                                     num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`entropy_pseudo_labels` given the old model's probabilities (B,C_old,H,W)."""
    _check_spatial(labels, old_probs, "entropy_pseudo_labels")
    if old_probs.shape[1] != num_old:
        raise ValueError(f"entropy_pseudo_labels: old probabilities have {old_probs.shape[1]} channels, "
                         f"num_old={num_old}")
    if thresholds.dim() != 1 or thresholds.numel() < num_old:
        raise ValueError(f"entropy_pseudo_labels: thresholds {tuple(thresholds.shape)} must be a vector of at "
                         f"least C_old={num_old} values (indexed by the old model's argmax)")
    with torch.no_grad(), _fp32_region(old_probs):
        probs = old_probs.detach().float()
        uncertainty = _plop_entropy(probs, num_classes)
        old_class = probs.max(dim=1).indices
        class_thresholds = thresholds.detach().to(device=probs.device, dtype=torch.float32)
        # Spec 2.5: strict <; a NaN threshold accepts nothing.
        confident = uncertainty < class_thresholds[old_class]
        # Spec 2.5: background AND old-class labels (< C_old) are pseudo-labelled (the histogram counts == 0 only).
        is_old = labels < num_old
        accepted = is_old & confident
        pseudo = torch.where(accepted, old_class.to(labels.dtype), labels)
        pseudo = torch.where(is_old & ~confident, torch.full_like(labels, ignore_index), pseudo)
        # Spec 2.5: the share of confidently pseudo-labelled old pixels per image; + 1e-6 keeps an image
        # without any old pixel at 0 instead of NaN.
        factor = accepted.float().sum(dim=(1, 2)) / (is_old.float().sum(dim=(1, 2)) + 1e-6)
        return pseudo, factor[:, None, None]


def entropy_pseudo_labels(labels: torch.Tensor, old_logits: torch.Tensor, thresholds: torch.Tensor, num_old: int,
                          ignore_index: int = IGNORE_INDEX, *,
                          num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """PLOP's entropy pseudo-labels and ``classif_adaptive_factor`` (spec 2.5, ``P:train.py:228-296``).

    At pixels whose label is < C_old (background or an old class), with ``c``
    the old model's argmax and ``u`` PLOP's entropy (spec 2.3): the label
    becomes ``c`` when ``u < thresholds[c]``, else ``ignore_index``. New-class
    and ignored pixels are unchanged.

    Args:
        labels: (B,H,W) long step labels; left untouched.
        old_logits: (B,C_old,H,W) full-resolution logits of the old model (detached).
        thresholds: (>= C_old,) per-class thresholds, e.g. from :func:`median_entropy_thresholds`.
        num_old: C_old.
        ignore_index: the label given to uncertain old pixels.
        num_classes: C, the current number of classes (the entropy's ``log C``).

    Returns:
        ``(pseudo_labels, factor)``: (B,H,W) long, a new tensor; (B,1,1)
        float32 ``|old & confident| / (|old| + 1e-6)`` per image, by which the
        caller multiplies the image's whole CE map before its all-pixel mean.
    """
    return entropy_pseudo_labels_from_probs(labels, old_probabilities(old_logits), thresholds, num_old,
                                            ignore_index, num_classes=num_classes)


# ------------------------------------------------ thresholds
def entropy_histogram(old_probs: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      nb_bins: int = 100) -> torch.Tensor:
    """One batch's share of PLOP's entropy histogram (spec 2.4 items 1-2).

    Each pixel labelled exactly 0 adds 1 at ``[argmax, min(trunc(u * nb_bins), nb_bins - 1)]``,
    ``u`` PLOP's entropy (spec 2.3). Histograms of batches (and processes) add up.

    Args:
        old_probs: (B,C_old,H,W) softmax of the old model's full-resolution logits.
        labels: (B,H,W) the step's labels.
        num_classes: C (the rows, and the entropy's ``log C``).
        nb_bins: bins over [0, 1].

    Returns:
        (C, nb_bins) int64 on ``old_probs``' device.
    """
    _check_spatial(labels, old_probs, "entropy_histogram")
    if old_probs.shape[1] > num_classes:
        raise ValueError(f"entropy_histogram: {old_probs.shape[1]} old channels exceed num_classes={num_classes}")
    with torch.no_grad(), _fp32_region(old_probs):
        probs = old_probs.detach().float()
        uncertainty = _plop_entropy(probs, num_classes)
        old_class = probs.max(dim=1).indices
        # Spec 2.4 trap: only labels == 0 are counted here, while pseudo-labelling uses labels < C_old.
        counted = (labels == 0).long()
        bins = (uncertainty * nb_bins).long().clamp(max=nb_bins - 1)
        histogram = torch.zeros(num_classes * nb_bins, dtype=torch.long, device=probs.device)
        # Adds 0 at uncounted pixels: no boolean indexing, so no device synchronisation.
        histogram.index_put_(((old_class * nb_bins + bins).reshape(-1),), counted.reshape(-1), accumulate=True)
        return histogram.view(num_classes, nb_bins)


def _walk_constants(nb_bins: int):
    """Per step k of PLOP's walk: the bin it reads, ``k / nb_bins`` and the running sum before it (spec 2.4 item 3).

    Computed in Python float64 as PLOP does: ``int((k / nb_bins) * nb_bins)``
    is k - 1 for k in {29, 57, 58} with 100 bins, and the running sum adds
    ``(k / nb_bins) * nb_bins``, the bin's POSITION.
    """
    lower_borders, bin_indices, running_before = [], [], []
    running = 0.0
    for k in range(nb_bins):
        lower_border = k / nb_bins
        lower_borders.append(lower_border)
        bin_indices.append(int(lower_border * nb_bins))
        running_before.append(running)
        running += lower_border * nb_bins
    return lower_borders, bin_indices, running_before, running


def thresholds_from_histogram(hist: torch.Tensor, threshold: float = 0.001) -> torch.Tensor:
    """PLOP's per-class "median entropy" thresholds from a summed histogram (spec 2.4 items 3-4).

    For each class with pixels, ``half = total / 2`` and a running sum start
    the walk over steps k = 0..nb_bins-1: it stops at the first k with
    ``running <= half <= running + hist[c, bin_k]``, else adds ``k`` (the bin's
    position, not its count: PLOP's bug, so this is not a median) to the
    running sum. The threshold is ``k / nb_bins + (half - running) / hist[c, bin_k] / nb_bins``
    at the step it stopped at, or at the last step (its addition included)
    when it never stopped. That gives +inf when ``half`` exceeds the final
    running sum (about 4950 with 100 bins) over an empty last bin, -inf (then
    the floor) when it is below it, and NaN when they are equal. Classes
    without pixels get 0, then the floor. The floor ``max(thr, threshold)``
    keeps NaN. The arithmetic is float32 with the Python-float terms rounded
    to float32, as PLOP's tensor-scalar operations do, so +inf and NaN fall at
    the same places.

    Args:
        hist: (C, nb_bins) int64, e.g. :func:`entropy_histogram` summed over batches and processes.
        threshold: the floor (PLOP's ``--threshold``, 0.001).

    Returns:
        (C,) float32 on ``hist``'s device.
    """
    if hist.dim() != 2 or hist.shape[1] < 1 or hist.dtype.is_floating_point:
        raise ValueError(f"thresholds_from_histogram: hist must be a (C, nb_bins) integer tensor, got "
                         f"{tuple(hist.shape)} {hist.dtype}")
    device = hist.device
    hist = hist.detach().cpu().long()
    nb_bins = hist.shape[1]
    lower_borders, bin_indices, running_before, running_after_last = _walk_constants(nb_bins)
    lower_borders = torch.tensor(lower_borders, dtype=torch.float64).float()
    running = torch.tensor(running_before, dtype=torch.float64).float()          # (nb_bins,)
    bin_indices = torch.tensor(bin_indices, dtype=torch.long)

    total = hist.sum(dim=1)                                                        # (C,) int64
    half = (total / 2).unsqueeze(1)                                                # (C,1) float32
    counts = hist[:, bin_indices]                                                  # (C, nb_bins): the bin step k reads
    stops = (half >= running) & (half <= running + counts.float())
    stopped = stops.any(dim=1)
    # First stopping step; the last step when the walk runs off the end.
    step = torch.where(stopped, stops.int().argmax(dim=1), torch.full_like(total, nb_bins - 1))
    running_at_step = torch.where(stopped, running[step],
                                  torch.tensor(running_after_last, dtype=torch.float64).float())
    count_at_step = hist.gather(1, bin_indices[step].unsqueeze(1)).squeeze(1)      # int64: x/0 gives inf or NaN
    fraction = ((half.squeeze(1) - running_at_step) / count_at_step) * torch.tensor(1 / nb_bins).float()
    walked = lower_borders[step] + fraction
    thresholds = torch.where(total > 0, walked, torch.zeros_like(walked))
    floor = torch.tensor(threshold, dtype=torch.float64).float()
    # Spec 2.4 item 4: max(thr, floor); NaN stays NaN (NaN < floor is false) and then accepts no pixel.
    thresholds = torch.where(thresholds < floor, floor, thresholds)
    return thresholds.to(device)


def median_entropy_thresholds(batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                              threshold: float = 0.001, nb_bins: int = 100) -> torch.Tensor:
    """PLOP's ``find_median(mode="entropy")`` (spec 2.4): per-class thresholds from one pass of the old model.

    :func:`entropy_histogram` summed over the batches, then :func:`thresholds_from_histogram`.

    Args:
        batches: iterable of ``(old_logits (B,C_old,H,W), labels (B,H,W))`` over the step's training data.
        num_classes: C.
        threshold: the floor.
        nb_bins: histogram bins.

    Returns:
        (num_classes,) float32, on the batches' device (CPU when there is none).
    """
    hist = None
    for old_logits, labels in batches:
        batch_hist = entropy_histogram(old_probabilities(old_logits), labels, num_classes, nb_bins)
        hist = batch_hist if hist is None else hist + batch_hist
    if hist is None:
        hist = torch.zeros(num_classes, nb_bins, dtype=torch.long)
    return thresholds_from_histogram(hist, threshold)
