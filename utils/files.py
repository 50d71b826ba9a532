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

import contextlib
import errno
import os
from pathlib import Path
from typing import BinaryIO, Callable, Optional

from utils.errors import UserError

TEMPORARY_PATTERN = ".*.tmp"

# A full disk or quota, found anywhere in an exception's chain, is a failed write whatever the outer exception.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


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


def exception_chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from or while handling (``__cause__``, else ``__context__``)."""
    chain: list[BaseException] = []
    while err is not None and not any(err is seen for seen in chain):
        chain.append(err)
        err = err.__cause__ if err.__cause__ is not None else err.__context__
    return chain


def write_failure(err: BaseException) -> Optional[OSError]:
    """The OSError that made a write fail, or None when ``err`` is not a failed write (a bug keeps its traceback).

    An OSError is a failed write. So is any exception whose chain holds a full disk: a writer may replace the
    OSError of its file by its own error (torch's zip writer raises "unexpected pos ..." from its ``__exit__``
    while the ENOSPC is in flight). Of the chain, the first OSError with an errno names the reason best.
    """
    errors = [e for e in exception_chain(err) if isinstance(e, OSError)]
    with_errno = [e for e in errors if e.errno is not None]
    if isinstance(err, OSError):
        return with_errno[0] if with_errno else err
    disk_full = [e for e in with_errno if e.errno in DISK_FULL_ERRNOS]
    return disk_full[0] if disk_full else None


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
    except BaseException as err:
        # Whatever stopped the write, a half-written temporary file only takes space (on a full disk, the
        # space the user needs back); the previous version of the target is untouched.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        failure = write_failure(err) if isinstance(err, Exception) else None  # never a KeyboardInterrupt
        if failure is None:
            raise
        kept = "its previous version is unchanged" if path.exists() else "nothing was written"
        raise FileWriteError(f"could not write {path}: {failure.strerror or failure} ({kept})") from err


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda file: file.write(text.encode()))
