"""Evaluation around a step: validation during it and the test after it."""
from __future__ import annotations

from torch import nn

from datasets.classes import dataset_palette
from datasets.qualitative import chosen_samples, class_ids
from datasets.tasks import Task
from utils.config import Config
from utils.logs import TensorboardWriter

from .engine import predict


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
