"""Atomic file writes: a reader (or a resumed run) never sees half a file.

The content goes to a hidden temporary file beside the target, then ``os.replace``
renames it over the target in one step. A process killed mid-write leaves only the
temporary file, which ``TEMPORARY_PATTERN`` matches so a resumed run can remove it.
A write that fails (disk full, no permission) removes its temporary file, leaves
the previous version of the target as it was and raises :class:`FileWriteError`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable

from utils.errors import UserError

TEMPORARY_PATTERN = ".*.tmp"


class FileWriteError(UserError):
    """A file could not be written (disk full, no permission, ...); the previous version is unchanged."""


def temporary_sibling(path: Path) -> Path:
    """Where ``path`` is written before the rename (hidden, in the same folder, unique per process)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Replace ``path`` by what ``write`` writes into an open binary file, all or nothing."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the rename makes them the file
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        kept = "its previous version is unchanged" if path.exists() else "nothing was written"
        raise FileWriteError(f"could not write {path}: {err.strerror or err} ({kept})") from err


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda file: file.write(text.encode()))
