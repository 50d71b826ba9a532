"""The reference's "best"-checkpoint selection (spec section 4): which val images, which labels, when, and
the score — checked against the standard VOC class lists and hand-worked numbers."""
import pytest
import torch

from datasets.class_lists import read_class_lists
from datasets.labels import label_lookup
from utils.ignore import IGNORE_INDEX
from datasets.splits import selection_image_ids
from datasets.tasks import NUM_CLASSES, get_task
from trainer.evaluator import step_classes_score
from trainer.step import StepPlan, TrainState, reference_validation_interval, validation_due
from utils.metrics import ConfusionMatrix


def test_selection_images_of_voc_15_1(shared_data):
    lists = read_class_lists(shared_data / "voc" / "val_cls.txt", NUM_CLASSES["voc"])
    task = get_task("voc", "15-1")
    step0 = selection_image_ids(lists, task, 0, lists)
    assert len(lists) == 1449 and len(step0) == 1240  # the spec's count: at step 0 too, not the whole val set
    # step 1 learns class 16 (pottedplant), written 15 in the 0-based file: count its lines directly
    lines = (shared_data / "voc" / "val_cls.txt").read_text().splitlines()
    with_class_16 = [line.split()[0] for line in lines if "15" in line.split()[1:]]
    assert selection_image_ids(lists, task, 1, lists) == with_class_16 and 0 < len(with_class_16) < 1240


def test_selection_labels_keep_only_the_steps_classes():
    voc = get_task("voc", "15-1")
    step1 = label_lookup(voc, 1, "selection")
    assert [step1[c] for c in (0, 5, 15, 16, 17, IGNORE_INDEX)] == [0, 0, 0, 16, 0, IGNORE_INDEX]
    step0 = label_lookup(voc, 0, "selection")
    assert [step0[c] for c in (0, 5, 15, 16, 20)] == [0, 5, 15, 0, 0]  # future classes are background
    ade = get_task("ade", "100-50")
    assert label_lookup(ade, 0, "selection")[0] == 0   # ADE's "other" is background here (ignored in the test)
    assert label_lookup(ade, 1, "selection")[50] == 0 and label_lookup(ade, 1, "selection")[120] == 120


def validations(plan: StepPlan, validation: str, val_interval: int = 1) -> list[int]:
    state, done = TrainState(), []
    while state.iteration < plan.total_iterations:
        completed_epoch = state.advance(plan.iterations_per_epoch)
        if validation_due(validation, val_interval, state, plan, completed_epoch):
            done.append(state.iteration)
    return done


def test_reference_cadence_for_voc_15_1_with_the_vit_recipe():
    # step 0: 9568 images, batch 16, 32 epochs -> 598 x 32 = 19136 iterations, every 1913 -> 10 candidates
    step0 = StepPlan(epochs=32, iterations_per_epoch=9568 // 16, total_iterations=32 * (9568 // 16), lr=1e-3)
    assert reference_validation_interval(step0.total_iterations) == 1913
    assert validations(step0, "reference") == [1913 * k for k in range(1, 11)]
    # step 1: 487 images -> 30 x 32 = 960 iterations: every 100 (the floor) -> 9 candidates
    step1 = StepPlan(epochs=32, iterations_per_epoch=487 // 16, total_iterations=32 * (487 // 16), lr=1e-4)
    assert validations(step1, "reference") == [100 * k for k in range(1, 10)]
    # a step shorter than 100 iterations is never validated by the reference rule
    assert validations(StepPlan(2, 30, 60, 1e-4), "reference") == []


def test_epoch_cadence_and_none():
    plan = StepPlan(epochs=5, iterations_per_epoch=4, total_iterations=18, lr=0.1)  # capped mid-epoch 5
    assert validations(plan, "epochs", val_interval=2) == [8, 16, 18]
    assert validations(plan, "none") == []


def test_selection_score_is_the_mean_iou_of_the_steps_channels():
    matrix = ConfusionMatrix(4)
    matrix.matrix = torch.tensor([[5, 0, 1, 0],    # background
                                  [0, 2, 0, 0],    # an old class
                                  [1, 0, 3, 0],    # new class: TP 3, FN 1, FP 1 -> 3/5
                                  [0, 0, 0, 0]])   # new class never present nor predicted -> 0, as the reference
    assert step_classes_score(matrix, [2, 3]) == pytest.approx((3 / 5 + 0.0) / 2)
    assert step_classes_score(matrix, [0, 1]) == pytest.approx((5 / 7 + 1.0) / 2)
