"""The run folder (``output_dir/name``) before a run starts: it must be a writable folder, finished work is
never overwritten without ``--resume``, ``--resume`` continues only the same experiment, what an
interrupted write left is removed, and the resolved config is saved."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from utils.config import Config, ConfigError, config_from_dict, save_config
from utils.errors import UserError
from utils.files import TEMPORARY_PATTERN, atomic_write_text, temporary_sibling
from utils.results import results_markdown


class RunFolderError(UserError):
    """The run folder cannot be used as asked (not creatable, finished work would be overwritten, ...)."""


# What --resume compares with the config saved in the run folder. Every config key is in exactly one set
# (tests/test_bad_input.py checks it), so a new key needs a decision here.
# Keys that define the experiment: a run folder holds the results of one recipe, so they must match.
EXPERIMENT_KEYS = frozenset({
    "seed",
    "data.dataset", "data.task", "data.custom_steps", "data.setting", "data.base_size", "data.crop_size",
    "data.scale_range", "data.eval_mode", "data.crop_padding", "data.skip_bad_files",
    "data.synthetic.enabled", "data.synthetic.num_train", "data.synthetic.num_val", "data.synthetic.image_size",
    "data.synthetic.seed",
    "model.architecture", "model.backbone", "model.pretrained", "model.output_stride", "model.head_channels",
    "model.decoder_layers", "model.decoder_heads", "model.decoder_dim", "model.encoder_dropout",
    "model.encoder_drop_path_rate", "model.decoder_dropout", "model.decoder_drop_path_rate",
    "model.layer_norm_eps", "model.pos_embed_interpolation", "model.backbone_overrides",
    "method.name", "method.weight_transfer", "method.pseudo_labels", "method.selective_pl",
    "method.feature_distill", "method.afd", "method.output_distill", "method.lgkd", "method.ortho",
    "method.pseudo_threshold", "method.output_distill_weight", "method.feature_distill_weight",
    "method.ortho_weight", "method.class_embedding_distill_weight",
    "train.epochs", "train.epochs_incremental", "train.batch_size", "train.lr", "train.lr_incremental",
    "train.lr_schedule", "train.poly_power", "train.head_lr_multiplier", "train.momentum", "train.nesterov",
    "train.weight_decay", "train.amp", "train.max_iters_per_step", "train.validation", "train.val_interval",
    "train.checkpoint_policy",
})
# Keys that say where things are or how the run is executed, not what it computes: they may differ (a warning
# lists them). data.root / class_lists / cache_dir are locations: data moved to another disk is the same data.
HARMLESS_KEYS = frozenset({
    "name", "output_dir", "device", "start_step", "end_step",
    "data.root", "data.class_lists", "data.cache_dir", "data.num_workers", "data.prefetch_factor",
    "train.val_batch_size", "train.compile", "train.checkpoint_interval", "train.log_interval",
    "train.image_log_interval", "train.qualitative_images", "train.qualitative_figure",
    "train.step0_checkpoint",  # a reused step 0 has the same recipe as one trained here (trainer/step0_reuse.py)
})


def config_items(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf key of a config (dotted) and its value."""
    items = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            items.update(config_items(value, f"{prefix}{f.name}."))
        else:
            items[prefix + f.name] = value
    return items


def config_differences(saved: Config, current: Config) -> dict[str, tuple[Any, Any]]:
    """key -> (saved value, current value) for every key whose value differs."""
    before, now = config_items(saved), config_items(current)
    return {key: (before[key], now[key]) for key in now if before[key] != now[key]}


def check_output_folder(run_dir: Path) -> None:
    """Create ``run_dir`` if needed and make sure files can be written in it; refuse in one line otherwise."""
    run_dir = Path(run_dir)
    for folder in (run_dir, *run_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise RunFolderError(f"cannot create the run folder {run_dir} (output_dir/name): {folder} is a "
                                     "file, not a folder")
            break
    probe = temporary_sibling(run_dir / "write_test")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunFolderError(f"the run folder {run_dir} (output_dir/name) is not writable: "
                             f"{err.strerror or err}") from err


def read_saved_config(path: Path) -> Config:
    try:
        return config_from_dict(yaml.safe_load(path.read_text()) or {})
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError) as err:
        raise RunFolderError(f"--resume: the run's saved config {path} cannot be read ({err}); "
                             "restore it, or choose another name/output_dir") from None


def check_same_experiment(run_dir: Path, cfg: Config, log: logging.Logger) -> None:
    """--resume into a folder that holds checkpoints: refuse a config whose experiment keys differ from the
    saved one (naming every such key and both values); warn about harmless differences."""
    saved_file = run_dir / "config.yaml"
    if not saved_file.exists():
        return
    differences = config_differences(read_saved_config(saved_file), cfg)
    # a key in neither set (none should be) counts as an experiment key
    experiment = {key: values for key, values in differences.items() if key not in HARMLESS_KEYS}
    if experiment and any((run_dir / "checkpoints").glob("*.pt")):
        listed = "; ".join(f"{key}: {old!r} (saved) vs {new!r} (now)" for key, (old, new) in experiment.items())
        raise RunFolderError(f"--resume: run folder {run_dir} was trained with another experiment config "
                             f"({saved_file}): {listed}. Resume with the saved values, or choose another "
                             "name/output_dir for the new recipe")
    harmless = {key: values for key, values in differences.items() if key in HARMLESS_KEYS}
    if harmless:
        log.warning("--resume: the config differs from %s in keys that do not change results: %s",
                    saved_file, "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in harmless.items()))


def prepare_run_folder(run_dir: Path, cfg: Config, resume: bool, log: logging.Logger) -> None:
    """Check the folder, refuse to overwrite finished work unless resuming (and then only with the same
    experiment), remove stale temporary files, save the config."""
    check_output_folder(run_dir)
    done = sorted(run_dir.glob("checkpoints/step*.pt"))
    if done and not resume:
        raise RunFolderError(f"run folder {run_dir} already holds checkpoints ({done[0].name}, ...): "
                             "pass --resume to continue it, or choose another name/output_dir")
    if resume:
        check_same_experiment(run_dir, cfg, log)
    # Temporary files of an atomic write cut short (the process was killed while saving).
    for stale in [*run_dir.glob(TEMPORARY_PATTERN), *(run_dir / "checkpoints").glob(TEMPORARY_PATTERN)]:
        log.info("removing %s (left by an interrupted write)", stale)
        stale.unlink()
    save_config(cfg, run_dir / "config.yaml")


def write_results(run_dir: Path, results: list[dict], meta: dict) -> None:
    """Write results.json and results.md (atomically: a reader never sees half a file)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "results.json", json.dumps({"meta": meta, "steps": results}, indent=1) + "\n")
    atomic_write_text(run_dir / "results.md", results_markdown(meta.get("name", run_dir.name), results, meta))
