"""Fetch PASCAL VOC 2012 (+ SegmentationClassAug) and ADE20K into the layout ``datasets.layout`` reads.

    python -m datasets.download voc ROOT     (what ``bash download_voc.sh ROOT`` runs)
    python -m datasets.download ade ROOT     (what ``python download_ade20k.py ROOT`` runs)

Every step can be interrupted and rerun:

* downloads go to ``ROOT/downloads/<file>.part`` and continue with an HTTP Range request
  (automatically a few times, then on the next run); only a file whose checksum matches
  is renamed to ``<file>``, and such a file is not fetched again;
* archives are extracted into a hidden ``ROOT/.<name>.partial`` folder, checked there
  (image counts, every listed image and label present) and only then renamed into place,
  with a ``.download-complete`` marker inside; a dataset with the marker is left alone;
* any failure prints one line saying what failed and what to run, and exits with code 2; an archive
  that cannot be extracted is removed (so the next run fetches it again), and a disk that fills up
  during extraction leaves no half-extracted folder behind.

The VOC split lists are built from the archives, not fetched: ``val`` is the official
``ImageSets/Segmentation/val.txt`` (1449 ids) and ``train_aug`` every id that has both a
JPEG and a SegmentationClassAug label, minus ``val`` (10582 ids).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import http.client
import os
import re
import shlex
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from datasets.layout import DatasetLayoutError, split_files
from utils.errors import UserError

MARKER = ".download-complete"
CHUNK = 1 << 20
VOC_COUNTS = (10582, 1449)   # train_aug, val
ADE_COUNTS = (20210, 2000)   # training, validation
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # the disk (or the user's quota) is full


class DownloadError(UserError):
    """A download, checksum, archive or content check failed; the message says what to run."""


@dataclass(frozen=True)
class Archive:
    """One file to fetch. ``checksum`` is ``"<hashlib name>:<hex digest>"`` or None (content check only)."""

    key: str           # names the CLI flags --<key>-url / --<key>-checksum
    description: str
    url: str
    filename: str
    checksum: str | None
    env: str           # <env>_URL and <env>_CHECKSUM override url and checksum


# MD5 as listed by torchvision's VOCSegmentation (the thor mirror is the one torchvision uses).
VOC_TRAINVAL = Archive(
    "trainval", "VOC 2012 trainval tar",
    "https://thor.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
    "VOCtrainval_11-May-2012.tar", "md5:6cd6e144f989b92b3379bac3b3de84fd", "MBS_VOC_TRAINVAL")
# The SBD labels in VOC's PNG format (12031 PNGs), as used by DeepLab, MiB, PLOP and SSUL. No checksum
# is published for it, so only the content check guards it. The authors' README fetches the same
# archive from http://cs.jhu.edu/~cxliu/data/SegmentationClassAug.zip.
VOC_AUG = Archive(
    "aug", "SegmentationClassAug zip",
    "https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip?dl=1",
    "SegmentationClassAug.zip", None, "MBS_VOC_AUG")
# SHA1 as listed by the authors' download_ade20k.py (from GluonCV).
ADE = Archive(
    "ade", "ADE20K SceneParsing zip",
    "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
    "ADEChallengeData2016.zip", "sha1:219e1696abb36c8ba3a3afe7fb2f4b4606a897c7", "MBS_ADE")

DEFAULT_URLS = {archive.key: archive.url for archive in (VOC_TRAINVAL, VOC_AUG, ADE)}
ALTERNATIVE_URLS = {
    "trainval": "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
    "aug": "http://cs.jhu.edu/~cxliu/data/SegmentationClassAug.zip",
}


@dataclass(frozen=True)
class Retry:
    """How persistently a download is resumed within one run."""

    attempts: int = 5
    first_wait_s: float = 2.0     # doubled after each failed attempt, at most max_wait_s
    max_wait_s: float = 60.0
    timeout_s: float = 60.0       # a connection silent this long counts as cut


class ConnectionCut(ConnectionError):
    """The server closed the connection before the whole file arrived (worth resuming)."""


# ---------------------------------------------------------------------------------------------
# Downloading


def rerun_command(dataset: str, root: Path) -> str:
    return f"bash download_voc.sh {root}" if dataset == "voc" else f"python download_ade20k.py {root}"


def fetch(archive: Archive, folder: Path, rerun: str, retry: Retry = Retry()) -> Path:
    """``folder/<filename>``, downloaded (resuming ``<filename>.part``) and checksum-verified."""
    target = folder / archive.filename
    if target.is_file():
        print(f"have {target}")
        verify_checksum(archive, target, rerun)
        return target
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    download_with_retries(archive, partial, rerun, retry)
    verify_checksum(archive, partial, rerun)
    os.replace(partial, target)
    return target


def download_with_retries(archive: Archive, partial: Path, rerun: str, retry: Retry) -> None:
    wait_s = retry.first_wait_s
    for attempt in range(1, retry.attempts + 1):
        try:
            download_once(archive, partial, retry.timeout_s)
            return
        except (OSError, http.client.HTTPException) as error:  # URLError, timeouts and ConnectionCut are OSErrors
            failure_here = local_failure(error, archive, partial, rerun)
            if failure_here is not None:
                raise failure_here from error
            if is_permanent(error) or attempt == retry.attempts:
                kept = partial.stat().st_size if partial.is_file() else 0
                raise DownloadError(
                    f"could not download the {archive.description} from {archive.url} ({describe(error)}); "
                    f"{partial} keeps the {kept} bytes fetched so far. Rerun `{rerun}` to resume, or point "
                    f"{archive.env}_URL (or --{archive.key}-url) at a mirror"
                    + (f" such as {ALTERNATIVE_URLS[archive.key]}" if archive.key in ALTERNATIVE_URLS else "")
                    + ".") from error
            print(f"{archive.filename}: {describe(error)}; resuming in {wait_s:g} s "
                  f"(attempt {attempt + 1} of {retry.attempts})", file=sys.stderr)
            time.sleep(wait_s)
            wait_s = min(2 * wait_s, retry.max_wait_s)


def local_failure(error: BaseException, archive: Archive, partial: Path, rerun: str) -> DownloadError | None:
    """The error for a failure on this machine (a full disk, a missing local file), which asking again will not
    fix: retrying is for the network. None for any other failure."""
    if isinstance(error, OSError) and error.errno in NO_SPACE:
        kept = partial.stat().st_size if partial.is_file() else 0
        free = shutil.disk_usage(partial.parent).free
        return DownloadError(
            f"no space left in {partial.parent} to download the {archive.description} ({error.strerror}): "
            f"{partial} keeps the {kept} bytes fetched so far and {size_text(free)} are free there. "
            f"Free some space, then rerun `{rerun}` to resume.")
    if is_local(archive.url) and isinstance(error, urllib.error.URLError):  # urllib's wrapper of open()'s error
        return DownloadError(
            f"cannot read the {archive.description} {local_path(archive.url)} ({local_reason(error)}); "
            f"{archive.env}_URL (or --{archive.key}-url) gives it as {archive.url}: point it at the file, "
            f"or leave it unset to download from {DEFAULT_URLS.get(archive.key, 'the official URL')}.")
    return None


def is_permanent(error: BaseException) -> bool:
    """A client error (404, 403, ...) will not go away by asking again; timeouts and rate limits may."""
    return isinstance(error, urllib.error.HTTPError) and 400 <= error.code < 500 and error.code not in (408, 429)


def is_local(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme == "file"


def local_path(url: str) -> str:
    return urllib.request.url2pathname(urllib.parse.urlsplit(url).path)


def local_reason(error: BaseException) -> str:
    """"No such file or directory" rather than urllib's "<urlopen error [Errno 2] ...: '/the/path'>"."""
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason)


def describe(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return str(error) or type(error).__name__


def download_once(archive: Archive, partial: Path, timeout_s: float) -> None:
    """Append the rest of the file to ``partial`` (or start it over when the server ignores the Range)."""
    have = partial.stat().st_size if partial.is_file() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(archive.url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as error:
        if error.code != 416 or not have:
            raise
        # Nothing left past ``have``: the file is complete (the checksum decides) unless it is too long.
        total = content_range_total(error.headers.get("Content-Range"))
        if total is not None and total != have:
            partial.unlink()
            raise ConnectionCut(f"{partial} holds {have} bytes but the file has {total}; starting over") from None
        return
    with response:
        if response.status == 206:
            content_range = response.headers.get("Content-Range")
            if content_range_start(content_range) != have:
                partial.unlink()
                raise ConnectionCut(f"asked for bytes {have}- but got {content_range!r}; starting over")
            mode, start, total = "ab", have, content_range_total(content_range)
            print(f"{archive.filename}: resuming at byte {start}")
        else:  # 200: the whole file (a server that ignores Range makes us start over)
            mode, start = "wb", 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        with open(partial, mode) as out, tqdm(total=total, initial=start, unit="B", unit_scale=True,
                                              desc=archive.filename, disable=None) as bar:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
    size = partial.stat().st_size
    if total is not None and size < total:
        raise ConnectionCut(f"connection closed after {size} of {total} bytes")


def content_range_start(header: str | None) -> int | None:
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (header or "").strip())
    return int(match.group(1)) if match else None


def content_range_total(header: str | None) -> int | None:
    match = re.fullmatch(r"bytes (?:\d+-\d+|\*)/(\d+)", (header or "").strip())
    return int(match.group(1)) if match else None


def file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(archive: Archive, path: Path, rerun: str) -> None:
    """Remove ``path`` and fail if its digest is not the expected one (no checksum: print one to pin it)."""
    if archive.checksum is None:
        print(f"{path.name}: no checksum to compare; its sha256 is {file_digest(path, 'sha256')} "
              f"(pass --{archive.key}-checksum sha256:<that> to pin it)")
        return
    algorithm, expected = archive.checksum.split(":", 1)
    print(f"checking the {algorithm} of {path.name}")
    got = file_digest(path, algorithm)
    if got != expected.lower():
        path.unlink()
        raise DownloadError(
            f"{path}: {algorithm} checksum {got} does not match the expected {expected} for the "
            f"{archive.description} from {archive.url}; the file was removed. Rerun `{rerun}` to download it "
            f"again; if you trust a different release of it, pass --{archive.key}-checksum {algorithm}:<digest> "
            f"(or none).")


# ---------------------------------------------------------------------------------------------
# Extraction


def inside(base: Path, member: str, archive: Path) -> Path:
    """Where ``member`` goes under ``base``; an absolute path or one climbing out of ``base`` is refused."""
    destination = (base / member).resolve()
    if not destination.is_relative_to(base.resolve()):
        raise DownloadError(f"{archive} holds the unsafe path {member!r} (outside the extraction folder); "
                            f"delete {archive} and check the URL it came from.")
    return destination


# What reading a damaged archive raises: a bad header or CRC, a truncated or garbled compressed stream.
ARCHIVE_DAMAGE = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError)


@contextlib.contextmanager
def removed_if_damaged(path: Path, archive: Archive, rerun: str):
    """An archive that cannot be extracted is one line, and is removed: kept, the next run would reuse it."""
    try:
        yield
    except ARCHIVE_DAMAGE as error:
        path.unlink(missing_ok=True)
        raise DownloadError(
            f"{path} could not be extracted ({error}): it is damaged or not the {archive.description}, and was "
            f"removed. Rerun `{rerun}` to download it again; if this happens again, the copy at {archive.url} is "
            f"damaged: point {archive.env}_URL (or --{archive.key}-url) at another one.") from error


@contextlib.contextmanager
def space_checked(staging: Path, archives: list[Path], rerun: str):
    """A disk that fills up during extraction is one line saying how much space is needed; the half-extracted
    ``staging`` folder is removed first, so the free space reported is what a rerun will have."""
    try:
        yield
    except OSError as error:
        if error.errno not in NO_SPACE:
            raise
        shutil.rmtree(staging, ignore_errors=True)
        needed = sum(extracted_size(path) for path in archives)
        free = shutil.disk_usage(staging.parent).free
        raise DownloadError(
            f"no space left in {staging.parent} while extracting into {staging} ({error.strerror}): the extracted "
            f"data needs about {size_text(needed)} and {size_text(free)} are free there. The half-extracted "
            f"folder was removed and the archives are kept in {archives[0].parent}; free some space or give "
            f"another ROOT, then rerun `{rerun}`.") from error


def extracted_size(archive: Path) -> int:
    """Bytes the members of a tar or zip archive take once extracted."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            return sum(info.file_size for info in zf.infolist())
    with tarfile.open(archive) as tar:
        return sum(member.size for member in tar)


def size_text(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def extract_tar(archive: Path, destination: Path) -> None:
    with tarfile.open(archive) as tar:
        tar.extractall(destination, filter="data")  # refuses absolute paths, '..' and links out


def extract_zip(archive: Path, destination: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            inside(destination, info.filename, archive)
        zf.extractall(destination)


def extract_aug_labels(archive: Path, label_dir: Path) -> int:
    """Copy every ``*.png`` of the SegmentationClassAug zip (macOS resource forks left out) into ``label_dir``."""
    label_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            parts = Path(info.filename).parts
            if info.is_dir() or not info.filename.endswith(".png") or "__MACOSX" in parts or parts[-1].startswith("._"):
                continue
            with zf.open(info) as source, open(inside(label_dir, parts[-1], archive), "wb") as target:
                shutil.copyfileobj(source, target)
            count += 1
    return count


# ---------------------------------------------------------------------------------------------
# Content: split lists and checks


def voc_split_ids(aug_ids: set[str], jpeg_ids: set[str], official_val: list[str]) -> tuple[list[str], list[str]]:
    """(train_aug, val): train_aug = ids with a SegmentationClassAug label and a JPEG, minus the official val."""
    val = set(official_val)
    return sorted((aug_ids & jpeg_ids) - val), list(official_val)


def read_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise DownloadError(f"{path} is missing: the VOC trainval archive does not have the expected layout.")
    return [line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_voc_lists(base: Path) -> None:
    """``base/list/{train_aug,val}.txt`` from the extracted archives (lines: /JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png)."""
    aug_ids = {p.stem for p in (base / "SegmentationClassAug").glob("*.png")}
    jpeg_ids = {p.stem for p in (base / "JPEGImages").glob("*.jpg")}
    train, val = voc_split_ids(aug_ids, jpeg_ids, read_ids(base / "ImageSets" / "Segmentation" / "val.txt"))
    (base / "list").mkdir(exist_ok=True)
    for name, ids in (("train_aug.txt", train), ("val.txt", val)):
        (base / "list" / name).write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids),
                                          encoding="utf-8")


def content_problems(dataset: str, base: Path, expected: dict[str, int]) -> list[str]:
    """What is wrong with the dataset at ``base`` as the project reads it (empty: nothing)."""
    problems = []
    for split, count in expected.items():
        try:
            files = split_files(dataset, base, split)
        except DatasetLayoutError as error:
            problems.append(str(error))
            continue
        if len(files) != count:
            problems.append(f"{split} has {len(files)} images, expected {count}")
        missing = [p for p in files.images + files.labels if not p.is_file()]
        if missing:
            problems.append(f"{split}: {len(missing)} listed files are missing, e.g. {missing[0]}")
    return problems


def voc_extra_problems(base: Path) -> list[str]:
    """Every official segmentation training id must be in train_aug (else the label archive is the wrong one)."""
    official_train = set(read_ids(base / "ImageSets" / "Segmentation" / "train.txt"))
    train_aug = set(split_files("voc", base, "train").ids)
    absent = sorted(official_train - train_aug)
    return [f"{len(absent)} official train ids have no SegmentationClassAug label, e.g. {absent[0]}"] if absent else []


def ade_extra_problems(base: Path) -> list[str]:
    info = base / "objectInfo150.txt"
    return [] if info.is_file() else [f"{info} (the class names) is missing"]


# ---------------------------------------------------------------------------------------------
# Atomic preparation


def already_done(final: Path, dataset: str, expected: dict[str, int], rerun: str) -> bool:
    """True if ``final`` is complete; an existing folder that fails the content check is an error, not overwritten."""
    if (final / MARKER).is_file():
        print(f"{final} is complete ({MARKER} present); nothing to do")
        return True
    if not final.exists():
        return False
    problems = content_problems(dataset, final, expected)
    if problems:
        raise DownloadError(
            f"{final} exists but is incomplete ({'; '.join(problems)}). It was not made by this script; "
            f"move it away (mv {final} {final}.old) and rerun `{rerun}`.")
    print(f"{final} already holds a complete dataset; nothing to do")
    return True


def finish(staged: Path, final: Path, dataset: str, expected: dict[str, int], extra_problems, archives: list[Path],
           rerun: str) -> None:
    """Check ``staged``, mark it complete and rename it to ``final`` (one step, so never half there)."""
    problems = content_problems(dataset, staged, expected)
    if not problems:
        problems = extra_problems(staged)
    if problems:
        # The archives are kept (the expected counts may be what is wrong), so a rerun would reuse them: say which
        # files to delete when they are the wrong ones.
        raise DownloadError(
            f"the extracted {dataset.upper()} data failed the content check: {'; '.join(problems)}. Nothing was put "
            f"in {final}; the archives are kept and a rerun reuses them. If they are not the right ones, delete them "
            f"(rm {' '.join(shlex.quote(str(path)) for path in archives)}) and rerun `{rerun}` with the right URLs.")
    counts = ", ".join(f"{split} {count}" for split, count in expected.items())
    (staged / MARKER).write_text(f"checked: {counts} images, every listed image and label present\n", encoding="utf-8")
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staged, final)


def kind_of(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return "a broken link"
    return "a folder" if path.is_dir() else "a file" if path.is_file() else "a special file"


def check_path_kinds(folders: dict[Path, str], files: list[Path]) -> None:
    """Fail with one line, before anything is written, where a file stands in for a folder the download needs
    (``python download_ade20k.py some_file``) or a folder stands where it keeps an archive."""
    for folder, holds in folders.items():
        existing = next((path for path in (folder, *folder.parents) if path.exists() or path.is_symlink()), None)
        if existing is not None and not existing.is_dir():
            must = "it must be one" if existing == folder else f"{folder} must be a folder"
            raise DownloadError(f"{existing} is {kind_of(existing)}, not a folder, but {must} ({holds}): "
                                f"give another ROOT or move {existing} away, then rerun.")
    for file in files:
        if (file.exists() or file.is_symlink()) and not file.is_file():
            raise DownloadError(f"{file} is {kind_of(file)}, not a file, but the download keeps an archive there: "
                                f"move it away, then rerun.")


def check_prepare_paths(root: Path, final: Path, staging: Path, downloads: Path, archives: list[Archive]) -> None:
    folders = {root: "the data root; it is created if missing"}
    for folder, holds in ((final.parent, f"it holds {final.name}"), (final, "the dataset"),
                          (downloads, "the archives"), (staging, "the extraction in progress")):
        folders.setdefault(folder, holds)  # for ADE20K the root is the dataset's parent
    files = [downloads / name for archive in archives for name in (archive.filename, archive.filename + ".part")]
    check_path_kinds(folders, files)


def remove_archives(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
    try:
        paths[0].parent.rmdir()
    except OSError:  # not empty: other files live there
        pass


def prepare_voc(root: str | Path, trainval: Archive = VOC_TRAINVAL, aug: Archive = VOC_AUG,
                counts: tuple[int, int] = VOC_COUNTS, keep_archives: bool = False, retry: Retry = Retry()) -> Path:
    """``root/VOCdevkit/VOC2012`` with JPEGImages, SegmentationClassAug and list/{train_aug,val}.txt."""
    root = Path(root)
    final = root / "VOCdevkit" / "VOC2012"
    rerun = rerun_command("voc", root)
    expected = {"train": counts[0], "val": counts[1]}
    if already_done(final, "voc", expected, rerun):
        return final
    staging = root / ".VOC2012.partial"
    check_prepare_paths(root, final, staging, root / "downloads", [trainval, aug])
    archives = [fetch(a, root / "downloads", rerun, retry) for a in (trainval, aug)]
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    try:
        with space_checked(staging, archives, rerun):
            print(f"extracting {archives[0].name}")
            with removed_if_damaged(archives[0], trainval, rerun):
                extract_tar(archives[0], staging)
            base = staging / "VOCdevkit" / "VOC2012"
            print(f"extracting {archives[1].name}")
            with removed_if_damaged(archives[1], aug, rerun):
                extract_aug_labels(archives[1], base / "SegmentationClassAug")
            write_voc_lists(base)
            finish(base, final, "voc", expected, voc_extra_problems, archives, rerun)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not keep_archives:
        remove_archives(archives)
    print(f"VOC ready in {final}: {counts[0]} train-aug and {counts[1]} val images")
    return final


def prepare_ade(root: str | Path, ade: Archive = ADE, counts: tuple[int, int] = ADE_COUNTS,
                keep_archives: bool = False, retry: Retry = Retry()) -> Path:
    """``root/ADEChallengeData2016`` with {images,annotations}/{training,validation} and objectInfo150.txt."""
    root = Path(root)
    final = root / "ADEChallengeData2016"
    rerun = rerun_command("ade", root)
    expected = {"train": counts[0], "val": counts[1]}
    if already_done(final, "ade", expected, rerun):
        return final
    staging = root / ".ADEChallengeData2016.partial"
    check_prepare_paths(root, final, staging, root / "downloads", [ade])
    archive = fetch(ade, root / "downloads", rerun, retry)
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    try:
        with space_checked(staging, [archive], rerun):
            print(f"extracting {archive.name}")
            with removed_if_damaged(archive, ade, rerun):
                extract_zip(archive, staging)
            finish(staging / "ADEChallengeData2016", final, "ade", expected, ade_extra_problems, [archive], rerun)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not keep_archives:
        remove_archives([archive])
    print(f"ADE20K ready in {final}: {counts[0]} training and {counts[1]} validation images")
    return final


# ---------------------------------------------------------------------------------------------
# Command line


def add_archive_options(parser: argparse.ArgumentParser, archive: Archive) -> None:
    parser.add_argument(f"--{archive.key}-url", default=os.environ.get(f"{archive.env}_URL", archive.url),
                        help=f"where the {archive.description} comes from (env {archive.env}_URL; default %(default)s)")
    parser.add_argument(f"--{archive.key}-checksum", default=os.environ.get(f"{archive.env}_CHECKSUM", archive.checksum),
                        help=f"<md5|sha1|sha256>:<hex digest> of it, or 'none' (env {archive.env}_CHECKSUM; "
                             "default %(default)s)")


def configured(archive: Archive, args: argparse.Namespace) -> Archive:
    checksum = getattr(args, f"{archive.key}_checksum")
    if checksum is not None and checksum.lower() == "none":
        checksum = None
    if checksum is not None:
        algorithm, _, digest = checksum.partition(":")
        if algorithm not in hashlib.algorithms_available or not re.fullmatch(r"[0-9a-fA-F]+", digest):
            raise DownloadError(f"--{archive.key}-checksum {checksum!r}: expected <md5|sha1|sha256>:<hex digest> or none")
    return replace(archive, url=getattr(args, f"{archive.key}_url"), checksum=checksum)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m datasets.download", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    datasets = parser.add_subparsers(dest="dataset", required=True)
    for name, archives, counts, splits in (("voc", (VOC_TRAINVAL, VOC_AUG), VOC_COUNTS, ("train-aug", "val")),
                                           ("ade", (ADE,), ADE_COUNTS, ("training", "validation"))):
        sub = datasets.add_parser(name, help=f"download {name.upper()} into ROOT")
        sub.add_argument("root", nargs="?", default="data", help="data root (default %(default)s)")
        for archive in archives:
            add_archive_options(sub, archive)
        sub.add_argument("--expect-train", type=int, default=counts[0],
                         help=f"{splits[0]} images the content check expects (default %(default)s)")
        sub.add_argument("--expect-val", type=int, default=counts[1],
                         help=f"{splits[1]} images the content check expects (default %(default)s)")
        sub.add_argument("--keep-archives", action="store_true", help="keep ROOT/downloads/* after success")
        sub.add_argument("--attempts", type=int, default=Retry.attempts,
                         help="download attempts (each resumes the last) before giving up (default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    retry = Retry(attempts=max(1, args.attempts))
    counts = (args.expect_train, args.expect_val)
    try:
        if args.dataset == "voc":
            prepare_voc(args.root, configured(VOC_TRAINVAL, args), configured(VOC_AUG, args), counts,
                        args.keep_archives, retry)
        else:
            prepare_ade(args.root, configured(ADE, args), counts, args.keep_archives, retry)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; rerun `{rerun_command(args.dataset, Path(args.root))}` to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
