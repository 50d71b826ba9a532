"""The synthetic VOC-layout dataset: layout, labels, determinism, idempotence, CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.layout import split_files
from utils.ignore import IGNORE_INDEX
from datasets.synthetic import CLASS_NAMES, MARKER, ensure_synthetic, generate, render_sample

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(num_train=60, num_val=20, image_size=64, seed=3, progress=False)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, **SMALL)
    return root


def _labels(root: Path, split: str) -> list[np.ndarray]:
    return [np.array(Image.open(p)) for p in split_files("voc", root, split).labels]


def _mtimes(base: Path) -> dict[str, int]:
    return {str(p.relative_to(base)): p.stat().st_mtime_ns for p in sorted(base.rglob("*")) if p.is_file()}


def test_class_names():
    assert len(CLASS_NAMES) == 21 and CLASS_NAMES[0] == "background"
    assert len(set(CLASS_NAMES)) == 21


def test_layout_and_lists(small_root):
    base = small_root / "VOCdevkit" / "VOC2012"
    assert (base / MARKER).is_file()
    marker = json.loads((base / MARKER).read_text())
    assert marker["num_train"] == 60 and marker["num_val"] == 20 and marker["image_size"] == 64
    for split, n, prefix in (("train", 60, "syn_train_"), ("val", 20, "syn_val_")):
        files = split_files("voc", small_root, split)
        assert len(files) == n
        assert files.ids[0] == f"{prefix}000000" and files.ids[-1] == f"{prefix}{n - 1:06d}"
        for line in (base / "list" / {"train": "train_aug.txt", "val": "val.txt"}[split]).read_text().splitlines():
            image, label = line.split()
            assert image.startswith("/JPEGImages/syn_") and label.startswith("/SegmentationClassAug/syn_")
        for image_path, label_path in zip(files.images, files.labels):
            with Image.open(image_path) as image, Image.open(label_path) as label:
                assert image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 64)
                assert label.format == "PNG" and label.mode == "L" and label.size == (64, 64)
    assert len(list((base / "JPEGImages").iterdir())) == 80
    assert len(list((base / "SegmentationClassAug").iterdir())) == 80


def test_label_values_and_ignore_ring(small_root):
    allowed = set(range(21)) | {IGNORE_INDEX}
    for label in _labels(small_root, "train") + _labels(small_root, "val"):
        values = set(np.unique(label).tolist())
        assert values <= allowed
        objects = (label > 0) & (label != IGNORE_INDEX)
        assert objects.any(), "every image shows at least one object"
        assert (label == IGNORE_INDEX).any()
        # Labelled object pixels never touch background directly: the 255 ring lies between.
        padded = np.pad(label, 1, mode="edge")
        for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
            neighbour = padded[1 + dy:1 + dy + 64, 1 + dx:1 + dx + 64]
            assert not (objects & (neighbour == 0)).any()
        # ...and every ignore pixel lies next to an object pixel.
        near_object = np.zeros_like(objects)
        pad_obj = np.pad(objects, 2)
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                near_object |= pad_obj[2 + dy:2 + dy + 64, 2 + dx:2 + dx + 64]
        assert near_object[label == IGNORE_INDEX].all()


def test_images_are_not_flat(small_root):
    files = split_files("voc", small_root, "train")
    image = np.asarray(Image.open(files.images[0]), dtype=np.float32)
    assert image.std() > 5.0


def test_deterministic_across_folders(tmp_path, small_root):
    generate(tmp_path, **SMALL)
    for split in ("train", "val"):
        a, b = split_files("voc", small_root, split), split_files("voc", tmp_path, split)
        assert a.ids == b.ids
        for pa, pb in zip(a.labels, b.labels):
            assert pa.read_bytes() == pb.read_bytes()
    # A different seed gives different data.
    assert not np.array_equal(render_sample(3, "train", 0, 64)[1], render_sample(4, "train", 0, 64)[1])
    # The thread count does not change the output.
    generate(tmp_path / "one_thread", **SMALL, workers=1)
    one = split_files("voc", tmp_path / "one_thread", "val")
    assert [p.read_bytes() for p in one.labels] == [p.read_bytes() for p in split_files("voc", tmp_path, "val").labels]


def test_idempotent(tmp_path):
    params = dict(num_train=20, num_val=20, image_size=48, seed=0, progress=False)
    base = generate(tmp_path, **params)
    before = _mtimes(base)
    assert ensure_synthetic(tmp_path, **params) == base
    assert _mtimes(base) == before


def test_missing_marker_or_other_params_regenerates(tmp_path):
    params = dict(num_train=20, num_val=20, image_size=48, seed=0, progress=False)
    base = generate(tmp_path, **params)
    label = base / "SegmentationClassAug" / "syn_train_000000.png"
    original = label.read_bytes()
    label.write_bytes(b"partial")  # as if interrupted mid-write
    (base / MARKER).unlink()
    generate(tmp_path, **params)
    assert (base / MARKER).is_file() and label.read_bytes() == original
    # Other parameters: the old images are removed, not left beside the new ones.
    generate(tmp_path, **{**params, "num_train": 25, "num_val": 21})
    assert len(split_files("voc", tmp_path, "train")) == 25
    assert len(list((base / "JPEGImages").iterdir())) == 46


def test_refuses_to_overwrite_real_data(tmp_path):
    images = tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages"
    images.mkdir(parents=True)
    (images / "2007_000032.jpg").write_bytes(b"real")
    with pytest.raises(FileExistsError):
        generate(tmp_path, num_train=20, num_val=20, image_size=32, progress=False)
    assert (images / "2007_000032.jpg").read_bytes() == b"real"


def test_all_classes_in_train(tmp_path):
    generate(tmp_path, num_train=200, num_val=20, image_size=48, seed=1, progress=False)
    for split in ("train", "val"):
        seen = set()
        for label in _labels(tmp_path, split):
            seen |= set(np.unique(label).tolist())
        assert set(range(1, 21)) <= seen, split


@pytest.mark.slow
def test_cli(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "datasets.synthetic", "--root", str(tmp_path), "--num-train", "20",
         "--num-val", "20", "--size", "32", "--seed", "5", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert str(tmp_path) in result.stdout
    marker = json.loads((tmp_path / "VOCdevkit" / "VOC2012" / MARKER).read_text())
    assert (marker["num_train"], marker["num_val"], marker["image_size"], marker["seed"]) == (20, 20, 32, 5)
    assert len(split_files("voc", tmp_path, "val")) == 20


def test_loads_through_the_voc_step_datasets(small_root):
    """The synthetic folder is read by the very code that reads real VOC: step selection, label
    rewriting and the joint transforms."""
    import torch

    from datasets.incremental import train_dataset, val_dataset
    from datasets.tasks import get_task
    from datasets.transforms import eval_transforms, train_transforms

    task = get_task("voc", "custom", custom_steps=[list(range(16)), [16, 17, 18, 19, 20]])
    labels = {i: set(np.unique(lbl).tolist()) for i, lbl in zip(split_files("voc", small_root, "train").ids,
                                                                  _labels(small_root, "train"))}
    train = train_dataset(task, 1, str(small_root), disjoint=False, transform=train_transforms(64, 48, (0.75, 1.25)),
                          progress=False)
    # exactly the images whose label map holds one of the step's classes
    assert sorted(train.ids) == sorted(i for i, values in labels.items() if values & set(range(16, 21)))
    image, label = train[0]
    assert image.shape == (3, 48, 48) and image.dtype == torch.uint8 and label.dtype == torch.uint8
    assert set(label.unique().tolist()) <= {0, 16, 17, 18, 19, 20, 255}  # old classes became background
    val = val_dataset(task, 0, str(small_root), eval_transforms("center_crop", 64, 64), progress=False)
    assert len(val) == 20
    assert set(torch.cat([val[i][1].unique() for i in range(len(val))]).tolist()) <= set(range(16)) | {255}
