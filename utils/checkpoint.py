"""Checkpoint I/O: written atomically (temporary file in the same folder, then rename), read with one clear
error, loaded into a model with a check of its keys.

Where each checkpoint lives is :class:`utils.run_folder.RunFolder`'s business. A failed write (disk full)
leaves the previous version of the file and raises :class:`utils.files.FileWriteError`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from utils.errors import UserError
from utils.files import atomic_write


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not fit the model."""


def save_atomic(state: dict[str, Any], path: Path) -> None:
    # Into an open file, not a path: torch's own file writer reports a full disk as an opaque
    # RuntimeError ("unexpected pos ..."), a Python file as OSError ENOSPC.
    atomic_write(path, lambda file: torch.save(state, file))


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # corrupt or foreign file
        raise CheckpointError(f"checkpoint {str(path)!r} could not be read: {err}") from err


def load_model_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                       allowed_missing_prefixes: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``model``; only keys under ``allowed_missing_prefixes`` may be absent
    (the new step's head when growing a model), nothing may be unexpected."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(allowed_missing_prefixes)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {source} does not match the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}")
