"""Helpers of the end-to-end tests: tiny runs through ``main.py`` (as a subprocess, or ``main.main`` in this
process) and what to check in their output. The runs themselves are session fixtures in ``tests/conftest.py``,
trained once and shared by every module that reads them."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_VAL, IMAGE_SIZE = 60, 20, 32
# the dataset the bad-input tests copy and break (tests/conftest.py clean_data): small, so a copy is cheap
CLEAN_TRAIN, CLEAN_VAL = 16, 8
STEPS_3 = [list(range(15)), [15, 16, 17], [18, 19, 20]]
RUN_TIMEOUT = 420  # seconds; a hung run (e.g. a collective waiting forever) fails instead of blocking the suite


# ------------------------------------------------------------------ helpers
def subprocess_env() -> dict:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # never inherit a launcher's
        env.pop(key, None)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    return env


def run_options(data_root: Path, output_dir: Path, name: str, steps=STEPS_3, **train) -> list[str]:
    """--opt overrides of configs/demo.yaml for a tiny CPU run; everything the assertions rely on
    is set here, so an edit of the demo config does not change what these tests check."""
    options = [
        f"name={name}", f"output_dir={output_dir}", "device=cpu", "seed=0",
        f"data.root={data_root}", "data.synthetic.enabled=true", f"data.synthetic.num_train={NUM_TRAIN}",
        f"data.synthetic.num_val={NUM_VAL}", f"data.synthetic.image_size={IMAGE_SIZE}", "data.synthetic.seed=0",
        f"data.base_size={IMAGE_SIZE}", f"data.crop_size={IMAGE_SIZE}", "data.eval_mode=center_crop",
        f"data.custom_steps={json.dumps(steps)}", "data.setting=overlapped", "data.num_workers=0",
        "model.architecture=deeplabv3", "model.backbone=resnet18", "model.pretrained=none", "model.output_stride=16",
        "model.head_channels=16", "method.name=mbs",
        "train.batch_size=4", "train.val_batch_size=10", "train.log_interval=1", "train.validation=none",
        "train.checkpoint_policy=last", "train.qualitative_figure=null",  # demo.yaml's figure goes to fig/
    ]
    # one epoch per step: 13 / 4 / 4 iterations for the default steps, capped at 3
    train = {"max_iters_per_step": 3, "epochs": 1, "epochs_incremental": 1, "checkpoint_interval": 100, **train}
    options += [f"train.{key}={value}" for key, value in train.items()]
    return options


def main_command(options: list[str], *flags: str) -> list[str]:
    return [sys.executable, "main.py", "--config", "configs/demo.yaml", *flags, "--opt", *options]


def run(command: list[str], timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def run_in_process(argv: list[str], capsys) -> subprocess.CompletedProcess:
    """``main.main(argv)`` in this process (its return value is the exit code ``sys.exit`` gets), with the
    output captured: the user-error paths without paying a fresh torch import per test."""
    import logging

    import main as main_module
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    capsys.readouterr()
    try:
        code = main_module.main(argv)
    finally:
        torch.set_num_threads(threads)
        logger = logging.getLogger("mbs")
        for handler in logger.handlers:  # the run's log file stays open otherwise
            handler.close()
        logger.handlers.clear()
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


def main_argv(options: list[str], *flags: str) -> list[str]:
    return ["--config", str(ROOT / "configs" / "demo.yaml"), *flags, "--opt", *options]


def describe(result: subprocess.CompletedProcess) -> str:
    return (f"exit code {result.returncode}\n--- stdout (tail) ---\n{result.stdout[-3000:]}\n"
            f"--- stderr (tail) ---\n{result.stderr[-3000:]}")


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def file_set(run_dir: Path) -> set[str]:
    """Every file of a run folder (hidden ones too), event files by pattern (their names hold time and pid)."""
    names = set()
    for path in run_dir.rglob("*"):
        if path.is_file():
            relative = path.relative_to(run_dir).as_posix()
            if relative.startswith("tensorboard/events.out.tfevents."):
                relative = "tensorboard/events.out.tfevents.*"
            names.add(relative)
    return names


def event_files(run_dir: Path) -> set[Path]:
    return set((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def scalars(event_file: Path) -> dict[str, list[int]]:
    """tag -> the steps at which it was logged, read with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [event.step for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if " ERROR " in line or line.startswith("config error")]


def assert_clean_user_error(result: subprocess.CompletedProcess) -> str:
    """Exit code 2, no traceback, exactly one error line; returns that line."""
    assert result.returncode == 2, describe(result)
    assert "Traceback" not in result.stdout + result.stderr, describe(result)
    lines = error_lines(result)
    assert len(lines) == 1, describe(result)
    return lines[0]


def assert_same_finished_step(resumed: Path, uninterrupted: Path) -> None:
    """Two finished-step checkpoints hold bit-identical weights and the same test score."""
    ours = torch.load(resumed, map_location="cpu", weights_only=True)
    theirs = torch.load(uninterrupted, map_location="cpu", weights_only=True)
    assert ours["model"].keys() == theirs["model"].keys()
    for key, value in theirs["model"].items():
        assert torch.equal(ours["model"][key], value), f"{key} differs from the uninterrupted run's"
    assert ours["metrics"]["miou_all"] == theirs["metrics"]["miou_all"]


def kill_when(command: list[str], log: Path, ready, waiting_for: str) -> None:
    """Start ``command`` (its output to ``log``) and SIGKILL it the moment ``ready()`` holds; the test fails if
    the run ends first or nothing happens within ``RUN_TIMEOUT``."""
    import signal
    import time

    import pytest
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=subprocess_env(), stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + RUN_TIMEOUT
            while not ready():
                if process.poll() is not None:
                    pytest.fail(f"the run ended (exit code {process.returncode}) before {waiting_for}:\n"
                                f"{log.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"not {waiting_for} after {RUN_TIMEOUT} s")
                time.sleep(0.02)
            process.send_signal(signal.SIGKILL)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait()


def free_port() -> int:
    """A TCP port free on this host now, for a gloo process group's rendezvous."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def on_two_gloo_ranks(target) -> dict:
    """``target(rank, world_size, port, results)`` in two spawned processes; what each put in ``results``."""
    import torch.multiprocessing as mp
    results = mp.Manager().dict()
    mp.spawn(target, args=(2, free_port(), results), nprocs=2, join=True)
    return dict(results)


def random_step_inputs(batch, num_classes, num_old, height, width, seed):
    """New logits (with grad), old logits and labels over 0, old classes, new classes and 255."""
    generator = torch.Generator().manual_seed(seed)
    new = (3 * torch.randn(batch, num_classes, height, width, generator=generator)).requires_grad_()
    old = 3 * torch.randn(batch, num_old, height, width, generator=generator)
    values = torch.tensor([0, *range(1, num_classes), 255])
    labels = values[torch.randint(0, len(values), (batch, height, width), generator=generator)]
    labels.view(-1)[: len(values)] = values  # every kind of label occurs at least once
    return new, old, labels
