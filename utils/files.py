"""Atomic file writes, and reading the text files a user hands the project.

Writes: a reader (or a resumed run) never sees half a file. The content goes to a hidden temporary file beside the target, then ``os.replace``
renames it over the target in one step. A process killed mid-write leaves only the
temporary file, which ``TEMPORARY_PATTERN`` matches so a resumed run can remove it.
A write that fails (disk full, no permission) removes its temporary file, leaves
the previous version of the target as it was and raises :class:`FileWriteError`.

Reads: :func:`read_text` is how every config, split-list and class-list file is read: UTF-8 whatever the
locale, a leading byte-order mark dropped, an undecodable file an error naming it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable

from utils.errors import UserError

TEMPORARY_PATTERN = ".*.tmp"


class FileWriteError(UserError):
    """A file could not be written (disk full, no permission, ...); the previous version is unchanged."""


class TextFileError(UserError, ValueError):
    """A text file (config, split list, class list) cannot be read or is not UTF-8 text."""


def read_text(path: str | Path, what: str, error: type[Exception] = TextFileError) -> str:
    """The text of ``path`` as UTF-8, without a leading byte-order mark (Windows editors write one; kept, it
    would stick to the first id or key). ``what`` names the file in the error (``error``, so a caller keeps
    its own error class): "class list file /x/train_cls.txt is not text (UTF-8 expected; ...)"."""
    path = Path(path)
    try:
        content = path.read_bytes()
    except OSError as err:
        raise error(f"{what} {path} cannot be read: {err.strerror or err}") from None
    try:
        return content.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise error(f"{what} {path} is not text (UTF-8 expected; {err.reason} at byte {err.start})") from None


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
