"""One typed configuration schema for every run.

A run is described by a YAML file (``configs/*.yaml``) plus ``--opt key=value``
overrides on the command line. Every key has a default here; an unknown or
misspelled key is an error that names it (with the closest known key), and a
value of the wrong type or outside its allowed set is an error naming the key.
The fully resolved config is saved with every run (``config.yaml``).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from utils.errors import UserError


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the key or file."""


@dataclass
class SyntheticConfig:
    enabled: bool = False       # generate the built-in synthetic dataset at data.root if absent
    num_train: int = 1000
    num_val: int = 200
    image_size: int = 128
    seed: int = 0


@dataclass
class DataConfig:
    dataset: str = "voc"                  # voc | ade
    root: str = "data"                    # folder holding VOCdevkit/ or ADEChallengeData2016/
    task: str = "15-1"                    # a name from datasets.tasks (see `python -m datasets.splits --list`)
    custom_steps: Optional[list] = None   # explicit steps [[0, 1, ...], [..], ...] instead of a named task
    setting: str = "overlapped"           # overlapped | disjoint
    class_lists: Optional[str] = None     # a train_cls.txt-style file; default: derived from the labels and cached
    cache_dir: Optional[str] = None       # where derived class lists go; default: next to the data
    base_size: int = 512                  # short side before random scaling / for center-crop evaluation
    crop_size: int = 512
    scale_range: list = field(default_factory=lambda: [0.5, 2.0])
    eval_mode: str = "center_crop"        # center_crop (the reference) | full (whole image, batch 1)
    # ignore: pad a scaled image smaller than the crop only as much as the crop needs, label 255 (MiB/PLOP);
    # reference: the MBS reference's padding, every side by int((1 + crop - side) / 2), image 0, label 0
    crop_padding: str = "ignore"
    skip_bad_files: bool = False          # the data preflight skips unreadable samples instead of refusing
    num_workers: int = 4
    prefetch_factor: int = 2              # batches each loader worker prepares ahead
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class ModelConfig:
    architecture: str = "deeplabv3"       # deeplabv3 | segmenter
    backbone: str = "resnet101"           # resnet18/34/50/101 | a timm ViT name
    pretrained: str = "imagenet"          # imagenet | none | path to a local state dict
    output_stride: int = 16               # DeepLab only: 16 or 8
    head_channels: int = 256              # DeepLab ASPP width
    decoder_layers: int = 2               # Segmenter only
    decoder_heads: int = 12
    decoder_dim: int = 768
    # Segmenter regularisation and normalisation; the defaults are the MBS reference's values
    encoder_dropout: float = 0.0
    encoder_drop_path_rate: float = 0.0
    decoder_dropout: float = 0.0
    decoder_drop_path_rate: float = 0.1   # rises linearly from 0 over the decoder layers
    layer_norm_eps: float = 1e-5          # every LayerNorm of encoder and decoder (timm's ViT default: 1e-6)
    # reference: position embedding resampled bilinearly (no antialias) for other input sizes, pretrained grid
    # resized bicubically without antialias; timm: timm's bicubic resampling with antialias for both
    pos_embed_interpolation: str = "reference"
    backbone_overrides: dict = field(default_factory=dict)  # timm kwargs for a small ViT (tests/CPU)


@dataclass
class MethodConfig:
    """The incremental-learning method and its switches (spec section 2).

    ``name`` picks defaults for the switches left at null: ``mbs`` turns every
    component on, ``baseline`` is the reference's non-MBS variant (plain
    pseudo-labels, unweighted feature MSE, plain KD), ``finetune`` is
    cross-entropy only. A switch set explicitly overrides the preset, so an
    ablation table is a set of configs.
    """

    name: str = "mbs"                          # mbs | baseline | finetune
    weight_transfer: Optional[bool] = None     # (a) new class vectors start as the background's
    pseudo_labels: Optional[bool] = None       # (b) step 1: label background pixels with confident old predictions
    selective_pl: Optional[bool] = None        # (b) steps 2-3: object identifier -> ignore
    feature_distill: Optional[bool] = None     # (c) on: distil features at all
    afd: Optional[bool] = None                 # (c) adaptive weights (off: unweighted MSE)
    output_distill: Optional[bool] = None      # (d) on: distil outputs at all
    lgkd: Optional[bool] = None                # (d) label-guided (off: plain KD on old channels)
    ortho: Optional[bool] = None               # (e) orthogonal objective
    pseudo_threshold: float = 0.7              # tau
    output_distill_weight: float = 25.0        # lambda: 25 VOC, 50 ADE
    feature_distill_weight: float = 1.0
    ortho_weight: float = 1.0                  # multiplied by |C_new| / |C_old u C_new|
    class_embedding_distill_weight: float = 1.0  # Transformer: MSE on old class-token outputs


@dataclass
class TrainConfig:
    epochs: int = 30
    epochs_incremental: Optional[int] = None   # default: same as epochs
    batch_size: int = 24                       # total over all processes
    val_batch_size: int = 8                    # per process; forced to 1 for eval_mode=full
    lr: float = 0.01                           # step 0
    lr_incremental: float = 0.001              # steps >= 1
    lr_schedule: str = "poly"                  # poly | constant
    poly_power: float = 0.9
    head_lr_multiplier: float = 1.0            # head lr = lr * this
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    amp: str = "bf16"                          # bf16 | fp16 | none (CUDA only; CPU runs in fp32)
    max_iters_per_step: Optional[int] = None   # cap iterations per step (quick runs, tests)
    # validation during a step: none | epochs (every val_interval epochs) | reference (the MBS reference's
    # cadence: whenever the iteration count is a multiple of max(100, total iterations // 10))
    validation: str = "none"
    val_interval: int = 1                      # epochs between validations (validation: epochs)
    checkpoint_policy: str = "last"            # last | best (the weights that validated best, as the reference)
    compile: bool = False                      # torch.compile the model (and the loss) for training
    step0_checkpoint: Optional[str] = None     # reuse a finished step 0: a step0.pt path, or auto (same family)
    checkpoint_interval: int = 500             # in-step checkpoint every N iterations (0: never)
    log_interval: int = 10                     # iterations between tensorboard scalars
    image_log_interval: int = 0                # iterations between tensorboard images (0: once per epoch)
    qualitative_images: int = 4                # val images (image, truth, prediction) to tensorboard after each test
    qualitative_figure: Optional[str] = None   # at the end of a run, draw them with every step's prediction (PNG)


@dataclass
class Config:
    name: str = "run"
    output_dir: str = "runs"          # the run lives in output_dir/name
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda
    start_step: int = 0
    end_step: Optional[int] = None    # last step to run (inclusive); default: the task's last
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


CHOICES = {
    "data.dataset": {"voc", "ade"},
    "data.setting": {"overlapped", "disjoint"},
    "data.eval_mode": {"center_crop", "full"},
    "data.crop_padding": {"ignore", "reference"},
    "model.pos_embed_interpolation": {"reference", "timm"},
    "train.validation": {"none", "epochs", "reference"},
    "model.architecture": {"deeplabv3", "segmenter"},
    "method.name": {"mbs", "baseline", "finetune"},
    "train.lr_schedule": {"poly", "constant"},
    "train.amp": {"bf16", "fp16", "none"},
    "train.checkpoint_policy": {"last", "best"},
    "device": {"auto", "cpu", "cuda"},
    "model.output_stride": {8, 16},
}


RESNET_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")  # models/backbones.py builds these
VIT_PREFIXES = ("vit_", "deit_")  # timm VisionTransformer families the Segmenter encoder accepts


def _check_value(key: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` converted to the field's type, or raise ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _check_value(key, value, next(a for a in args if a is not type(None)))
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. `task: 100-50` is a string in YAML anyway; `pretrained: 0` is not
    elif annotation in (list, dict) or origin in (list, dict):
        if isinstance(value, origin or annotation):
            return value
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

# Every numeric key and the values it allows, checked when a config is loaded. Intervals used as a modulus
# are >= 1; checkpoint_interval and image_log_interval also take 0 (never / once per epoch).
RANGES: dict[str, Range] = {
    "start_step": AT_LEAST_0, "end_step": AT_LEAST_0,
    "data.base_size": AT_LEAST_1, "data.crop_size": AT_LEAST_1,
    "data.num_workers": AT_LEAST_0, "data.prefetch_factor": AT_LEAST_1,
    "data.synthetic.num_train": AT_LEAST_1, "data.synthetic.num_val": AT_LEAST_1,
    "data.synthetic.image_size": Range(16),  # the generator draws nothing smaller
    "model.head_channels": AT_LEAST_1, "model.decoder_layers": AT_LEAST_1, "model.decoder_heads": AT_LEAST_1,
    "model.decoder_dim": AT_LEAST_1, "model.layer_norm_eps": POSITIVE,
    "model.encoder_dropout": PROBABILITY, "model.encoder_drop_path_rate": PROBABILITY,
    "model.decoder_dropout": PROBABILITY, "model.decoder_drop_path_rate": PROBABILITY,
    "method.pseudo_threshold": FRACTION,
    "method.output_distill_weight": AT_LEAST_0, "method.feature_distill_weight": AT_LEAST_0,
    "method.ortho_weight": AT_LEAST_0, "method.class_embedding_distill_weight": AT_LEAST_0,
    "train.epochs": AT_LEAST_1, "train.epochs_incremental": AT_LEAST_1,
    "train.batch_size": AT_LEAST_1, "train.val_batch_size": AT_LEAST_1,
    "train.lr": POSITIVE, "train.lr_incremental": POSITIVE, "train.poly_power": AT_LEAST_0,
    "train.head_lr_multiplier": POSITIVE, "train.momentum": PROBABILITY, "train.weight_decay": AT_LEAST_0,
    "train.max_iters_per_step": AT_LEAST_1, "train.val_interval": AT_LEAST_1,
    "train.checkpoint_interval": AT_LEAST_0, "train.log_interval": AT_LEAST_1,
    "train.image_log_interval": AT_LEAST_0, "train.qualitative_images": AT_LEAST_0,
}


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
    low, high = (cfg.data.scale_range + [None, None])[:2] if len(cfg.data.scale_range) == 2 else (None, None)
    if low is None or not 0 < low <= high:
        raise ConfigError(f"config key 'data.scale_range' must be [low, high] with 0 < low <= high, got {cfg.data.scale_range}")
    backbone = cfg.model.backbone
    if cfg.model.architecture == "deeplabv3" and backbone not in RESNET_BACKBONES:
        raise ConfigError(f"config key 'model.backbone': {backbone!r} is not a DeepLab-V3 backbone; "
                          f"use one of {', '.join(RESNET_BACKBONES)}")
    if cfg.model.architecture == "segmenter" and not backbone.startswith(VIT_PREFIXES):
        raise ConfigError(f"config key 'model.backbone': {backbone!r} is not a timm ViT for the Segmenter; "
                          "use e.g. vit_base_patch16_384 (smaller ones through model.backbone_overrides)")
    if cfg.end_step is not None and cfg.end_step < cfg.start_step:
        raise ConfigError(f"config key 'end_step' ({cfg.end_step}) must be >= start_step ({cfg.start_step})")
    if cfg.train.checkpoint_policy == "best" and cfg.train.validation == "none":
        raise ConfigError("config key 'train.checkpoint_policy': best needs train.validation epochs or reference "
                          "(it selects the weights on validation)")
    if "/" in cfg.name or cfg.name in ("", ".", ".."):
        raise ConfigError(f"config key 'name': {cfg.name!r} is not a valid run folder name")


def check_device(device: str) -> None:
    """``device: cuda`` needs CUDA on this machine (torch is imported only then: config errors stay fast)."""
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError("config key 'device': cuda was asked for, but CUDA is not available on this machine "
                              "(use device=auto or cpu)")


def batch_per_process(batch_size: int, world_size: int) -> int:
    """``train.batch_size`` is the total over all processes: each gets an equal share."""
    if batch_size % world_size:
        raise ConfigError(f"train.batch_size={batch_size} is not divisible by the number of processes: it is the "
                          f"total batch over all processes and must be divisible by their number ({world_size})")
    return batch_size // world_size


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=0.1"`` -> (["train", "lr"], 0.1); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.subkey=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from None
    return key.strip().split("."), value


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Build a Config from defaults, an optional YAML file and ``key=value`` overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            content = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
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


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
