"""Atomic file writes: a reader (or a resumed run) never sees half a file.

The content goes to a hidden temporary file beside the target, then ``os.replace``
renames it over the target in one step. A process killed mid-write leaves only the
temporary file, which ``TEMPORARY_PATTERN`` matches so a resumed run can remove it.
"""
from __future__ import annotations

import os
from pathlib import Path

TEMPORARY_PATTERN = ".*.tmp"


def temporary_sibling(path: Path) -> Path:
    """Where ``path`` is written before the rename (hidden, in the same folder, unique per process)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    tmp.write_text(text)
    os.replace(tmp, path)
