"""Checkpoint I/O: written atomically (temporary file in the same folder, then rename), read safely with one
clear error, loaded into a model with a check of its keys.

Checkpoints hold only tensors, plain containers (dict, list, tuple) and primitives, and are read with
``torch.load(weights_only=True)``: a file someone hands you (``train.step0_checkpoint``, a run folder you
copied) cannot run code when it is loaded; one that needs more than that is refused.

Where each checkpoint lives is :class:`utils.run_folder.RunFolder`'s business. A failed write (disk full)
leaves the previous version of the file and raises :class:`utils.files.FileWriteError`.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from utils.errors import UserError
from utils.files import atomic_write


class CheckpointError(UserError):
    """A checkpoint is missing, unreadable or does not fit the model."""


# What torch's zip writer says when the file under it stopped taking bytes: its end-of-file check finds
# fewer bytes than it wrote ("unexpected pos"), or its own file writer failed (when given a path).
TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """torch.save ``state`` to ``path`` atomically; a full disk (however torch reports it) is a
    :class:`utils.files.FileWriteError` and leaves no temporary file."""
    def write(file) -> None:
        # Into an open file, not a path, so that a full disk raises the file's OSError ENOSPC. torch's zip
        # writer then raises a RuntimeError from its __exit__ that replaces it (keeping it as __context__).
        try:
            torch.save(state, file)
        except RuntimeError as err:
            if not any(marker in str(err) for marker in TORCH_WRITE_FAILURES):
                raise  # not a write failure: a bug keeps its traceback
            raise OSError(f"torch could not write the file ({str(err).strip().splitlines()[-1]})") from err

    atomic_write(path, write)


def load(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """The content of a checkpoint (``mmap``: tensors are mapped, not read, e.g. to look at its record only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        saved = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:  # the safe unpickler met something that is not weights
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} was refused: it holds more than tensors and plain values "
                              f"(checkpoints are loaded with weights_only=True, so that loading runs no code): "
                              f"{first_line}") from None
    except Exception as err:  # corrupt, truncated or foreign file
        raise CheckpointError(f"checkpoint {str(path)!r} could not be read: {one_line_of(err)}") from err
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} is not a checkpoint of this project (it holds a "
                              f"{type(saved).__name__}, not a dict)")
    return saved


def one_line_of(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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
