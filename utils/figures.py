"""Qualitative figures: validation images, their ground truth and the prediction after every step.

    python -m utils.report runs/demo --qualitative 4      # -> runs/demo/qualitative.png

Everything comes from the run folder: each finished step's checkpoint holds the weights, the
resolved config and the task, so the model of step t is rebuilt for the classes of steps 0..t and
its prediction drawn beside the others. The images are chosen deterministically from the
validation class lists (greedily, to show classes of as many steps as possible, so old and new
classes both appear); the same images go to tensorboard after every step's test
(:func:`log_qualitative_to_tensorboard`). Colours are those of the dataset's class ids (VOC's
standard map; a fixed map for ADE20K), so a class keeps its colour in every step and run; white is
ignored (255).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from datasets.class_lists import ClassLists, load_class_lists
from datasets.incremental import IncrementalSegmentation, val_dataset
from datasets.labels import IGNORE_INDEX, class_names
from datasets.tasks import UNEVALUATED_LABELS, Task
from datasets.transforms import eval_transforms_for, normalize_on_device
from models import build_model
from utils import checkpoint as ckpt
from utils.config import Config, config_from_dict
from utils.errors import UserError
from utils.logs import TensorboardWriter, colorize, dataset_palette

# Layout of the figure in pixels (at DPI): one square cell per panel, a header row, a legend on the right.
CELL_PX, HEADER_PX, LEGEND_COLUMN_PX, LEGEND_ROW_PX, DPI = 160, 40, 200, 18, 100


class FigureError(UserError):
    """A run folder has no finished step to draw, or no validation image to draw."""


# ------------------------------------------------------------------ which images
def choose_images(task: Task, lists: ClassLists, ids: list[str], num_images: int) -> list[str]:
    """``num_images`` validation ids, chosen greedily and deterministically: each pick shows classes of the
    most steps not shown yet, then the most classes not shown yet; ties go to the earlier id in ``ids``.
    So the first picks show old (step 0) and new classes together where the data allows."""
    step_of = {c: t for t, step in enumerate(task.steps) for c in step
               if c != 0 and c not in UNEVALUATED_LABELS[task.dataset]}
    shown = {i: frozenset(c for c in lists.get(i, ()) if c in step_of) for i in ids}
    candidates = [i for i in ids if shown[i]]
    chosen: list[str] = []
    steps_seen: set[int] = set()
    classes_seen: set[int] = set()
    position = {i: n for n, i in enumerate(ids)}
    for _ in range(min(num_images, len(candidates))):
        best = max((i for i in candidates if i not in chosen),
                   key=lambda i: (len({step_of[c] for c in shown[i]} - steps_seen), len(shown[i] - classes_seen),
                                  -position[i]))
        chosen.append(best)
        steps_seen |= {step_of[c] for c in shown[best]}
        classes_seen |= shown[best]
    return chosen


def figure_dataset(cfg: Config, task: Task) -> IncrementalSegmentation:
    """The validation set with the run's evaluation transforms and the labels of every class of the task
    (the last step's label table), so the ground truth shows the classes later steps learn too."""
    data = cfg.data
    return val_dataset(task, task.num_steps - 1, data.root, eval_transforms_for(data), cache_dir=data.cache_dir,
                       progress=False, skip_bad_files=data.skip_bad_files)


def chosen_samples(cfg: Config, task: Task, num_images: int) -> tuple[IncrementalSegmentation, list[int]]:
    dataset = figure_dataset(cfg, task)
    _, lists = load_class_lists(task.dataset, cfg.data.root, "val", None, cfg.data.cache_dir, progress=False,
                                skip_bad_files=cfg.data.skip_bad_files)
    ids = choose_images(task, lists, dataset.ids, num_images)
    return dataset, [dataset.ids.index(i) for i in ids]


# ------------------------------------------------------------------ predictions
@torch.no_grad()
def predict(model: nn.Module, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """Output-channel predictions (H, W) of ``images`` (uint8 (3, H, W), as the datasets give them); images of
    one size share a batch."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    predictions: list[Optional[torch.Tensor]] = [None] * len(images)
    by_size: dict[tuple, list[int]] = {}
    for index, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(index)
    for indices in by_size.values():
        batch = normalize_on_device(torch.stack([images[i] for i in indices]).to(device))
        for i, prediction in zip(indices, model(batch).logits.argmax(1).cpu()):
            predictions[i] = prediction
    model.train(was_training)
    return predictions


def class_ids(labels: torch.Tensor, task: Task) -> torch.Tensor:
    """Output channels -> dataset class ids (the palette's index); 255 stays 255."""
    table = torch.full((256,), IGNORE_INDEX, dtype=torch.long)
    table[: len(task.order)] = torch.tensor(task.order)
    return table[labels.long().clamp(0, 255)]


# ------------------------------------------------------------------ run folder
def finished_steps(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, checkpoint) of every finished step of the run, in step order."""
    found = []
    for path in Path(run_dir).glob("checkpoints/step*.pt"):
        suffix = path.stem[len("step"):]
        if suffix.isdigit():  # not step{t}_partial.pt / step{t}_best.pt
            found.append((int(suffix), path))
    if not found:
        raise FigureError(f"{run_dir} has no finished step (no checkpoints/step<t>.pt) to draw")
    return sorted(found)


@dataclass
class StepCheckpoint:
    """A finished step's checkpoint: its weights and the config and task it was trained with."""

    step: int
    path: Path
    cfg: Config
    task: Task
    weights: dict

    @classmethod
    def read(cls, step: int, path: Path, data_root: Optional[str] = None) -> "StepCheckpoint":
        saved = ckpt.load(path, "cpu")
        cfg = config_from_dict(saved["config"])
        cfg.model.pretrained = "none"  # every weight comes from the checkpoint: never fetch pretrained ones
        if data_root is not None:
            cfg.data.root = data_root
        task = Task(cfg.data.dataset, cfg.data.task, tuple(tuple(s) for s in saved["task"]))
        return cls(step, path, cfg, task, saved["model"])

    def model(self, device: torch.device) -> nn.Module:
        model = build_model(self.cfg.model, self.task.classes_per_step[: self.step + 1], self.cfg.data.crop_size)
        ckpt.load_model_weights(model, self.weights, str(self.path))
        return model.to(device)


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class QualitativeGrid:
    """What the figure shows: per image its RGB, its ground truth and one prediction per step (class ids)."""

    image_ids: list[str]
    images: list[np.ndarray]                 # (H, W, 3) uint8
    ground_truth: list[torch.Tensor]          # (H, W) dataset class ids, 255 ignored
    predictions: dict[int, list[torch.Tensor]]  # step -> (H, W) dataset class ids per image
    step_titles: dict[int, str]
    names: dict[int, str]                     # dataset class id -> name
    palette: np.ndarray


def qualitative_grid(run_dir: Path, num_images: int, device: str | torch.device = "auto",
                     data_root: Optional[str] = None) -> QualitativeGrid:
    """Predict ``num_images`` chosen validation images with the model of every finished step."""
    steps = finished_steps(run_dir)
    last = StepCheckpoint.read(*steps[-1], data_root)  # its config and task pick the images
    cfg, task = last.cfg, last.task
    dataset, indices = chosen_samples(cfg, task, num_images)
    if not indices:
        raise FigureError(f"no validation image of {cfg.data.root} shows a class of task {task.name} "
                          f"(or {num_images} images were asked for)")
    samples = [dataset[i] for i in indices]
    images = [image for image, _ in samples]
    device = resolve_device(device)
    predictions, titles = {}, {}
    for step, path in steps:
        checkpoint = last if step == last.step else StepCheckpoint.read(step, path, data_root)
        predictions[step] = [class_ids(p, task) for p in predict(checkpoint.model(device), images)]
        added = task.classes_per_step[step]
        titles[step] = f"step 0 ({added} classes)" if step == 0 else f"step {step} (+{added})"
    names = class_names(task, cfg.data.root, cfg.data.synthetic.enabled)
    rgb = [image.permute(1, 2, 0).numpy() for image in images]
    return QualitativeGrid([dataset.ids[i] for i in indices], rgb, [class_ids(label, task) for _, label in samples],
                           predictions, titles, dict(zip(task.order, names)), dataset_palette(task.dataset))


# ------------------------------------------------------------------ drawing
def legend_classes(grid: QualitativeGrid) -> list[int]:
    """The class ids that appear in a ground truth or a prediction of the figure, in id order."""
    maps = [*grid.ground_truth, *(p for per_step in grid.predictions.values() for p in per_step)]
    present = set(torch.unique(torch.cat([m.flatten() for m in maps])).tolist())
    return sorted(c for c in present if c in grid.names)


def figure_size_px(num_images: int, num_steps: int, legend_entries: int) -> tuple[int, int, int]:
    """(width, height, legend columns) of the figure in pixels: a cell per panel, the legend's columns as
    many as it needs to fit the height."""
    height = num_images * CELL_PX + HEADER_PX
    per_column = max(1, (height - HEADER_PX) // LEGEND_ROW_PX)
    columns = max(1, -(-legend_entries // per_column))
    return (2 + num_steps) * CELL_PX + columns * LEGEND_COLUMN_PX, height, columns


def draw(grid: QualitativeGrid, out_path: Path) -> Path:
    """A row per image: the image, the ground truth, the prediction after every step; a legend of the
    classes that appear. The size is exactly :func:`figure_size_px`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    steps = sorted(grid.predictions)
    shown = legend_classes(grid)
    width, height, legend_columns = figure_size_px(len(grid.images), len(steps), len(shown))
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    titles = ["image", "ground truth", *(grid.step_titles[s] for s in steps)]
    for row, image in enumerate(grid.images):
        panels = [image, colorize(grid.ground_truth[row], grid.palette).permute(1, 2, 0).numpy(),
                  *(colorize(grid.predictions[s][row], grid.palette).permute(1, 2, 0).numpy() for s in steps)]
        for column, panel in enumerate(panels):
            pad = 4
            ax = fig.add_axes(((column * CELL_PX + pad) / width, 1 - (HEADER_PX + (row + 1) * CELL_PX - pad) / height,
                               (CELL_PX - 2 * pad) / width, (CELL_PX - 2 * pad) / height))
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(titles[column], fontsize=8)
            if column == 0:  # the image's id, inside the panel (a label beside it would leave the figure)
                ax.text(0.02, 0.02, grid.image_ids[row], transform=ax.transAxes, fontsize=6, color="white",
                        va="bottom", bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "linewidth": 0})
    handles = [Patch(facecolor=grid.palette[c] / 255, edgecolor="black", linewidth=0.3, label=grid.names[c])
               for c in shown]
    handles.append(Patch(facecolor="white", edgecolor="black", linewidth=0.3, label="ignored (255)"))
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=((2 + len(steps)) * CELL_PX / width, 1.0),
               ncol=legend_columns, fontsize=7, frameon=False, handlelength=1.2, borderaxespad=0.3)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=DPI)
    plt.close(fig)
    return out_path


def write_qualitative_figure(run_dir: Path, out_path: Path, num_images: int = 4, device: str | torch.device = "auto",
                             data_root: Optional[str] = None) -> Path:
    """Draw ``num_images`` validation images of the run in ``run_dir`` with the prediction after every finished
    step to ``out_path`` (PNG, SVG, PDF by its suffix). ``data_root`` overrides the run's data.root (a relative
    root is read from the current folder)."""
    return draw(qualitative_grid(run_dir, num_images, device, data_root), out_path)


def log_qualitative_to_tensorboard(writer: TensorboardWriter, model: nn.Module, cfg: Config, task: Task, step: int,
                                   num_images: int) -> None:
    """After step ``step``'s test: the figure's images, their ground truth (every class of the task) and
    ``model``'s prediction, one tensorboard image per validation image (tag ``qualitative/<id>``, global step =
    the task step, so the slider walks through the steps). Does nothing where the writer is disabled (other
    ranks, --eval-only); draws no random number, so an exact resume stays exact."""
    if not writer.enabled:
        return
    dataset, indices = chosen_samples(cfg, task, num_images)
    samples = [dataset[i] for i in indices]
    predictions = predict(model, [image for image, _ in samples])
    palette = dataset_palette(task.dataset)
    for index, (image, label), prediction in zip(indices, samples, predictions):
        writer.segmentation_images(f"qualitative/{dataset.ids[index]}", image.float() / 255,
                                   class_ids(label, task), class_ids(prediction, task), step, palette)
