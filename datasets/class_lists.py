"""Per-image class lists: which classes each label map contains, and which samples are usable.

The file format is the standard one (``../shared/data/voc/train_cls.txt``)::

    <image_id> c1 c2 ...

with foreground classes 0-based (dataset class ``c + 1``), background and 255
left out, each image once. The lists are derived in one pass over a split (with a
progress bar) that also checks every sample, read as training reads it
(:func:`datasets.samples.read_sample`): the image exists and decodes to 8-bit RGB,
the label is a PNG of class indices (one channel) of the image's size, holding only
classes of the dataset and 255. The pass is cached: the lists of the good samples in the file
above, and beside it a ``.json`` sidecar with a fingerprint of the split (its ids
and the sizes and modification times of every image and label) and the problem of
every bad sample; a changed, added or removed file makes the cache stale and it is
rebuilt. A user may also point the project at a class-list file directly.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from utils.errors import UserError
from utils.files import atomic_write_text, read_text

from .labels import IGNORE_INDEX
from .layout import SplitFiles, split_files
from .samples import BadSample, read_sample
from .tasks import NUM_CLASSES

ClassLists = dict[str, frozenset[int]]  # image id -> dataset class ids (1-based foreground)
# 2: the sidecar holds each bad sample's problem; the fingerprint covers the images. 3: samples are checked with
# the training reader (torchvision decodes the images), so a verdict of Pillow's is checked again.
CACHE_VERSION = 3


class ClassListError(UserError, ValueError):
    """A class-list file is missing, malformed or does not cover the split."""


class BadFilesError(UserError):
    """Samples of a split are missing, do not decode or hold labels the dataset does not have."""


def read_class_lists(path: str | Path, num_classes: int) -> ClassLists:
    """Read a ``<id> c1 c2 ...`` file into id -> 1-based class ids. ``num_classes`` counts background (VOC 21),
    so the file's classes are 0..num_classes - 2 (VOC 0..19, ADE20K 0..149).

    Refused with one line naming the file and the line: an id listed twice, a class id that is not an integer or
    is out of range. A 1-based file shifts every class by one (person would train as pottedplant); it is told
    apart when no line lists class 0 and the highest id is num_classes - 1, one past the last 0-based class, so
    it is refused as 1-based rather than merely out of range. A 1-based file that never lists the last class
    cannot be told from a 0-based one that never lists the first (no check can), so it reads as 0-based.
    """
    path = Path(path)
    if not path.is_file():
        raise ClassListError(f"class list file {str(path)!r} does not exist")
    text = read_text(path, "class list file", ClassListError)
    last = num_classes - 2  # the last foreground class, 0-based
    lists: ClassLists = {}
    first_line: dict[str, int] = {}
    outside: Optional[tuple[int, int]] = None  # (line, class id): the first class id out of range
    line_of_last_plus_one: Optional[int] = None  # the first line listing last + 1 (a 1-based file's last class)
    listed: set[int] = set()  # every class id of the file
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        image_id = parts[0]
        if image_id in first_line:
            raise ClassListError(f"{path}:{number}: image {image_id!r} is listed twice (lines {first_line[image_id]} "
                                 f"and {number}); each image has one line")
        first_line[image_id] = number
        try:
            classes = [int(c) for c in parts[1:]]
        except ValueError:
            raise ClassListError(f"{path}:{number}: class ids must be integers, got {line!r}") from None
        for class_id in classes:
            if outside is None and not 0 <= class_id <= last:
                outside = (number, class_id)
            if line_of_last_plus_one is None and class_id == last + 1:
                line_of_last_plus_one = number
        listed.update(classes)
        lists[image_id] = frozenset(c + 1 for c in classes)
    if not lists:
        raise ClassListError(f"class list file {path} is empty")
    if outside is not None:
        number, class_id = outside
        expected = (f"the format is '<image_id> c1 c2 ...' with foreground classes 0-based (0..{last}, dataset "
                    "class c + 1), background not listed")
        if min(listed) >= 1 and max(listed) == last + 1:  # ids 1..last + 1: every one shifted by one
            raise ClassListError(f"{path}:{line_of_last_plus_one}: class id {last + 1} is out of range and no line "
                                 f"lists class 0: the file looks 1-based; {expected}")
        raise ClassListError(f"{path}:{number}: class id {class_id} is outside 0..{last}; {expected}")
    return lists


def write_class_lists(path: str | Path, lists: ClassLists, ids: Optional[list[str]] = None) -> None:
    path = Path(path)
    lines = [" ".join([image_id] + [str(c - 1) for c in sorted(lists[image_id])]) for image_id in (ids or lists)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def classes_in_sample(image_path: Path, label_path: Path, num_classes: int) -> frozenset[int]:
    """Check one sample, read as training reads it; return the foreground classes (1..num_classes-1) its label
    holds, or raise :class:`BadSample` saying what is wrong."""
    _, label = read_sample(image_path, label_path)
    present = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    unknown = [int(v) for v in present if v >= num_classes and v != IGNORE_INDEX]
    if unknown:
        raise BadSample(f"{label_path}: label values {unknown} are neither a class (0..{num_classes - 1}) "
                        f"nor {IGNORE_INDEX} (ignore)")
    return frozenset(int(v) for v in present if 0 < v < num_classes)


def _check_sample(paths: tuple[Path, Path], num_classes: int) -> frozenset[int] | BadSample:
    try:
        return classes_in_sample(*paths, num_classes)
    except BadSample as problem:
        return problem


def _stat(path: Path) -> str:
    try:
        stat = path.stat()
    except OSError:
        return "missing"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _fingerprint(files: SplitFiles, num_classes: int) -> dict:
    digest = hashlib.sha1()
    for image_id, image, label in zip(files.ids, files.images, files.labels):
        digest.update(f"{image_id}:{image.name}:{_stat(image)}:{label.name}:{_stat(label)}\n".encode())
    return {"version": CACHE_VERSION, "num_images": len(files.ids), "num_classes": num_classes,
            "files_sha1": digest.hexdigest()}


def default_workers() -> int:
    """Threads for the pass: the CPUs this process may use (decoding releases the GIL)."""
    return min(32, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class SplitCheck:
    """What the pass over a split found."""

    files: SplitFiles
    lists: ClassLists        # the good samples' classes
    bad: dict[str, str]      # image id -> "<path>: <problem>", for every bad sample

    def usable_files(self) -> SplitFiles:
        """The split without its bad samples."""
        keep = [i for i, image_id in enumerate(self.files.ids) if image_id not in self.bad]
        return SplitFiles(self.files.base, tuple(self.files.ids[i] for i in keep),
                          tuple(self.files.images[i] for i in keep), tuple(self.files.labels[i] for i in keep))


def _read_cache(cache_file: Path, meta_file: Path, fingerprint: dict, files: SplitFiles) -> Optional[SplitCheck]:
    """The cached pass when it is current and complete, else None."""
    if not (cache_file.is_file() and meta_file.is_file()):
        return None
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))  # written by atomic_write_text: UTF-8
        if meta.get("fingerprint") != fingerprint:
            return None
        bad = dict(meta["bad"])
        lists = read_class_lists(cache_file, fingerprint["num_classes"]) if len(bad) < len(files) else {}
    except (ValueError, KeyError, TypeError, AttributeError, ClassListError):
        return None  # unreadable cache: rebuilt by the caller
    if not all(image_id in lists or image_id in bad for image_id in files.ids):
        return None
    return SplitCheck(files, lists, bad)


def check_samples(files: SplitFiles, num_classes: int, cache_file: Path, progress: bool = True,
                  workers: Optional[int] = None) -> SplitCheck:
    """Check every sample of ``files`` and derive the good ones' class lists; read from ``cache_file`` when it
    is current, else derived and cached."""
    meta_file = cache_file.with_suffix(cache_file.suffix + ".json")
    fingerprint = _fingerprint(files, num_classes)
    cached = _read_cache(cache_file, meta_file, fingerprint, files)
    if cached is not None:
        return cached
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        found = list(tqdm(pool.map(lambda paths: _check_sample(paths, num_classes), zip(files.images, files.labels)),
                          total=len(files), desc=f"checking data ({cache_file.name})", disable=not progress,
                          leave=False))
    lists = {i: f for i, f in zip(files.ids, found) if not isinstance(f, BadSample)}
    bad = {i: str(f) for i, f in zip(files.ids, found) if isinstance(f, BadSample)}
    write_class_lists(cache_file, lists, [i for i in files.ids if i in lists])
    # written last: its presence marks a complete cache
    atomic_write_text(meta_file, json.dumps({"fingerprint": fingerprint, "bad": bad}))
    return SplitCheck(files, lists, bad)


def describe_bad_samples(problems: list[str], limit: int = 10) -> str:
    """The first ``limit`` problems on one line."""
    shown = "; ".join(problems[:limit])
    return shown + (f"; ... ({len(problems) - limit} more)" if len(problems) > limit else "")


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


def check_split(dataset: str, root: str, split: str, cache_dir: Optional[str] = None, progress: bool = True,
                workers: Optional[int] = None) -> SplitCheck:
    """Every sample of ``split`` checked, with the good ones' class lists (cached; see the module doc)."""
    files = split_files(dataset, root, split)
    return check_samples(files, NUM_CLASSES[dataset], cache_file(files, split, cache_dir), progress, workers)


def load_class_lists(dataset: str, root: str, split: str, class_lists_file: Optional[str] = None,
                     cache_dir: Optional[str] = None, progress: bool = True, skip_bad_files: bool = False
                     ) -> tuple[SplitFiles, ClassLists]:
    """The usable samples of ``split`` and their class lists: read from ``class_lists_file`` when given (it
    must cover every sample), else derived from the labels (cached). A bad sample is an error, or with
    ``skip_bad_files`` left out."""
    check = check_split(dataset, root, split, cache_dir, progress)
    if check.bad and not skip_bad_files:
        raise BadFilesError(f"{len(check.bad)} of the {len(check.files)} {split} samples under {check.files.base} "
                            f"cannot be used: {describe_bad_samples(list(check.bad.values()))}. Fix or remove "
                            "them, or set data.skip_bad_files=true to leave them out")
    files = check.usable_files()
    if not class_lists_file:
        return files, check.lists
    lists = read_class_lists(class_lists_file, NUM_CLASSES[dataset])
    missing = [i for i in files.ids if i not in lists]
    if missing:
        raise ClassListError(f"class list file {class_lists_file} has no entry for {len(missing)} "
                             f"{split} images, e.g. {missing[0]!r}")
    return files, lists
