"""Per-image class lists: which classes each label map contains, and which samples are usable.

The file format is the standard one (``../shared/data/voc/train_cls.txt``)::

    <image_id> c1 c2 ...

with foreground classes 0-based (dataset class ``c + 1``), background and 255
left out. The lists are derived in one pass over a split (with a progress bar)
that also checks every sample: the image exists and decodes, the label is a PNG
of class indices (one channel) of the image's size, holding only classes of the
dataset and 255. The pass is cached: the lists of the good samples in the file
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from utils.errors import UserError
from utils.files import atomic_write_text

from .labels import IGNORE_INDEX
from .layout import SplitFiles, split_files
from .tasks import NUM_CLASSES

ClassLists = dict[str, frozenset[int]]  # image id -> dataset class ids (1-based foreground)
CACHE_VERSION = 2  # 2: the sidecar holds each bad sample's problem; the fingerprint covers the images


class ClassListError(UserError, ValueError):
    """A class-list file is missing, malformed or does not cover the split."""


class BadFilesError(UserError):
    """Samples of a split are missing, do not decode or hold labels the dataset does not have."""


class BadSample(Exception):
    """Why one sample cannot be used: "<path>: <problem>" (the pass collects them instead of stopping)."""


def read_class_lists(path: str | Path) -> ClassLists:
    """Read a ``<id> c1 c2 ...`` file (0-based foreground) into id -> 1-based class ids."""
    path = Path(path)
    if not path.is_file():
        raise ClassListError(f"class list file {str(path)!r} does not exist")
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise ClassListError(f"class list file {path} is not text ({err.reason} at byte {err.start}): expected "
                             "lines '<image_id> c1 c2 ...'") from None
    lists: ClassLists = {}
    for number, line in enumerate(text.splitlines(), 1):
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


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


@contextmanager
def _decoded(path: Path, what: str) -> Iterator[Image.Image]:
    """``path`` opened and fully decoded (a truncated file fails here, not mid-training)."""
    if not path.is_file():
        raise BadSample(f"{path}: {what} file is missing")
    unreadable = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
    try:
        opened = Image.open(path)
    except unreadable as err:
        raise BadSample(f"{path}: {what} does not decode ({_one_line(err)})") from None
    with opened:
        try:
            opened.load()
        except unreadable as err:
            raise BadSample(f"{path}: {what} does not decode ({_one_line(err)})") from None
        yield opened


def classes_in_sample(image_path: Path, label_path: Path, num_classes: int) -> frozenset[int]:
    """Check one sample; return the foreground classes (1..num_classes-1) its label holds, or raise
    :class:`BadSample` saying what is wrong."""
    with _decoded(image_path, "image") as image, _decoded(label_path, "label") as label:
        if label.format != "PNG":
            raise BadSample(f"{label_path}: label is not a PNG (it is {label.format or 'of unknown format'})")
        if label.mode not in ("L", "P"):
            raise BadSample(f"{label_path}: label has mode {label.mode} ({len(label.getbands())} channels), "
                            "expected one channel of class indices (mode L or P)")
        if label.size != image.size:
            raise BadSample(f"{label_path}: label is {label.size[0]}x{label.size[1]}, its image "
                            f"{image_path.name} is {image.size[0]}x{image.size[1]}")
        present = np.flatnonzero(np.bincount(np.asarray(label).ravel(), minlength=256))
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
        meta = json.loads(meta_file.read_text())
        if meta.get("fingerprint") != fingerprint:
            return None
        bad = dict(meta["bad"])
        lists = read_class_lists(cache_file) if len(bad) < len(files) else {}
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
    lists = read_class_lists(class_lists_file)
    missing = [i for i in files.ids if i not in lists]
    if missing:
        raise ClassListError(f"class list file {class_lists_file} has no entry for {len(missing)} "
                             f"{split} images, e.g. {missing[0]!r}")
    return files, lists
