"""Per-image class lists: which classes each label map contains.

The file format is the standard one (``../shared/data/voc/train_cls.txt``)::

    <image_id> c1 c2 ...

with foreground classes 0-based (dataset class ``c + 1``), background and 255
left out. The lists are derived from the label maps once, with a progress bar,
and cached; a sidecar ``.json`` records the split's ids and the label files'
sizes and modification times, so a stale or partial cache is detected and
rebuilt. A user may also point the project at such a file directly.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from utils.errors import UserError
from utils.files import atomic_write_text

from .layout import SplitFiles, split_files
from .tasks import NUM_CLASSES

ClassLists = dict[str, frozenset[int]]  # image id -> dataset class ids (1-based foreground)


class ClassListError(UserError, ValueError):
    """A class-list file is missing, malformed or does not cover the split."""


def read_class_lists(path: str | Path) -> ClassLists:
    """Read a ``<id> c1 c2 ...`` file (0-based foreground) into id -> 1-based class ids."""
    path = Path(path)
    if not path.is_file():
        raise ClassListError(f"class list file {str(path)!r} does not exist")
    lists: ClassLists = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            classes = frozenset(int(c) + 1 for c in parts[1:])
        except ValueError:
            raise ClassListError(f"{path}:{number}: class ids must be integers, got {line!r}") from None
        lists[parts[0]] = classes
    if not lists:
        raise ClassListError(f"class list file {path} is empty")
    return lists


def write_class_lists(path: str | Path, lists: ClassLists, ids: Optional[list[str]] = None) -> None:
    path = Path(path)
    lines = [" ".join([image_id] + [str(c - 1) for c in sorted(lists[image_id])]) for image_id in (ids or lists)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def classes_in_label(label_path: Path, num_classes: int) -> frozenset[int]:
    """Foreground class ids (1..num_classes-1) present in one label map."""
    values = np.unique(np.asarray(Image.open(label_path)))
    return frozenset(int(v) for v in values if 0 < v < num_classes)


def _fingerprint(files: SplitFiles) -> dict:
    digest = hashlib.sha1()
    for image_id, label in zip(files.ids, files.labels):
        stat = label.stat()
        digest.update(f"{image_id}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return {"num_images": len(files.ids), "labels_sha1": digest.hexdigest()}


def derive_class_lists(files: SplitFiles, num_classes: int, cache_file: Path,
                       progress: bool = True, workers: int = 8) -> ClassLists:
    """Class lists of ``files``, read from ``cache_file`` when it is current, else derived and cached."""
    missing = [str(p) for p in files.labels[:1000] if not p.is_file()]
    if missing:
        raise ClassListError(f"label file {missing[0]} is missing ({len(missing)} of the first 1000 checked)")
    meta_file = cache_file.with_suffix(cache_file.suffix + ".json")
    fingerprint = _fingerprint(files)
    if cache_file.is_file() and meta_file.is_file():
        try:
            if json.loads(meta_file.read_text()) == fingerprint:
                cached = read_class_lists(cache_file)
                if set(files.ids) <= cached.keys():
                    return cached
        except (ValueError, ClassListError):
            pass  # unreadable cache: rebuild it below
    # Decoding PNGs releases the GIL, so threads give a real speed-up.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = list(tqdm(pool.map(lambda p: classes_in_label(p, num_classes), files.labels),
                          total=len(files.labels), desc=f"class lists ({cache_file.name})",
                          disable=not progress, leave=False))
    lists = dict(zip(files.ids, found))
    write_class_lists(cache_file, lists, list(files.ids))
    atomic_write_text(meta_file, json.dumps(fingerprint))  # written last: its presence marks a complete cache
    return lists


def cache_file(files: SplitFiles, split: str, cache_dir: Optional[str]) -> Path:
    """Where derived lists are cached: next to the data, or in ``cache_dir``/the user cache when the data
    is read-only."""
    name = f"{split}_cls.txt"
    if cache_dir:
        return Path(cache_dir) / name
    preferred = files.base / "class_lists"
    try:
        preferred.mkdir(exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred / name
    except OSError:
        pass
    key = hashlib.sha1(str(files.base.resolve()).encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "mbs_ciss" / key / name


def load_class_lists(dataset: str, root: str, split: str, class_lists_file: Optional[str] = None,
                     cache_dir: Optional[str] = None, progress: bool = True) -> tuple[SplitFiles, ClassLists]:
    """The samples of ``split`` and their class lists: read from ``class_lists_file`` when given (it must
    cover every sample), else derived from the labels (cached)."""
    files = split_files(dataset, root, split)
    if class_lists_file:
        lists = read_class_lists(class_lists_file)
        missing = [i for i in files.ids if i not in lists]
        if missing:
            raise ClassListError(f"class list file {class_lists_file} has no entry for {len(missing)} "
                                 f"{split} images, e.g. {missing[0]!r}")
        return files, lists
    return files, derive_class_lists(files, NUM_CLASSES[dataset], cache_file(files, split, cache_dir), progress)
