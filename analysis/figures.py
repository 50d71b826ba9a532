"""Qualitative figures: validation images, their ground truth and the prediction after every step.

    python -m analysis.report runs/demo --qualitative 4      # -> runs/demo/qualitative.png

Everything comes from the run folder: each finished step's checkpoint holds the weights, the
resolved config and the task, so the model of step t is rebuilt for the classes of steps 0..t and
its prediction drawn beside the others. The images are chosen deterministically from the
validation class lists (greedily, to show classes of as many steps as possible, so old and new
classes both appear); the same images go to tensorboard after every step's test
(``trainer.evaluator``; the choice is :mod:`datasets.qualitative`). Colours are those of the dataset's class ids (VOC's
standard map; a fixed map for ADE20K), so a class keeps its colour in every step and run; white is
ignored (255).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from datasets.classes import class_names, dataset_palette
from datasets.qualitative import chosen_samples, class_ids
from trainer.engine import predict
from trainer.evaluator import StepCheckpoint
from utils.errors import UserError
from utils.logs import colorize
from utils.run_folder import RunFolder

# Layout of the figure in pixels (at DPI): one square cell per panel, a header row, a legend on the right.
CELL_PX, HEADER_PX, LEGEND_COLUMN_PX, LEGEND_ROW_PX, DPI = 160, 40, 200, 18, 100


class FigureError(UserError):
    """A run folder has no finished step to draw, or no validation image to draw."""


# ------------------------------------------------------------------ predictions
# ------------------------------------------------------------------ run folder
def finished_steps(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, checkpoint) of every finished step of the run, in step order."""
    folder = RunFolder(run_dir)
    found = [(step, folder.finished_checkpoint(step)) for step in folder.finished_steps()]
    if not found:
        raise FigureError(f"{run_dir} has no finished step (no {folder.finished_checkpoint(0).name}, ...) to draw")
    return found


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
