"""Trust what is loaded, never score the wrong thing, one line for every failure.

Checkpoints are loaded safely; a finished step is scored with the task it was trained with; a reused step 0
and a resumed run must have the same training data and task; a stop signal, a diverging loss or an unwritable
report output ends in one line. The end-to-end cases read the session's shared tiny run (``finished_run`` in
tests/conftest.py) or a copy of it; none trains a run of its own.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import (assert_clean_user_error, describe, main_argv, run_in_process, run_options, STEPS_3)

SWAPPED_STEPS = [STEPS_3[0], STEPS_3[2], STEPS_3[1]]  # the same classes, steps 1 and 2 in the other order


class RunsCodeWhenUnpickled:
    """What a tampered checkpoint can hold: unpickling it runs a command (here: it creates a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def tampered_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"model": {}, "metrics": {}, "step0_recipe": RunsCodeWhenUnpickled(marker)}, path)
    return path


# ------------------------------------------------------------------ safe loading
def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path):
    from utils.checkpoint import CheckpointError, load
    marker = tmp_path / "code_ran"
    path = tampered_checkpoint(tmp_path / "step0.pt", marker)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load(path)
    assert not marker.exists()


def test_a_tampered_step0_checkpoint_is_one_line_and_runs_nothing(tmp_path, data_root, capsys):
    marker = tmp_path / "code_ran"
    path = tampered_checkpoint(tmp_path / "handed_over.pt", marker)
    options = run_options(data_root, tmp_path / "runs", "reuse") + [f"train.step0_checkpoint={path}"]
    line = assert_clean_user_error(run_in_process(main_argv(options), capsys))
    assert str(path) in line and "refused" in line
    assert not marker.exists()


@pytest.mark.slow
def test_every_checkpoint_of_a_run_loads_with_weights_only(finished_run):
    run_dir, _, _ = finished_run
    for path in sorted((run_dir / "checkpoints").glob("*.pt")):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        assert {"model", "metrics", "config", "task"} <= set(saved), path


# ------------------------------------------------------------------ eval-only scores what was trained
@pytest.mark.slow
def test_eval_only_scores_with_the_checkpoints_task_not_the_command_lines(finished_run, capsys):
    run_dir, options, _ = finished_run
    swapped = [o for o in options if not o.startswith("data.custom_steps=")]
    swapped.append(f"data.custom_steps={json.dumps(SWAPPED_STEPS)}")
    result = run_in_process(main_argv(swapped, "--eval-only", "--step", "1"), capsys)
    assert result.returncode == 0, describe(result)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 1 | ")]
    assert len(rows) == 1, describe(result)
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    step1 = json.loads((run_dir / "results.json").read_text())["steps"][1]
    assert cells[1] == ", ".join(step1["step_classes"])  # the classes step 1 learned, not the command line's
    assert cells[2:5] == [f"{100 * step1[k]:.2f}" for k in ("miou_old", "miou_new", "miou_all")]
    assert "data.custom_steps" in result.stderr and "(trained)" in result.stderr  # the difference is named


# ------------------------------------------------------------------ step 0 reuse knows its training data
@pytest.mark.slow
def test_step0_trained_on_other_data_is_refused_naming_it(finished_run, data_root, tmp_path, capsys):
    run_dir, _, _ = finished_run
    other_data = tmp_path / "data"
    shutil.copytree(data_root, other_data)
    train_list = other_data / "VOCdevkit" / "VOC2012" / "list" / "train_aug.txt"
    lines = train_list.read_text().splitlines()
    train_list.write_text("\n".join(lines[:-5]) + "\n")  # the same generator settings, five images fewer
    source = run_dir / "checkpoints" / "step0.pt"
    options = run_options(other_data, tmp_path / "runs", "reuse") + [f"train.step0_checkpoint={source}"]
    line = assert_clean_user_error(run_in_process(main_argv(options), capsys))
    assert "data.training_data" in line and str(source) in line


# ------------------------------------------------------------------ --resume trusts the checkpoints' record
@pytest.mark.slow
def test_resume_without_config_yaml_refuses_another_task(finished_run, tmp_path, capsys):
    run_dir, options, _ = finished_run
    copy = tmp_path / "runs" / "e2e"
    shutil.copytree(run_dir, copy)
    (copy / "config.yaml").unlink()
    hashes = {p.name: p.read_bytes() for p in (copy / "checkpoints").iterdir()}
    moved = [o for o in options if not o.startswith(("output_dir=", "data.custom_steps="))]
    moved += [f"output_dir={tmp_path / 'runs'}", f"data.custom_steps={json.dumps(SWAPPED_STEPS)}"]
    line = assert_clean_user_error(run_in_process(main_argv(moved, "--resume"), capsys))
    assert "was trained with another experiment config" in line
    assert str(copy / "checkpoints" / "step0.pt") in line and "data.custom_steps" in line
    assert {p.name: p.read_bytes() for p in (copy / "checkpoints").iterdir()} == hashes


def test_results_record_the_thread_count(tmp_path):
    from utils.config import load_config
    from trainer.incremental import IncrementalTrainer
    from utils.distributed import DistContext
    from tests.helpers import ROOT
    cfg = load_config(ROOT / "configs/demo.yaml", [f"output_dir={tmp_path}", "device=cpu"])
    assert IncrementalTrainer(cfg, DistContext()).meta()["threads"] == torch.get_num_threads()


# ------------------------------------------------------------------ one line for every failure
def test_a_diverging_loss_is_one_line(data_root, tmp_path, capsys, monkeypatch):
    from trainer.methods import IncrementalMethod

    def diverged(self, labels, output, old_output, model):
        return {"ce": output.logits.sum() * float("nan")}

    monkeypatch.setattr(IncrementalMethod, "losses", diverged)
    options = run_options(data_root, tmp_path / "runs", "diverging", steps=[list(range(21))])
    line = assert_clean_user_error(run_in_process(main_argv(options), capsys))
    assert "LossNotFiniteError" in line and "the loss was not finite" in line


def interrupt_myself(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)  # the handler raises before this ends


def run_catching_escapes(argv, capsys):
    try:
        return run_in_process(argv, capsys)
    except KeyboardInterrupt:  # without the handling, Ctrl-C escapes main() (and would end pytest)
        pytest.fail("Ctrl-C escaped main() as KeyboardInterrupt")


def test_ctrl_c_before_training_is_one_line(data_root, tmp_path, capsys, monkeypatch):
    import trainer.incremental
    monkeypatch.setattr(trainer.incremental, "prepare_run_data", interrupt_myself)  # during the data preflight
    before = signal.getsignal(signal.SIGINT)
    result = run_catching_escapes(main_argv(run_options(data_root, tmp_path / "runs", "stopped")), capsys)
    assert result.returncode == 128 + signal.SIGINT, describe(result)
    assert "Traceback" not in result.stdout + result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        line for line in result.stderr.splitlines() if "stopped by SIGINT" in line]
    assert signal.getsignal(signal.SIGINT) is before  # main() gives the handlers back


def test_a_second_ctrl_c_while_stopping_adds_no_traceback(data_root, tmp_path, capsys, monkeypatch):
    import trainer.incremental
    import utils.distributed
    from utils.errors import RunInterrupted

    def stopped(self):
        raise RunInterrupted("SIGINT received: stopped after iteration 1 of step 0, saved in somewhere", 2)

    cleanup = utils.distributed.cleanup

    def cleanup_interrupted(failed: bool = False, timeout_s: float = 30.0) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again while the run tears down
        time.sleep(0.2)
        cleanup(failed, timeout_s)

    monkeypatch.setattr(trainer.incremental.IncrementalTrainer, "run", stopped)
    monkeypatch.setattr(utils.distributed, "cleanup", cleanup_interrupted)
    result = run_catching_escapes(main_argv(run_options(data_root, tmp_path / "runs", "stopping")), capsys)
    assert result.returncode == 128 + signal.SIGINT, describe(result)
    assert "Traceback" not in result.stdout + result.stderr and "--resume to continue" in result.stderr


@pytest.mark.parametrize("flag,name,expected", [
    ("--plot", "summary.pgn", "matplotlib cannot write '.pgn' images"),
    ("--out", "a_folder", "is a folder; give a file name"),
])
def test_report_refuses_an_output_it_cannot_write_in_one_line(tmp_path, capsys, flag, name, expected):
    from analysis.report import main as report_main
    (tmp_path / "a_folder").mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"meta": {"name": "run"}, "steps": [{"step": 0}]}))
    assert report_main([str(run), flag, str(tmp_path / name)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
