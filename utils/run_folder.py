"""The run folder (``output_dir/name``) before a run starts: finished work is never overwritten
without ``--resume``, what an interrupted write left is removed, and the resolved config is saved."""
from __future__ import annotations

import logging
from pathlib import Path

import yaml

from utils.config import Config, config_to_dict, save_config
from utils.errors import UserError
from utils.files import TEMPORARY_PATTERN


class RunFolderError(UserError):
    """The run folder cannot be used as asked (finished work would be overwritten, ...)."""


def prepare_run_folder(run_dir: Path, cfg: Config, resume: bool, log: logging.Logger) -> None:
    """Refuse to overwrite finished work unless resuming, remove stale temporary files, save the config."""
    done = sorted(run_dir.glob("checkpoints/step*.pt"))
    if done and not resume:
        raise RunFolderError(f"run folder {run_dir} already holds checkpoints ({done[0].name}, ...): "
                             "pass --resume to continue it, or choose another name/output_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    # Temporary files of an atomic write cut short (the process was killed while saving).
    for stale in [*run_dir.glob(TEMPORARY_PATTERN), *(run_dir / "checkpoints").glob(TEMPORARY_PATTERN)]:
        log.info("removing %s (left by an interrupted write)", stale)
        stale.unlink()
    saved = run_dir / "config.yaml"
    if saved.exists() and resume:
        before = yaml.safe_load(saved.read_text())
        if before != config_to_dict(cfg):
            log.warning("the config differs from the one saved in %s; the saved one is kept as "
                        "config.previous.yaml", saved)
            saved.rename(run_dir / "config.previous.yaml")
    save_config(cfg, saved)
