"""One typed configuration schema for every run.

A run is described by a YAML file (``configs/*.yaml``) plus ``--opt key=value``
overrides on the command line. Every key has a default here; an unknown or
misspelled key is an error that names it (with the closest known key), and a
value of the wrong type or outside its allowed set is an error naming the key.
The fully resolved config is saved with every run (``config.yaml``).

Every key is declared in one line, its field (``config_key``): default, allowed
values (``choices``) or ``range``, role (EXPERIMENT: ``--resume`` refuses a
change; HARMLESS: a change only warns) and whether it is part of the step-0
recipe (STEP0). ``CHOICES``, ``RANGES``, ``EXPERIMENT_KEYS``, ``HARMLESS_KEYS``
and ``STEP0_KEYS`` are derived from those fields; a field without a role is an
error at import.

A field's annotation is checked down to the elements (``list[float]``,
``dict[str, Any]``, ``Optional[list[list[int]]]``), so a wrong element is an error
naming it (``data.custom_steps[1][0]``). A config file is read as UTF-8 (a BOM is
dropped), and a key written twice in one mapping is refused: PyYAML would keep the
second silently. A float key also takes ``5e-1``, which PyYAML (YAML 1.1) reads as a
string.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import numbers
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from utils.errors import UserError
from utils.files import read_text
from utils.presets import PRESETS, method_contradiction, resolve_method


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the key or file."""


@dataclass(frozen=True)
class Range:
    """The numbers a config key allows; ``None`` (an optional key left at null) always passes."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False     # low itself is not allowed
    high_open: bool = False

    def allows(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


POSITIVE, AT_LEAST_0, AT_LEAST_1 = Range(0, low_open=True), Range(0), Range(1)
FRACTION, PROBABILITY = Range(0, 1), Range(0, 1, high_open=True)

# The role of a key: what --resume does when its value differs from the one saved in the run folder.
EXPERIMENT = "experiment"  # it defines the experiment (a run folder holds one recipe): refused
HARMLESS = "harmless"      # where things are or how the run executes, not what it computes: a warning
ROLES = (EXPERIMENT, HARMLESS)
# Part of the step-0 recipe (trainer/step0_reuse.py): a reused step 0 must have been trained with the same value.
STEP0 = "step0"

_ROLE, _STEP0, _CHOICES, _RANGE = "role", "step0", "choices", "range"  # field metadata names


def config_key(default: Any, role: str, step0: Optional[str] = None, *, choices: Optional[set] = None,
               range: Optional[Range] = None) -> Any:
    """A config field with its metadata, e.g. ``lr: float = config_key(0.01, EXPERIMENT, STEP0, range=POSITIVE)``.
    A list or dict default is copied for every instance (a dataclass default must not be shared)."""
    if step0 not in (None, STEP0):
        raise TypeError(f"config_key: the third argument is STEP0 or nothing, got {step0!r}")
    metadata = {_ROLE: role, _STEP0: step0 == STEP0, _CHOICES: frozenset(choices) if choices else None,
                _RANGE: range}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class SyntheticConfig:
    """The built-in synthetic dataset; when enabled, the step-0 recipe takes this section whole."""

    # generate the built-in synthetic dataset at data.root if absent
    enabled: bool = config_key(False, EXPERIMENT, STEP0)
    num_train: int = config_key(1000, EXPERIMENT, STEP0, range=AT_LEAST_1)
    num_val: int = config_key(200, EXPERIMENT, STEP0, range=AT_LEAST_1)
    image_size: int = config_key(128, EXPERIMENT, STEP0, range=Range(16))  # the generator draws nothing smaller
    seed: int = config_key(0, EXPERIMENT, STEP0)


@dataclass
class DataConfig:
    dataset: str = config_key("voc", EXPERIMENT, STEP0, choices={"voc", "ade"})
    # data.root / class_lists / cache_dir are locations: data moved to another disk is the same data
    root: str = config_key("data", HARMLESS)  # folder holding VOCdevkit/ or ADEChallengeData2016/
    # a name from datasets.tasks (see `python -m datasets.splits --list`); step 0 records its classes instead
    task: str = config_key("15-1", EXPERIMENT)
    # explicit steps [[0, 1, ...], [..], ...] instead of a named task
    custom_steps: Optional[list[list[int]]] = config_key(None, EXPERIMENT)
    setting: str = config_key("overlapped", EXPERIMENT, STEP0, choices={"overlapped", "disjoint"})
    # a train_cls.txt-style file; default: derived from the labels and cached
    class_lists: Optional[str] = config_key(None, HARMLESS)
    cache_dir: Optional[str] = config_key(None, HARMLESS)  # where derived class lists go; default: next to the data
    # short side before random scaling / for center-crop evaluation
    base_size: int = config_key(512, EXPERIMENT, STEP0, range=AT_LEAST_1)
    crop_size: int = config_key(512, EXPERIMENT, STEP0, range=AT_LEAST_1)
    scale_range: list[float] = config_key([0.5, 2.0], EXPERIMENT, STEP0)  # checked in _validate: 0 < low <= high
    # center_crop (the reference) | full (whole image, batch 1)
    eval_mode: str = config_key("center_crop", EXPERIMENT, STEP0, choices={"center_crop", "full"})
    # ignore: pad a scaled image smaller than the crop only as much as the crop needs, label 255 (MiB/PLOP);
    # reference: the MBS reference's padding, every side by int((1 + crop - side) / 2), image 0, label 0
    crop_padding: str = config_key("ignore", EXPERIMENT, STEP0, choices={"ignore", "reference"})
    # the data preflight skips unreadable samples instead of refusing
    skip_bad_files: bool = config_key(False, EXPERIMENT, STEP0)
    num_workers: int = config_key(4, HARMLESS, range=AT_LEAST_0)
    prefetch_factor: int = config_key(2, HARMLESS, range=AT_LEAST_1)  # batches each loader worker prepares ahead
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    """The network; the step-0 recipe takes this section whole."""

    architecture: str = config_key("deeplabv3", EXPERIMENT, STEP0, choices={"deeplabv3", "segmenter"})
    backbone: str = config_key("resnet101", EXPERIMENT, STEP0)  # resnet18/34/50/101 | a timm ViT name
    pretrained: str = config_key("imagenet", EXPERIMENT, STEP0)  # imagenet | none | path to a local state dict
    output_stride: int = config_key(16, EXPERIMENT, STEP0, choices={8, 16})  # DeepLab only
    head_channels: int = config_key(256, EXPERIMENT, STEP0, range=AT_LEAST_1)  # DeepLab ASPP width
    decoder_layers: int = config_key(2, EXPERIMENT, STEP0, range=AT_LEAST_1)  # Segmenter only
    decoder_heads: int = config_key(12, EXPERIMENT, STEP0, range=AT_LEAST_1)
    decoder_dim: int = config_key(768, EXPERIMENT, STEP0, range=AT_LEAST_1)
    # Segmenter regularisation and normalisation; the defaults are the MBS reference's values
    encoder_dropout: float = config_key(0.0, EXPERIMENT, STEP0, range=PROBABILITY)
    encoder_drop_path_rate: float = config_key(0.0, EXPERIMENT, STEP0, range=PROBABILITY)
    decoder_dropout: float = config_key(0.0, EXPERIMENT, STEP0, range=PROBABILITY)
    # rises linearly from 0 over the decoder layers
    decoder_drop_path_rate: float = config_key(0.1, EXPERIMENT, STEP0, range=PROBABILITY)
    # every LayerNorm of encoder and decoder (timm's ViT default: 1e-6)
    layer_norm_eps: float = config_key(1e-5, EXPERIMENT, STEP0, range=POSITIVE)
    # reference: position embedding resampled bilinearly (no antialias) for other input sizes, pretrained grid
    # resized bicubically without antialias; timm: timm's bicubic resampling with antialias for both
    pos_embed_interpolation: str = config_key("reference", EXPERIMENT, STEP0, choices={"reference", "timm"})
    # timm VisionTransformer kwargs for a small ViT (tests/CPU); Segmenter only, checked in _validate
    backbone_overrides: dict[str, Any] = config_key({}, EXPERIMENT, STEP0)


@dataclass
class MethodConfig:
    """The incremental-learning method and its switches (spec section 2; BASELINES_SPEC for mib and plop).

    ``name`` picks a preset (:mod:`utils.presets`) for the switches and the
    dataset-dependent weights left at null: ``mbs`` turns every MBS component
    on, ``baseline`` is the reference's non-MBS variant (plain pseudo-labels,
    unweighted feature MSE, plain KD), ``finetune`` is cross-entropy only,
    ``mib`` and ``plop`` are those two baselines as their official code runs
    them. A key set explicitly overrides the preset, so an ablation table is a
    set of configs; contradictory variants of one family are refused. Step 0
    is cross-entropy alone for every method; the step-0 recipe holds the
    resolved ``ce_all_pixels`` when it is on (trainer/step0_reuse.py).
    """

    name: str = config_key("mbs", EXPERIMENT, choices=set(PRESETS))
    weight_transfer: Optional[bool] = config_key(None, EXPERIMENT)  # (a) new class vectors start as the background's
    # (a) MiB's init_balanced: new biases and background's lowered by log(C_new + 1) (needs weight_transfer)
    balanced_init: Optional[bool] = config_key(None, EXPERIMENT)
    unbiased_ce: Optional[bool] = config_key(None, EXPERIMENT)      # MiB's UNCE: old classes folded into background
    # cross-entropy summed over labelled pixels / all B*H*W pixels, every step (MiB, PLOP); off: labelled mean
    ce_all_pixels: Optional[bool] = config_key(None, EXPERIMENT)
    # (b) step 1: label background pixels with confident old predictions
    pseudo_labels: Optional[bool] = config_key(None, EXPERIMENT)
    selective_pl: Optional[bool] = config_key(None, EXPERIMENT)     # (b) steps 2-3: object identifier -> ignore
    entropy_pl: Optional[bool] = config_key(None, EXPERIMENT)       # (b) PLOP's per-class entropy thresholds
    # (b) PLOP: each image's CE x its share of confident old pixels (needs entropy_pl)
    adaptive_ce_factor: Optional[bool] = config_key(None, EXPERIMENT)
    feature_distill: Optional[bool] = config_key(None, EXPERIMENT)  # (c) on: distil features at all
    afd: Optional[bool] = config_key(None, EXPERIMENT)              # (c) adaptive weights (off: unweighted MSE)
    pod: Optional[bool] = config_key(None, EXPERIMENT)              # (c) PLOP's Local POD (stages, features, logits)
    output_distill: Optional[bool] = config_key(None, EXPERIMENT)   # (d) on: distil outputs at all
    lgkd: Optional[bool] = config_key(None, EXPERIMENT)             # (d) label-guided (off: plain KD on old channels)
    unkd: Optional[bool] = config_key(None, EXPERIMENT)             # (d) MiB's unbiased KD
    ortho: Optional[bool] = config_key(None, EXPERIMENT)            # (e) orthogonal objective
    pseudo_threshold: float = config_key(0.7, EXPERIMENT, range=FRACTION)  # tau
    # lambda; null: the preset's (mbs, baseline: 25 VOC / 50 ADE; mib: 10)
    output_distill_weight: Optional[float] = config_key(None, EXPERIMENT, range=AT_LEAST_0)
    feature_distill_weight: float = config_key(1.0, EXPERIMENT, range=AT_LEAST_0)  # PLOP: multiplies L_pod
    ortho_weight: float = config_key(1.0, EXPERIMENT, range=AT_LEAST_0)  # multiplied by |C_new| / |C_old u C_new|
    # Transformer: MSE on old class-token outputs
    class_embedding_distill_weight: float = config_key(1.0, EXPERIMENT, range=AT_LEAST_0)
    pod_factor: Optional[float] = config_key(None, EXPERIMENT, range=AT_LEAST_0)  # null: 0.01 VOC / 0.001 ADE
    # POD's factor on the logits; null: 0.0005 VOC / 0.00001 ADE
    pod_logits_factor: Optional[float] = config_key(None, EXPERIMENT, range=AT_LEAST_0)
    entropy_threshold: float = config_key(0.001, EXPERIMENT, range=FRACTION)  # the floor of PLOP's thresholds


@dataclass
class TrainConfig:
    # Intervals used as a modulus are >= 1; checkpoint_interval and image_log_interval also take 0 (never / once
    # per epoch). Incremental-step keys, intervals, names and paths are not in the step-0 recipe.
    epochs: int = config_key(30, EXPERIMENT, STEP0, range=AT_LEAST_1)
    epochs_incremental: Optional[int] = config_key(None, EXPERIMENT, range=AT_LEAST_1)  # default: same as epochs
    batch_size: int = config_key(24, EXPERIMENT, STEP0, range=AT_LEAST_1)  # total over all processes
    val_batch_size: int = config_key(8, HARMLESS, range=AT_LEAST_1)  # per process; forced to 1 for eval_mode=full
    lr: float = config_key(0.01, EXPERIMENT, STEP0, range=POSITIVE)  # step 0
    lr_incremental: float = config_key(0.001, EXPERIMENT, range=POSITIVE)  # steps >= 1
    lr_schedule: str = config_key("poly", EXPERIMENT, STEP0, choices={"poly", "constant"})
    poly_power: float = config_key(0.9, EXPERIMENT, STEP0, range=AT_LEAST_0)
    head_lr_multiplier: float = config_key(1.0, EXPERIMENT, STEP0, range=POSITIVE)  # head lr = lr * this
    momentum: float = config_key(0.9, EXPERIMENT, STEP0, range=PROBABILITY)
    nesterov: bool = config_key(True, EXPERIMENT, STEP0)
    weight_decay: float = config_key(1e-4, EXPERIMENT, STEP0, range=AT_LEAST_0)
    # CUDA only (CPU runs in fp32); bf16 on a GPU of compute capability < 8.0 runs as fp16 with loss scaling
    amp: str = config_key("bf16", EXPERIMENT, STEP0, choices={"bf16", "fp16", "none"})
    # cap iterations per step (quick runs, tests)
    max_iters_per_step: Optional[int] = config_key(None, EXPERIMENT, STEP0, range=AT_LEAST_1)
    # validation during a step: none | epochs (every val_interval epochs) | reference (the MBS reference's
    # cadence: whenever the iteration count is a multiple of max(100, total iterations // 10))
    validation: str = config_key("none", EXPERIMENT, STEP0, choices={"none", "epochs", "reference"})
    # epochs between validations (validation: epochs)
    val_interval: int = config_key(1, EXPERIMENT, STEP0, range=AT_LEAST_1)
    # last | best (the weights that validated best, as the reference)
    checkpoint_policy: str = config_key("last", EXPERIMENT, STEP0, choices={"last", "best"})
    # torch.compile the step-invariant trunk (DeepLab backbone + ASPP, the ViT encoder blocks) of the model and of the
    # frozen old model, once per run; the classifiers, the decoder and the losses stay eager
    compile: bool = config_key(False, HARMLESS)
    # synchronised batch norm across processes: null = on when several CUDA processes train (as MiB/PLOP's
    # InPlaceABNSync), false = each GPU normalises over its own images (no ~111 host syncs per R101 forward)
    sync_bn: Optional[bool] = config_key(None, HARMLESS)
    # reuse a finished step 0: a step0.pt path, or auto (same family); harmless: a reused step 0 has the same
    # recipe as one trained here (trainer/step0_reuse.py)
    step0_checkpoint: Optional[str] = config_key(None, HARMLESS)
    # in-step checkpoint every N iterations (0: never)
    checkpoint_interval: int = config_key(500, HARMLESS, range=AT_LEAST_0)
    log_interval: int = config_key(10, HARMLESS, range=AT_LEAST_1)  # iterations between tensorboard scalars
    # iterations between tensorboard images (0: once per epoch)
    image_log_interval: int = config_key(0, HARMLESS, range=AT_LEAST_0)
    # val images (image, truth, prediction) to tensorboard after each test
    qualitative_images: int = config_key(4, HARMLESS, range=AT_LEAST_0)
    # at the end of a run, draw them with every step's prediction (any format matplotlib writes: .png, .pdf, ...)
    qualitative_figure: Optional[str] = config_key(None, HARMLESS)


@dataclass
class Config:
    name: str = config_key("run", HARMLESS)
    output_dir: str = config_key("runs", HARMLESS)  # the run lives in output_dir/name
    seed: int = config_key(0, EXPERIMENT, STEP0)
    device: str = config_key("auto", HARMLESS, choices={"auto", "cpu", "cuda"})
    start_step: int = config_key(0, HARMLESS, range=AT_LEAST_0)
    # last step to run (inclusive); default: the task's last
    end_step: Optional[int] = config_key(None, HARMLESS, range=AT_LEAST_0)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass(frozen=True)
class KeyTables:
    """What the fields of a config schema declare, by dotted key (``train.lr``)."""

    choices: dict[str, frozenset]
    ranges: dict[str, Range]
    experiment: frozenset[str]
    harmless: frozenset[str]
    step0: tuple[str, ...]   # in schema order


def _leaf_fields(obj: Any, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field]]:
    """Every key of a config instance with its field; a nested dataclass is a section, walked into."""
    for schema_field in dataclasses.fields(obj):
        value = getattr(obj, schema_field.name)
        if dataclasses.is_dataclass(value):
            yield from _leaf_fields(value, f"{prefix}{schema_field.name}.")
        else:
            yield prefix + schema_field.name, schema_field


def config_items(cfg: Any) -> dict[str, Any]:
    """Every key of a config (dotted) and its value."""
    return {dotted: config_value(cfg, dotted) for dotted, _ in _leaf_fields(cfg)}


def resolved_config_items(cfg: "Config") -> dict[str, Any]:
    """:func:`config_items` with every method key a preset resolves (:data:`utils.presets.PRESET_KEYS`) at its
    resolved value: what the run computes with. ``--resume`` compares these, so a run saved with
    ``output_distill_weight: 25.0`` written out and one with null that its preset resolves to 25 are the same
    experiment."""
    items = config_items(cfg)
    for key, value in resolve_method(cfg.method, cfg.data.dataset).items():
        items[f"method.{key}"] = value
    return items


def key_tables(schema: type) -> KeyTables:
    """Collect the metadata of every key of ``schema`` (a config dataclass whose fields all have defaults);
    a key without a role is a schema error (TypeError), so every key decides what --resume does with it."""
    choices, ranges, roles, step0 = {}, {}, {role: set() for role in ROLES}, []
    for dotted, schema_field in _leaf_fields(schema()):
        role = schema_field.metadata.get(_ROLE)
        if role not in ROLES:
            raise TypeError(f"config field {dotted!r} declares no role (experiment or harmless)"
                            + (f", got {role!r}" if role is not None else ""))
        roles[role].add(dotted)
        if schema_field.metadata.get(_CHOICES):
            choices[dotted] = schema_field.metadata[_CHOICES]
        if schema_field.metadata.get(_RANGE):
            ranges[dotted] = schema_field.metadata[_RANGE]
        if schema_field.metadata.get(_STEP0):
            step0.append(dotted)
    return KeyTables(choices, ranges, frozenset(roles[EXPERIMENT]), frozenset(roles[HARMLESS]), tuple(step0))


_TABLES = key_tables(Config)
# The allowed values of a key and the numbers it allows, checked when a config is loaded.
CHOICES: dict[str, frozenset] = _TABLES.choices
RANGES: dict[str, Range] = _TABLES.ranges
# What --resume compares with the config saved in the run folder (utils/run_folder.py): experiment keys must
# match, a harmless key that differs is listed in a warning. Every key is in exactly one.
EXPERIMENT_KEYS: frozenset[str] = _TABLES.experiment
HARMLESS_KEYS: frozenset[str] = _TABLES.harmless
# The step-0 keys of the data and train sections, by section (trainer/step0_reuse.py); the recipe adds the whole
# model section, the seed and the synthetic section itself.
_STEP0_SPLIT = [dotted.rpartition(".") for dotted in _TABLES.step0]  # (section, ".", name)
STEP0_KEYS: dict[str, tuple[str, ...]] = {
    section: tuple(name for parent, _, name in _STEP0_SPLIT if parent == section) for section in ("data", "train")
}


RESNET_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")  # models/backbones.py builds these
VIT_PREFIXES = ("vit_", "deit_")  # timm VisionTransformer families the Segmenter encoder accepts
# The timm VisionTransformer arguments the Segmenter sets itself (models/segmenter.py vit_encoder_kwargs), and
# from what: model.backbone_overrides cannot set them (timm would get the keyword twice).
SEGMENTER_ENCODER_KWARGS = {
    "img_size": "data.crop_size", "num_classes": "the Segmenter (0: no classifier head)",
    "global_pool": "the Segmenter (every token out)", "pos_drop_rate": "model.encoder_dropout",
    "attn_drop_rate": "model.encoder_dropout", "proj_drop_rate": "model.encoder_dropout",
    "drop_path_rate": "model.encoder_drop_path_rate", "norm_layer": "model.layer_norm_eps",
    "dynamic_img_size": "the Segmenter (any input size)", "dynamic_img_pad": "the Segmenter (any input size)",
}
# Classes of each dataset, background included (VOC 0..20, ADE20K 0..150); datasets.tasks uses this table.
DATASET_CLASSES = {"voc": 21, "ade": 151}
# A number written as text: YAML 1.2's float (PyYAML implements YAML 1.1, whose floats need a dot and a signed
# exponent, so `5e-1` or `1e5` arrive here as strings). Nothing else a string may say passes.
_FLOAT_TEXT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")


def class_steps_problem(steps: Any, num_classes: int) -> Optional[str]:
    """What is wrong with explicit task steps (``[[0, 1, ...], [16], ...]``, dataset class ids), or None. The one
    check of a custom class order: the config (``data.custom_steps``) and ``datasets.tasks.get_task`` use it."""
    if not isinstance(steps, (list, tuple)) or not steps:
        return f"expected a list of steps, each a list of class ids, got {steps!r}"
    for number, step in enumerate(steps):
        if not isinstance(step, (list, tuple)) or not all(
                isinstance(c, numbers.Integral) and not isinstance(c, bool) for c in step):
            return f"step {number} must be a list of integer class ids, got {step!r}"
    if any(len(step) == 0 for step in steps):
        return "every step needs at least one class"
    if 0 not in steps[0]:
        return "step 0 must contain background (class 0)"
    flat = [int(c) for step in steps for c in step]
    repeated = sorted({c for c in flat if flat.count(c) > 1})
    if repeated:
        return f"class ids {repeated} are listed twice (in more than one step, or twice in one)"
    outside = [c for c in flat if not 0 <= c < num_classes]
    if outside:
        return f"class ids {outside} are outside 0..{num_classes - 1}"
    if steps[0][0] != 0:
        return "background (0) must be the first class of step 0 (output channel 0)"
    return None


def _check_value(key: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` converted to the field's type, elements of a list or dict included, or raise
    ConfigError naming ``key`` (or the element: ``key[1][0]``, ``key.name``)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _check_value(key, value, next(a for a in args if a is not type(None)))
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. `task: 100-50` is a string in YAML anyway; `pretrained: 0` is not
    elif list in (annotation, origin):
        if isinstance(value, list):
            return [_check_value(f"{key}[{i}]", item, args[0]) for i, item in enumerate(value)] if args else value
    elif dict in (annotation, origin):
        if isinstance(value, dict):
            if not args:
                return value
            wrong = [name for name in value if not isinstance(name, args[0])]
            if wrong:
                raise ConfigError(f"config key {key!r}: every name in it must be a {args[0].__name__}, got "
                                  f"{wrong[0]!r} ({type(wrong[0]).__name__})")
            return {name: _check_value(f"{key}.{name}", item, args[1]) for name, item in value.items()}
    else:  # pragma: no cover - schema error, not user error
        raise TypeError(f"unsupported annotation {annotation} for {key}")
    name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"config key {key!r}: expected {name}, got {value!r} ({type(value).__name__})")


def _merge(obj: Any, updates: dict, prefix: str = "") -> None:
    """Write ``updates`` into the dataclass ``obj`` in place, checking keys and types."""
    hints = typing.get_type_hints(type(obj))
    fields = {f.name for f in dataclasses.fields(obj)}
    if not isinstance(updates, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<top>'!r} must be a mapping, got {updates!r}")
    for key, value in updates.items():
        full = prefix + str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint}; known keys in this section: {', '.join(sorted(fields))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value if value is not None else {}, full + ".")
        else:
            setattr(obj, key, _check_value(full, value, hints[key]))


def config_value(cfg: Config, key: str) -> Any:
    """The value of a dotted key, e.g. ``config_value(cfg, "train.lr")``."""
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _validate(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        value = config_value(cfg, key)
        if value not in allowed:
            raise ConfigError(f"config key {key!r}: {value!r} is not one of {', '.join(map(str, sorted(allowed)))}")
    for key, allowed_range in RANGES.items():
        value = config_value(cfg, key)
        if value is not None and not allowed_range.allows(value):
            raise ConfigError(f"config key {key!r} must be {allowed_range}, got {value}")
    scale_range = cfg.data.scale_range  # numbers (checked on merge)
    if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
        raise ConfigError(f"config key 'data.scale_range' must be [low, high] with 0 < low <= high, got {scale_range}")
    if cfg.data.custom_steps is not None:
        problem = class_steps_problem(cfg.data.custom_steps, DATASET_CLASSES[cfg.data.dataset])
        if problem:
            raise ConfigError(f"config key 'data.custom_steps' ({cfg.data.dataset}): {problem}")
    backbone = cfg.model.backbone
    if cfg.model.architecture == "deeplabv3" and backbone not in RESNET_BACKBONES:
        raise ConfigError(f"config key 'model.backbone': {backbone!r} is not a DeepLab-V3 backbone; "
                          f"use one of {', '.join(RESNET_BACKBONES)}")
    if cfg.model.architecture == "segmenter" and not backbone.startswith(VIT_PREFIXES):
        raise ConfigError(f"config key 'model.backbone': {backbone!r} is not a timm ViT for the Segmenter; "
                          "use e.g. vit_base_patch16_384 (smaller ones through model.backbone_overrides)")
    _check_backbone_overrides(cfg.model.architecture, cfg.model.backbone_overrides)
    _check_file_keys(cfg)
    if cfg.end_step is not None and cfg.end_step < cfg.start_step:
        raise ConfigError(f"config key 'end_step' ({cfg.end_step}) must be >= start_step ({cfg.start_step})")
    if cfg.train.checkpoint_policy == "best" and cfg.train.validation == "none":
        raise ConfigError("config key 'train.checkpoint_policy': best needs train.validation epochs or reference "
                          "(it selects the weights on validation)")
    if "/" in cfg.name or cfg.name in ("", ".", ".."):
        raise ConfigError(f"config key 'name': {cfg.name!r} is not a valid run folder name")
    contradiction = method_contradiction(cfg.method)  # resolved with the preset: mbs + pod=true is refused
    if contradiction:
        raise ConfigError(contradiction)


def _check_backbone_overrides(architecture: str, overrides: dict) -> None:
    """Overrides are keyword arguments of timm's VisionTransformer that the Segmenter leaves to the user (an
    unknown one was a TypeError deep in timm); DeepLab-V3 takes none (they were silently ignored)."""
    if not overrides:
        return
    if architecture != "segmenter":
        raise ConfigError(f"config key 'model.backbone_overrides': {architecture} takes no backbone overrides "
                          f"(they are timm ViT arguments for the Segmenter), got {overrides}; leave it {{}}")
    for name in overrides:
        if name in SEGMENTER_ENCODER_KWARGS:
            raise ConfigError(f"config key 'model.backbone_overrides': {name!r} is set by "
                              f"{SEGMENTER_ENCODER_KWARGS[name]}, not through the overrides")
    accepted = vit_keywords()
    unknown = [name for name in overrides if name not in accepted]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(accepted), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"config key 'model.backbone_overrides': {unknown[0]!r} is not an argument of timm's "
                          f"VisionTransformer{hint}; it takes {', '.join(sorted(accepted))}")


def vit_keywords() -> frozenset[str]:
    """The keyword arguments timm's VisionTransformer takes, less those the Segmenter sets. timm (and torch with
    it) is imported only here, when a Segmenter config has overrides: other config errors stay fast."""
    import inspect

    from timm.models.vision_transformer import VisionTransformer
    parameters = inspect.signature(VisionTransformer.__init__).parameters.values()
    return frozenset(p.name for p in parameters if p.name != "self" and p.name not in SEGMENTER_ENCODER_KWARGS
                     and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def figure_formats() -> frozenset[str]:
    """File extensions matplotlib can save a figure as (png, pdf, svg, jpg, ...); matplotlib is imported only when a
    figure is asked for."""
    from matplotlib.backend_bases import FigureCanvasBase
    return frozenset(FigureCanvasBase.get_supported_filetypes())


def _file_in_the_way(folder: Path) -> Optional[Path]:
    """The file at ``folder`` or at one of its parents (so the folder cannot be made), if any."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


def _check_file_keys(cfg: Config) -> None:
    """Values that name files are checked now, not when they are written (a figure after hours of training)."""
    figure = cfg.train.qualitative_figure
    if figure:  # "" draws nothing, as null
        extension = Path(figure).suffix.lower().lstrip(".")
        formats = figure_formats()
        if extension not in formats:
            raise ConfigError(f"config key 'train.qualitative_figure': {figure!r} must end in an extension "
                              f"matplotlib writes: {', '.join('.' + f for f in sorted(formats))}")
        blocker = _file_in_the_way(Path(figure).parent)
        if blocker is not None:
            raise ConfigError(f"config key 'train.qualitative_figure': {figure!r} is under {blocker}, which is a "
                              "file")
    if cfg.data.cache_dir:
        folder = Path(cfg.data.cache_dir)
        blocker = _file_in_the_way(folder)
        if blocker is not None:
            where = "is an existing file" if blocker == folder else f"is under {blocker}, which is a file"
            raise ConfigError(f"config key 'data.cache_dir': {str(folder)!r} {where}; it must be a folder "
                              "(derived class lists are written into it)")


def check_device(device: str) -> None:
    """``device: cuda`` needs CUDA on this machine (torch is imported only then: config errors stay fast)."""
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("config key 'device': cuda was asked for, but CUDA is not available on this machine "
                              "(use device=auto or cpu)")


# The smallest training crop at which a model counts as full size (see full_size_model).
FULL_SIZE_CROP = 512


def full_size_model(cfg: Config) -> Optional[str]:
    """A description of the model when it is full size, else None. Full size: DeepLab-V3 with ResNet-101, or a
    Segmenter whose encoder is a ViT-Base or larger taken as named (no ``model.backbone_overrides``), trained at
    ``data.crop_size`` >= 512: the published recipes, which nobody means to train on a CPU."""
    model, crop = cfg.model, cfg.data.crop_size
    if crop < FULL_SIZE_CROP:
        return None
    if model.architecture == "deeplabv3" and model.backbone == "resnet101":
        return f"DeepLab-V3 ResNet-101 at {crop} px"
    if (model.architecture == "segmenter" and not model.backbone_overrides
            and model.backbone.startswith(("vit_base", "vit_large", "vit_huge", "deit_base"))):
        return f"Segmenter {model.backbone} at {crop} px"
    return None


def batch_per_process(batch_size: int, world_size: int) -> int:
    """``train.batch_size`` is the total over all processes: each gets an equal share."""
    if batch_size % world_size:
        raise ConfigError(f"train.batch_size={batch_size} is not divisible by the number of processes: it is the "
                          f"total batch over all processes and must be divisible by their number ({world_size})")
    return batch_size // world_size


class DuplicateKeyError(yaml.YAMLError):
    """A mapping of a YAML document has the same key twice."""

    def __init__(self, key: Any, first_line: int, second_line: int):
        super().__init__(f"key {key!r} is written twice (lines {first_line} and {second_line}); "
                         "YAML would silently keep only the second")


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``, but a key written twice in one mapping (at any depth) raises
    :class:`DuplicateKeyError`: PyYAML keeps the last one, so a second ``train:`` section dropped every key of
    the first."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            first_line: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` overrides on purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, typing.Hashable):
                    continue  # SafeLoader reports an unhashable key itself
                line = key_node.start_mark.line + 1
                if key in first_line:
                    raise DuplicateKeyError(key, first_line[key], line)
                first_line[key] = line
        return super().construct_mapping(node, deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML syntax error on one line: what and where."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{err.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(err).split())


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=0.1"`` -> (["train", "lr"], 0.1); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.subkey=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.load(raw, Loader=UniqueKeyLoader) if raw != "" else None
    except DuplicateKeyError as err:
        raise ConfigError(f"override {text!r}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({_yaml_problem(err)})") from None
    return key.strip().split("."), value


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Build a Config from defaults, an optional YAML file and ``key=value`` overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        text = read_text(path, "config file", ConfigError)
        try:
            content = yaml.load(text, Loader=UniqueKeyLoader) or {}
        except DuplicateKeyError as err:
            raise ConfigError(f"config file {path}: {err}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(err)}") from None
        try:
            _merge(cfg, content)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    for text in overrides or []:
        keys, value = parse_override(text)
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        _merge(cfg, nested)
    _validate(cfg)
    check_device(cfg.device)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(content: dict) -> Config:
    cfg = Config()
    _merge(cfg, content)
    _validate(cfg)
    return cfg


def config_yaml(cfg: Config) -> str:
    """The resolved config as the YAML saved in a run folder (``RunFolder.prepare`` writes it atomically)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
