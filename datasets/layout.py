"""Where a dataset's images and labels live on disk, and which ids each split has.

VOC (what ``download_voc.sh`` produces, and what ``datasets.synthetic`` writes)::

    ROOT/VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    ROOT/VOCdevkit/VOC2012/SegmentationClassAug/<id>.png
    ROOT/VOCdevkit/VOC2012/list/{train_aug,val}.txt

ADE20K (what ``download_ade20k.py`` produces)::

    ROOT/ADEChallengeData2016/images/{training,validation}/<id>.jpg
    ROOT/ADEChallengeData2016/annotations/{training,validation}/<id>.png

``ROOT`` may also be the ``VOC2012`` or ``ADEChallengeData2016`` folder itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from utils.errors import UserError
from utils.files import read_text


class DatasetLayoutError(UserError, FileNotFoundError):
    """The data root is missing or does not have the expected layout."""


@dataclass(frozen=True)
class SplitFiles:
    """The samples of one split: ids and the image/label path of each."""

    base: Path
    ids: tuple[str, ...]
    images: tuple[Path, ...]
    labels: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.ids)


VOC_LISTS = {"train": "train_aug.txt", "val": "val.txt"}
ADE_FOLDERS = {"train": "training", "val": "validation"}


def voc_base(root: str | Path) -> Path:
    root = Path(root)
    for candidate in (root / "VOCdevkit" / "VOC2012", root):
        if (candidate / "JPEGImages").is_dir() and (candidate / "SegmentationClassAug").is_dir():
            return candidate
    if not root.exists():
        raise DatasetLayoutError(
            f"VOC data root {str(root)!r} does not exist. Run `bash download_voc.sh {root}` "
            "or set data.synthetic.enabled=true for the built-in synthetic data.")
    raise DatasetLayoutError(
        f"VOC data root {str(root)!r} has the wrong layout: expected the folders "
        f"{root / 'VOCdevkit/VOC2012/JPEGImages'} and {root / 'VOCdevkit/VOC2012/SegmentationClassAug'} "
        "(as download_voc.sh produces).")


def ade_base(root: str | Path) -> Path:
    root = Path(root)
    for candidate in (root / "ADEChallengeData2016", root):
        if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
            return candidate
    if not root.exists():
        raise DatasetLayoutError(
            f"ADE20K data root {str(root)!r} does not exist. Run `python download_ade20k.py {root}`.")
    raise DatasetLayoutError(
        f"ADE20K data root {str(root)!r} has the wrong layout: expected the folders "
        f"{root / 'ADEChallengeData2016/images/training'} and {root / 'ADEChallengeData2016/annotations/training'} "
        "(as download_ade20k.py produces).")


def _parse_voc_list(list_file: Path, base: Path) -> SplitFiles:
    """Lines are either ``<id>`` or ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``; an id listed twice is
    refused (a validation image listed twice would be scored twice, a training image drawn twice as often)."""
    ids, images, labels = [], [], []
    first_line: dict[str, int] = {}
    for number, line in enumerate(read_text(list_file, "split list", DatasetLayoutError).splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) == 1:
            image_id = parts[0]
            image, label = base / "JPEGImages" / f"{image_id}.jpg", base / "SegmentationClassAug" / f"{image_id}.png"
        elif len(parts) == 2:
            image, label = base / parts[0].lstrip("/"), base / parts[1].lstrip("/")
            image_id = image.stem
        else:
            raise DatasetLayoutError(f"{list_file}:{number}: expected '<id>' or '<image> <label>', got {line!r}")
        if image_id in first_line:
            raise DatasetLayoutError(f"{list_file}:{number}: image {image_id!r} is listed twice (lines "
                                     f"{first_line[image_id]} and {number}); each sample has one line")
        first_line[image_id] = number
        ids.append(image_id)
        images.append(image)
        labels.append(label)
    if not ids:
        raise DatasetLayoutError(f"list file {list_file} is empty")
    return SplitFiles(base, tuple(ids), tuple(images), tuple(labels))


def split_files(dataset: str, root: str | Path, split: str) -> SplitFiles:
    """The samples of ``split`` ('train' or 'val') of ``dataset`` under ``root``."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if dataset == "voc":
        base = voc_base(root)
        list_file = base / "list" / VOC_LISTS[split]
        if not list_file.is_file():
            raise DatasetLayoutError(f"VOC split list {list_file} is missing (download_voc.sh puts it there)")
        return _parse_voc_list(list_file, base)
    if dataset == "ade":
        base = ade_base(root)
        image_dir = base / "images" / ADE_FOLDERS[split]
        label_dir = base / "annotations" / ADE_FOLDERS[split]
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise DatasetLayoutError(f"ADE20K folder {folder} is missing")
        images = tuple(sorted(image_dir.glob("*.jpg")))
        if not images:
            raise DatasetLayoutError(f"ADE20K folder {image_dir} holds no .jpg images")
        ids = tuple(p.stem for p in images)
        return SplitFiles(base, ids, images, tuple(label_dir / f"{i}.png" for i in ids))
    raise ValueError(f"unknown dataset {dataset!r}; known: voc, ade")
