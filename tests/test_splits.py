"""Per-step image counts against the spec's table, from the standard class lists."""
import json
import subprocess
import sys

import pytest

from datasets.class_lists import read_class_lists
from datasets.splits import split_summary, step_image_ids
from datasets.tasks import NUM_CLASSES, TASKS, UnknownTaskError, get_task
from tests.conftest import ROOT

# MBS_SPEC.md section 1, "number of training images per step".
SPEC_COUNTS = {
    ("voc", "15-1", False): [9568, 487, 299, 491, 500, 548],
    ("voc", "15-1", True): [8437, 378, 299, 420, 500, 548],
    ("voc", "15-5", False): [9568, 2145],
    ("voc", "15-5", True): [8437, 2145],
    ("voc", "19-1", False): [10410, 548],
    ("voc", "19-1", True): [10034, 548],
    ("ade", "100-50", False): [20192, 9390],
}


@pytest.mark.slow
@pytest.mark.parametrize("dataset,task,disjoint", list(SPEC_COUNTS))
def test_spec_counts_via_cli(shared_data, dataset, task, disjoint):
    cmd = [sys.executable, "-m", "datasets.splits", "--dataset", dataset, "--task", task,
           "--class-lists", str(shared_data / dataset / "train_cls.txt")] + (["--disjoint"] if disjoint else [])
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    summary = json.loads(out)
    assert summary["train_images"] == SPEC_COUNTS[(dataset, task, disjoint)]
    assert summary["steps"] == [list(s) for s in TASKS[dataset][task]]


def test_disjoint_is_subset_of_overlapped(shared_data):
    lists = read_class_lists(shared_data / "voc" / "train_cls.txt", NUM_CLASSES["voc"])
    task = get_task("voc", "10-1")
    for step in range(task.num_steps):
        disjoint = set(step_image_ids(lists, task, step, True))
        overlapped = set(step_image_ids(lists, task, step, False))
        assert disjoint <= overlapped
    # the last step has no future class, so both settings coincide there
    assert disjoint == overlapped


def test_hand_made_lists():
    # dataset class ids (1-based foreground)
    lists = {"a": frozenset({1}), "b": frozenset({2, 3}), "c": frozenset({3}), "d": frozenset(), "e": frozenset({1, 3})}
    task = get_task("voc", "x", custom_steps=[[0, 1, 2], [3]])
    assert step_image_ids(lists, task, 0, disjoint=False) == ["a", "b", "e"]
    assert step_image_ids(lists, task, 0, disjoint=True) == ["a"]      # b and e hold future class 3
    assert step_image_ids(lists, task, 1, disjoint=False) == ["b", "c", "e"]
    assert step_image_ids(lists, task, 1, disjoint=True) == ["b", "c", "e"]
    assert split_summary(lists, task, False)["train_images"] == [3, 3]


def test_task_shapes():
    assert get_task("voc", "10-1").num_steps == 11
    assert get_task("voc", "2-2").num_steps == 10
    assert get_task("voc", "5-3").steps[1] == (6, 7, 8)
    assert get_task("ade", "100-5").num_steps == 11
    assert get_task("ade", "50-50").steps[2] == tuple(range(101, 151))
    shuffled = [name for name in TASKS["voc"] if name.startswith("15-1_")]
    assert len(shuffled) == 22 and shuffled[0] == "15-1_b" and shuffled[-1] == "15-1_w"
    order = get_task("voc", "15-1_b").order
    assert order[:3] == [0, 12, 9] and order[16:] == [17, 3, 6, 18, 10]


@pytest.mark.slow
def test_unknown_task_lists_known_names():
    with pytest.raises(UnknownTaskError, match="known tasks: .*15-1"):
        get_task("voc", "15-7")
    out = subprocess.run([sys.executable, "-m", "datasets.splits", "--dataset", "voc", "--task", "nope",
                          "--class-lists", "x"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "known tasks" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("steps,message", [
    ([[1, 2], [3]], "background"),
    ([[0, 1], [1]], "more than one step"),
    ([[0, 1], [25]], "outside"),
    ([[0, 1], []], "at least one class"),
])
def test_bad_custom_steps(steps, message):
    with pytest.raises(ValueError, match=message):
        get_task("voc", "custom", custom_steps=steps)
