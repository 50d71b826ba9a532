"""Data layout errors, class-list caching, label rewriting and the transform presets,
on a tiny hand-made VOC-layout folder."""
import time

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.class_lists import ClassListError, load_class_lists, read_class_lists
from datasets.incremental import selection_dataset, train_dataset, val_dataset
from datasets.labels import label_lookup
from datasets.layout import DatasetLayoutError, split_files
from datasets.tasks import NUM_CLASSES, get_task
from datasets.transforms import eval_transforms, train_transforms


def make_voc(root, labels_by_split):
    """labels_by_split: {'train': {id: (H, W) uint8 array}, 'val': {...}}"""
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClassAug", "list"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for split, items in labels_by_split.items():
        lines = []
        for image_id, label in items.items():
            image = np.full(label.shape + (3,), 100, np.uint8)
            Image.fromarray(image).save(base / "JPEGImages" / f"{image_id}.jpg")
            Image.fromarray(label).save(base / "SegmentationClassAug" / f"{image_id}.png")
            lines.append(f"/JPEGImages/{image_id}.jpg /SegmentationClassAug/{image_id}.png")
        (base / "list" / ("train_aug.txt" if split == "train" else "val.txt")).write_text("\n".join(lines) + "\n")
    return base


def label_with(*values, size=(20, 24)):
    label = np.zeros(size, np.uint8)
    for i, v in enumerate(values):
        label[2 + 3 * i: 4 + 3 * i, 2:10] = v
    return label


@pytest.fixture
def voc(tmp_path):
    base = make_voc(tmp_path, {
        "train": {"a": label_with(1), "b": label_with(1, 3), "c": label_with(3, 255), "d": label_with()},
        "val": {"v1": label_with(1, 2), "v2": label_with(3)},
    })
    return tmp_path, base


def test_missing_and_wrong_layout(tmp_path):
    with pytest.raises(DatasetLayoutError, match="does not exist.*download_voc.sh"):
        split_files("voc", tmp_path / "nowhere", "train")
    (tmp_path / "VOCdevkit").mkdir()
    with pytest.raises(DatasetLayoutError, match="wrong layout: expected the folders .*JPEGImages"):
        split_files("voc", tmp_path, "train")
    with pytest.raises(DatasetLayoutError, match="ADEChallengeData2016/images/training"):
        split_files("ade", tmp_path, "train")


def test_missing_list_file_is_named(voc):
    root, base = voc
    (base / "list" / "val.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="list/val.txt is missing"):
        split_files("voc", root, "val")


def test_class_lists_derived_cached_and_rebuilt_when_stale(voc):
    root, base = voc
    files, lists = load_class_lists("voc", root, "train", progress=False)
    assert lists == {"a": {1}, "b": {1, 3}, "c": {3}, "d": set()}
    cache = base / "class_lists" / "train_cls.txt"
    # same text format as the standard lists: 0-based foreground
    assert read_class_lists(cache, NUM_CLASSES["voc"]) == lists and "b 0 2" in cache.read_text()
    stamp = cache.stat().st_mtime_ns
    time.sleep(0.01)
    load_class_lists("voc", root, "train", progress=False)
    assert cache.stat().st_mtime_ns == stamp  # served from the cache
    # a label changes -> stale cache is detected and rebuilt
    Image.fromarray(label_with(2)).save(base / "SegmentationClassAug" / "d.png")
    _, lists = load_class_lists("voc", root, "train", progress=False)
    assert lists["d"] == {2}
    # a partial cache (no sidecar) is rebuilt too
    (base / "class_lists" / "train_cls.txt.json").unlink()
    cache.write_text("a 0\n")
    _, lists = load_class_lists("voc", root, "train", progress=False)
    assert set(lists) == {"a", "b", "c", "d"}


def test_user_class_list_file_must_cover_split(voc, tmp_path):
    root, _ = voc
    partial = tmp_path / "mine.txt"
    partial.write_text("a 0\n")
    with pytest.raises(ValueError, match="no entry for 3 train images"):
        load_class_lists("voc", root, "train", class_lists_file=str(partial))
    with pytest.raises(ClassListError, match="does not exist"):
        read_class_lists(tmp_path / "nope.txt", NUM_CLASSES["voc"])


def test_label_rewriting_train_and_val():
    task = get_task("voc", "t", custom_steps=[[0, 1, 2], [3, 4], [5]])
    train1 = label_lookup(task, 1, "train")
    assert [train1[c] for c in (0, 1, 2, 3, 4, 5, 255)] == [0, 0, 0, 3, 4, 0, 255]  # old and future -> 0
    val1 = label_lookup(task, 1, "val")
    assert [val1[c] for c in (0, 1, 2, 3, 4, 5, 255)] == [0, 1, 2, 3, 4, 255, 255]  # unseen -> ignore
    ade = get_task("ade", "100-50")
    assert label_lookup(ade, 0, "val")[0] == 255 and label_lookup(ade, 0, "train")[0] == 0


def test_shuffled_order_remaps_channels():
    task = get_task("voc", "15-1_b")  # order 0, 12, 9, 20, ...; step 1 learns class 17
    lut = label_lookup(task, 1, "train")
    assert lut[17] == 16 and lut[12] == 0
    val = label_lookup(task, 0, "val")
    assert val[12] == 1 and val[9] == 2 and val[20] == 3 and val[17] == 255


def test_step_dataset_selection_and_labels(voc):
    root, _ = voc
    task = get_task("voc", "t", custom_steps=[[0, 1, 2], [3] + list(range(4, 21))])
    plain = eval_transforms("full", 16, 16)
    step1 = train_dataset(task, 1, str(root), disjoint=False, transform=plain, progress=False)
    assert step1.ids == ["b", "c"]
    image, label = step1[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 20, 24) and image.is_contiguous()
    assert label.dtype == torch.uint8 and set(label.unique().tolist()) == {0, 3}  # class 1 rewritten to 0
    disjoint0 = train_dataset(task, 0, str(root), disjoint=True, transform=plain, progress=False)
    assert disjoint0.ids == ["a"]  # b holds the future class 3
    assert val_dataset(task, 1, str(root), plain, progress=False).ids == ["v1", "v2"]
    only3 = selection_dataset(task, 1, str(root), plain, progress=False)  # val images showing step 1's class 3
    assert only3.ids == ["v2"]


def test_train_transform_pads_label_with_ignore():
    from torchvision import tv_tensors
    image = tv_tensors.Image(torch.full((3, 10, 12), 200, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.ones(10, 12, dtype=torch.uint8))
    torch.manual_seed(0)
    out_image, out_mask = train_transforms(10, 32, (1.0, 1.0))(image, mask)
    assert out_image.shape == (3, 32, 32) and out_mask.shape == (32, 32)
    assert set(out_mask.unique().tolist()) == {1, 255}   # padding is ignore, nearest keeps labels
    assert (out_mask == 1).sum() == 10 * 12


def test_eval_center_crop_shape():
    from torchvision import tv_tensors
    image = tv_tensors.Image(torch.zeros((3, 40, 80), dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.zeros(40, 80, dtype=torch.uint8))
    out_image, out_mask = eval_transforms("center_crop", 20, 16)(image, mask)
    assert out_image.shape == (3, 16, 16) and out_mask.shape == (16, 16)
