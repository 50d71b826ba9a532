"""Training data pipeline throughput per core: ours, ours before the uint8 pipeline, the authors'.

Everything a DataLoader worker does for one training sample, in one process on one thread, without a
DataLoader: read and decode the JPEG and the label PNG, rewrite the labels for the step, random scale
(0.5-2.0 of a 512 short side), 512 crop, flip, and whatever the implementation does to make the model
input on the host:

- ``ours``: uint8 image and label out (the float conversion and normalisation run on the device,
  ``datasets.transforms.normalize_on_device``), through ``trainer.loaders.SeededSamples``.
- ``ours_normalising_on_host``: ``ours`` followed by ``normalize_on_device`` on the CPU, sample by sample:
  what a CPU-only run pays in its main process.
- ``ours_before``: a private copy of the pipeline this one replaced (Pillow decode, float conversion and
  normalisation in the worker, ``torch.manual_seed`` per sample).
- ``authors``: the MBS reference's ``VOCSegmentation.__getitem__`` with the training transform of its
  ``main.py``, imported at run time from ``--reference-repo`` (skipped without it).

The samples are written to a temporary VOC-layout folder: 500 x 375 JPEGs (quality 90, multi-scale
noise with textured objects, about the size of VOC's JPEG files) and palette PNG labels (VOC colour
map, 0-20 with a 255 outline). The implementations take turns, repetition after repetition, on the same
(sample, seed) sequence; the JSON gives min and median images per CPU second (the work of one core: the
process runs one thread) and per wall-clock second, and the ratios taken repetition by repetition.

    .venv/bin/python -m benchmarks.pipeline --reference-repo /path/to/ECCV2024_MBS
    .venv/bin/python -m benchmarks.pipeline --small        # seconds: checks that everything runs

(from the project root).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: one core

import argparse  # noqa: E402
import builtins  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as nnf  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import tv_tensors  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from datasets.incremental import IncrementalSegmentation  # noqa: E402
from datasets.labels import label_lookup  # noqa: E402
from utils.ignore import IGNORE_INDEX  # noqa: E402
from datasets.layout import split_files  # noqa: E402
from datasets.tasks import get_task  # noqa: E402
from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_on_device, train_transforms  # noqa: E402
from trainer.loaders import SeededSamples  # noqa: E402

HEIGHT, WIDTH = 375, 500
BASE_SIZE = CROP_SIZE = 512
SCALE_RANGE = (0.5, 2.0)
JPEG_QUALITY = 90
TASK, STEP = "15-5", 0   # the labels are rewritten as for VOC 15-5, step 0


# ------------------------------------------------------------------ data
def _smooth_noise(rng: np.random.Generator, cells: int, channels: int) -> np.ndarray:
    """(channels, HEIGHT, WIDTH) smooth noise varying over about ``cells`` cells along the height."""
    grid = rng.standard_normal((1, channels, cells + 1, cells * WIDTH // HEIGHT + 2)).astype(np.float32)
    return nnf.interpolate(torch.from_numpy(grid), size=(HEIGHT, WIDTH), mode="bicubic")[0].numpy()


def _render(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An HxWx3 uint8 image (noise over several scales: detail at every frequency, like a photograph)
    and its HxW label map: 1-3 textured blobs of classes 1-20 outlined by ignore (255)."""
    image = rng.uniform(60, 190, size=(3, 1, 1)).astype(np.float32)
    for octave in range(7):
        image = image + _smooth_noise(rng, 3 * 2 ** octave, 3) * (60 / 1.2 ** octave)
    label = np.zeros((HEIGHT, WIDTH), np.uint8)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0, HEIGHT), rng.uniform(0, WIDTH)
        ry, rx = rng.uniform(30, 150, size=2)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1 + 0.15 * _smooth_noise(rng, 6, 1)[0]
        texture = _smooth_noise(rng, 48, 3) * 45 + rng.uniform(20, 235, size=(3, 1, 1))
        image = np.where(inside, texture, image)
        label[inside] = int(rng.integers(1, 21))
    edge = np.zeros_like(label, dtype=bool)
    edge[1:] |= label[1:] != label[:-1]
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    label[edge] = IGNORE_INDEX
    image = image + rng.standard_normal(image.shape).astype(np.float32) * 8
    return np.clip(np.rint(image), 0, 255).astype(np.uint8).transpose(1, 2, 0), label


def _voc_palette() -> list[int]:
    """The VOC colour map: index i's bits spread over the high bits of R, G and B (colours differ from indices)."""
    palette = []
    for index in range(256):
        r = g = b = 0
        for bit in range(8):
            r |= ((index >> (3 * bit)) & 1) << (7 - bit)
            g |= ((index >> (3 * bit + 1)) & 1) << (7 - bit)
            b |= ((index >> (3 * bit + 2)) & 1) << (7 - bit)
        palette += [r, g, b]
    return palette


def write_voc_like(root: Path, count: int, seed: int) -> Path:
    """``count`` samples in the VOC layout under ``root``; returns the VOC2012 folder."""
    base = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClassAug", "list"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    palette, lines = _voc_palette(), []
    for index in range(count):
        image, label = _render(np.random.default_rng([seed, index]))
        image_id = f"bench_{index:05d}"
        Image.fromarray(image).save(base / "JPEGImages" / f"{image_id}.jpg", quality=JPEG_QUALITY)
        png = Image.fromarray(label, mode="P")
        png.putpalette(palette)
        png.save(base / "SegmentationClassAug" / f"{image_id}.png")
        lines.append(f"/JPEGImages/{image_id}.jpg /SegmentationClassAug/{image_id}.png")
    (base / "list" / "train_aug.txt").write_text("\n".join(lines) + "\n")
    return base


# ------------------------------------------------------------------ implementations
def ours(root: Path):
    files = split_files("voc", root, "train")
    dataset = IncrementalSegmentation(files, list(files.ids), label_lookup(get_task("voc", TASK), STEP, "train"),
                                      train_transforms(BASE_SIZE, CROP_SIZE, SCALE_RANGE))
    samples = SeededSamples(dataset)
    return lambda index, seed: samples[(index, seed)]


def ours_normalising_on_host(root: Path):
    sample = ours(root)

    def normalised(index: int, seed: int):
        image, label = sample(index, seed)
        return normalize_on_device(image[None])[0], label.long()
    return normalised


class _PreviousPipeline:
    """A private copy of the training pipeline that the uint8 one replaced (commit 34a23d7): Pillow decode,
    label lookup by fancy indexing, v2 RandomResize (masks coerced to torch ``nearest``), RandomCrop padding
    label 255, flip, ToDtype + Normalize in the worker, ``torch.manual_seed`` per sample."""

    def __init__(self, root: Path):
        files = split_files("voc", root, "train")
        self.images, self.labels = files.images, files.labels
        self.lookup = label_lookup(get_task("voc", TASK), STEP, "train")
        low, high = SCALE_RANGE
        self.transform = v2.Compose([
            v2.RandomResize(max(1, round(BASE_SIZE * low)), round(BASE_SIZE * high) + 1),
            v2.RandomCrop(CROP_SIZE, pad_if_needed=True,
                          fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
            v2.RandomHorizontalFlip(),
            v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])

    def __call__(self, index: int, seed: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with Image.open(self.images[index]) as img:
                image = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
            with Image.open(self.labels[index]) as lbl:
                label = np.array(lbl)
            mask = torch.from_numpy(self.lookup[label])
            image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
            return image, mask.long()


# The reference files the "authors" column runs, by the module name their own code imports them as.
REFERENCE_FILES = {"utils.tasks": "utils/tasks.py", "utils.ext_transforms": "utils/ext_transforms.py",
                   "datasets.voc": "datasets/voc.py"}
# Top-level packages of the reference that are named like ours: an import of these from its code must
# never reach our modules.
REFERENCE_PACKAGES = ("utils", "datasets")


def load_reference(repo: Path) -> tuple[ModuleType, ModuleType]:
    """The reference's ``datasets.voc`` and ``utils.ext_transforms`` modules, loaded from their files.

    Its top-level packages are called ``datasets`` and ``utils`` like ours, so importing them by name would
    give ours (already imported), or theirs in place of ours with the repo on ``sys.path``. Each file is
    therefore loaded by path under a private name, leaving ``sys.path`` and ``sys.modules`` alone, and the
    imports inside those files of ``utils.*`` / ``datasets.*`` (voc.py's ``from utils.tasks import ...``)
    are answered from the reference's files, through an ``__import__`` given to those modules only. Only these
    three files run: their package ``__init__``s (which import the rest of their code) do not."""
    loaded: dict[str, ModuleType] = {}

    def reference_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and name.split(".")[0] in REFERENCE_PACKAGES:
            if name in loaded and fromlist:
                return loaded[name]
            raise ImportError(f"benchmarks/pipeline.py does not load the reference's {name!r} "
                              f"(it loads {', '.join(REFERENCE_FILES)}; `from {name} import ...` only)")
        return builtins.__import__(name, globals, locals, fromlist, level)

    for name, relative_path in REFERENCE_FILES.items():  # in dependency order: utils.tasks before datasets.voc
        private_name = "mbs_reference_" + name.replace(".", "_")
        spec = importlib.util.spec_from_file_location(private_name, repo / relative_path)
        module = importlib.util.module_from_spec(spec)
        module.__builtins__ = {**vars(builtins), "__import__": reference_import}  # exec keeps a given one
        spec.loader.exec_module(module)
        loaded[name] = module
    return loaded["datasets.voc"], loaded["utils.ext_transforms"]


def authors(root: Path, repo: Path):
    voc, et = load_reference(repo)
    files = split_files("voc", root, "train")
    transform = et.ExtCompose([   # as the reference's main.py builds its training transform
        et.ExtResize(size=CROP_SIZE),
        et.ExtRandomScale(SCALE_RANGE),
        et.ExtRandomCrop(size=(CROP_SIZE, CROP_SIZE), pad_if_needed=True),
        et.ExtRandomHorizontalFlip(),
        et.ExtToTensor(),
        et.ExtNormalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
    ])
    # The attributes its __init__ sets (it reads its own file lists from fixed paths); VOC 15-5 orders
    # the classes 0-20 as they are.
    dataset = object.__new__(voc.VOCSegmentation)
    dataset.image_set, dataset.transform = "train", transform
    dataset.file_names = list(files.ids)
    dataset.images, dataset.masks = [str(p) for p in files.images], [str(p) for p in files.labels]
    dataset.target_cls = list(voc.get_tasks("voc", TASK, STEP)) + [255]
    dataset.ordering_map = np.full(256, 255, dtype=np.uint8)
    dataset.ordering_map[:21] = np.arange(21)

    def sample(index: int, seed: int):
        random.seed(seed)  # its transforms draw from Python's generator
        return dataset[index]
    return sample


# ------------------------------------------------------------------ timing
def _summary(values: list[float]) -> dict:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3)}


def measure(implementations: dict, count: int, repeats: int, seed: int) -> dict[str, dict[str, list[float]]]:
    """images per CPU second and per wall-clock second of each implementation in each repetition; the
    order of the implementations rotates. On a shared machine the CPU time is the steadier measure of
    the work (the process runs one thread, so it is the work of one core)."""
    keys = [(index, seed * 1_000_003 + index) for index in range(count)]
    names = list(implementations)
    rates: dict[str, dict[str, list[float]]] = {name: {"cpu": [], "wall": []} for name in names}
    for name in names:  # warm-up: files in the page cache, lazy initialisation
        for index, sample_seed in keys[: max(1, count // 10)]:
            implementations[name](index, sample_seed)
    for repetition in range(repeats):
        shift = repetition % len(names)
        for name in names[shift:] + names[:shift]:
            sample = implementations[name]
            wall, cpu = time.perf_counter(), time.process_time()
            for index, sample_seed in keys:
                sample(index, sample_seed + repetition)
            rates[name]["cpu"].append(count / (time.process_time() - cpu))
            rates[name]["wall"].append(count / (time.perf_counter() - wall))
    return rates


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--reference-repo", type=Path, default=None,
                        help="a clone of RoadoneP/ECCV2024_MBS; its column is skipped without it")
    parser.add_argument("--images", type=int, default=100, help="samples per repetition")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="4 images, 2 repetitions: a check that it runs")
    args = parser.parse_args(argv)
    if args.small:
        args.images, args.repeats = 4, 2
    torch.set_num_threads(1)
    skipped = []
    with tempfile.TemporaryDirectory(prefix="pipeline_bench_") as folder:
        root = Path(folder)
        base = write_voc_like(root, args.images, args.seed)
        jpeg_kib = statistics.mean(p.stat().st_size for p in (base / "JPEGImages").iterdir()) / 1024
        implementations = {"ours": ours(root), "ours_normalising_on_host": ours_normalising_on_host(root),
                           "ours_before": _PreviousPipeline(root)}
        if args.reference_repo is None:
            skipped.append("authors: no --reference-repo given")
        elif missing := [path for path in REFERENCE_FILES.values() if not (args.reference_repo / path).is_file()]:
            skipped.append(f"authors: {args.reference_repo} has no {', '.join(missing)}")
        else:
            implementations["authors"] = authors(root, args.reference_repo)
        for message in skipped:
            print(f"skipped {message}", file=sys.stderr)
        rates = measure(implementations, args.images, args.repeats, args.seed)
    ratios = {}
    for numerator in ("ours", "ours_normalising_on_host"):
        for denominator in ("ours_before", "authors"):
            if denominator in rates:
                ratios[f"{numerator}/{denominator}"] = {
                    clock: _summary([a / b for a, b in zip(rates[numerator][clock], rates[denominator][clock])])
                    for clock in ("cpu", "wall")}
    result = {
        "measures": "training samples per CPU second and per wall-clock second, one process, one thread, "
                    "no DataLoader; ratios are taken repetition by repetition",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "torchvision": torchvision.__version__, "pillow": PIL.__version__},
        "setup": {"images": args.images, "repeats": args.repeats, "image_size": [HEIGHT, WIDTH],
                  "jpeg_quality": JPEG_QUALITY, "mean_jpeg_kib": round(jpeg_kib, 1), "base_size": BASE_SIZE,
                  "crop_size": CROP_SIZE, "scale_range": list(SCALE_RANGE), "labels": f"voc {TASK} step {STEP}"},
        "images_per_s": {name: {clock: _summary(values) for clock, values in clocks.items()}
                         for name, clocks in rates.items()},
        "ratios_per_repetition": ratios,
        "skipped": skipped,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
