"""The uint8 data pipeline: decoding, label/image alignment after random scaling, the two crop
paddings, normalisation on the device, per-sample seeding and the loaders' prefetch factor."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from datasets.incremental import DatasetError, IncrementalSegmentation
from datasets.layout import SplitFiles
from datasets.transforms import (IMAGENET_MEAN, IMAGENET_STD, RandomScaleCrop, ResizeAligned, normalize_on_device,
                                 reference_padding, train_transforms)
from trainer.loaders import SeededSamples, eval_loader, train_loader
from utils.distributed import DistContext

REPO = Path(__file__).resolve().parents[1]
IDENTITY = np.arange(256, dtype=np.uint8)


def one_sample(tmp_path, image: np.ndarray, label: Image.Image, lookup=IDENTITY, transform=None):
    Image.fromarray(image).save(tmp_path / "a.jpg", quality=95)
    label.save(tmp_path / "a.png")
    files = SplitFiles(tmp_path, ("a",), (tmp_path / "a.jpg",), (tmp_path / "a.png",))
    return IncrementalSegmentation(files, ["a"], lookup, transform)


def palette_label(indices: np.ndarray) -> Image.Image:
    png = Image.fromarray(indices, mode="P")
    png.putpalette([(255 - i) % 256 if c == 0 else (7 * i + 40 * c) % 256 for i in range(256) for c in range(3)])
    return png


@pytest.mark.parametrize("bits", [8, 4])
def test_palette_png_labels_are_read_as_class_indices(tmp_path, bits):
    """The palette colours differ from the indices; a 4-bit palette (what PNG optimisers write for
    few classes) is one torchvision's decode_png misreads."""
    rng = np.random.default_rng(0)
    indices = rng.integers(0, 16, size=(30, 40)).astype(np.uint8)
    image = rng.integers(0, 256, size=(30, 40, 3)).astype(np.uint8)
    label = palette_label(indices)
    Image.Image.save(label, tmp_path / "check.png", bits=bits)
    dataset = one_sample(tmp_path, image, Image.open(tmp_path / "check.png"))
    out_image, out_label = dataset[0]
    assert out_label.dtype == torch.uint8 and np.array_equal(out_label.numpy(), indices)
    # the JPEG decoder gives Pillow's pixels, as (3, H, W) uint8 in planar (contiguous) layout
    assert out_image.dtype == torch.uint8 and out_image.is_contiguous()
    assert np.array_equal(out_image.permute(1, 2, 0).numpy(), np.array(Image.open(tmp_path / "a.jpg").convert("RGB")))


def test_labels_are_rewritten_by_the_lookup(tmp_path):
    lookup = np.full(256, 255, dtype=np.uint8)
    lookup[:3] = [0, 0, 9]
    dataset = one_sample(tmp_path, np.zeros((4, 5, 3), np.uint8), palette_label(np.array([[0, 1, 2, 7, 255]] * 4,
                                                                                         np.uint8)), lookup)
    assert dataset[0][1][0].tolist() == [0, 0, 9, 255, 255]


def test_unreadable_sample_names_both_files(tmp_path):
    dataset = one_sample(tmp_path, np.zeros((4, 5, 3), np.uint8), palette_label(np.zeros((4, 5), np.uint8)))
    (tmp_path / "a.jpg").write_bytes((tmp_path / "a.jpg").read_bytes()[:40])  # truncated
    with pytest.raises(DatasetError, match=r"'a'.*a\.jpg.*a\.png"):
        dataset[0]
    (tmp_path / "a.jpg").unlink()
    with pytest.raises(DatasetError, match=r"a\.jpg"):
        dataset[0]


# ---------------------------------------------------------------- alignment of masks with images
def source_pixels(start: int, count: int, source: int, target: int) -> tuple[np.ndarray, np.ndarray]:
    """For target pixels start..start+count-1 of a source -> target resize: the source pixel under the
    centre, exactly (floor((t + 0.5) * source / target)); where the centre falls on a pixel border, the
    pixel on the other side too. -1 outside the target."""
    t = np.arange(start, start + count)
    numerator = (2 * t + 1) * source
    under = numerator // (2 * target)
    other = np.where(numerator % (2 * target) == 0, under - 1, under)
    outside = (t < 0) | (t >= target)
    return np.where(outside, -1, np.minimum(under, source - 1)), np.where(outside, -1, other)


def aligned(mask: np.ndarray, source: np.ndarray, top: int, left: int, size: tuple[int, int], fill: int) -> bool:
    """Every pixel of ``mask`` (a crop at (top, left) of ``source`` resized to ``size``) holds the source
    label under its centre, and ``fill`` where the crop lies outside the resized image."""
    rows = source_pixels(top, mask.shape[0], source.shape[0], size[0])
    columns = source_pixels(left, mask.shape[1], source.shape[1], size[1])
    outside = (rows[0][:, None] < 0) | (columns[0][None, :] < 0)
    ok = np.zeros(mask.shape, bool)
    for r in rows:
        for c in columns:
            ok |= mask == source[np.maximum(r, 0)][:, np.maximum(c, 0)]
    return bool(np.all(np.where(outside, mask == fill, ok)))


def random_inputs(rng, height, width):
    pixels = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
    image = tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1))  # channels-last, as decoded
    label = rng.integers(0, 21, (height, width)).astype(np.uint8)
    return image, label


@pytest.mark.parametrize("padding,fill", [("ignore", 255), ("reference", 0)])
def test_random_scale_crop_mask_takes_the_label_under_each_pixel_centre(padding, fill):
    rng = np.random.default_rng(1)
    transform = RandomScaleCrop(20, 90, 48, padding)
    for seed in range(60):
        image, label = random_inputs(rng, int(rng.integers(15, 60)), int(rng.integers(15, 60)))
        torch.manual_seed(seed)
        params = transform.make_params([image])
        torch.manual_seed(seed)
        out_image, out_mask = transform(image, tv_tensors.Mask(torch.from_numpy(label)))
        assert out_image.shape == (3, 48, 48) and out_mask.shape == (48, 48)
        assert aligned(out_mask.numpy(), label, params["top"], params["left"], params["size"], fill), seed


def test_the_alignment_check_rejects_torch_nearest():
    """v2's default for masks (torch ``nearest``: the pixel under the top-left corner) fails the
    check above, which is why masks are resized nearest-exact."""
    rng = np.random.default_rng(2)
    image, label = random_inputs(rng, 37, 51)
    resized = F.resize(tv_tensors.Mask(torch.from_numpy(label)), [50], interpolation=InterpolationMode.NEAREST)
    assert not aligned(resized.numpy(), label, 0, 0, tuple(resized.shape), 255)


def test_eval_resize_aligns_masks():
    rng = np.random.default_rng(3)
    image, label = random_inputs(rng, 37, 51)
    out_image, out_mask = ResizeAligned(50)(image, tv_tensors.Mask(torch.from_numpy(label)))
    assert out_image.shape[-2:] == out_mask.shape == (50, 68)
    assert aligned(out_mask.numpy(), label, 0, 0, (50, 68), 255)


@pytest.mark.parametrize("padding", ["ignore", "reference"])
def test_random_scale_crop_equals_resize_pad_crop_one_after_the_other(padding):
    """The fused transform draws and outputs exactly what v2 RandomResize (masks nearest-exact),
    the padding and v2 RandomCrop give one after the other."""
    rng = np.random.default_rng(4)
    fill = 255 if padding == "ignore" else 0
    for seed in range(40):
        image, label = random_inputs(rng, int(rng.integers(5, 70)), int(rng.integers(5, 70)))
        mask = tv_tensors.Mask(torch.from_numpy(label))
        low, crop = int(rng.integers(3, 50)), int(rng.integers(4, 60))
        high = low + int(rng.integers(1, 60))
        expected = []
        for inpt, interpolation, value in ((image, InterpolationMode.BILINEAR, 0),
                                           (mask, InterpolationMode.NEAREST_EXACT, fill)):
            torch.manual_seed(seed)
            x = v2.RandomResize(low, high, interpolation=interpolation)(inpt)
            if padding == "ignore":
                x = v2.RandomCrop(crop, pad_if_needed=True, fill=value)(x)
            else:
                x = v2.RandomCrop(crop)(v2.Pad(reference_padding(*x.shape[-2:], crop), fill=value)(x))
            expected.append(x)
        torch.manual_seed(seed)
        got = RandomScaleCrop(low, high, crop, padding)(image, mask)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), seed


# ---------------------------------------------------------------- crop padding (issue 10, item 4)
def test_reference_padding_rule_by_hand():
    # width 5 < 8: 2 on every side -> 7 x 9; height 7 < 8: 1 more on every side -> 9 x 11
    assert reference_padding(3, 5, 8) == 3
    assert reference_padding(10, 3, 8) == 3   # only the width is short: (1 + 8 - 3) // 2 all round
    assert reference_padding(3, 10, 8) == 3   # only the height is short, the wide side is padded too
    assert reference_padding(7, 7, 8) == 1 and reference_padding(6, 6, 8) == 1
    assert reference_padding(8, 9, 8) == 0


def crops_of_a_3x5_image(padding: str, seeds=range(300)) -> tuple[set, set]:
    """Where the 3 x 5 content lands in the 8 x 8 crop, over many seeds, and the labels outside it."""
    image = tv_tensors.Image(torch.full((3, 3, 5), 200, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.full((3, 5), 7, dtype=torch.uint8))
    transform = train_transforms(3, 8, (1.0, 1.0), padding)  # the short side stays 3
    positions, outside = set(), set()
    for seed in seeds:
        torch.manual_seed(seed)
        out_image, out_mask = transform(image, mask)
        content = (out_mask == 7).nonzero()
        top, left = content.min(0).values.tolist()
        assert len(content) == 15 and (out_image[0] == 200).sum() == 15
        positions.add((top, left))
        outside |= set(out_mask[out_mask != 7].tolist())
    return positions, outside


@pytest.mark.slow
def test_reference_padding_pads_every_side_with_background():
    positions, outside = crops_of_a_3x5_image("reference")
    # 3 on every side: a 9 x 11 canvas, 2 x 4 crop offsets; the content starts 3 in, minus the offset
    assert positions == {(3 - top, 3 - left) for top in range(2) for left in range(4)}
    assert outside == {0}


@pytest.mark.slow
def test_ignore_padding_pads_only_what_the_crop_needs_with_ignore():
    positions, outside = crops_of_a_3x5_image("ignore")
    # v2.RandomCrop(pad_if_needed): the 5 missing rows and 3 missing columns, anywhere around
    assert positions == {(top, left) for top in range(6) for left in range(4)}
    assert outside == {255}


def test_unknown_padding_is_refused():
    with pytest.raises(ValueError, match="crop padding 'zero'"):
        train_transforms(8, 8, (1.0, 1.0), "zero")


# ---------------------------------------------------------------- device normalisation, seeding, loaders
def test_normalize_on_device_matches_float_normalisation_of_each_image():
    images = torch.randint(0, 256, (2, 3, 6, 7), dtype=torch.uint8)
    per_image = [v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)(v2.ToDtype(torch.float32, scale=True)(im)) for im in images]
    out = normalize_on_device(images)
    assert out.dtype == torch.float32 and torch.equal(out, torch.stack(per_image))


class Draws(torch.utils.data.Dataset):
    def __len__(self):
        return 3

    def __getitem__(self, index):
        return torch.rand(4)


def test_seeded_samples_seed_only_the_cpu_generator(monkeypatch):
    samples = SeededSamples(Draws())
    first = samples[(1, 99)]
    # torch.manual_seed would also seed (and lazily initialise) every accelerator's generator
    monkeypatch.setattr(torch, "manual_seed", lambda seed: pytest.fail("torch.manual_seed called per sample"))
    torch.default_generator.manual_seed(5)
    state = torch.get_rng_state()
    assert torch.equal(samples[(1, 99)], first) and not torch.equal(samples[(1, 98)], first)
    assert torch.equal(torch.get_rng_state(), state)   # the caller's generator is untouched


def test_prefetch_factor_reaches_loaders_with_workers():
    ctx = DistContext()
    with_workers = train_loader(Draws(), 2, ctx, seed=0, iterations_per_epoch=1, total_iterations=1,
                                num_workers=2, prefetch_factor=5)
    assert with_workers.prefetch_factor == 5
    assert eval_loader(Draws(), 2, ctx, num_workers=2, prefetch_factor=3).prefetch_factor == 3
    # without workers DataLoader refuses a prefetch factor: it is left out
    assert eval_loader(Draws(), 2, ctx, num_workers=0, prefetch_factor=3).prefetch_factor is None


class SlowDraws(Draws):
    def __len__(self):
        return 8

    def __getitem__(self, index):
        time.sleep(0.05)  # the worker is still busy when the signal comes
        return torch.rand(4)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_loader_workers_outlive_a_stop_signal_sent_to_the_whole_job(stop_signal):
    """A scheduler signals every process of the job: the workers must keep serving the batch the main process
    is fetching (the main process finishes the iteration, saves, and stops them itself)."""
    loader = train_loader(SlowDraws(), 2, DistContext(), seed=0, iterations_per_epoch=4, total_iterations=4,
                          num_workers=1)
    batches = iter(loader)
    next(batches)
    worker = batches._workers[0]
    subprocess.run(["kill", f"-{stop_signal.name[3:]}", str(worker.pid)], check=True)  # sent by another process
    time.sleep(0.2)
    assert worker.is_alive()
    assert len(list(batches)) == 3
    del batches


def test_loader_workers_stop_when_their_main_process_terminates_them():
    """multiprocessing terminates daemonic workers with SIGTERM at the interpreter's exit and then waits for them:
    a worker that ignored every SIGTERM would hang the exit of a process that still held a loader iterator."""
    batches = iter(train_loader(SlowDraws(), 2, DistContext(), seed=0, iterations_per_epoch=4, total_iterations=4,
                                num_workers=1))
    next(batches)
    worker = batches._workers[0]
    worker.terminate()
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert worker.exitcode == 0


@pytest.mark.slow
def test_pipeline_benchmark_small_runs():
    result = subprocess.run([sys.executable, "-m", "benchmarks.pipeline", "--small"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) >= {"machine", "setup", "images_per_s", "ratios_per_repetition", "skipped"}
    assert set(report["images_per_s"]) == {"ours", "ours_normalising_on_host", "ours_before"}
    for clocks in report["images_per_s"].values():
        assert set(clocks) == {"cpu", "wall"} and all(clocks[c]["min"] > 0 for c in clocks)
    assert set(report["ratios_per_repetition"]) == {"ours/ours_before", "ours_normalising_on_host/ours_before"}
    assert report["skipped"] == ["authors: no --reference-repo given"]


def write_fake_reference(repo: Path, voc_imports: str) -> None:
    """A stand-in for the authors' clone: top-level ``utils`` and ``datasets`` named like ours, package
    ``__init__``s that must not run, and a voc.py whose imports are ``voc_imports``."""
    for package in ("utils", "datasets"):
        (repo / package).mkdir()
        (repo / package / "__init__.py").write_text("raise RuntimeError('the reference package __init__ ran')\n")
    (repo / "utils" / "tasks.py").write_text("def get_tasks(*args):\n    return 'the reference tasks'\n")
    (repo / "utils" / "ext_transforms.py").write_text("import numpy\n\n\nclass ExtCompose:\n    pass\n")
    (repo / "datasets" / "voc.py").write_text(voc_imports + "\n\nclass VOCSegmentation:\n    pass\n")


def test_pipeline_benchmark_loads_the_reference_beside_our_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # restored afterwards: importing the benchmark sets it for good
    from benchmarks import pipeline
    import datasets
    import utils

    write_fake_reference(tmp_path, "from utils.tasks import get_tasks")
    path_before = list(sys.path)
    voc, ext_transforms = pipeline.load_reference(tmp_path)
    assert voc.get_tasks() == "the reference tasks" and hasattr(ext_transforms, "ExtCompose")
    assert sys.path == path_before
    assert sys.modules["utils"] is utils and sys.modules["datasets"] is datasets
    assert "utils.tasks" not in sys.modules and "datasets.voc" not in sys.modules


def test_pipeline_benchmark_never_gives_the_reference_our_modules(tmp_path, monkeypatch):
    """utils/ignore.py is ours, not one of the reference files loaded: its import fails instead of reaching ours."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from benchmarks import pipeline

    write_fake_reference(tmp_path, "from utils.ignore import IGNORE_INDEX")
    with pytest.raises(ImportError, match="utils.ignore"):
        pipeline.load_reference(tmp_path)
