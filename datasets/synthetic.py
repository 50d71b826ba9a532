"""A deterministic synthetic segmentation dataset in the PASCAL VOC layout.

It is the built-in demo/test dataset: no download, generated in seconds, and
read by the same loader as real VOC (see ``datasets/layout.py``)::

    ROOT/VOCdevkit/VOC2012/JPEGImages/syn_train_000123.jpg      RGB JPEG (quality 95)
    ROOT/VOCdevkit/VOC2012/SegmentationClassAug/syn_train_000123.png
                                                                uint8: 0 bg, 1..20 classes, 255 ignore
    ROOT/VOCdevkit/VOC2012/list/{train_aug,val}.txt             "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png"
    ROOT/VOCdevkit/VOC2012/SYNTHETIC_DONE                       JSON of the parameters, written last

Each image shows 1-3 objects of 20 classes on a textured background. A class is
a (shape, colour, texture) triple chosen so that colour alone never identifies a
class (several classes share a colour and differ in shape or texture) and shape
alone does not either; a network has to look at spatial context, yet a small
DeepLab learns it from scratch in a few hundred iterations. Like VOC, every
object's visible outline is surrounded by an ignore (255) ring.

Everything is drawn with vectorised numpy on coordinate grids, and every image
uses its own ``numpy.random.Generator`` seeded from ``(seed, split, index)``, so
the same parameters always give byte-identical label PNGs.

CLI::

    python -m datasets.synthetic --root data/synthetic [--num-train 1000 --num-val 200 --size 128 --seed 0]
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from utils.ignore import IGNORE_INDEX

__all__ = ["CLASS_NAMES", "CLASS_SPECS", "generate", "ensure_synthetic", "render_sample", "main"]

# Bump when the drawing code changes, so stale folders are regenerated.
FORMAT_VERSION = 1
MARKER = "SYNTHETIC_DONE"
SPLITS = {"train": ("train_aug.txt", 0), "val": ("val.txt", 1)}  # list file, split code for seeding

COLOURS = {
    "red": (220, 30, 30),
    "blue": (35, 70, 225),
    "green": (30, 175, 50),
    "yellow": (240, 215, 30),
    "cyan": (30, 210, 220),
    "magenta": (220, 40, 200),
    "orange": (250, 135, 20),
    "white": (240, 240, 240),
    "purple": (120, 50, 190),
}

# (name, shape, colour, texture). Colours and shapes are each shared by 2-3
# classes, so only the combination (plus texture) names the class.
CLASS_SPECS: tuple[tuple[str, str, str, str], ...] = (
    ("red_disc", "disc", "red", "solid"),
    ("red_square", "square", "red", "solid"),
    ("blue_triangle", "triangle", "blue", "solid"),
    ("blue_ring", "ring", "blue", "solid"),
    ("green_cross", "cross", "green", "solid"),
    ("green_striped_disc", "disc", "green", "stripes"),
    ("yellow_diamond", "diamond", "yellow", "solid"),
    ("yellow_checker_square", "square", "yellow", "checker"),
    ("cyan_ellipse", "ellipse", "cyan", "solid"),
    ("cyan_dotted_triangle", "triangle", "cyan", "dots"),
    ("magenta_bar", "bar", "magenta", "solid"),
    ("magenta_star", "star", "magenta", "solid"),
    ("orange_striped_square", "square", "orange", "stripes"),
    ("orange_ring", "ring", "orange", "solid"),
    ("white_checker_disc", "disc", "white", "checker"),
    ("purple_cross", "cross", "purple", "solid"),
    ("purple_dotted_ellipse", "ellipse", "purple", "dots"),
    ("red_striped_diamond", "diamond", "red", "stripes"),
    ("blue_checker_bar", "bar", "blue", "checker"),
    ("green_star", "star", "green", "solid"),
)
CLASS_NAMES: tuple[str, ...] = ("background",) + tuple(spec[0] for spec in CLASS_SPECS)
NUM_CLASSES = len(CLASS_SPECS)  # 20 object classes, labels 1..20

MIN_FRACTION, MAX_FRACTION = 0.2, 0.6  # object diameter as a fraction of the image side


# --------------------------------------------------------------------- shapes
def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, aspect: float) -> np.ndarray:
    """Inside-test of ``shape`` in object coordinates (unit radius, already rotated)."""
    if shape == "disc":
        return u * u + v * v <= 1.0
    if shape == "ring":
        rho2 = u * u + v * v
        return (rho2 <= 1.0) & (rho2 >= 0.55 ** 2)
    if shape == "ellipse":
        return u * u + (v / aspect) ** 2 <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.78
    if shape == "diamond":  # an elongated rhombus, so that it never looks like a rotated square
        return np.abs(u) + np.abs(v) / 0.6 <= 1.0
    if shape == "bar":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.35)
    if shape == "cross":
        return ((np.abs(u) <= 1.0) & (np.abs(v) <= 0.33)) | ((np.abs(v) <= 1.0) & (np.abs(u) <= 0.33))
    if shape == "triangle":  # equilateral, circumradius 1: three half-planes at inradius 0.5
        inside = np.ones(u.shape, dtype=bool)
        for angle in (np.pi * 1.5, np.pi / 6, np.pi * 5 / 6):
            inside &= u * np.cos(angle) + v * np.sin(angle) <= 0.5
        return inside
    if shape == "star":  # five points: radius shrinks linearly from the tips to the valleys
        frac = np.mod(np.arctan2(v, u) * 5.0 / (2 * np.pi), 1.0)
        tip = np.abs(frac - 0.5) * 2.0
        return np.sqrt(u * u + v * v) <= 0.42 + 0.58 * tip ** 1.5
    raise ValueError(f"unknown shape {shape!r}")


def _texture_mask(texture: str, pu: np.ndarray, pv: np.ndarray, period: float) -> np.ndarray | None:
    """Where the second colour goes, in object-local pixel coordinates; None for solid."""
    if texture == "solid":
        return None
    a, b = pu / period, pv / period
    if texture == "stripes":
        return np.mod(a, 1.0) < 0.5
    if texture == "checker":
        return (np.floor(a) + np.floor(b)).astype(np.int64) % 2 == 1
    if texture == "dots":
        fa, fb = np.mod(a, 1.0) - 0.5, np.mod(b, 1.0) - 0.5
        return fa * fa + fb * fb < 0.32 ** 2
    raise ValueError(f"unknown texture {texture!r}")


def _second_colour(colour: str, texture: str) -> np.ndarray:
    """The pattern colour: dark for stripes/dots, white for checker (black on white)."""
    base = np.array(COLOURS[colour], dtype=np.float32)
    if texture == "checker":
        return np.full(3, 25.0 if colour == "white" else 235.0, dtype=np.float32)
    if texture == "dots":
        return np.full(3, 35.0, dtype=np.float32)
    return base * 0.3


# ----------------------------------------------------------------- background
def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (all in [0, 1]) as float RGB in [0, 255]."""
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32) * 255.0


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    # Low saturation keeps the background from impersonating object colours too often.
    return _hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.25, 0.85))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, amplitude: float) -> np.ndarray:
    """Blobby low-frequency noise: a coarse random grid bilinearly upsampled (numpy only)."""
    coarse = rng.normal(0.0, amplitude, size=(3, cells + 1, cells + 1)).astype(np.float32)
    # Bilinear upsampling is separable: one (size x cells+1) interpolation matrix on each axis.
    pos = (np.arange(size, dtype=np.float32) + 0.5) * np.float32(cells / size)
    i0 = np.minimum(pos.astype(np.int64), cells - 1)
    w = pos - i0
    interp = np.zeros((size, cells + 1), dtype=np.float32)
    interp[np.arange(size), i0] = 1 - w
    interp[np.arange(size), i0 + 1] = w
    return np.einsum("yi,cij,xj->yxc", interp, coarse, interp, optimize=True)


def _background(rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray, size: int) -> np.ndarray:
    """A smooth two-colour gradient plus one of: blob noise, faint stripes or small clutter."""
    # Python-float scalars keep the float32 grids float32 (numpy 2 promotion rules): twice as fast.
    c0, c1 = _muted_colour(rng), _muted_colour(rng)
    angle = rng.uniform(0, 2 * np.pi)
    t = (xx - size / 2) * float(np.cos(angle) / size) + (yy - size / 2) * float(np.sin(angle) / size) + 0.5
    np.clip(t, 0.0, 1.0, out=t)
    img = c0 + (c1 - c0) * t[..., None]
    kind = rng.integers(3)
    if kind == 0:
        img += _smooth_noise(rng, size, int(rng.integers(3, 9)), rng.uniform(10, 30))
    elif kind == 1:
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(0.05, 0.2) * size
        phase = xx * float(np.cos(angle) * 2 * np.pi / period) + yy * float(np.sin(angle) * 2 * np.pi / period)
        img += (np.sin(phase) * float(rng.uniform(8, 25)))[..., None]
    else:
        # Small half-transparent blobs, occasionally in vivid colours: pixel colour alone is not enough.
        for _ in range(int(rng.integers(3, 9))):
            r = rng.uniform(0.02, 0.07) * size
            cx, cy = rng.uniform(0, size, size=2)
            if rng.random() < 0.5:
                mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
            else:
                mask = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
            vivid = rng.random() < 0.3
            colour = _hsv_to_rgb(rng.random(), rng.uniform(0.5, 1.0) if vivid else rng.uniform(0, 0.3),
                                 rng.uniform(0.3, 0.95))
            img[mask] = 0.5 * img[mask] + 0.5 * colour
    return img


# -------------------------------------------------------------------- samples
@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), float32, shared read-only between samples."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _first_class(seed: int, split_code: int, index: int) -> int:
    """Class of an image's top object: every block of 20 images holds each class once.

    This makes class frequencies balanced and guarantees that every class occurs in
    any split of at least 20 images.
    """
    block_rng = np.random.default_rng([seed, split_code, 1, index // NUM_CLASSES])
    return int(block_rng.permutation(NUM_CLASSES)[index % NUM_CLASSES]) + 1


def render_sample(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The RGB image (uint8, HxWx3) and label map (uint8, HxW) of one sample."""
    split_code = SPLITS[split][1]
    rng = np.random.default_rng([seed, split_code, 0, index])
    yy, xx = _grid(size)
    img = _background(rng, xx, yy, size)
    label = np.zeros((size, size), dtype=np.uint8)
    depth = np.zeros((size, size), dtype=np.int32)  # 0 background, k = k-th object drawn

    first = _first_class(seed, split_code, index)
    n_objects = int(rng.integers(1, 4))
    others = [c for c in range(1, NUM_CLASSES + 1) if c != first]
    extra = [int(c) for c in rng.choice(others, size=n_objects - 1, replace=False)]
    classes = extra + [first]  # the guaranteed class is drawn last, so it is never occluded

    placed: list[tuple[float, float, float]] = []
    for k, cls in enumerate(classes, 1):
        _, shape, colour, texture = CLASS_SPECS[cls - 1]
        r = rng.uniform(MIN_FRACTION, MAX_FRACTION) * size / 2
        # Rejection-sample the centre so objects overlap only partly (occlusion, not burial).
        for _ in range(20):
            cx, cy = rng.uniform(0.7 * r, size - 0.7 * r, size=2)
            if all(np.hypot(cx - px, cy - py) >= 0.7 * (r + pr) for px, py, pr in placed):
                break
        placed.append((cx, cy, r))
        angle = rng.uniform(0, 2 * np.pi)
        aspect = rng.uniform(0.45, 0.65)
        cos, sin = np.cos(angle), np.sin(angle)
        # Every shape fits in the circle of radius r: draw only inside its bounding box.
        y0, y1 = max(0, int(cy - r) - 1), min(size, int(cy + r) + 2)
        x0, x1 = max(0, int(cx - r) - 1), min(size, int(cx + r) + 2)
        box = (slice(y0, y1), slice(x0, x1))
        dx, dy = xx[box] - np.float32(cx), yy[box] - np.float32(cy)
        pu = dx * np.float32(cos) + dy * np.float32(sin)  # object-local pixel coordinates
        pv = dy * np.float32(cos) - dx * np.float32(sin)
        mask = _shape_mask(shape, pu / np.float32(r), pv / np.float32(r), aspect)

        base = np.array(COLOURS[colour], dtype=np.float32)
        jitter = (rng.uniform(0.8, 1.12) * base + rng.uniform(-18, 18, size=3)).astype(np.float32)
        second = (_second_colour(colour, texture) + rng.uniform(-15, 15, size=3)).astype(np.float32)
        pattern = _texture_mask(texture, pu, pv, max(4.0, rng.uniform(0.35, 0.55) * r))
        colours = jitter if pattern is None else np.where(pattern[..., None], second, jitter)
        # A gentle linear shading so an object is not one flat colour.
        gx, gy = rng.uniform(-0.15, 0.15, size=2)
        shade = (1.0 + (np.float32(gx) * pu + np.float32(gy) * pv) / np.float32(r))[..., None]
        patch = img[box]
        np.copyto(patch, colours * shade, where=mask[..., None])
        label[box][mask] = cls
        depth[box][mask] = k

    _add_ignore_ring(label, depth, inner=size >= 96)
    img += rng.standard_normal(img.shape, dtype=np.float32) * float(rng.uniform(2, 8))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), label


def _add_ignore_ring(label: np.ndarray, depth: np.ndarray, inner: bool) -> None:
    """Mark the VOC-style 255 ring around every object's visible outline (in place).

    A pixel is marked when a 3x3 neighbour shows an object drawn above it (a 1 px ring
    just outside each visible boundary); with ``inner`` the object's own outermost pixel
    is marked too (a 2 px ring). Small images use only the outer ring, so thin parts
    (ring bands, cross arms) keep labelled pixels.
    """
    padded = np.pad(depth, 1, mode="edge")
    h, w = depth.shape
    shifts = [padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    ring = np.max(shifts, axis=0) > depth
    if inner:
        ring |= (depth > 0) & (np.min(shifts, axis=0) < depth)
    label[ring] = IGNORE_INDEX


# ----------------------------------------------------------------- generation
def _params(num_train: int, num_val: int, image_size: int, seed: int) -> dict:
    return {"num_train": int(num_train), "num_val": int(num_val), "image_size": int(image_size),
            "seed": int(seed), "version": FORMAT_VERSION}


def _read_marker(path: Path) -> dict | None:
    """The parameters recorded in a marker (it also lists the class names, which are not compared)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return {key: data.get(key) for key in ("num_train", "num_val", "image_size", "seed", "version")}


def _clear(base: Path) -> None:
    """Remove a previous (maybe partial) synthetic dataset, refusing to touch other data."""
    for folder, suffix in (("JPEGImages", ".jpg"), ("SegmentationClassAug", ".png")):
        directory = base / folder
        if not directory.is_dir():
            continue
        foreign = [p.name for p in directory.iterdir() if not p.name.startswith("syn_")]
        if foreign:
            raise FileExistsError(
                f"{directory} holds files that are not synthetic (e.g. {foreign[0]!r}); "
                "refusing to write the synthetic dataset over real data: choose another root")
    for folder in ("JPEGImages", "SegmentationClassAug"):
        if (base / folder).is_dir():
            shutil.rmtree(base / folder)
    for list_name, _ in SPLITS.values():
        (base / "list" / list_name).unlink(missing_ok=True)


def generate(root: str | Path, num_train: int = 1000, num_val: int = 200, image_size: int = 128,
             seed: int = 0, progress: bool = True, workers: int | None = None) -> Path:
    """Write the synthetic dataset under ``root`` and return its ``VOC2012`` folder.

    Idempotent: when the marker holds the same parameters, nothing is written. A folder
    with no marker (an interrupted run) or other parameters is cleared and redone.
    ``workers`` threads draw and encode (default: up to 4, one per CPU); the output is
    the same for any number.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError("num_train and num_val must be at least 1")
    if image_size < 16:
        raise ValueError("image_size must be at least 16")
    base = Path(root) / "VOCdevkit" / "VOC2012"
    marker = base / MARKER
    params = _params(num_train, num_val, image_size, seed)
    if _read_marker(marker) == params:
        return base
    marker.unlink(missing_ok=True)  # from here on the folder counts as partial
    _clear(base)
    for folder in ("JPEGImages", "SegmentationClassAug", "list"):
        (base / folder).mkdir(parents=True, exist_ok=True)

    jobs = [(split, i) for split, n in (("train", num_train), ("val", num_val)) for i in range(n)]

    def write(job: tuple[str, int]) -> None:
        split, i = job
        image_id = f"syn_{split}_{i:06d}"
        img, label = render_sample(seed, split, i, image_size)
        Image.fromarray(img).save(base / "JPEGImages" / f"{image_id}.jpg", quality=95)
        Image.fromarray(label).save(base / "SegmentationClassAug" / f"{image_id}.png")

    # Threads, not processes: numpy and the JPEG/PNG encoders release the GIL, and threads
    # are safe inside a trainer that already runs torch (no fork). Every sample has its own
    # generator, so the output does not depend on the scheduling.
    workers = max(1, min(4, os.cpu_count() or 1)) if workers is None else max(1, int(workers))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), desc=f"synthetic data -> {base}", unit="img")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(write, jobs, chunksize=1):
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    lines = {split: [f"/JPEGImages/syn_{name}_{i:06d}.jpg /SegmentationClassAug/syn_{name}_{i:06d}.png"
                     for name, i in jobs if name == split] for split in SPLITS}
    for split, (list_name, _) in SPLITS.items():
        (base / "list" / list_name).write_text("\n".join(lines[split]) + "\n")
    marker.write_text(json.dumps({**params, "classes": list(CLASS_NAMES)}, indent=1) + "\n")
    return base


def ensure_synthetic(root: str | Path, num_train: int = 1000, num_val: int = 200, image_size: int = 128,
                     seed: int = 0, progress: bool = True, workers: int | None = None) -> Path:
    """Make sure the synthetic dataset with these parameters exists under ``root`` (see ``generate``)."""
    return generate(root, num_train=num_train, num_val=num_val, image_size=image_size, seed=seed,
                    progress=progress, workers=workers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datasets.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="folder that will hold VOCdevkit/VOC2012")
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="drawing threads (default: up to 4)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    existed = _read_marker(Path(args.root) / "VOCdevkit" / "VOC2012" / MARKER) == _params(
        args.num_train, args.num_val, args.size, args.seed)
    start = time.perf_counter()
    base = generate(args.root, num_train=args.num_train, num_val=args.num_val, image_size=args.size,
                    seed=args.seed, progress=not args.no_progress, workers=args.workers)
    elapsed = time.perf_counter() - start
    what = "already present" if existed else f"written in {elapsed:.1f}s"
    print(f"synthetic VOC dataset ({args.num_train} train + {args.num_val} val, {args.size}px, seed {args.seed}) "
          f"at {base}: {what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
