"""Bad input is caught before training starts, with one clear line (exit code 2, no traceback) that names
the file, folder or config key: broken data, out-of-range config values, run folders that cannot be used
or belong to another experiment, and a disk that fills up while a checkpoint is written.

Broken datasets are copies of one tiny synthetic dataset (generated once per session) with one file
broken each; the runs go through ``main.main`` in this process and stop at the data preflight, so no
model is trained except in the three tests that need a finished step.
"""
from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.layout import split_files
from tests.helpers import (
    CLEAN_TRAIN, CLEAN_VAL, IMAGE_SIZE,
    assert_clean_user_error, describe, error_lines, main_argv, run_in_process, run_options,
)

NUM_TRAIN, NUM_VAL = CLEAN_TRAIN, CLEAN_VAL  # the sizes of tests/conftest.py's clean_data
ONE_STEP = [list(range(21))]  # a single step over every class: every training image is used


# ------------------------------------------------------------------ data helpers
def sample(root: Path, split: str, index: int = 0) -> tuple[Path, Path]:
    files = split_files("voc", root, split)
    return files.images[index], files.labels[index]


def write_label(path: Path, label: np.ndarray, **save) -> None:
    Image.fromarray(label).save(path, **save)


def label_array(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


# Each breaks one sample of a split and returns the file a message must name.
def missing_image(image: Path, label: Path) -> Path:
    image.unlink()
    return image


def missing_label(image: Path, label: Path) -> Path:
    label.unlink()
    return label


def truncated_jpeg(image: Path, label: Path) -> Path:
    content = image.read_bytes()
    image.write_bytes(content[: len(content) // 2])
    return image


def html_as_jpeg(image: Path, label: Path) -> Path:
    image.write_text("<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body></body></html>\n")
    return image


def label_of_another_size(image: Path, label: Path) -> Path:
    write_label(label, label_array(label)[: IMAGE_SIZE // 2])
    return label


def rgb_label(image: Path, label: Path) -> Path:
    write_label(label, np.repeat(label_array(label)[..., None], 3, axis=2))
    return label


def label_not_a_png(image: Path, label: Path) -> Path:
    write_label(label, label_array(label), format="JPEG")
    return label


def label_value_77(image: Path, label: Path) -> Path:
    values = label_array(label)
    values[:4, :4] = 77  # neither a VOC class (0..20) nor 255
    write_label(label, values)
    return label


BREAKS = [missing_image, missing_label, truncated_jpeg, html_as_jpeg, label_of_another_size, rgb_label,
          label_not_a_png, label_value_77]
EXPECTED_PROBLEM = {
    missing_image: "image file is missing", missing_label: "label file is missing",
    truncated_jpeg: "image does not decode", html_as_jpeg: "image does not decode",
    label_of_another_size: f"label is {IMAGE_SIZE}x{IMAGE_SIZE // 2}, its image", rgb_label: "label has mode RGB",
    label_not_a_png: "label is not a PNG (it is JPEG)", label_value_77: "label values [77] are neither a class",
}


def options(root: Path, runs: Path, name: str = "run", **train) -> list[str]:
    train = {"max_iters_per_step": 1, **train}
    return run_options(root, runs, name, steps=ONE_STEP, **train) + ["data.synthetic.enabled=false"]


# ------------------------------------------------------------------ 1. data: the preflight
@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("breaks", BREAKS, ids=lambda f: f.__name__)
def test_a_bad_sample_is_refused_before_training(data_copy, tmp_path, capsys, breaks, split):
    broken = breaks(*sample(data_copy, split, 3))
    result = run_in_process(main_argv(options(data_copy, tmp_path / "runs")), capsys)
    line = assert_clean_user_error(result)
    assert "BadFilesError: data preflight: 1 of the 24 samples" in line and str(broken) in line, describe(result)
    assert EXPECTED_PROBLEM[breaks] in line and "data.skip_bad_files=true" in line
    run_dir = tmp_path / "runs" / "run"
    report = (run_dir / "bad_files.txt").read_text().splitlines()
    assert len(report) == 1 and report[0].startswith(f"{split}\t{broken}: ")
    assert "trained" not in result.stdout and not (run_dir / "checkpoints").exists()


def test_every_bad_sample_is_reported_at_once(data_copy, tmp_path, capsys):
    broken = [missing_label(*sample(data_copy, "train", i)) for i in range(12)]
    broken.append(label_value_77(*sample(data_copy, "val", 0)))
    result = run_in_process(main_argv(options(data_copy, tmp_path / "runs")), capsys)
    line = assert_clean_user_error(result)
    report = tmp_path / "runs" / "run" / "bad_files.txt"
    assert f"13 of the 24 samples under {data_copy} cannot be used (12 train, 1 val; all listed in {report})" in line
    assert sum(str(path) in line for path in broken) == 10 and "... (3 more)" in line  # the first ten
    listed = report.read_text()
    assert all(str(path) in listed for path in broken)


@pytest.mark.slow
def test_skip_bad_files_trains_and_tests_without_them(data_copy, tmp_path, capsys):
    train_image = missing_image(*sample(data_copy, "train", 2))
    val_label = label_value_77(*sample(data_copy, "val", 1))
    result = run_in_process(main_argv(options(data_copy, tmp_path / "runs") + ["data.skip_bad_files=true"]),
                            capsys)
    assert result.returncode == 0, describe(result)
    run_dir = tmp_path / "runs" / "run"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["meta"]["skipped_bad_files"] == {"train": 1, "val": 1}
    assert "2 of the 24 samples" in result.stderr and "data.skip_bad_files is set" in result.stderr
    listed = (run_dir / "bad_files.txt").read_text()
    assert str(train_image) in listed and str(val_label) in listed

    from datasets.incremental import train_dataset, val_dataset
    from datasets.tasks import get_task
    task = get_task("voc", "all", ONE_STEP)
    train_ids = train_dataset(task, 0, str(data_copy), False, None, progress=False, skip_bad_files=True).ids
    val_ids = val_dataset(task, 0, str(data_copy), None, progress=False, skip_bad_files=True).ids
    assert len(train_ids) == NUM_TRAIN - 1 and train_image.stem not in train_ids
    assert len(val_ids) == NUM_VAL - 1 and val_label.stem not in val_ids


def test_verdict_is_cached_and_a_changed_image_invalidates_it(data_copy):
    from datasets.class_lists import check_split
    first = check_split("voc", str(data_copy), "train", progress=False)
    assert not first.bad and len(first.lists) == NUM_TRAIN
    sidecar = data_copy / "VOCdevkit" / "VOC2012" / "class_lists" / "train_cls.txt.json"
    written = sidecar.stat().st_mtime_ns
    assert check_split("voc", str(data_copy), "train", progress=False) == first
    assert sidecar.stat().st_mtime_ns == written  # served from the cache, nothing re-read
    broken = truncated_jpeg(*sample(data_copy, "train", 5))  # an image, not a label, changes
    again = check_split("voc", str(data_copy), "train", progress=False)
    assert list(again.bad) == [broken.stem] and "image does not decode" in again.bad[broken.stem]
    assert broken.stem not in again.lists and len(again.lists) == NUM_TRAIN - 1


def test_a_split_with_no_good_sample_is_cached_too(data_copy):
    from datasets.class_lists import check_split
    for index in range(NUM_VAL):
        missing_label(*sample(data_copy, "val", index))
    first = check_split("voc", str(data_copy), "val", progress=False)
    assert len(first.bad) == NUM_VAL and not first.lists
    sidecar = data_copy / "VOCdevkit" / "VOC2012" / "class_lists" / "val_cls.txt.json"
    written = sidecar.stat().st_mtime_ns
    assert check_split("voc", str(data_copy), "val", progress=False) == first
    assert sidecar.stat().st_mtime_ns == written  # served from the cache


@pytest.mark.parametrize("workers", [0, 1])  # 1: the error comes back from a loader worker
def test_a_file_that_breaks_after_the_preflight_is_named(data_copy, tmp_path, capsys, monkeypatch, workers):
    """Broken once the step's dataset is built (no check left before the loader reads it)."""
    import trainer.incremental
    build = trainer.incremental.train_dataset

    def build_then_break(*args, **kwargs):
        dataset = build(*args, **kwargs)
        for image in dataset.images:
            html_as_jpeg(image, None)
        return dataset

    monkeypatch.setattr(trainer.incremental, "train_dataset", build_then_break)
    result = run_in_process(main_argv(options(data_copy, tmp_path / "runs") + [f"data.num_workers={workers}"]),
                            capsys)
    line = assert_clean_user_error(result)
    assert "DatasetError: could not read sample" in line and str(data_copy / "VOCdevkit") in line


# ------------------------------------------------------------------ 2. config values
@pytest.mark.parametrize("override,message", [
    ("train.lr=-0.01", "'train.lr' must be > 0, got -0.01"),
    ("train.lr_incremental=-0.001", "'train.lr_incremental' must be > 0, got -0.001"),
    ("train.log_interval=0", "'train.log_interval' must be >= 1, got 0"),
    ("train.epochs_incremental=0", "'train.epochs_incremental' must be >= 1, got 0"),
])
def test_config_value_out_of_range_is_refused_at_load(override, message, tmp_path, capsys):
    result = run_in_process(main_argv(options(tmp_path / "data", tmp_path / "runs") + [override]), capsys)
    line = assert_clean_user_error(result)
    assert line.startswith("config error:") and message in line
    assert not (tmp_path / "runs").exists()  # refused before any folder or data work


@pytest.mark.parametrize("override,message", [
    ("train.epochs=0", "'train.epochs' must be >= 1"),
    ("train.batch_size=0", "'train.batch_size' must be >= 1"),
    ("train.val_batch_size=0", "'train.val_batch_size' must be >= 1"),
    ("train.val_interval=0", "'train.val_interval' must be >= 1"),
    ("train.checkpoint_interval=-1", "'train.checkpoint_interval' must be >= 0"),
    ("train.max_iters_per_step=0", "'train.max_iters_per_step' must be >= 1"),
    ("train.momentum=1", "'train.momentum' must be in [0, 1)"),
    ("method.pseudo_threshold=1.5", "'method.pseudo_threshold' must be in [0, 1]"),
    ("method.output_distill_weight=-25", "'method.output_distill_weight' must be >= 0"),
    ("method.ortho_weight=-1", "'method.ortho_weight' must be >= 0"),
    ("data.crop_size=0", "'data.crop_size' must be >= 1"),
    ("data.base_size=-512", "'data.base_size' must be >= 1"),
    ("data.num_workers=-1", "'data.num_workers' must be >= 0"),
    ("model.head_channels=0", "'model.head_channels' must be >= 1"),
    ("model.output_stride=32", "'model.output_stride': 32 is not one of 8, 16"),
    ("model.decoder_drop_path_rate=1.0", "'model.decoder_drop_path_rate' must be in [0, 1)"),
    ("end_step=-1", "'end_step' must be >= 0"),
])
def test_range_checks_name_the_key_and_the_range(override, message):
    from utils.config import ConfigError, load_config
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert message in str(caught.value)


def test_every_range_names_a_numeric_key():
    from utils.config import RANGES, Config
    from utils.config import config_items
    items = config_items(Config())
    assert all(key in items for key in RANGES)  # a renamed key would silently lose its check


def test_cuda_without_cuda_is_a_config_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = run_in_process(main_argv(options(tmp_path / "data", tmp_path / "runs") + ["device=cuda"]), capsys)
    line = assert_clean_user_error(result)
    assert "config key 'device': cuda was asked for, but CUDA is not available" in line


# ------------------------------------------------------------------ 3. run folders
def fake_finished_run(runs: Path, data: Path) -> Path:
    """A run folder as a finished step leaves it: the saved config and a step checkpoint with the record
    (config and task) every finished step carries; its weights are never read (the refusal comes first)."""
    from datasets.tasks import get_task
    from utils.checkpoint import save_atomic
    from utils.config import config_to_dict, config_yaml, load_config
    from tests.helpers import ROOT
    run_dir = runs / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    cfg = load_config(ROOT / "configs" / "demo.yaml", options(data, runs))
    (run_dir / "config.yaml").write_text(config_yaml(cfg))
    task = get_task(cfg.data.dataset, cfg.data.task, cfg.data.custom_steps)
    save_atomic({"model": {}, "metrics": {"step": 0}, "step": 0, "config": config_to_dict(cfg),
                 "task": [list(s) for s in task.steps]}, run_dir / "checkpoints" / "step0.pt")
    return run_dir


@pytest.mark.parametrize("override,key,saved,now", [
    ("data.custom_steps=[[0, 1, 2], [3]]", "data.custom_steps", ONE_STEP, [[0, 1, 2], [3]]),
    ("model.backbone=resnet34", "model.backbone", "resnet18", "resnet34"),
    ("train.lr=0.02", "train.lr", 0.05, 0.02),
])
def test_resume_with_another_experiment_is_refused(tmp_path, capsys, override, key, saved, now):
    run_dir = fake_finished_run(tmp_path / "runs", tmp_path / "data")
    config = (run_dir / "config.yaml").read_text()
    result = run_in_process(main_argv(options(tmp_path / "data", tmp_path / "runs") + [override], "--resume"),
                            capsys)
    line = assert_clean_user_error(result)
    assert f"run folder {run_dir} was trained with another experiment config" in line
    assert f"{key}: {saved!r} (saved) vs {now!r} (now)" in line
    assert (run_dir / "config.yaml").read_text() == config  # the saved recipe is kept


# The method keys a run folder saved before MiB's and PLOP's presets lacks; lambda was written out (25.0).
KEYS_ADDED_WITH_THE_BASELINES = ("balanced_init", "unbiased_ce", "ce_all_pixels", "entropy_pl", "adaptive_ce_factor",
                                 "pod", "unkd", "pod_factor", "pod_logits_factor", "entropy_threshold")


def as_saved_before_the_baselines(method: dict) -> dict:
    """A config's method section as a run saved it before the presets resolved lambda per dataset."""
    old = {key: value for key, value in method.items() if key not in KEYS_ADDED_WITH_THE_BASELINES}
    return {**old, "output_distill_weight": 25.0}


def old_format_run(runs: Path, data: Path) -> Path:
    """:func:`fake_finished_run` as the previous version wrote it: config.yaml and the checkpoint's record."""
    import yaml

    from utils.checkpoint import load, save_atomic
    run_dir = fake_finished_run(runs, data)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["method"] = as_saved_before_the_baselines(config["method"])
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    checkpoint = run_dir / "checkpoints" / "step0.pt"
    saved = load(checkpoint)
    saved["config"]["method"] = as_saved_before_the_baselines(saved["config"]["method"])
    save_atomic(saved, checkpoint)
    return run_dir


def test_a_run_folder_saved_with_lambda_written_out_resumes(tmp_path, caplog):
    from utils.config import load_config
    from utils.run_folder import RunFolder
    from tests.helpers import ROOT
    run_dir = old_format_run(tmp_path / "runs", tmp_path / "data")
    assert "output_distill_weight: 25.0" in (run_dir / "config.yaml").read_text()
    cfg = load_config(ROOT / "configs" / "demo.yaml", options(tmp_path / "data", tmp_path / "runs"))
    assert cfg.method.output_distill_weight is None  # null now: the mbs preset resolves it to 25 on VOC
    with caplog.at_level(logging.WARNING, logger="test"):
        RunFolder(run_dir).prepare(cfg, ONE_STEP, resume=True, log=logging.getLogger("test"))
    assert not caplog.records


def test_a_changed_lambda_is_refused_on_resume_of_an_old_run_folder(tmp_path, capsys):
    run_dir = old_format_run(tmp_path / "runs", tmp_path / "data")
    result = run_in_process(main_argv(options(tmp_path / "data", tmp_path / "runs")
                                      + ["method.output_distill_weight=10"], "--resume"), capsys)
    line = assert_clean_user_error(result)
    assert f"run folder {run_dir} was trained with another experiment config" in line
    assert "method.output_distill_weight: 25.0 (saved) vs 10.0 (now)" in line


def test_resume_with_another_harmless_key_only_warns(tmp_path, caplog):
    from utils.config import load_config
    from utils.run_folder import RunFolder
    from tests.helpers import ROOT
    run_dir = fake_finished_run(tmp_path / "runs", tmp_path / "data")
    changed = options(tmp_path / "data", tmp_path / "runs") + ["data.num_workers=3", "train.log_interval=7"]
    cfg = load_config(ROOT / "configs" / "demo.yaml", changed)
    with caplog.at_level(logging.WARNING, logger="test"):
        RunFolder(run_dir).prepare(cfg, ONE_STEP, resume=True, log=logging.getLogger("test"))
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert "do not change results" in warning and "data.num_workers: 0 -> 3" in warning
    assert "train.log_interval: 1 -> 7" in warning
    assert "num_workers: 3" in (run_dir / "config.yaml").read_text()


def test_every_config_key_is_either_experiment_or_harmless():
    from utils.config import EXPERIMENT_KEYS, HARMLESS_KEYS, Config, config_items
    assert not EXPERIMENT_KEYS & HARMLESS_KEYS
    assert EXPERIMENT_KEYS | HARMLESS_KEYS == set(config_items(Config()))


def assert_one_line_run_folder_error(result) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr, describe(result)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and not error_lines(result), describe(result)
    return lines[0]


def test_output_dir_under_a_file_is_refused(tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    result = run_in_process(main_argv(options(tmp_path / "data", a_file / "runs")), capsys)
    line = assert_one_line_run_folder_error(result)
    assert f"{a_file / 'runs' / 'run'} (output_dir/name): {a_file} is a file" in line
    assert not (tmp_path / "data").exists()  # before any data work


def test_run_folder_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "run").write_text("not a folder")
    result = run_in_process(main_argv(options(tmp_path / "data", tmp_path / "runs")), capsys)
    line = assert_one_line_run_folder_error(result)
    assert f"{tmp_path / 'runs' / 'run'} is a file" in line


def test_unwritable_run_folder_is_refused(tmp_path, monkeypatch):
    from utils.run_folder import RunFolder, RunFolderError

    def read_only(self, data):  # as on a read-only mount (root ignores file modes, so they cannot show it)
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(RunFolderError, match=f"run folder {tmp_path / 'run'} .* is not writable: Permission denied"):
        RunFolder(tmp_path / "run").check_writable()


# ------------------------------------------------------------------ datasets.splits command line
def run_splits(argv: list[str], capsys) -> tuple[int, str]:
    from datasets.splits import main as splits_main
    capsys.readouterr()
    code = splits_main(argv)
    return code, capsys.readouterr().err


def assert_one_error_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_splits_with_a_binary_class_list_file(tmp_path, capsys):
    binary = tmp_path / "train_cls.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    line = assert_one_error_line(*run_splits(["--dataset", "voc", "--task", "15-1", "--class-lists",
                                              str(binary)], capsys))
    assert f"class list file {binary} is not text" in line


def test_splits_with_a_garbage_label_under_root(data_copy, capsys):
    label = sample(data_copy, "train", 4)[1]
    label.write_bytes(b"\x00garbage\xff" * 50)
    line = assert_one_error_line(*run_splits(["--dataset", "voc", "--task", "15-1", "--root", str(data_copy)],
                                             capsys))
    assert f"{label}: label does not decode" in line


# ------------------------------------------------------------------ disk full while saving a checkpoint
def full_disk_after(nbytes: int):
    """A torch.save that writes ``nbytes`` and then finds the disk full."""
    def save(obj, file):
        file.write(b"x" * nbytes)
        raise OSError(errno.ENOSPC, "No space left on device")
    return save


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from utils import checkpoint as ckpt
    from utils.files import FileWriteError
    path = tmp_path / "checkpoints" / "step0_partial.pt"
    ckpt.save_atomic({"weights": torch.arange(5)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", full_disk_after(100))
    with pytest.raises(FileWriteError, match=f"could not write {path}: No space left on device \\(its previous "
                                             "version is unchanged\\)"):
        ckpt.save_atomic({"weights": torch.arange(6)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    assert torch.equal(ckpt.load(path)["weights"], torch.arange(5))


@pytest.mark.slow
def test_disk_full_during_a_run_is_one_line(data_copy, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch, "save", full_disk_after(10))
    result = run_in_process(main_argv(options(data_copy, tmp_path / "runs")), capsys)
    line = assert_clean_user_error(result)
    checkpoints = tmp_path / "runs" / "run" / "checkpoints"
    assert f"FileWriteError: could not write {checkpoints / 'step0'}" in line and "No space left on device" in line
    assert not any(checkpoints.iterdir())  # neither a checkpoint nor a temporary file
