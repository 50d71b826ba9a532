"""mIoU against confusion matrices worked out by hand."""
import json

import pytest
import torch

from utils.metrics import ConfusionMatrix, class_iou, summarize
from analysis.report import comparison_table, main as report_main
from utils.results import format_step_table
from utils.run_folder import RunFolder


def test_confusion_matrix_counts_and_ignores():
    m = ConfusionMatrix(3)
    target = torch.tensor([[0, 0, 1, 1, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 0, 2]])
    m.update(pred, target)
    # rows = truth, columns = prediction; the 255 pixel is not counted at all
    assert m.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    m.update(pred, target)  # streaming: counts add up
    assert m.matrix.sum().item() == 10


def test_confusion_matrix_ignores_unseen_class_labels():
    # A label >= num_classes (a class not learned yet, or 255) is never counted.
    m = ConfusionMatrix(2)
    m.update(torch.tensor([0, 1, 1]), torch.tensor([0, 5, 255]))
    assert m.matrix.tolist() == [[1, 0], [0, 0]]


def test_class_iou_by_hand():
    matrix = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    # class 0: TP 1, FP 1 (truth 2), FN 1 (pred 1) -> 1/3; class 1: 2 / (2 + 1) ; class 2: 0 / 1
    assert class_iou(matrix) == pytest.approx([1 / 3, 2 / 3, 0.0])


def test_class_without_pixels_or_predictions_has_no_iou():
    matrix = torch.tensor([[3, 0, 0], [0, 1, 0], [0, 0, 0]])
    assert class_iou(matrix) == [1.0, 1.0, None]


def test_summary_old_new_all_zero_counts_as_zero():
    # channels 0, 1, 2 old (step 0), 3 and 4 new; class 4 never predicted right -> IoU 0
    matrix = torch.tensor([
        [6, 0, 0, 0, 2],   # background: TP 6, FN 2
        [0, 4, 0, 0, 0],   # class 1 perfect
        [0, 2, 2, 0, 0],   # class 2: TP 2, FN 2
        [0, 0, 0, 3, 1],   # class 3: TP 3, FN 1
        [0, 0, 0, 2, 0],   # class 4: TP 0
    ])
    names = ["background", "a", "b", "c", "d"]
    s = summarize(matrix, old=[0, 1, 2], new=[3, 4], names=names)
    iou_bg, iou_a, iou_b, iou_c, iou_d = 6 / 8, 4 / 6, 2 / 4, 3 / 6, 0.0
    assert s["iou"] == pytest.approx(dict(zip(names, [iou_bg, iou_a, iou_b, iou_c, iou_d])))
    assert s["miou_old"] == pytest.approx((iou_bg + iou_a + iou_b) / 3)
    assert s["miou_old_no_bg"] == pytest.approx((iou_a + iou_b) / 2)
    assert s["miou_new"] == pytest.approx((iou_c + iou_d) / 2)  # the zero is averaged in, not dropped
    assert s["miou_all"] == pytest.approx((iou_bg + iou_a + iou_b + iou_c + iou_d) / 5)
    assert s["pixel_accuracy"] == pytest.approx(15 / 22)


def test_summary_ade_ignores_channel_zero_and_step0_has_no_new():
    matrix = torch.tensor([[0, 0, 0], [1, 3, 0], [0, 1, 1]])  # truth never 0 (ADE "other" is ignored)
    s = summarize(matrix, old=[1, 2], new=[], names=["other", "wall", "floor"])  # ADE: channel 0 not evaluated
    assert "other" not in s["iou"]
    assert s["miou_old"] == pytest.approx((3 / 5 + 1 / 2) / 2)
    assert s["miou_old"] == s["miou_old_no_bg"] == s["miou_all"]
    assert s["miou_new"] is None


def test_reference_all_drops_zero_and_undefined_iou():
    # ADE-like: channel 0 ("other") has no ground truth but is predicted once; channel 4 has no pixel and no
    # prediction (IoU undefined). old = [1, 2], new = [3, 4].
    matrix = torch.tensor([
        [0, 0, 0, 0, 0],
        [1, 3, 0, 0, 0],   # wall: TP 3, FN 1 (predicted as "other") -> 3/4
        [0, 0, 0, 2, 0],   # floor: TP 0 -> IoU 0
        [0, 0, 0, 2, 0],   # c: TP 2, FP 2 (floor pixels) -> 2/4
        [0, 0, 0, 0, 0],   # d: nothing -> None
    ])
    s = summarize(matrix, old=[1, 2], new=[3, 4], names=["other", "wall", "floor", "c", "d"])
    assert s["iou"]["d"] is None and s["iou"]["floor"] == 0.0
    assert s["miou_all"] == pytest.approx((3 / 4 + 0 + 2 / 4) / 3)            # the headline: zero counted
    assert s["miou_all_reference"] == pytest.approx((3 / 4 + 2 / 4) / 2)      # the reference: zero dropped
    assert s["miou_new"] == pytest.approx(2 / 4)


def test_reference_all_on_voc_includes_background():
    # The matrix of test_summary_old_new_all_zero_counts_as_zero: class 4 has IoU 0, background 6/8.
    matrix = torch.tensor([[6, 0, 0, 0, 2], [0, 4, 0, 0, 0], [0, 2, 2, 0, 0], [0, 0, 0, 3, 1], [0, 0, 0, 2, 0]])
    s = summarize(matrix, old=[0, 1, 2], new=[3, 4], names=["background", "a", "b", "c", "d"])
    assert s["miou_all_reference"] == pytest.approx((6 / 8 + 4 / 6 + 2 / 4 + 3 / 6) / 4)
    assert s["miou_all"] == pytest.approx((6 / 8 + 4 / 6 + 2 / 4 + 3 / 6 + 0) / 5)
    table = format_step_table([{"step": 1, "step_classes": ["c", "d"], "checkpoint": "last", **s}])
    assert "| step | classes learned | old | new | all | old w/o bg | all (ref. metric) | checkpoint |" in table
    assert f"| {100 * s['miou_all_reference']:.2f} | last |" in table


def test_summary_needs_unique_names():
    with pytest.raises(ValueError, match="unique name"):
        summarize(torch.eye(2, dtype=torch.int64), [0, 1], [], ["x", "x"])


def _step(step, old, new, all_, names):
    return {"step": step, "miou_old": old, "miou_new": new, "miou_all": all_, "miou_old_no_bg": old,
            "step_classes": names, "checkpoint": "last", "iou": {n: 0.5 for n in names}}


def test_results_files_and_comparison(tmp_path, capsys):
    results = [_step(0, 0.8, None, 0.8, ["background", "a"]), _step(1, 0.6, 0.25, 0.5, ["b"])]
    meta = {"name": "r1", "dataset": "voc", "task": "1-1", "setting": "overlapped", "method": "mbs",
            "checkpoint_policy": "last", "eval_mode": "center_crop"}
    RunFolder(tmp_path / "r1").write_results(results, meta)
    saved = json.loads((tmp_path / "r1" / "results.json").read_text())
    assert saved["meta"] == meta and saved["steps"] == results
    table = format_step_table(results)
    assert "| 1 | b | 60.00 | 25.00 | 50.00 | 60.00 | last |" in table
    assert "| 0 | background, a | 80.00 | - | 80.00 |" in table
    md = (tmp_path / "r1" / "results.md").read_text()
    assert "checkpoint_policy: last" in md and "| b | - | 50.00 |" in md

    compared = comparison_table([saved])
    assert "| r1 | voc 1-1 | overlapped | mbs |" in compared and "| 2 | 60.00 | 25.00 | 50.00 |" in compared
    out = tmp_path / "summary.md"
    assert report_main([str(tmp_path / "r1"), str(tmp_path / "missing"), "--out", str(out)]) == 0
    assert "r1" in out.read_text() and "missing" in out.read_text()
    plot = tmp_path / "new_folder" / "plot.png"
    assert report_main([str(tmp_path / "r1"), "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "results.json does not exist" in capsys.readouterr().err
