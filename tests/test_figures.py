"""analysis.figures: the qualitative figure of a run folder and the same images for tensorboard.

The run is made once per session through main.py (tiny synthetic data, a ResNet-18 DeepLab with a 16-channel
head, 2 iterations per step), with a class order in which output channel and class id differ (channel 10 is
class 20), so a prediction or ground truth drawn by channel instead of class id shows up.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from analysis.figures import CELL_PX, HEADER_PX, LEGEND_COLUMN_PX, StepCheckpoint, finished_steps, qualitative_grid
from analysis.report import main as report_main
from datasets.classes import ade_palette, dataset_palette, voc_palette
from datasets.qualitative import choose_images
from datasets.tasks import Task
from trainer.evaluator import log_qualitative_to_tensorboard
from utils.logs import TensorboardWriter, colorize

ROOT = Path(__file__).resolve().parents[1]
STEPS = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 20], [10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]
SIZE = 32


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("figures")
    options = [
        "name=tiny", f"output_dir={root / 'runs'}", "device=cpu", f"data.root={root / 'data'}",
        "data.synthetic.enabled=true", "data.synthetic.num_train=60", "data.synthetic.num_val=20",
        f"data.synthetic.image_size={SIZE}", f"data.base_size={SIZE}", f"data.crop_size={SIZE}",
        "data.eval_mode=center_crop", f"data.custom_steps={json.dumps(STEPS)}", "data.num_workers=0",
        "model.backbone=resnet18", "model.pretrained=none", "model.head_channels=16", "train.batch_size=4",
        "train.max_iters_per_step=2", "train.epochs=1", "train.epochs_incremental=1",
        f"train.qualitative_figure={root / 'written_by_the_run.png'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "main.py", "--config", "configs/demo.yaml", "--opt", *options], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # the run itself draws the figure at its end when train.qualitative_figure names a file (as the demo does)
    assert (root / "written_by_the_run.png").read_bytes()[:4] == b"\x89PNG"
    return root / "runs" / "tiny"


def test_choose_images_by_hand():
    task = Task("voc", "x", ((0, 1, 2), (11, 12, 13), (16, 17)))
    lists = {"a": frozenset({1}), "b": frozenset({12}), "c": frozenset({1, 12, 17}), "d": frozenset({17}),
             "e": frozenset({2, 13}), "f": frozenset(), "g": frozenset({5})}  # g: a class outside the task
    ids = ["a", "b", "c", "d", "e", "f", "g"]
    # c shows all three steps; then no image adds a step, e adds the most classes (2 and 13);
    # then a, b, d add nothing new: earliest first. f and g show no class of the task.
    assert choose_images(task, lists, ids, 2) == ["c", "e"]
    assert choose_images(task, lists, ids, 10) == ["c", "e", "a", "b", "d"]


def test_palettes_colour_class_ids():
    ade = dataset_palette("ade")
    assert np.array_equal(ade, ade_palette())  # ADE20K's fixed map, not VOC's
    assert tuple(ade[0]) == (0, 0, 0) and tuple(ade[255]) == (255, 255, 255)
    assert len({tuple(colour) for colour in ade[:151]}) == 151  # every ADE20K class its own colour
    assert np.array_equal(dataset_palette("voc"), voc_palette()) and tuple(voc_palette()[15]) == (192, 128, 128)
    labels = torch.tensor([[0, 150], [255, 7]])
    assert np.array_equal(colorize(labels, ade).permute(1, 2, 0).numpy(), ade[labels.numpy()])
    assert np.array_equal(colorize(labels, voc_palette()).permute(1, 2, 0).numpy(), voc_palette()[labels.numpy()])
    assert not np.array_equal(ade[1:151], voc_palette()[1:151])


def test_tensorboard_images_in_the_given_palette(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    writer = TensorboardWriter(tmp_path, True)
    labels = torch.tensor([[1, 2], [150, 255]])
    writer.segmentation_images("x", torch.zeros(3, 2, 2), labels, labels.flip(0), 7, ade_palette())
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    row = np.array(Image.open(io.BytesIO(events.Images("x")[0].encoded_image_string)).convert("RGB"))
    assert np.array_equal(row[:, 2:4], ade_palette()[labels.numpy()])            # image | label | prediction
    assert np.array_equal(row[:, 4:6], ade_palette()[labels.flip(0).numpy()])


@pytest.mark.slow
def test_figure_from_the_command_line_has_the_grid_size(tiny_run, tmp_path):
    out = tmp_path / "figure.png"
    assert report_main([str(tiny_run), "--qualitative", "3", "--qualitative-out", str(out), "--device", "cpu"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    # 3 rows of images; columns: image, ground truth and the 3 steps; a one-column legend on the right
    assert Image.open(out).size == (5 * CELL_PX + LEGEND_COLUMN_PX, 3 * CELL_PX + HEADER_PX)


@pytest.mark.slow
def test_images_deterministic_cover_old_and_new_classes(tiny_run):
    first = qualitative_grid(tiny_run, 3, "cpu")
    second = qualitative_grid(tiny_run, 3, "cpu")
    assert first.image_ids == second.image_ids and len(first.image_ids) == 3
    shown = set(torch.cat([gt.flatten() for gt in first.ground_truth]).tolist())
    assert shown & set(STEPS[0][1:]), "no old class shown"
    assert shown & set(STEPS[1] + STEPS[2]), "no new class shown"
    assert sorted(first.predictions) == [0, 1, 2]


@pytest.mark.slow
def test_ground_truth_and_predictions_are_class_ids(tiny_run):
    grid = qualitative_grid(tiny_run, 3, "cpu")
    base = Path(StepCheckpoint.read(*finished_steps(tiny_run)[-1]).cfg.data.root)
    for image_id, gt in zip(grid.image_ids, grid.ground_truth):
        label_file = next(base.rglob(f"SegmentationClassAug/{image_id}.png"))
        # base = crop = image size: the evaluation transforms keep every pixel, so the ground truth drawn
        # is the label file itself (VOC class ids, 255 ignored), not the output channels
        assert np.array_equal(gt.numpy(), np.array(Image.open(label_file)))
    for step, predictions in grid.predictions.items():
        learned = {c for s in STEPS[: step + 1] for c in s}
        for prediction, gt in zip(predictions, grid.ground_truth):
            assert prediction.shape == gt.shape
            assert set(prediction.unique().tolist()) <= learned


@pytest.mark.slow
def test_tensorboard_gets_the_figure_images(tiny_run, tmp_path):
    class RecordingWriter:
        enabled = True

        def __init__(self):
            self.calls = []

        def segmentation_images(self, tag, image, label, prediction, step, palette=None):
            self.calls.append((tag, image, label, prediction, step, palette))

    grid = qualitative_grid(tiny_run, 3, "cpu")
    last = StepCheckpoint.read(*finished_steps(tiny_run)[-1])
    writer = RecordingWriter()
    model = last.model(torch.device("cpu")).train()
    log_qualitative_to_tensorboard(writer, model, last.cfg, last.task, last.step, 3)
    assert model.training  # left as it was
    assert [call[0] for call in writer.calls] == [f"qualitative/{i}" for i in grid.image_ids]
    for (tag, image, label, prediction, step, palette), gt, expected in zip(writer.calls, grid.ground_truth,
                                                                          grid.predictions[last.step]):
        assert step == last.step and image.shape == (3, SIZE, SIZE) and 0 <= image.min() <= image.max() <= 1
        assert torch.equal(label, gt) and torch.equal(prediction, expected)
        assert palette is not None and tuple(palette[15]) == (192, 128, 128)  # VOC's person

    # the real writer: one image per chosen validation image, at the step; a disabled one gets nothing
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    real = TensorboardWriter(tmp_path / "tb", True)
    log_qualitative_to_tensorboard(real, model, last.cfg, last.task, last.step, 3)
    real.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["images"]) == sorted(f"qualitative/{i}" for i in grid.image_ids)
    logged = events.Images(f"qualitative/{grid.image_ids[0]}")
    assert [e.step for e in logged] == [last.step]
    row = np.array(Image.open(io.BytesIO(logged[0].encoded_image_string)).convert("RGB"))
    assert np.array_equal(row[:, SIZE:2 * SIZE], voc_palette()[grid.ground_truth[0].numpy()])  # image | GT | pred

    class MustNotRun(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, images):
            raise AssertionError("a disabled writer (other ranks, --eval-only) must cost no prediction")

    log_qualitative_to_tensorboard(TensorboardWriter(None, False), MustNotRun(), last.cfg, last.task, 0, 3)
