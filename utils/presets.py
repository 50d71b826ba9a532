"""The method presets: what each ``method.name`` turns on, and the weights that depend on the dataset.

This is the one home of the presets. The config reads it when it is loaded (a
contradictory switch is refused there, and ``--resume`` compares resolved
values); the trainer (``trainer/methods.py``) builds its method from it; the
report (``analysis/report.py``) names what a run set apart from its preset.

A method key left at null in the config takes its preset's value; one set
explicitly wins, so an ablation is a set of ``--opt`` lines. Switches are
resolved from ``method.name`` alone, the weights of :data:`DATASET_WEIGHTS`
from ``method.name`` and ``data.dataset``. The semantics of MiB's and PLOP's
switches are in ``shared/docs/BASELINES_SPEC.md`` (beside the checkout).
"""
from __future__ import annotations

from typing import Any, Optional

# Every switch a preset sets, by family: (a) weight transfer, cross-entropy, (b) pseudo-labels, (c) feature
# distillation, (d) output distillation, (e) the orthogonal objective. In a family, a ``*_distill`` /
# ``pseudo_labels`` switch turns the whole family on or off; its variants pick how it is computed.
SWITCHES = ("weight_transfer", "pseudo_labels", "selective_pl", "feature_distill", "afd", "output_distill",
            "lgkd", "ortho", "balanced_init", "unbiased_ce", "ce_all_pixels", "entropy_pl",
            "adaptive_ce_factor", "pod", "unkd")


def _turned_on(*names: str) -> dict[str, bool]:
    unknown = set(names) - set(SWITCHES)
    if unknown:  # a misspelt switch would silently stay off
        raise ValueError(f"unknown method switches {sorted(unknown)}")
    return {switch: switch in names for switch in SWITCHES}


PRESETS: dict[str, dict[str, bool]] = {
    "mbs": _turned_on("weight_transfer", "pseudo_labels", "selective_pl", "feature_distill", "afd",
                      "output_distill", "lgkd", "ortho"),
    # the MBS reference's non-MBS variant: plain pseudo-labels, unweighted feature MSE, plain KD
    "baseline": _turned_on("weight_transfer", "pseudo_labels", "feature_distill", "output_distill"),
    "finetune": _turned_on(),
    # MiB (spec 1.5): UNCE + lambda * UNKD, init_balanced; every CE averaged over all pixels, step 0 included
    "mib": _turned_on("weight_transfer", "balanced_init", "unbiased_ce", "ce_all_pixels", "output_distill",
                      "unkd"),
    # PLOP (spec 2.6): entropy pseudo-labels with the adaptive CE factor, Local POD, init_balanced; no
    # output distillation
    "plop": _turned_on("weight_transfer", "balanced_init", "ce_all_pixels", "pseudo_labels", "entropy_pl",
                       "adaptive_ce_factor", "feature_distill", "pod"),
}

# Weights whose value depends on the dataset: the project's default per dataset, used by every preset that
# does not name its own in PRESET_WEIGHTS. A weight only acts when its term is on (POD's factors with pod).
DATASET_WEIGHTS: dict[str, dict[str, float]] = {
    "output_distill_weight": {"voc": 25.0, "ade": 50.0},  # lambda: MBS's and its baseline's
    "pod_factor": {"voc": 0.01, "ade": 0.001},            # PLOP's f_l of the feature maps (spec 2.2)
    "pod_logits_factor": {"voc": 0.0005, "ade": 0.00001},  # PLOP's f_l of the logits (spec 2.2)
}
PRESET_WEIGHTS: dict[str, dict[str, dict[str, float]]] = {
    # spec 1.5: --method MiB sets lambda_kd = 10 whatever the dataset
    "mib": {"output_distill_weight": {"voc": 10.0, "ade": 10.0}},
}

# The method keys whose null means "the preset's value".
PRESET_KEYS = SWITCHES + tuple(DATASET_WEIGHTS)

# Variants of one family that cannot both be on: (first, second, the family).
EXCLUSIVE_VARIANTS = (("selective_pl", "entropy_pl", "pseudo-labelling"),
                      ("afd", "pod", "feature distillation"),
                      ("lgkd", "unkd", "output distillation"))
# A switch that only means something with another one on: (switch, what it needs, why).
NEEDS = (("balanced_init", "weight_transfer", "it is a way of transferring background's weights"),
         ("adaptive_ce_factor", "entropy_pl", "the factor is the share of entropy pseudo-labels"))


def preset_value(name: str, key: str, dataset: str) -> Any:
    """The value preset ``name`` gives ``key`` (a switch or a weight of :data:`DATASET_WEIGHTS`) on ``dataset``."""
    if key in DATASET_WEIGHTS:
        return PRESET_WEIGHTS.get(name, {}).get(key, DATASET_WEIGHTS[key])[dataset]
    return PRESETS[name][key]


def resolve_method(method_cfg: Any, dataset: str) -> dict[str, Any]:
    """Every key of :data:`PRESET_KEYS` with its value for this run: the config's when set, else the preset's.
    ``method_cfg`` is a ``utils.config.MethodConfig`` (any object with those attributes and ``name``)."""
    resolved = {}
    for key in PRESET_KEYS:
        explicit = getattr(method_cfg, key)
        if explicit is None:
            resolved[key] = preset_value(method_cfg.name, key, dataset)
        else:
            resolved[key] = bool(explicit) if key in SWITCHES else float(explicit)
    return resolved


def _origin(method_cfg: Any, key: str) -> str:
    return "set explicitly" if getattr(method_cfg, key) is not None else f"from the preset {method_cfg.name}"


def method_contradiction(method_cfg: Any) -> Optional[str]:
    """What is contradictory in the resolved switches, in one line naming both keys; None when nothing is."""
    switches = {key: (PRESETS[method_cfg.name][key] if getattr(method_cfg, key) is None
                      else bool(getattr(method_cfg, key))) for key in SWITCHES}
    for first, second, family in EXCLUSIVE_VARIANTS:
        if switches[first] and switches[second]:
            from_preset = [key for key in (first, second) if getattr(method_cfg, key) is None]
            fix = (f"set method.{from_preset[0]}=false" if len(from_preset) == 1
                   else f"set method.{first}=false or method.{second}=false")
            return (f"method.{first} ({_origin(method_cfg, first)}) and method.{second} "
                    f"({_origin(method_cfg, second)}) are both on, but they are two variants of the {family}: "
                    f"{fix}")
    for switch, needed, why in NEEDS:
        if switches[switch] and not switches[needed]:
            fix = (f"set method.{switch}=false" if getattr(method_cfg, switch) is None
                   else f"set method.{needed}=true or method.{switch}=false")
            return (f"method.{switch} ({_origin(method_cfg, switch)}) is on without method.{needed} "
                    f"({_origin(method_cfg, needed)}), but {why}: {fix}")
    return None
